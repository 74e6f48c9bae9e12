"""The peer side of coordination: a websocket client that sends requests and hands peer updates on.

Used alike by the agent (``/api/v2/workspaceagents/me/coordinate``) and the CLI
(``/api/v2/workspaceagents/{id}/coordinate``). Message format: ``coderstack/wire/coordination.py``.
Reconnecting is the caller's job (it also has to refetch the manifest or connection info).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from coderstack.wire.coordination import (
    CoordinateRequest,
    CoordinateResponse,
    CoordinationError,
    parse_response,
)


class CoordinateClientProtocol(WebSocketClientProtocol):
    _log = Logger()
    factory: CoordinateClientFactory

    def onOpen(self) -> None:
        self.factory.on_open(self)

    def send_request(self, request: CoordinateRequest) -> None:
        self.sendMessage(request.to_text().encode(), isBinary=False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            response = parse_response(payload)
        except CoordinationError as err:
            self._log.warn("dropping malformed coordination message: {why}", why=str(err)[:200])
            return
        self.factory.on_response(response)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        # When the TCP connection drops before the server's close frame arrives (both sides
        # closing at once), Autobahn leaves its close-handshake timers armed on a dead protocol;
        # cancel them so a stopped agent or CLI leaves no timer behind.
        for name in ("closeHandshakeTimeoutCall", "serverConnectionDropTimeoutCall"):
            call = getattr(self, name, None)
            if call is not None:
                try:
                    call.cancel()
                except Exception:  # already fired or cancelled
                    pass
                setattr(self, name, None)
        self.factory.on_close(code, reason or "")


class CoordinateClientFactory(WebSocketClientFactory):
    protocol = CoordinateClientProtocol

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened: Deferred[CoordinateClientProtocol] = Deferred()
        self.closed: Deferred[tuple[int | None, str]] = Deferred()
        self.response_handler: Callable[[CoordinateResponse], None] | None = None
        self.proto: CoordinateClientProtocol | None = None

    def on_open(self, proto: CoordinateClientProtocol) -> None:
        self.proto = proto
        if not self.opened.called:
            self.opened.callback(proto)

    def on_response(self, response: CoordinateResponse) -> None:
        if self.response_handler is not None:
            self.response_handler(response)

    def on_close(self, code: int | None, reason: str) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(reason or f"websocket closed ({code})"))
        if not self.closed.called:
            self.closed.callback((code, reason))

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.on_close(None, reason.getErrorMessage())


async def open_coordination(client: Any, path: str, on_response: Callable[[CoordinateResponse], None],
                            query: dict[str, str] | None = None) -> CoordinateClientFactory:
    """Connect to a coordination websocket; returns the factory once the socket is open.

    ``factory.proto`` is the open protocol (``send_request``); ``factory.closed`` fires on close.
    """
    factory = client.websocket_factory(CoordinateClientFactory, path, query)
    factory.response_handler = on_response
    proto = await client.websocket_endpoint().connect(factory)
    del proto  # the websocket handshake is not done yet; wait for it
    await factory.opened
    return factory
