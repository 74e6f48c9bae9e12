"""One upstream connection of the app proxy on a StringTransport: requests out, responses in,
parking, request-body framing and failures."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from coderstack.server.responsereader import ResponseHead
from coderstack.server.upstreamconn import BodySink, UpstreamConnection


class Pool:
    def __init__(self) -> None:
        self.parked: list[UpstreamConnection] = []
        self.forgotten: list[UpstreamConnection] = []

    def _park(self, conn: UpstreamConnection) -> None:
        self.parked.append(conn)

    def _forget(self, conn: UpstreamConnection) -> None:
        self.forgotten.append(conn)


class Exchange:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def request_sent(self) -> None:
        self.events.append("sent")

    def response_head(self, head: ResponseHead) -> None:
        self.events.append(head.code)

    def response_body(self, data: bytes) -> None:
        self.events.append(data)

    def response_end(self) -> None:
        self.events.append("end")

    def response_failed(self, why: str, retryable: bool) -> None:
        self.events.append(("failed", retryable))


class Source:
    def __init__(self, length: int | None) -> None:
        self.length = length
        self.sink: BodySink | None = None
        self.paused = False
        self.stopped = False

    def start(self, sink: BodySink) -> None:
        self.sink = sink

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def stop(self) -> None:
        self.stopped = True


def connected() -> tuple[UpstreamConnection, StringTransport, Pool]:
    pool = Pool()
    conn = UpstreamConnection(pool, "key")
    transport = StringTransport()
    conn.makeConnection(transport)
    return conn, transport, pool


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class ConnectionTests(unittest.TestCase):
    def test_a_request_and_its_response_then_parked(self) -> None:
        conn, transport, pool = connected()
        exchange = Exchange()
        conn.send(exchange, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"GET", None)
        self.assertEqual(transport.value(), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertTrue(conn.busy)
        conn.dataReceived(OK)
        self.assertEqual(exchange.events, ["sent", 200, b"ok", "end"])
        self.assertEqual((pool.parked, conn.busy), ([conn], False))
        self.assertFalse(transport.disconnecting)

    def test_not_parked_when_the_response_says_close_or_more_came(self) -> None:
        for answer in (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", OK + b"extra",
                       b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"):
            conn, transport, pool = connected()
            conn.send(Exchange(), b"GET / HTTP/1.1\r\n\r\n", b"GET", None)
            conn.dataReceived(answer)
            self.assertEqual(pool.parked, [])
            self.assertTrue(transport.disconnecting)

    def test_a_chunked_body_is_framed_and_its_end_is_the_request_sent(self) -> None:
        conn, transport, pool = connected()
        exchange = Exchange()
        source = Source(None)
        conn.send(exchange, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"POST", source)
        self.assertIsNotNone(transport.producer)
        assert source.sink is not None
        source.sink.write(b"hello")
        self.assertEqual(exchange.events, [])
        transport.producer.pauseProducing()
        self.assertTrue(source.paused)
        source.sink.end()
        self.assertTrue(transport.value().endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"))
        self.assertEqual(exchange.events, ["sent"])
        self.assertIsNone(transport.producer)
        conn.dataReceived(OK)
        self.assertEqual(pool.parked, [conn])

    def test_an_answer_before_the_body_is_out_stops_it_and_closes(self) -> None:
        conn, transport, pool = connected()
        source = Source(10)
        exchange = Exchange()
        conn.send(exchange, b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\n", b"PUT", source)
        conn.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(exchange.events, [413, "end"])
        self.assertTrue(source.stopped)
        self.assertEqual(pool.parked, [])
        self.assertTrue(transport.disconnecting)

    def test_a_close_before_any_response_is_retryable_after_some_it_is_not(self) -> None:
        for answer, retryable in ((b"", True), (b"HTTP/1.1 200 OK\r\n", False)):
            conn, transport, pool = connected()
            exchange = Exchange()
            conn.send(exchange, b"GET / HTTP/1.1\r\n\r\n", b"GET", None)
            conn.dataReceived(answer)
            conn.connectionLost(Failure(ConnectionLost()))
            self.assertEqual(exchange.events, ["sent", ("failed", retryable)])
            self.assertEqual(pool.forgotten, [conn])

    def test_a_malformed_response_fails_and_aborts(self) -> None:
        conn, transport, pool = connected()
        exchange = Exchange()
        conn.send(exchange, b"GET / HTTP/1.1\r\n\r\n", b"GET", None)
        conn.dataReceived(b"nonsense\r\n\r\n")
        self.assertEqual(exchange.events, ["sent", ("failed", False)])
        self.assertTrue(transport.disconnected)

    def test_a_close_delimited_body_ends_at_the_close(self) -> None:
        conn, transport, pool = connected()
        exchange = Exchange()
        conn.send(exchange, b"GET / HTTP/1.1\r\n\r\n", b"GET", None)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        conn.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(exchange.events, ["sent", 200, b"all of it", "end"])
        self.assertEqual(pool.parked, [])

    def test_reading_pauses_and_resumes_and_resumes_before_parking(self) -> None:
        conn, transport, pool = connected()
        conn.send(Exchange(), b"GET / HTTP/1.1\r\n\r\n", b"GET", None)
        conn.pause_reading()
        self.assertEqual(transport.producerState, "paused")
        conn.dataReceived(OK)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(pool.parked, [conn])

    def test_bytes_on_an_idle_connection_drop_it(self) -> None:
        conn, transport, pool = connected()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertTrue(transport.disconnected)
