"""Replicas on a real PostgreSQL cluster: they see each other, a graceful stop is seen at once,
silence after three intervals; a replica whose database stops is unhealthy until it is back."""

from __future__ import annotations

import time
import uuid
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from coderstack.server.replicas import ReplicaSync
from coderstack.server.store import Store
from tests.support import postgres
from tests.support.waiting import wait_until

INTERVAL = 0.2


class PGTestCase(unittest.TestCase):
    def setUp(self) -> None:
        postgres.require()

    async def store(self, url: str | None = None) -> Store:
        store: Store = await postgres.migrated_store(self, url)
        return store

    async def replica(self, store: Store, clock: Any = reactor, name: str = "a",
                      interval: float = INTERVAL) -> ReplicaSync:
        sync = ReplicaSync(clock, store, replica_id=uuid.uuid4(), hostname=name, region_id=999,
                           relay_url=f"http://{name}:3000", version="0.1.0", interval=interval)
        await sync.start()
        self.addCleanup(sync.stop)
        return sync


class ReplicaSyncPGTests(PGTestCase):
    async def test_two_replicas_see_each_other_and_a_graceful_stop_at_once(self) -> None:
        url = postgres.cluster().new_database()
        # Two stores: two engines, as two processes would have.
        a = await self.replica(await self.store(url), name="a")
        b = await self.replica(await self.store(url), name="b")
        both = {a.replica_id, b.replica_id}
        self.assertEqual(b.alive_ids(), both)  # b read the set at start
        await wait_until(lambda: a.alive_ids() == both, "a to see b")
        rows = {r.id: r for r in await a.fetch_alive()}
        self.assertEqual(rows[b.replica_id].relay_url, "http://b:3000")
        self.assertTrue(rows[b.replica_id].healthy)
        await b.stop()
        self.assertEqual([r.id for r in await a.fetch_alive()], [a.replica_id])
        await wait_until(lambda: a.alive_ids() == {a.replica_id}, "a to drop b")

    async def test_a_silent_replica_expires_after_three_intervals(self) -> None:
        url = postgres.cluster().new_database()
        interval = 0.5  # long enough that a loaded machine still sees b before it expires
        a = await self.replica(await self.store(url), name="a", interval=interval)
        # b's clock never moves: after its first row, it never heartbeats again (and never
        # marks itself stopped). On PostgreSQL the timestamps are the database's own.
        silent = task.Clock()
        b = await self.replica(await self.store(url), clock=silent, name="b", interval=interval)
        last_beat = time.monotonic()
        self.assertIn(b.replica_id, [r.id for r in await a.fetch_alive()])
        await wait_until(lambda: b.replica_id in a.alive_ids(), "a's heartbeat to see b")
        await wait_until(lambda: b.replica_id not in a.alive_ids(), "b to expire", timeout=20)
        silent_for = time.monotonic() - last_beat
        self.assertGreaterEqual(silent_for, 3 * interval - 0.05)
        self.assertNotIn(b.replica_id, [r.id for r in await a.fetch_alive()])

    async def test_a_replica_whose_database_stops_is_unhealthy_until_it_is_back(self) -> None:
        own = postgres.PostgresCluster()  # a cluster of its own, to stop
        self.addCleanup(own.stop)
        store = await self.store(own.new_database())
        a = await self.replica(store)
        seen: list[bool] = []

        class Health:
            def replicas_changed(self, replicas: Any) -> None:
                pass

            def health_changed(self, healthy: bool, error: str | None) -> None:
                seen.append(healthy)

        a.add_handler(Health())
        await defer.Deferred.fromCoroutine(_in_thread(own.pause))
        await wait_until(lambda: not a.healthy, "a to notice the database is gone", timeout=30)
        self.assertIn("database", a.error or "")
        await defer.Deferred.fromCoroutine(_in_thread(own.resume))
        await wait_until(lambda: a.healthy, "a to be healthy again", timeout=30)
        self.assertEqual(seen, [False, True])
        self.assertEqual(a.alive_ids(), {a.replica_id})


async def _in_thread(fn: Any) -> None:
    from twisted.internet.threads import deferToThread

    await deferToThread(fn)
