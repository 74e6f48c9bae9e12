"""A thin Twisted adapter: one WireGuard :class:`~coderstack.wire.wireguard.Device` talking to one
peer over one UDP socket. For tests, interop and benchmarks; magicsock does the real multi-peer,
multi-path job with the same Device API.

Datagrams in go to ``Device.receive``; IP packets out go to ``Device.send``; the events are
carried out here (write to the socket, hand packets to ``on_packet``), and the Device's timers run
from ``IReactorTime.callLater`` at ``Device.next_deadline()``.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol

from coderstack.wire.wireguard import (
    AuthenticatedSource,
    Device,
    HandshakeComplete,
    HandshakeFailed,
    Packet,
    Reply,
    Transmit,
)


class WireGuardUDP(DatagramProtocol):
    """Bind ``device`` and the peer ``peer_key`` (reached at ``peer_address``) to a UDP port.

    ``on_packet(data)`` receives each decrypted IP packet. With ``roam`` the peer's address
    follows the source of its authenticated packets, as WireGuard endpoints do.
    """

    def __init__(
        self,
        device: Device,
        peer_key: bytes,
        peer_address: tuple[str, int] | None,
        clock: IReactorTime,
        on_packet: Callable[[bytes], object] | None = None,
        roam: bool = True,
    ) -> None:
        self.device = device
        self.peer_key = peer_key
        self.peer_address = peer_address
        self.clock = clock
        self.on_packet = on_packet
        self.roam = roam
        self.handshakes = 0
        self._waiting: list[Deferred[HandshakeComplete]] = []
        self._timer: IDelayedCall | None = None
        self._timer_at = float("inf")

    # -- API for tests and benchmarks --

    def send(self, packet: bytes) -> None:
        """Encrypt and send one IP packet to the peer."""
        events = self.device.send(self.peer_key, packet, self.clock.seconds())
        if (
            len(events) == 1
            and type(events[0]) is Transmit
            and self.peer_address is not None
            and self.transport is not None
        ):
            # The common case, kept short: one datagram out, at most a timer to move earlier.
            self.transport.write(events[0].datagram, self.peer_address)
            deadline = self.device.next_deadline()
            if deadline is not None and deadline < self._timer_at:
                self._schedule(deadline)
            return
        self._handle(events)

    def send_many(self, packets: list[bytes]) -> None:
        """Encrypt and send several IP packets, in order."""
        self._handle(self.device.send_many(self.peer_key, packets, self.clock.seconds()))

    def initiate(self) -> None:
        """Start a handshake now (rate-limited to one per 5 s by the protocol)."""
        self._handle(self.device.initiate(self.peer_key, self.clock.seconds()))

    def when_handshake_complete(self) -> Deferred[HandshakeComplete]:
        """A Deferred that fires with the next HandshakeComplete event."""
        d: Deferred[HandshakeComplete] = Deferred()
        self._waiting.append(d)
        return d

    # -- DatagramProtocol --

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        self._handle(self.device.receive(datagram, self.clock.seconds(), addr))

    def stopProtocol(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- plumbing --

    def _handle(self, events: list) -> None:
        for event in events:
            kind = type(event)
            if kind is Transmit:
                if self.peer_address is not None and self.transport is not None:
                    self.transport.write(event.datagram, self.peer_address)
            elif kind is Packet:
                if self.roam and event.source is not None:
                    self.peer_address = event.source
                if self.on_packet is not None:
                    self.on_packet(event.data)
            elif kind is Reply:
                if self.transport is not None:
                    self.transport.write(event.datagram, event.source)
            elif kind is AuthenticatedSource:
                if self.roam and event.source is not None:
                    self.peer_address = event.source
            elif kind is HandshakeComplete:
                self.handshakes += 1
                if self.roam and event.source is not None:
                    self.peer_address = event.source
                waiting, self._waiting = self._waiting, []
                for d in waiting:
                    d.callback(event)
            elif kind is HandshakeFailed:
                waiting, self._waiting = self._waiting, []
                for d in waiting:
                    d.errback(RuntimeError("WireGuard handshake failed"))
        deadline = self.device.next_deadline()
        if deadline is not None and deadline < self._timer_at:
            self._schedule(deadline)

    def _schedule(self, deadline: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer_at = deadline
        delay = max(0.0, deadline - self.clock.seconds())
        self._timer = self.clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        self._handle(self.device.tick(self.clock.seconds()))
