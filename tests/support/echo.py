"""Small peers for the tests that carry bytes somewhere and back: a TCP echo, a TCP collector, a
UDP echo (answering ``echo:`` + the datagram) and a UDP client that keeps what it receives."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buf += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class UDPEcho(protocol.DatagramProtocol):
    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.write(b"echo:" + data, addr)


class UDPClient(protocol.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)
