"""Per-user limits on long-lived resources, so one member cannot exhaust the server.

Members get the base numbers; owners (who run tests and automation) get ``owner_multiplier``
times as many. Set from the server options (``--coordinator-peers-per-user`` and friends).
"""

from __future__ import annotations

from dataclasses import dataclass

from coderstack.coordinator.core import PeerLimits

DEFAULT_COORDINATOR_PEERS = 100
DEFAULT_COORDINATOR_LOST_PEERS = 100
DEFAULT_DERP_CONNECTIONS = 100
DEFAULT_OWNER_MULTIPLIER = 10


@dataclass(frozen=True)
class UserLimits:
    coordinator_peers: int = DEFAULT_COORDINATOR_PEERS
    coordinator_lost_peers: int = DEFAULT_COORDINATOR_LOST_PEERS
    derp_connections: int = DEFAULT_DERP_CONNECTIONS
    owner_multiplier: int = DEFAULT_OWNER_MULTIPLIER

    def _scale(self, n: int, is_owner: bool) -> int:
        return n * self.owner_multiplier if is_owner else n

    def peer_limits(self, is_owner: bool) -> PeerLimits:
        return PeerLimits(
            connected=self._scale(self.coordinator_peers, is_owner),
            lost=self._scale(self.coordinator_lost_peers, is_owner),
        )

    def derp_connections_for(self, is_owner: bool) -> int:
        return self._scale(self.derp_connections, is_owner)
