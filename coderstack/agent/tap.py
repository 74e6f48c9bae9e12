"""twistd entry for ``coderstack-agent``: the options class and makeService."""

from coderstack.agent.options import AgentOptions as Options
from coderstack.agent.service import makeService

__all__ = ["Options", "makeService"]
