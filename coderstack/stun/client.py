"""STUN client: a transaction manager that does not own a socket.

Whoever owns the UDP socket (the tunnel's one socket later, or :func:`open_stun_client` for
standalone use) gives :class:`STUNClient` a ``send(datagram, (ip, port))`` callable and hands it
every incoming datagram that :func:`coderstack.wire.stun.is_stun` accepts, through
:meth:`STUNClient.datagram_received`. The mapping a STUN server reports is the mapping of the
socket the request left from, which is why the socket must be shared rather than private.

Retransmission follows RFC 8489 section 6.2.1: RTO (default 500 ms) doubling after each send,
``max_transmissions`` sends (Rc, default 7), then a final wait of ``final_wait`` x RTO (Rm, 16).
netcheck instead sends single-shot transactions on Tailscale's probe plan (``max_transmissions=1``),
so each round-trip time is unambiguous. Timers use the injected clock (``IReactorTime``).

On the wire (UDP, one STUN message per datagram; the codec and its layout are
:mod:`coderstack.wire.stun`):

- out: a Binding request (type 0x0001, magic cookie, a fresh random 96-bit transaction id) with
  SOFTWARE (``tailnode`` unless told otherwise) and FINGERPRINT; retransmissions repeat the
  same bytes, so an answer to any of them completes the transaction;
- in: a Binding success (0x0101) whose XOR-MAPPED-ADDRESS (or the non-standard 0x8020, or the
  classic MAPPED-ADDRESS) is our mapping, or a Binding error (0x0111) with ERROR-CODE and
  perhaps UNKNOWN-ATTRIBUTES; matched to its request by transaction id alone. Anything else is
  counted (``malformed``, ``unmatched``) and dropped.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure

from coderstack.twistedtypes import Clock, DatagramTransport, DelayedCall, UDPReactor
from coderstack.wire import stun

Address = tuple[str, int]
SendFn = Callable[[bytes, Address], None]

#: Tailscale's STUN servers answer only requests whose SOFTWARE is this; ours and coturn answer any.
TAILSCALE_SOFTWARE = b"tailnode"


class STUNTimeout(Exception):
    """No answer from the server within the schedule."""


class STUNErrorResponse(Exception):
    def __init__(self, code: int, reason: str, unknown: tuple[int, ...] = ()) -> None:
        super().__init__(f"STUN error {code} {reason}" + (f" (unknown {unknown})" if unknown else ""))
        self.code = code
        self.reason = reason
        self.unknown = unknown


@dataclass(frozen=True)
class STUNResult:
    server: Address
    mapped: Address  # our address and port as the server saw them
    rtt: float  # seconds from the first transmission to the answer
    transmissions: int
    software: str = ""


class _Transaction:
    __slots__ = ("server", "datagram", "deferred", "started", "sent", "rto", "max_tx",
                 "final_wait", "timer", "deadline")

    def __init__(self, server: Address, datagram: bytes, deferred: defer.Deferred,
                 started: float, rto: float, max_tx: int, final_wait: float) -> None:
        self.server = server
        self.datagram = datagram
        self.deferred = deferred
        self.started = started
        self.sent = 0
        self.rto = rto
        self.max_tx = max_tx
        self.final_wait = final_wait
        self.timer: DelayedCall | None = None
        self.deadline: DelayedCall | None = None


class STUNClient:
    def __init__(
        self,
        send: SendFn,
        clock: Clock,
        *,
        software: bytes | None = TAILSCALE_SOFTWARE,
        rto: float = 0.5,
        max_transmissions: int = 7,
        final_wait: float = 16.0,
    ) -> None:
        self._send = send
        self._clock = clock
        self.software = software
        self.rto = rto
        self.max_transmissions = max_transmissions
        self.final_wait = final_wait
        self._pending: dict[bytes, _Transaction] = {}
        self.unmatched = 0  # answers to no pending transaction (late, duplicate, forged)
        self.malformed = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def query(
        self,
        server: Address,
        *,
        rto: float | None = None,
        max_transmissions: int | None = None,
        timeout: float | None = None,
    ) -> defer.Deferred[STUNResult]:
        """Ask ``server`` (an IP literal and port) for our mapped address.

        Fires with :class:`STUNResult`; fails with :class:`STUNTimeout`,
        :class:`STUNErrorResponse`, or the ``OSError`` the send callable raised. ``timeout``
        caps the whole transaction. Cancelling the Deferred stops the retransmissions.
        """
        tid, datagram = stun.binding_request(software=self.software)
        while tid in self._pending:  # 96 random bits: never, but be exact
            tid, datagram = stun.binding_request(software=self.software)

        def cancel(_d: defer.Deferred) -> None:
            self._finish(tid)

        d: defer.Deferred[STUNResult] = defer.Deferred(cancel)
        tx = _Transaction(
            server, datagram, d, self._clock.seconds(),
            self.rto if rto is None else rto,
            self.max_transmissions if max_transmissions is None else max(1, max_transmissions),
            self.final_wait,
        )
        self._pending[tid] = tx
        if timeout is not None:
            tx.deadline = self._clock.callLater(timeout, self._expire, tid)
        self._transmit(tid)
        return d

    def _transmit(self, tid: bytes) -> None:
        tx = self._pending.get(tid)
        if tx is None:
            return
        tx.timer = None
        try:
            self._send(tx.datagram, tx.server)
        except OSError as e:
            d = self._finish(tid)
            if d is not None:
                d.errback(Failure(e))
            return
        tx.sent += 1
        if tx.sent < tx.max_tx:
            wait = tx.rto * (2 ** (tx.sent - 1))
            tx.timer = self._clock.callLater(wait, self._transmit, tid)
        else:
            tx.timer = self._clock.callLater(tx.rto * tx.final_wait, self._expire, tid)

    def _expire(self, tid: bytes) -> None:
        tx = self._pending.get(tid)
        if tx is None:
            return
        server, sent = tx.server, tx.sent
        d = self._finish(tid)
        if d is not None:
            d.errback(STUNTimeout(f"no STUN answer from {server[0]}:{server[1]} after {sent} sends"))

    def _finish(self, tid: bytes) -> defer.Deferred | None:
        tx = self._pending.pop(tid, None)
        if tx is None:
            return None
        for call in (tx.timer, tx.deadline):
            if call is not None and call.active():
                call.cancel()
        return tx.deferred

    def datagram_received(self, datagram: bytes, addr: tuple[Any, ...]) -> bool:
        """Feed one datagram; True when it answered one of our transactions."""
        try:
            resp = stun.parse_response(datagram)
        except stun.STUNError:
            self.malformed += 1
            return False
        tx = self._pending.get(resp.transaction_id)
        if tx is None:
            self.unmatched += 1
            return False
        rtt = self._clock.seconds() - tx.started
        sent = tx.sent
        d = self._finish(resp.transaction_id)
        assert d is not None
        if resp.error is not None:
            d.errback(STUNErrorResponse(resp.error[0], resp.error[1], resp.unknown_attributes))
        else:
            assert resp.mapped is not None
            d.callback(STUNResult(tx.server, resp.mapped, rtt, sent, resp.software))
        return True

    def cancel_all(self) -> None:
        for tid in list(self._pending):
            tx = self._pending[tid]
            tx.deferred.cancel()


# --- standalone use: a client with its own sockets --------------------------------------------


class _Receiver(DatagramProtocol):
    def __init__(self, client: STUNClient) -> None:
        self.client = client

    def datagramReceived(self, datagram: bytes, addr: tuple[Any, ...]) -> None:
        if stun.is_stun(datagram):
            self.client.datagram_received(datagram, addr)


class STUNSocket:
    """A :class:`STUNClient` with its own UDP sockets (one IPv4, one IPv6, bound on first use)."""

    def __init__(self, reactor: UDPReactor, *, v4_interface: str = "0.0.0.0",
                 v6_interface: str = "::", port: int = 0, **client_kw: Any) -> None:
        self.reactor = reactor
        self.v4_interface = v4_interface
        self.v6_interface = v6_interface
        self.bind_port = port
        self.client = STUNClient(self._send, reactor, **client_kw)
        self._ports: dict[int, DatagramTransport] = {}

    def port_for(self, family: int) -> DatagramTransport:
        """The listening port for ``socket.AF_INET`` or ``AF_INET6`` (bound now if needed)."""
        p = self._ports.get(family)
        if p is None:
            iface = self.v6_interface if family == socket.AF_INET6 else self.v4_interface
            p = self.reactor.listenUDP(self.bind_port, _Receiver(self.client), interface=iface)
            self._ports[family] = p
        return p

    def local_address(self, family: int = socket.AF_INET) -> Address:
        h = self.port_for(family).getHost()
        return h.host, h.port

    def _send(self, datagram: bytes, addr: Address) -> None:
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        try:
            port = self.port_for(family)
        except Exception as e:  # CannotListenError etc.: no such family here
            raise OSError(f"cannot open a UDP socket for {addr[0]}: {e}") from e
        port.write(datagram, addr)

    def query(self, server: Address, **kw: Any) -> defer.Deferred[STUNResult]:
        return self.client.query(server, **kw)

    def close(self) -> defer.Deferred[list[Any]]:
        self.client.cancel_all()
        ds = [defer.maybeDeferred(p.stopListening) for p in self._ports.values()]
        self._ports.clear()
        return defer.gatherResults(ds)


def open_stun_client(reactor: UDPReactor, **kw: Any) -> STUNSocket:
    """Convenience for standalone use: ``s = open_stun_client(reactor); await s.query(addr)``."""
    return STUNSocket(reactor, **kw)
