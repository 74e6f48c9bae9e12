"""``python -m coderstack ...`` runs the CLI (the same as the ``coderstack`` console script).

:func:`coderstack.cli.entry.main` answers ``ssh --stdio`` through the tunnel daemon without
importing Twisted, and hands everything else to :func:`coderstack.cli.main.main`.
"""

from coderstack.cli.entry import main

if __name__ == "__main__":
    main()
