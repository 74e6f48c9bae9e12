"""Coordination over websockets: a thin Autobahn protocol in front of the sans-IO coordinator.

Wire format: see ``coderstack/wire/coordination.py`` (one JSON object per text message).
The HTTP route has already authenticated and authorized the peer before the upgrade; this
protocol only moves messages between the socket and ``Coordinator``:

- open                 -> ``coordinator.connect(peer_id, ...)``; a peer over its user's limit
                          (``PeerLimitExceeded``) is closed with 4029 and the limit as reason
- text message         -> ``connection.handle_text``: the core parses it; a malformed message
                          gets ``{"error": ...}`` back and is counted; too many close the socket
- close after a ``disconnect`` request, or after being replaced by a newer connection with the
  same peer id -> nothing more; any other close -> ``connection.lost()`` (peers see LOST and keep
  the last node, so tunnels survive a dropped websocket or a server restart)

Autobahn's auto-ping notices a dead peer within ``PING_INTERVAL + PING_TIMEOUT`` seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast
from uuid import UUID

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.logger import Logger

from coderstack.coordinator.core import (
    CLOSE_SHUTDOWN,
    REASON_GRACEFUL,
    REASON_REFUSED,
    PeerLimitExceeded,
    PeerLimits,
)
from coderstack.wire.coordination import CoordinateResponse
from coderstack.wsclose import close_going_away

PING_INTERVAL = 5.0
PING_TIMEOUT = 5.0
MAX_MESSAGE = 256 * 1024
CLOSE_REPLACED = 4000
CLOSE_KICKED = 4001
CLOSE_ABUSE = 4002
CLOSE_LIMIT = 4029


class CoordinateProtocol(WebSocketServerProtocol):
    _log = Logger()

    def _owner(self) -> CoordinateFactory:
        # Twisted types ``factory`` as a generic Factory of this protocol; ours is always this one.
        return cast(CoordinateFactory, self.factory)

    def onOpen(self) -> None:
        f = self._owner()
        self._graceful = False
        self._replaced = False
        try:
            self.connection = f.coordinator.connect(
                f.peer_id, f.name, f.auth, self._send_response, self._closed_by_coordinator, limits=f.limits
            )
        except PeerLimitExceeded as err:
            self.sendClose(code=CLOSE_LIMIT, reason=str(err)[:120])
            return
        f.opened(self)

    def _send_response(self, response: CoordinateResponse) -> None:
        # Not ``_send``: autobahn's own method of that name writes its queued frames.
        self.sendMessage(response.to_text().encode(), isBinary=False)

    def _closed_by_coordinator(self) -> None:
        reason = self.connection.close_reason
        if reason in (REASON_GRACEFUL, REASON_REFUSED):
            # The peer is gone for good (it said disconnect, was kicked, or abused the protocol):
            # the close handler must record it as disconnected.
            self._graceful = True
            code = CLOSE_ABUSE if reason == REASON_REFUSED else 1000
            self.sendClose(code=code, reason=reason)
            return
        # A newer connection for this peer id took over, or the server is shutting down: the
        # peer itself is not gone, so nothing is recorded for it here.
        self._replaced = True
        if reason == CLOSE_SHUTDOWN:
            close_going_away(self)
        else:
            self.sendClose(code=CLOSE_REPLACED, reason="replaced by a newer connection")

    def kick(self, reason: str) -> None:
        """Close from the server side (token rotated, workspace deleted): the peer is gone."""
        # Send our close first: the coordinator's close() that disconnect() triggers is then a no-op.
        self.sendClose(code=CLOSE_KICKED, reason=reason[:100])
        if not self._graceful and not self._replaced:
            self._graceful = True
            self.connection.disconnect()

    # The server's registry of live connections (a revoked token, a shutdown).
    def revoked(self, reason: str) -> None:
        self.kick(reason)

    def going_away(self) -> None:
        close_going_away(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._replaced or self._graceful:
            return
        # The core parses, answers malformed messages with an error, counts them and closes a
        # connection that keeps sending them (REASON_REFUSED, closed with CLOSE_ABUSE above).
        self.connection.handle_text(payload)

    def onPong(self, payload: bytes) -> None:
        # Idle but alive: keep last_seen fresh.
        connection = getattr(self, "connection", None)
        if connection is not None:
            connection.touch()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        connection = getattr(self, "connection", None)
        if connection is None:
            return  # the websocket handshake never completed
        if not self._graceful and not self._replaced:
            connection.lost()
        self._owner().closed(self, replaced=self._replaced)


class CoordinateFactory(WebSocketServerFactory):
    protocol = CoordinateProtocol

    def __init__(
        self,
        coordinator: Any,
        peer_id: UUID,
        name: str,
        auth: Any,
        on_open: Callable[[CoordinateProtocol], None] | None = None,
        on_close: Callable[[CoordinateProtocol, bool], None] | None = None,
        limits: PeerLimits | None = None,
    ) -> None:
        super().__init__()
        self.coordinator = coordinator
        self.limits = limits
        self.peer_id, self.name, self.auth = peer_id, name, auth
        self._on_open, self._on_close = on_open, on_close
        self.setProtocolOptions(
            autoPingInterval=PING_INTERVAL,
            autoPingTimeout=PING_TIMEOUT,
            maxMessagePayloadSize=MAX_MESSAGE,
            maxFramePayloadSize=MAX_MESSAGE,
            openHandshakeTimeout=10,
            perMessageCompressionAccept=lambda offers: None,
        )

    def opened(self, proto: CoordinateProtocol) -> None:
        if self._on_open:
            self._on_open(proto)

    def closed(self, proto: CoordinateProtocol, replaced: bool) -> None:
        if self._on_close:
            self._on_close(proto, replaced)


def coordinate_resource(factory: CoordinateFactory) -> WebSocketResource:
    return WebSocketResource(factory)
