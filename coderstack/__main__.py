"""``python -m coderstack``: the CLI (what config-ssh's ProxyCommand runs)."""
from coderstack.cli.main import main

main()
