"""The replica registry on SQLite, its timers on ``task.Clock``: heartbeats, expiry after three
missed ones, the handlers, losing and regaining the database, and one replica only on SQLite."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from coderstack.server.database import database_url
from coderstack.server.replicas import Replica, ReplicaSync
from coderstack.server.schema import replicas as replicas_table
from coderstack.server.solereplica import AnotherReplica, refuse_another_replica
from coderstack.server.store import Store
from tests.support.tempdirs import made_dir
from tests.support.waiting import wait_until

START = 1_800_000_000.0  # a realistic wall-clock time for the fake clocks


class FlakyDB:
    """A store that can fail every transaction, or hold them until released."""

    def __init__(self, db: Store) -> None:
        self.db = db
        self.fail = False
        self.hold = False
        self.held: list[defer.Deferred[Any]] = []
        self.done = 0

    def transact(self, fn: Any, *args: Any) -> defer.Deferred[Any]:
        if self.fail:
            return defer.fail(sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused\nmore")))
        d = self.db.transact(fn, *args)
        if self.hold:
            gate: defer.Deferred[Any] = defer.Deferred()
            self.held.append(gate)
            d.addCallback(lambda r: gate.addCallback(lambda _: r))
        d.addBoth(self._count)
        return d

    def _count(self, result: Any) -> Any:
        self.done += 1
        return result


class Recorder:
    def __init__(self) -> None:
        self.sets: list[list[uuid.UUID]] = []
        self.health: list[tuple[bool, str | None]] = []

    def replicas_changed(self, replicas: Any) -> None:
        self.sets.append([r.id for r in replicas])

    def health_changed(self, healthy: bool, error: str | None) -> None:
        self.health.append((healthy, error))


def fake_clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(START)
    return clock


class ReplicaSyncTests(unittest.TestCase):
    def setUp(self) -> None:
        self.store = Store(database_url(made_dir(self), None), reactor)
        self.addCleanup(self.store.stop)
        self.db = FlakyDB(self.store)

    async def replica(self, clock: task.Clock, name: str = "a", start: bool = True,
                      **kw: Any) -> tuple[ReplicaSync, Recorder]:
        await self.store.migrate()
        sync = ReplicaSync(clock, self.db, replica_id=uuid.uuid4(), hostname=f"host-{name}",
                           region_id=999, relay_url=f"http://{name}.internal:3000", version="0.1.0", **kw)
        rec = Recorder()
        sync.add_handler(rec)
        if start:
            await sync.start()
        return sync, rec

    async def beat(self, *clocks: task.Clock, seconds: float = 2.0) -> None:
        """Advance the clocks and wait until every heartbeat they started has answered."""
        before = self.db.done
        started = 0
        for clock in clocks:
            due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds() + seconds]
            started += len(due)
            clock.advance(seconds)
        if started and not self.db.fail:
            await wait_until(lambda: self.db.done >= before + started and not self.db.held,
                             "the heartbeats to answer")

    async def rows(self) -> list[Any]:
        return await self.store.transact(lambda c: list(c.execute(sa.select(replicas_table))))

    async def test_start_writes_the_row_and_heartbeats_move_it(self) -> None:
        clock = fake_clock()
        a, rec = await self.replica(clock)
        self.assertEqual(rec.sets, [[a.replica_id]])
        self.assertEqual(a.alive_ids(), frozenset({a.replica_id}))
        self.assertTrue(a.healthy)
        (row,) = await self.rows()
        self.assertEqual((row.id, row.hostname, row.region_id, row.relay_url, row.version, row.error),
                         (str(a.replica_id), "host-a", 999, "http://a.internal:3000", "0.1.0", ""))
        self.assertEqual(row.started_at.replace(tzinfo=UTC), datetime.fromtimestamp(START, UTC))
        self.assertIsNone(row.stopped_at)
        await self.beat(clock)
        await self.beat(clock)
        (row,) = await self.rows()
        self.assertEqual(row.heartbeat_at.replace(tzinfo=UTC), datetime.fromtimestamp(START + 4, UTC))
        self.assertGreater(row.database_latency_ms, 0)
        self.assertEqual(rec.sets, [[a.replica_id]])  # the set did not change: told once
        got = a.replicas()[0]
        self.assertIsInstance(got, Replica)
        self.assertEqual(got.to_json()["relay_address"], "http://a.internal:3000")

    async def test_a_replica_that_stops_heartbeating_expires_after_three_intervals(self) -> None:
        ca, cb = fake_clock(), fake_clock()
        a, rec = await self.replica(ca, "a")
        b, _ = await self.replica(cb, "b")
        await self.beat(ca, cb)
        self.assertEqual(a.alive_ids(), {a.replica_id, b.replica_id})
        self.assertEqual([set(x) for x in rec.sets], [{a.replica_id}, {a.replica_id, b.replica_id}])
        # b's clock stops: it heartbeats no more (and never says it stopped).
        await self.beat(ca)
        await self.beat(ca)
        self.assertIn(b.replica_id, a.alive_ids())  # two missed: still alive
        await self.beat(ca)
        self.assertEqual(a.alive_ids(), {a.replica_id})  # the third: gone
        self.assertEqual(rec.sets[-1], [a.replica_id])

    async def test_a_graceful_stop_disappears_at_the_next_heartbeat(self) -> None:
        ca, cb = fake_clock(), fake_clock()
        a, rec = await self.replica(ca, "a")
        b, _ = await self.replica(cb, "b")
        await self.beat(ca, cb)
        await b.stop()
        self.assertFalse(cb.getDelayedCalls())  # its loop is over
        await self.beat(ca)
        self.assertEqual(a.alive_ids(), {a.replica_id})
        self.assertEqual([r.id for r in await a.fetch_alive()], [a.replica_id])
        rows = {r.id: r for r in await self.rows()}
        self.assertIsNotNone(rows[str(b.replica_id)].stopped_at)

    async def test_unhealthy_while_the_database_fails_then_healthy_again(self) -> None:
        clock = fake_clock()
        a, rec = await self.replica(clock)
        self.db.fail = True
        await self.beat(clock)
        self.assertFalse(a.healthy)
        self.assertEqual(len(rec.health), 1)
        healthy, error = rec.health[0]
        self.assertFalse(healthy)
        self.assertIn("database heartbeat failed: OperationalError", error)
        self.assertNotIn("\n", error)
        await self.beat(clock)  # it keeps trying; no second report
        self.assertEqual(len(rec.health), 1)
        self.assertEqual(a.alive_ids(), {a.replica_id})  # the last known set stays
        self.db.fail = False
        await self.beat(clock)
        self.assertTrue(a.healthy)
        self.assertIsNone(a.error)
        self.assertEqual(rec.health[-1], (True, None))

    async def test_a_heartbeat_slower_than_the_expiry_is_unhealthy(self) -> None:
        clock = fake_clock()
        a, rec = await self.replica(clock)
        self.db.hold = True
        clock.advance(2)  # the heartbeat starts and does not answer
        await wait_until(lambda: self.db.held, "the held heartbeat")
        clock.advance(5.9)
        self.assertTrue(a.healthy)
        clock.advance(0.2)
        self.assertFalse(a.healthy)
        self.assertIn("has not answered a heartbeat in 6s", a.error)
        self.db.hold = False
        before = self.db.done
        for gate in self.db.held:
            gate.callback(None)
        self.db.held.clear()
        await wait_until(lambda: self.db.done > before, "the slow heartbeat to answer")
        self.assertFalse(a.healthy)
        self.assertIn("took 6.1s", a.error)
        await self.beat(clock)  # the next heartbeat is due at once and answers quickly
        self.assertTrue(a.healthy)
        self.assertEqual([h for h, _ in rec.health], [False, True])
        # The error it had went into its row with that heartbeat, for the others to show.
        (row,) = await self.rows()
        self.assertIn("took 6.1s", row.error)
        await self.beat(clock)
        (row,) = await self.rows()
        self.assertEqual(row.error, "")

    async def test_a_removed_row_is_written_again(self) -> None:
        clock = fake_clock()
        a, _ = await self.replica(clock)
        await self.store.transact(lambda c: c.execute(replicas_table.delete()))
        await self.beat(clock)
        (row,) = await self.rows()
        self.assertEqual(row.id, str(a.replica_id))
        self.assertEqual(a.alive_ids(), {a.replica_id})

    async def test_rows_of_long_gone_replicas_are_deleted(self) -> None:
        clock = fake_clock()
        await self.store.migrate()
        old = datetime.fromtimestamp(START - 2 * 3600, UTC)
        await self.store.transact(lambda c: c.execute(replicas_table.insert().values(
            id=str(uuid.uuid4()), hostname="old", region_id=999, relay_url="", version="0",
            error="", database_latency_ms=0.0, started_at=old, heartbeat_at=old)))
        a, _ = await self.replica(clock)
        self.assertEqual(len(await self.rows()), 2)
        await self.beat(clock)
        self.assertEqual([r.id for r in await self.rows()], [str(a.replica_id)])

    async def test_a_handler_added_later_hears_the_set_and_a_failing_one_stops_nothing(self) -> None:
        clock = fake_clock()
        a, rec = await self.replica(clock)

        class Broken:
            def replicas_changed(self, replicas: Any) -> None:
                raise RuntimeError("boom")

            def health_changed(self, healthy: bool, error: str | None) -> None:
                raise RuntimeError("boom")

        a.add_handler(Broken())
        late = Recorder()
        a.add_handler(late)
        self.assertEqual(late.sets, [[a.replica_id]])
        self.db.fail = True
        await self.beat(clock)
        self.assertEqual(late.health[0][0], False)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    async def test_a_stop_during_start_leaves_the_row_stopped_and_no_loop(self) -> None:
        clock = fake_clock()
        a, _ = await self.replica(clock, start=False)
        starting = a.start()
        await a.stop()
        await starting
        self.assertFalse(clock.getDelayedCalls())
        (row,) = await self.rows()
        self.assertIsNotNone(row.stopped_at)

    async def test_stop_with_the_database_gone_still_stops(self) -> None:
        clock = fake_clock()
        a, _ = await self.replica(clock)
        self.db.fail = True
        await a.stop()
        self.assertFalse(clock.getDelayedCalls())


class SoleReplicaTests(unittest.TestCase):
    """On SQLite a second server process on the same database is refused."""

    async def setUp(self) -> None:
        self.store = Store(database_url(made_dir(self), None), reactor)
        self.addCleanup(self.store.stop)
        await self.store.migrate()

    def sync(self, clock: Any, interval: float) -> ReplicaSync:
        return ReplicaSync(clock, self.store, replica_id=uuid.uuid4(), hostname="first", region_id=999,
                           relay_url="", version="0.1.0", interval=interval)

    async def test_a_heartbeating_replica_refuses_another(self) -> None:
        other = self.sync(reactor, 0.05)
        await other.start()
        self.addCleanup(other.stop)
        with self.assertRaises(AnotherReplica) as caught:
            await refuse_another_replica(reactor, self.store, uuid.uuid4(), interval=0.05, expiry=0.15)
        self.assertIn(str(other.replica_id), str(caught.exception))
        self.assertIn("--postgres-url", str(caught.exception))
        self.assertIn("PostgreSQL", str(caught.exception))

    async def test_a_row_left_by_a_dead_process_is_waited_out(self) -> None:
        # A replica whose clock never moves again: its row looks alive, its heartbeat never moves.
        frozen = task.Clock()
        frozen.advance(time.time())
        dead = self.sync(frozen, 0.05)
        await dead.start()
        started = time.monotonic()
        await refuse_another_replica(reactor, self.store, uuid.uuid4(), interval=0.05, expiry=0.15)
        self.assertLess(time.monotonic() - started, 5.0)

    async def test_a_stopped_replica_refuses_nothing(self) -> None:
        other = self.sync(reactor, 0.05)
        await other.start()
        await other.stop()
        await refuse_another_replica(reactor, self.store, uuid.uuid4(), interval=0.05, expiry=0.15)

    async def test_its_own_row_is_not_another(self) -> None:
        me = self.sync(reactor, 0.05)
        await me.start()
        self.addCleanup(me.stop)
        await refuse_another_replica(reactor, self.store, me.replica_id, interval=0.05, expiry=0.15)

