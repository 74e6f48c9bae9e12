"""The websocket leg of the workspace-app proxy: the handshake to the app and the splice after it.

The handshake goes to the app on a connection of its own (:class:`UpgradeClient`): the request
head as the proxy built it (``Sec-WebSocket-*`` in their registered casing), then the answer read
by Twisted's response parser, which would skip a ``101`` as informational; :class:`UpgradeParser`
stops there instead and hands over the ``101``'s headers and whatever the app sent right behind
it (:class:`Switched`). Any other answer is an ordinary Twisted ``Response``, and the connection
closes after it.

After a ``101`` a :class:`Splice` joins the browser's connection (taken away from HTTP) and the
app's: bytes both ways unchanged, each side's transport registered as the other's producer so a
full write buffer on one side pauses reading on the other, and one side closing closes the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer, protocol
from twisted.python.failure import Failure
from twisted.web._newclient import DONE, HTTPClientParser, TransportProxyProducer
from twisted.web.client import Request as ClientRequest
from twisted.web.http_headers import Headers

from coderstack.server import appheaders


class SpliceRegistry(Protocol):
    """Who keeps count of the open splices (the proxy, to close them when it stops)."""

    def opened(self, splice: Splice) -> None: ...

    def closed(self, splice: Splice) -> None: ...


@dataclass
class Switched:
    headers: list[appheaders.Header]  # for the browser's 101
    rest: bytes  # what the app sent right behind its 101


class UpgradeParser(HTTPClientParser):
    """Twisted's response parser, stopping at a ``101`` head (which it would skip)."""

    def __init__(self, request: ClientRequest, finisher: Callable[[bytes], None],
                 switched: Callable[[Switched], None]) -> None:
        super().__init__(request, finisher)
        self._on_switched = switched

    def allHeadersReceived(self) -> None:
        if self.response.code != 101:
            super().allHeadersReceived()
            return
        headers: list[appheaders.Header] = []
        connection = self.connHeaders.getRawHeaders(b"connection", [])
        for name, values in appheaders.response_headers(self.headers.getAllRawHeaders(), connection):
            headers.extend((name, v) for v in values)
        upgrade = self.connHeaders.getRawHeaders(b"upgrade") or [b"websocket"]
        headers[:0] = [(b"Upgrade", upgrade[0]), (b"Connection", b"Upgrade")]
        self.state = DONE
        rest = self.clearLineBuffer()
        self._on_switched(Switched(headers, rest))


class UpgradeClient(protocol.Protocol):
    """The app's end of a websocket handshake: the request head, then the answer (a
    :class:`Switched`, or a Twisted ``Response`` for anything else), then, once spliced, raw
    bytes."""

    def __init__(self, target: bytes, headers: list[appheaders.Header]) -> None:
        self.target = target
        self.headers = headers
        self.answer: defer.Deferred[Any] = defer.Deferred()
        self.splice: Splice | None = None
        self.gone = False
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._parser: UpgradeParser | None = None
        self.parser: UpgradeParser | None = None  # kept after the answer, for its headers

    def connectionMade(self) -> None:
        lines = [b"GET " + self.target + b" HTTP/1.1\r\n"]
        lines.extend(name + b": " + value + b"\r\n" for name, value in self.headers)
        lines.append(b"\r\n")
        transport: Any = self.transport
        transport.writeSequence(lines)
        parser = self._parser = self.parser = UpgradeParser(
            ClientRequest(b"GET", self.target, Headers(), None, persistent=False),
            self._finished, self._switched,
        )
        parser.makeConnection(TransportProxyProducer(transport))
        parser._responseDeferred.addCallbacks(self._answered, self._failed)

    def _answered(self, response: Any) -> None:
        if not self.answer.called:
            self.answer.callback(response)

    def _failed(self, failure: Failure) -> None:
        if not self.answer.called:
            self.answer.errback(failure)

    def _switched(self, switched: Switched) -> None:
        self._parser = None
        self.answer.callback(switched)

    def _finished(self, rest: bytes) -> None:
        self.close()  # a non-101 answer: this connection is not reused

    def dataReceived(self, data: bytes) -> None:
        if self.splice is not None:
            self.splice.from_app(data)
        elif self._parser is not None:
            try:
                self._parser.dataReceived(data)
            except Exception:
                self.abort()
                self._failed(Failure())

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.gone = True
        parser, self._parser = self._parser, None
        if parser is not None:
            parser.connectionLost(reason)
        if self.splice is not None:
            self.splice.app_lost()
        self.lost.callback(None)

    def abort(self) -> None:
        transport: Any = self.transport
        if transport is not None and not self.gone:
            transport.abortConnection()

    def close(self) -> None:
        transport: Any = self.transport
        if transport is not None and not self.gone:
            transport.loseConnection()


class _BrowserSide(protocol.Protocol):
    def __init__(self, splice: Splice) -> None:
        self.splice = splice

    def dataReceived(self, data: bytes) -> None:
        self.splice.from_browser(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.splice.browser_lost()


class Splice:
    """A browser connection and an app connection after a websocket ``101``: bytes both ways,
    each side's write buffer pausing the other's reading; one side closing closes the other."""

    def __init__(self, app: UpgradeClient, splices: SpliceRegistry) -> None:
        self.registry = splices
        self.app = app
        self.browser = _BrowserSide(self)
        self.closed: defer.Deferred[None] = defer.Deferred()
        self._browser_open = True
        self._app_open = True
        app.splice = self
        splices.opened(self)

    def start(self, from_app: bytes, from_browser: bytes) -> None:
        browser: Any = self.browser.transport
        app: Any = self.app.transport
        app.registerProducer(browser, True)
        browser.registerProducer(app, True)
        if from_app:
            browser.write(from_app)
        if from_browser:
            app.write(from_browser)

    def from_app(self, data: bytes) -> None:
        browser: Any = self.browser.transport
        if self._browser_open and browser is not None:
            browser.write(data)

    def from_browser(self, data: bytes) -> None:
        app: Any = self.app.transport
        if self._app_open and app is not None:
            app.write(data)

    def browser_lost(self) -> None:
        self._browser_open = False
        app: Any = self.app.transport
        if self._app_open and app is not None:
            app.unregisterProducer()
            app.loseConnection()
        self._maybe_closed()

    def app_lost(self) -> None:
        self._app_open = False
        browser: Any = self.browser.transport
        if self._browser_open and browser is not None:
            browser.unregisterProducer()  # TLS waits for a registered producer to leave
            browser.loseConnection()
        self._maybe_closed()

    def close(self) -> None:
        for side in (self.app.transport, self.browser.transport):
            t: Any = side
            if t is not None:
                t.abortConnection()

    def _maybe_closed(self) -> None:
        if not self._browser_open and not self._app_open and not self.closed.called:
            self.registry.closed(self)
            self.closed.callback(None)
