"""Twisted endpoints over two netstacks, on a task.Clock."""

import hashlib

from twisted.internet import defer, error, protocol, task
from twisted.internet.address import IPv6Address
from twisted.internet.interfaces import IPushProducer
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import Agent, readBody
from zope.interface import implementer

from coderstack.netstack.endpoints import Netstack, NetstackClientEndpoint, NetstackServerEndpoint
from coderstack.netstack.testing import NetstackPair


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Collect(protocol.Protocol):
    def __init__(self):
        self.data = bytearray()
        self.lost = None

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = reason


class Base(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.pair = NetstackPair(self.clock, lambda addr, send: Netstack(addr, send, self.clock))
        self.a, self.b = self.pair.a, self.pair.b

    def result(self, d):
        out = []
        d.addBoth(out.append)
        self.pair.pump(until=lambda: out)
        if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]

    def failure(self, d):
        out = []
        d.addBoth(out.append)
        self.pair.pump(until=lambda: out)
        return out[0]


class EchoTests(Base):
    def test_echo_server_over_endpoints(self):
        port = self.result(NetstackServerEndpoint(self.b, 7).listen(protocol.Factory.forProtocol(Echo)))
        self.assertEqual(port.getHost(), IPv6Address("TCP", "fd7a:115c:a1e0::b", 7))
        client = self.result(NetstackClientEndpoint(self.a, "fd7a:115c:a1e0::b", 7).connect(protocol.Factory.forProtocol(Collect)))
        self.assertEqual(client.transport.getPeer(), IPv6Address("TCP", "fd7a:115c:a1e0::b", 7))
        self.assertEqual(client.transport.getHost().host, "fd7a:115c:a1e0::a")
        blob = bytes(range(256)) * 4000
        client.transport.write(blob)
        self.pair.pump(until=lambda: len(client.data) >= len(blob))
        self.assertEqual(bytes(client.data), blob)
        client.transport.loseConnection()
        self.pair.pump(until=lambda: client.lost is not None)
        client.lost.trap(error.ConnectionDone)
        self.assertEqual(self.b.stack.connections, {})  # LAST_ACK -> CLOSED
        self.assertEqual([c.state_name for c in self.a.stack.connections.values()], ["TIME_WAIT"])

    def test_refused(self):
        f = self.failure(NetstackClientEndpoint(self.a, "fd7a:115c:a1e0::b", 9).connect(protocol.Factory.forProtocol(Collect)))
        f.trap(error.ConnectionRefusedError)

    def test_connect_timeout(self):
        self.pair.drop = lambda dest, pkt: True
        f = self.failure(NetstackClientEndpoint(self.a, "fd7a:115c:a1e0::b", 9, timeout=5).connect(protocol.Factory.forProtocol(Collect)))
        f.trap(error.TCPTimedOutError)

    def test_abort(self):
        server_protos = []

        class F(protocol.Factory):
            def buildProtocol(self, addr):
                p = Collect()
                server_protos.append(p)
                return p

        self.result(NetstackServerEndpoint(self.b, 7).listen(F()))
        client = self.result(NetstackClientEndpoint(self.a, "fd7a:115c:a1e0::b", 7).connect(protocol.Factory.forProtocol(Collect)))
        self.pair.pump(until=lambda: server_protos)
        client.transport.abortConnection()
        self.pair.pump(until=lambda: server_protos[0].lost is not None)
        client.lost.trap(error.ConnectionAborted)
        server_protos[0].lost.trap(error.ConnectionLost)

    def test_half_close(self):
        from twisted.internet.interfaces import IHalfCloseableProtocol

        @implementer(IHalfCloseableProtocol)
        class Upper(Collect):
            read_lost = False

            def readConnectionLost(self):
                self.read_lost = True
                self.transport.write(bytes(self.data).upper())
                self.transport.loseConnection()

            def writeConnectionLost(self):
                self.write_lost = True

        self.result(NetstackServerEndpoint(self.b, 7).listen(protocol.Factory.forProtocol(Upper)))
        client = self.result(NetstackClientEndpoint(self.a, "fd7a:115c:a1e0::b", 7).connect(protocol.Factory.forProtocol(Upper)))
        client.transport.write(b"shout")
        client.transport.loseWriteConnection()
        self.pair.pump(until=lambda: client.lost is not None)
        self.assertEqual(bytes(client.data), b"SHOUT")
        self.assertTrue(client.read_lost)  # the client's read side ended before connectionLost
        self.assertTrue(client.write_lost)

    def test_stop_listening(self):
        port = self.result(NetstackServerEndpoint(self.b, 7).listen(protocol.Factory.forProtocol(Echo)))
        self.result(port.stopListening())
        f = self.failure(NetstackClientEndpoint(self.a, "fd7a:115c:a1e0::b", 7).connect(protocol.Factory.forProtocol(Collect)))
        f.trap(error.ConnectionRefusedError)


class WebTests(Base):
    def test_twisted_web_request(self):
        root = resource.Resource()

        class Hello(resource.Resource):
            isLeaf = True

            def render_GET(self, request):
                request.setHeader(b"content-type", b"text/plain")
                return b"hello over netstack from " + request.getClientAddress().host.encode()

        root.putChild(b"hello", Hello())
        port = self.result(NetstackServerEndpoint(self.b, 80).listen(server.Site(root, reactor=self.clock)))
        self.addCleanup(port.stopListening)

        class EF:
            def endpointForURI(_self, uri):
                return NetstackClientEndpoint(self.a, uri.host.decode().strip("[]"), uri.port)

        agent = Agent.usingEndpointFactory(self.clock, EF())
        response = self.result(agent.request(b"GET", b"http://[fd7a:115c:a1e0::b]:80/hello"))
        self.assertEqual(response.code, 200)
        body = self.result(readBody(response))
        self.assertEqual(body, b"hello over netstack from fd7a:115c:a1e0::a")


@implementer(IPushProducer)
class Pusher:
    """Writes 64 KiB chunks whenever not paused, until ``total`` bytes."""

    def __init__(self, transport, total):
        self.transport = transport
        self.total = total
        self.sent = 0
        self.paused = False
        self.pauses = 0
        self.hash = hashlib.sha256()
        self.max_buffered = 0

    def pauseProducing(self):
        self.paused = True
        self.pauses += 1

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.paused = True

    def step(self):
        while not self.paused and self.sent < self.total:
            chunk = bytes([self.sent // 65536 % 256]) * 65536
            self.hash.update(chunk)
            self.transport.write(chunk)
            self.sent += len(chunk)
            self.max_buffered = max(self.max_buffered, self.transport.conn.send_buffered)


class BackpressureTests(Base):
    def test_slow_reader_closes_window_and_pauses_writer(self):
        readers = []

        class Slow(Collect):
            def connectionMade(self):
                readers.append(self)
                self.transport.pauseProducing()

        self.result(NetstackServerEndpoint(self.b, 7).listen(protocol.Factory.forProtocol(Slow)))
        client = self.result(NetstackClientEndpoint(self.a, "fd7a:115c:a1e0::b", 7).connect(protocol.Factory.forProtocol(Collect)))
        total = 24 << 20
        pusher = Pusher(client.transport, total)
        client.transport.registerProducer(pusher, True)
        for _ in range(300):
            pusher.step()
            self.pair.pump(until=lambda: True)
            self.clock.advance(0.01)
            self.pair.pump(until=lambda: True)
        reader = readers[0]
        rconn = reader.transport.conn
        self.assertEqual(len(reader.data), 0)
        self.assertTrue(pusher.paused)
        self.assertGreater(pusher.pauses, 0)
        # Memory is bounded: the receiver holds at most its window, the sender its high water mark.
        self.assertLessEqual(rconn.rcv_queued, rconn.rcvbuf)
        self.assertLess(rconn.rcv_adv - rconn.rcv_nxt, 1 << rconn.rcv_wscale)  # advertised window 0
        self.assertLessEqual(pusher.max_buffered, self.a.send_high_water + 65536)
        self.assertLess(pusher.sent, total)
        self.assertGreater(self.a.stats["tcp_window_probes"], 0)
        # The reader wakes up: everything arrives, in order.
        got = hashlib.sha256()
        reader.dataReceived = lambda data: got.update(data) or setattr(reader, "n", getattr(reader, "n", 0) + len(data))
        reader.transport.resumeProducing()
        for _ in range(3000):
            pusher.step()
            self.pair.pump(until=lambda: True)
            self.clock.advance(0.01)
            if getattr(reader, "n", 0) >= total:
                break
        self.assertEqual(reader.n, total)
        self.assertEqual(got.digest(), pusher.hash.digest())


class DatagramTests(Base):
    def test_udp_echo(self):
        class UEcho(protocol.DatagramProtocol):
            def datagramReceived(self, data, addr):
                self.transport.write(data[::-1], addr)

        class UCollect(protocol.DatagramProtocol):
            def __init__(self):
                self.got = []

            def datagramReceived(self, data, addr):
                self.got.append((data, addr))

        self.b.listen_udp(5353, UEcho())
        c = UCollect()
        port = self.a.listen_udp(0, c)
        port.write(b"abc", ("fd7a:115c:a1e0::b", 5353))
        self.pair.pump(until=lambda: c.got)
        self.assertEqual(c.got, [(b"cba", ("fd7a:115c:a1e0::b", 5353))])
        # no fragmentation in the tunnel: a datagram must fit the MTU (1280 - 40 - 8)
        port.write(b"x" * 1232, ("fd7a:115c:a1e0::b", 5353))
        self.assertRaises(error.MessageLengthError, port.write, b"x" * 1233, ("fd7a:115c:a1e0::b", 5353))

    def test_ping(self):
        rtt = self.result(self.a.ping("fd7a:115c:a1e0::b", b"x" * 32))
        self.assertGreaterEqual(rtt, 0)
        self.pair.drop = lambda dest, pkt: True
        f = self.failure(self.a.ping("fd7a:115c:a1e0::b", timeout=1))
        f.trap(error.TimeoutError)


class TimerTests(Base):
    def test_idle_stack_has_no_timers(self):
        self.result(NetstackServerEndpoint(self.b, 7).listen(protocol.Factory.forProtocol(Echo)))
        client = self.result(NetstackClientEndpoint(self.a, "fd7a:115c:a1e0::b", 7).connect(protocol.Factory.forProtocol(Collect)))
        client.transport.write(b"x")
        self.pair.pump(until=lambda: client.data)
        self.clock.advance(1)
        self.pair.pump(until=lambda: True)
        self.clock.advance(1)
        # Only keepalive-free idle connections: nothing is scheduled any more.
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])
        self.assertIsInstance(defer.Deferred(), defer.Deferred)


class ProducerCloseTests(Base):
    def test_lose_connection_waits_for_producer(self):
        servers = []

        class F(protocol.Factory):
            def buildProtocol(self, addr):
                servers.append(Collect())
                return servers[-1]

        self.result(NetstackServerEndpoint(self.b, 7).listen(F()))
        client = self.result(NetstackClientEndpoint(self.a, "fd7a:115c:a1e0::b", 7).connect(protocol.Factory.forProtocol(Collect)))
        pusher = Pusher(client.transport, 1 << 20)
        client.transport.registerProducer(pusher, True)
        client.transport.loseConnection()  # must not cut the producer's stream short
        pusher.step()
        client.transport.unregisterProducer()
        self.pair.pump(until=lambda: client.lost is not None)
        client.lost.trap(error.ConnectionDone)
        server_conn = [c for c in self.b.stack.connections.values()]
        self.assertEqual(server_conn, [])
        self.assertEqual(pusher.sent, 1 << 20)
        self.assertEqual(len(servers[0].data), 1 << 20)


class PullProducerTests(Base):
    def test_pull_producer_is_asked_again_as_the_buffer_drains(self):
        """IPullProducer (registerProducer(p, False)): one write per resumeProducing, and the
        transport asks again whenever its send buffer has room, until the producer is done."""
        servers = []

        class F(protocol.Factory):
            def buildProtocol(self, addr):
                servers.append(Collect())
                return servers[-1]

        self.result(NetstackServerEndpoint(self.b, 7).listen(F()))
        client = self.result(NetstackClientEndpoint(self.a, "fd7a:115c:a1e0::b", 7).connect(protocol.Factory.forProtocol(Collect)))
        chunk = bytes(range(256)) * 4096  # 1 MiB

        class Pull:
            calls = 0

            def resumeProducing(self):
                Pull.calls += 1
                client.transport.write(chunk)
                if Pull.calls == 6:
                    client.transport.unregisterProducer()
                    client.transport.loseConnection()

            def stopProducing(self):
                pass

        client.transport.registerProducer(Pull(), False)
        self.pair.pump(until=lambda: client.lost is not None)
        self.assertEqual(Pull.calls, 6)
        self.assertEqual(bytes(servers[0].data), chunk * 6)


class RobustnessTests(Base):
    def test_cancel_connect(self):
        self.pair.drop = lambda dest, pkt: True
        d = NetstackClientEndpoint(self.a, "fd7a:115c:a1e0::b", 7).connect(protocol.Factory.forProtocol(Collect))
        d.cancel()
        f = self.failure(d)
        f.trap(defer.CancelledError)
        self.assertEqual(self.a.stack.connections, {})

    def test_garbage_packets_never_raise(self):
        from hypothesis import given, settings
        from hypothesis import strategies as st

        from coderstack.netstack import ipv6
        from coderstack.netstack.stack import to_address

        self.result(NetstackServerEndpoint(self.b, 7).listen(protocol.Factory.forProtocol(Echo)))
        me, peer = to_address("fd7a:115c:a1e0::b"), to_address("fd7a:115c:a1e0::a")

        @given(st.binary(max_size=120), st.sampled_from([0, 6, 17, 44, 58, 60]))
        @settings(max_examples=200)
        def feed(data, nh):
            self.b.packet_received(data)
            self.b.packet_received(ipv6.HEADER.pack(0x60000000, len(data), nh, 64, peer, me) + data)
            self.b.packets_received([data, data[:40]])

        feed()
        self.assertEqual(self.b.stats["internal_error"], 0)


def self_signed_pem(name: str) -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class TLSTests(Base):
    def test_tls_echo_over_netstack(self):
        from twisted.internet import ssl
        from twisted.protocols.tls import TLSMemoryBIOFactory

        cert = ssl.PrivateCertificate.loadPEM(self_signed_pem("agent.coder"))
        # TLS aggregates small writes on a clock: give it ours.
        server_factory = TLSMemoryBIOFactory(
            cert.options(), False, protocol.Factory.forProtocol(Echo), clock=self.clock
        )
        self.result(NetstackServerEndpoint(self.b, 443).listen(server_factory))
        client_factory = TLSMemoryBIOFactory(
            ssl.optionsForClientTLS("agent.coder", trustRoot=cert), True,
            protocol.Factory.forProtocol(Collect), clock=self.clock,
        )
        tls = self.result(NetstackClientEndpoint(self.a, "fd7a:115c:a1e0::b", 443).connect(client_factory))
        client = tls.wrappedProtocol
        blob = b"secret" * 50000
        client.transport.write(blob)
        self.pair.pump(until=lambda: len(client.data) >= len(blob))
        self.assertEqual(bytes(client.data), blob)
        self.assertEqual(tls.transport.getPeer().host, "fd7a:115c:a1e0::b")
        client.transport.loseConnection()
        self.pair.pump(until=lambda: client.lost is not None)


class PushProducerCloseTests(Base):
    """A push producer does not hold loseConnection back (Twisted's transports close once their
    buffer is written, whatever streaming producer is registered): in a proxy, each side is the
    other's producer and the side that died never unregisters itself."""

    def serve_collect(self):
        servers = []

        class F(protocol.Factory):
            def buildProtocol(self, addr):
                servers.append(Collect())
                return servers[-1]

        self.result(NetstackServerEndpoint(self.b, 7).listen(F()))
        client = self.result(NetstackClientEndpoint(self.a, "fd7a:115c:a1e0::b", 7).connect(
            protocol.Factory.forProtocol(Collect)))
        return client, servers

    def test_closes_with_a_push_producer_that_never_unregisters(self):
        client, servers = self.serve_collect()
        pusher = Pusher(client.transport, 256 << 10)
        client.transport.registerProducer(pusher, True)
        pusher.step()
        client.transport.loseConnection()
        self.pair.pump(until=lambda: client.lost is not None and servers[0].lost is not None)
        client.lost.trap(error.ConnectionDone)
        self.assertEqual(len(servers[0].data), 256 << 10)
        self.assertTrue(pusher.paused)  # stopProducing() once the connection was gone
        self.assertEqual(self.b.stack.connections, {})

    def test_a_paused_push_producer_is_resumed_once_before_the_close(self):
        client, servers = self.serve_collect()
        pusher = Pusher(client.transport, 8 << 20)
        client.transport.registerProducer(pusher, True)
        pusher.step()  # until the send buffer passes its high-water mark
        self.assertTrue(pusher.paused)
        before_close = pusher.sent
        client.transport.loseConnection()
        resumed = []
        original = pusher.resumeProducing

        def resume():
            original()
            resumed.append(True)
            pusher.step()  # the producer writes the rest of its data when resumed

        pusher.resumeProducing = resume
        self.pair.pump(until=lambda: client.lost is not None)
        client.lost.trap(error.ConnectionDone)
        self.assertTrue(resumed)
        self.pair.pump(until=lambda: servers[0].lost is not None)
        self.assertGreater(len(servers[0].data), before_close)
        self.assertEqual(len(servers[0].data), pusher.sent)
