"""Streamed request bodies on a task.Clock and StringTransports: claimed requests are dispatched
at their head with the body following, others are read whole as before; flow control."""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import server
from twisted.web.resource import Resource

from coderstack.server.httpguard import GuardedSite
from coderstack.server.streamingrequest import (
    HIGH_WATER,
    RequestBodyStream,
    StreamingRequest,
    stream_claimed_bodies,
    streaming_request_factory,
)


class Sink:
    def __init__(self) -> None:
        self.data = b""
        self.ended = False

    def write(self, data: bytes) -> None:
        self.data += data

    def end(self) -> None:
        self.ended = True


class BodyStreamTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.reading: list[bool] = []
        self.stream = RequestBodyStream(None, lambda: self.reading.append(False),
                                        lambda: self.reading.append(True))

    def test_queues_until_started_and_pauses_the_client_at_the_mark(self) -> None:
        self.stream.data_received(b"a" * (HIGH_WATER - 1))
        self.assertEqual(self.reading, [])
        self.stream.data_received(b"b")
        self.assertEqual(self.reading, [False])
        sink = Sink()
        self.stream.start(sink)
        self.assertEqual(len(sink.data), HIGH_WATER)
        self.assertEqual(self.reading, [False, True])
        self.assertFalse(sink.ended)
        self.stream.finished()
        self.assertTrue(sink.ended)

    def test_a_paused_consumer_pauses_the_client_and_resume_drains_first(self) -> None:
        sink = Sink()
        self.stream.start(sink)
        self.stream.data_received(b"1")
        self.stream.pause()
        self.assertEqual(self.reading, [False])
        self.stream.data_received(b"2")  # in flight when the client was paused
        self.stream.finished()
        self.assertEqual((sink.data, sink.ended), (b"1", False))
        self.stream.resume()
        self.assertEqual((sink.data, sink.ended), (b"12", True))
        self.assertEqual(self.stream.peak_queued, 1)

    def test_stop_drops_the_rest(self) -> None:
        sink = Sink()
        self.stream.data_received(b"x" * HIGH_WATER)
        self.stream.stop()
        self.assertEqual(self.reading, [False, True])
        self.stream.start(sink)
        self.stream.data_received(b"more")
        self.stream.finished()
        self.assertEqual((sink.data, sink.ended), (b"", False))


class Recorder(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, Any]] = []
        self.finish_at_once = False

    def render(self, request: Any) -> Any:
        stream = getattr(request, "body_stream", None)
        if stream is None:
            self.seen.append((request.path, request.content.read()))
            return b"whole"
        sink = Sink()
        self.seen.append((request.path, sink))
        if self.finish_at_once:
            return b"early"
        stream.start(sink)
        return server.NOT_DONE_YET


class SiteTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.resource = Recorder()
        self.site = GuardedSite(self.resource, reactor=self.clock)
        self.claimed: list[tuple[bytes | None, bytes]] = []

        def claims(host: bytes | None, path: bytes) -> bool:
            self.claimed.append((host, path))
            return path.startswith(b"/stream")

        stream_claimed_bodies(self.site, claims)
        self.channel = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def tearDown(self) -> None:
        self.channel.connectionLost(Failure(ConnectionError()))

    def test_an_unclaimed_body_is_read_whole_as_before(self) -> None:
        self.channel.dataReceived(b"POST /other HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\nabc")
        self.clock.advance(0)
        self.assertEqual(self.resource.seen, [])
        self.channel.dataReceived(b"def")
        self.assertEqual(self.resource.seen, [(b"/other", b"abcdef")])
        self.assertIn(b"whole", self.transport.value())
        self.assertEqual(self.claimed, [(b"h", b"/other")])

    def test_a_claimed_body_follows_its_dispatched_request(self) -> None:
        self.channel.dataReceived(b"POST /stream?x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                                  b"Expect: 100-continue\r\n\r\n")
        self.assertEqual(self.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.clock.advance(0)
        [(path, sink)] = self.resource.seen
        self.assertEqual(path, b"/stream")
        self.channel.dataReceived(b"3\r\nabc\r\n")
        self.assertEqual((sink.data, sink.ended), (b"abc", False))
        self.channel.dataReceived(b"0\r\n\r\n")
        self.assertEqual((sink.data, sink.ended), (b"abc", True))
        request = self.channel.requests[0]
        request.write(b"done")
        request.finish()
        self.assertFalse(self.transport.disconnecting)  # the connection stays for the next request
        self.channel.dataReceived(b"GET /other HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertIn(b"whole", self.transport.value())

    def test_a_body_that_arrives_with_its_head_is_still_streamed(self) -> None:
        self.channel.dataReceived(b"PUT /stream HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
        [(path, sink)] = self.resource.seen
        self.assertEqual((sink.data, sink.ended), (b"hi", True))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_response_before_the_body_ends_closes_the_connection(self) -> None:
        self.resource.finish_at_once = True
        self.channel.dataReceived(b"PUT /stream HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nab")
        self.clock.advance(0)
        self.assertIn(b"early", self.transport.value())
        self.assertTrue(self.transport.disconnecting)
        # The rest of the body (which looks like a request) is not taken for one.
        self.channel.dataReceived(b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(len(self.resource.seen), 1)

    def test_a_site_request_factory_is_kept_underneath(self) -> None:
        class Base(server.Request):
            marker = "base"

        factory = streaming_request_factory(lambda host, path: False, Base)
        self.assertTrue(issubclass(factory, StreamingRequest))
        self.assertTrue(issubclass(factory, Base))
        self.assertIs(streaming_request_factory(lambda h, p: False).__mro__[1], StreamingRequest)
