"""The forwarder over loopback: TCP both ways, failed dials, per-source UDP flows, listening."""

from __future__ import annotations

import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from coderstack.forward.forwarder import Forwarder, ListenError
from coderstack.forward.spec import forwarding_line, parse_forwards
from tests.support.loopbackforward import loopback_tcp_endpoint, loopback_udp_dial


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Collect(protocol.Protocol):
    def __init__(self, want):
        self.want, self.buf, self.done = want, b"", defer.Deferred()

    def dataReceived(self, data):
        self.buf += data
        if len(self.buf) >= self.want and not self.done.called:
            self.done.callback(self.buf)

    def connectionLost(self, reason=None):
        if not self.done.called:
            self.done.callback(self.buf)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ForwardingTests(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.lines = []
        self.fwd = Forwarder(reactor, loopback_tcp_endpoint(reactor), loopback_udp_dial(reactor),
                             self.lines.append, ipv6=False)
        self.addCleanup(self.fwd.stop)

    @defer.inlineCallbacks
    def test_tcp_forward_carries_data_both_ways(self):
        server = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(server.stopListening)
        remote = server.getHost().port
        local = free_port()
        self.fwd.start(parse_forwards([f"127.0.0.1:{local}:{remote}"], []))
        self.assertEqual(self.lines, [forwarding_line("tcp", "127.0.0.1", local, remote)])
        payload = bytes(range(256)) * 8192  # 2 MiB through the forward and back
        client = Collect(len(payload))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", local), client)
        client.transport.write(payload)
        got = yield client.done
        self.assertEqual(got, payload)
        client.transport.loseConnection()

    @defer.inlineCallbacks
    def test_failed_dial_says_why_and_closes(self):
        dead, local = free_port(), free_port()
        self.fwd.start(parse_forwards([f"{local}:{dead}"], []))
        client = Collect(1)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", local), client)
        got = yield client.done
        self.assertEqual(got, b"")
        self.assertTrue(self.lines[-1].startswith(f"Failed to dial 'tcp://127.0.0.1:{dead}' in workspace: "),
                        self.lines)
        self.assertIn("refused", self.lines[-1].lower())

    @defer.inlineCallbacks
    def test_udp_forward_per_source_flows(self):
        class UDPEcho(protocol.DatagramProtocol):
            def datagramReceived(self, data, addr):
                self.transport.write(b"echo:" + data, addr)
        server = reactor.listenUDP(0, UDPEcho(), interface="127.0.0.1")
        self.addCleanup(server.stopListening)
        local = free_port()
        self.fwd.start(parse_forwards([], [f"127.0.0.1:{local}:{server.getHost().port}"]))

        class Client(protocol.DatagramProtocol):
            def __init__(self):
                self.got = defer.Deferred()

            def datagramReceived(self, data, addr):
                if not self.got.called:
                    self.got.callback(data)
        clients = [Client(), Client()]
        for i, c in enumerate(clients):
            p = reactor.listenUDP(0, c, interface="127.0.0.1")
            self.addCleanup(p.stopListening)
            p.write(b"hi%d" % i, ("127.0.0.1", local))
        got = yield defer.gatherResults([c.got for c in clients])
        self.assertEqual(got, [b"echo:hi0", b"echo:hi1"])

    def test_default_binds_ipv4_and_ipv6_when_possible(self):
        fwd = Forwarder(reactor, loopback_tcp_endpoint(reactor), None, self.lines.append, ipv6=True)
        self.addCleanup(fwd.stop)
        # A port free on 127.0.0.1 a moment ago may be taken on ::1 meanwhile: try another.
        for attempt in range(5):
            port = free_port()
            try:
                fwd.start(parse_forwards([f"{port}:3000"], []))
                break
            except ListenError:
                if attempt == 4:
                    raise
        hosts = [p.getHost().host for p in fwd.ports]
        self.assertIn("127.0.0.1", hosts)
        if len(hosts) == 2:
            self.assertIn("::1", hosts)
            self.assertEqual(self.lines[0], f"Forwarding 'tcp://[::1]:{port}' locally to 'tcp://127.0.0.1:3000' in the workspace")
        self.assertEqual(self.lines[-1], f"Forwarding 'tcp://127.0.0.1:{port}' locally to 'tcp://127.0.0.1:3000' in the workspace")

    def test_listen_failure_is_an_error_and_closes_the_rest(self):
        taken = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        free = free_port()
        with self.assertRaises(ListenError) as cm:
            self.fwd.start(parse_forwards([f"127.0.0.1:{free}:1", f"127.0.0.1:{port}:1"], []))
        self.assertTrue(str(cm.exception).startswith(f"listen 'tcp://127.0.0.1:{port}': "))
        self.assertEqual(self.fwd.ports, [])
