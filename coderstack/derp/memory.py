"""DERP without a socket: a client in the server's process reaching the relay in memory.

The server's own tailnet (``coderstack/server/servertailnet.py``) is a DERP client of the
server's embedded relay. It needs no TCP, no HTTP upgrade and no token: the relay's
:class:`~coderstack.derp.server.DERPStreamProtocol` and the client's end are joined by a pair
of :class:`MemoryTransport` (the same byte stream a TCP connection would carry after the 101:
ServerKey, ClientInfo, ServerInfo, then frames), and the relay admits the connection as the
principal the caller names.

    connector = relay_connector(reactor, relay, principal, admission)
    DERPClient(reactor, region, key, handler, connector=connector)

A :class:`MemoryTransport` behaves like a TCP transport to its protocol:

- ``write``/``writeSequence`` reach the other end's ``dataReceived`` on a later reactor turn
  (never re-entering the writer), in order, one ``dataReceived`` per turn per end;
- a registered streaming producer is paused once more than ``high_water`` bytes wait for the
  other end, and resumed when they have been delivered; ``pauseProducing`` on a transport (its
  protocol wants no more data for now) holds delivery to that end until ``resumeProducing``;
- ``loseConnection`` closes both ends after what was written has been delivered
  (``ConnectionDone``), ``abortConnection`` at once (``ConnectionAborted`` here,
  ``ConnectionLost`` at the other end); registered producers are told ``stopProducing``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IAddress, IConsumer, IPushProducer, ITransport
from twisted.python.failure import Failure
from zope.interface import implementer

from coderstack.derp.client import Connector
from coderstack.derp.policy import ConnectionAdmission, Refusal
from coderstack.derp.relay import Relay
from coderstack.derp.server import admit_stream
from coderstack.derp.transport import (
    ClientTransport,
    DERPClientError,
    FlowControl,
    LinkEvents,
    StreamLink,
)
from coderstack.derpmap import DERPNode
from coderstack.twistedtypes import Clock, DelayedCall, stream_transport

HIGH_WATER = 256 * 1024  # bytes waiting for the other end before the writer's producer pauses


@implementer(IAddress)
@dataclass(frozen=True)
class MemoryAddress:
    """Where an in-memory end is: a name, no host or port."""

    name: str


@implementer(ITransport, IConsumer, IPushProducer)
class MemoryTransport:
    """One end of an in-memory connection; see the module docstring. Made by :func:`connect_pair`."""

    def __init__(self, clock: Clock, protocol: Any, host: MemoryAddress, peer: MemoryAddress,
                 high_water: int = HIGH_WATER) -> None:
        self.clock = clock
        self.protocol = protocol
        self.host = host
        self.peer = peer
        self.high_water = high_water
        self.other: MemoryTransport | None = None
        self.disconnecting = False
        self.disconnected = False
        self.paused = False  # our protocol asked for no more data for now
        self.producer: Any = None
        self.streaming = False
        self._producer_paused = False
        self._out: list[bytes] = []  # written by our protocol, not yet delivered to the other end
        self._out_bytes = 0
        self._pump: DelayedCall | None = None

    # -- writing -----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.disconnecting or self.disconnected or not data:
            return
        self._out.append(bytes(data))
        self._out_bytes += len(data)
        self._schedule()
        if self.producer is not None and self.streaming and not self._producer_paused \
                and self._out_bytes > self.high_water:
            self._producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def _schedule(self) -> None:
        if self._pump is None and not self.disconnected:
            self._pump = self.clock.callLater(0, self._deliver)

    def _deliver(self) -> None:
        self._pump = None
        other = self.other
        if self.disconnected or other is None:
            return
        if self._out and not other.paused:
            data, self._out, self._out_bytes = b"".join(self._out), [], 0
            other.protocol.dataReceived(data)
        if self.disconnected:
            return
        if self._out:
            return  # held by the other end's pause; its resumeProducing schedules us again
        if self._producer_paused and self.producer is not None:
            self._producer_paused = False
            self.producer.resumeProducing()
        if self.disconnecting:
            self._close_both(ConnectionDone("closed"), ConnectionDone("closed"))

    # -- closing -----------------------------------------------------------------------------

    def loseConnection(self) -> None:
        if self.disconnecting or self.disconnected:
            return
        self.disconnecting = True
        self._schedule()

    def abortConnection(self) -> None:
        if self.disconnected:
            return
        self._out, self._out_bytes = [], 0
        self._close_both(ConnectionAborted("aborted"), ConnectionLost("the other end aborted"))

    def _close_both(self, ours: Exception, theirs: Exception) -> None:
        other = self.other
        self._lost(ours)
        if other is not None:
            other._lost(theirs)

    def _lost(self, why: Exception) -> None:
        if self.disconnected:
            return
        self.disconnected = True
        self.disconnecting = True
        if self._pump is not None and self._pump.active():
            self._pump.cancel()
        self._pump = None
        self._out, self._out_bytes = [], 0
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        self.protocol.connectionLost(Failure(why))

    # -- IPushProducer: our protocol pauses the data coming to it ---------------------------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        if self.other is not None and self.other._out:
            self.other._schedule()

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- IConsumer -----------------------------------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        if self.disconnected:
            producer.stopProducing()
            return
        self.producer, self.streaming = producer, streaming
        self._producer_paused = False
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None
        self._producer_paused = False

    # -- the rest of ITransport ------------------------------------------------------------------

    def getHost(self) -> MemoryAddress:
        return self.host

    def getPeer(self) -> MemoryAddress:
        return self.peer


def connect_pair(clock: Clock, client: Any, server: Any, *, client_name: str = "client",
                 server_name: str = "server",
                 high_water: int = HIGH_WATER) -> tuple[MemoryTransport, MemoryTransport]:
    """Join two protocols; the server's ``makeConnection`` runs first (it speaks first)."""
    a, b = MemoryAddress(client_name), MemoryAddress(server_name)
    client_end = MemoryTransport(clock, client, a, b, high_water)
    server_end = MemoryTransport(clock, server, b, a, high_water)
    client_end.other, server_end.other = server_end, client_end
    server.makeConnection(server_end)
    client.makeConnection(client_end)
    return client_end, server_end


class MemoryClientEnd(StreamLink):
    """The DERP client's end of an in-memory connection: a :class:`ClientTransport` reporting
    to the client's :class:`LinkEvents`, as the HTTP upgrade transport does after its 101."""

    def __init__(self, events: LinkEvents) -> None:
        self.events = events

    def connectionMade(self) -> None:
        stream_transport(self).registerProducer(FlowControl(self.events), True)

    def dataReceived(self, data: bytes) -> None:
        self.events.bytes_received(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.events.connection_lost(reason.getErrorMessage() if reason is not None else "closed")



def relay_connector(clock: Clock, relay: Relay, principal: Any,
                    admission: ConnectionAdmission | None = None, name: str = "in-process") -> Connector:
    """A :class:`~coderstack.derp.client.DERPClient` connector onto ``relay`` in memory, admitted
    as ``principal`` (``admission``'s refusals and limits fail the attempt as a refused upgrade
    would, and the client retries with its backoff)."""

    def connect(node: DERPNode, events: LinkEvents) -> defer.Deferred[ClientTransport]:
        server = admit_stream(relay, principal, admission)
        if isinstance(server, Refusal):
            return defer.fail(DERPClientError(f"the relay refused us: {server.status} {server.message}"))
        if isinstance(server, str):
            return defer.fail(DERPClientError(f"the relay refused us: {server}"))
        client = MemoryClientEnd(events)
        connect_pair(clock, client, server, client_name=name, server_name=f"relay {node.name}")
        server.start(b"")
        return defer.succeed(client)

    return connect
