"""The ``coderstack`` entry point (the console script and ``python -m coderstack``).

It looks at the command word before anything heavy is imported: ``ssh --stdio`` (OpenSSH's
ProxyCommand) goes through the tunnel daemon's warm path (:mod:`coderstack.cli.warm`, standard
library only), ``tunnel-daemon`` starts the daemon (:mod:`coderstack.cli.tunneld`), and
everything else — or a warm path that cannot be used — is the full CLI
(:func:`coderstack.cli.main.main`). Kept apart from ``warm`` so that the library the daemon and
the CLI share does not import the daemon.
"""

from __future__ import annotations

import os
import sys

from coderstack.cli.warm import DEBUG_ENV, TRUE_VALUES, Unavailable, enabled, parse_stdio, ssh_stdio


def main(argv: list[str] | None = None) -> None:
    """The ``coderstack`` entry point: the warm paths first, then the full CLI."""
    args = sys.argv[1:] if argv is None else list(argv)
    environ = dict(os.environ)
    command = command_word(args)
    if command == "tunnel-daemon":
        from coderstack.cli import tunneld

        sys.exit(tunneld.main(args, environ))
    if command == "ssh" and enabled(environ):
        req = parse_stdio(args, environ)
        if req is not None:
            try:
                sys.exit(ssh_stdio(req, environ))
            except Unavailable as why:
                if req.verbose or environ.get(DEBUG_ENV, "").lower() in TRUE_VALUES:
                    sys.stderr.write(f"coderstack: not using the tunnel daemon ({why}); dialing here\n")
                    sys.stderr.flush()
    from coderstack.cli.main import main as full

    full(args)


def command_word(args: list[str]) -> str | None:
    """The first word that is not a global option (or its value)."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--global-config", "--url", "--token"):
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        return arg
    return None
