"""The peer side of coordination: a websocket client that sends requests and hands peer updates
on, and the link that keeps one open.

Used alike by the agent (``/api/v2/workspaceagents/me/coordinate``) and the CLI
(``/api/v2/workspaceagents/{id}/coordinate``). Message format: ``coderstack/wire/coordination.py``.

:class:`CoordinationLink` is the one reconnect loop of both: it opens a websocket through its
:class:`LinkHandler` (which may first refetch the manifest or the connection info), tells the
handler each time one opened (so our node and tunnels are sent again), and when it closes or
cannot be opened waits as its :class:`coderstack.backoff.Backoff` says and opens another. An
open resets the backoff. ``close()`` leaves gracefully (``disconnect``) and stops reopening.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from coderstack.backoff import Backoff
from coderstack.wire.coordination import (
    CoordinateRequest,
    CoordinateResponse,
    CoordinationError,
    parse_response,
)

_log = Logger()


class CoordinateClientProtocol(WebSocketClientProtocol):
    _log = Logger()

    def _owner(self) -> CoordinateClientFactory:
        # Twisted types ``factory`` as a generic Factory of this protocol; ours is always this one.
        return cast(CoordinateClientFactory, self.factory)

    def onOpen(self) -> None:
        self._owner().on_open(self)

    def send_request(self, request: CoordinateRequest) -> None:
        self.sendMessage(request.to_text().encode(), isBinary=False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            response = parse_response(payload)
        except CoordinationError as err:
            self._log.warn("dropping malformed coordination message: {why}", why=str(err)[:200])
            return
        self._owner().on_response(response)

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
        self._owner().on_close(code, reason or "")


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

    def send(self, request: CoordinateRequest) -> None:
        """Send ``request`` if the websocket is open (dropped otherwise)."""
        if self.proto is not None:
            self.proto.send_request(request)

    def leave(self) -> None:
        """Leave gracefully: ``disconnect`` (the coordinator marks us DISCONNECTED, not LOST)
        and close the websocket."""
        if self.proto is not None:
            self.proto.send_request(CoordinateRequest(disconnect=True))
            self.proto.sendClose()


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


class CoordinationSocket(Protocol):
    """One opened coordination websocket, as the link uses it (a :class:`CoordinateClientFactory`)."""

    @property
    def closed(self) -> Deferred[tuple[int | None, str]]: ...
    def send(self, request: CoordinateRequest) -> None: ...
    def leave(self) -> None: ...


class LinkHandler(Protocol):
    """What a :class:`CoordinationLink` asks of its owner."""

    async def open_socket(self) -> CoordinationSocket:
        """Open one websocket (after whatever must come first); raise to try again later."""
        ...

    async def socket_opened(self, reopened: bool) -> None:
        """A websocket just opened and is the link's now: send what it must know."""
        ...

    def open_failed(self, err: Exception) -> bool:
        """An open failed (say why); False stops the link for good."""
        ...


T = TypeVar("T")


def _mirror(source: Deferred[T]) -> Deferred[T]:
    """A Deferred that fires when ``source`` does; cancelling it leaves ``source`` alone."""
    mirror: Deferred[T] = Deferred()

    def fire(result: Any) -> Any:
        if not mirror.called:
            mirror.callback(result)
        return result

    source.addBoth(fire)
    return mirror


class CoordinationLink:
    """A coordination websocket kept open until :meth:`close` (see the module docstring)."""

    def __init__(self, clock: IReactorTime, handler: LinkHandler, backoff: Backoff) -> None:
        self.clock = clock
        self.handler = handler
        self.backoff = backoff
        self.socket: CoordinationSocket | None = None
        self.opens = 0
        self.stopped = False
        self._loop: Deferred[None] | None = None

    async def open(self) -> None:
        """Open the first websocket now (its error goes to the caller), then keep one open."""
        socket = await self.handler.open_socket()
        await self._opened(socket)
        self._run(socket)

    def start(self) -> None:
        """Keep a websocket open from now on, the first one included."""
        self._run(None)

    def send(self, request: CoordinateRequest) -> None:
        """Send on the open websocket; dropped while there is none (the next open registers anew)."""
        if self.socket is not None:
            self.socket.send(request)

    def stop(self) -> None:
        """Stop reopening; an open websocket stays open (see :meth:`close`)."""
        self.stopped = True
        if self._loop is not None and not self._loop.called:
            self._loop.cancel()

    async def close(self) -> None:
        """Leave gracefully (``disconnect``) and stop reopening."""
        self.stop()
        socket, self.socket = self.socket, None
        if socket is not None:
            socket.leave()

    def _run(self, socket: CoordinationSocket | None) -> None:
        self._loop = Deferred.fromCoroutine(self._keep(socket))
        self._loop.addErrback(lambda f: _log.failure("the coordination link failed", f))

    async def _opened(self, socket: CoordinationSocket) -> None:
        self.socket = socket
        self.opens += 1
        self.backoff.reset()
        try:
            await self.handler.socket_opened(reopened=self.opens > 1)
        except CancelledError:
            raise
        except Exception as err:  # the websocket stays: the next change is sent on it
            _log.warn("after the coordinator connected: {why}", why=str(err))

    async def _keep(self, socket: CoordinationSocket | None) -> None:
        try:
            while not self.stopped:
                if socket is None:
                    try:
                        socket = await self.handler.open_socket()
                    except CancelledError:
                        raise
                    except Exception as err:
                        # Stopping cancels a connect in flight, which fails with Twisted's own
                        # ConnectingCancelledError: an ending, not a failure to report or retry.
                        if self.stopped or not self.handler.open_failed(err):
                            return
                        await self._wait()
                        continue
                    if self.stopped:  # stopped while it was opening
                        socket.leave()
                        return
                    await self._opened(socket)
                code, reason = await _mirror(socket.closed)
                _log.info("coordinator connection closed ({code}: {reason})", code=code, reason=reason)
                if self.socket is socket:
                    self.socket = None
                socket = None
                if not self.stopped:
                    await self._wait()
        except CancelledError:
            return

    async def _wait(self) -> None:
        delay = self.backoff.next_delay()
        _log.info("reconnecting to the coordinator in {delay:.1f}s", delay=delay)
        await task.deferLater(self.clock, delay, lambda: None)
