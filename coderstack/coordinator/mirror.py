"""The other replicas' peers and tunnels, as rows, turned into one coordinator's remote view.

Sans-IO: whatever reads the shared database (:mod:`coderstack.server.pgcoord`) hands in rows —
every binding of one peer, every replica holding one tunnel, the set of live replicas, or all of
it at once after a lost notification — and the :class:`Mirror` keeps them per replica and tells
the coordinator what changed (``set_remote``, ``set_remote_tunnel``).

Rows of this replica are ignored: the coordinator's own state is the truth for its own peers.
A binding on a replica that stopped heartbeating is shown as LOST (with its last node), never
dropped at once, so a client keeps its agent's node while the agent reconnects elsewhere; the
rows go when that replica has been gone longer than the LOST timeout and are deleted. Tunnels
held by a dead replica stay until then too, as a LOST peer's tunnels do on one server.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from uuid import UUID

from coderstack.coordinator.core import Coordinator
from coderstack.coordinator.replication import Binding, best_binding

PeerRow = tuple[UUID, Binding]  # (replica id, binding)
TunnelRow = tuple[UUID, UUID, UUID]  # (replica id, src, dst)


class Mirror:
    """The rows of every other replica, pushed into ``coordinator`` as its remote view."""

    def __init__(self, coordinator: Coordinator, replica_id: UUID) -> None:
        self.coordinator = coordinator
        self.replica_id = replica_id
        self._bindings: dict[UUID, dict[UUID, Binding]] = {}
        self._tunnels: dict[tuple[UUID, UUID], set[UUID]] = {}
        self._alive: frozenset[UUID] | None = None  # None: not known yet, so all are alive

    def peer_rows(self, peer_id: UUID, rows: Iterable[PeerRow]) -> None:
        """Every binding of ``peer_id`` in the database now (none: it is bound nowhere)."""
        held = {replica: b for replica, b in rows if replica != self.replica_id}
        if held:
            self._bindings[peer_id] = held
        else:
            self._bindings.pop(peer_id, None)
        self._push_peer(peer_id)

    def tunnel_rows(self, src: UUID, dst: UUID, replicas: Iterable[UUID]) -> None:
        """Every replica holding the tunnel ``src -> dst`` now."""
        held = {r for r in replicas if r != self.replica_id}
        if held:
            self._tunnels[src, dst] = held
        else:
            self._tunnels.pop((src, dst), None)
        self.coordinator.set_remote_tunnel(src, dst, bool(held))

    def replicas_alive(self, alive: Iterable[UUID]) -> None:
        """The replicas heartbeating now; bindings on the others are shown as LOST."""
        old, self._alive = self._alive, frozenset(alive)
        for peer_id, held in list(self._bindings.items()):
            if any(self._is_alive(r, old) != self._is_alive(r, self._alive) for r in held):
                self._push_peer(peer_id)

    def resync(self, peers: Iterable[PeerRow], tunnels: Iterable[TunnelRow]) -> None:
        """Everything in the database at once (after notifications may have been lost): the
        coordinator is told about whatever differs from what it had."""
        bindings: dict[UUID, dict[UUID, Binding]] = {}
        for replica, b in peers:
            if replica != self.replica_id:
                bindings.setdefault(b.peer_id, {})[replica] = b
        held: dict[tuple[UUID, UUID], set[UUID]] = {}
        for replica, src, dst in tunnels:
            if replica != self.replica_id:
                held.setdefault((src, dst), set()).add(replica)
        stale_peers = set(self._bindings) - set(bindings)
        stale_tunnels = set(self._tunnels) - set(held)
        self._bindings, self._tunnels = bindings, held
        for peer_id in (*bindings, *stale_peers):
            self._push_peer(peer_id)
        for src, dst in held:
            self.coordinator.set_remote_tunnel(src, dst, True)
        for src, dst in stale_tunnels:
            self.coordinator.set_remote_tunnel(src, dst, False)

    def replicas_of(self, peer_id: UUID) -> frozenset[UUID]:
        """The other replicas holding a binding of ``peer_id``."""
        return frozenset(self._bindings.get(peer_id, ()))

    def _is_alive(self, replica: UUID, alive: frozenset[UUID] | None) -> bool:
        return alive is None or replica in alive

    def _push_peer(self, peer_id: UUID) -> None:
        held = self._bindings.get(peer_id, {})
        shown = [b if self._is_alive(r, self._alive) else replace(b, lost=True) for r, b in held.items()]
        self.coordinator.set_remote(peer_id, best_binding(shown))
