"""port-forward: Coder's spec grammar (every example and error) and forwarding over loopback."""

from __future__ import annotations

import socket

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from coderstack.cli.portforward import (
    Forwarder,
    ForwardSpec,
    ListenError,
    SpecError,
    forwarding_line,
    loopback_tcp_endpoint,
    loopback_udp_dial,
    parse_forwards,
    parse_spec,
)


class GrammarTests(unittest.TestCase):
    def test_every_documented_form(self):
        cases = {
            "8000": [("", 8000, 8000)],
            "8888:9999": [("", 8888, 9999)],
            "8000-8002": [("", 8000, 8000), ("", 8001, 8001), ("", 8002, 8002)],
            "1-3:6-8": [("", 1, 6), ("", 2, 7), ("", 3, 8)],
            "127.0.0.1:4000:4000": [("127.0.0.1", 4000, 4000)],
            "[::1]:8080:8081": [("::1", 8080, 8081)],
            "127.0.0.1:4000-4001": [("127.0.0.1", 4000, 4000), ("127.0.0.1", 4001, 4001)],
            "[::1]:4000-4001:5000-5001": [("::1", 4000, 5000), ("::1", 4001, 5001)],
            "0.0.0.0:22": [("0.0.0.0", 22, 22)],
            "65535": [("", 65535, 65535)],
        }
        for text, want in cases.items():
            self.assertEqual(parse_spec(text), want, text)

    def test_errors_carry_coders_messages(self):
        cases = {
            "abc": 'invalid port specification "abc"',
            "8000:": 'invalid port specification "8000:"',
            "::1:80": 'invalid port specification "::1:80"',
            "[::1]80": 'invalid port specification "[::1]80"',
            "١٢٣": 'invalid port specification "١٢٣"',   # non-ASCII digits: Go's \d is ASCII
            "999.0.0.1:80": 'invalid IP address "999.0.0.1"',
            "[:::1]:80": 'invalid IP address "[:::1]"',
            "0": 'parse local port range from "0": parse range start port from "0": port cannot be 0',
            "80:0": 'parse remote port range from "80:0": parse range start port from "0": port cannot be 0',
            "70000": ('parse local port range from "70000": parse range start port from "70000": '
                      'parse port "70000": strconv.ParseUint: parsing "70000": value out of range'),
            "5-0": 'parse local port range from "5-0": parse range end port from "0": port cannot be 0',
            "9-5": 'parse local port range from "9-5": range end port 5 is less than start port 9',
            "1-5:6-7": "port ranges must be the same length, got 5 ports forwarded to 2 ports",
        }
        for text, want in cases.items():
            with self.assertRaises(SpecError, msg=text) as cm:
                parse_spec(text)
            self.assertEqual(str(cm.exception), want)

    def test_comma_lists_networks_and_duplicates(self):
        specs = parse_forwards(["8000,9000:9001", " 7000 "], ["53"])
        self.assertEqual(specs, [ForwardSpec("tcp", "", 8000, 8000), ForwardSpec("tcp", "", 9000, 9001),
                                 ForwardSpec("tcp", "", 7000, 7000), ForwardSpec("udp", "", 53, 53)])
        # Same port on TCP and UDP, or on different bind addresses, is fine.
        parse_forwards(["53", "127.0.0.1:53"], ["53"])
        with self.assertRaises(SpecError) as cm:
            parse_forwards(["8000", "7999-8001:1-3"], [])
        self.assertEqual(str(cm.exception), "local tcp host:invalid IP port:8000 is specified twice")
        with self.assertRaises(SpecError) as cm:
            parse_forwards([], ["[::1]:53,[0::1]:53:54"])
        self.assertEqual(str(cm.exception), "local udp host:::1 port:53 is specified twice")
        with self.assertRaises(SpecError) as cm:
            parse_forwards(["80,x"], [])
        self.assertEqual(str(cm.exception),
                         'failed to parse TCP port-forward specification "x": invalid port specification "x"')

    @given(st.text(max_size=40))
    def test_garbage_only_raises_spec_error(self, text):
        try:
            parse_forwards([text], [text])
        except SpecError:
            pass

    def test_forwarding_line(self):
        self.assertEqual(forwarding_line("tcp", "127.0.0.1", 8080, 3000),
                         "Forwarding 'tcp://127.0.0.1:8080' locally to 'tcp://127.0.0.1:3000' in the workspace")
        self.assertEqual(forwarding_line("udp", "::1", 53, 5353),
                         "Forwarding 'udp://[::1]:53' locally to 'udp://127.0.0.1:5353' in the workspace")


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


class CommandTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_forwards_until_stopped(self):
        import io

        from coderstack.cli import portforward
        from tests.support.loopback import LoopbackConnection, loopback_connect

        server = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(server.stopListening)
        local = free_port()

        class Ctx:
            environ: dict = {}
            stderr = io.StringIO()

            def err(self, line=""):
                self.stderr.write(line + "\n")
        ctx = Ctx()
        opts = portforward.Options()
        opts.parseOptions(["dev", "-p", f"127.0.0.1:{local}:3000"])
        conn = LoopbackConnection(reactor, {3000: server.getHost().port})
        stop = defer.Deferred()
        running = defer.ensureDeferred(portforward.run_with(reactor, opts, ctx, loopback_connect(conn), stop))
        client = Collect(5)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", local), client)
        client.transport.write(b"hello")
        self.assertEqual((yield client.done), b"hello")
        client.transport.loseConnection()
        stop.callback(None)
        self.assertEqual((yield running), 0)
        self.assertTrue(conn.closed)
        self.assertEqual(ctx.stderr.getvalue(),
                         f"Forwarding 'tcp://127.0.0.1:{local}' locally to 'tcp://127.0.0.1:3000' in the workspace\n"
                         "Ready!\n\nReceived signal, closing all listeners and active connections\n")

    @defer.inlineCallbacks
    def test_bad_spec_and_no_spec(self):
        import io

        from coderstack.cli import portforward

        class Ctx:
            environ: dict = {}
            stderr = io.StringIO()

            def err(self, line=""):
                self.stderr.write(line + "\n")
        for args, want in ((["dev", "--udp", "0"], 'error: parse port-forward specs: failed to parse UDP port-forward '
                                                   'specification "0": parse local port range from "0": parse range '
                                                   'start port from "0": port cannot be 0\n'),
                           (["dev"], "error: no port-forwards requested\n")):
            ctx = Ctx()
            ctx.stderr = io.StringIO()
            opts = portforward.Options()
            opts.parseOptions(args)
            code = yield defer.ensureDeferred(portforward.run_with(reactor, opts, ctx, None))
            self.assertEqual((code, ctx.stderr.getvalue()), (2, want))
