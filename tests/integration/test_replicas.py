"""Server replicas as real processes: two on one PostgreSQL database list each other and mesh
their relays; a second one on one SQLite database is refused.

The mesh is checked as far as it goes without a coordinator shared between replicas: each
relay's mesh link to the other is up, and a DERP client logged in on one replica shows up as a
key the other replica's relay forwards to. A packet crossing end to end also needs the sending
replica's relay policy to know the tunnel, which lives in the other replica's in-memory
coordinator until the coordinator itself is shared (tests/derp/test_mesh.py sends one across
two meshed relays with a static policy).
"""

from __future__ import annotations

import json
import re

from twisted.internet import reactor
from twisted.trial import unittest

from coderstack.derp.client import DERPClient
from coderstack.derpmap import DERPNode, DERPRegion
from coderstack.sdk import Client
from coderstack.wire import derp as w
from tests.derp.helpers import Recorder
from tests.support import postgres
from tests.support.processes import TWISTD, Deployment, Process, free_port
from tests.support.waiting import wait_until


def gauge(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


class PostgresReplicaTests(unittest.TestCase):
    def setUp(self) -> None:
        postgres.require()

    async def test_two_replicas_list_each_other_and_mesh(self) -> None:
        url = postgres.cluster().new_database()
        d1 = Deployment(self, "--postgres-url", url)
        d2 = Deployment(self, "--postgres-url", url)
        await d1.start_server()
        await d2.start_server()
        alice = d1.user("alice")
        await alice.login_first("alice")
        token = alice.session_token()
        # The same user and session on the other replica: one database.
        c1, c2 = Client(reactor, d1.url, token), Client(reactor, d2.url, token)
        self.addCleanup(c1.close)
        self.addCleanup(c2.close)

        async def relays(client: Client) -> set[str]:
            return {r["relay_address"] for r in await client.get("/api/v2/replicas")}

        both = {d1.url, d2.url}
        await wait_until(lambda: _eq(relays(c1), both), "replica 1 to list both")
        self.assertEqual(await relays(c2), both)
        listed = json.loads(await alice.ok("replicas", "-o", "json"))
        self.assertEqual(len(listed), 2)
        self.assertTrue(all(r["healthy"] and r["region_id"] == 999 for r in listed))

        async def metrics(client: Client) -> str:
            return str(await client.request("GET", "/metrics", text=True))

        async def meshed(client: Client) -> bool:
            text = await metrics(client)
            return (gauge(text, 'coderstack_derp_mesh_peers{state="connected"}') == 1
                    and gauge(text, "coderstack_replicas_alive") == 2
                    and gauge(text, "coderstack_pgcoord_listening") == 1)

        await wait_until(lambda: meshed(c1), "replica 1's mesh link to replica 2")
        await wait_until(lambda: meshed(c2), "replica 2's mesh link to replica 1")

        # A DERP client on replica 2 is a key replica 1's relay now forwards to.
        before = gauge(await metrics(c1), "coderstack_derp_mesh_remote_keys") or 0
        region = DERPRegion(999, "coder", "replica 2", (DERPNode(
            "999b", 999, "127.0.0.1", derp_port=d2.port, force_http=True, stun_port=-1),))
        client = DERPClient(reactor, region, w.generate_private_key(), Recorder(), token=token)
        client.start()
        self.addCleanup(client.stop)
        await wait_until(lambda: client.connected, "the DERP login on replica 2")

        async def forwarded() -> bool:
            return (gauge(await metrics(c1), "coderstack_derp_mesh_remote_keys") or 0) > before

        await wait_until(forwarded, "replica 1 to learn of the client on replica 2")
        await client.stop()

        # A replica that stops gracefully is gone from the list at once.
        await d2.stop_server()
        self.assertEqual(await relays(c1), {d1.url})
        await wait_until(lambda: _gauge_is(metrics(c1), "coderstack_replicas_alive", 1),
                         "replica 1 to drop replica 2")


async def _eq(got: object, want: object) -> bool:
    return await got == want  # type: ignore[misc]


async def _gauge_is(text: object, name: str, want: float) -> bool:
    return gauge(await text, name) == want  # type: ignore[misc]


class RelayURLTests(unittest.TestCase):
    async def test_the_access_url_as_relay_url_is_refused_naming_the_flag(self) -> None:
        postgres.require()
        d = Deployment(self, "--postgres-url", postgres.cluster().new_database())
        argv = [TWISTD, "-n", "--pidfile=", "coderstack-server", "--data-dir", d.data_dir,
                "--stun-address", "disable", *d.server_args, "--access-url", "https://coder.example.com",
                "--derp-server-relay-url", "https://coder.example.com/"]
        server = Process(self, "server", argv, d.env(d.dir), d.dir)
        self.assertNotEqual(await server.wait(), 0, server.log())
        self.assertIn("failed to start: --derp-server-relay-url https://coder.example.com is the "
                      "access URL", server.log())
        self.assertNotIn("listening on", server.log())


class SQLiteSecondReplicaTests(unittest.TestCase):
    async def test_a_second_server_on_one_sqlite_database_is_refused(self) -> None:
        d = Deployment(self)
        await d.start_server()
        argv = [TWISTD, "-n", "--pidfile=", "coderstack-server", "--data-dir", d.data_dir,
                "--stun-address", "disable", "--http-address", f"127.0.0.1:{free_port()}"]
        second = Process(self, "second", argv, d.env(d.dir), d.dir)
        code = await second.wait()
        self.assertNotEqual(code, 0, second.log())
        log = second.log()
        self.assertIn("failed to start", log)
        self.assertIn("--postgres-url", log)
        self.assertNotIn("listening on", log)
        # Once the first stops (gracefully), another may start on the same data dir.
        await d.stop_server()
        await d.start_server()
