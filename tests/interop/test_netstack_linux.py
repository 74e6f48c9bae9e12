"""Linux's own TCP as the peer of our netstack, through a TUN device in a network namespace.

Both directions, 100 MiB byte-exact: a kernel client (Python socket in the namespace) sends to a
hashing sink on our stack, and our client sends to a hashing kernel server; again with 1% random
loss (ip6tables statistic match, both directions) and with reordering (a forwarder between the TUN
and the stack that holds some packets back).  Needs root (CI runs as root).
"""

from __future__ import annotations

import hashlib
import random

from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.trial import unittest
from zope.interface import implementer

from coderstack.netstack.endpoints import NetstackClientEndpoint, NetstackServerEndpoint
from coderstack.netstack.tcpconfig import TCPConfig
from tests.support.waiting import wait_until

from .netstack_lab import (
    KERNEL_ADDR,
    KERNEL_CLIENT,
    KERNEL_SERVER,
    STACK_ADDR,
    DelayLink,
    Lab,
    ReorderingLink,
    can_run,
)

SIZE = 100 << 20


@implementer(IHalfCloseableProtocol)
class HashSink(protocol.Protocol):
    """Hashes what it receives; at EOF answers ``<count> <sha256>`` and closes."""

    def connectionMade(self):
        self.hash = hashlib.sha256()
        self.count = 0

    def dataReceived(self, data):
        self.hash.update(data)
        self.count += len(data)

    def readConnectionLost(self):
        self.transport.write(f"{self.count} {self.hash.hexdigest()}\n".encode())
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


@implementer(IPushProducer)
class Sender(protocol.Protocol):
    """Streams ``payload`` as a push producer, then closes."""

    chunk = 256 << 10

    def __init__(self, payload: bytes):
        self.payload = memoryview(payload)
        self.offset = 0
        self.paused = False
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self):
        self.paused = False
        while not self.paused and self.offset < len(self.payload):
            end = self.offset + self.chunk
            self.transport.write(bytes(self.payload[self.offset : end]))
            self.offset = end
        if self.offset >= len(self.payload) and self.transport is not None:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self.paused = True

    def connectionLost(self, reason):
        self.reason = reason
        if not self.done.called:
            self.done.callback(None)


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class LinuxPeerMixin:
    timeout = 240
    link = None
    loss = 0.0
    mtu = 1280
    config = None

    def setUp(self):
        why = can_run()
        if why:
            raise unittest.SkipTest(why)
        self.lab = Lab(mtu=self.mtu, link=self.link, cleanup=self.addCleanup, routed=bool(self.loss),
                       config=self.config)
        if self.loss:
            self.lab.add_loss(self.loss)

    @defer.inlineCallbacks
    def kernel_to_us(self, size=SIZE, seed=1):
        """Kernel client -> our server.  Returns Mbit/s seen by the kernel sender."""
        port = yield NetstackServerEndpoint(self.lab.netstack, 5001).listen(protocol.Factory.forProtocol(HashSink))
        self.addCleanup(port.stopListening)
        expected = hashlib.sha256(payload(size, seed)).hexdigest()
        proc = self.lab.spawn(KERNEL_CLIENT, STACK_ADDR, "5001", str(size), str(seed), cleanup=self.addCleanup)
        line = yield proc.line()
        count, digest, elapsed = line.split()
        self.assertEqual((int(count), digest), (size, expected))
        yield proc.ended
        return size * 8 / float(elapsed) / 1e6

    @defer.inlineCallbacks
    def us_to_kernel(self, size=SIZE, seed=2):
        """Our client -> kernel server.  Returns Mbit/s seen by the kernel receiver."""
        proc = self.lab.spawn(KERNEL_SERVER, self.lab.kernel_addr, "5002", cleanup=self.addCleanup)
        ready = yield proc.line()
        self.assertEqual(ready, "READY")
        data = payload(size, seed)
        sender = Sender(data)
        yield NetstackClientEndpoint(self.lab.netstack, self.lab.kernel_addr, 5002).connect(protocol.Factory.forProtocol(lambda: sender))
        line = yield proc.line()
        count, digest, elapsed = line.split()
        self.assertEqual((int(count), digest), (size, hashlib.sha256(data).hexdigest()))
        yield sender.done
        return size * 8 / float(elapsed) / 1e6


class CleanPathTests(LinuxPeerMixin, unittest.TestCase):
    def test_kernel_client_to_our_server(self):
        return self.kernel_to_us()

    def test_our_client_to_kernel_server(self):
        return self.us_to_kernel()


class LossyPathTests(LinuxPeerMixin, unittest.TestCase):
    loss = 0.01

    @defer.inlineCallbacks
    def test_kernel_client_to_our_server(self):
        yield self.kernel_to_us()
        self.assertGreater(self.lab.dropped(), 0)
        self.assertGreater(self.lab.netstack.stats["tcp_out_of_order"], 0)

    @defer.inlineCallbacks
    def test_our_client_to_kernel_server(self):
        yield self.us_to_kernel()
        self.assertGreater(self.lab.dropped(), 0)
        self.assertGreater(self.lab.netstack.stats["tcp_retransmits"], 0)


class WANPathTests(LinuxPeerMixin, unittest.TestCase):
    """A 20 ms round trip (our side delays both directions) with 0.5% random loss each way, our
    stack sending to Linux's TCP. CUBIC alone is held to a loss-limited window of tens of
    segments, a few Mbit/s here; the window's bandwidth-delay floor keeps the path full."""

    link = staticmethod(lambda to_kernel, to_stack: DelayLink(to_kernel, to_stack, one_way=0.01))
    loss = 0.005
    size = 12 << 20

    @defer.inlineCallbacks
    def test_the_floor_keeps_a_lossy_wan_path_full(self):
        with_floor = yield self.us_to_kernel(size=self.size)
        self.assertGreater(self.lab.dropped(), 0)
        # The same lab, a second connection with the loss-based window alone.
        self.lab.netstack.stack.config = TCPConfig(mtu=self.mtu, bdp_floor=False)
        without = yield self.us_to_kernel(size=self.size, seed=3)
        self.assertGreater(with_floor, 4 * without, (with_floor, without))


class ReorderingPathTests(LinuxPeerMixin, unittest.TestCase):
    link = staticmethod(lambda to_kernel, to_stack: ReorderingLink(to_kernel, to_stack, probability=0.01))

    @defer.inlineCallbacks
    def test_kernel_client_to_our_server(self):
        yield self.kernel_to_us()
        self.assertGreater(self.lab.link.reordered, 0)
        self.assertGreater(self.lab.netstack.stats["tcp_out_of_order"], 0)

    @defer.inlineCallbacks
    def test_our_client_to_kernel_server(self):
        yield self.us_to_kernel()
        self.assertGreater(self.lab.link.reordered, 0)


class ICMPTests(LinuxPeerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_kernel_answers_our_ping(self):
        rtt = yield self.lab.netstack.ping(KERNEL_ADDR, b"x" * 56)
        self.assertLess(rtt, 5)

    @defer.inlineCallbacks
    def test_udp_both_ways(self):
        got = defer.Deferred()

        class Echo(protocol.DatagramProtocol):
            def datagramReceived(self, data, addr):
                self.transport.write(data.upper(), addr)
                got.callback(addr)

        self.lab.netstack.listen_udp(5300, Echo())
        script = (
            "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(10);"
            f"s.sendto(b'hello', ('{STACK_ADDR}', 5300)); print(s.recvfrom(100)[0].decode(), flush=True)"
        )
        proc = self.lab.spawn(script, cleanup=self.addCleanup)
        line = yield proc.line()
        self.assertEqual(line, "HELLO")
        addr = yield got
        self.assertEqual(addr[0], KERNEL_ADDR)


_ = reactor


class Iperf3Tests(LinuxPeerMixin, unittest.TestCase):
    """``iperf3 -c`` (the real tool, in the namespace) sends to an iperf3-protocol sink on our
    stack for two seconds; iperf3's own report must show the bytes our sink counted."""

    @defer.inlineCallbacks
    def test_iperf3_client_to_our_sink(self):
        import json
        import shutil

        from .iperf3_sink import Iperf3SinkFactory

        if shutil.which("iperf3") is None:
            raise unittest.SkipTest("iperf3 is not installed (CI installs it)")
        factory = Iperf3SinkFactory(reactor)
        port = yield NetstackServerEndpoint(self.lab.netstack, 5201).listen(factory)
        self.addCleanup(port.stopListening)
        proc = self.lab.spawn_argv(["iperf3", "-c", STACK_ADDR, "-t", "2", "-J"], cleanup=self.addCleanup)
        code = yield proc.ended
        report = json.loads("\n".join(proc.all_lines))
        self.assertEqual(code, 0, report.get("error"))
        received = report["end"]["sum_received"]["bytes"]
        self.assertEqual(received, factory.reported)
        self.assertGreater(received, 1 << 20)
        # Everything iperf3 wrote arrives (the tail may land after iperf3 has exited).
        sent = report["end"]["sum_sent"]["bytes"]
        yield defer.ensureDeferred(wait_until(lambda: factory.received >= sent, "the tail of iperf3's data",
                                              timeout=5, interval=0.05))
        self.assertEqual(factory.received, sent)
        self.iperf3_mbps = report["end"]["sum_received"]["bits_per_second"] / 1e6
