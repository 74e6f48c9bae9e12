"""One HTTP/1.1 connection to a workspace app: a request out, its response in, then again.

The request head is bytes the proxy built (:mod:`coderstack.server.appproxy`); a body follows
from a :class:`BodySource` as it comes, framed by the head's ``Content-Length`` or chunked, with
the connection's transport pausing the source while its buffer is full. The response is read by
:class:`~coderstack.server.responsereader.ResponseReader` and handed to the request's
:class:`Exchange` piece by piece: head, body, end, or a failure. At the end the connection goes
back to its :class:`Parking` (the pool) when it may carry another request: the response said so,
nothing came after it, and the request body went out whole; otherwise it closes.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Protocol

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from coderstack.server.responsereader import MalformedResponse, ResponseHead, ResponseReader


class BodySink(Protocol):
    def write(self, data: bytes) -> None: ...

    def end(self) -> None: ...


class BodySource(Protocol):
    """A request body: delivers to a :class:`BodySink` once started, until paused or stopped."""

    length: int | None

    def start(self, sink: BodySink) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def stop(self) -> None: ...


class Exchange(Protocol):
    """The request a connection carries, told of its progress."""

    def request_sent(self) -> None: ...

    def response_head(self, head: ResponseHead) -> None: ...

    def response_body(self, data: bytes) -> None: ...

    def response_end(self) -> None: ...

    def response_failed(self, why: str, retryable: bool) -> None:
        """No complete response: ``retryable`` when nothing of one came and the connection
        closed (the app may have closed a kept-alive connection as the request went out)."""


class Parking(Protocol):
    def _park(self, conn: UpstreamConnection) -> None: ...

    def _forget(self, conn: UpstreamConnection) -> None: ...


class UpstreamConnection(protocol.Protocol):
    """See the module doc. ``busy`` while it carries a request."""

    def __init__(self, parking: Parking, key: Hashable) -> None:
        self.pool = parking
        self.key = key
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.gone = False
        self.busy = False
        self._exchange: Exchange | None = None
        self._reader: ResponseReader | None = None
        self._body: _BodyWriter | None = None  # while a request body is going out
        self._reading_paused = False

    def send(self, exchange: Exchange, head: bytes, method: bytes, body: BodySource | None) -> None:
        """Send a request (``head`` ends with its empty line; ``body`` framed as it says)."""
        assert not self.busy
        self.busy = True
        self._exchange = exchange
        self._reader = ResponseReader(self, head_request=method == b"HEAD")
        transport: Any = self.transport
        if self.gone or transport is None:
            self._failed("the connection is closed", True)
            return
        transport.write(head)
        if body is None:
            exchange.request_sent()
            return
        writer = self._body = _BodyWriter(self, body, chunked=body.length is None)
        transport.registerProducer(writer, True)
        body.start(writer)

    # --- the response, from the reader (ResponseSink) ---

    def head(self, head: ResponseHead) -> None:
        if self._exchange is not None:
            self._exchange.response_head(head)

    def body(self, data: bytes) -> None:
        if self._exchange is not None:
            self._exchange.response_body(data)

    def end(self) -> None:
        exchange, reader = self._exchange, self._reader
        self._exchange = self._reader = None
        self.busy = False
        reusable = (reader is not None and reader.head is not None and reader.head.keep_alive
                    and not reader.rest and self._body is None and not self.gone)
        if self._body is not None:  # the app answered before the body was all sent
            self._body.abandon()
        if self._reading_paused:
            self.resume_reading()
        if reusable:
            self.pool._park(self)
        else:
            self.close_connection()
        if exchange is not None:
            exchange.response_end()

    def _failed(self, why: str, retryable: bool) -> None:
        exchange = self._exchange
        self._exchange = self._reader = None
        if self._body is not None:
            self._body.abandon()
        self.abort_connection()
        if exchange is not None:
            exchange.response_failed(why, retryable)

    # --- the transport ---

    def dataReceived(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:  # bytes nobody asked for: the connection is out of step
            self.abort_connection()
            return
        try:
            reader.feed(data)
        except MalformedResponse as e:
            self._failed(f"malformed response: {e}", False)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.gone = True
        self.pool._forget(self)
        reader = self._reader
        if reader is not None:
            try:
                reader.eof()
            except MalformedResponse as e:
                self._failed(str(e), not reader.received)
        if self._body is not None:
            self._body.abandon()
        self.lost.callback(None)

    def pause_reading(self) -> None:
        transport: Any = self.transport
        if not self._reading_paused and transport is not None and not self.gone:
            self._reading_paused = True
            transport.pauseProducing()

    def resume_reading(self) -> None:
        transport: Any = self.transport
        if self._reading_paused and transport is not None:
            self._reading_paused = False
            if not self.gone:
                transport.resumeProducing()

    def abort_connection(self) -> None:
        """Drop the connection at once (nothing more of it is wanted)."""
        transport: Any = self.transport
        if transport is not None and not self.gone:
            transport.abortConnection()

    def close_connection(self) -> None:
        """Close the connection once what is written has gone out."""
        transport: Any = self.transport
        if transport is not None and not self.gone:
            transport.loseConnection()

    def _body_sent(self, writer: _BodyWriter) -> None:
        if self._body is writer:
            self._body = None
            exchange = self._exchange
            if exchange is not None:
                exchange.request_sent()


@implementer(IPushProducer)
class _BodyWriter:
    """A request body on its way out: the source's bytes framed on the transport, which pauses
    the source (as its producer) while full."""

    def __init__(self, conn: UpstreamConnection, source: BodySource, chunked: bool) -> None:
        self.conn = conn
        self.source = source
        self.chunked = chunked
        self._open = True

    # BodySink
    def write(self, data: bytes) -> None:
        transport: Any = self.conn.transport
        if not self._open or not data or transport is None:
            return
        if self.chunked:
            transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            transport.write(data)

    def end(self) -> None:
        if not self._open:
            return
        self._open = False
        transport: Any = self.conn.transport
        if transport is not None and not self.conn.gone:
            if self.chunked:
                transport.write(b"0\r\n\r\n")
            transport.unregisterProducer()
        self.conn._body_sent(self)

    def abandon(self) -> None:
        """No more of the body is wanted (the response came, or the connection went)."""
        self.conn._body = None
        if not self._open:
            return
        self._open = False
        self.source.stop()
        transport: Any = self.conn.transport
        if transport is not None and not self.conn.gone:
            transport.unregisterProducer()

    # IPushProducer, for the connection's transport
    def pauseProducing(self) -> None:
        self.source.pause()

    def resumeProducing(self) -> None:
        self.source.resume()

    def stopProducing(self) -> None:
        self.abandon()
