"""The stack: demultiplexes whole IPv6 packets to TCP connections, listeners, UDP sockets and
ICMPv6, and keeps one timer heap for all connections.  Sans-IO:

- ``Stack(addresses, emit)``: ``emit(packet: bytes)`` is called for every outgoing IPv6 packet.
- ``receive(packet, now)``: one inbound IPv6 packet (bytes).
- ``next_deadline()`` / ``tick(now)``: the earliest time something is due, and running what is due.

Malformed, refused and unwanted packets are dropped and counted in ``stats`` (a Counter).
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Protocol

from . import icmpv6, ipv6, tcpsegment, udp
from .isn import ISNGenerator
from .listener import Accept, Listener
from .tcp import INF, Connection, ConnectionHandler
from .tcpconfig import TCPConfig
from .tcpsegment import ACK, RST, SYN, build_packet
from .tcpstate import State

ANY_PORT = 0  # listen(ANY_PORT, ...) accepts connections to every port nobody else listens on

__all__ = ["DatagramReceiver", "Stack", "TCPConfig", "UDPCatchAll", "UDPSocket", "to_address"]

_TCP_HDR = struct.Struct("!HHIIBBH")
EPHEMERAL = (49152, 65535)


def to_address(addr: str | bytes | ipaddress.IPv6Address) -> bytes:
    if isinstance(addr, bytes) and len(addr) == 16:
        return addr
    return ipaddress.IPv6Address(addr if not isinstance(addr, bytes) else addr.decode()).packed


class DatagramReceiver(Protocol):
    """The handler of a bound UDP port."""

    def datagram_received(self, data: bytes, src: tuple[bytes, int]) -> None: ...


class UDPCatchAll(Protocol):
    """The handler of datagrams to ports nobody bound."""

    def datagram_received(self, data: bytes, src: tuple[bytes, int], dst: tuple[bytes, int]) -> None: ...


class UDPSocket:
    """A bound UDP port.  The handler gets ``datagram_received(data, (address_bytes, port))``."""

    def __init__(self, stack: Stack, address: bytes | None, port: int, handler: DatagramReceiver) -> None:
        self.stack = stack
        self.address = address
        self.port = port
        self.handler = handler

    def sendto(self, data: bytes, remote: bytes, port: int, src: bytes | None = None) -> None:
        self.stack.udp_send(data, src or self.address or self.stack.address, self.port, remote, port)

    def close(self) -> None:
        self.stack.udp_sockets.pop(self.port, None)


class Stack:
    """The table of connections, listeners and sockets of one node; each ``Connection`` sees
    it as its ``ConnectionHost``, each ``Listener`` as its ``ListenerHost``."""

    def __init__(
        self,
        addresses: Iterable[str | bytes] | str | bytes,
        emit: Callable[[bytes], None],
        *,
        config: TCPConfig | None = None,
        isn_secret: bytes | None = None,
        rng: random.Random | None = None,
        verify_tcp_checksum: bool = True,
    ) -> None:
        """``verify_tcp_checksum=False`` is for a stack whose every inbound packet was already
        authenticated end to end (WireGuard's AEAD, see tailnet/stack.py): the checksum then
        cannot catch anything the tag did not."""
        if isinstance(addresses, str | bytes):
            addresses = [addresses]
        self.addresses = [to_address(a) for a in addresses]
        self.address = self.addresses[0]
        self._addrset = frozenset(self.addresses)
        self.emit = emit
        self.config = config or TCPConfig()
        self.isn = ISNGenerator(isn_secret)
        self.rng = rng or random.Random()
        self.verify_tcp_checksum = verify_tcp_checksum
        self.stats: Counter[str] = Counter()
        self.connections: dict[tuple[bytes, int, bytes, int], Connection] = {}
        self.path_mtu: dict[bytes, int] = {}  # per-peer MTU overriding config.mtu
        self.listeners: dict[int, Listener] = {}
        self.udp_sockets: dict[int, UDPSocket] = {}
        # Datagrams to a port nobody bound.
        self.udp_catch_all: UDPCatchAll | None = None
        self.echo_handler: Callable[[bytes, int, int, bytes], None] | None = None
        self._timers: list[tuple[float, int, Connection]] = []
        self._batch_acks: set[Connection] | None = None
        self.on_error: Callable[[Exception], None] | None = None
        self._counter = itertools.count()

    # ------------------------------------------------------------------ timers

    def arm_timer(self, conn: Connection, at: float) -> None:
        heapq.heappush(self._timers, (at, next(self._counter), conn))

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def tick(self, now: float) -> None:
        timers = self._timers
        due = []
        while timers and timers[0][0] <= now:
            conn = heapq.heappop(timers)[2]
            if conn not in due:
                due.append(conn)
        for conn in due:
            if conn.state is not State.CLOSED and (conn.timer_at <= now or conn.timer_at == INF):
                conn.on_timer(now)

    # ------------------------------------------------------------------ input

    def receive_batch(self, packets: Iterable[bytes], now: float) -> None:
        """Handle several inbound packets that arrived together.  Connections that only owe a
        delayed ACK send one ACK at the end of the batch instead of one per two segments."""
        acks = self._batch_acks = set()
        try:
            for packet in packets:
                try:
                    self.receive(packet, now)
                except Exception as e:  # a bug must not cost the rest of the batch
                    self.stats["internal_error"] += 1
                    if self.on_error is not None:
                        self.on_error(e)
        finally:
            self._batch_acks = None
        for conn in acks:
            conn.send_deferred_ack(now)

    def defer_ack(self, conn: Connection) -> bool:
        batch = self._batch_acks
        if batch is None:
            return False
        batch.add(conn)
        return True

    def receive(self, packet: bytes, now: float) -> None:
        """Handle one inbound IPv6 packet."""
        try:
            if (
                len(packet) >= 60
                and packet[6] == 6
                and packet[0] >> 4 == 6
            ):
                # Fast path: TCP directly after the fixed header.
                plen = packet[4] << 8 | packet[5]
                end = 40 + plen
                if end > len(packet):
                    self.stats["ip_malformed"] += 1
                    return
                src = packet[8:24]
                dst = packet[24:40]
                off = 40
                nh = 6
            else:
                src, dst, nh, off, end, _hop = ipv6.parse(packet)
        except ipv6.Refused:
            self.stats["ip_refused"] += 1
            return
        except ipv6.Malformed:
            self.stats["ip_malformed"] += 1
            return
        if dst not in self._addrset:
            self.stats["ip_not_for_us"] += 1
            return
        if nh == 6:
            self._tcp_input(packet, src, dst, off, end, now)
        elif nh == 17:
            self._udp_input(packet[off:end], src, dst)
        else:
            self._icmp_input(packet, src, dst, off, end, now)

    def _tcp_input(self, packet: bytes, src: bytes, dst: bytes, off: int, end: int, now: float) -> None:
        seg = packet[off:end] if off != 40 or end != len(packet) else packet[40:]
        n = len(seg)
        if n < 20:
            self.stats["tcp_malformed"] += 1
            return
        if self.verify_tcp_checksum:
            total = int.from_bytes(packet[8:40], "big") + 6 + n + int.from_bytes(seg, "big")
            if n & 1:
                total += int.from_bytes(seg, "big") * 255
            if total % 0xFFFF:
                self.stats["tcp_bad_checksum"] += 1
                return
        sport, dport, seq, ack, doff, flags, win = _TCP_HDR.unpack_from(seg, 0)
        doff = (doff >> 4) << 2
        if doff < 20 or doff > n:
            self.stats["tcp_malformed"] += 1
            return
        conn = self.connections.get((src, sport, dst, dport))
        if conn is not None:
            conn.input(seg, doff, seq, ack, flags, win, now)
            return
        if flags & RST:
            return
        if flags & SYN and not flags & ACK:
            self.syn_to_listener(src, dst, sport, dport, seq, seg, doff, now)
            return
        self.stats["tcp_no_connection"] += 1
        self._reset_for(src, dst, sport, dport, seq, ack, flags, n - doff)

    def _reset_for(
        self, src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, dlen: int
    ) -> None:
        """RFC 9293 3.10.7.1: answer a segment for no connection with a RST."""
        if flags & ACK:
            pkt = build_packet(dst, src, dport, sport, ack, 0, RST, 0, b"", b"")
        else:
            seg_len = dlen + (flags & SYN and 1) + (flags & 1)
            pkt = build_packet(dst, src, dport, sport, 0, seq + seg_len, RST | ACK, 0, b"", b"")
        self.stats["tcp_rst_sent"] += 1
        self.emit(pkt)

    def syn_to_listener(
        self, src: bytes, dst: bytes, sport: int, dport: int, seq: int, seg: bytes, doff: int, now: float
    ) -> None:
        """RFC 9293 3.10.7.2: a SYN for the listener of ``dport`` (or the catch-all) becomes a
        connection in SYN_RECEIVED; without one it is refused with a RST."""
        listener = self.listeners.get(dport)
        if listener is None:
            # Port 0 never appears on the wire, so it is the key of a catch-all listener (the
            # agent's forwarder to its host's own ports).
            listener = self.listeners.get(ANY_PORT)
        if listener is None or (listener.address is not None and listener.address != dst):
            self.stats["tcp_no_listener"] += 1
            self._reset_for(src, dst, sport, dport, seq, 0, SYN, len(seg) - doff)
            return
        if listener.pending >= listener.backlog:
            self.stats["tcp_backlog_drop"] += 1
            return
        try:
            opts = tcpsegment.parse_options(seg, 20, doff)
        except tcpsegment.Malformed:
            self.stats["tcp_bad_options"] += 1
            return
        conn = self._new_connection(dst, dport, src, sport, now)
        conn.listener = listener
        listener.pending += 1
        self.connections[conn.key] = conn
        conn.open_passive(seq, opts, now)

    def _udp_input(self, msg: bytes, src: bytes, dst: bytes) -> None:
        try:
            sport, dport, data = udp.parse(src, dst, msg)
        except udp.Malformed:
            self.stats["udp_malformed"] += 1
            return
        sock = self.udp_sockets.get(dport)
        if sock is None and dport != ANY_PORT and self.udp_catch_all is not None:
            # As with TCP's catch-all listener: the agent's forwarder to its host's own ports.
            self.stats["udp_catch_all"] += 1
            self.udp_catch_all.datagram_received(data, (src, sport), (dst, dport))
            return
        if sock is None or (sock.address is not None and sock.address != dst):
            self.stats["udp_no_socket"] += 1
            invoking = ipv6.build(src, dst, ipv6.PROTO_UDP, msg)
            self.emit(icmpv6.build_error(dst, src, icmpv6.DEST_UNREACHABLE, icmpv6.CODE_PORT_UNREACHABLE, 0, invoking))
            return
        sock.handler.datagram_received(data, (src, sport))

    def _icmp_input(self, packet: bytes, src: bytes, dst: bytes, off: int, end: int, now: float) -> None:
        msg = packet[off:end]
        if len(msg) < 4 or not icmpv6.checksum.verify(src, dst, ipv6.PROTO_ICMPV6, msg):
            self.stats["icmp_malformed"] += 1
            return
        type_ = msg[0]
        if type_ == icmpv6.ECHO_REQUEST and len(msg) >= 8:
            _t, ident, seq, data = icmpv6.parse_echo(msg)
            self.stats["icmp_echo_requests"] += 1
            self.emit(icmpv6.build_echo(dst, src, icmpv6.ECHO_REPLY, ident, seq, data))
        elif type_ == icmpv6.ECHO_REPLY and len(msg) >= 8:
            _t, ident, seq, data = icmpv6.parse_echo(msg)
            if self.echo_handler is not None:
                self.echo_handler(src, ident, seq, data)
        elif type_ == icmpv6.PACKET_TOO_BIG and len(msg) >= 8 + 40 + 8:
            mtu = int.from_bytes(msg[4:8], "big")
            inner = msg[8:]
            if inner[6] != ipv6.PROTO_TCP:
                self.stats["icmp_ptb_other"] += 1
                return
            isrc, idst = inner[8:24], inner[24:40]
            sport, dport, seq = struct.unpack_from("!HHI", inner, 40)
            conn = self.connections.get((idst, dport, isrc, sport))
            self.stats["icmp_packet_too_big"] += 1
            if conn is not None:
                conn.packet_too_big(mtu, seq, now)
        else:
            self.stats["icmp_ignored"] += 1

    # ------------------------------------------------------------------ API

    def listen(
        self, port: int, accept: Accept, backlog: int = 128, address: str | bytes | None = None
    ) -> Listener:
        """Passive open.  ``accept(conn)`` runs when a connection is established and returns its
        handler (or None to refuse it with a RST)."""
        if port in self.listeners:
            raise OSError(f"port {port} already has a listener")
        listener = Listener(self, port, accept, backlog, to_address(address) if address else None)
        self.listeners[port] = listener
        return listener

    def remove_listener(self, listener: Listener) -> None:
        if self.listeners.get(listener.port) is listener:
            del self.listeners[listener.port]

    def connect(
        self,
        remote: str | bytes,
        port: int,
        handler: ConnectionHandler,
        now: float,
        local: str | bytes | None = None,
        local_port: int | None = None,
    ) -> Connection:
        """Active open; ``handler.connection_made(conn)`` runs when established."""
        raddr = to_address(remote)
        laddr = to_address(local) if local else self.address
        if local_port is None:
            local_port = self._ephemeral_port(raddr, port, laddr)
        elif (raddr, port, laddr, local_port) in self.connections:
            raise OSError("address in use")
        conn = self._new_connection(laddr, local_port, raddr, port, now)
        conn.handler = handler
        self.connections[conn.key] = conn
        conn.open_active(now)
        return conn

    def _ephemeral_port(self, remote: bytes, port: int, local: bytes) -> int:
        lo, hi = EPHEMERAL
        for _ in range(64):
            p = self.rng.randint(lo, hi)
            if (remote, port, local, p) not in self.connections and p not in self.listeners:
                return p
        for p in range(lo, hi + 1):
            if (remote, port, local, p) not in self.connections and p not in self.listeners:
                return p
        raise OSError("no free local port")

    def _new_connection(self, local: bytes, lport: int, remote: bytes, rport: int, now: float) -> Connection:
        cfg = self.config
        return Connection(
            self, local, lport, remote, rport, cfg, now,
            iss=self.isn(local, lport, remote, rport, now),
            mtu=self.path_mtu.get(remote, cfg.mtu),
            ts_offset=self.rng.getrandbits(32),
        )

    def remove_connection(self, conn: Connection) -> None:
        if self.connections.get(conn.key) is conn:
            del self.connections[conn.key]

    def udp_bind(self, port: int, handler: DatagramReceiver, address: str | bytes | None = None) -> UDPSocket:
        if port == 0:
            port = self.rng.randint(*EPHEMERAL)
            while port in self.udp_sockets:
                port = self.rng.randint(*EPHEMERAL)
        if port in self.udp_sockets:
            raise OSError(f"UDP port {port} in use")
        sock = UDPSocket(self, to_address(address) if address else None, port, handler)
        self.udp_sockets[port] = sock
        return sock

    def udp_send(self, data: bytes, src: bytes, sport: int, dst: bytes, dport: int) -> None:
        """One datagram from ``[src]:sport`` (one of our addresses) to ``[dst]:dport``."""
        if len(data) + 48 > self.config.mtu:
            # No fragmentation in the tunnel: a datagram must fit in one packet.
            raise ValueError(f"datagram of {len(data)} bytes does not fit the MTU ({self.config.mtu})")
        self.emit(udp.build(src, dst, sport, dport, data))

    def set_path_mtu(self, remote: str | bytes, mtu: int | None, now: float) -> None:
        """Set (or with None, forget) the MTU of the path to ``remote``: new connections announce
        an MSS from it, existing ones re-segment what they send."""
        addr = to_address(remote)
        if mtu is None:
            self.path_mtu.pop(addr, None)
            mtu = self.config.mtu
        else:
            self.path_mtu[addr] = mtu
        for conn in list(self.connections.values()):
            if conn.remote == addr:
                conn.set_mtu(mtu, now)

    def ping(self, remote: str | bytes, ident: int, seq: int, data: bytes = b"") -> None:
        """Send an ICMPv6 echo request; replies go to ``echo_handler(src, ident, seq, data)``."""
        self.emit(icmpv6.build_echo(self.address, to_address(remote), icmpv6.ECHO_REQUEST, ident, seq, data))
