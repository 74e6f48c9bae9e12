"""``coderstack port-forward``: options, environment, and forwarding until stopped."""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from tests.forward.test_forwarder import Collect, Echo, free_port


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
