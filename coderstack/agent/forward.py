"""The agent's forwarders: a tunnel connection to any port it does not serve itself goes on to
that port on the workspace's own loopback, as Coder's agent does (what ``port-forward`` and web
apps reach). The agent's own ports (below :data:`~coderstack.wire.ports.MIN_FORWARDED_PORT`)
are never forwarded.

Only tunnel peers get here, and the coordinator authorized each of them for this workspace.

TCP: both directions keep Twisted's producer/consumer backpressure
(``twisted.protocols.portforward``).

UDP (``port-forward --udp``): each (peer address, peer port, tunnel port) is a flow with a UDP
socket of its own on the loopback, "connected" to ``127.0.0.1:<tunnel port>``; what comes back on
it returns to the peer from the tunnel port it wrote to. The flows are a
:class:`~coderstack.forward.flows.FlowTable`: one closes after ``idle_timeout`` seconds without a
datagram either way, and at most ``max_flows`` exist at once (more are dropped and counted), so a
peer cannot exhaust the workspace's sockets.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

from twisted.internet import error, protocol
from twisted.logger import Logger
from twisted.protocols import portforward

from coderstack.forward.flows import FlowTable
from coderstack.twistedtypes import datagram_transport, stream_transport
from coderstack.wire.ports import MIN_FORWARDED_PORT

log = Logger()

LOOPBACK = "127.0.0.1"
UDP_IDLE_TIMEOUT = 120.0  # seconds; a UDP "connection" has no end but silence
MAX_UDP_FLOWS = 1024

Address = tuple[str, int]
FlowKey = tuple[Address, Address]  # (peer, tunnel end)


class LocalPortProxy(portforward.ProxyServer):
    factory: LocalPortForwarder

    def connectionMade(self) -> None:
        transport = stream_transport(self)
        port = transport.getHost().port
        if port < MIN_FORWARDED_PORT:
            transport.abortConnection()
            return
        # As ProxyServer does, but the destination port is the one the peer asked for.
        transport.pauseProducing()
        client = self.clientProtocolFactory()
        client.setServer(self)
        self.factory.reactor.connectTCP(LOOPBACK, port, client, timeout=10)


class LocalPortForwarder(portforward.ProxyFactory):
    protocol = LocalPortProxy

    def __init__(self, reactor: Any) -> None:
        super().__init__(LOOPBACK, 0)
        self.reactor = reactor


class TunnelUDP(Protocol):
    """The netstack's UDP catch-all (``Netstack.listen_udp_any``) as the forwarder uses it."""

    def write(self, data: bytes, src: Address, dst: Address) -> None: ...
    def stopListening(self) -> Any: ...


class _UDPFlow(protocol.DatagramProtocol):
    """One peer's datagrams to one workspace port, through a loopback socket of its own."""

    def __init__(self, forwarder: LocalUDPForwarder, key: FlowKey) -> None:
        self.forwarder = forwarder
        self.peer, self.tunnel_end = key
        self.key = key
        self.port: Any = None

    def to_workspace(self, data: bytes) -> None:
        self.forwarder.flows.touch(self.key)
        try:
            datagram_transport(self).write(data)
        except (error.MessageLengthError, OSError):
            self.forwarder.counters["workspace_send_errors"] += 1

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.forwarder.flows.touch(self.key)
        tunnel = self.forwarder.tunnel
        if tunnel is None:
            return
        try:
            tunnel.write(data, self.tunnel_end, self.peer)
            self.forwarder.counters["replies"] += 1
        except (error.MessageLengthError, ValueError):
            self.forwarder.counters["reply_too_big"] += 1

    def connectionRefused(self) -> None:
        self.forwarder.counters["refused"] += 1

    def close(self) -> None:
        if self.port is not None:
            self.port.stopListening()
            self.port = None


class LocalUDPForwarder:
    """The UDP catch-all of the agent's tunnel address (``Netstack.listen_udp_any``)."""

    def __init__(self, reactor: Any, idle_timeout: float = UDP_IDLE_TIMEOUT, max_flows: int = MAX_UDP_FLOWS) -> None:
        self.reactor = reactor
        self.flows: FlowTable[FlowKey, _UDPFlow] = FlowTable(reactor, idle_timeout, max_flows)
        self.counters: Counter[str] = Counter()
        self.tunnel: TunnelUDP | None = None

    def attach(self, netstack: Any) -> None:
        """Serve every otherwise unbound UDP port of ``netstack``."""
        self.tunnel = netstack.listen_udp_any(self)

    def datagram_received(self, data: bytes, src: Address, dst: Address) -> None:
        if dst[1] < MIN_FORWARDED_PORT:
            self.counters["reserved_port"] += 1
            return
        key = (src, dst)
        flow = self.flows.get(key)
        if flow is None:
            if self.flows.full():
                self.counters["too_many_flows"] += 1
                return
            flow = _UDPFlow(self, key)
            try:
                flow.port = self.reactor.listenUDP(0, flow, interface=LOOPBACK)
                datagram_transport(flow).connect(LOOPBACK, dst[1])
            except (error.CannotListenError, OSError) as err:
                self.counters["socket_errors"] += 1
                log.warn("cannot forward UDP to port {port}: {why}", port=dst[1], why=str(err))
                flow.close()
                return
            self.flows.add(key, flow)
            self.counters["flows"] += 1
        flow.to_workspace(data)

    def stop(self) -> None:
        self.flows.close_all()
        if self.tunnel is not None:
            self.tunnel.stopListening()
            self.tunnel = None
