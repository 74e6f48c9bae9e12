"""TCP_NODELAY on both ends of DERP connections (Nagle + delayed ACKs stall large frames)."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, reactor, ssl
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper
from twisted.trial import unittest

from coderstack.derp.policy import AllowAllPolicy
from coderstack.derp.tcpopts import no_delay
from tests.support.waiting import wait_until

from .helpers import RelayServer, make_ca_and_cert, start_client


def _tcp(transport: Any) -> Any:
    """The TCP transport under any TLS/protocol wrappers."""
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    return transport


def _nodelay(transport: Any) -> bool:
    sock = _tcp(transport).getHandle()
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


class NoDelayUnitTests(unittest.TestCase):
    def test_sets_the_option(self) -> None:
        calls = []

        class T:
            def setTcpNoDelay(self, enabled: bool) -> None:
                calls.append(enabled)

        self.assertTrue(no_delay(T()))
        self.assertEqual(calls, [True])

    def test_transport_without_the_option(self) -> None:
        self.assertFalse(no_delay(StringTransport()))

    def test_closed_socket_is_not_an_error(self) -> None:
        class T:
            def setTcpNoDelay(self, enabled: bool) -> None:
                raise OSError(9, "Bad file descriptor")

        self.assertFalse(no_delay(T()))


class RealSocketTests(unittest.TestCase):
    def test_plain_twisted_tcp_has_nagle_on(self) -> defer.Deferred:
        """The control: without no_delay a Twisted TCP connection keeps Nagle, so the checks
        below can tell the difference."""
        server_side: list[Any] = []

        class S(Protocol):
            def connectionMade(self) -> None:
                server_side.append(self.transport)

        port = reactor.listenTCP(0, ServerFactory.forProtocol(S), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        connected: defer.Deferred[Any] = defer.Deferred()

        class C(Protocol):
            def connectionMade(self) -> None:
                connected.callback(self.transport)

        connector = reactor.connectTCP("127.0.0.1", port.getHost().port, ClientFactory.forProtocol(C))
        self.addCleanup(connector.disconnect)

        async def go() -> None:
            transport = await connected
            await wait_until(lambda: server_side, "the server's side of the connection")
            self.assertFalse(_nodelay(transport))
            self.assertFalse(_nodelay(server_side[0]))
            self.assertTrue(no_delay(transport))
            self.assertTrue(_nodelay(transport))

        return defer.ensureDeferred(go())

    async def _both_ends(self, server: RelayServer, **kw: Any) -> None:
        a, _ = start_client(self, server, **kw)
        await wait_until(lambda: a.connected, "the login")
        self.assertTrue(_nodelay(a._link.transport.transport), "client end")
        conn = server.relay.active_conn(a.public_key)
        self.assertIsNotNone(conn)
        self.assertTrue(_nodelay(conn.sink.transport), "relay end")

    def test_upgrade(self) -> defer.Deferred:
        return defer.ensureDeferred(self._both_ends(RelayServer(self, AllowAllPolicy())))

    def test_websocket(self) -> defer.Deferred:
        server = RelayServer(self, AllowAllPolicy())
        return defer.ensureDeferred(self._both_ends(server, force_websockets=True))

    def test_tls_upgrade_and_websocket(self) -> defer.Deferred:
        ca_pem, server_pem = make_ca_and_cert("localhost")
        server = RelayServer(self, AllowAllPolicy(), tls_pem=server_pem)
        ca = ssl.Certificate.loadPEM(ca_pem)

        async def go() -> None:
            await self._both_ends(server, region=server.region("localhost"), trust_root=ca)
            await self._both_ends(server, region=server.region("localhost"), trust_root=ca,
                                  force_websockets=True)

        return defer.ensureDeferred(go())
