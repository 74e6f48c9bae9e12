"""An app and a proxy in front of it, both real twisted.web servers on 127.0.0.1 port 0, and a
raw TCP client: the pieces of the app proxy's tests.

- :class:`App`: a Site whose handlers are plain functions by path; it records every request
  (method, target, raw headers, body) and counts its connections; its request type fires
  :attr:`App.first_chunk` when a body's first bytes arrive, before the body is complete.
- :class:`Front`: the server's Site class (QuietSite), whose every request is proxied to the app by an
  :class:`AppProxy`, with request bodies streamed.
- :class:`RawClient`: bytes in, bytes out, for the framing and header tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.protocols.policies import WrappingFactory
from twisted.web import server
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource

from coderstack.server.appproxy import AppProxy, Forwarded, Upstream
from coderstack.server.service import QuietSite
from coderstack.server.streamingrequest import stream_claimed_bodies
from tests.support.waiting import wait_until

FORWARDED = Forwarded(for_="203.0.113.7", proto="https", host="apps.example.com")
UPSTREAM = Upstream(scheme="http", host_header="app--ws--alice.apps.example.com", base_path="", default_query="")


@dataclass
class Seen:
    method: bytes
    uri: bytes
    headers: list[tuple[bytes, list[bytes]]]
    body: bytes = b""
    request: Any = field(default=None, repr=False)

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, vs in self.headers if n.lower() == name.lower() for v in vs]


class _AppRequest(server.Request):
    app: App

    def handleContentChunk(self, data: bytes) -> None:
        super().handleContentChunk(data)
        first = self.app.first_chunk
        if not first.called:
            first.callback(data)


class _AppChannel(HTTPChannel):
    app: App

    def connectionMade(self) -> None:
        self.app.opened += 1
        self.app.channels.append(self)
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        self.app.closed += 1
        super().connectionLost(reason)


Handler = Callable[[server.Request], Any]


class _AppResource(Resource):
    isLeaf = True

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app

    def render(self, request: server.Request) -> Any:
        body = request.content.read() if request.content is not None else b""
        self.app.seen.append(Seen(request.method, request.uri,
                                  [(n, list(v)) for n, v in request.requestHeaders.getAllRawHeaders()],
                                  body, request))
        handler = self.app.handlers.get(request.path, self.app.default)
        return handler(request)


class App:
    def __init__(self, testcase: Any) -> None:
        self.testcase = testcase
        self.handlers: dict[bytes, Handler] = {}
        self.seen: list[Seen] = []
        self.opened = 0
        self.closed = 0
        self.channels: list[HTTPChannel] = []
        self.first_chunk: defer.Deferred[bytes] = defer.Deferred()
        app = self
        site = server.Site(_AppResource(self))
        site.requestFactory = type("AppRequest", (_AppRequest,), {"app": app})
        site.protocol = type("AppChannel", (_AppChannel,), {"app": app})  # type: ignore[assignment]
        self.site = site
        self.port: Any = None

    def default(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain")
        return b"hello from " + request.uri

    async def start(self, tls: Any = None) -> App:
        """Listen on 127.0.0.1 (with TLS when ``tls`` gives server context options)."""
        self.wrapper = WrappingFactory(self.site)
        if tls is None:
            endpoint: Any = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        else:
            endpoint = SSL4ServerEndpoint(reactor, 0, tls, interface="127.0.0.1")
        self.port = await endpoint.listen(self.wrapper)
        self.testcase.addCleanup(self.stop)
        return self

    async def stop(self) -> None:
        await self.port.stopListening()
        for p in list(self.wrapper.protocols):
            p.transport.abortConnection()
        await wait_until(lambda: not self.wrapper.protocols, "the app's connections to close")

    def endpoint(self) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)


class _FrontResource(Resource):
    isLeaf = True

    def __init__(self, front: Front) -> None:
        super().__init__()
        self.front = front

    def render(self, request: server.Request) -> Any:
        f = self.front
        f.requests.append(request)
        f.proxy.proxy(request, key=f.key, connect=f.connect, upstream=f.upstream, path=request.uri,
                      forwarded=FORWARDED, strip_cookies=f.strip_cookies)
        return server.NOT_DONE_YET


class Front:
    def __init__(self, testcase: Any, app: App | None, *, proxy: AppProxy | None = None,
                 upstream: Upstream = UPSTREAM, **proxy_options: Any) -> None:
        self.testcase = testcase
        self.app = app
        self.proxy = proxy or AppProxy(reactor, **proxy_options)
        self.upstream = upstream
        self.key: Any = "app"
        self.strip_cookies = frozenset({"coder_session_token", "coder_path_app_session_token"})
        self.requests: list[server.Request] = []
        self.site = QuietSite(_FrontResource(self))  # the server's own Site class
        stream_claimed_bodies(self.site, lambda host, path: True)
        self.port: Any = None

    async def connect(self) -> Any:
        assert self.app is not None
        return self.app.endpoint()

    async def start(self) -> Front:
        self.wrapper = WrappingFactory(self.site)
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.wrapper)
        self.testcase.addCleanup(self.stop)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    async def stop(self) -> None:
        await self.port.stopListening()
        await self.proxy.close()
        for p in list(self.wrapper.protocols):
            p.transport.abortConnection()
        await wait_until(lambda: not self.wrapper.protocols, "the proxy's browser connections to close")

    async def client(self) -> RawClient:
        ep = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        c: RawClient = await connectProtocol(ep, RawClient())
        self.testcase.addCleanup(c.close)
        return c


class RawClient(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.closed = False
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        self.lost.callback(None)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def close(self) -> None:
        if not self.closed:
            self.transport.abortConnection()  # type: ignore[union-attr]
            await self.lost

    async def response(self, what: str = "a response") -> Response:
        """Wait for one whole response (Content-Length or chunked) and take it off the data."""
        parsed = await wait_until(lambda: _parse_one(self.data), what)
        resp, used = parsed
        self.data = self.data[used:]
        return resp

    async def head(self, what: str = "a response head") -> Response:
        """Wait for a response head (the body stays in ``data``)."""
        await wait_until(lambda: b"\r\n\r\n" in self.data, what)
        head, self.data = self.data.split(b"\r\n\r\n", 1)
        return _head(head)


@dataclass
class Response:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]  # raw names, in order
    body: bytes = b""

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


def _head(head: bytes) -> Response:
    lines = head.split(b"\r\n")
    _, status, reason = (lines[0].split(b" ", 2) + [b""])[:3]
    headers = []
    for line in lines[1:]:
        name, value = line.split(b":", 1)
        headers.append((name, value.strip()))
    return Response(int(status), reason, headers)


def _parse_one(data: bytes, no_body: bool = False) -> tuple[Response, int] | None:
    if b"\r\n\r\n" not in data:
        return None
    head, rest = data.split(b"\r\n\r\n", 1)
    resp = _head(head)
    used = len(head) + 4
    if no_body or resp.status in (204, 304) or resp.status < 200:
        return resp, used
    if [v for v in resp.header(b"transfer-encoding") if v.lower() == b"chunked"]:
        body = b""
        pos = 0
        while True:
            end = rest.find(b"\r\n", pos)
            if end < 0:
                return None
            size = int(rest[pos:end].split(b";")[0], 16)
            if size == 0:
                if rest[end + 2:end + 4] != b"\r\n":
                    return None
                resp.body = body
                return resp, used + end + 4
            if len(rest) < end + 2 + size + 2:
                return None
            body += rest[end + 2:end + 2 + size]
            pos = end + 2 + size + 2
    lengths = resp.header(b"content-length")
    if lengths:
        n = int(lengths[0])
        if len(rest) < n:
            return None
        resp.body = rest[:n]
        return resp, used + n
    return None  # close-delimited: the caller waits for the close


def parse_head_response(data: bytes) -> Response | None:
    """A response to HEAD: its head only, whatever Content-Length says."""
    parsed = _parse_one(data, no_body=True)
    return parsed[0] if parsed else None
