"""One replica only on SQLite: a second server process on the same database is refused.

SQLite is a file on one machine; several replicas need a database they can all share,
PostgreSQL. At start-up on SQLite, a row of another replica whose heartbeat is still moving means
another process is serving from this database, and this one refuses to start. A row left by a
process that died without stopping looks alive until it expires, so a row is trusted only once
its heartbeat moves on (at most one expiry of waiting, after a crash).
"""

from __future__ import annotations

import uuid

from coderstack.server.replicas import Replica, Transacting, alive_replicas
from coderstack.twistedtypes import Clock, sleep


class AnotherReplica(RuntimeError):
    """Another server process is using this SQLite database."""

    def __init__(self, other: Replica) -> None:
        super().__init__(
            f"another coderstack server (replica {other.id} on {other.hostname}) is using this "
            f"SQLite database; several replicas need a shared PostgreSQL database: --postgres-url")
        self.other = other


async def refuse_another_replica(clock: Clock, db: Transacting, me: uuid.UUID, *,
                                 interval: float, expiry: float) -> None:
    """Raise :class:`AnotherReplica` when another replica is heartbeating in ``db``."""
    others = {r.id: r for r in await alive_replicas(db, clock, expiry) if r.id != me}
    waited = 0.0
    while others:
        await sleep(clock, interval)
        waited += interval
        now = {r.id: r for r in await alive_replicas(db, clock, expiry) if r.id != me}
        for rid, row in now.items():
            if rid not in others or row.heartbeat_at > others[rid].heartbeat_at:
                raise AnotherReplica(row)
        if waited >= expiry:
            return
        others = now
