"""The Twisted UDP adapter around the WireGuard core: timers from IReactorTime, real loopback."""

from __future__ import annotations

import random

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from coderstack.wire.wireguard import Device, generate_private_key
from tests.support.waiting import wait_until
from tests.support.wgudp import WireGuardUDP


def ip6(payload: bytes) -> bytes:
    return (
        bytes([0x60, 0, 0, 0]) + len(payload).to_bytes(2, "big") + b"\x11\x40" + bytes(32) + payload
    )


class FakeUDP:
    def __init__(self) -> None:
        self.written: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.written.append((data, addr))


def pair(clock, **kw):
    a = Device(generate_private_key(), rng=random.Random(1), **kw)
    b = Device(generate_private_key(), rng=random.Random(2), **kw)
    a.add_peer(b.public_key)
    b.add_peer(a.public_key)
    return a, b


class ClockDrivenTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.a, self.b = pair(self.clock)
        self.got: list[bytes] = []
        self.proto = WireGuardUDP(
            self.a, self.b.public_key, ("192.0.2.9", 51820), self.clock, self.got.append
        )
        self.udp = FakeUDP()
        self.proto.makeConnection(self.udp)

    def test_retransmits_from_the_reactor_clock(self):
        self.proto.initiate()
        self.assertEqual(
            [(len(d), addr) for d, addr in self.udp.written], [(148, ("192.0.2.9", 51820))]
        )
        self.clock.advance(4.9)
        self.assertEqual(len(self.udp.written), 1)
        self.clock.advance(0.5)
        self.assertEqual([len(d) for d, _ in self.udp.written], [148, 148])
        self.proto.stopProtocol()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_handshake_data_and_keepalive_timer(self):
        d = self.proto.when_handshake_complete()
        self.proto.send(ip6(b"queued"))
        ((init, _),) = self.udp.written
        now = self.clock.seconds()
        response = self.b.receive(init, now, "x")[-1].datagram
        self.proto.datagramReceived(response, ("192.0.2.99", 4000))  # the peer roamed
        self.assertTrue(d.called)
        self.assertEqual(self.proto.peer_address, ("192.0.2.99", 4000))
        data, addr = self.udp.written[-1]
        self.assertEqual(addr, ("192.0.2.99", 4000))
        self.assertEqual(self.b.receive(data, now, "x")[-1].data, ip6(b"queued"))
        reply = self.b.send(self.a.public_key, ip6(b"answer"), now)[0].datagram
        self.proto.datagramReceived(reply, ("192.0.2.99", 4000))
        self.assertEqual(self.got, [ip6(b"answer")])
        sent = len(self.udp.written)
        self.clock.advance(10.0)  # we received data and sent nothing: a keepalive
        self.assertEqual([len(d) for d, _ in self.udp.written[sent:]], [32])

    def test_cookie_reply_goes_back_to_the_source(self):
        loaded = Device(generate_private_key(), handshake_load_threshold=0)
        loaded.add_peer(self.a.public_key)
        self.a.add_peer(loaded.public_key)
        proto = WireGuardUDP(loaded, self.a.public_key, None, self.clock)
        udp = FakeUDP()
        proto.makeConnection(udp)
        init = self.a.initiate(loaded.public_key, self.clock.seconds())[0].datagram
        proto.datagramReceived(init, ("198.51.100.7", 999))
        self.assertEqual([(len(d), addr) for d, addr in udp.written], [(64, ("198.51.100.7", 999))])


class LoopbackTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_two_adapters_over_udp(self):
        a, b = pair(reactor)
        got_a: list[bytes] = []
        got_b: list[bytes] = []
        pa = WireGuardUDP(a, b.public_key, None, reactor, got_a.append)
        pb = WireGuardUDP(b, a.public_key, None, reactor, got_b.append)
        port_a = reactor.listenUDP(0, pa, interface="127.0.0.1")
        self.addCleanup(port_a.stopListening)
        port_b = reactor.listenUDP(0, pb, interface="127.0.0.1")
        self.addCleanup(port_b.stopListening)
        pa.peer_address = ("127.0.0.1", port_b.getHost().port)
        done_b = pb.when_handshake_complete()
        for i in range(10):
            pa.send(ip6(bytes([i]) * i))
        yield done_b.addTimeout(20, reactor)
        pb.send_many([ip6(b"back")])
        yield defer.ensureDeferred(wait_until(lambda: len(got_b) >= 10 and got_a, "the packets both ways",
                                              interval=0.01))
        self.assertEqual(got_b, [ip6(bytes([i]) * i) for i in range(10)])
        self.assertEqual(got_a, [ip6(b"back")])
        self.assertEqual(pb.peer_address, ("127.0.0.1", port_a.getHost().port))
        pa.stopProtocol()
        pb.stopProtocol()
