"""The coordinator: who is connected, which tunnels exist, and who must hear about which node.

Sans-IO: no reactor, no sockets. Time comes from an injected ``IReactorTime`` (``clock.seconds()``
and ``clock.callLater`` for the LOST grace timer). Each peer connection hands in two callables,
``send(CoordinateResponse)`` and ``close()``; everything the coordinator says goes out through
them. The transport adapter (``coordinator/websocket.py``) parses messages with
``coderstack.wire.coordination.parse_request`` (or calls :meth:`PeerConnection.handle_text`) and
tells the core when the transport drops (:meth:`PeerConnection.lost`).

Semantics (Coder's tailnet v2 in-memory coordinator, with LOST peers retained):

* A *tunnel* ``src -> dst`` means "src wants to reach dst". It is owned by its source: it goes away
  when the source removes it, disconnects gracefully, or is forgotten after being LOST. Tunnels
  *to* a peer survive that peer's disconnect, so a client waiting for an agent gets the agent's
  node as soon as the agent comes (back) and sends ``update_self``.
* ``add_tunnel``: record src->dst; if dst has a node, src gets it (NODE "add tunnel"); if src has a
  node, dst gets it.
* ``update_self``: store the node; every tunnel peer (either direction) gets NODE "node update".
* ``remove_tunnel``: both sides get DISCONNECTED "remove tunnel" (unless a reverse tunnel remains).
* ``ready_for_handshake`` (dst -> coordinator, for a src with a tunnel to dst): src gets
  READY_FOR_HANDSHAKE "ready for handshake".
* ``disconnect`` (graceful): tunnel peers get DISCONNECTED "graceful disconnect"; the peer, its
  node and its tunnels are removed; its connection is closed.
* Transport dropped without ``disconnect``: the peer is LOST. Tunnel peers get LOST "lost" with its
  last node; the coordinator keeps its node and tunnels for ``lost_timeout`` seconds (15 min). If
  it reconnects with the same id it resumes: it gets NODE "resume" for each tunnel peer that has a
  node, and its tunnel peers get its retained node as NODE "resume". If it does not come back it
  is forgotten: tunnel peers get DISCONNECTED "lost timeout".
* A new connection with the id of a connected peer overwrites it: the old connection's ``close()``
  is called, the overwrite is counted, the new connection takes over node and tunnels and gets its
  tunnel peers' nodes. (If the new connection's auth differs from the old one's, the old peer is
  removed first, as if it had disconnected with reason "replaced".)
* Whenever a tunnel peer is LOST, its node is delivered as NODE followed by LOST in one response.
* ``close()`` marks every connected peer LOST and closes its connection; no updates are sent.

Authorization (Coder's ``tailnet/tunnel.go``; the HTTP layer has already checked who may connect):

* :class:`AgentAuth` — may not add tunnels; its node addresses and allowed IPs must be exactly its
  UUID-derived /128 in ``fd7a:115c:a1e0::/48`` or ``fd60:627a:a42b::/48``; may send
  ``ready_for_handshake`` only for peers that have a tunnel to it.
* :class:`ClientAuth` — may add tunnels only to its one agent; may not send
  ``ready_for_handshake``; its addresses and allowed IPs must be /128s inside
  ``fd7a:115c:a1e0::/48`` and not its agent's own address.
* :class:`ServerAuth` — the server's own tailnet (the app proxy's one Conn): may add tunnels to
  any agent (the HTTP layer checks who may use which app); may not send ``ready_for_handshake``;
  its addresses and allowed IPs must be /128s inside ``fd7a:115c:a1e0::/48`` and not an agent's.
* Every kind: no tunnel to itself or to a peer that is not an agent; a node key held by a peer
  with a different auth is refused.
* ``connect`` refuses (``PeerIdConflict``) an agent whose peer id is not its agent id, and a client
  whose peer id is an agent's or the target of a tunnel (peer ids of clients are chosen by the
  server, so this only guards against mistakes and collisions).

A refused part of a request is skipped (the other parts still run), counted, and answered with
one ``{"error": "..."}`` response per request. A connection with ``max_refusals`` refusals
(malformed messages included) within ``refusal_window`` seconds (16 in 60 s) is closed and its
peer removed as if it had disconnected, with reason "too many refused requests". A
``ready_for_handshake`` for a tunnel that no longer exists is answered and counted
("late_handshakes") but never closes the connection: an agent acknowledging a client that has
just left is a race, not abuse.

Every call of a connection's ``close()`` is preceded by setting its ``close_reason`` ("overwritten",
"graceful disconnect", "too many refused requests", "replaced", "coordinator closed"), so the
adapter can pick a websocket close code. After ``close()`` or ``lost()`` the connection's methods
are no-ops, so the adapter may call ``lost()`` from its close handler unconditionally.

Limits (per user, for client peers; an agent has exactly one peer id): a ``connect`` may carry
:class:`PeerLimits`. A client whose user already has ``connected`` connected client peers is
refused with :class:`PeerLimitExceeded` (counted as "peer_limit_refused"); the count takes in the
user's connected client peers that other replicas hold, so the cap is the deployment's;
:meth:`Coordinator.limit_problem` answers the same question for the HTTP layer before it
upgrades. When a client peer is LOST and its user then holds more than ``lost`` LOST peers, the
ones lost longest ago are forgotten at once (tunnel peers get DISCONNECTED "lost limit"; counted
as "lost_evicted"), so dropped connections cannot pile up for the 15-minute grace period.

Outgoing events are batched: one :class:`CoordinateResponse` per recipient per event, and a
fan-out sends the same response object to every recipient, so its cached ``to_text()`` encodes
once. A response whose text is longer than ``max_message_bytes`` is sent as several, in order
(``split_response``), so any number of tunnel peers reaches a reconnecting peer. Calls to ``send``/``close`` happen after the coordinator's state is updated and may re-enter
it safely.

Measurements (for ``/metrics``): ``counters`` (also in :meth:`Coordinator.debug`), peers by kind
and status (:meth:`Coordinator.peer_counts`), :meth:`Coordinator.tunnel_count`, and
``fanout_seconds``, a histogram of the time from receiving an ``update_self`` (before parsing it,
through :meth:`PeerConnection.handle_text`) until its responses have been handed to every
connected tunnel peer's ``send``, read from the injected clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

from twisted.logger import Logger

from coderstack.coordinator.auth import KINDS, AgentAuth, Auth, ClientAuth, ServerAuth, kind_of
from coderstack.coordinator.replication import Binding, Replication
from coderstack.histogram import Histogram
from coderstack.twistedtypes import Clock, DelayedCall
from coderstack.wire.coordination import (
    CODER_SERVICE_PREFIX,
    MAX_RESPONSE_MESSAGE_BYTES,
    TAILSCALE_SERVICE_PREFIX,
    CoordinateRequest,
    CoordinateResponse,
    CoordinationError,
    Node,
    PeerUpdate,
    PeerUpdateKind,
    parse_request,
    prefix_from_uuid,
    split_response,
)

__all__ = [
    "KINDS",
    "Binding",
    "Replication",
    "AgentAuth",
    "ClientAuth",
    "ServerAuth",
    "Coordinator",
    "PeerConnection",
    "PeerIdConflict",
    "PeerLimitExceeded",
    "PeerLimits",
    "DEFAULT_LOST_TIMEOUT",
    "DEFAULT_MAX_REFUSALS",
]

DEFAULT_LOST_TIMEOUT = 15 * 60.0
DEFAULT_MAX_REFUSALS = 16
DEFAULT_REFUSAL_WINDOW = 60.0

REASON_ADD_TUNNEL = "add tunnel"
REASON_NODE_UPDATE = "node update"
REASON_REMOVE_TUNNEL = "remove tunnel"
REASON_GRACEFUL = "graceful disconnect"
REASON_LOST = "lost"
REASON_RESUME = "resume"
REASON_LOST_TIMEOUT = "lost timeout"
REASON_READY = "ready for handshake"
REASON_REPLACED = "replaced"
REASON_REFUSED = "too many refused requests"
REASON_LOST_LIMIT = "lost limit"
# Why the coordinator called a connection's close() (PeerConnection.close_reason), besides
# REASON_GRACEFUL, REASON_REFUSED and REASON_REPLACED.
CLOSE_OVERWRITTEN = "overwritten"
CLOSE_SHUTDOWN = "coordinator closed"

CONNECTED: Literal["connected"] = "connected"
LOST: Literal["lost"] = "lost"

NODE = PeerUpdateKind.NODE
DISCONNECTED = PeerUpdateKind.DISCONNECTED
LOST_KIND = PeerUpdateKind.LOST
READY = PeerUpdateKind.READY_FOR_HANDSHAKE


class PeerIdConflict(ValueError):
    """``connect`` was given a peer id that its auth may not use."""


class PeerLimitExceeded(Exception):
    """``connect`` would give a user more connected client peers than its limit; the message
    names the limit."""


@dataclass(frozen=True)
class PeerLimits:
    """Per-user caps on client peers: connected at once, and LOST ones kept."""

    connected: int
    lost: int


class _Peer:
    __slots__ = ("id", "name", "auth", "conn", "status", "node", "last_seen", "forget_call", "limits",
                 "bound_at")

    def __init__(self, peer_id: UUID, name: str, auth: Auth, now: float) -> None:
        self.limits: PeerLimits | None = None
        self.id = peer_id
        self.name = name
        self.auth = auth
        self.conn: PeerConnection | None = None
        self.status: Literal["connected", "lost"] = CONNECTED
        self.node: Node | None = None
        self.last_seen = now
        self.forget_call: DelayedCall | None = None
        # When its binding last changed (connected, node, LOST): how replicas rank bindings.
        self.bound_at = now

    def binding(self) -> Binding:
        return Binding(self.id, self.auth, self.node, self.status == LOST, self.bound_at)


@dataclass(frozen=True)
class _View:
    """A peer as its tunnel peers here should see it: bound here, or the best binding of
    another replica (whichever ranks higher)."""

    auth: Auth
    node: Node | None
    lost: bool
    remote: bool


class PeerConnection:
    """One live connection of a peer, as seen by the transport adapter.

    After the connection is superseded (overwrite), lost, disconnected or closed, every method is a
    harmless no-op, so an adapter may call :meth:`lost` from ``connectionLost`` unconditionally.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        peer_id: UUID,
        name: str,
        auth: Auth,
        send: Callable[[CoordinateResponse], None],
        close: Callable[[], None],
    ) -> None:
        self._coordinator = coordinator
        self.peer_id = peer_id
        self.name = name
        self.auth = auth
        self._send = send
        self._close = close
        self._done = False
        self.refusals = 0
        self._strikes: deque[float] = deque()
        #: Set just before the coordinator calls ``close()`` (or on ``lost()``): "overwritten",
        #: "graceful disconnect", "too many refused requests", "replaced", "coordinator closed"
        #: or "lost". An adapter can map it to a websocket close code.
        self.close_reason: str | None = None

    @property
    def active(self) -> bool:
        """True while this connection is the peer's current one."""
        return not self._done

    def handle(self, request: CoordinateRequest) -> None:
        """Process one request from this peer."""
        self._coordinator._handle(self, request)

    def handle_text(self, data: str | bytes) -> None:
        """Parse and process one websocket message; malformed input is answered and counted."""
        # The fan-out histogram counts from here: parsing is part of the coordinator's delay.
        received = self._coordinator._clock.seconds()
        try:
            request = parse_request(data)
        except CoordinationError as e:
            self._coordinator._malformed(self, e)
        else:
            self._coordinator._handle(self, request, received)

    def lost(self) -> None:
        """The transport dropped without a graceful disconnect."""
        self._coordinator._lost(self)

    def disconnect(self) -> None:
        """Graceful leave, as if the peer had sent ``{"disconnect": {}}``; closes the connection."""
        self._coordinator._disconnect(self)

    def touch(self) -> None:
        """The transport saw life (e.g. a websocket pong): refresh ``last_seen``."""
        self._coordinator._touch(self)

    def __repr__(self) -> str:
        state = "active" if self.active else "done"
        return f"<PeerConnection {self.peer_id} {self.name!r} {state}>"


class Coordinator:
    """In-memory coordinator for one server. See the module docstring for the semantics."""

    _log = Logger()

    def __init__(
        self,
        clock: Clock,
        *,
        lost_timeout: float = DEFAULT_LOST_TIMEOUT,
        max_refusals: int = DEFAULT_MAX_REFUSALS,
        refusal_window: float = DEFAULT_REFUSAL_WINDOW,
        max_message_bytes: int = MAX_RESPONSE_MESSAGE_BYTES,
    ) -> None:
        self._clock = clock
        self.max_message_bytes = max_message_bytes
        # user id -> its client peers (connected and LOST), for the per-user limits
        self._by_user: dict[UUID, dict[UUID, None]] = {}
        self.lost_timeout = lost_timeout
        self.max_refusals = max_refusals
        self.refusal_window = refusal_window
        self._peers: dict[UUID, _Peer] = {}
        # Tunnels, indexed both ways; dicts as insertion-ordered sets.
        self._by_src: dict[UUID, dict[UUID, None]] = {}
        self._by_dst: dict[UUID, dict[UUID, None]] = {}
        self._by_key: dict[bytes, UUID] = {}
        # What other replicas hold (empty for a single server): the best binding per peer,
        # their node keys, and the tunnels they hold, indexed both ways.
        self._remote: dict[UUID, Binding] = {}
        self._remote_keys: dict[bytes, UUID] = {}
        self._rsrc: dict[UUID, dict[UUID, None]] = {}
        self._rdst: dict[UUID, dict[UUID, None]] = {}
        # user id -> its client peers other replicas hold, so the per-user limit is the
        # deployment's, not each replica's
        self._remote_by_user: dict[UUID, dict[UUID, None]] = {}
        #: Told of every change to the peers and tunnels held here (None: a single server).
        self.replication: Replication | None = None
        self._outbox: deque[tuple[PeerConnection, CoordinateResponse | None]] = deque()
        self._flushing = False
        self._closed = False
        self.counters: dict[str, int] = {
            "connects": 0,
            "overwrites": 0,
            "refusals": 0,
            "late_handshakes": 0,
            "malformed": 0,
            "kicked": 0,
            "lost": 0,
            "forgotten": 0,
            "stale_requests": 0,
            "peer_limit_refused": 0,
            "lost_evicted": 0,
            # update_self requests, refused ones included, and the PeerUpdates delivered to
            # peers: a scale test's load in and the coordinator's work out.
            "node_updates_received": 0,
            "peer_updates_sent": 0,
        }
        #: Seconds from receiving an ``update_self`` to having handed the resulting responses to
        #: every tunnel peer's ``send`` (on the injected clock; zero-width on a ``task.Clock``).
        self.fanout_seconds = Histogram()

    # --- connections ----------------------------------------------------------------------------

    def connect(
        self,
        peer_id: UUID,
        name: str,
        auth: Auth,
        send: Callable[[CoordinateResponse], None],
        close: Callable[[], None],
        limits: PeerLimits | None = None,
    ) -> PeerConnection:
        """Register a new connection for ``peer_id``.

        Raises :class:`PeerIdConflict` (a ``ValueError``) for an auth that does not fit the id: an
        agent's peer id must be its agent id; a client's must not be an agent's id or the target
        of a tunnel. Raises :class:`PeerLimitExceeded` when ``limits`` would be exceeded, and
        ``RuntimeError`` after :meth:`close`.
        """
        if self._closed:
            raise RuntimeError("the coordinator is closed")
        if not isinstance(auth, AgentAuth | ClientAuth | ServerAuth):
            raise TypeError(f"unknown auth {auth!r}")
        problem = self.check_peer_id(peer_id, auth)
        if problem is not None:
            raise PeerIdConflict(problem)
        problem = self.limit_problem(peer_id, auth, limits)
        if problem is not None:
            self.counters["peer_limit_refused"] += 1
            raise PeerLimitExceeded(problem)

        now = self._clock.seconds()
        conn = PeerConnection(self, peer_id, name, auth, send, close)
        self.counters["connects"] += 1
        before = self._view(peer_id)
        peer = self._peers.get(peer_id)
        if peer is not None and peer.auth != auth:
            self._log.info(
                "coordinator: peer {peer_id} reconnected with different auth; replacing it",
                peer_id=peer_id,
            )
            if peer.conn is not None:
                self.counters["overwrites"] += 1
            self._remove_peer(peer, REASON_REPLACED)
            peer = None

        if peer is None:
            peer = _Peer(peer_id, name, auth, now)
            self._peers[peer_id] = peer
            if isinstance(auth, ClientAuth):
                self._by_user.setdefault(auth.user_id, {})[peer_id] = None
            existed = False
        else:
            existed = True
            if peer.conn is not None:
                self.counters["overwrites"] += 1
                self._log.info("coordinator: connection of {peer_id} overwritten", peer_id=peer_id)
                self._retire(peer.conn, CLOSE_OVERWRITTEN)
            self._cancel_forget(peer)
            peer.name = name
            peer.status = CONNECTED
            peer.last_seen = now
        peer.conn = conn
        peer.limits = limits
        peer.bound_at = now
        self._publish(peer)

        # The newcomer learns the nodes of everyone it has tunnels with.
        reason = REASON_RESUME if existed else REASON_ADD_TUNNEL
        updates: list[PeerUpdate] = []
        for other in self._tunnel_peers(peer_id):
            updates.extend(self._node_updates(other, reason))
        if updates:
            self._emit(peer, CoordinateResponse(tuple(updates)))
        # Its tunnel peers had it as LOST; tell them it is back with the node we kept.
        if before is not None:
            self._announce(peer_id, before, REASON_RESUME)
        self._flush()
        return conn

    def check_peer_id(self, peer_id: UUID, auth: Auth) -> str | None:
        """Why ``connect(peer_id, ..., auth, ...)`` would refuse this id, or None if it is fine.

        For the HTTP layer, to answer 403 before upgrading when a client picks its own peer id.
        """
        if isinstance(auth, AgentAuth):
            if peer_id != auth.agent_id:
                return "an agent's peer id must be its agent id"
            return None
        # Tunnels only ever point at agents, so a client may not take an id that is an agent's,
        # or that somebody is tunnelling to: it would receive their nodes.
        held = self._view(peer_id)
        if (
            (isinstance(auth, ClientAuth) and peer_id == auth.agent_id)
            or peer_id in self._by_dst
            or peer_id in self._rdst
            or (held is not None and isinstance(held.auth, AgentAuth))
        ):
            return f"peer id {peer_id} belongs to an agent"
        return None

    def limit_problem(self, peer_id: UUID, auth: Auth, limits: PeerLimits | None) -> str | None:
        """Why ``connect`` would refuse this client for its user's peer limit, or None."""
        if limits is None or not isinstance(auth, ClientAuth):
            return None
        connected = sum(
            1
            for other_id in self._by_user.get(auth.user_id, ())
            if other_id != peer_id and self._peers[other_id].status == CONNECTED
        ) + sum(
            1
            for other_id in self._remote_by_user.get(auth.user_id, ())
            if other_id != peer_id and other_id not in self._peers and not self._remote[other_id].lost
        )
        if connected >= limits.connected:
            return (
                f"too many coordinator peers for this user: {connected} connected, "
                f"the limit is {limits.connected}"
            )
        return None

    def close(self) -> None:
        """Shut down: every connected peer becomes LOST and its connection is closed."""
        if self._closed:
            return
        self._closed = True
        for peer in self._peers.values():
            self._cancel_forget(peer)
            if peer.conn is not None:
                self._retire(peer.conn, CLOSE_SHUTDOWN)
                peer.conn = None
                peer.status = LOST
        self._flush()

    def drop_connections(self, reason: str) -> None:
        """Close every connection, as if each had dropped: its peer becomes LOST here (and is
        forgotten after the LOST timeout unless it comes back). For a replica that lost its
        database, so its peers reconnect to another replica."""
        for peer in list(self._peers.values()):
            conn = peer.conn
            if conn is not None:
                self._lost(conn)
                conn.close_reason = reason
                self._outbox.append((conn, None))
        self._flush()

    # --- other replicas' peers ------------------------------------------------------------------

    def set_remote(self, peer_id: UUID, binding: Binding | None) -> None:
        """The best binding of ``peer_id`` on the other replicas (None: it has none). Its tunnel
        peers here are told if that changes how they see it."""
        old = self._remote.get(peer_id)
        if old == binding:
            return
        before = self._view(peer_id)
        if old is not None and old.node is not None and self._remote_keys.get(old.node.key) == peer_id:
            del self._remote_keys[old.node.key]
        if old is not None and isinstance(old.auth, ClientAuth):
            mine = self._remote_by_user[old.auth.user_id]
            del mine[peer_id]
            if not mine:
                del self._remote_by_user[old.auth.user_id]
        if binding is None:
            del self._remote[peer_id]
        else:
            self._remote[peer_id] = binding
            if binding.node is not None:
                self._remote_keys[binding.node.key] = peer_id
            if isinstance(binding.auth, ClientAuth):
                self._remote_by_user.setdefault(binding.auth.user_id, {})[peer_id] = None
        gone = REASON_GRACEFUL if old is not None and not old.lost else REASON_LOST_TIMEOUT
        self._announce(peer_id, before, REASON_NODE_UPDATE if binding is not None else gone)
        self._flush()

    def set_remote_tunnel(self, src: UUID, dst: UUID, present: bool) -> None:
        """Whether another replica holds the tunnel ``src -> dst``. A peer here at either end
        learns the other's node when it appears, and DISCONNECTED when the last tunnel between
        them goes."""
        held = dst in self._rsrc.get(src, ())
        if held == present:
            return
        if present:
            self._rsrc.setdefault(src, {})[dst] = None
            self._rdst.setdefault(dst, {})[src] = None
            for here, other in ((dst, src), (src, dst)):
                peer = self._peers.get(here)
                updates = self._node_updates(other, REASON_ADD_TUNNEL)
                if peer is not None and updates:
                    self._emit(peer, CoordinateResponse(tuple(updates)))
        else:
            for index, a, b in ((self._rsrc, src, dst), (self._rdst, dst, src)):
                ends = index[a]
                del ends[b]
                if not ends:
                    del index[a]
            if not self.tunnel_between(src, dst):
                for here, other in ((dst, src), (src, dst)):
                    peer = self._peers.get(here)
                    if peer is not None:
                        self._emit(peer, CoordinateResponse(
                            (PeerUpdate(other, DISCONNECTED, REASON_REMOVE_TUNNEL),)))
        self._flush()

    def remote_ready(self, agent_id: UUID, client_id: UUID) -> None:
        """An agent on another replica acknowledged ``client_id``, which may be held here."""
        client = self._peers.get(client_id)
        if client is not None and client.conn is not None and self.tunnel_between(client_id, agent_id):
            self._emit(client, CoordinateResponse((PeerUpdate(agent_id, READY, REASON_READY),)))
            self._flush()

    def local_bindings(self) -> list[Binding]:
        """Every peer held here, as other replicas should see it (for a full resync)."""
        return [peer.binding() for peer in self._peers.values()]

    def local_tunnels(self) -> list[tuple[UUID, UUID]]:
        """Every tunnel held here."""
        return [(src, dst) for src, dsts in self._by_src.items() for dst in dsts]

    def remote_count(self) -> int:
        """Peers known only from other replicas' bindings."""
        return sum(1 for pid in self._remote if pid not in self._peers)

    # --- queries --------------------------------------------------------------------------------

    def status(self, peer_id: UUID) -> Literal["connected", "lost"] | None:
        """Connected or LOST, here or (best binding) on another replica; None if unknown."""
        view = self._view(peer_id)
        if view is None:
            return None
        return LOST if view.lost else CONNECTED

    def last_seen(self, peer_id: UUID) -> float | None:
        """When the peer last connected, sent a message, was touched or was lost (clock seconds);
        for a peer held only by another replica, when its binding last changed."""
        peer = self._peers.get(peer_id)
        if peer is not None:
            return peer.last_seen
        remote = self._remote.get(peer_id)
        return None if remote is None else remote.updated_at

    def node(self, peer_id: UUID) -> Node | None:
        view = self._view(peer_id)
        return None if view is None else view.node

    def peer_for_node_key(self, key: bytes) -> UUID | None:
        """The connected or LOST peer whose current node has this WireGuard key (held here or
        by another replica)."""
        key = bytes(key)
        found = self._by_key.get(key)
        return found if found is not None else self._remote_keys.get(key)

    def auth_of(self, peer_id: UUID) -> Auth | None:
        view = self._view(peer_id)
        return None if view is None else view.auth

    def name_of(self, peer_id: UUID) -> str | None:
        peer = self._peers.get(peer_id)
        return None if peer is None else peer.name

    def tunnel_between(self, a: UUID, b: UUID) -> bool:
        """True if a tunnel exists in either direction, here or on another replica."""
        return (b in self._by_src.get(a, ()) or a in self._by_src.get(b, ())
                or b in self._rsrc.get(a, ()) or a in self._rsrc.get(b, ()))

    def tunnel_peers(self, peer_id: UUID) -> list[UUID]:
        """Peers with a tunnel to or from ``peer_id`` (whether or not they are connected)."""
        return list(self._tunnel_peers(peer_id))

    def peer_ids(self) -> list[UUID]:
        """Connected and LOST peers."""
        return list(self._peers)

    @property
    def overwrites(self) -> int:
        return self.counters["overwrites"]

    @property
    def refusals(self) -> int:
        return self.counters["refusals"]

    def peer_counts(self) -> dict[tuple[str, str], int]:
        """Peers by (kind, status): ("agent" | "client" | "server", "connected" | "lost").

        For ``/metrics``: one pass over the peers, without :meth:`debug`'s per-peer JSON.
        """
        counts: dict[tuple[str, str], int] = {
            (kind, status): 0 for kind in KINDS for status in (CONNECTED, LOST)
        }
        for peer in self._peers.values():
            counts[_kind(peer.auth), peer.status] += 1
        return counts

    def tunnel_count(self) -> int:
        """Tunnels (src -> dst pairs) held, those of LOST sources included."""
        return sum(len(dsts) for dsts in self._by_src.values())

    def debug(self) -> dict[str, Any]:
        """JSON-able state for ``GET /api/v2/debug/coordinator``."""
        peers = []
        for peer in self._peers.values():
            entry: dict[str, Any] = {
                "id": str(peer.id),
                "name": peer.name,
                "kind": _kind(peer.auth),
                "agent_id": None if isinstance(peer.auth, ServerAuth) else str(peer.auth.agent_id),
                "status": peer.status,
                "node": None if peer.node is None else peer.node.to_json(),
                "last_seen": peer.last_seen,
                "refusals": 0 if peer.conn is None else peer.conn.refusals,
            }
            if isinstance(peer.auth, ClientAuth):
                entry["user_id"] = str(peer.auth.user_id)
            peers.append(entry)
        tunnels = [
            {"src": str(src), "dst": str(dst)} for src, dsts in self._by_src.items() for dst in dsts
        ]
        remote = [
            {"id": str(b.peer_id), "kind": _kind(b.auth), "lost": b.lost,
             "node": None if b.node is None else b.node.to_json(), "updated_at": b.updated_at}
            for b in self._remote.values()
        ]
        return {
            "peers": peers,
            "tunnels": tunnels,
            "remote_peers": remote,
            "remote_tunnels": [
                {"src": str(src), "dst": str(dst)} for src, dsts in self._rsrc.items() for dst in dsts
            ],
            "counters": dict(self.counters),
            "lost_timeout": self.lost_timeout,
            "closed": self._closed,
        }

    # --- request handling -----------------------------------------------------------------------

    def _current(self, conn: PeerConnection) -> _Peer | None:
        if conn._done:
            return None
        peer = self._peers.get(conn.peer_id)
        return peer if peer is not None and peer.conn is conn else None

    def _handle(
        self, conn: PeerConnection, request: CoordinateRequest, received: float | None = None
    ) -> None:
        peer = self._current(conn)
        if peer is None:
            self.counters["stale_requests"] += 1
            return
        now = self._clock.seconds()
        peer.last_seen = now
        # Timed: an accepted update that reached at least one tunnel peer. A request handled
        # from inside a send() is delivered by the outer flush, so it is not finished when this
        # call returns and is left out.
        timed = False
        errors: list[str] = []  # refusals that count towards closing the connection
        notices: list[str] = []  # refusals an honest peer can cause by racing a tunnel's removal
        if request.update_self is not None:
            self.counters["node_updates_received"] += 1
            told = self._update_self(peer, request.update_self, errors)
            timed = told > 0 and not self._flushing
        if request.add_tunnel is not None:
            self._add_tunnel(peer, request.add_tunnel, errors)
        if request.remove_tunnel is not None:
            self._remove_tunnel(peer, request.remove_tunnel)
        if request.ready_for_handshake:
            self._ready_for_handshake(peer, request.ready_for_handshake, errors, notices)
        if errors or notices:
            self._refuse(peer, conn, errors, notices)
        if request.disconnect and self._current(conn) is peer:
            self._remove_peer(peer, REASON_GRACEFUL)
        self._flush()
        if timed:
            start = now if received is None else received
            # max(): the reactor's clock is wall time and may step back.
            self.fanout_seconds.observe(max(0.0, self._clock.seconds() - start))

    def _malformed(self, conn: PeerConnection, error: CoordinationError) -> None:
        peer = self._current(conn)
        if peer is None:
            self.counters["stale_requests"] += 1
            return
        self.counters["malformed"] += 1
        peer.last_seen = self._clock.seconds()
        self._refuse(peer, conn, [f"malformed request: {error}"], [])
        self._flush()

    def _refuse(
        self, peer: _Peer, conn: PeerConnection, errors: list[str], notices: list[str]
    ) -> None:
        text = "; ".join(errors + notices)
        self.counters["refusals"] += len(errors)
        self.counters["late_handshakes"] += len(notices)
        self._emit(peer, CoordinateResponse(error=text))
        if not errors:
            return
        self._log.info(
            "coordinator: refused part of a request from {peer_id} ({name}): {errors}",
            peer_id=peer.id,
            name=peer.name,
            errors=text,
        )
        # Close a connection that keeps asking for what it may not have: max_refusals within
        # refusal_window seconds. A peer with an occasional bug is told, and stays.
        now = self._clock.seconds()
        conn.refusals += len(errors)
        conn._strikes.extend([now] * len(errors))
        while conn._strikes and conn._strikes[0] <= now - self.refusal_window:
            conn._strikes.popleft()
        if len(conn._strikes) >= self.max_refusals:
            self.counters["kicked"] += 1
            self._remove_peer(peer, REASON_REFUSED)

    def _check_node(self, peer: _Peer, node: Node) -> str | None:
        auth = peer.auth
        if isinstance(auth, AgentAuth):
            allowed = {
                prefix_from_uuid(auth.agent_id, TAILSCALE_SERVICE_PREFIX),
                prefix_from_uuid(auth.agent_id, CODER_SERVICE_PREFIX),
            }
            for net in (*node.addresses, *node.allowed_ips):
                if net not in allowed:
                    return f"update_self refused: {net} is not this agent's address"
        else:
            for net in (*node.addresses, *node.allowed_ips):
                if not net.subnet_of(TAILSCALE_SERVICE_PREFIX):
                    return f"update_self refused: {net} is not inside {TAILSCALE_SERVICE_PREFIX}"
                if self._agent_address(net, auth):
                    return f"update_self refused: {net} is the agent's address"
        holder_id = self.peer_for_node_key(node.key)
        if holder_id is not None and holder_id != peer.id:
            holder = self._view(holder_id)
            if holder is not None and holder.auth != auth:
                return "update_self refused: the node key belongs to another peer"
        return None

    def _agent_address(self, net: Any, auth: ClientAuth | ServerAuth) -> bool:
        """Is ``net`` the /128 of the client's agent (or, for the server, of any agent peer)?"""
        if isinstance(auth, ClientAuth):
            return net in (prefix_from_uuid(auth.agent_id, TAILSCALE_SERVICE_PREFIX),
                           prefix_from_uuid(auth.agent_id, CODER_SERVICE_PREFIX))
        agents = [p.id for p in self._peers.values() if isinstance(p.auth, AgentAuth)]
        agents += [b.peer_id for b in self._remote.values() if isinstance(b.auth, AgentAuth)]
        return any(net == prefix_from_uuid(a, TAILSCALE_SERVICE_PREFIX) for a in agents)

    def _update_self(self, peer: _Peer, node: Node, errors: list[str]) -> int:
        """Store the node and tell its tunnel peers; how many were told (0 if refused)."""
        problem = self._check_node(peer, node)
        if problem is not None:
            errors.append(problem)
            return 0
        old = peer.node
        if old is not None and old.key != node.key and self._by_key.get(old.key) == peer.id:
            del self._by_key[old.key]
        self._by_key[node.key] = peer.id
        before = self._view(peer.id)
        peer.node = node
        peer.bound_at = self._clock.seconds()
        self._publish(peer)
        return self._announce(peer.id, before, REASON_NODE_UPDATE, always=True)

    def _add_tunnel(self, src: _Peer, dst_id: UUID, errors: list[str]) -> None:
        auth = src.auth
        if isinstance(auth, AgentAuth):
            errors.append("add_tunnel refused: agents cannot add tunnels")
            return
        if isinstance(auth, ClientAuth) and dst_id != auth.agent_id:
            errors.append(f"add_tunnel refused: this client may only tunnel to {auth.agent_id}")
            return
        if dst_id == src.id:
            errors.append("add_tunnel refused: a peer cannot tunnel to itself")
            return
        held = self._view(dst_id)
        if held is not None and not isinstance(held.auth, AgentAuth):
            errors.append(f"add_tunnel refused: {dst_id} is not an agent")
            return
        dsts = self._by_src.setdefault(src.id, {})
        if dst_id not in dsts and self.replication is not None:
            self.replication.tunnel_added(src.id, dst_id)
        dsts[dst_id] = None
        self._by_dst.setdefault(dst_id, {})[src.id] = None
        updates = self._node_updates(dst_id, REASON_ADD_TUNNEL)
        if updates:
            self._emit(src, CoordinateResponse(tuple(updates)))
        dst = self._peers.get(dst_id)
        if dst is not None and src.node is not None:
            self._emit(
                dst, CoordinateResponse((PeerUpdate(src.id, NODE, REASON_ADD_TUNNEL, src.node),))
            )

    def _remove_tunnel(self, src: _Peer, dst_id: UUID) -> None:
        if dst_id not in self._by_src.get(src.id, ()):
            return
        self._drop_tunnel(src.id, dst_id)
        if self.tunnel_between(src.id, dst_id):
            return  # a reverse tunnel keeps them in touch
        self._emit(
            src, CoordinateResponse((PeerUpdate(dst_id, DISCONNECTED, REASON_REMOVE_TUNNEL),))
        )
        dst = self._peers.get(dst_id)
        if dst is not None:
            self._emit(
                dst, CoordinateResponse((PeerUpdate(src.id, DISCONNECTED, REASON_REMOVE_TUNNEL),))
            )

    def _ready_for_handshake(
        self, dst: _Peer, src_ids: Iterable[UUID], errors: list[str], notices: list[str]
    ) -> None:
        if not isinstance(dst.auth, AgentAuth):
            errors.append("ready_for_handshake refused: clients may not send it")
            return
        by_recipient: dict[UUID, list[PeerUpdate]] = {}
        for src_id in src_ids:
            if src_id not in self._by_dst.get(dst.id, ()) and src_id not in self._rdst.get(dst.id, ()):
                notices.append(f"ready_for_handshake refused: no tunnel from {src_id}")
                continue
            by_recipient.setdefault(src_id, []).append(PeerUpdate(dst.id, READY, REASON_READY))
        for src_id, updates in by_recipient.items():
            src = self._peers.get(src_id)
            if src is not None and src.conn is not None:
                self._emit(src, CoordinateResponse(tuple(updates)))
            elif src_id in self._remote and self.replication is not None:
                # The client is held by another replica: it delivers the READY.
                self.replication.ready_for_handshake(dst.id, src_id)

    # --- losing and removing peers --------------------------------------------------------------

    def _touch(self, conn: PeerConnection) -> None:
        peer = self._current(conn)
        if peer is not None:
            peer.last_seen = self._clock.seconds()

    def _lost(self, conn: PeerConnection) -> None:
        peer = self._current(conn)
        if peer is None:
            return
        conn._done = True
        conn.close_reason = REASON_LOST
        before = self._view(peer.id)
        peer.conn = None
        peer.status = LOST
        peer.last_seen = peer.bound_at = self._clock.seconds()
        self.counters["lost"] += 1
        self._publish(peer)
        self._announce(peer.id, before, REASON_LOST)
        if not self._closed:
            peer.forget_call = self._clock.callLater(self.lost_timeout, self._forget, peer)
            self._evict_lost(peer)
        self._flush()

    def _evict_lost(self, peer: _Peer) -> None:
        """Keep at most ``limits.lost`` LOST client peers of this peer's user: forget the oldest."""
        if peer.limits is None or not isinstance(peer.auth, ClientAuth):
            return
        lost = [
            p
            for p in (self._peers[i] for i in self._by_user.get(peer.auth.user_id, ()))
            if p.status == LOST
        ]
        excess = len(lost) - peer.limits.lost
        if excess <= 0:
            return
        lost.sort(key=lambda p: p.last_seen)
        for old in lost[:excess]:
            self.counters["lost_evicted"] += 1
            self._remove_peer(old, REASON_LOST_LIMIT)

    def _disconnect(self, conn: PeerConnection) -> None:
        peer = self._current(conn)
        if peer is None:
            return
        self._remove_peer(peer, REASON_GRACEFUL)
        self._flush()

    def _forget(self, peer: _Peer) -> None:
        peer.forget_call = None
        if self._peers.get(peer.id) is not peer or peer.status != LOST:
            return
        self.counters["forgotten"] += 1
        self._remove_peer(peer, REASON_LOST_TIMEOUT)
        self._flush()

    def _remove_peer(self, peer: _Peer, reason: str) -> None:
        """Drop its outgoing tunnels, node and record; close its connection; tell its tunnel
        peers (DISCONNECTED, or how another replica's binding of it looks now)."""
        before, told = self._view(peer.id), list(self._tunnel_peers(peer.id))
        for dst_id in list(self._by_src.get(peer.id, ())):
            self._drop_tunnel(peer.id, dst_id)
        if peer.node is not None and self._by_key.get(peer.node.key) == peer.id:
            del self._by_key[peer.node.key]
        self._cancel_forget(peer)
        del self._peers[peer.id]
        if isinstance(peer.auth, ClientAuth):
            mine = self._by_user.get(peer.auth.user_id)
            if mine is not None:
                mine.pop(peer.id, None)
                if not mine:
                    del self._by_user[peer.auth.user_id]
        if peer.conn is not None:
            self._retire(peer.conn, reason)
            peer.conn = None
        if self.replication is not None:
            self.replication.peer_unbound(peer.id)
        self._announce(peer.id, before, reason, recipients=told)

    def _drop_tunnel(self, src_id: UUID, dst_id: UUID) -> None:
        dsts = self._by_src.get(src_id)
        if dsts is not None:
            if dst_id in dsts and self.replication is not None:
                self.replication.tunnel_removed(src_id, dst_id)
            dsts.pop(dst_id, None)
            if not dsts:
                del self._by_src[src_id]
        srcs = self._by_dst.get(dst_id)
        if srcs is not None:
            srcs.pop(src_id, None)
            if not srcs:
                del self._by_dst[dst_id]

    def _cancel_forget(self, peer: _Peer) -> None:
        if peer.forget_call is not None:
            if peer.forget_call.active():
                peer.forget_call.cancel()
            peer.forget_call = None

    # --- output ---------------------------------------------------------------------------------

    def _tunnel_peers(self, peer_id: UUID) -> dict[UUID, None]:
        peers = dict(self._by_src.get(peer_id, {}))
        peers.update(self._by_dst.get(peer_id, {}))
        if self._remote or self._rsrc:
            peers.update(self._rsrc.get(peer_id, {}))
            peers.update(self._rdst.get(peer_id, {}))
        return peers

    def _node_updates(self, peer_id: UUID, reason: str) -> list[PeerUpdate]:
        """What a tunnel peer must learn about ``peer_id``: its node, and LOST if it is lost."""
        view = self._view(peer_id)
        if view is None or view.node is None:
            return []
        updates = [PeerUpdate(peer_id, NODE, reason, view.node)]
        if view.lost:
            updates.append(PeerUpdate(peer_id, LOST_KIND, REASON_LOST, view.node))
        return updates

    def _view(self, peer_id: UUID) -> _View | None:
        """How ``peer_id`` looks to its tunnel peers here: its binding here, or another
        replica's best binding when that ranks higher (connected, with a node, newer)."""
        peer = self._peers.get(peer_id)
        remote = self._remote.get(peer_id)
        if remote is not None and (peer is None or remote.rank() > peer.binding().rank()):
            return _View(remote.auth, remote.node, remote.lost, True)
        if peer is None:
            return None
        return _View(peer.auth, peer.node, peer.status == LOST, False)

    def _announce(self, peer_id: UUID, before: _View | None, reason: str, *,
                  always: bool = False, recipients: Iterable[UUID] | None = None) -> int:
        """Tell the connected tunnel peers of ``peer_id`` how it looks now, if that changed
        from ``before`` (or ``always``): NODE, LOST with its last node, or DISCONNECTED when
        it is gone everywhere. How many were told."""
        after = self._view(peer_id)
        if not always and after == before:
            return 0
        if after is None:
            update = PeerUpdate(peer_id, DISCONNECTED, reason)
        elif after.node is None and not after.lost:
            return 0
        elif after.lost:
            update = PeerUpdate(peer_id, LOST_KIND, REASON_LOST, after.node)
        else:
            if reason == REASON_LOST or (after.remote and reason == REASON_RESUME):
                reason = REASON_NODE_UPDATE  # a binding elsewhere took over
            update = PeerUpdate(peer_id, NODE, reason, after.node)
        response = CoordinateResponse((update,))
        told = 0
        for other_id in (self._tunnel_peers(peer_id) if recipients is None else recipients):
            other = self._peers.get(other_id)
            if other is not None and other.conn is not None:
                self._emit(other, response)
                told += 1
        return told

    def _publish(self, peer: _Peer) -> None:
        if self.replication is not None:
            self.replication.peer_bound(peer.binding())

    def _emit(self, peer: _Peer, response: CoordinateResponse) -> None:
        if peer.conn is not None:
            self._outbox.append((peer.conn, response))

    def _retire(self, conn: PeerConnection, reason: str) -> None:
        """This connection is no longer current: mark it and schedule its close()."""
        conn._done = True
        conn.close_reason = reason
        self._outbox.append((conn, None))

    def _flush(self) -> None:
        # Deliver after the state change is complete; a callback that re-enters the coordinator
        # queues more output, which this same loop delivers in order.
        if self._flushing:
            return
        self._flushing = True
        try:
            while self._outbox:
                conn, response = self._outbox.popleft()
                try:
                    if response is None:
                        conn._close()
                    else:
                        for part in split_response(response, self.max_message_bytes):
                            conn._send(part)
                            self.counters["peer_updates_sent"] += len(part.peer_updates)
                except Exception:
                    self._log.failure(
                        "coordinator: delivering to {peer_id} failed", peer_id=conn.peer_id
                    )
        finally:
            self._flushing = False


_kind = kind_of
