"""twistd entry for ``coderstack-server``: the options class and makeService."""

from coderstack.server.options import ServerOptions as Options
from coderstack.server.service import makeService

__all__ = ["Options", "makeService"]
