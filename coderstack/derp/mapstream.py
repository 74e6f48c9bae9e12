"""``GET /api/v2/derp-map``: the DERP map streamed over a websocket.

Messages (text frames, server to client only): the map as Tailscale JSON (``DERPMap.dumps()``),
once on connect and again every time it changes. The server pings every ``ping_interval``
seconds and drops connections that do not answer. Anything the client sends is ignored.
The caller authenticates the request before returning this resource, and may ``track`` each
connection: the protocol then closes with 4001 and the reason when ``revoked(reason)``, and with
1001 "going away" on ``going_away()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

from coderstack.derpmap import DERPMap
from coderstack.wsclose import close_going_away

CLOSE_REVOKED = 4001

Unsubscribe = Callable[[], None]
Subscribe = Callable[[Callable[[DERPMap], None]], Unsubscribe]


class MapPublisher:
    """The current DERP map and who wants to hear when it changes."""

    def __init__(self, initial: DERPMap) -> None:
        self.current = initial
        self._subscribers: list[Callable[[DERPMap], None]] = []

    def get(self) -> DERPMap:
        return self.current

    def set(self, new: DERPMap) -> None:
        if new == self.current:
            return
        self.current = new
        for cb in list(self._subscribers):
            cb(new)

    def subscribe(self, cb: Callable[[DERPMap], None]) -> Unsubscribe:
        self._subscribers.append(cb)

        def unsubscribe() -> None:
            if cb in self._subscribers:
                self._subscribers.remove(cb)

        return unsubscribe


Track = Callable[[Any], Callable[[], None]]  # connection -> untrack


class _MapStreamFactory(WebSocketServerFactory):
    def __init__(self, get_map: Callable[[], DERPMap], subscribe: Subscribe, track: Track | None) -> None:
        super().__init__()
        self.get_map = get_map
        self.subscribe = subscribe
        self.track = track


class _MapStreamProtocol(WebSocketServerProtocol):
    factory: _MapStreamFactory
    _unsubscribe: Unsubscribe | None = None
    _last: str | None = None
    _untrack: Callable[[], None] | None = None

    def onOpen(self) -> None:
        self._send_map(self.factory.get_map())
        self._unsubscribe = self.factory.subscribe(self._send_map)
        if self.factory.track is not None:
            self._untrack = self.factory.track(self)

    def revoked(self, reason: str) -> None:
        self.sendClose(CLOSE_REVOKED, reason[:100])

    def going_away(self) -> None:
        close_going_away(self)

    def _send_map(self, m: DERPMap) -> None:
        text = m.dumps()
        if text != self._last:
            self._last = text
            self.sendMessage(text.encode(), isBinary=False)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._untrack is not None:
            self._untrack()
            self._untrack = None


def derp_map_stream_resource(
    get_map: Callable[[], DERPMap], subscribe: Subscribe, *, ping_interval: float = 30.0,
    track: Track | None = None,
) -> WebSocketResource:
    """A resource for ``/api/v2/derp-map`` (mount with Klein ``branch=False``)."""
    factory = _MapStreamFactory(get_map, subscribe, track)
    factory.protocol = _MapStreamProtocol
    factory.setProtocolOptions(autoPingInterval=ping_interval, autoPingTimeout=2 * ping_interval)
    return WebSocketResource(factory)
