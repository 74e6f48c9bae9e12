"""What the dialing client and its two transports (HTTP Upgrade, websocket) say to each other.

A transport is built with a :class:`LinkEvents` to report to and a Deferred it fires with
itself once DERP bytes can flow (or fails with :class:`DERPClientError`). After that the client
calls it through :class:`ClientTransport`.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import protocol
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from coderstack.derpmap import DERPNode
from coderstack.twistedtypes import stream_transport


class DERPClientError(Exception):
    pass


class UpgradeRefused(DERPClientError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"DERP upgrade refused: HTTP {status} {reason}")
        self.status = status


class LinkEvents(Protocol):
    """What an open transport reports."""

    def bytes_received(self, data: bytes) -> None:
        """DERP stream bytes from the server (any chunking)."""

    def connection_lost(self, reason: str) -> None:
        """The connection ended (not reported for an attempt that never opened)."""

    def writable_changed(self, ok: bool) -> None:
        """The transport's write buffer filled (False) or drained (True)."""


class ClientTransport(Protocol):
    """What the client calls on an open transport."""

    def send(self, data: bytes) -> None: ...

    def disconnect(self) -> None:
        """Close after what is written so far."""

    def abort(self) -> None:
        """Close at once, without a goodbye."""

    def local_host(self) -> str | None:
        """The local IP address of the connection, if it has one."""


@implementer(IPushProducer)
class FlowControl:
    """Registered with a transport's TCP/TLS connection: passes its pauses on as events."""

    def __init__(self, events: LinkEvents) -> None:
        self.events = events

    def pauseProducing(self) -> None:
        self.events.writable_changed(False)

    def resumeProducing(self) -> None:
        self.events.writable_changed(True)

    def stopProducing(self) -> None:
        pass


def host_header(node: DERPNode) -> str:
    """``host[:port]`` of ``node`` as an HTTP Host header (or websocket URL authority)."""
    host = node.host_name
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    default = 80 if node.force_http else 443
    port = node.effective_derp_port if not node.force_http else (node.derp_port or 80)
    return host if port == default else f"{host}:{port}"


def local_host(transport: Any) -> str | None:
    try:
        return str(transport.getHost().host)
    except Exception:  # no transport, or one without an IP address
        return None


class StreamLink(protocol.Protocol):
    """The :class:`ClientTransport` side of a link whose DERP frames ride a byte stream (TCP,
    TLS, or an in-memory pipe): what the client calls, done on the stream."""

    def send(self, data: bytes) -> None:
        stream_transport(self).write(data)

    def disconnect(self) -> None:
        transport = stream_transport(self)
        # TLS waits for a registered producer to leave before it shuts down.
        transport.unregisterProducer()
        transport.loseConnection()

    def abort(self) -> None:
        # No goodbye: over a vanished address it would wait for a flush that never comes.
        transport = stream_transport(self)
        transport.unregisterProducer()
        transport.abortConnection()

    def local_host(self) -> str | None:
        return local_host(self.transport)

