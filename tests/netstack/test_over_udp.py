"""Two netstacks on the real reactor, their packets carried in UDP datagrams over 127.0.0.1
(what the tunnel will do, minus WireGuard): real timers, real sockets, any Twisted factory."""

import hashlib

from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import Agent, readBody
from zope.interface import implementer

from coderstack.netstack.endpoints import Netstack, NetstackClientEndpoint, NetstackServerEndpoint


class Pipe(protocol.DatagramProtocol):
    def __init__(self):
        self.netstack = None
        self.peer = None

    def datagramReceived(self, data, addr):
        self.netstack.packet_received(data)

    def send(self, packet):
        self.transport.write(packet, self.peer)


@implementer(IHalfCloseableProtocol)
class Digest(protocol.Protocol):
    def connectionMade(self):
        self.h = hashlib.sha256()

    def dataReceived(self, data):
        self.h.update(data)

    def readConnectionLost(self):
        self.transport.write(self.h.hexdigest().encode())
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class OverUDPTests(unittest.TestCase):
    def setUp(self):
        self.pipes = []
        ports = []
        for _ in range(2):
            pipe = Pipe()
            port = reactor.listenUDP(0, pipe, interface="127.0.0.1", maxPacketSize=1 << 16)
            self.addCleanup(port.stopListening)
            self.pipes.append(pipe)
            ports.append(port.getHost().port)
        a, b = self.pipes
        a.peer, b.peer = ("127.0.0.1", ports[1]), ("127.0.0.1", ports[0])
        a.netstack = Netstack("fd7a:115c:a1e0::a", a.send, reactor)
        b.netstack = Netstack("fd7a:115c:a1e0::b", b.send, reactor)
        self.addCleanup(a.netstack.stop)
        self.addCleanup(b.netstack.stop)
        self.a, self.b = a.netstack, b.netstack

    @defer.inlineCallbacks
    def test_web_and_bulk(self):
        root = resource.Resource()
        root.putChild(b"", resource.Resource())

        class Big(resource.Resource):
            isLeaf = True

            def render_GET(self, request):
                return b"z" * (3 << 20)

        root.putChild(b"big", Big())
        port = yield NetstackServerEndpoint(self.b, 80).listen(server.Site(root))
        self.addCleanup(port.stopListening)

        class EF:
            def endpointForURI(_self, uri):
                return NetstackClientEndpoint(self.a, uri.host.decode().strip("[]"), uri.port)

        from twisted.web.client import HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent.usingEndpointFactory(reactor, EF(), pool=pool)
        response = yield agent.request(b"GET", b"http://[fd7a:115c:a1e0::b]/big")
        body = yield readBody(response)
        self.assertEqual(body, b"z" * (3 << 20))

        # and a plain protocol, both directions of a half-close
        port2 = yield NetstackServerEndpoint(self.b, 9).listen(protocol.Factory.forProtocol(Digest))
        self.addCleanup(port2.stopListening)
        done = defer.Deferred()

        @implementer(IHalfCloseableProtocol)
        class Send(protocol.Protocol):
            def connectionMade(self):
                self.got = b""
                self.transport.write(b"abc" * 200000)
                self.transport.loseWriteConnection()

            def dataReceived(self, data):
                self.got += data

            def readConnectionLost(self):
                done.callback(self.got)

            def writeConnectionLost(self):
                pass

        yield NetstackClientEndpoint(self.a, "fd7a:115c:a1e0::b", 9).connect(protocol.Factory.forProtocol(Send))
        got = yield done
        self.assertEqual(got, hashlib.sha256(b"abc" * 200000).hexdigest().encode())
        yield pool.closeCachedConnections()
