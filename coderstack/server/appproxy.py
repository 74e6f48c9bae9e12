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
  response may begin before the request body has all been sent;
- websocket handshakes go to the app on a connection of their own
  (:mod:`coderstack.server.appwebsocket`); on ``101`` the browser's connection is taken away from
  HTTP (:mod:`coderstack.httptakeover`) and bytes are spliced both ways; any other answer is
  proxied as a normal response;
- headers as :mod:`coderstack.server.appheaders` says;
- failures before a response are an HTML page (:mod:`coderstack.server.errorpage`): the router's
  :class:`UpstreamUnavailable`, ``502`` when the app refuses or drops the connection, ``504`` when
  no response head comes within ``response_header_timeout`` seconds of the request being sent;
  a response that is not HTTP (:class:`~coderstack.server.responsereader.MalformedResponse`) is
  a ``502`` too. After the response has started, a failure closes the browser's connection (the
  browser sees a truncated response, not a wrong one). A browser that goes away aborts the app
  connection.

The app's side is a connection of our own (:mod:`coderstack.server.upstreamconn`, reading with
:mod:`coderstack.server.responsereader`) rather than Twisted's HTTP client: the proxy needs only
one request at a time on a connection, its response delivered as it arrives with the connection
exposed for pausing, and the head as soon as it is in (even while the request body still goes
out); without the client's Deferreds, Response objects and header copies the server spends
about a fifth less CPU on a proxied request (measured with bench/bench_apps.py's page). A
request whose app connection is parked goes out without a coroutine: only connecting waits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface import implementer

from coderstack.httptakeover import take_over
from coderstack.server import appheaders
from coderstack.server.appwebsocket import Splice, Switched, UpgradeClient
from coderstack.server.errorpage import render_error_page
from coderstack.server.responsereader import ResponseHead
from coderstack.server.streamingrequest import StreamingRequest
from coderstack.server.upstreamconn import BodySink, BodySource, UpstreamConnection
from coderstack.server.upstreampool import UpstreamPool, app_endpoint, connect_protocol
from coderstack.twistedtypes import Clock, DelayedCall, cancel

log = Logger()

#: Seconds from the request being sent to the app's response head, by default.
RESPONSE_HEADER_TIMEOUT = 60.0

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
        try:
            exchange.start()
        except Exception:
            exchange.crashed(Failure())

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


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def is_websocket_upgrade(request: Request) -> bool:
    upgrade = request.requestHeaders.getRawHeaders(b"upgrade") or []
    return request.method == b"GET" and any(
        t.strip().lower() == b"websocket" for v in upgrade for t in v.split(b",")
    )




class _Exchange:
    """One browser request and its way to the app and back (an
    :class:`~coderstack.server.upstreamconn.Exchange` for its app connection)."""

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
        self.over = False  # nothing more to do for the browser either
        self.timed_out = False
        self.responded = False  # the app's response head is in
        self.conn: UpstreamConnection | None = None
        self.upgrade_client: UpgradeClient | None = None
        self._pending: defer.Deferred[Any] | None = None  # connecting, cancelled on abort
        self._timer: DelayedCall | None = None
        self._source: BodySource | None = None
        self._head = b""  # the request head, as sent (again, on a retry)
        self._reused = False
        self._retried = False
        self._pump: _ResponsePump | None = None
        request.notifyFinish().addErrback(self._browser_lost)

    # --- the whole exchange ---

    def start(self) -> None:
        if self.browser_gone:
            self._over()
            return
        if is_websocket_upgrade(self.request):
            self._run(self._upgrade())
            return
        try:
            self._source = self._body_source()
            self._head = self._request_head()
        except UpstreamUnavailable as e:
            self._error_page(e.status, e.title, e.detail)
            return
        conn = self.proxy.pool.take(self.key)
        if conn is not None:
            self._send(conn, reused=True)
        else:
            self._run(self._connect_and_send())

    def _run(self, steps: Coroutine[Any, Any, None]) -> None:
        defer.Deferred.fromCoroutine(self._guarded(steps)).addErrback(self.crashed)

    async def _guarded(self, steps: Coroutine[Any, Any, None]) -> None:
        try:
            await steps
        except UpstreamUnavailable as e:
            self._error_page(e.status, e.title, e.detail)
        except defer.CancelledError:
            if not self.browser_gone:
                raise
            self._over()

    def crashed(self, failure: Failure) -> None:
        log.failure("app proxy: unexpected failure serving {app}", failure, app=self.upstream.host_header)
        self._abort_upstream()
        try:
            self._error_page(502, NOT_RESPONDING, "The server could not pass this request to the app.")
        except Exception:
            log.failure("app proxy: could not answer after a failure")
        self._over()

    def abort(self) -> None:
        """Stop at once: the browser's connection and the app's close."""
        self._abort_upstream()
        channel = self.request.channel
        if not self.browser_gone and not self.request.finished and channel is not None \
                and channel.transport is not None:
            self.request.loseConnection()
        self._over()

    def _over(self) -> None:
        if not self.over:
            self.over = True
            self._cancel_timer()
            self.proxy._exchanges.discard(self)

    def _browser_lost(self, failure: Failure) -> None:
        self.browser_gone = True
        self._abort_upstream()
        self._over()

    def _abort_upstream(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        if self._source is not None:
            self._source.stop()
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

    def _request_head(self) -> bytes:
        method = self.request.method
        if not appheaders.is_token(method):
            raise UpstreamUnavailable(400, "Bad request", "The request's method is not one HTTP knows.")
        parts = [method, b" ", self._target(), b" HTTP/1.1\r\n"]
        source = self._source
        if source is not None:
            parts.append(b"Transfer-Encoding: chunked\r\n" if source.length is None
                         else b"Content-Length: %d\r\n" % source.length)
        elif method == b"POST" or method == b"PUT":
            parts.append(b"Content-Length: 0\r\n")  # a body-bearing method says it has none
        for name, value in self._headers(websocket=False):
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _body_source(self) -> BodySource | None:
        request = self.request
        stream = request.body_stream if isinstance(request, StreamingRequest) else None
        if stream is not None:
            return stream
        headers = request.requestHeaders
        if not (headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding")):
            return None
        content: Any = request.content
        if content is None:
            return None
        return _FileBody(content)

    async def _connect_and_send(self) -> None:
        endpoint = await self._endpoint()
        conn = await self._connected(self.proxy.pool.open(self.key, endpoint))
        self.proxy.stats.upstream_connections += 1
        if self.browser_gone:
            conn.abort_connection()
            self._over()
            return
        self._send(conn, reused=False)

    def _send(self, conn: UpstreamConnection, reused: bool) -> None:
        self._reused = reused
        self.conn = conn
        conn.send(self, self._head, self.request.method, self._source)

    # Exchange: what the app's connection tells
    def request_sent(self) -> None:
        """The whole request is with the app: its response head is due within the timeout."""
        if self._timer is None and not self.done and not self.responded:
            self._timer = self.proxy.clock.callLater(self.proxy.response_header_timeout, self._time_out)

    # (A fault of ours in these is the crash page, not an exception into the connection.)
    def response_head(self, head: ResponseHead) -> None:
        try:
            self._respond(head)
        except Exception:
            self.crashed(Failure())

    def response_body(self, data: bytes) -> None:
        if self._pump is not None:
            try:
                self._pump.data(data)
            except Exception:
                self.crashed(Failure())

    def response_end(self) -> None:
        try:
            self._response_over(None)
        except Exception:
            self.crashed(Failure())

    def response_failed(self, why: str, retryable: bool) -> None:
        try:
            self._response_failed(why, retryable)
        except Exception:
            self.crashed(Failure())

    def _response_failed(self, why: str, retryable: bool) -> None:
        if self.responded:
            self._response_over(why)
            return
        self.conn = None
        self._cancel_timer()
        if self.done or self.browser_gone:
            self._over()
            return
        if self.timed_out:
            self._error_page(504, "The app took too long to respond",
                             f"The app did not answer within {self.proxy.response_header_timeout:g} seconds.")
            return
        if retryable and self._reused and not self._retried and self._source is None \
                and self.request.method in _IDEMPOTENT:
            self._retried = True  # the app closed the kept-alive connection as we sent on it
            self._run(self._connect_and_send())  # on a new one: the parked ones may have closed too
            return
        log.info("app proxy: {app} failed before responding: {why}", app=self.upstream.host_header, why=why)
        self._error_page(502, NOT_RESPONDING, "The app closed the connection without answering.")

    def _time_out(self) -> None:
        self._timer = None
        self.timed_out = True
        if self.conn is not None:
            self.conn.abort_connection()
        if self.upgrade_client is not None:
            self.upgrade_client.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            cancel(self._timer)
            self._timer = None

    def _respond(self, head: ResponseHead) -> None:
        request = self.request
        self.responded = True
        self._cancel_timer()
        if self.browser_gone:
            self._abort_upstream()
            return
        request.setResponseCode(head.code, head.phrase or None)
        request.responseHeaders.removeHeader(b"server")
        request.defaultContentType = None  # the app's Content-Type or none, as it sent
        head_request = request.method == b"HEAD"
        passed = appheaders.response_header_pairs(head.headers, head.connection, keep_length=head_request)
        for name, values in passed.items():
            if name == b"Set-Cookie" and request.cookies:
                request.cookies.extend(values)  # cookies the router set ride along
                continue
            request.responseHeaders.setRawHeaders(name, values)
        if head_request or head.code in NO_BODY_CODES or head.code < 200:
            self.done = True
            self.conn = None
            if self.upgrade_client is not None:
                self.upgrade_client.close()
            request.write(b"")
            request.finish()
            self._over()
            return
        if head.length is not None:
            request.setHeader(b"Content-Length", b"%d" % head.length)
        upstream: Any = self.conn if self.conn is not None else self.upgrade_client
        self._pump = _ResponsePump(self, upstream)

    def _response_over(self, failed: str | None) -> None:
        self.done = True
        self.conn = None
        if self.upgrade_client is not None:
            self.upgrade_client.close()
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.flush()
            if not self.browser_gone:
                if failed is None:
                    self.request.finish()
                else:
                    log.info("app proxy: {app} failed mid-response: {why}", app=self.upstream.host_header,
                             why=failed)
                    self.request.loseConnection()
        self._over()

    def _error_page(self, status: int, title: str, detail: str) -> None:
        request = self.request
        self._over()
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
        client = UpgradeClient(self._target(), self._headers(websocket=True), self)
        await self._connected(connect_protocol(endpoint, lambda: client))
        self.proxy.stats.upstream_connections += 1
        if self.browser_gone:
            client.abort()
            self._over()
            return
        self.upgrade_client = client
        self.request_sent()

    def switched(self, switched: Switched) -> None:
        """The app's ``101``: the browser's connection joins the app's."""
        client = self.upgrade_client
        self.responded = True
        self._cancel_timer()
        if client is not None:
            self._splice(client, switched)
        self._over()

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


class _FileBody:
    """A request body twisted.web has already read whole (a file), as a
    :class:`~coderstack.server.upstreamconn.BodySource`: read and written a piece at a time
    while the app's connection takes it."""

    PIECE = 64 * 1024

    def __init__(self, content: Any) -> None:
        content.seek(0, 2)
        self.length: int | None = content.tell()
        content.seek(0, 0)
        self._content = content
        self._sink: BodySink | None = None
        self._paused = False
        self._writing = False

    def start(self, sink: BodySink) -> None:
        self._sink = sink
        self._write()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._write()

    def stop(self) -> None:
        self._sink = None

    def _write(self) -> None:
        if self._writing:
            return
        self._writing = True
        try:
            while self._sink is not None and not self._paused:
                piece = self._content.read(self.PIECE)
                if not piece:
                    sink, self._sink = self._sink, None
                    sink.end()
                    return
                self._sink.write(piece)
        finally:
            self._writing = False


# --- response bodies -------------------------------------------------------------------------


@implementer(IPushProducer)
class _ResponsePump:
    """The app's response body, written to the browser as it comes; the browser's flow
    control pauses the app's connection (``upstream``: its pause_reading and resume_reading)."""

    def __init__(self, exchange: _Exchange, upstream: Any) -> None:
        self.exchange = exchange
        self.proxy = exchange.proxy
        self.request = exchange.request
        self.paused = False
        self._queue: deque[bytes] = deque()
        self._upstream = upstream
        self.request.registerProducer(self, True)

    def data(self, data: bytes) -> None:
        if self.exchange.browser_gone:
            return
        if self.paused or self._queue:
            self._queue.append(data)
            self.proxy._held(len(data))
            return
        self.request.write(data)

    def flush(self) -> None:
        """The response is over: what is queued goes (bounded by one read of the app)."""
        self._upstream = None
        if not self.exchange.browser_gone:
            while self._queue:
                data = self._queue.popleft()
                self.proxy._held(-len(data))
                self.request.write(data)
            self.request.unregisterProducer()
        else:
            self._drop_queue()

    def _drop_queue(self) -> None:
        if self._queue:
            self.proxy._held(-sum(map(len, self._queue)))
            self._queue.clear()

    # IPushProducer, for the browser's connection
    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.proxy.stats.browser_pauses += 1
            if self._upstream is not None:
                self._upstream.pause_reading()

    def resumeProducing(self) -> None:
        self.paused = False
        while self._queue and not self.paused and not self.exchange.browser_gone:
            data = self._queue.popleft()
            self.proxy._held(-len(data))
            self.request.write(data)
        if not self.paused and self._upstream is not None:
            self._upstream.resume_reading()

    def stopProducing(self) -> None:
        self._drop_queue()
        self.exchange._abort_upstream()
