"""The replica registry: every server process sharing one database has a row in ``replicas``,
kept fresh by a heartbeat, and learns from the same table which other replicas are alive.

A replica is alive while it has not stopped and its last heartbeat is newer than
``interval * missed`` seconds. After each heartbeat :class:`ReplicaSync` reads the alive set and
tells its handlers when it changed (the DERP mesh follows it, so does the coordinator). A
heartbeat that fails, or takes longer than that expiry, makes this replica unhealthy until one
works again; a row another replica removed is written again. Rows whose heartbeat stopped an hour
ago are deleted.

Which clock: on PostgreSQL every timestamp is the database's ``now()``, so replicas on machines
whose clocks disagree still judge each other's heartbeats by one clock. SQLite has no server of
its own: its file is local to every process that opens it, so this process's clock (the injected
one) is the database machine's clock there.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from coderstack.server.records import aware
from coderstack.server.schema import replicas as replicas_table
from coderstack.twistedtypes import Clock, DelayedCall, cancel, reactor_time

log = Logger()
T = TypeVar("T")

#: Rows whose heartbeat is older than this are deleted (a replica gone for good).
FORGET_AFTER = 3600.0
#: How often a replica looks for such rows.
FORGET_EVERY = 600.0


class Transacting(Protocol):
    """What the registry needs of the store: ``fn(connection, *args)`` in one transaction."""

    def transact(self, fn: Callable[..., T], *args: Any) -> Deferred[T]: ...


@dataclass(frozen=True)
class Replica:
    """One replica's row."""

    id: uuid.UUID
    hostname: str
    region_id: int
    relay_url: str
    version: str
    error: str
    database_latency_ms: float
    started_at: datetime
    heartbeat_at: datetime

    @property
    def healthy(self) -> bool:
        return not self.error

    def to_json(self) -> dict[str, Any]:
        """Coder's ``codersdk.Replica`` (its ``database_latency`` is whole microseconds), and
        ours: ``database_latency_ms``, ``healthy``, ``version``, ``heartbeat_at``."""
        return {
            "id": str(self.id),
            "hostname": self.hostname,
            "created_at": self.started_at.isoformat(),
            "relay_address": self.relay_url,
            "region_id": self.region_id,
            "error": self.error,
            "database_latency": int(self.database_latency_ms * 1000),
            "database_latency_ms": round(self.database_latency_ms, 3),
            "healthy": self.healthy,
            "version": self.version,
            "heartbeat_at": self.heartbeat_at.isoformat(),
        }


class ReplicaSetHandler(Protocol):
    """Told by :class:`ReplicaSync` what changed."""

    def replicas_changed(self, replicas: Sequence[Replica]) -> None:
        """The alive replicas, this one included, whenever that set (or an address) changed."""

    def health_changed(self, healthy: bool, error: str | None) -> None:
        """This replica lost (``error`` says why) or regained its database heartbeat."""


def _replica(row: Any) -> Replica:
    return Replica(uuid.UUID(row.id), row.hostname, row.region_id, row.relay_url, row.version,
                   row.error, row.database_latency_ms, aware(row.started_at), aware(row.heartbeat_at))


def _now(conn: sa.Connection, wall: float) -> Any:
    """The time to write: the database's on PostgreSQL, else the caller's (see the docstring)."""
    if conn.dialect.name == "postgresql":
        return sa.func.now()
    return datetime.fromtimestamp(wall, UTC)


def _before(conn: sa.Connection, wall: float, seconds: float) -> Any:
    """``seconds`` before now, by the same clock as :func:`_now`."""
    if conn.dialect.name == "postgresql":
        return sa.func.now() - sa.literal(timedelta(seconds=seconds), sa.Interval())
    return datetime.fromtimestamp(wall - seconds, UTC)


def _alive(conn: sa.Connection, wall: float, expiry: float) -> list[Replica]:
    t = replicas_table
    rows = conn.execute(sa.select(t).where(t.c.stopped_at.is_(None),
                                           t.c.heartbeat_at > _before(conn, wall, expiry))
                        .order_by(t.c.started_at, t.c.id))
    return [_replica(r) for r in rows]


def alive_replicas(db: Transacting, clock: Clock, expiry: float) -> Deferred[list[Replica]]:
    """The replicas whose heartbeat is newer than ``expiry`` seconds and that have not stopped."""
    return db.transact(_alive, clock.seconds(), expiry)


def _short(err: BaseException) -> str:
    """One line about a database failure (driver messages run to several)."""
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text}"[:300]


class ReplicaSync:
    """This replica's row and heartbeat, and the alive set it reads back.

    ``start()`` writes the row and starts the heartbeat every ``interval`` seconds; ``stop()``
    marks the row stopped, so the others drop this replica at their next heartbeat instead of
    after the expiry."""

    def __init__(self, reactor: Clock, store_or_db: Transacting, *, replica_id: uuid.UUID,
                 hostname: str, region_id: int, relay_url: str, version: str,
                 interval: float = 2.0, missed: int = 3) -> None:
        self.clock = reactor
        self.db = store_or_db
        self.replica_id = replica_id
        self.hostname = hostname
        self.region_id = region_id
        self.relay_url = relay_url
        self.version = version
        self.interval = interval
        self.expiry = interval * missed
        self.database_latency_ms = 0.0
        self._handlers: list[ReplicaSetHandler] = []
        self._replicas: tuple[Replica, ...] = ()
        self._seen: tuple[tuple[uuid.UUID, str, int], ...] | None = None
        self._healthy = True
        self._error: str | None = None
        self._timer: DelayedCall | None = None
        self._running = False
        self._stopped = False
        self._last_forget: float | None = None

    # -- what other parts read -------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def error(self) -> str | None:
        """Why this replica is unhealthy, or None."""
        return self._error

    def alive_ids(self) -> frozenset[uuid.UUID]:
        """The replicas alive at the last heartbeat that worked (this one included)."""
        return frozenset(r.id for r in self._replicas)

    def replicas(self) -> tuple[Replica, ...]:
        """The alive replicas as last read."""
        return self._replicas

    def fetch_alive(self) -> Deferred[list[Replica]]:
        """The alive replicas, read now."""
        return alive_replicas(self.db, self.clock, self.expiry)

    def add_handler(self, handler: ReplicaSetHandler) -> None:
        """Also tell ``handler``; it hears the current set at once if there is one."""
        self._handlers.append(handler)
        if self._seen is not None:
            self._call(handler.replicas_changed, self._replicas)

    # -- lifecycle -------------------------------------------------------------------------

    async def _start(self) -> None:
        started = self.clock.seconds()
        latency, alive = await self.db.transact(self._heartbeat_work, started, False, "", True)
        self.database_latency_ms = latency
        if self._stopped:  # stop() came while the row was being written
            await self.db.transact(self._mark_stopped, self.clock.seconds())
            return
        self._running = True
        self._took(started, alive)
        self._schedule(started)

    def start(self) -> Deferred[None]:
        """Write this replica's row, read the alive set, and start the heartbeat."""
        return Deferred.fromCoroutine(self._start())

    async def _stop(self) -> None:
        self._stopped = True
        if not self._running:
            return
        self._running = False
        cancel(self._timer)
        self._timer = None
        try:
            # A heartbeat still in flight cannot undo this: it never clears stopped_at.
            marked = self.db.transact(self._mark_stopped, self.clock.seconds())
            await marked.addTimeout(self.expiry, reactor_time(self.clock))
        except Exception as err:
            log.warn("replica {id}: could not mark itself stopped ({why}); the others will see "
                     "it expire", id=self.replica_id, why=_short(err))

    def stop(self) -> Deferred[None]:
        """Stop the heartbeat and mark the row stopped (a failure to is logged, not raised)."""
        return Deferred.fromCoroutine(self._stop())

    # -- the heartbeat ---------------------------------------------------------------------

    def _schedule(self, started: float) -> None:
        if self._running:
            delay = max(0.0, started + self.interval - self.clock.seconds())
            self._timer = self.clock.callLater(delay, self._beat)

    def _beat(self) -> None:
        self._timer = None
        Deferred.fromCoroutine(self._heartbeat())

    async def _heartbeat(self) -> None:
        started = self.clock.seconds()
        # A heartbeat that does not answer within the expiry: the others already count this
        # replica as gone, so it is unhealthy now, not when (if ever) the database answers.
        slow = self.clock.callLater(self.expiry, self._set_health, False,
                                    f"the database has not answered a heartbeat in {self.expiry:g}s")
        try:
            forget = self._last_forget is None or started - self._last_forget >= FORGET_EVERY
            latency, alive = await self.db.transact(self._heartbeat_work, started, forget,
                                                    self._error or "")
            self.database_latency_ms = latency
            if forget:
                self._last_forget = started
        except Exception as err:
            self._set_health(False, f"database heartbeat failed: {_short(err)}")
        else:
            self._took(started, alive)
        finally:
            cancel(slow)
        self._schedule(started)

    def _took(self, started: float, alive: list[Replica]) -> None:
        took = self.clock.seconds() - started
        if took > self.expiry:
            self._set_health(False, f"a database heartbeat took {took:.1f}s, longer than the "
                                    f"{self.expiry:g}s after which replicas count as gone")
        else:
            self._set_health(True, None)
        self._replicas = tuple(alive)
        seen = tuple((r.id, r.relay_url, r.region_id) for r in alive)
        if seen != self._seen:
            self._seen = seen
            for handler in list(self._handlers):
                self._call(handler.replicas_changed, self._replicas)

    def _set_health(self, healthy: bool, error: str | None) -> None:
        self._error = error
        if healthy == self._healthy:
            return
        self._healthy = healthy
        if healthy:
            log.info("replica {id}: database heartbeats work again", id=self.replica_id)
        else:
            log.error("replica {id} is unhealthy: {why}", id=self.replica_id, why=error)
        for handler in list(self._handlers):
            self._call(handler.health_changed, healthy, error)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.failure("replica set handler {fn!r}", fn=fn)

    # -- the queries (on the database threads) ---------------------------------------------

    def _write_row(self, conn: sa.Connection, wall: float, new: bool, error: str,
                   latency_ms: float) -> None:
        t = replicas_table
        now = _now(conn, wall)
        values = dict(hostname=self.hostname, region_id=self.region_id, relay_url=self.relay_url,
                      version=self.version, error=error, database_latency_ms=latency_ms,
                      heartbeat_at=now)
        if not new:
            updated = conn.execute(t.update().where(t.c.id == str(self.replica_id)).values(**values))
            if updated.rowcount:
                return
            log.warn("replica {id}: its row was gone; writing it again", id=self.replica_id)
        conn.execute(t.insert().values(id=str(self.replica_id), started_at=now, stopped_at=None,
                                       **values))

    def _heartbeat_work(self, conn: sa.Connection, wall: float, forget: bool, error: str,
                        new: bool = False) -> tuple[float, list[Replica]]:
        # A measurement of one real round trip, not a timer: the real monotonic clock.
        before = time.perf_counter()
        conn.exec_driver_sql("SELECT 1")
        latency_ms = (time.perf_counter() - before) * 1000.0
        self._write_row(conn, wall, new, error, latency_ms)
        if forget:
            conn.execute(replicas_table.delete().where(
                replicas_table.c.heartbeat_at < _before(conn, wall, FORGET_AFTER)))
        return latency_ms, _alive(conn, wall, self.expiry)

    def _mark_stopped(self, conn: sa.Connection, wall: float) -> None:
        t = replicas_table
        conn.execute(t.update().where(t.c.id == str(self.replica_id))
                     .values(stopped_at=_now(conn, wall)))
