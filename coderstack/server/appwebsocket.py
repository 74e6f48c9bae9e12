"""The websocket leg of the workspace-app proxy: the handshake to the app and the splice after it.

The handshake goes to the app on a connection of its own (:class:`UpgradeClient`): the request
head as the proxy built it (``Sec-WebSocket-*`` in their registered casing), then the answer read
by :class:`~coderstack.server.responsereader.ResponseReader` told to stop at a ``101``: its
headers and whatever the app sent right behind it are a :class:`Switched`. Any other answer is
an ordinary response, told to the :class:`UpgradeExchange` as it comes, and the connection
closes after it.

After a ``101`` a :class:`Splice` joins the browser's connection (taken away from HTTP) and the
app's: bytes both ways unchanged, each side's transport registered as the other's producer so a
full write buffer on one side pauses reading on the other, and one side closing closes the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer, protocol
from twisted.python.failure import Failure

from coderstack.server import appheaders
from coderstack.server.responsereader import MalformedResponse, ResponseHead, ResponseReader


class SpliceRegistry(Protocol):
    """Who keeps count of the open splices (the proxy, to close them when it stops)."""

    def opened(self, splice: Splice) -> None: ...

    def closed(self, splice: Splice) -> None: ...


@dataclass
class Switched:
    headers: list[appheaders.Header]  # for the browser's 101
    rest: bytes  # what the app sent right behind its 101


class UpgradeExchange(Protocol):
    """The browser's request a handshake is for: told of the answer."""

    def switched(self, switched: Switched) -> None: ...

    def response_head(self, head: ResponseHead) -> None: ...

    def response_body(self, data: bytes) -> None: ...

    def response_end(self) -> None: ...

    def response_failed(self, why: str, retryable: bool) -> None: ...


def switched_headers(head: ResponseHead) -> list[appheaders.Header]:
    """The headers of the browser's ``101`` for the app's: its own, then ``Upgrade`` (the
    app's first) and ``Connection: Upgrade``."""
    headers: list[appheaders.Header] = []
    upgrade = b"websocket"
    for name, value in head.headers:
        if name.lower() == b"upgrade":
            upgrade = value
            break
    for name, values in appheaders.response_header_pairs(head.headers, head.connection, keep_length=False).items():
        headers.extend((name, v) for v in values)
    headers[:0] = [(b"Upgrade", upgrade), (b"Connection", b"Upgrade")]
    return headers


class UpgradeClient(protocol.Protocol):
    """The app's end of a websocket handshake: the request head, then the answer (see the
    module doc), then, once spliced, raw bytes."""

    def __init__(self, target: bytes, headers: list[appheaders.Header], exchange: UpgradeExchange) -> None:
        self.target = target
        self.headers = headers
        self.exchange = exchange
        self.splice: Splice | None = None
        self.gone = False
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._reader: ResponseReader | None = None
        self._switch: ResponseHead | None = None

    def connectionMade(self) -> None:
        lines = [b"GET " + self.target + b" HTTP/1.1\r\n"]
        lines.extend(name + b": " + value + b"\r\n" for name, value in self.headers)
        lines.append(b"\r\n")
        transport: Any = self.transport
        transport.writeSequence(lines)
        self._reader = ResponseReader(self, stop_at_switch=True)

    # ResponseSink
    def head(self, head: ResponseHead) -> None:
        if head.code == 101:
            self._switch = head
        else:
            self.exchange.response_head(head)

    def body(self, data: bytes) -> None:
        self.exchange.response_body(data)

    def end(self) -> None:
        reader, self._reader = self._reader, None
        if self._switch is not None and reader is not None:
            self.exchange.switched(Switched(switched_headers(self._switch), reader.rest))
            return
        self.close()  # a non-101 answer: this connection is not reused
        self.exchange.response_end()

    def dataReceived(self, data: bytes) -> None:
        if self.splice is not None:
            self.splice.from_app(data)
        elif self._reader is not None:
            try:
                self._reader.feed(data)
            except MalformedResponse as e:
                self._reader = None
                self.abort()
                self.exchange.response_failed(f"malformed response: {e}", False)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.gone = True
        reader = self._reader
        if reader is not None:
            try:
                reader.eof()
            except MalformedResponse as e:
                self._reader = None
                self.exchange.response_failed(str(e), False)
        if self.splice is not None:
            self.splice.app_lost()
        self.lost.callback(None)

    def pause_reading(self) -> None:
        transport: Any = self.transport
        if transport is not None and not self.gone:
            transport.pauseProducing()

    def resume_reading(self) -> None:
        transport: Any = self.transport
        if transport is not None and not self.gone:
            transport.resumeProducing()

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
