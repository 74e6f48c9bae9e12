"""Two server replicas on one PostgreSQL behind HAProxy, as real processes: the API, a websocket
and ``Upgrade: DERP`` through the load balancer, requests spread over both replicas, one replica
killed with SIGKILL and taken out by the health checks, login limits counted across both, and
the client HAProxy forwards believed only with --proxy-trusted-origins."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.protocols import portforward
from twisted.trial import unittest

from coderstack.derpmap import DERPMap
from coderstack.sdk import Client, SDKError
from coderstack.server import healthws
from coderstack.server.relayprobe import probe_node
from tests.support import postgres, replicas
from tests.support.replicas import ReplicaSet

PASSWORD = "correct horse battery"


class _Tracked(portforward.ProxyServer):
    def connectionMade(self) -> None:
        self.factory.open.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.open.discard(self)
        super().connectionLost(reason)


class CuttableLink:
    """A TCP forwarder to 127.0.0.1:``port`` on a port of its own, which a test can cut (stop
    listening, abort every connection through it) and mend (listen on the same port again)."""

    def __init__(self, testcase: Any, port: int) -> None:
        self.factory = portforward.ProxyFactory("127.0.0.1", port)
        self.factory.protocol = _Tracked
        self.factory.open = set()
        self.listening = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port
        testcase.addCleanup(self.cut)

    def cut(self) -> Any:
        for proto in list(self.factory.open):
            proto.transport.abortConnection()
        if self.listening is not None:
            listening, self.listening = self.listening, None
            return listening.stopListening()
        return None

    def mend(self) -> None:
        self.listening = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")


class ForwardingClient(Client):
    """A client that sends ``X-Forwarded-For: <claimed>`` as if it were a proxy itself (HAProxy's
    ``option forwardfor`` appends the address it really came from)."""

    def __init__(self, reactor: Any, url: str, claimed: str) -> None:
        super().__init__(reactor, url)
        self.claimed = claimed

    def _headers(self) -> dict[bytes, list[bytes]]:
        return {**super()._headers(), b"X-Forwarded-For": [self.claimed.encode()]}


class HAProxyReplicaTests(unittest.TestCase):
    def setUp(self) -> None:
        why = replicas.available()
        if why is not None:
            raise unittest.SkipTest(why)

    def client(self, url: str, token: str | None = None) -> Client:
        c = Client(reactor, url, token=token)
        self.addCleanup(c.close)
        return c

    async def login(self, url: str) -> str:
        got = await self.client(url).post("/api/v2/users/login",
                                          {"email": "alice@example.com", "password": PASSWORD})
        return str(got["session_token"])

    async def test_replicas_behind_haproxy(self) -> None:
        rs = ReplicaSet(self, 2)
        await rs.start()

        # The first user and a login through the load balancer; the session works on both.
        await self.client(rs.url).post("/api/v2/users/first", {
            "username": "alice", "email": "alice@example.com", "password": PASSWORD})
        token = await self.login(rs.url)
        for d in rs.replicas:
            self.assertEqual((await self.client(d.url, token).me())["username"], "alice")

        # Requests through it reach both replicas.
        alice = self.client(rs.url, token)
        before = await rs.served()
        for _ in range(10):
            self.assertEqual([u["username"] for u in (await alice.get("/api/v2/users"))["users"]], ["alice"])
            self.assertEqual((await alice.get("/api/v2/workspaces"))["count"], 0)
        after = await rs.served()
        self.assertTrue(all(a - b >= 5 for a, b in zip(after, before, strict=True)), (before, after))

        await self.check_websocket_and_derp(rs, token)

        # SIGKILL one replica: HAProxy takes it out and the other answers everything.
        await rs.kill9(0)
        before = await rs.served()
        for _ in range(10):
            self.assertEqual((await alice.me())["username"], "alice")
        self.assertIsInstance(await self.login(rs.url), str)
        await self.check_websocket_and_derp(rs, token)
        after = await rs.served()
        self.assertEqual(after[0], before[0])
        self.assertGreaterEqual(after[1] - before[1], 11)

        # Back again: it serves its share once the health check sees it.
        await rs.restart(0)
        before = await rs.served()
        for _ in range(10):
            await alice.me()
        after = await rs.served()
        self.assertGreater(after[0], before[0])

        # Login limits count on both replicas together: ten failures from one source are free,
        # the eleventh starts the delays, so the next attempt is refused — although neither
        # replica saw more than six of them.
        anyone = self.client(rs.url)
        for i in range(11):
            with self.assertRaises(SDKError) as caught:
                await anyone.post("/api/v2/users/login", {"email": f"ghost{i}@example.com",
                                                          "password": "wrong password"})
            self.assertEqual(caught.exception.status, 401)
        with self.assertRaises(SDKError) as caught:
            await anyone.post("/api/v2/users/login", {"email": "alice@example.com", "password": PASSWORD})
        self.assertEqual(caught.exception.status, 429)

    async def failed_logins(self, url: str, claimed: str, n: int) -> list[int]:
        """The statuses of ``n`` wrong passwords (each for another account, so only the source
        limit can refuse) from a client claiming to be ``claimed``."""
        c = ForwardingClient(reactor, url, claimed)
        self.addCleanup(c.close)
        codes = []
        for _ in range(n):
            self.ghosts = getattr(self, "ghosts", 0) + 1
            with self.assertRaises(SDKError) as caught:
                await c.post("/api/v2/users/login", {"email": f"ghost{self.ghosts}@example.com",
                                                     "password": "wrong password"})
            codes.append(caught.exception.status)
        return codes

    async def test_trusted_load_balancer_forwards_the_client(self) -> None:
        """With HAProxy trusted, the login limits count the client HAProxy forwarded: HAProxy
        appends 127.0.0.1 to the claimed 203.0.113.9, and 127.0.0.1 is a trusted origin, so the
        client is 203.0.113.9 — ten free failures and a delay for it, none for 203.0.113.10."""
        rs = ReplicaSet(self, 2, "--proxy-trusted-origins", "127.0.0.1/32",
                        "--proxy-trusted-headers", "X-Forwarded-For")
        await rs.start()
        self.assertEqual(await self.failed_logins(rs.url, "203.0.113.9", 12), [401] * 11 + [429])
        self.assertEqual(await self.failed_logins(rs.url, "203.0.113.10", 1), [401])
        self.assertEqual(await self.failed_logins(rs.url, "198.51.100.1, 203.0.113.9", 1), [429])

    async def test_untrusted_load_balancer_is_one_source(self) -> None:
        """Without --proxy-trusted-origins the header is the client's own claim: every request
        comes from HAProxy's 127.0.0.1, so failures claiming one address lock out another."""
        rs = ReplicaSet(self, 2, "--proxy-trusted-headers", "X-Forwarded-For")
        await rs.start()
        self.assertEqual(await self.failed_logins(rs.url, "203.0.113.9", 11), [401] * 11)
        self.assertEqual(await self.failed_logins(rs.url, "203.0.113.10", 1), [429])

    async def check_websocket_and_derp(self, rs: ReplicaSet, token: str) -> None:
        """The health websocket echoes through the load balancer, and a DERP client logs in to
        the embedded relay through it with ``Upgrade: DERP`` (no websocket) and gets a Pong —
        twice each, so round-robin sends them to different replicas while both are up."""
        for i in range(2):
            echoed = await healthws.echo_through(reactor, rs.url, token, f"hello {i}", timeout=10)
            self.assertEqual(echoed, f"hello {i}")
        info = await self.client(rs.url, token).connection_info()
        derp_map = DERPMap.from_json(info["derp_map"])
        region = derp_map.regions[999]
        node = region.derp_nodes[0]
        self.assertEqual(node.derp_url(), f"{rs.url}/derp")  # the access URL's, not a replica's
        for _ in range(2):
            probe = await probe_node(reactor, region, node, token, timeout=10)
            self.assertIsNone(probe.error)
            self.assertFalse(probe.websocket)
            self.assertIsNotNone(probe.rtt)

    async def test_a_replica_that_loses_the_database_is_taken_out(self) -> None:
        """/healthz answers 503 on the replica whose database connection is cut; HAProxy takes
        it out, the other serves, and it comes back once the database answers again."""
        pg_port = postgres.cluster().port
        link = CuttableLink(self, pg_port)

        def through_link(i: int, url: str) -> str:
            return url.replace(f"@127.0.0.1:{pg_port}/", f"@127.0.0.1:{link.port}/") if i == 0 else url

        rs = ReplicaSet(self, 2, postgres_url_for=through_link)
        await rs.start()
        await self.client(rs.url).post("/api/v2/users/first", {
            "username": "alice", "email": "alice@example.com", "password": PASSWORD})
        token = await self.login(rs.url)
        alice = self.client(rs.url, token)

        await link.cut()
        await rs.lb.wait_status(0, "DOWN")
        with self.assertRaises(SDKError) as caught:
            await self.client(rs.replicas[0].url).request("GET", "/healthz", text=True)
        self.assertEqual(caught.exception.status, 503)
        # Asked directly, the API says why in a retryable 503, not an internal error.
        with self.assertRaises(SDKError) as caught:
            await self.client(rs.replicas[0].url, token).get("/api/v2/workspaces")
        self.assertEqual(caught.exception.status, 503, caught.exception)
        self.assertIn("The database is unavailable.", str(caught.exception))
        before = await rs.served()
        for _ in range(10):
            self.assertEqual((await alice.me())["username"], "alice")
        after = await rs.served()
        self.assertEqual((after[0] - before[0], after[1] - before[1]), (0, 10))
        rs.process(0).check_running()  # still running: only out of the balancer's rotation

        link.mend()
        await rs.lb.wait_status(0, "UP")
        self.assertEqual(await self.client(rs.replicas[0].url).request("GET", "/healthz", text=True), "OK")
