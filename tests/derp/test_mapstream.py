"""/api/v2/derp-map over a real websocket: the map on connect and on every change."""

from __future__ import annotations

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site

from coderstack.derp.mapstream import MapPublisher, derp_map_stream_resource
from coderstack.derpmap import DERPMap, build_server_map
from tests.support.waiting import wait_until


class MapStreamTests(unittest.TestCase):
    def test_stream(self) -> defer.Deferred:
        pub = MapPublisher(build_server_map("https://a.example.com"))
        root = Resource()
        api = Resource()
        v2 = Resource()
        root.putChild(b"api", api)
        api.putChild(b"v2", v2)
        v2.putChild(b"derp-map", derp_map_stream_resource(pub.get, pub.subscribe))
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        got: list[DERPMap] = []
        closed = defer.Deferred()

        class P(WebSocketClientProtocol):
            def onMessage(self, payload: bytes, isBinary: bool) -> None:
                got.append(DERPMap.loads(payload))

            def onClose(self, wasClean, code, reason) -> None:
                closed.callback(None)

        url = f"ws://127.0.0.1:{port.getHost().port}/api/v2/derp-map"
        factory = WebSocketClientFactory(url)
        factory.protocol = P

        async def go() -> None:
            proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(factory)
            await wait_until(lambda: got, "the first map")
            self.assertEqual(got[0].region(999).nodes[0].host_name, "a.example.com")
            pub.set(pub.get())  # no change, no message
            pub.set(build_server_map("https://b.example.com"))
            await wait_until(lambda: len(got) == 2, "the changed map")
            self.assertEqual(got[1].region(999).nodes[0].host_name, "b.example.com")
            self.assertEqual(len(pub._subscribers), 1)
            proto.sendClose()
            await closed
            await wait_until(lambda: not pub._subscribers, "the subscriber to go")

        return defer.ensureDeferred(go())
