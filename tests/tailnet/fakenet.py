"""An in-memory UDP network and DERP relay for Conn tests on a task.Clock (no sockets)."""

from __future__ import annotations

from typing import Any

from twisted.internet import task

LATENCY = 0.002  # one way, UDP
DERP_LATENCY = 0.010  # one way, via the relay


class _Host:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port


class FakePort:
    def __init__(self, host: str, port: int) -> None:
        self._host = _Host(host, port)

    def getHost(self) -> _Host:
        return self._host

    def stopListening(self) -> None:
        pass


class FakeTransport:
    def __init__(self, net: Network, addr: tuple[str, int]) -> None:
        self.net, self.addr = net, addr

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.net.udp(self.addr, addr, data)


class Network:
    """UDP between attached magicsocks; ``blocked`` drops every UDP datagram."""

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.socks: dict[tuple[str, int], Any] = {}
        self.blocked = False
        self.udp_delivered = 0
        self.derp_delivered = 0
        self.derp_clients: dict[bytes, FakeDERPClient] = {}

    def attach(self, conn: Any, ip: str, port: int) -> None:
        sock = conn.sock
        sock.port = FakePort(ip, port)
        sock.transport = FakeTransport(self, (ip, port))
        self.socks[(ip, port)] = sock
        sock._schedule()

    def udp(self, src: tuple[str, int], dst: tuple[str, int], data: bytes) -> None:
        if self.blocked or dst not in self.socks:
            return

        def deliver() -> None:
            if not self.blocked:
                self.udp_delivered += 1
                self.socks[dst].datagramReceived(data, src)

        self.clock.callLater(LATENCY, deliver)

    def derp_factory(self, key: bytes):
        def make(region: Any, handler: Any) -> FakeDERPClient:
            c = FakeDERPClient(self, key, handler)
            self.derp_clients[key] = c
            return c

        return make


class FakeDERPClient:
    def __init__(self, net: Network, key: bytes, handler: Any) -> None:
        self.net, self.key, self.handler = net, key, handler
        self.sent = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def note_preferred(self, preferred: bool) -> None:
        pass

    def send(self, dst: bytes, packet: bytes) -> bool:
        self.sent += 1
        peer = self.net.derp_clients.get(dst)
        if peer is not None:
            def deliver() -> None:
                self.net.derp_delivered += 1
                peer.handler.packet_received(self.key, packet)

            self.net.clock.callLater(DERP_LATENCY, deliver)
        return True
