"""``python -m coderstack ...`` runs the CLI (the same as the ``coderstack`` console script)."""

from coderstack.cli.main import main

if __name__ == "__main__":
    main()
