"""The health report's websocket check: an echo endpoint and the client that dials it.

``GET /api/v2/debug/ws`` (owners) upgrades to a websocket that sends back each message it gets,
text as text and binary as binary, and closes after :data:`MAX_MESSAGES` of them. The health check
dials it through the access URL with the asking owner's session token, sends one text message and
expects the same text back: a proxy in front that drops ``Upgrade`` shows as a failed dial.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet import defer, endpoints, ssl

from coderstack.server import auth

PATH = "/api/v2/debug/ws"
MAX_MESSAGES = 16
MAX_MESSAGE = 4096


class EchoProtocol(WebSocketServerProtocol):
    def onOpen(self) -> None:
        self._count = 0

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self._count += 1
        self.sendMessage(payload, isBinary)
        if self._count >= MAX_MESSAGES:
            self.sendClose(1000, "enough")


def echo_resource() -> WebSocketResource:
    factory = WebSocketServerFactory()
    factory.protocol = EchoProtocol
    factory.setProtocolOptions(maxMessagePayloadSize=MAX_MESSAGE, maxFramePayloadSize=MAX_MESSAGE,
                               perMessageCompressionAccept=lambda offers: None)
    return WebSocketResource(factory)


class _Probe(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.sendMessage(self.factory.message.encode())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        done = self.factory.done
        if not done.called:
            done.callback(payload.decode("utf-8", "replace"))
        self.sendClose(1000)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        done = self.factory.done
        if not done.called:
            done.errback(ConnectionError(f"closed before the echo (code {code}: {reason or 'no reason'})"))


class _ProbeFactory(WebSocketClientFactory):
    protocol = _Probe

    def __init__(self, url: str, token: str, message: str) -> None:
        super().__init__(url, headers={auth.SESSION_HEADER: token})
        self.setProtocolOptions(perMessageCompressionOffers=[], closeHandshakeTimeout=2)
        self.message = message
        self.done: defer.Deferred[str] = defer.Deferred()


async def echo_through(reactor: Any, access_url: str, token: str, message: str, timeout: float) -> str:
    """Dial the echo endpoint through ``access_url`` and return what came back."""
    u = urlsplit(access_url)
    secure = u.scheme == "https"
    host = u.hostname or "localhost"
    port = u.port or (443 if secure else 80)
    url = f"{'wss' if secure else 'ws'}://{u.netloc}{u.path.rstrip('/')}{PATH}"
    factory = _ProbeFactory(url, token, message)
    ep: Any = endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    if secure:
        ep = endpoints.wrapClientTLS(ssl.optionsForClientTLS(host), ep)
    proto = await ep.connect(factory).addTimeout(timeout, reactor)
    factory.done.addTimeout(timeout, reactor)
    try:
        return await factory.done  # the probe closes cleanly after the echo
    except BaseException:
        if proto.transport is not None:
            proto.transport.abortConnection()
        raise
