"""The forwarder of ``port-forward``: a local listener for every spec, through two hooks.

* ``tcp_endpoint(port) -> IStreamClientEndpoint``: a stream endpoint to that port on the agent
  (see :mod:`coderstack.forward.stream`);
* ``udp_dial(port, on_datagram) -> Deferred[DatagramFlow]`` or None: a datagram flow to that
  port on the agent (see :mod:`coderstack.forward.datagram`).

Over the tunnel the hooks go through the netstack; on plain sockets they reach this machine,
so the same forwarder runs either way.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from coderstack.forward.datagram import DatagramForwarder, UDPDial
from coderstack.forward.spec import (
    ForwardSpec,
    SpecError,
    dial_failed_line,
    format_addr,
    forwarding_line,
)
from coderstack.forward.stream import StreamForwardFactory, TCPEndpointFor

log = Logger()

IPV4_LOOPBACK = "127.0.0.1"
IPV6_LOOPBACK = "::1"


class ListenError(Exception):
    pass


def have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind((IPV6_LOOPBACK, 0))
        return True
    except OSError:
        return False


class Forwarder:
    """Listens for every spec and forwards through the hooks; ``stop()`` closes the listeners.
    Each line worth showing the user (what listens, which dial failed) goes to ``say``."""

    def __init__(self, reactor: Any, tcp_endpoint: TCPEndpointFor, udp_dial: UDPDial | None,
                 say: Callable[[str], None], ipv6: bool | None = None) -> None:
        self.reactor, self.tcp_endpoint, self.udp_dial, self.say = reactor, tcp_endpoint, udp_dial, say
        self.ipv6 = have_ipv6_loopback() if ipv6 is None else ipv6
        self.ports: list[Any] = []

    def dial_failed(self, network: str, dial_port: int, why: str) -> None:
        self.say(dial_failed_line(network, dial_port, why))

    def _listen(self, spec: ForwardSpec, host: str) -> Any:
        self.say(forwarding_line(spec.network, host, spec.listen_port, spec.dial_port))
        if spec.network == "tcp":
            factory = StreamForwardFactory(self.tcp_endpoint, spec.dial_port, self)
            port = self.reactor.listenTCP(spec.listen_port, factory, interface=host)
        else:
            if self.udp_dial is None:
                raise SpecError("UDP forwarding is not available on this connection")
            listener = DatagramForwarder(self.udp_dial, spec.dial_port, self)
            port = self.reactor.listenUDP(spec.listen_port, listener, interface=host)
        self.ports.append(port)
        return port

    def start(self, specs: list[ForwardSpec]) -> list[Any]:
        """Listen for every spec (raises :class:`ListenError` and closes what it opened)."""
        try:
            for spec in specs:
                if spec.listen_host:
                    hosts = [spec.listen_host]
                else:
                    hosts = [IPV4_LOOPBACK]
                    if self.ipv6:
                        try:
                            self._listen(spec, IPV6_LOOPBACK)
                        except Exception as err:  # opportunistic, as Coder
                            log.info("failed to listen on IPv6 for {spec}: {err}", spec=spec, err=err)
                for host in hosts:
                    try:
                        self._listen(spec, host)
                    except Exception as err:
                        raise ListenError(
                            f"listen '{spec.network}://{format_addr(host, spec.listen_port)}': {err}") from err
        except Exception:
            self.stop()
            raise
        return list(self.ports)

    def stop(self) -> defer.Deferred[Any]:
        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
