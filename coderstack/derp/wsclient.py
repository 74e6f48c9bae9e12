"""The DERP client's websocket transport, for networks whose proxies mangle ``Upgrade: DERP``.

The handshake: ``GET ws[s]://<host>[:<port>]/derp`` with ``Sec-WebSocket-Protocol: derp`` and
the client's headers (Coder-Session-Token, Derp-Mesh, extra headers). Binary messages carry the
DERP byte stream in both directions; message boundaries mean nothing, so the frames written in
one reactor turn go out as one message. Text messages are ignored. Messages and frames of up to
8 MiB are accepted. A non-101 answer fails the attempt with :class:`UpgradeRefused` (Autobahn
names the status as ``[NNN]`` in its error text); any other failure with
:class:`DERPClientError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.python.failure import Failure

from coderstack.derp.tcpopts import no_delay
from coderstack.derp.transport import (
    ClientTransport,
    DERPClientError,
    FlowControl,
    LinkEvents,
    UpgradeRefused,
    host_header,
    local_host,
)
from coderstack.derpmap import DERPNode
from coderstack.twistedtypes import Clock, stream_transport

MAX_MESSAGE = 8 << 20


class WebSocketTransport(WebSocketClientProtocol):
    def __init__(self, events: LinkEvents, clock: Clock,
                 ready: defer.Deferred[ClientTransport]) -> None:
        super().__init__()
        self.events = events
        self.clock = clock
        self.ready: defer.Deferred[ClientTransport] | None = ready
        self._pending: list[bytes] | None = None

    def onOpen(self) -> None:
        transport = stream_transport(self)
        no_delay(transport)
        transport.registerProducer(FlowControl(self.events), True)
        d, self.ready = self.ready, None
        if d is not None:
            d.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.events.bytes_received(payload)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        d, self.ready = self.ready, None
        why = str(reason or getattr(self, "wasNotCleanReason", "") or f"closed ({code})")
        if d is not None:
            if not d.called:
                d.errback(Failure(_handshake_error(why)))
        else:
            self.events.connection_lost(why)

    # ClientTransport
    def send(self, data: bytes) -> None:
        # Autobahn costs tens of microseconds per message: coalesce the frames written in
        # one reactor turn into one binary message (the stream has no message boundaries).
        if self._pending is None:
            self._pending = [data]
            self.clock.callLater(0, self._flush)
        else:
            self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and self.state == self.STATE_OPEN:
            self.sendMessage(b"".join(pending), isBinary=True)

    def disconnect(self) -> None:
        self._flush()
        self.sendClose(1000)

    def abort(self) -> None:
        if self.transport is not None:
            transport = stream_transport(self)
            transport.unregisterProducer()
            transport.abortConnection()

    def local_host(self) -> str | None:
        return local_host(self.transport)

    def _closeConnection(self, abort: bool = False) -> None:
        if self.transport is not None:
            stream_transport(self).unregisterProducer()
        super()._closeConnection(abort)


class _Factory(WebSocketClientFactory):
    def __init__(self, url: str, headers: Mapping[bytes, bytes], events: LinkEvents, clock: Clock,
                 ready: defer.Deferred[ClientTransport], open_timeout: float) -> None:
        super().__init__(url, protocols=["derp"],
                         headers={k.decode(): v.decode() for k, v in headers.items()})
        self.setProtocolOptions(maxMessagePayloadSize=MAX_MESSAGE, maxFramePayloadSize=MAX_MESSAGE,
                                openHandshakeTimeout=open_timeout)
        self.events = events
        self.clock = clock
        self.ready = ready

    def buildProtocol(self, addr: Any) -> WebSocketTransport:
        proto = WebSocketTransport(self.events, self.clock, self.ready)
        proto.factory = self
        return proto


def websocket_factory(node: DERPNode, headers: Mapping[bytes, bytes], events: LinkEvents,
                      clock: Clock, ready: defer.Deferred[ClientTransport],
                      open_timeout: float) -> _Factory:
    """A factory for one connection attempt to ``node``."""
    scheme = "ws" if node.force_http else "wss"
    return _Factory(f"{scheme}://{host_header(node)}/derp", headers, events, clock, ready,
                    open_timeout)


def _handshake_error(why: str) -> Exception:
    # Autobahn reports "WebSocket connection upgrade failed [401]: ..." for a non-101 answer.
    m = re.search(r"\[(\d{3})\]", why)
    if m:
        return UpgradeRefused(int(m.group(1)), why)
    return DERPClientError(why)
