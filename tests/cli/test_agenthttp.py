"""get_json: answers without a Content-Length are still capped while they are read."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest
from twisted.web import resource, server

from coderstack.cli import agenthttp


class _Streaming(resource.Resource):
    """Writes ``size`` bytes of a JSON string in chunks, without a Content-Length."""

    isLeaf = True

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def render_GET(self, request: server.Request) -> int:
        request.setHeader(b"Content-Type", b"application/json")
        request.write(b'"')
        left = self.size
        while left > 0:
            n = min(left, 64 * 1024)
            request.write(b"a" * n)
            left -= n
        request.write(b'"')
        request.finish()
        return server.NOT_DONE_YET


class GetJSONTests(unittest.TestCase):
    def serve(self, size: int) -> TCP4ClientEndpoint:
        port = reactor.listenTCP(0, server.Site(_Streaming(size)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)

    async def test_small_answer_is_parsed(self) -> None:
        got = await Deferred.fromCoroutine(agenthttp.get_json(self.serve(1000), "/x", reactor))
        self.assertEqual(got, "a" * 1000)

    async def test_chunked_answer_over_the_cap_is_refused(self) -> None:
        endpoint = self.serve(agenthttp.MAX_RESPONSE + 1)
        with self.assertRaises(agenthttp.AgentHTTPError) as caught:
            await Deferred.fromCoroutine(agenthttp.get_json(endpoint, "/x", reactor))
        self.assertIn("too large", str(caught.exception))
