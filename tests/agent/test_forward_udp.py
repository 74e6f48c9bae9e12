"""The agent's UDP forwarder: tunnel datagrams to any port reach that port on the workspace's
loopback through one socket per flow, and the answers go back from the port they were sent to."""

from __future__ import annotations

from twisted.internet import protocol, reactor, task
from twisted.trial import unittest

from coderstack.agent.forward import LocalUDPForwarder
from tests.support.waiting import wait_until

AGENT = "fd7a:115c:a1e0::a"
PEER = ("fd7a:115c:a1e0::c", 50000)
OTHER_PEER = ("fd7a:115c:a1e0::d", 50001)


class FakeUDPPort:
    def __init__(self, proto: protocol.DatagramProtocol) -> None:
        self.proto = proto
        self.sent: list[bytes] = []
        self.connected: tuple[str, int] | None = None
        self.stopped = False

    def connect(self, host: str, port: int) -> None:
        self.connected = (host, port)

    def write(self, data: bytes, addr: object = None) -> None:
        self.sent.append(data)

    def stopListening(self) -> None:
        self.stopped = True


class FakeReactor(task.Clock):
    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakeUDPPort] = []

    def listenUDP(self, port: int, proto: protocol.DatagramProtocol, interface: str = "") -> FakeUDPPort:
        assert (port, interface) == (0, "127.0.0.1")
        p = FakeUDPPort(proto)
        proto.makeConnection(p)
        self.ports.append(p)
        return p


class FakeTunnel:
    """Stands in for ``Netstack.listen_udp_any``."""

    def __init__(self) -> None:
        self.handler = None
        self.sent: list[tuple[bytes, tuple[str, int], tuple[str, int]]] = []
        self.stopped = False

    def listen_udp_any(self, handler: object) -> FakeTunnel:
        self.handler = handler
        return self

    def write(self, data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        self.sent.append((data, src, dst))

    def stopListening(self) -> None:
        self.stopped = True


class ForwarderTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.tunnel = FakeTunnel()
        self.fwd = LocalUDPForwarder(self.reactor, idle_timeout=120, max_flows=2)
        self.fwd.attach(self.tunnel)

    def test_one_socket_per_flow_and_answers_from_the_tunnel_port(self) -> None:
        self.fwd.datagram_received(b"a", PEER, (AGENT, 5000))
        self.fwd.datagram_received(b"b", PEER, (AGENT, 5000))
        self.fwd.datagram_received(b"c", OTHER_PEER, (AGENT, 5000))
        self.assertEqual(len(self.reactor.ports), 2)
        first, second = self.reactor.ports
        self.assertEqual((first.connected, first.sent), (("127.0.0.1", 5000), [b"a", b"b"]))
        self.assertEqual(second.sent, [b"c"])
        first.proto.datagramReceived(b"reply", ("127.0.0.1", 5000))
        second.proto.datagramReceived(b"other", ("127.0.0.1", 5000))
        self.assertEqual(self.tunnel.sent, [(b"reply", (AGENT, 5000), PEER), (b"other", (AGENT, 5000), OTHER_PEER)])

    def test_reserved_ports_are_not_forwarded(self) -> None:
        for port in range(1, 9):
            self.fwd.datagram_received(b"x", PEER, (AGENT, port))
        self.assertEqual(self.reactor.ports, [])
        self.assertEqual(self.fwd.counters["reserved_port"], 8)

    def test_idle_flows_close_and_traffic_keeps_them_open(self) -> None:
        self.fwd.datagram_received(b"a", PEER, (AGENT, 5000))
        port = self.reactor.ports[0]
        self.reactor.advance(100)
        port.proto.datagramReceived(b"reply", ("127.0.0.1", 5000))  # an answer counts as traffic
        self.reactor.advance(100)
        self.assertFalse(port.stopped)
        self.reactor.advance(20)
        self.assertTrue(port.stopped)
        self.assertEqual(self.fwd.flows, {})
        self.fwd.datagram_received(b"again", PEER, (AGENT, 5000))
        self.assertEqual(len(self.reactor.ports), 2)

    def test_flow_limit(self) -> None:
        for i in range(3):
            self.fwd.datagram_received(b"x", (PEER[0], 40000 + i), (AGENT, 5000))
        self.assertEqual(len(self.reactor.ports), 2)
        self.assertEqual(self.fwd.counters["too_many_flows"], 1)

    def test_stop_closes_everything(self) -> None:
        self.fwd.datagram_received(b"a", PEER, (AGENT, 5000))
        self.fwd.stop()
        self.assertTrue(self.reactor.ports[0].stopped)
        self.assertTrue(self.tunnel.stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class _Echo(protocol.DatagramProtocol):
    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.write(data.upper(), addr)


class RealLoopbackTests(unittest.TestCase):
    async def test_round_trip_through_a_real_socket(self) -> None:
        echo = reactor.listenUDP(0, _Echo(), interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        tunnel = FakeTunnel()
        fwd = LocalUDPForwarder(reactor)
        fwd.attach(tunnel)
        self.addCleanup(fwd.stop)
        fwd.datagram_received(b"hello", PEER, (AGENT, echo.getHost().port))
        await wait_until(lambda: tunnel.sent, "the answer in the tunnel", interval=0.01)
        self.assertEqual(tunnel.sent, [(b"HELLO", (AGENT, echo.getHost().port), PEER)])
