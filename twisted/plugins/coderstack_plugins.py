"""twistd plugins: ``twistd coderstack-server`` and ``twistd coderstack-agent``.

ServiceMaker imports the named module lazily, so ``twistd --help`` stays fast.
"""

from twisted.application.service import ServiceMaker

coderstackServer = ServiceMaker(
    "coderstack server",
    "coderstack.server.tap",
    "The coderstack control plane: /api/v2, coordinator, DERP relay and STUN.",
    "coderstack-server",
)

coderstackAgent = ServiceMaker(
    "coderstack agent",
    "coderstack.agent.tap",
    "A coderstack workspace agent: dials out to the server and serves its tunnel.",
    "coderstack-agent",
)
