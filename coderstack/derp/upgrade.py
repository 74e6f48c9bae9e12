"""The DERP client's HTTP Upgrade transport, over TCP or TLS.

The request (header lines in this order)::

    GET /derp HTTP/1.1
    Host: <host>[:<port>]          the port only when it is not the scheme's default
    Upgrade: DERP
    Connection: Upgrade
    User-Agent: coderstack-derp
    <the client's headers>         Ideal-Node, Coder-Session-Token, Derp-Mesh, extra headers

The answer must be ``HTTP/1.1 101 ...``; from the byte after its blank line the connection
carries DERP frames both ways (bytes behind the head in the same read are frames already).
Any other status fails the attempt with :class:`UpgradeRefused`; a head longer than 16 KiB or
a status line that does not parse fails it with :class:`DERPClientError`.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from coderstack.derp.tcpopts import no_delay
from coderstack.derp.transport import (
    ClientTransport,
    DERPClientError,
    FlowControl,
    LinkEvents,
    StreamLink,
    UpgradeRefused,
    host_header,
)
from coderstack.derpmap import DERPNode
from coderstack.twistedtypes import stream_transport

MAX_HEAD = 16384


class UpgradeTransport(StreamLink):
    """HTTP/1.1 ``Upgrade: DERP`` then raw frames."""

    def __init__(self, host: str, headers: Mapping[bytes, bytes], events: LinkEvents,
                 ready: defer.Deferred[ClientTransport]) -> None:
        self.host = host
        self.headers = headers
        self.events = events
        self.ready: defer.Deferred[ClientTransport] | None = ready
        self._head = b""
        self._upgraded = False

    def connectionMade(self) -> None:
        lines = [
            b"GET /derp HTTP/1.1",
            b"Host: " + self.host.encode(),
            b"Upgrade: DERP",
            b"Connection: Upgrade",
            b"User-Agent: coderstack-derp",
        ]
        lines += [k + b": " + v for k, v in self.headers.items()]
        transport = stream_transport(self)
        no_delay(transport)
        transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
        transport.registerProducer(FlowControl(self.events), True)

    def dataReceived(self, data: bytes) -> None:
        if self._upgraded:
            self.events.bytes_received(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._fail(DERPClientError("HTTP response head too long"))
            return
        head, rest = self._head[:end], self._head[end + 4 :]
        self._head = b""
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            self._fail(DERPClientError(f"bad HTTP status line {status_line!r}"))
            return
        if status != 101:
            self._fail(UpgradeRefused(status, parts[2] if len(parts) > 2 else ""))
            return
        self._upgraded = True
        d, self.ready = self.ready, None
        if d is not None:
            d.callback(self)
        if rest:
            self.events.bytes_received(rest)

    def _fail(self, err: Exception) -> None:
        d, self.ready = self.ready, None
        stream_transport(self).abortConnection()
        if d is not None:
            d.errback(Failure(err))

    def connectionLost(self, reason: Failure | None = None) -> None:
        d, self.ready = self.ready, None
        if d is not None:
            if not d.called:  # not when cancelled (a timeout or reconnect() aborted us)
                d.errback(reason)
        elif self._upgraded:
            self.events.connection_lost(reason.getErrorMessage() if reason else "closed")



def upgrade_factory(node: DERPNode, headers: Mapping[bytes, bytes], events: LinkEvents,
                    ready: defer.Deferred[ClientTransport]) -> Factory:
    """A factory for one connection attempt to ``node``."""
    host = host_header(node)
    return Factory.forProtocol(lambda: UpgradeTransport(host, headers, events, ready))
