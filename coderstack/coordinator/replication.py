"""What replicas of one server tell each other about their coordinator peers.

Each replica's coordinator holds the peers connected to it. When several replicas share a
database, every replica also needs the peers held elsewhere: a client on one replica tunnels to
an agent on another, and the closed relay on either must know both node keys and the tunnel.

A *binding* is one peer as one replica holds it: its auth, its last node, whether its
connection is LOST, and when that last changed (the holding replica's clock, seconds). The
same peer may be bound on several replicas at once — an agent that reconnected elsewhere
before its old connection timed out — and :func:`best_binding` picks the one the others
should use: a connected binding beats a LOST one, one with a node beats one without, and then
the newer wins. A replica that stopped heartbeating has its bindings shown as LOST, never
dropped at once: its peers are expected back on another replica.

:class:`Replication` is how a coordinator reports its own peers' changes upward, to whatever
shares them (:mod:`coderstack.server.pgcoord` over PostgreSQL); the other direction is the
coordinator's ``set_remote``, ``set_remote_tunnel`` and ``remote_ready``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

from coderstack.coordinator.auth import Auth
from coderstack.wire.coordination import Node


@dataclass(frozen=True)
class Binding:
    """One peer as one replica holds it."""

    peer_id: UUID
    auth: Auth
    node: Node | None
    lost: bool
    updated_at: float

    def rank(self) -> tuple[bool, bool, float]:
        return (not self.lost, self.node is not None, self.updated_at)


def best_binding(bindings: Iterable[Binding]) -> Binding | None:
    """The binding other replicas should use: connected beats LOST, a node beats none, newer
    beats older; None for no bindings."""
    best: Binding | None = None
    for b in bindings:
        if best is None or b.rank() > best.rank():
            best = b
    return best


class Replication(Protocol):
    """A coordinator's own peers and tunnels changing, told to the other replicas."""

    def peer_bound(self, binding: Binding) -> None:
        """A peer connected here, sent a node, or became LOST here."""

    def peer_unbound(self, peer_id: UUID) -> None:
        """A peer left this replica (graceful disconnect, LOST timeout, replaced or kicked)."""

    def tunnel_added(self, src: UUID, dst: UUID) -> None: ...

    def tunnel_removed(self, src: UUID, dst: UUID) -> None: ...

    def ready_for_handshake(self, agent_id: UUID, client_id: UUID) -> None:
        """An agent here acknowledged a client held by another replica."""
