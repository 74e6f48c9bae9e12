"""Entry point of the ``terraform-provider-coder`` executable (console script ``main``)."""

from __future__ import annotations


def main() -> None:
    # Imported here so `--help`-less startup stays the only thing this module does.
    from tf.runner import run_provider

    from coderstack.provider.provider import CoderProvider

    run_provider(CoderProvider())


if __name__ == "__main__":
    main()
