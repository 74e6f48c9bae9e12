"""The workspace-app proxy between real twisted.web servers on 127.0.0.1: keep-alive, streamed
bodies both ways, chunked and server-sent events, websockets, header rules, error pages."""

from __future__ import annotations

import json
import os
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from klein import Klein
from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

from coderstack.server import appheaders
from coderstack.server.appproxy import AppProxy, Upstream, UpstreamUnavailable
from coderstack.server.errorpage import render_error_page
from tests.support.tlscerts import make_ca_and_server_cert
from tests.support.waiting import wait_until

from .appproxysupport import FORWARDED, UPSTREAM, App, Front, RawClient, parse_head_response


async def started(testcase: Any, **options: Any) -> tuple[App, Front]:
    app = await App(testcase).start()
    front = await Front(testcase, app, **options).start()
    return app, front


def get(path: bytes, *headers: bytes, method: bytes = b"GET") -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: apps.example.com", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class KeepAliveTests(unittest.TestCase):
    async def test_requests_reuse_one_upstream_connection(self) -> None:
        app, front = await started(self)
        client = await front.client()
        for i in range(3):
            client.send(get(b"/n/%d" % i))
            resp = await client.response()
            self.assertEqual((resp.status, resp.body), (200, b"hello from /n/%d" % i))
        second = await front.client()  # another browser connection, the same app key
        second.send(get(b"/again"))
        self.assertEqual((await second.response()).status, 200)
        self.assertEqual(app.opened, 1)
        self.assertEqual(front.proxy.stats.upstream_connections, 1)
        self.assertEqual(front.proxy.pool.opened, 1)

    async def test_an_idle_connection_closes_after_the_idle_timeout(self) -> None:
        clock = task.Clock()
        app = await App(self).start()
        # The proxy's timers run on the clock; its connections are real.
        front = await Front(self, app, proxy=AppProxy(clock, idle_timeout=30.0)).start()
        client = await front.client()
        client.send(get(b"/"))
        await client.response()
        await wait_until(lambda: front.proxy.pool.idle_count(("app", "http")) == 1, "the connection parked")
        clock.advance(29.0)
        self.assertEqual(app.closed, 0)
        clock.advance(1.0)
        await wait_until(lambda: app.closed == 1, "the app to see its idle connection close")
        self.assertEqual(front.proxy.pool.idle_count(("app", "http")), 0)

    async def test_at_most_max_idle_connections_are_kept_per_key(self) -> None:
        app, front = await started(self, max_idle_per_key=2)
        held: list[server.Request] = []

        def hold(request: server.Request) -> Any:
            held.append(request)
            return server.NOT_DONE_YET

        app.handlers[b"/hold"] = hold
        clients = [await front.client() for _ in range(3)]
        for c in clients:
            c.send(get(b"/hold"))
        await wait_until(lambda: len(held) == 3, "three requests at the app at once")
        self.assertEqual(app.opened, 3)
        for r in held:
            r.write(b"done")
            r.finish()
        for c in clients:
            self.assertEqual((await c.response()).body, b"done")
        await wait_until(lambda: app.closed == 1, "the third idle connection to be closed")
        self.assertEqual(front.proxy.pool.idle_count(("app", "http")), 2)

    async def _stale_connection_app(self) -> tuple[list[list[bytes]], Any]:
        """An app whose first connection answers one request, then closes when the next one
        comes (as if its keep-alive timer had fired just then); later connections answer all."""
        connections: list[list[bytes]] = []

        class RawApp(protocol.Protocol):
            def connectionMade(self) -> None:
                self.heads: list[bytes] = []
                self.buf = b""
                connections.append(self.heads)

            def dataReceived(self, data: bytes) -> None:
                self.buf += data
                while b"\r\n\r\n" in self.buf:
                    head, self.buf = self.buf.split(b"\r\n\r\n", 1)
                    if b"content-length: 1" in head.lower():
                        self.buf = self.buf[1:]  # the one-byte body
                    self.heads.append(head)
                    if len(connections) == 1 and len(self.heads) == 2:
                        self.transport.loseConnection()
                        return
                    self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(RawApp))
        self.addCleanup(port.stopListening)
        front = await Front(self, None).start()

        async def connect() -> Any:
            return TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)

        front.connect = connect  # type: ignore[method-assign]
        return connections, front

    async def test_a_get_on_a_connection_the_app_just_closed_is_sent_again(self) -> None:
        connections, front = await self._stale_connection_app()
        client = await front.client()
        for path in (b"/1", b"/2"):
            client.send(get(path))
            resp = await client.response()
            self.assertEqual((resp.status, resp.body), (200, b"ok"))
        self.assertEqual(len(connections), 2)
        self.assertTrue(connections[0][1].startswith(b"GET /2 "))
        self.assertTrue(connections[1][0].startswith(b"GET /2 "))

    async def test_a_post_on_a_connection_the_app_just_closed_is_not(self) -> None:
        connections, front = await self._stale_connection_app()
        client = await front.client()
        client.send(get(b"/1"))
        await client.response()
        client.send(get(b"/2", b"Content-Length: 1", method=b"POST") + b"x")
        resp = await client.response()
        self.assertEqual(resp.status, 502)
        self.assertEqual(len(connections), 1)

    async def test_a_connection_the_app_closed_is_not_used_again(self) -> None:
        app, front = await started(self)
        client = await front.client()
        client.send(get(b"/one"))
        await client.response()
        await wait_until(lambda: front.proxy.pool.idle_count(("app", "http")) == 1, "the connection parked")
        app.channels[0].transport.loseConnection()  # the app's own keep-alive timeout
        await wait_until(lambda: front.proxy.pool.idle_count(("app", "http")) == 0, "the pool to forget it")
        client.send(get(b"/two"))
        resp = await client.response()
        self.assertEqual((resp.status, resp.body), (200, b"hello from /two"))
        self.assertEqual(app.opened, 2)


class StreamingTests(unittest.TestCase):
    async def test_an_upload_reaches_the_app_before_the_client_has_sent_it_all(self) -> None:
        app, front = await started(self)
        app.handlers[b"/upload"] = lambda r: b"got %d" % len(app.seen[-1].body)
        client = await front.client()
        client.send(b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nfirst\r\n")
        first = await app.first_chunk  # the rest has not been sent yet
        self.assertEqual(first, b"first")
        self.assertEqual(app.seen, [])  # the app has not had the whole body either
        client.send(b"7\r\n second\r\n0\r\n\r\n")
        resp = await client.response()
        self.assertEqual((resp.status, resp.body), (200, b"got 12"))
        self.assertEqual(app.seen[0].body, b"first second")

    async def test_an_app_may_answer_while_the_upload_goes_on(self) -> None:
        class DuplexApp(protocol.Protocol):
            """Answers at once, then echoes each body chunk as a response chunk."""

            buf = b""
            answered = False

            def dataReceived(self, data: bytes) -> None:
                self.buf += data
                if not self.answered:
                    if b"\r\n\r\n" not in self.buf:
                        return
                    self.buf = self.buf.split(b"\r\n\r\n", 1)[1]
                    self.answered = True
                    self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                while b"\r\n" in self.buf:
                    size_line, rest = self.buf.split(b"\r\n", 1)
                    size = int(size_line, 16)
                    if len(rest) < size + 2:
                        return
                    self.buf = rest[size + 2:]
                    self.transport.write(b"%x\r\n%s\r\n" % (size, rest[:size].upper()))
                    if size == 0:
                        return

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(DuplexApp))
        self.addCleanup(port.stopListening)
        front = await Front(self, None).start()

        async def connect() -> Any:
            return TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)

        front.connect = connect  # type: ignore[method-assign]
        client = await front.client()
        client.send(b"POST /duplex HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        head = await client.head()
        self.assertEqual(head.status, 200)
        await wait_until(lambda: b"HELLO" in client.data, "the echo of the first chunk, the upload unfinished")
        client.send(b"5\r\nworld\r\n0\r\n\r\n")
        await wait_until(lambda: client.data.endswith(b"0\r\n\r\n"), "the end of the response")
        self.assertIn(b"WORLD", client.data)

    async def test_an_app_refusing_an_upload_early_is_answered_and_the_rest_dropped(self) -> None:
        lost: list[bool] = []

        class Refuser(protocol.Protocol):
            answered = False

            def dataReceived(self, data: bytes) -> None:
                if self.answered:
                    return  # it reads on, without looking
                self.answered = True
                self.transport.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!")

            def connectionLost(self, reason: Any = None) -> None:
                lost.append(True)

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(Refuser))
        self.addCleanup(port.stopListening)
        front = await Front(self, None).start()

        async def connect() -> Any:
            return TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)

        front.connect = connect  # type: ignore[method-assign]
        client = await front.client()
        client.send(b"PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 100_000)
        resp = await client.response()
        self.assertEqual((resp.status, resp.body), (413, b"big!"))
        await client.lost  # the rest of the body cannot be told from a next request: closed
        await wait_until(lambda: lost, "the app connection to close")
        await wait_until(lambda: not front.proxy._exchanges, "the exchange to end")

    async def test_an_upload_with_a_length_keeps_it(self) -> None:
        app, front = await started(self)
        client = await front.client()
        body = b"x" * 200_000
        client.send(b"PUT /put HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:1000])
        await app.first_chunk
        client.send(body[1000:])
        resp = await client.response()
        self.assertEqual(resp.status, 200)
        self.assertEqual(app.seen[0].body, body)
        self.assertEqual(app.seen[0].header(b"content-length"), [b"200000"])

    async def test_a_slow_app_pauses_the_upload(self) -> None:
        app, front = await started(self)
        total = 64 * 1024 * 1024  # more than every socket buffer on the way can hold
        client = await front.client()
        client.send(b"PUT /put HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % total + b"a" * 65536)
        await app.first_chunk
        app_transport = app.channels[-1].transport
        app_transport.pauseProducing()  # the app stops reading
        client.send(b"b" * (total - 65536))
        stream = front.requests[0].body_stream
        await wait_until(lambda: stream.reading_paused, "the proxy to stop reading the upload")
        self.assertLess(stream.received, total)
        self.assertLess(stream.peak_queued, 1024 * 1024)
        app_transport.resumeProducing()
        resp = await client.response("the upload's response")
        self.assertEqual(resp.status, 200)
        self.assertEqual(len(app.seen[0].body), total)
        self.assertLess(stream.peak_queued, 1024 * 1024)

    async def test_a_large_download_streams_at_bounded_memory(self) -> None:
        app, front = await started(self)
        total = 100 * 1024 * 1024
        chunk = b"z" * 65536
        app_pauses: list[int] = []
        browser_buffers: list[int] = []  # the proxy's unsent bytes to the browser, when the app pauses

        class Source:
            def __init__(self, request: server.Request) -> None:
                self.request = request
                self.sent = 0
                self.paused = False

            def resumeProducing(self) -> None:
                self.paused = False
                while not self.paused and self.sent < total:
                    self.request.write(chunk)
                    self.sent += len(chunk)
                if self.sent >= total and not self.paused:
                    self.request.unregisterProducer()
                    self.request.finish()
                    self.sent = total + 1

            def pauseProducing(self) -> None:
                self.paused = True
                app_pauses.append(self.sent)
                browser_buffers.append(max(map(_write_buffered, front.wrapper.protocols), default=0))

            def stopProducing(self) -> None:
                self.paused = True

        def big(request: server.Request) -> Any:
            request.setHeader(b"Content-Length", b"%d" % total)
            source = Source(request)
            request.registerProducer(source, True)
            reactor.callLater(0, source.resumeProducing)
            return server.NOT_DONE_YET

        app.handlers[b"/big"] = big
        counted = Counter()
        ep = TCP4ClientEndpoint(reactor, "127.0.0.1", front.port.getHost().port)
        c = await ep.connect(protocol.Factory.forProtocol(lambda: counted))
        self.addCleanup(counted.close)
        c.transport.pauseProducing()  # a browser that does not read at first
        c.transport.write(get(b"/big"))
        await wait_until(lambda: front.proxy.stats.browser_pauses >= 1, "the proxy to stop writing to the browser")
        await wait_until(lambda: app_pauses, "the app to be paused through the proxy")
        c.transport.resumeProducing()
        await wait_until(lambda: counted.body_bytes() >= total, "100 MiB at the browser", timeout=120)
        self.assertEqual(counted.body_bytes(), total)
        # What the proxy held beyond the sockets' buffers stayed small, however big the body.
        self.assertLess(front.proxy.stats.peak_held_bytes, 1024 * 1024)
        self.assertLess(max(browser_buffers), 1024 * 1024)
        self.assertEqual(front.proxy.stats.held_bytes, 0)

    async def test_chunked_events_reach_the_browser_as_they_are_written(self) -> None:
        app, front = await started(self)
        release: defer.Deferred[None] = defer.Deferred()

        def events(request: server.Request) -> Any:
            request.setHeader(b"Content-Type", b"text/event-stream")
            request.setHeader(b"Cache-Control", b"no-cache")
            request.write(b"data: one\n\n")

            def second() -> None:
                request.write(b"data: two\n\n")
                reactor.callLater(0.05, third)

            def third() -> None:
                request.write(b"data: three\n\n")
                request.finish()

            release.addCallback(lambda _: reactor.callLater(0.05, second))
            return server.NOT_DONE_YET

        app.handlers[b"/events"] = events
        client = await front.client()
        client.send(get(b"/events", b"Accept: text/event-stream"))
        head = await client.head()
        self.assertEqual(head.header(b"content-type"), [b"text/event-stream"])
        self.assertEqual(head.header(b"transfer-encoding"), [b"chunked"])
        # The first event arrives while the app is still holding the second back.
        await wait_until(lambda: b"data: one\n\n" in client.data, "the first event")
        self.assertNotIn(b"two", client.data)
        release.callback(None)
        await wait_until(lambda: b"data: two\n\n" in client.data, "the second event")
        await wait_until(lambda: client.data.endswith(b"0\r\n\r\n"), "the end of the stream")
        self.assertLess(client.data.index(b"one"), client.data.index(b"two"))
        self.assertLess(client.data.index(b"two"), client.data.index(b"three"))


def _write_buffered(wrapper: Any) -> int:
    """What a connection's transport (Twisted's TCP) holds unsent, read from its buffers."""
    t = wrapper.transport
    return len(t.dataBuffer) - t.offset + t._tempDataLen


class Counter(RawClient):
    """Counts what arrives instead of keeping it."""

    def __init__(self) -> None:
        super().__init__()
        self.head = b""
        self.count = 0

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in self.head:
            self.head += data
            if b"\r\n\r\n" in self.head:
                head, rest = self.head.split(b"\r\n\r\n", 1)
                self.head = head + b"\r\n\r\n"
                self.count += len(rest)
            return
        self.count += len(data)

    def body_bytes(self) -> int:
        return self.count


class UpstreamTests(unittest.TestCase):
    async def test_an_https_app_with_a_self_signed_certificate(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        _, cert, key = make_ca_and_server_cert(directory)
        with open(cert, "rb") as f, open(key, "rb") as k:
            options = ssl.PrivateCertificate.loadPEM(f.read() + k.read()).options()
        app = await App(self).start(tls=options)
        upstream = Upstream(scheme="https", host_header="h", base_path="", default_query="")
        front = await Front(self, app, upstream=upstream).start()
        client = await front.client()
        for _ in range(2):
            client.send(get(b"/secure"))
            resp = await client.response()
            self.assertEqual((resp.status, resp.body), (200, b"hello from /secure"))
        self.assertEqual(app.opened, 1)

    async def test_behind_a_klein_route(self) -> None:
        # A Klein route hands the request on as a resource that returns NOT_DONE_YET (a route
        # returning NOT_DONE_YET itself would have Klein finish the request at once).
        app = await App(self).start()
        front = Front(self, app)
        klein = Klein()

        @klein.route("/@alice/ws/apps/code/", branch=True)
        def code(request: server.Request) -> Any:
            prefix = b"/@alice/ws/apps/code"
            return _ProxyLeaf(front, request.uri[len(prefix):])

        front.site.resource = klein.resource()
        await front.start()
        client = await front.client()
        client.send(b"POST /@alice/ws/apps/code/save?x=1 HTTP/1.1\r\nHost: a\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n")
        await app.first_chunk
        client.send(b"0\r\n\r\n")
        resp = await client.response()
        self.assertEqual((resp.status, resp.body), (200, b"hello from /save?x=1"))
        self.assertEqual(app.seen[0].body, b"body")

    async def test_close_ends_requests_in_flight_and_idle_connections(self) -> None:
        app, front = await started(self)
        held: list[server.Request] = []

        def hold(request: server.Request) -> Any:
            held.append(request)
            return server.NOT_DONE_YET

        app.handlers[b"/hold"] = hold
        busy = await front.client()
        busy.send(get(b"/hold"))
        await wait_until(lambda: held, "the held request at the app")
        idle = await front.client()
        idle.send(get(b"/"))  # a second app connection, parked once answered
        await idle.response()
        await wait_until(lambda: front.proxy.pool.idle_count(("app", "http")) == 1, "the connection parked")
        self.assertEqual(app.opened, 2)
        await front.proxy.close()
        await wait_until(lambda: app.closed == 2, "both app connections to close")
        await busy.lost


class _ProxyLeaf(Resource):
    isLeaf = True

    def __init__(self, front: Front, path: bytes) -> None:
        super().__init__()
        self.front = front
        self.path = path

    def render(self, request: server.Request) -> Any:
        f = self.front
        f.proxy.proxy(request, key=f.key, connect=f.connect, upstream=f.upstream, path=self.path,
                      forwarded=FORWARDED, strip_cookies=f.strip_cookies)
        return server.NOT_DONE_YET


class HeaderTests(unittest.TestCase):
    async def test_request_headers_the_app_sees(self) -> None:
        app, front = await started(self)
        client = await front.client()
        client.send(get(
            b"/p/q?x=1&coder_application_connect_api_key_35e783=secret&y=2",
            b"Cookie: coder_session_token=s3cret; theme=dark; coder_path_app_session_token=t0k; lang=en",
            b"Coder-Session-Token: s3cret",
            b"Connection: keep-alive, X-Hop",
            b"X-Hop: 1",
            b"Keep-Alive: timeout=5",
            b"Proxy-Authorization: Basic Zm9v",
            b"X-Forwarded-For: 198.51.100.1",
            b"X-Forwarded-Host: evil.example",
            b"X-Kept: yes",
            b"Upgrade: h2c",
            b"TE: trailers",
            b"Proxy-Connection: keep-alive",
        ))
        resp = await client.response()
        self.assertEqual(resp.status, 200)
        seen = app.seen[0]
        self.assertEqual(seen.uri, b"/p/q?x=1&y=2")
        self.assertEqual(seen.header(b"cookie"), [b"theme=dark; lang=en"])
        self.assertEqual(seen.header(b"coder-session-token"), [])
        for name in (b"x-hop", b"keep-alive", b"proxy-authorization", b"connection", b"upgrade",
                     b"te", b"proxy-connection"):
            self.assertEqual(seen.header(name), [], name)
        self.assertEqual(seen.header(b"host"), [UPSTREAM.host_header.encode()])
        self.assertEqual(seen.header(b"x-forwarded-for"), [b"203.0.113.7"])
        self.assertEqual(seen.header(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(seen.header(b"x-forwarded-host"), [b"apps.example.com"])
        self.assertEqual(seen.header(b"x-kept"), [b"yes"])

    async def test_a_cookie_header_of_only_stripped_cookies_goes(self) -> None:
        app, front = await started(self)
        client = await front.client()
        client.send(get(b"/", b"Cookie: coder_session_token=s3cret"))
        await client.response()
        self.assertEqual(app.seen[0].header(b"cookie"), [])

    async def test_base_path_and_default_query(self) -> None:
        app = await App(self).start()
        upstream = Upstream(scheme="http", host_header="h", base_path="/lab", default_query="token=abc")
        front = await Front(self, app, upstream=upstream).start()
        client = await front.client()
        for path in (b"/", b"/tree", b"/?a=b", b"/?coder_application_connect_api_key_35e783=k"):
            client.send(get(path))
            await client.response()
        self.assertEqual([s.uri for s in app.seen],
                         [b"/lab/?token=abc", b"/lab/tree", b"/lab/?a=b", b"/lab/?token=abc"])

    async def test_response_headers_the_browser_sees(self) -> None:
        app, front = await started(self)

        def cookies(request: server.Request) -> bytes:
            request.responseHeaders.addRawHeader(b"Set-Cookie", b"a=1; Path=/")
            request.responseHeaders.addRawHeader(b"Set-Cookie", b"b=2; HttpOnly")
            request.setHeader(b"Keep-Alive", b"timeout=5")
            request.setHeader(b"Proxy-Authenticate", b"Basic")
            request.setHeader(b"X-App", b"yes")
            request.setHeader(b"Connection", b"X-Named")
            request.setHeader(b"X-Named", b"hop")
            return b"ok"

        app.handlers[b"/cookies"] = cookies
        client = await front.client()
        client.send(get(b"/cookies"))
        resp = await client.response()
        self.assertEqual(resp.header(b"set-cookie"), [b"a=1; Path=/", b"b=2; HttpOnly"])
        self.assertEqual(resp.header(b"keep-alive"), [])
        self.assertEqual(resp.header(b"proxy-authenticate"), [])
        self.assertEqual(resp.header(b"x-app"), [b"yes"])
        self.assertEqual(resp.header(b"x-named"), [])
        self.assertEqual(resp.header(b"connection"), [])
        self.assertEqual(resp.header(b"content-length"), [b"2"])

    async def test_no_content_type_is_made_up(self) -> None:
        app, front = await started(self)
        app.handlers[b"/bare"] = lambda r: (setattr(r, "defaultContentType", None), b"raw")[1]
        client = await front.client()
        client.send(get(b"/bare"))
        resp = await client.response()
        self.assertEqual((resp.body, resp.header(b"content-type")), (b"raw", []))


class FramingTests(unittest.TestCase):
    async def test_a_close_delimited_response_is_rechunked_and_not_reused(self) -> None:
        opened: list[bool] = []

        class OldApp(protocol.Protocol):
            def connectionMade(self) -> None:
                opened.append(True)

            def dataReceived(self, data: bytes) -> None:
                if b"\r\n\r\n" in data:
                    self.transport.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
                    reactor.callLater(0.01, self.transport.write, b"the close")
                    reactor.callLater(0.02, self.transport.loseConnection)

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(OldApp))
        self.addCleanup(port.stopListening)
        front = await Front(self, None).start()

        async def connect() -> Any:
            return TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)

        front.connect = connect  # type: ignore[method-assign]
        client = await front.client()
        for _ in range(2):
            client.send(get(b"/"))
            resp = await client.response()
            self.assertEqual((resp.status, resp.body), (200, b"until the close"))
            self.assertEqual(resp.header(b"transfer-encoding"), [b"chunked"])
        self.assertEqual(len(opened), 2)

    async def test_an_http10_browser_gets_a_close_delimited_body(self) -> None:
        app, front = await started(self)
        app.handlers[b"/chunks"] = lambda r: (r.write(b"part one, "), b"part two")[1]
        client = await front.client()
        client.send(b"GET /chunks HTTP/1.0\r\nHost: a\r\n\r\n")
        await client.lost
        head, body = client.data.split(b"\r\n\r\n", 1)
        self.assertIn(b" 200 ", head.split(b"\r\n")[0])
        self.assertEqual(body, b"part one, part two")


class NoBodyTests(unittest.TestCase):
    async def test_head_204_and_304_have_no_body_and_keep_the_connection(self) -> None:
        app, front = await started(self)

        def status(code: int) -> Any:
            def handler(request: server.Request) -> bytes:
                request.setResponseCode(code)
                return b""
            return handler

        app.handlers[b"/204"] = status(204)
        app.handlers[b"/304"] = status(304)
        app.handlers[b"/head"] = lambda r: b"0123456789"
        client = await front.client()
        client.send(get(b"/head", method=b"HEAD"))
        resp = await wait_until(lambda: parse_head_response(client.data), "the HEAD response")
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.header(b"content-length"), [b"10"])
        client.data = b""
        for code in (204, 304):
            client.send(get(b"/%d" % code))
            resp = await client.response()
            self.assertEqual((resp.status, resp.body), (code, b""))
            self.assertEqual(resp.header(b"transfer-encoding"), [])
        client.send(get(b"/after"))
        resp = await client.response()
        self.assertEqual(resp.body, b"hello from /after")
        self.assertEqual(client.data, b"")  # nothing stray between the responses
        self.assertEqual(app.opened, 1)


class ErrorTests(unittest.TestCase):
    def assertErrorPage(self, resp: Any, status: int, text: bytes) -> None:
        self.assertEqual(resp.status, status)
        self.assertEqual(resp.header(b"content-type"), [b"text/html; charset=utf-8"])
        self.assertEqual(resp.header(b"cache-control"), [b"no-store"])
        self.assertTrue(resp.header(b"content-security-policy"))
        self.assertIn(text, resp.body)
        self.assertNotIn(b"Traceback", resp.body)
        self.assertNotIn(b"File \"", resp.body)

    async def test_a_refused_connection_is_a_502_page(self) -> None:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(protocol.Factory())
        closed = port.getHost().port
        await port.stopListening()
        front = await Front(self, None).start()

        async def connect() -> Any:
            return TCP4ClientEndpoint(reactor, "127.0.0.1", closed)

        front.connect = connect  # type: ignore[method-assign]
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        client = await front.client()
        client.send(get(b"/?coder_application_connect_api_key_35e783=k3y",
                        b"Cookie: coder_session_token=s3cret", b"Coder-Session-Token: s3cret"))
        self.assertErrorPage(await client.response(), 502, b"The app is not responding")
        logged = " ".join(formatEvent(e) + repr(e) for e in events)
        self.assertIn("refused", logged)  # the failure was logged...
        self.assertNotIn("s3cret", logged)  # ...without the secrets of the request
        self.assertNotIn("k3y", logged)

    async def test_upstream_unavailable_from_connect_is_its_page(self) -> None:
        front = await Front(self, None).start()

        async def connect() -> Any:
            raise UpstreamUnavailable(503, "Workspace <stopped>", "Start it & try again.")

        front.connect = connect  # type: ignore[method-assign]
        client = await front.client()
        client.send(get(b"/"))
        resp = await client.response()
        self.assertErrorPage(resp, 503, b"Workspace &lt;stopped&gt;")
        self.assertIn(b"Start it &amp; try again.", resp.body)

    async def test_an_app_that_does_not_answer_in_time_is_a_504(self) -> None:
        app, front = await started(self, response_header_timeout=0.2)
        gone: list[Any] = []

        def never(request: server.Request) -> Any:
            request.notifyFinish().addErrback(gone.append)
            return server.NOT_DONE_YET

        app.handlers[b"/slow"] = never
        client = await front.client()
        client.send(get(b"/slow"))
        self.assertErrorPage(await client.response(), 504, b"took too long")
        await wait_until(lambda: gone, "the app's connection to be dropped")

    async def test_an_app_that_drops_the_connection_before_answering_is_a_502(self) -> None:
        app, front = await started(self)

        def drop(request: server.Request) -> Any:
            request.channel.transport.abortConnection()
            return server.NOT_DONE_YET

        app.handlers[b"/drop"] = drop
        client = await front.client()
        client.send(get(b"/drop", method=b"POST") [:-2] + b"Content-Length: 3\r\n\r\nabc")
        self.assertErrorPage(await client.response(), 502, b"The app is not responding")

    async def _raw_app(self, answer: bytes) -> Front:
        """A front whose app answers every request with ``answer`` and then closes."""

        class Raw(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(answer)
                self.transport.loseConnection()

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(protocol.Factory.forProtocol(Raw))
        self.addCleanup(port.stopListening)
        front = await Front(self, None).start()

        async def connect() -> Any:
            return TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)

        front.connect = connect  # type: ignore[method-assign]
        return front

    async def test_an_answer_that_is_not_http_is_a_502(self) -> None:
        for answer in (b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
                       b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n"):
            front = await self._raw_app(answer)
            client = await front.client()
            client.send(get(b"/"))
            self.assertErrorPage(await client.response(), 502, b"The app is not responding")
            await wait_until(lambda f=front: not f.proxy._exchanges, "the exchange to end")

    async def test_a_fault_of_the_proxy_with_a_response_is_its_502_page(self) -> None:
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug")

        self.patch(appheaders, "response_header_pairs", broken)
        front = await self._raw_app(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        client = await front.client()
        client.send(get(b"/"))
        self.assertErrorPage(await client.response(), 502, b"The app is not responding")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        await wait_until(lambda: not front.proxy._exchanges, "the exchange to end")

    async def test_a_malformed_chunk_after_the_head_closes_the_browser_connection(self) -> None:
        front = await self._raw_app(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfine\r\nzz\r\n")
        client = await front.client()
        client.send(get(b"/"))
        await client.lost
        self.assertIn(b"200 OK", client.data)
        self.assertIn(b"fine", client.data)
        await wait_until(lambda: not front.proxy._exchanges, "the exchange to end")

    async def test_a_failure_after_the_response_started_closes_the_browser_connection(self) -> None:
        app, front = await started(self)

        def partial(request: server.Request) -> Any:
            request.setHeader(b"Content-Length", b"100")
            request.write(b"only part")
            reactor.callLater(0.01, request.channel.transport.abortConnection)
            return server.NOT_DONE_YET

        app.handlers[b"/partial"] = partial
        client = await front.client()
        client.send(get(b"/partial"))
        await client.lost
        self.assertIn(b"200 OK", client.data)
        self.assertTrue(client.data.endswith(b"only part"))

    async def test_a_browser_that_goes_away_aborts_the_app_connection(self) -> None:
        app, front = await started(self)
        gone: list[Any] = []
        arrived: list[server.Request] = []

        def hold(request: server.Request) -> Any:
            arrived.append(request)
            request.notifyFinish().addErrback(gone.append)
            return server.NOT_DONE_YET

        app.handlers[b"/hold"] = hold
        client = await front.client()
        client.send(get(b"/hold"))
        await wait_until(lambda: arrived, "the request at the app")
        await client.close()
        await wait_until(lambda: gone, "the app's connection to close")
        self.assertEqual(front.proxy.pool.idle_count(("app", "http")), 0)

    async def test_a_browser_that_leaves_mid_download_or_mid_upload_frees_the_app(self) -> None:
        app, front = await started(self)
        gone: list[bytes] = []

        def endless(request: server.Request) -> Any:
            loop = task.LoopingCall(request.write, b"tick\n")
            loop.start(0.01)
            request.notifyFinish().addErrback(lambda _: (loop.stop(), gone.append(request.path)))
            return server.NOT_DONE_YET

        app.handlers[b"/endless"] = endless
        download = await front.client()
        download.send(get(b"/endless"))
        await wait_until(lambda: b"tick" in download.data, "the download to start")
        await download.close()
        await wait_until(lambda: gone == [b"/endless"], "the app's download connection to close")

        upload = await front.client()
        upload.send(b"PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\nabc")
        await app.first_chunk
        self.assertEqual(app.opened, 2)
        await upload.close()
        await wait_until(lambda: app.closed == 2, "the app's upload connection to close")
        self.assertEqual(app.seen, [app.seen[0]])  # only the download was ever rendered

    async def test_a_browser_that_goes_away_while_connecting_cancels_the_connect(self) -> None:
        front = await Front(self, None).start()
        cancelled: list[bool] = []
        pending: defer.Deferred[Any] = defer.Deferred(lambda d: cancelled.append(True))
        asked: list[bool] = []

        async def connect() -> Any:
            asked.append(True)
            return await pending

        front.connect = connect  # type: ignore[method-assign]
        client = await front.client()
        client.send(get(b"/"))
        await wait_until(lambda: asked, "the proxy to ask for a connection")
        await client.close()
        await wait_until(lambda: cancelled, "the connect to be cancelled")
        await wait_until(lambda: not front.proxy._exchanges, "the exchange to end")

    def test_error_page_escapes_and_sets_headers(self) -> None:
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b""])
        body = render_error_page(request, 502, "<b>x</b>", "a & 'b'")
        self.assertEqual(request.responseCode, 502)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        self.assertEqual(request.responseHeaders.getRawHeaders(b"cache-control"), [b"no-store"])
        self.assertIn(b"default-src 'none'", request.responseHeaders.getRawHeaders(b"content-security-policy")[0])
        self.assertIn(b"&lt;b&gt;x&lt;/b&gt;", body)
        self.assertIn(b"a &amp; &#x27;b&#x27;", body)
        self.assertNotIn(b"<b>", body)
        self.assertNotIn(b"<script", body)


class EchoServer(WebSocketServerProtocol):
    def onConnect(self, request: Any) -> Any:
        return "echo" if "echo" in request.protocols else None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


class EchoClient(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.messages.append((payload, isBinary))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if not self.factory.closed.called:
            self.factory.closed.callback((wasClean, code))


class WebSocketTests(unittest.TestCase):
    async def test_echo_through_the_proxy(self) -> None:
        app = await App(self).start()
        ws_factory = WebSocketServerFactory()
        ws_factory.protocol = EchoServer
        ws = WebSocketResource(ws_factory)
        app.handlers[b"/ws"] = ws.render
        front = await Front(self, app).start()
        factory = WebSocketClientFactory(front.url.replace("http", "ws") + "/ws", protocols=["echo"])
        factory.protocol = EchoClient
        factory.opened, factory.closed, factory.messages = defer.Deferred(), defer.Deferred(), []
        await TCP4ClientEndpoint(reactor, "127.0.0.1", front.port.getHost().port).connect(factory)
        client = await factory.opened
        self.assertEqual(client.websocket_protocol_in_use, "echo")
        client.sendMessage("hé".encode(), isBinary=False)
        client.sendMessage(bytes(range(256)) * 300, isBinary=True)
        await wait_until(lambda: len(factory.messages) == 2, "both echoes")
        self.assertEqual(factory.messages, [("hé".encode(), False), (bytes(range(256)) * 300, True)])
        self.assertEqual(front.proxy.stats.websockets, 1)
        client.sendClose(1000)
        clean, code = await factory.closed
        self.assertTrue(clean)
        self.assertEqual(code, 1000)
        await wait_until(lambda: front.proxy.stats.websockets == 0, "the splice to close")

    async def test_headers_are_cased_and_bytes_spliced_raw(self) -> None:
        heads: list[bytes] = []

        class RawApp(protocol.Protocol):
            buf = b""
            switched = False

            def dataReceived(self, data: bytes) -> None:
                if self.switched:
                    self.transport.write(data.upper())
                    return
                self.buf += data
                if b"\r\n\r\n" in self.buf:
                    head, rest = self.buf.split(b"\r\n\r\n", 1)
                    heads.append(head)
                    self.switched = True
                    self.transport.write(
                        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
                        b"sec-websocket-accept: abc\r\nsec-websocket-protocol: chat\r\n\r\nhello")
                    if rest:
                        self.transport.write(rest.upper())

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(RawApp))
        self.addCleanup(port.stopListening)
        front = await Front(self, None).start()

        async def connect() -> Any:
            return TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)

        front.connect = connect  # type: ignore[method-assign]
        client = await front.client()
        client.send(get(b"/ws", b"Upgrade: websocket", b"Connection: Upgrade",
                        b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==", b"Sec-Websocket-Version: 13",
                        b"Cookie: coder_session_token=s; a=b") + b"early bytes")
        head = await client.head()
        self.assertEqual(head.status, 101)
        names = [n for n, _ in head.headers]
        self.assertIn(b"Sec-WebSocket-Accept", names)
        self.assertIn(b"Sec-WebSocket-Protocol", names)
        self.assertEqual(head.header(b"upgrade"), [b"websocket"])
        await wait_until(lambda: client.data == b"helloEARLY BYTES", "the app's first bytes and the echo")
        client.data = b""
        client.send(b"\x81\x05spliced")
        await wait_until(lambda: client.data == b"\x81\x05SPLICED", "raw bytes both ways")
        app_head = heads[0]
        self.assertIn(b"\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", app_head)
        self.assertIn(b"\r\nSec-WebSocket-Version: 13", app_head)
        self.assertIn(b"\r\nUpgrade: websocket", app_head)
        self.assertIn(b"\r\nConnection: Upgrade", app_head)
        self.assertIn(b"\r\nCookie: a=b", app_head)
        self.assertNotIn(b"coder_session_token", app_head)
        await client.close()
        await wait_until(lambda: front.proxy.stats.websockets == 0, "the splice to close")

    async def test_a_slow_browser_pauses_the_app_through_the_splice(self) -> None:
        total = 32 * 1024 * 1024
        app_paused: list[int] = []

        @implementer(IPushProducer)
        class Firehose(protocol.Protocol):
            sent = 0
            paused = True

            def dataReceived(self, data: bytes) -> None:
                if self.sent == 0 and b"\r\n\r\n" in data:
                    self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                         b"Connection: Upgrade\r\n\r\n")
                    self.transport.registerProducer(self, True)
                    self.resumeProducing()

            def resumeProducing(self) -> None:
                self.paused = False
                while not self.paused and self.sent < total:
                    self.transport.write(b"w" * 65536)
                    self.sent += 65536

            def pauseProducing(self) -> None:
                self.paused = True
                app_paused.append(self.sent)

            def stopProducing(self) -> None:
                self.paused = True

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(Firehose))
        self.addCleanup(port.stopListening)
        front = await Front(self, None).start()

        async def connect() -> Any:
            return TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)

        front.connect = connect  # type: ignore[method-assign]
        counted = Counter()
        ep = TCP4ClientEndpoint(reactor, "127.0.0.1", front.port.getHost().port)
        await ep.connect(protocol.Factory.forProtocol(lambda: counted))
        self.addCleanup(counted.close)
        counted.transport.pauseProducing()  # the browser does not read
        counted.transport.write(get(b"/ws", b"Upgrade: websocket", b"Connection: Upgrade"))
        # The app is held back by the proxy's full connection to the browser (not by its own
        # socket alone): its writes stop well before the whole stream has gone.
        await wait_until(lambda: app_paused and front.proxy.stats.websockets == 1, "the app to be paused")
        await wait_until(lambda: max(map(_write_buffered, front.wrapper.protocols)) > 0,
                         "the proxy's buffer to the browser to fill")
        self.assertLess(max(map(_write_buffered, front.wrapper.protocols)), 1024 * 1024)
        self.assertLess(app_paused[0], total)
        counted.transport.resumeProducing()
        await wait_until(lambda: counted.body_bytes() >= total, "the whole stream at the browser", timeout=60)
        self.assertEqual(counted.body_bytes(), total)

    async def test_a_refused_upgrade_is_an_ordinary_response(self) -> None:
        app, front = await started(self)

        def refuse(request: server.Request) -> bytes:
            request.setResponseCode(403)
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps({"message": "no"}).encode()

        app.handlers[b"/ws"] = refuse
        client = await front.client()
        client.send(get(b"/ws", b"Upgrade: websocket", b"Connection: Upgrade",
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Sec-WebSocket-Version: 13"))
        resp = await client.response()
        self.assertEqual(resp.status, 403)
        self.assertEqual(json.loads(resp.body), {"message": "no"})
        self.assertEqual(app.seen[0].header(b"upgrade"), [b"websocket"])
        await wait_until(lambda: app.closed == 1, "the handshake's connection to close")
