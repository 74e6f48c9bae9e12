"""The relay over real sockets on 127.0.0.1: upgrade, websocket, TLS, fallback, auth, backpressure."""

from __future__ import annotations

import json

import treq
from klein import Klein
from twisted.internet import defer, ssl
from twisted.trial import unittest
from twisted.web.resource import Resource

from coderstack.derp.policy import AllowAllPolicy
from coderstack.derp.server import DERPResource, metrics_text
from coderstack.wire import derp as w
from tests.support.relaypolicy import StaticPolicy
from tests.support.waiting import wait_until

from .helpers import RelayServer, make_ca_and_cert, start_client


def _d(coro):
    return defer.ensureDeferred(coro)


class ExchangeTests(unittest.TestCase):
    async def _exchange(self, server: RelayServer, **kw) -> None:
        a, ra = start_client(self, server, **kw)
        b, rb = start_client(self, server, **kw)
        await wait_until(lambda: a.connected and b.connected, "both logins")
        self.assertTrue(a.send(b.public_key, b"to b"))
        await wait_until(lambda: rb.packets, "the packet at b")
        self.assertEqual(rb.packets, [(a.public_key, b"to b")])
        big = bytes(range(256)) * 256  # 64 KiB, the largest packet
        b.send(a.public_key, big)
        await wait_until(lambda: ra.packets, "the 64 KiB packet at a")
        self.assertEqual(ra.packets, [(b.public_key, big)])
        rtt = await a.ping()
        self.assertGreater(rtt, 0)
        self.assertEqual(ra.connects[0][0], server.relay.public_key)
        return a, ra, b, rb

    def test_upgrade_transport(self) -> defer.Deferred:
        server = RelayServer(self, AllowAllPolicy())

        async def go() -> None:
            a, ra, b, rb = await self._exchange(server)
            self.assertFalse(ra.connects[0][2])  # not websocket
            a.stop()
            await wait_until(lambda: rb.gone, "b to hear a has gone")
            self.assertEqual(rb.gone, [(a.public_key, w.PEER_GONE_DISCONNECTED)])

        return _d(go())

    def test_websocket_transport(self) -> defer.Deferred:
        server = RelayServer(self, AllowAllPolicy())

        async def go() -> None:
            a, ra, b, rb = await self._exchange(server, force_websockets=True)
            self.assertTrue(ra.connects[0][2])
            self.assertEqual(ra.forced, [])  # configured, not discovered

        return _d(go())

    def test_tls_with_test_ca(self) -> defer.Deferred:
        ca_pem, server_pem = make_ca_and_cert("localhost")
        server = RelayServer(self, AllowAllPolicy(), tls_pem=server_pem)
        ca = ssl.Certificate.loadPEM(ca_pem)

        def opts(host: str):
            return ssl.optionsForClientTLS(host, trustRoot=ca)

        async def go() -> None:
            await self._exchange(server, region=server.region("localhost"), tls_options=opts)
            # and websockets over TLS, trusting the CA the short way
            await self._exchange(server, region=server.region("localhost"), trust_root=ca,
                                 force_websockets=True)

        return _d(go())

    def test_tls_untrusted_cert_refused(self) -> defer.Deferred:
        _ca_pem, server_pem = make_ca_and_cert("localhost")
        server = RelayServer(self, AllowAllPolicy(), tls_pem=server_pem)
        other_ca, _ = make_ca_and_cert("localhost")

        def opts(host: str):
            return ssl.optionsForClientTLS(host, trustRoot=ssl.Certificate.loadPEM(other_ca))

        async def go() -> None:
            a, ra = start_client(self, server, region=server.region("localhost"), tls_options=opts)
            await wait_until(lambda: a.last_error, "the TLS failure")
            self.assertFalse(a.connected)
            self.assertEqual(server.relay.clients, 0)

        return _d(go())

    def test_fallback_to_websocket_on_4xx(self) -> defer.Deferred:
        """A proxy that refuses Upgrade: DERP with 400 but passes websockets."""
        policy = AllowAllPolicy()
        holder: dict = {}

        class MangledUpgrade(Resource):
            def getChild(self, path, request):
                return self

            def render(self, request):
                if (request.getHeader(b"Upgrade") or b"").lower() == b"derp":
                    request.setResponseCode(400)
                    return b"proxy says no"
                return holder["derp"].render(request)

        root = Resource()
        root.putChild(b"derp", MangledUpgrade())
        server = RelayServer(self, policy, root=root)
        holder["derp"] = DERPResource(server.relay, policy)

        async def go() -> None:
            a, ra = start_client(self, server)
            b, rb = start_client(self, server)
            await wait_until(lambda: a.connected and b.connected, "both logins")
            self.assertEqual(ra.forced, [(999, "DERP upgrade got HTTP 400")])
            self.assertTrue(a.use_websocket)
            a.send(b.public_key, b"through the proxy")
            await wait_until(lambda: rb.packets, "the packet through the proxy")
            self.assertEqual(rb.packets, [(a.public_key, b"through the proxy")])

        return _d(go())

    def test_reconnects_after_server_drop(self) -> defer.Deferred:
        server = RelayServer(self, AllowAllPolicy())

        async def go() -> None:
            a, ra = start_client(self, server, min_backoff=0.01)
            await wait_until(lambda: a.connected, "the login")
            server.relay.close_peer(a.public_key)
            await wait_until(lambda: len(ra.connects) == 2, "the second login")
            self.assertEqual(len(ra.disconnects), 1)
            self.assertTrue(a.connected)

        return _d(go())

    def test_klein_mount(self) -> defer.Deferred:
        policy = AllowAllPolicy()
        app = Klein()
        holder: dict = {}

        @app.route("/derp", branch=True)
        def derp(request):
            return holder["res"]["/derp"]

        @app.route("/api/v2/buildinfo")
        def buildinfo(request):
            return json.dumps({"version": "test"})

        server = RelayServer(self, policy, root=app.resource())
        from coderstack.derp.server import make_derp_resources

        holder["res"] = make_derp_resources(server.relay, policy)

        async def go() -> None:
            resp = await treq.get(server.url + "/derp/probe", persistent=False)
            self.assertEqual(resp.code, 200)
            await self._exchange(server)
            await self._exchange(server, force_websockets=True)

        return _d(go())


class AuthTests(unittest.TestCase):
    def setUp(self) -> None:
        self.policy = StaticPolicy()
        self.server = RelayServer(self, self.policy)

    def test_missing_token_401(self) -> defer.Deferred:
        async def go() -> None:
            for upgrade in (b"DERP", b"websocket"):
                resp = await treq.get(self.server.url + "/derp",
                                      headers={b"Upgrade": upgrade, b"Connection": b"Upgrade"}, persistent=False)
                self.assertEqual(resp.code, 401)
                body = json.loads(await resp.text())
                self.assertEqual(set(body), {"message", "detail"})

        return _d(go())

    def test_wrong_token_401_and_client_never_connects(self) -> defer.Deferred:
        async def go() -> None:
            resp = await treq.get(self.server.url + "/derp", headers={
                b"Upgrade": b"DERP", b"Connection": b"Upgrade", b"Coder-Session-Token": b"wrong"}, persistent=False)
            self.assertEqual(resp.code, 401)
            await resp.text()
            a, ra = start_client(self, self.server, token="wrong")
            await wait_until(lambda: "401" in a.last_error, "the refused login")
            self.assertFalse(a.use_websocket)  # 401 is not a proxy problem: no fallback
            self.assertEqual(self.server.relay.accepts, 0)

        return _d(go())

    def test_wrong_token_over_websocket(self) -> defer.Deferred:
        async def go() -> None:
            a, ra = start_client(self, self.server, token="wrong", force_websockets=True)
            await wait_until(lambda: "401" in a.last_error, "the refused websocket login")
            self.assertEqual(self.server.relay.accepts, 0)
            self.assertEqual(ra.forced, [])

        return _d(go())

    def test_unauthorized_peer_dropped(self) -> defer.Deferred:
        keys = [w.generate_private_key() for _ in range(3)]
        pubs = [w.public_key(k) for k in keys]
        for i, name in enumerate(("alice", "bob", "mallory")):
            self.policy.add_principal(f"tok-{name}", name, pubs[i])
        self.policy.allow(pubs[0], pubs[1])

        async def go() -> None:
            a, ra = start_client(self, self.server, "tok-alice", priv=keys[0])
            b, rb = start_client(self, self.server, "tok-bob", priv=keys[1])
            m, rm = start_client(self, self.server, "tok-mallory", priv=keys[2])
            await wait_until(lambda: a.connected and b.connected and m.connected, "the three logins")
            m.send(a.public_key, b"hi from mallory")
            await wait_until(lambda: self.server.relay.drops["unauthorized"] == 1, "mallory's packet to be dropped")
            b.send(a.public_key, b"hi from bob")
            await wait_until(lambda: ra.packets, "bob's packet at alice")
            self.assertEqual(ra.packets, [(b.public_key, b"hi from bob")])
            a.send(m.public_key, b"reply?")
            await wait_until(lambda: self.server.relay.drops["unauthorized"] == 2, "alice's reply to be dropped")
            self.assertEqual(rm.packets, [])

        return _d(go())

    def test_plain_get_426_and_probes(self) -> defer.Deferred:
        async def go() -> None:
            resp = await treq.get(self.server.url + "/derp", persistent=False)
            self.assertEqual(resp.code, 426)
            self.assertEqual(json.loads(await resp.text())["message"], "DERP requires connection upgrade")
            for path in ("/derp/probe", "/derp/latency-check", "/latency-check"):
                for method in (treq.get, treq.head):
                    resp = await method(self.server.url + path, persistent=False)
                    self.assertEqual(resp.code, 200, path)
                    self.assertEqual(resp.headers.getRawHeaders(b"Access-Control-Allow-Origin"), [b"*"])
                    self.assertEqual(await resp.content(), b"")
            resp = await treq.get(self.server.url + "/generate_204",
                                  headers={b"X-Tailscale-Challenge": b"ts_example.com"}, persistent=False)
            self.assertEqual(resp.code, 204)
            self.assertEqual(resp.headers.getRawHeaders(b"X-Tailscale-Response"),
                             [b"response ts_example.com"])
            resp = await treq.get(self.server.url + "/generate_204",
                                  headers={b"X-Tailscale-Challenge": b"bad challenge!"}, persistent=False)
            self.assertEqual(resp.code, 204)
            self.assertIsNone(resp.headers.getRawHeaders(b"X-Tailscale-Response"))

        return _d(go())


class BackpressureTests(unittest.TestCase):
    def test_stalled_receiver_does_not_slow_others(self) -> defer.Deferred:
        server = RelayServer(self, AllowAllPolicy(), write_timeout=0)

        async def go() -> None:
            a, _ = start_client(self, server)
            b, rb = start_client(self, server)
            c, _ = start_client(self, server)
            d, rd = start_client(self, server)
            await wait_until(lambda: all(x.connected for x in (a, b, c, d)), "the four logins")
            # B stops reading its socket.
            b._link.transport.transport.pauseProducing()
            chunk = b"x" * 32768
            n = 0
            # Push far more at B than socket buffers hold, keeping A's own writes paced.
            while server.relay.drops["queue_head"] == 0:
                if a.writable:
                    for _ in range(16):
                        a.send(b.public_key, chunk)
                    n += 16
                await wait_until(lambda: a.writable, "a to be writable again", interval=0.005)
                if n > 20000:
                    self.fail("no head drops after 650 MB: the stalled queue is unbounded?")
            # B's server-side queue is bounded while C and D talk undisturbed.
            for i in range(200):
                c.send(d.public_key, i.to_bytes(4, "big"))
                if i % 32 == 31:
                    await wait_until(lambda i=i: len(rd.packets) >= i + 1, "the packets so far at d", interval=0.005)
            await wait_until(lambda: len(rd.packets) == 200, "all 200 packets at d")
            self.assertEqual([int.from_bytes(p, "big") for _, p in rd.packets], list(range(200)))
            queued = server.relay.active_conn(b.public_key).queued()
            self.assertLessEqual(queued[0], 32)
            self.assertGreater(server.relay.drops["queue_head"], 0)
            metrics = metrics_text(server.relay)
            self.assertIn('coderstack_derp_packets_dropped_total{reason="queue_head"}', metrics)
            self.assertIn("coderstack_derp_clients_connected 4", metrics)
            b._link.transport.transport.resumeProducing()

        return _d(go())


class RestartTests(unittest.TestCase):
    def test_client_waits_as_asked_after_restarting(self) -> defer.Deferred:
        server = RelayServer(self, AllowAllPolicy())

        async def go() -> None:
            a, ra = start_client(self, server, min_backoff=5.0)
            await wait_until(lambda: a.connected, "the login")
            server.relay.announce_restart(0.05, 10)
            await wait_until(lambda: a._restart_hint is not None, "the restart hint")
            server.relay.close_peer(a.public_key)
            await wait_until(lambda: ra.disconnects, "the disconnect")
            # Without the hint the first retry would wait 2.5-5 s (min_backoff 5); with it, 50 ms.
            from twisted.internet import reactor

            self.assertLessEqual(a._retry.getTime() - reactor.seconds(), 0.05)
            await wait_until(lambda: len(ra.connects) == 2, "the reconnect")

        return _d(go())
