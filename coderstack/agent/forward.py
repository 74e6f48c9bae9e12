"""The agent's forwarder: a tunnel connection to any port it does not serve itself goes on to
that port on the workspace's own loopback, as Coder's agent does (what ``port-forward`` and web
apps reach). Ports 1-8 are reserved for the agent's services and never forwarded.

Only tunnel peers get here, and the coordinator authorized each of them for this workspace.
Both directions keep Twisted's producer/consumer backpressure (``twisted.protocols.portforward``).
"""

from __future__ import annotations

from typing import Any

from twisted.protocols import portforward

MIN_FORWARDED_PORT = 9
LOOPBACK = "127.0.0.1"


class LocalPortProxy(portforward.ProxyServer):
    def connectionMade(self) -> None:  # noqa: N802 - twisted API
        port = self.transport.getHost().port
        if port < MIN_FORWARDED_PORT:
            self.transport.abortConnection()
            return
        # As ProxyServer does, but the destination port is the one the peer asked for.
        self.transport.pauseProducing()
        client = self.clientProtocolFactory()
        client.setServer(self)
        self.factory.reactor.connectTCP(LOOPBACK, port, client, timeout=10)


class LocalPortForwarder(portforward.ProxyFactory):
    protocol = LocalPortProxy

    def __init__(self, reactor: Any) -> None:
        super().__init__(LOOPBACK, 0)
        self.reactor = reactor
