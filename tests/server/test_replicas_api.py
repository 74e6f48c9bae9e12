"""``GET /api/v2/replicas`` (owners only), ``/healthz`` when the replica lost its database, and
the replica gauges in ``/metrics``."""

from __future__ import annotations

import uuid

from twisted.internet import task
from twisted.trial import unittest

from coderstack.server.replicas import ReplicaSync
from tests.server.test_replicas import START, FlakyDB
from tests.support.api import Caller, make_deployment
from tests.support.waiting import wait_until


class ReplicasAPITests(unittest.TestCase):
    async def setUp(self) -> None:
        self.d, self.api = await make_deployment(self)
        self.c = Caller(self.api)
        self.clock = task.Clock()
        self.clock.advance(START)
        self.db = FlakyDB(self.d.store)
        self.sync = ReplicaSync(self.clock, self.db, replica_id=uuid.uuid4(), hostname="box",
                                region_id=999, relay_url="http://10.0.0.5:3000", version="0.1.0")

    async def member(self, owner: str) -> str:
        await self.c.call("POST", "/api/v2/users", {"username": "bob", "email": "bob@example.com",
                                                    "password": "correct horse"}, token=owner)
        code, got = await self.c.call("POST", "/api/v2/users/login",
                                      {"email": "bob@example.com", "password": "correct horse"})
        self.assertEqual(code, 201, got)
        return got["session_token"]

    async def test_owners_only(self) -> None:
        owner = await self.c.owner()
        member = await self.member(owner)
        await self.sync.start()
        self.d.replicas = self.sync
        code, _ = await self.c.call("GET", "/api/v2/replicas")
        self.assertEqual(code, 401)
        code, _ = await self.c.call("GET", "/api/v2/replicas", token=member)
        self.assertEqual(code, 403)
        code, got = await self.c.call("GET", "/api/v2/replicas", token=owner)
        self.assertEqual(code, 200)
        (r,) = got
        self.assertEqual(r["id"], str(self.sync.replica_id))
        self.assertEqual({k: r[k] for k in ("hostname", "relay_address", "region_id", "error",
                                            "healthy", "version")},
                         {"hostname": "box", "relay_address": "http://10.0.0.5:3000", "region_id": 999,
                          "error": "", "healthy": True, "version": "0.1.0"})
        self.assertTrue(r["created_at"].startswith("2027-01-15"))
        # Coder's field is whole microseconds; ours, milliseconds.
        self.assertIsInstance(r["database_latency"], int)
        self.assertLessEqual(abs(r["database_latency"] - r["database_latency_ms"] * 1000), 1)
        self.assertGreater(r["database_latency"], 0)

    async def test_no_registry_no_replicas(self) -> None:
        owner = await self.c.owner()
        code, got = await self.c.call("GET", "/api/v2/replicas", token=owner)
        self.assertEqual((code, got), (200, []))

    async def test_healthz_is_503_while_the_database_is_lost(self) -> None:
        await self.sync.start()
        self.d.replicas = self.sync
        self.assertEqual(await self.c.call("GET", "/healthz"), (200, b"OK"))
        self.db.fail = True
        self.clock.advance(2)
        self.assertFalse(self.sync.healthy)
        code, body = await self.c.call("GET", "/healthz")
        self.assertEqual(code, 503)
        self.assertIn(b"lost its database", body)
        self.assertNotIn(b"OperationalError", body)  # the cause is for the log and the owners
        self.db.fail = False
        self.clock.advance(2)
        await self.sync_answered()
        self.assertEqual(await self.c.call("GET", "/healthz"), (200, b"OK"))

    async def sync_answered(self) -> None:
        await wait_until(lambda: self.sync.healthy, "the heartbeat to work again")

    async def test_replica_gauges(self) -> None:
        owner = await self.c.owner()
        await self.sync.start()
        self.d.replicas = self.sync
        code, text = await self.c.call("GET", "/metrics", token=owner)
        self.assertEqual(code, 200)
        self.assertIn(b"\ncoderstack_replica_healthy 1\n", text)
        self.assertIn(b"\ncoderstack_replicas_alive 1\n", text)
        self.db.fail = True
        self.clock.advance(2)
        code, text = await self.c.call("GET", "/metrics", token=owner)
        self.assertIn(b"\ncoderstack_replica_healthy 0\n", text)
