"""Dialing behaviour against real sockets."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from coderstack.derp.client import DERPClientError
from coderstack.derp.policy import AllowAllPolicy
from coderstack.derp.server import load_or_create_private_key
from coderstack.derpmap import DERPNode, DERPRegion
from coderstack.wire import derp as w
from tests.support.waiting import wait_until

from .helpers import RelayServer, start_client


class RawUpgradeTests(unittest.TestCase):
    def test_exact_101_and_server_key(self) -> defer.Deferred:
        server = RelayServer(self, AllowAllPolicy())

        class Raw(Protocol):
            def __init__(self) -> None:
                self.data = b""

            def dataReceived(self, data: bytes) -> None:
                self.data += data

        async def go() -> None:
            proto = Raw()
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port.getHost().port), proto)
            proto.transport.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n"
                                  b"Connection: Upgrade\r\nCoder-Session-Token: t\r\n\r\n")
            await wait_until(lambda: len(proto.data) >= 150 + 45, "the server's answer and hello")
            head, _, rest = proto.data.partition(b"\r\n\r\n")
            self.assertEqual(head, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n"
                             b"Connection: Upgrade\r\nDerp-Version: 2\r\nDerp-Public-Key: "
                             + server.relay.public_key.hex().encode())
            self.assertEqual(rest[:5], b"\x01\x00\x00\x00\x28")
            self.assertEqual(rest[5:45], w.MAGIC + server.relay.public_key)
            proto.transport.loseConnection()

        return defer.ensureDeferred(go())

    def test_websocket_needs_derp_subprotocol(self) -> defer.Deferred:
        server = RelayServer(self, AllowAllPolicy())
        import treq

        async def go() -> None:
            resp = await treq.get(server.url + "/derp", persistent=False, headers={
                b"Upgrade": b"websocket", b"Connection": b"Upgrade", b"Coder-Session-Token": b"t",
                b"Sec-WebSocket-Key": b"dGhlIHNhbXBsZSBub25jZQ==", b"Sec-WebSocket-Version": b"13",
                b"Sec-WebSocket-Protocol": b"chat"})
            self.assertEqual(resp.code, 400)
            await resp.content()
            self.assertEqual(server.relay.accepts, 0)

        return defer.ensureDeferred(go())


class DialTests(unittest.TestCase):
    def test_next_node_when_first_is_down(self) -> defer.Deferred:
        server = RelayServer(self, AllowAllPolicy())
        good = server.region().nodes[0]
        # A port nobody listens on: take one and close it.
        dead = reactor.listenTCP(0, server.site, interface="127.0.0.1")
        dead_port = dead.getHost().port

        async def go() -> None:
            await dead.stopListening()
            bad = DERPNode("999a", 999, "127.0.0.1", derp_port=dead_port, force_http=True, stun_port=-1)
            stun = DERPNode("999s", 999, "127.0.0.1", stun_only=True, stun_port=3478)
            region = DERPRegion(999, "coder", "x", (stun, bad, good))
            a, ra = start_client(self, server, region=region)
            await wait_until(lambda: a.connected, "the login on the good node")
            self.assertEqual(a.node.name, "999b")
            self.assertEqual(ra.connects[0][1].name, "999b")

        return defer.ensureDeferred(go())

    def test_note_preferred_and_ping_errors(self) -> defer.Deferred:
        server = RelayServer(self, AllowAllPolicy())

        async def go() -> None:
            a, _ = start_client(self, server)
            a.note_preferred(True)  # before connecting: sent at login
            await wait_until(lambda: server.relay.home_clients == 1, "the relay to count a home client")
            a.note_preferred(False)
            await wait_until(lambda: server.relay.home_clients == 0, "the relay to count none")
            await a.stop()
            with self.assertRaises(DERPClientError):
                await a.ping()

        return defer.ensureDeferred(go())

    def test_send_before_connect_is_queued(self) -> defer.Deferred:
        server = RelayServer(self, AllowAllPolicy())

        async def go() -> None:
            b, rb = start_client(self, server)
            await wait_until(lambda: b.connected, "b's login")
            a, _ = start_client(self, server)
            self.assertTrue(a.send(b.public_key, b"early"))
            await wait_until(lambda: rb.packets, "the early packet at b")
            self.assertEqual(rb.packets, [(a.public_key, b"early")])

        return defer.ensureDeferred(go())


class KeyFileTests(unittest.TestCase):
    def test_create_then_load(self) -> None:
        import os
        import stat

        path = self.mktemp()
        k1 = load_or_create_private_key(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(load_or_create_private_key(path), k1)
        with open(path) as f:
            self.assertEqual(f.read(), f"privkey:{k1.hex()}\n")

    def test_bad_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("privkey:nothex")
        self.assertRaises(ValueError, load_or_create_private_key, path)


class EagerClientTests(unittest.TestCase):
    def test_frames_sent_right_behind_the_request(self) -> defer.Deferred:
        """A client that does not wait for the 101 (like Tailscale's fast start) still logs in."""
        return self._eager(AllowAllPolicy())

    def test_frames_behind_the_request_with_slow_token_check(self) -> defer.Deferred:
        class SlowPolicy(AllowAllPolicy):
            def authenticate(self, token: str) -> defer.Deferred:
                from twisted.internet import task

                return task.deferLater(reactor, 0.05, lambda: "slow")

        return self._eager(SlowPolicy())

    def _eager(self, policy: AllowAllPolicy) -> defer.Deferred:
        server = RelayServer(self, policy)

        class Raw(Protocol):
            def __init__(self) -> None:
                self.data = b""

            def dataReceived(self, data: bytes) -> None:
                self.data += data

        async def go() -> None:
            b, rb = start_client(self, server)
            await wait_until(lambda: b.connected, "b's login")
            priv = w.generate_private_key()
            pub = w.public_key(priv)
            proto = Raw()
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port.getHost().port), proto)
            hello = w.seal_client_info(priv, pub, server.relay.public_key, w.ClientInfo())
            # Binary bytes that contain CRLFs must survive the HTTP parser untouched.
            payload = b"\r\n\r\nline\r\n" * 10
            proto.transport.write(
                b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                b"Coder-Session-Token: t\r\n\r\n" + hello + w.encode(w.SendPacket(b.public_key, payload))
            )
            await wait_until(lambda: rb.packets, "the packet at b")
            self.assertEqual(rb.packets, [(pub, payload)])
            proto.transport.loseConnection()

        return defer.ensureDeferred(go())
