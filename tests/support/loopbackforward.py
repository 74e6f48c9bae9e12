"""The forwarder's hooks on plain sockets: the "workspace" is this machine's loopback."""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import TCP4ClientEndpoint

from coderstack.forward.datagram import UDPDial, datagram_flow_dial
from coderstack.forward.spec import DIAL_HOST
from coderstack.forward.stream import TCPEndpointFor


def loopback_tcp_endpoint(reactor: Any, host: str = DIAL_HOST) -> TCPEndpointFor:
    return lambda port: TCP4ClientEndpoint(reactor, host, port)


def loopback_udp_dial(reactor: Any, host: str = DIAL_HOST) -> UDPDial:
    return datagram_flow_dial(lambda port, proto: reactor.listenUDP(port, proto, interface=host), host)
