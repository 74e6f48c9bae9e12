"""The coordinator shared by every replica, over PostgreSQL.

Each replica keeps its own in-memory :class:`~coderstack.coordinator.core.Coordinator` for the
peers connected to it, and this module shares that state with the others:

- **out**: the coordinator reports its own changes (:class:`Replication`). They are coalesced
  per peer and per tunnel and written in one transaction, which also NOTIFYs every change.
  A failed write is merged back under newer changes and retried with backoff, so a database
  restart loses nothing.
- **in**: a :class:`~coderstack.server.pubsub.Listener` receives the notifications. The rows
  they name are read back (many notifications, one query) and handed to the
  :class:`~coderstack.coordinator.mirror.Mirror`, which updates the coordinator's view of the
  other replicas. After the notification connection drops, everything is read again (a full
  resync) and this replica's own rows are written again.

Tables (``schema.py``, migration 6)::

    tailnet_peers   (id, replica_id) -> kind, agent_id, user_id, node (JSON), lost, updated_at
    tailnet_tunnels (replica_id, src_id, dst_id) -> updated_at

Channels and payloads (ids are UUID text; the first is the writing replica, so a replica skips
its own)::

    coderstack_tailnet_peer    "<replica>,<peer>"            a binding changed
    coderstack_tailnet_tunnel  "<replica>,<src>,<dst>"        a tunnel was added or removed
    coderstack_tailnet_ready   "<replica>,<agent>,<client>"   an agent acknowledged a client

READY_FOR_HANDSHAKE has no table: it is a moment, not state.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from coderstack.backoff import Backoff
from coderstack.coordinator.auth import AgentAuth, Auth, ClientAuth, ServerAuth, kind_of
from coderstack.coordinator.core import Coordinator
from coderstack.coordinator.mirror import Mirror, PeerRow, TunnelRow
from coderstack.coordinator.replication import Binding
from coderstack.server.database import Database
from coderstack.server.pubsub import Listener, notify_many
from coderstack.server.replicas import Replica
from coderstack.server.schema import replicas, tailnet_peers, tailnet_tunnels
from coderstack.wire.coordination import CoordinationError, Node

log = Logger()

PEER_CHANNEL = "coderstack_tailnet_peer"
TUNNEL_CHANNEL = "coderstack_tailnet_tunnel"
READY_CHANNEL = "coderstack_tailnet_ready"
CHANNELS = (PEER_CHANNEL, TUNNEL_CHANNEL, READY_CHANNEL)

#: Ids per ``IN (...)`` when reading rows back.
_CHUNK = 500

#: How often a replica deletes the rows of replicas gone longer than the LOST timeout.
CLEANUP_EVERY = 60.0

#: Why a replica that lost its database closes its coordinations (their close reason).
REASON_UNHEALTHY = "replica unhealthy"


def _upsert_peer() -> Any:
    stmt = pg_insert(tailnet_peers)
    return stmt.on_conflict_do_update(
        index_elements=["id", "replica_id"],
        set_={c.name: stmt.excluded[c.name] for c in tailnet_peers.c if c.name not in ("id", "replica_id")})


#: One peer row written (inserted, or replacing this replica's row of it); run with many rows.
_UPSERT_PEER = _upsert_peer()


def binding_row(replica_id: UUID, b: Binding) -> dict[str, Any]:
    auth = b.auth
    return {
        "id": str(b.peer_id),
        "replica_id": str(replica_id),
        "kind": kind_of(auth),
        "agent_id": None if isinstance(auth, ServerAuth) else str(auth.agent_id),
        "user_id": str(auth.user_id) if isinstance(auth, ClientAuth) else None,
        "node": None if b.node is None else json.dumps(b.node.to_json(), separators=(",", ":")),
        "lost": b.lost,
        "updated_at": b.updated_at,
    }


def binding_from_row(row: Any) -> tuple[UUID, Binding]:
    """(replica, binding) of one ``tailnet_peers`` row; ValueError for a row that is not one."""
    peer_id = UUID(row.id)
    auth: Auth
    if row.kind == "agent":
        auth = AgentAuth(UUID(row.agent_id))
    elif row.kind == "client":
        auth = ClientAuth(UUID(row.agent_id), UUID(row.user_id))
    elif row.kind == "server":
        auth = ServerAuth()
    else:
        raise ValueError(f"unknown peer kind {row.kind!r}")
    try:
        node = None if row.node is None else Node.from_json(json.loads(row.node))
    except (CoordinationError, json.JSONDecodeError) as e:
        raise ValueError(f"bad node: {e}") from None
    return UUID(row.replica_id), Binding(peer_id, auth, node, bool(row.lost), float(row.updated_at))


class PGCoordination:
    """Shares ``coordinator``'s peers and tunnels with the other replicas on ``db``."""

    def __init__(self, reactor: Any, db: Database, coordinator: Coordinator, replica_id: UUID,
                 listener: Listener) -> None:
        """``listener``: the replica's LISTEN connection (its owner starts and stops it)."""
        self.reactor = reactor
        self.db = db
        self.coordinator = coordinator
        self.replica_id = replica_id
        self._me = str(replica_id)
        self.mirror = Mirror(coordinator, replica_id)
        listener.subscribe(CHANNELS, self)
        coordinator.replication = self
        # Out: the latest state per peer (None: unbound) and per tunnel, and READYs in order.
        self._peers_out: dict[UUID, Binding | None] = {}
        self._tunnels_out: dict[tuple[UUID, UUID], bool] = {}
        self._ready_out: list[tuple[UUID, UUID]] = []
        self._writing = False
        self._write_backoff = Backoff(first=0.2, cap=5.0)
        # In: what notifications named since the last read, or everything.
        self._peers_in: set[UUID] = set()
        self._tunnels_in: set[tuple[UUID, UUID]] = set()
        self._resync = False
        self._reading = False
        self._read_backoff = Backoff(first=0.2, cap=5.0)
        self._timers: dict[str, Any] = {}
        self._stopped = False
        self.listening_now = False
        self.counters = {"writes": 0, "write_failures": 0, "notifications": 0, "reads": 0,
                         "read_failures": 0, "resyncs": 0, "bad_rows": 0}

    def start(self) -> None:
        self._later("cleanup", CLEANUP_EVERY, self._cleanup)

    def metrics_lines(self) -> list[str]:
        """Prometheus lines: database work, notifications, resyncs and bad rows, whether the
        notifications reach us, and how many peers we know only from other replicas."""
        c = self.counters
        return [
            "# HELP coderstack_pgcoord_transactions_total Coordinator transactions on the database, "
            "by kind and outcome.",
            "# TYPE coderstack_pgcoord_transactions_total counter",
            f'coderstack_pgcoord_transactions_total{{kind="write",outcome="ok"}} {c["writes"]}',
            f'coderstack_pgcoord_transactions_total{{kind="write",outcome="failed"}} {c["write_failures"]}',
            f'coderstack_pgcoord_transactions_total{{kind="read",outcome="ok"}} {c["reads"]}',
            f'coderstack_pgcoord_transactions_total{{kind="read",outcome="failed"}} {c["read_failures"]}',
            "# HELP coderstack_pgcoord_notifications_total Peer, tunnel and handshake notifications "
            "received from other replicas.",
            "# TYPE coderstack_pgcoord_notifications_total counter",
            f"coderstack_pgcoord_notifications_total {c['notifications']}",
            "# HELP coderstack_pgcoord_resyncs_total Full re-reads after the notification "
            "connection came (back) up.",
            "# TYPE coderstack_pgcoord_resyncs_total counter",
            f"coderstack_pgcoord_resyncs_total {c['resyncs']}",
            "# HELP coderstack_pgcoord_bad_rows_total Rows and notifications that did not parse "
            "(dropped).",
            "# TYPE coderstack_pgcoord_bad_rows_total counter",
            f"coderstack_pgcoord_bad_rows_total {c['bad_rows']}",
            "# HELP coderstack_pgcoord_listening 1 while other replicas' notifications reach this one.",
            "# TYPE coderstack_pgcoord_listening gauge",
            f"coderstack_pgcoord_listening {int(self.listening_now)}",
            "# HELP coderstack_coordinator_remote_peers Peers known only from other replicas.",
            "# TYPE coderstack_coordinator_remote_peers gauge",
            f"coderstack_coordinator_remote_peers {self.coordinator.remote_count()}",
        ]

    # --- the replica set (ReplicaSetHandler) ------------------------------------------------

    def replicas_changed(self, alive: Sequence[Replica]) -> None:
        """The live replicas: the others' peers on a replica that stopped are shown LOST."""
        self.mirror.replicas_alive(r.id for r in alive)

    def health_changed(self, healthy: bool, error: str | None) -> None:
        if not healthy:
            # Our rows are going stale and the load balancer is taking us out: send our peers
            # to another replica rather than let them think they are coordinated.
            log.warn("coordinator: this replica lost its database; closing its coordinations")
            self.coordinator.drop_connections(REASON_UNHEALTHY)

    def _cleanup(self) -> None:
        """Delete the rows of replicas whose last heartbeat is older than the LOST timeout
        (and tell the others), so their peers end as DISCONNECTED "lost timeout"."""
        lost_timeout = self.coordinator.lost_timeout

        def work(conn: sa.Connection) -> None:
            cutoff = conn.execute(sa.select(sa.func.now())).scalar_one() - timedelta(seconds=lost_timeout)
            live = sa.select(replicas.c.id).where(replicas.c.heartbeat_at > cutoff)
            gone = conn.execute(tailnet_peers.delete().where(tailnet_peers.c.replica_id.not_in(live))
                                .returning(tailnet_peers.c.replica_id, tailnet_peers.c.id)).all()
            notify_many(conn, PEER_CHANNEL, [f"{replica_id},{peer_id}" for replica_id, peer_id in gone])
            t = tailnet_tunnels.c
            gone_tunnels = conn.execute(tailnet_tunnels.delete().where(t.replica_id.not_in(live))
                                        .returning(t.replica_id, t.src_id, t.dst_id)).all()
            notify_many(conn, TUNNEL_CHANNEL, [f"{r},{src},{dst}" for r, src, dst in gone_tunnels])

        def again(result: object) -> None:
            if not self._stopped:
                self._later("cleanup", CLEANUP_EVERY, self._cleanup)

        d = self.db.transact(work)
        d.addErrback(lambda f: log.warn("coordinator: cleaning up gone replicas' peers failed: {why}",
                                        why=f.getErrorMessage().splitlines()[0]))
        d.addBoth(again)

    def stop(self) -> None:
        self._stopped = True
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()
        if self.coordinator.replication is self:
            self.coordinator.replication = None

    # --- out: Replication -------------------------------------------------------------------

    def peer_bound(self, binding: Binding) -> None:
        self._peers_out[binding.peer_id] = binding
        self._soon("write", self._write)

    def peer_unbound(self, peer_id: UUID) -> None:
        self._peers_out[peer_id] = None
        self._soon("write", self._write)

    def tunnel_added(self, src: UUID, dst: UUID) -> None:
        self._tunnels_out[src, dst] = True
        self._soon("write", self._write)

    def tunnel_removed(self, src: UUID, dst: UUID) -> None:
        self._tunnels_out[src, dst] = False
        self._soon("write", self._write)

    def ready_for_handshake(self, agent_id: UUID, client_id: UUID) -> None:
        self._ready_out.append((agent_id, client_id))
        self._soon("write", self._write)

    def _write(self) -> None:
        if self._writing or self._stopped or not (self._peers_out or self._tunnels_out or self._ready_out):
            return
        peers, tunnels, ready = self._peers_out, self._tunnels_out, self._ready_out
        self._peers_out, self._tunnels_out, self._ready_out = {}, {}, []
        self._writing = True
        d = self.db.transact(self._write_rows, peers, tunnels, ready)

        def done(_: object) -> None:
            self._writing = False
            self.counters["writes"] += 1
            self._write_backoff.reset()
            self._soon("write", self._write)

        def failed(f: Any) -> None:
            self._writing = False
            self.counters["write_failures"] += 1
            # What changed meanwhile is newer than what failed: keep it.
            for pid, b in peers.items():
                self._peers_out.setdefault(pid, b)
            for pair, present in tunnels.items():
                self._tunnels_out.setdefault(pair, present)
            self._ready_out[:0] = ready
            delay = self._write_backoff.next_delay()
            log.warn("coordinator: writing peers to the database failed ({why}); again in {delay:.1f} s",
                     why=f.getErrorMessage().splitlines()[0], delay=delay)
            self._later("write", delay, self._write)

        d.addCallbacks(done, failed)

    def _write_rows(self, conn: sa.Connection, peers: dict[UUID, Binding | None],
                    tunnels: dict[tuple[UUID, UUID], bool], ready: list[tuple[UUID, UUID]]) -> None:
        # A statement per kind of change, not per change: a turn's changes cost a few round trips.
        me = self._me
        gone = [str(pid) for pid, b in peers.items() if b is None]
        bound = [binding_row(self.replica_id, b) for b in peers.values() if b is not None]
        p = tailnet_peers.c
        for i in range(0, len(gone), _CHUNK):
            conn.execute(tailnet_peers.delete().where(p.replica_id == me, p.id.in_(gone[i:i + _CHUNK])))
        if bound:
            conn.execute(_UPSERT_PEER, bound)
        added = [{"replica_id": me, "src_id": str(src), "dst_id": str(dst), "updated_at": self.reactor.seconds()}
                 for (src, dst), present in tunnels.items() if present]
        removed = [(str(src), str(dst)) for (src, dst), present in tunnels.items() if not present]
        if added:
            conn.execute(pg_insert(tailnet_tunnels).on_conflict_do_nothing(), added)
        t = tailnet_tunnels.c
        for i in range(0, len(removed), _CHUNK):
            conn.execute(tailnet_tunnels.delete().where(
                t.replica_id == me, sa.tuple_(t.src_id, t.dst_id).in_(removed[i:i + _CHUNK])))
        notify_many(conn, PEER_CHANNEL, [f"{me},{pid}" for pid in peers])
        notify_many(conn, TUNNEL_CHANNEL, [f"{me},{src},{dst}" for src, dst in tunnels])
        notify_many(conn, READY_CHANNEL, [f"{me},{agent_id},{client_id}" for agent_id, client_id in ready])

    # --- in: Subscriber ---------------------------------------------------------------------

    def listening(self) -> None:
        if self._stopped:
            return
        self.listening_now = True
        # Anything may have changed while nobody listened: read it all, and write ours again
        # (a replica that was gone long enough may have had its rows cleaned up).
        self._resync = True
        for b in self.coordinator.local_bindings():
            self._peers_out.setdefault(b.peer_id, b)
        for src, dst in self.coordinator.local_tunnels():
            self._tunnels_out.setdefault((src, dst), True)
        self._soon("write", self._write)
        self._soon("read", self._read)

    def unlistened(self, error: str) -> None:
        if self.listening_now:
            log.warn("coordinator: lost the database's notifications ({error}); reconnecting", error=error)
        self.listening_now = False

    def notified(self, channel: str, payload: str) -> None:
        if self._stopped:
            return
        self.counters["notifications"] += 1
        parts = payload.split(",")
        try:
            if parts[0] == self._me:
                return
            ids = [UUID(p) for p in parts[1:]]
        except ValueError:
            self.counters["bad_rows"] += 1
            return
        if channel == PEER_CHANNEL and len(ids) == 1:
            self._peers_in.add(ids[0])
        elif channel == TUNNEL_CHANNEL and len(ids) == 2:
            self._tunnels_in.add((ids[0], ids[1]))
        elif channel == READY_CHANNEL and len(ids) == 2:
            self.coordinator.remote_ready(ids[0], ids[1])
            return
        else:
            self.counters["bad_rows"] += 1
            return
        self._soon("read", self._read)

    def _read(self) -> None:
        if self._reading or self._stopped or not (self._resync or self._peers_in or self._tunnels_in):
            return
        self._reading = True
        resync, peers, tunnels = self._resync, self._peers_in, self._tunnels_in
        self._resync, self._peers_in, self._tunnels_in = False, set(), set()
        d: Deferred[Any]
        if resync:
            d = self.db.transact(self._read_all)
        else:
            d = self.db.transact(self._read_some, peers, tunnels)

        def done(got: Any) -> None:
            self._reading = False
            self._read_backoff.reset()
            self.counters["reads"] += 1
            if resync:
                self.counters["resyncs"] += 1
                self.mirror.resync(*got)
            else:
                peer_rows, tunnel_rows = got
                for pid in peers:
                    self.mirror.peer_rows(pid, peer_rows.get(pid, ()))
                for pair in tunnels:
                    self.mirror.tunnel_rows(*pair, tunnel_rows.get(pair, ()))
            self._soon("read", self._read)

        def failed(f: Any) -> None:
            self._reading = False
            self.counters["read_failures"] += 1
            self._resync = self._resync or resync
            self._peers_in |= peers
            self._tunnels_in |= tunnels
            delay = self._read_backoff.next_delay()
            log.warn("coordinator: reading peers from the database failed ({why}); again in {delay:.1f} s",
                     why=f.getErrorMessage().splitlines()[0], delay=delay)
            self._later("read", delay, self._read)

        d.addCallbacks(done, failed)

    def _bindings(self, rows: Iterable[Any]) -> list[PeerRow]:
        out = []
        for row in rows:
            try:
                out.append(binding_from_row(row))
            except ValueError as e:
                self.counters["bad_rows"] += 1
                log.warn("coordinator: skipping a bad peer row {id}: {why}", id=row.id, why=str(e))
        return out

    def _read_all(self, conn: sa.Connection) -> tuple[list[PeerRow], list[TunnelRow]]:
        peers = self._bindings(conn.execute(sa.select(tailnet_peers)))
        tunnels = [(UUID(r.replica_id), UUID(r.src_id), UUID(r.dst_id))
                   for r in conn.execute(sa.select(tailnet_tunnels))]
        return peers, tunnels

    def _read_some(self, conn: sa.Connection, peers: set[UUID], tunnels: set[tuple[UUID, UUID]]
                   ) -> tuple[dict[UUID, list[PeerRow]], dict[tuple[UUID, UUID], list[UUID]]]:
        by_peer: dict[UUID, list[PeerRow]] = {}
        ids = [str(p) for p in peers]
        for i in range(0, len(ids), _CHUNK):
            rows = conn.execute(sa.select(tailnet_peers).where(tailnet_peers.c.id.in_(ids[i:i + _CHUNK])))
            for replica, b in self._bindings(rows):
                by_peer.setdefault(b.peer_id, []).append((replica, b))
        by_tunnel: dict[tuple[UUID, UUID], list[UUID]] = {}
        pairs = [(str(s), str(d)) for s, d in tunnels]
        for i in range(0, len(pairs), _CHUNK):
            t = tailnet_tunnels.c
            rows = conn.execute(sa.select(t.replica_id, t.src_id, t.dst_id).where(
                sa.tuple_(t.src_id, t.dst_id).in_(pairs[i:i + _CHUNK])))
            for r in rows:
                by_tunnel.setdefault((UUID(r.src_id), UUID(r.dst_id)), []).append(UUID(r.replica_id))
        return by_peer, by_tunnel

    # --- timers -----------------------------------------------------------------------------

    def _soon(self, name: str, fn: Any) -> None:
        """Run ``fn`` on the next reactor turn (so one turn's changes go in one transaction),
        unless it is already due."""
        if name not in self._timers or not self._timers[name].active():
            self._later(name, 0, fn)

    def _later(self, name: str, delay: float, fn: Any) -> None:
        old = self._timers.get(name)
        if old is not None and old.active():
            old.cancel()
        self._timers[name] = self.reactor.callLater(delay, fn)
