"""Requests whose bodies are handed on as they arrive instead of being read whole first.

twisted.web reads a request's whole body into ``request.content`` before it renders anything.
A proxy in front of an upload cannot wait for that. :func:`streaming_request_factory` builds a
Site ``requestFactory`` around a predicate ``claims(host, path)`` (the Host header, or None, and
the request target as sent): a claimed request with a body is dispatched to its resource as soon
as its head is in, with :attr:`StreamingRequest.body_stream` carrying the body; every other
request behaves exactly as twisted.web's own. (A streamed request's ``content`` is empty and its
``args`` come from the query alone: its form fields, if any, are still on their way.)

Flow control: the stream queues what arrives while its consumer is away or paused, and pauses
the client's connection once it holds :data:`HIGH_WATER` bytes or its consumer pauses it; the
connection reads again when the consumer resumes and the queue is drained.

A response that ends before its request's body has all arrived closes the connection afterwards
(the rest of the body cannot be told apart from a next request otherwise).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from io import BytesIO
from typing import Any, ClassVar, Protocol

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import HTTPChannel

from coderstack.twistedtypes import DelayedCall, cancel

log = Logger()

#: Bytes a stream queues before it stops reading from the client.
HIGH_WATER = 64 * 1024

Claims = Callable[[bytes | None, bytes], bool]


class BodySink(Protocol):
    """Where a :class:`RequestBodyStream` delivers: the body's bytes, then its end."""

    def write(self, data: bytes) -> None: ...

    def end(self) -> None: ...


class RequestBodyStream:
    """One request body as it arrives. ``length`` is its Content-Length, or None (chunked)."""

    def __init__(self, length: int | None, pause_reading: Callable[[], None],
                 resume_reading: Callable[[], None]) -> None:
        self.length = length
        self._pause_reading = pause_reading
        self._resume_reading = resume_reading
        self._queue: deque[bytes] = deque()
        self.queued = 0
        self.peak_queued = 0
        self.received = 0
        self.complete = False  # the whole body has arrived
        self.stopped = False  # the consumer has given up on it
        self._sink: BodySink | None = None
        self._paused = False  # by the consumer
        self._reading_paused = False
        self._ended = False  # end() delivered

    @property
    def reading_paused(self) -> bool:
        """Whether the client's connection is paused by this stream now."""
        return self._reading_paused

    # --- the consumer's side ---

    def start(self, sink: BodySink) -> None:
        """Deliver the body to ``sink`` from now on (what has queued first)."""
        self._sink = sink
        self._drain()

    def pause(self) -> None:
        self._paused = True
        self._set_reading(False)

    def resume(self) -> None:
        self._paused = False
        self._drain()

    def stop(self) -> None:
        """The consumer wants no more: drop what is queued and what comes."""
        self.stopped = True
        self._queue.clear()
        self.queued = 0
        self._set_reading(True)

    # --- the request's side ---

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.stopped or not data:
            return
        if self._sink is not None and not self._paused and not self._queue:
            self._sink.write(data)
            return
        self._queue.append(data)
        self.queued += len(data)
        self.peak_queued = max(self.peak_queued, self.queued)
        if self._paused or self.queued >= HIGH_WATER:
            self._set_reading(False)

    def finished(self) -> None:
        self.complete = True
        self._drain()

    # --- internals ---

    def _drain(self) -> None:
        if self.stopped:
            return
        while self._queue and self._sink is not None and not self._paused:
            data = self._queue.popleft()
            self.queued -= len(data)
            self._sink.write(data)
        if self._sink is None or self._paused or self._queue:
            return
        if self.complete:
            if not self._ended:
                self._ended = True
                self._sink.end()
        else:
            self._set_reading(True)

    def _set_reading(self, reading: bool) -> None:
        if reading == (not self._reading_paused):
            return
        self._reading_paused = not reading
        (self._resume_reading if reading else self._pause_reading)()


class _DiscardBody:
    """Stands in for the channel's body decoder once the response is over: the rest of an
    unfinished body is read and dropped until the connection closes."""

    def dataReceived(self, data: bytes) -> None:
        pass

    def noMoreData(self) -> None:
        pass


class StreamingRequest(server.Request):
    """A Request that streams the bodies its Site's predicate claims (see the module doc)."""

    claims: ClassVar[Claims] = staticmethod(lambda host, path: False)
    body_stream: RequestBodyStream | None = None
    _dispatch_call: DelayedCall | None = None
    _dispatched = False

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        if length != 0 and isinstance(channel, HTTPChannel) and self._claimed(channel):
            self.content = BytesIO()  # type: ignore[assignment]  # twisted types content as None until gotLength fills it
            producer = channel._networkProducer
            self.body_stream = RequestBodyStream(length, producer.pauseProducing, producer.resumeProducing)
            # The channel answers "Expect: 100-continue" after this returns, so the resource
            # runs on the next reactor turn, not from inside the head's parsing.
            self._dispatch_call = channel.callLater(0, self._dispatch)
            return
        super().gotLength(length)

    def _claimed(self, channel: HTTPChannel) -> bool:
        hosts = self.requestHeaders.getRawHeaders(b"host")
        try:
            return bool(type(self).claims(hosts[0] if hosts else None, channel._path))
        except Exception:
            log.failure("the streaming-request predicate failed; reading the body whole")
            return False

    def _dispatch(self) -> None:
        self._dispatch_call = None
        if self._disconnected or self._dispatched:
            return
        self._dispatched = True
        channel: Any = self.channel
        # As for a request whose body has been read: no idle timeout while it is answered
        # (the channel restores it when the response is done).
        if channel.timeOut:
            channel._savedTimeOut = channel.setTimeout(None)
        server.Request.requestReceived(self, channel._command, channel._path, channel._version)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_stream is None:
            super().handleContentChunk(data)
            return
        self.body_stream.data_received(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.body_stream is None:
            super().requestReceived(command, path, version)
            return
        self.body_stream.finished()
        if not self._dispatched:
            cancel(self._dispatch_call)
            self._dispatch_call = None
            self._dispatched = True
            super().requestReceived(command, path, version)

    def finish(self) -> None:
        stream = self.body_stream
        if stream is not None and not stream.complete and not self._disconnected:
            channel: Any = self.channel
            channel.persistent = False
            channel._transferDecoder = _DiscardBody()
            stream.stop()
        super().finish()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        cancel(self._dispatch_call)
        self._dispatch_call = None
        if self.body_stream is not None:
            self.body_stream.stop()
        super().connectionLost(reason)


def streaming_request_factory(claims: Claims, base: type[server.Request] = server.Request) -> type[StreamingRequest]:
    """A Site ``requestFactory`` streaming the bodies ``claims`` picks, on top of ``base``
    (the Site's own request factory, when it has one)."""
    bases: tuple[type, ...] = (StreamingRequest,)
    if not issubclass(StreamingRequest, base):
        bases = (StreamingRequest, base)
    return type("StreamingRequest", bases, {"claims": staticmethod(claims)})


def stream_claimed_bodies(site: server.Site, claims: Claims) -> None:
    """Make ``site`` stream the request bodies ``claims`` picks (keeping its request factory)."""
    site.requestFactory = streaming_request_factory(claims, site.requestFactory)
