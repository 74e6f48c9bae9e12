"""TCP forwarding: each connection accepted on a local listener dials one workspace port.

The local side stays paused until the workspace side is connected, so nothing is read that
could not be passed on; then both directions keep Twisted's producer/consumer backpressure.
A failed dial is reported up and closes the local connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import protocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure

from coderstack.forward.report import DialReport
from coderstack.twistedtypes import stream_client, stream_transport

# A stream endpoint to that port on the agent (over the tunnel: the netstack's client endpoint
# for the agent's address).
TCPEndpointFor = Callable[[int], IStreamClientEndpoint]


class _Remote(protocol.Protocol):
    """The workspace side of one forwarded connection."""

    def __init__(self, local: _Local) -> None:
        self.local = local

    def connectionMade(self) -> None:
        self.local.remote_connected(self)

    def dataReceived(self, data: bytes) -> None:
        stream_transport(self.local).write(data)

    def connectionLost(self, reason: Any = None) -> None:
        stream_transport(self.local).loseConnection()


class _Local(protocol.Protocol):
    """A connection accepted on the local listener; dials the workspace before reading."""

    def __init__(self, endpoint_for: TCPEndpointFor, dial_port: int, report: DialReport) -> None:
        self.endpoint_for, self.dial_port, self.report = endpoint_for, dial_port, report
        self.remote: _Remote | None = None
        self.closed = False

    def connectionMade(self) -> None:
        stream_transport(self).pauseProducing()
        endpoint = stream_client(self.endpoint_for(self.dial_port))
        d = endpoint.connect(protocol.Factory.forProtocol(lambda: _Remote(self)))
        d.addErrback(self._dial_failed)

    def _dial_failed(self, failure: Failure) -> None:
        self.report.dial_failed("tcp", self.dial_port, failure.getErrorMessage())
        stream_transport(self).loseConnection()

    def remote_connected(self, remote: _Remote) -> None:
        if self.closed:
            stream_transport(remote).loseConnection()
            return
        self.remote = remote
        local, far = stream_transport(self), stream_transport(remote)
        # Backpressure both ways: each side pauses the other when its write buffer fills.
        local.registerProducer(far, True)
        far.registerProducer(local, True)
        local.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.remote is not None:
            stream_transport(self.remote).write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        if self.remote is not None:
            stream_transport(self.remote).loseConnection()


class StreamForwardFactory(protocol.Factory):
    """The factory of a local TCP listener whose connections go to ``dial_port`` in the workspace."""

    def __init__(self, endpoint_for: TCPEndpointFor, dial_port: int, report: DialReport) -> None:
        self.endpoint_for, self.dial_port, self.report = endpoint_for, dial_port, report

    def buildProtocol(self, addr: Any) -> _Local:
        return _Local(self.endpoint_for, self.dial_port, self.report)
