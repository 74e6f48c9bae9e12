"""The streaming reverse proxy that workspace apps are served through.

The router decides which app a request is for and whether it may reach it, and hands over an
async ``connect()`` that opens a stream to the app (through the tunnel to its workspace); this
module carries the request there and the answer back, as Coder's ``httputil.ReverseProxy`` or
nginx would:

- HTTP/1.1 to the app with keep-alive: quiescent connections are parked per key
  (:mod:`coderstack.server.upstreampool`) and reused; a bodiless idempotent request that finds
  its reused connection closed by the app is sent once more on a new one;
- bodies stream both ways with flow control: a request body claimed by the Site's streaming
  predicate (:mod:`coderstack.server.streamingrequest`) goes upstream as it arrives, pausing the
  browser when the app reads slowly; the response body goes to the browser as it arrives (chunked
  and server-sent events included), pausing the app's connection while the browser is slow. A
  response may begin before the request body has all been sent (the client's parser is watched
  for the head, since the client itself hands the response over only once the request is out);
- websocket handshakes go to the app on a connection of their own
  (:mod:`coderstack.server.appwebsocket`); on ``101`` the browser's connection is taken away from
  HTTP (:mod:`coderstack.httptakeover`) and bytes are spliced both ways; any other answer is
  proxied as a normal response;
- headers as :mod:`coderstack.server.appheaders` says;
- failures before a response are an HTML page (:mod:`coderstack.server.errorpage`): the router's
  :class:`UpstreamUnavailable`, ``502`` when the app refuses or drops the connection, ``504`` when
  no response head comes within ``response_header_timeout`` seconds of the request being sent.
  After the response has started, a failure closes the browser's connection (the browser sees a
  truncated response, not a wrong one). A browser that goes away aborts the app connection.

Why Twisted's HTTP client (``HTTP11ClientProtocol`` in twisted.web.client) rather than a parser of
our own: it already frames both ways (Content-Length, chunked, close-delimited, HEAD/204/304),
takes a body from a push producer with flow control, delivers the response body as it arrives
with its transport exposed for pausing, and says when a connection is quiescent for reuse. It
ignores ``101`` as an informational status, so the websocket handshake alone uses its response
parser (``HTTPClientParser``, from the private ``twisted.web._newclient``) with one hook: stop at a
``101`` head and hand the connection over.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import HTTPClientParser
from twisted.web.client import (
    FileBodyProducer,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.client import Request as ClientRequest
from twisted.web.http import NO_BODY_CODES, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.server import Request
from zope.interface import implementer

from coderstack.httptakeover import take_over
from coderstack.server import appheaders
from coderstack.server.appwebsocket import Splice, Switched, UpgradeClient
from coderstack.server.errorpage import render_error_page
from coderstack.server.streamingrequest import RequestBodyStream, StreamingRequest
from coderstack.server.upstreampool import (
    UpstreamConnection,
    UpstreamPool,
    app_endpoint,
    connect_protocol,
)
from coderstack.twistedtypes import Clock, DelayedCall, cancel

log = Logger()

#: Seconds from the request being sent to the app's response head, by default.
RESPONSE_HEADER_TIMEOUT = 60.0

_RETRYABLE = (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})

NOT_RESPONDING = "The app is not responding"


@dataclass(frozen=True)
class Forwarded:
    """What the proxy tells the app about the browser's request (``X-Forwarded-*``)."""

    for_: str
    proto: str
    host: str


@dataclass(frozen=True)
class Upstream:
    """Where and how to reach an app.

    ``scheme`` is ``http`` or ``https`` (TLS without certificate verification: see
    :mod:`coderstack.server.upstreampool`); ``host_header`` is the Host the app sees (the public
    host); ``base_path`` is the app URL's path prefix (no trailing slash), put before the request
    path; ``default_query`` is the app URL's query, used when the request has none and asks for
    ``/``.
    """

    scheme: str
    host_header: str
    base_path: str
    default_query: str


class UpstreamUnavailable(Exception):
    """The app cannot be reached; the browser gets a page with this status, title and detail.
    Raised by the router's ``connect()`` or by the proxy."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(status, title, detail)
        self.status = status
        self.title = title
        self.detail = detail


@dataclass
class ProxyStats:
    """Counters for watching the proxy (and for tests)."""

    requests: int = 0
    upstream_connections: int = 0  # opened, pooled or for a websocket
    held_bytes: int = 0  # response bytes received from apps, not yet written to browsers
    peak_held_bytes: int = 0
    browser_pauses: int = 0  # a browser's connection asked a response to wait
    websockets: int = 0  # spliced connections now open


Connect = Callable[[], Awaitable[IStreamClientEndpoint]]


class AppProxy:
    """Serves browser requests from workspace apps (see the module doc).

    ``reactor`` is what its timers run on (``IReactorTime``; connections come from the
    endpoints ``connect()`` returns). Parked app connections close after ``idle_timeout``
    seconds, at most ``max_idle_per_key`` are kept per key, and an app has
    ``response_header_timeout`` seconds from the end of a request to the head of its response.
    :attr:`stats` counts what happened.
    """

    def __init__(self, reactor: Any, *, idle_timeout: float = 90.0, max_idle_per_key: int = 32,
                 response_header_timeout: float = RESPONSE_HEADER_TIMEOUT) -> None:
        self.reactor = reactor
        self.clock: Clock = reactor
        self.pool = UpstreamPool(reactor, idle_timeout, max_idle_per_key)
        self.response_header_timeout = response_header_timeout
        self.stats = ProxyStats()
        self._exchanges: set[_Exchange] = set()
        self._splices: set[Splice] = set()

    def proxy(self, request: Request, *, key: Hashable, connect: Connect, upstream: Upstream,
              path: bytes, forwarded: Forwarded, strip_cookies: frozenset[str]) -> None:
        """Serve ``request`` from the app to the end (the caller has returned NOT_DONE_YET).
        ``path`` is the path and query after the app's prefix."""
        self.stats.requests += 1
        exchange = _Exchange(self, request, (key, upstream.scheme), connect, upstream, path,
                             forwarded, strip_cookies)
        self._exchanges.add(exchange)
        d = defer.Deferred.fromCoroutine(exchange.run())
        d.addErrback(exchange.crashed)
        d.addBoth(lambda _: self._exchanges.discard(exchange))

    async def close(self) -> None:
        """Abort every request in flight and every websocket, close every app connection."""
        for exchange in list(self._exchanges):
            exchange.abort()
        for splice in list(self._splices):
            splice.close()
        await self.pool.close()
        for splice in list(self._splices):
            await splice.closed

    # SpliceRegistry
    def opened(self, splice: Splice) -> None:
        self._splices.add(splice)
        self.stats.websockets += 1

    def closed(self, splice: Splice) -> None:
        self._splices.discard(splice)
        self.stats.websockets -= 1

    def _held(self, delta: int) -> None:
        stats = self.stats
        stats.held_bytes += delta
        stats.peak_held_bytes = max(stats.peak_held_bytes, stats.held_bytes)


def _first_response(sent: defer.Deferred[Any], head: defer.Deferred[Any] | None) -> defer.Deferred[Any]:
    """The response from whichever fires first: the client's request Deferred (after the whole
    request is sent) or its parser's (as soon as the response head is in). Either passes its
    result on untouched, so the client's own chaining is unchanged; a late failure of ``sent``
    after the response has come is consumed here."""
    first: defer.Deferred[Any] = defer.Deferred()

    def answered(response: Any) -> Any:
        if not first.called:
            first.callback(response)
        return response

    def failed(failure: Failure) -> None:
        if not first.called:
            first.errback(failure)

    sent.addCallbacks(answered, failed)
    if head is not None:
        head.addCallback(answered)
    return first


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def is_websocket_upgrade(request: Request) -> bool:
    upgrade = request.requestHeaders.getRawHeaders(b"upgrade") or []
    return request.method == b"GET" and any(
        t.strip().lower() == b"websocket" for v in upgrade for t in v.split(b",")
    )


class _Exchange:
    """One browser request and its way to the app and back."""

    def __init__(self, proxy: AppProxy, request: Request, key: Hashable, connect: Connect,
                 upstream: Upstream, path: bytes, forwarded: Forwarded,
                 strip_cookies: frozenset[str]) -> None:
        self.proxy = proxy
        self.request = request
        self.key = key
        self.connect = connect
        self.upstream = upstream
        self.path = path
        self.forwarded = forwarded
        self.strip_cookies = strip_cookies
        # A request whose connection is already gone never hears of it through notifyFinish.
        self.browser_gone = bool(getattr(request, "_disconnected", False))
        self.done = False  # the app's part is over: its connection is no longer ours to abort
        self.timed_out = False
        self.responded = False  # the app's response head is in
        self.conn: UpstreamConnection | None = None
        self.upgrade_client: UpgradeClient | None = None
        self._pending: defer.Deferred[Any] | None = None  # connecting, cancelled on abort
        self._timer: DelayedCall | None = None
        self._body: _StreamedBody | _SentFileBody | None = None
        self._parser: HTTPClientParser | None = None
        request.notifyFinish().addErrback(self._browser_lost)

    # --- the whole exchange ---

    async def run(self) -> None:
        if self.browser_gone:
            return
        websocket = is_websocket_upgrade(self.request)
        try:
            if websocket:
                await self._upgrade()
            else:
                await self._forward()
        except UpstreamUnavailable as e:
            self._error_page(e.status, e.title, e.detail)
        except defer.CancelledError:
            if not self.browser_gone:
                raise
        finally:
            self._cancel_timer()

    def crashed(self, failure: Failure) -> None:
        log.failure("app proxy: unexpected failure serving {app}", failure, app=self.upstream.host_header)
        self._abort_upstream()
        try:
            self._error_page(502, NOT_RESPONDING, "The server could not pass this request to the app.")
        except Exception:
            log.failure("app proxy: could not answer after a failure")

    def abort(self) -> None:
        """Stop at once: the browser's connection and the app's close."""
        self._abort_upstream()
        channel = self.request.channel
        if not self.browser_gone and not self.request.finished and channel is not None \
                and channel.transport is not None:
            self.request.loseConnection()

    def _browser_lost(self, failure: Failure) -> None:
        self.browser_gone = True
        self._abort_upstream()

    def _abort_upstream(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        if self._body is not None:
            self._body.abandon()
        if self.done:
            return
        self.done = True
        if self.conn is not None:
            self.conn.abort_connection()
        if self.upgrade_client is not None:
            self.upgrade_client.abort()

    # --- opening the app's end ---

    async def _endpoint(self) -> IStreamClientEndpoint:
        pending = self._pending = defer.Deferred.fromCoroutine(_awaited(self.connect()))
        try:
            endpoint = await pending
        except (UpstreamUnavailable, defer.CancelledError):
            raise
        except Exception as e:
            log.warn("app proxy: no way to {app}: {why}", app=self.upstream.host_header,
                     why=type(e).__name__)
            raise UpstreamUnavailable(502, NOT_RESPONDING, "The server could not reach the workspace.") from None
        finally:
            self._pending = None
        return app_endpoint(endpoint, self.upstream.scheme)

    async def _connected(self, d: defer.Deferred[Any]) -> Any:
        self._pending = d
        try:
            return await d
        except defer.CancelledError:
            raise
        except Exception as e:
            if self.browser_gone:  # the connect was cancelled for it
                raise defer.CancelledError() from None
            log.info("app proxy: {app} refused the connection: {why}", app=self.upstream.host_header,
                     why=type(e).__name__)
            raise UpstreamUnavailable(
                502, NOT_RESPONDING, "The app refused the connection. Is it running and listening on its port?"
            ) from None
        finally:
            self._pending = None

    # --- plain HTTP ---

    def _headers(self, websocket: bool) -> list[appheaders.Header]:
        return appheaders.request_headers(
            self.request.requestHeaders.getAllRawHeaders(),
            host=self.upstream.host_header, forwarded_for=self.forwarded.for_,
            forwarded_proto=self.forwarded.proto, forwarded_host=self.forwarded.host,
            strip_cookies=self.strip_cookies, websocket=websocket,
        )

    def _target(self) -> bytes:
        return appheaders.request_target(self.upstream.base_path, self.upstream.default_query, self.path)

    def _body_producer(self) -> _StreamedBody | _SentFileBody | None:
        request = self.request
        stream = request.body_stream if isinstance(request, StreamingRequest) else None
        if stream is not None:
            body = self._body = _StreamedBody(stream, self._request_sent)
            return body
        headers = request.requestHeaders
        if not (headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding")):
            return None
        content: Any = request.content
        if content is None:
            return None
        content.seek(0, 0)
        return _SentFileBody(content, self._request_sent)

    async def _forward(self) -> None:
        request = self.request
        method = request.method
        headers = Headers()
        for name, value in self._headers(websocket=False):
            headers.addRawHeader(name, value)
        target = self._target()
        body = self._body_producer()
        retried = False
        while True:
            # A retry goes on a new connection: the parked ones may have closed as well.
            conn = None if retried else self.proxy.pool.take(self.key)
            reused = conn is not None
            if conn is None:
                endpoint = await self._endpoint()
                conn = await self._connected(self.proxy.pool.open(self.key, endpoint))
                self.proxy.stats.upstream_connections += 1
            if self.browser_gone:
                conn.abort_connection()
                return
            self.conn = conn
            d = conn.request(ClientRequest(method, target, headers, body, persistent=True))
            self._parser = conn._parser  # for the response's Connection header, kept from us by Response
            if body is None:
                self._request_sent()
            try:
                # The response may start before the whole body is sent (an app answering as
                # it reads, or refusing early): take whichever comes first.
                response = await _first_response(d, getattr(conn, "_responseDeferred", None))
            except Exception as e:
                self._cancel_timer()
                if self.browser_gone:
                    return
                if self.timed_out:
                    raise UpstreamUnavailable(
                        504, "The app took too long to respond",
                        f"The app did not answer within {self.proxy.response_header_timeout:g} seconds.",
                    ) from None
                if reused and not retried and body is None and method in _IDEMPOTENT and isinstance(e, _RETRYABLE):
                    retried = True  # the app closed the kept-alive connection as we sent on it
                    self.conn = None
                    continue
                log.info("app proxy: {app} failed before responding: {why}",
                         app=self.upstream.host_header, why=type(e).__name__)
                raise UpstreamUnavailable(
                    502, NOT_RESPONDING, "The app closed the connection without answering."
                ) from None
            break
        self._cancel_timer()
        self._respond(response)

    def _request_sent(self) -> None:
        """The whole request is with the app: its response head is due within the timeout."""
        if self._timer is None and not self.done and not self.responded:
            self._timer = self.proxy.clock.callLater(self.proxy.response_header_timeout, self._time_out)

    def _time_out(self) -> None:
        self._timer = None
        self.timed_out = True
        if self.conn is not None:
            self.conn.abort_connection()
        if self.upgrade_client is not None:
            self.upgrade_client.abort()

    def _cancel_timer(self) -> None:
        cancel(self._timer)
        self._timer = None

    def _respond(self, response: Any) -> None:  # an IResponse
        request = self.request
        self.responded = True
        self._cancel_timer()
        if self.browser_gone:
            self._abort_upstream()
            return
        request.setResponseCode(response.code, response.phrase or None)
        request.responseHeaders.removeHeader(b"server")
        request.defaultContentType = None  # the app's Content-Type or none, as it sent
        connection = self._parser.connHeaders.getRawHeaders(b"connection", []) if self._parser else []
        for name, values in appheaders.response_headers(response.headers.getAllRawHeaders(), connection):
            if name == b"Set-Cookie" and request.cookies:
                request.cookies.extend(values)  # cookies the router set ride along
                continue
            request.responseHeaders.setRawHeaders(name, values)
        no_body = request.method == b"HEAD" or response.code in NO_BODY_CODES or response.code < 200
        if no_body:
            self.done = True
            self.conn = None
            if self._body is not None:
                self._body.abandon()
            if self.upgrade_client is not None:
                self.upgrade_client.close()
            request.write(b"")
            request.finish()
            return
        if response.length is not UNKNOWN_LENGTH:
            request.setHeader(b"Content-Length", b"%d" % response.length)
        response.deliverBody(_ResponsePump(self))

    def response_ended(self, reason: Failure) -> None:
        self.done = True
        self.conn = None
        if self.upgrade_client is not None:
            self.upgrade_client.close()
        if self.browser_gone:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.request.finish()
            return
        log.info("app proxy: {app} failed mid-response: {why}", app=self.upstream.host_header,
                 why=reason.type.__name__ if reason.type else "?")
        self.request.loseConnection()

    def _error_page(self, status: int, title: str, detail: str) -> None:
        request = self.request
        if self.browser_gone or request.finished:
            return
        if request.startedWriting:
            request.loseConnection()
            return
        # Nothing of the app's (a crash may come after its headers were copied), but the
        # channel's own Connection: close stays.
        connection = request.responseHeaders.getRawHeaders(b"connection")
        request.responseHeaders = Headers()
        if connection:
            request.responseHeaders.setRawHeaders(b"Connection", connection)
        body = render_error_page(request, status, title, detail)
        request.write(body)
        request.finish()

    # --- websockets ---

    async def _upgrade(self) -> None:
        endpoint = await self._endpoint()
        client = UpgradeClient(self._target(), self._headers(websocket=True))
        await self._connected(connect_protocol(endpoint, lambda: client))
        self.proxy.stats.upstream_connections += 1
        if self.browser_gone:
            client.abort()
            return
        self.upgrade_client = client
        self._parser = client.parser
        self._request_sent()
        try:
            answer = await client.answer
        except Exception as e:
            self._cancel_timer()
            if self.browser_gone:
                return
            if self.timed_out:
                raise UpstreamUnavailable(
                    504, "The app took too long to respond",
                    f"The app did not answer within {self.proxy.response_header_timeout:g} seconds.",
                ) from None
            log.info("app proxy: {app} failed the websocket handshake: {why}",
                     app=self.upstream.host_header, why=type(e).__name__)
            raise UpstreamUnavailable(502, NOT_RESPONDING, "The app closed the connection without answering.") from None
        self._cancel_timer()
        if isinstance(answer, Switched):
            self._splice(client, answer)
        else:
            self._respond(answer)

    def _splice(self, client: UpgradeClient, switched: Switched) -> None:
        request = self.request
        self.done = True
        channel: Any = request.channel
        browser_transport = channel.transport
        if self.browser_gone or browser_transport is None:
            client.abort()
            return
        head = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for name, value in switched.headers:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"\r\n")
        browser_transport.writeSequence(head)
        splice = Splice(client, self.proxy)
        buffered = take_over(request, splice.browser)
        splice.start(switched.rest, buffered)


# --- request bodies --------------------------------------------------------------------------


@implementer(IBodyProducer)
class _StreamedBody:
    """A streamed request body as Twisted's HTTP client takes it."""

    def __init__(self, stream: RequestBodyStream, sent: Callable[[], None]) -> None:
        self.stream = stream
        self.length = stream.length if stream.length is not None else UNKNOWN_LENGTH
        self._sent = sent
        self._consumer: Any = None
        self._finished: defer.Deferred[None] | None = None

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        self._consumer = consumer
        self._finished = defer.Deferred()
        self.stream.start(self)
        return self._finished

    # BodySink
    def write(self, data: bytes) -> None:
        if self._consumer is not None:
            self._consumer.write(data)

    def end(self) -> None:
        self._consumer = None
        self._sent()
        if self._finished is not None and not self._finished.called:
            self._finished.callback(None)

    def abandon(self) -> None:
        self.stream.stop()
        self._consumer = None

    # IPushProducer: the app's connection is full / has room again.
    def pauseProducing(self) -> None:
        self.stream.pause()

    def resumeProducing(self) -> None:
        self.stream.resume()

    def stopProducing(self) -> None:
        self.abandon()


class _SentFileBody(FileBodyProducer):
    """A body twisted.web has already read whole; says when it has all been sent."""

    def __init__(self, content: Any, sent: Callable[[], None]) -> None:
        super().__init__(content)
        self._sent = sent

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        d: defer.Deferred[None] = super().startProducing(consumer)

        def sent(result: None) -> None:
            self._sent()
            return result

        return d.addCallback(sent)

    def abandon(self) -> None:
        pass


# --- response bodies -------------------------------------------------------------------------


@implementer(IPushProducer)
class _ResponsePump(protocol.Protocol):
    """The app's response body, written to the browser as it comes; the browser's flow
    control pauses the app's connection."""

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        self.proxy = exchange.proxy
        self.request = exchange.request
        self.paused = False
        self._queue: deque[bytes] = deque()
        self._upstream: Any = None

    def makeConnection(self, transport: Any) -> None:
        self._upstream = transport
        self.request.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        if self.exchange.browser_gone:
            return
        if self.paused or self._queue:
            self._queue.append(data)
            self.proxy._held(len(data))
            return
        self.request.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.exchange.browser_gone:
            while self._queue:  # what came after the pause: bounded by one read of the app
                data = self._queue.popleft()
                self.proxy._held(-len(data))
                self.request.write(data)
            self.request.unregisterProducer()
        else:
            self._drop_queue()
        self._upstream = None
        self.exchange.response_ended(reason)

    def _drop_queue(self) -> None:
        self.proxy._held(-sum(map(len, self._queue)))
        self._queue.clear()

    # IPushProducer, for the browser's connection
    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.proxy.stats.browser_pauses += 1
            if self._upstream is not None:
                self._upstream.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while self._queue and not self.paused and not self.exchange.browser_gone:
            data = self._queue.popleft()
            self.proxy._held(-len(data))
            self.request.write(data)
        if not self.paused and self._upstream is not None:
            self._upstream.resumeProducing()

    def stopProducing(self) -> None:
        self._drop_queue()
        self.exchange._abort_upstream()
