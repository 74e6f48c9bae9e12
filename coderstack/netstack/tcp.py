"""TCP connections: the RFC 9293 state machine, sans-IO.

A ``Connection`` is driven by its stack: ``input`` with one parsed segment, ``on_timer`` when
one of its timers is due, and the application calls ``write``/``flush``/``close``/
``shutdown_write``/``abort``/``pause_reading``/``resume_reading``.  Everything takes the current
time ``now`` (seconds, float) from the caller.  The connection depends on its stack only through
``ConnectionHost`` (packets out, timers, the ACK batch, leaving the table) and reports to the
application through ``ConnectionHandler``.

Internally sequence numbers are *unwrapped*: plain Python integers that keep growing from the ISN,
so comparisons are ordinary ``<``.  Numbers from the wire are unwrapped against ``snd_una`` or
``rcv_nxt``; outgoing ones are masked to 32 bits when packed.

Implemented: active, passive and simultaneous open; MSS; window scaling and timestamps with PAWS
(RFC 7323); SACK (RFC 2018) with RACK-TLP loss detection (RFC 8985, ``rack``): a segment is lost
when one sent after it was delivered and a round trip plus a reordering window has passed, lost
retransmissions included, and a tail loss probe 2 SRTT after the last ACK makes the peer's SACKs
expose a lost tail without waiting for the RTO.  Recovery (RFC 6675's pipe, RFC 6582's recovery
point) retransmits what RACK marked, paced by proportional rate reduction (RFC 6937, with the slow
start reduction bound): the window falls to ssthresh over the recovery's round trip, sending as
ACKs deliver, instead of at once and then nothing until the pipe has drained.  With timestamps,
Eifel detection (RFC 3522) undoes a cut whose retransmission proves spurious: if the first ACK for
the retransmitted segment echoes an older timestamp, the original arrived, so the congestion state
from before the cut comes back (after a timeout the go-back-N stops as well).  Without SACK, fast retransmit on three duplicate ACKs and
NewReno partial ACKs (RFC 5681, RFC 6582).  RTO per RFC 6298 with Karn's rule and exponential
backoff (``rto``); CUBIC (RFC 9438, default) or NewReno congestion control (``congestion``); delayed ACK
(every second segment or 40 ms); no Nagle; zero-window probes; keepalive; FIN/RST with RFC 5961
challenge ACKs; TIME_WAIT; ICMPv6 packet-too-big lowering the MSS.  The send buffer is
``sendbuffer``, the out-of-order queue ``reassembly``, the SACK scoreboard ``sack``.

Loss recovery counts in the stack's ``stats``: ``tcp_timeouts`` (retransmission timeouts),
``tcp_fast_retransmit`` (recoveries entered), ``tcp_retransmits`` (segments sent again),
``tcp_rack_marked_lost`` (segments RACK called lost), ``tcp_tlp_probes`` / ``tcp_tlp_recovered``
(probes sent / tail losses they exposed or repaired), ``tcp_prr_recoveries`` (recoveries paced by
PRR) and ``tcp_spurious_undone`` (cuts undone by Eifel detection).

Arriving segments follow RFC 9293 3.10.7: CLOSED and LISTEN are the stack's (3.10.7.1-2, with
``open_passive``), ``_syn_sent`` is 3.10.7.3, and ``_synchronized`` runs the steps of 3.10.7.4
in order, one method each.  The next in-order data segment on an established connection skips
them ("header prediction"), since that is most of what a receiver sees.
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import TYPE_CHECKING, Protocol

from . import congestion, tcpsegment
from .rack import Rack
from .reassembly import Reassembly
from .rto import RTOEstimator
from .sack import Scoreboard
from .sendbuffer import SendBuffer
from .tcpconfig import TCPConfig
from .tcpsegment import ACK, FIN, PSH, RST, SYN, Options, build_options, build_packet, parse_options
from .tcpstate import RECEIVING, SENDING, State

if TYPE_CHECKING:
    from .listener import Listener

__all__ = ["Connection", "ConnectionHandler", "ConnectionHost", "TCPConfig"]

M32 = 0xFFFFFFFF
HALF = 0x80000000
INF = float("inf")
_II = struct.Struct("!II")
_PACKET = tcpsegment.PACKET.pack
_TS_PREFIX = b"\x01\x01\x08\x0a"  # NOP, NOP, timestamps (kind 8, length 10): how every stack aligns it
# RFC 8985 §7.2 WCDelAckT: the longest a peer may hold back the ACK of a lone segment.
WC_DELACK = 0.2

# Module-level names: a global lookup and ``is`` are the cheapest state tests (see tcpstate).
CLOSED = State.CLOSED
SYN_SENT = State.SYN_SENT
SYN_RECEIVED = State.SYN_RECEIVED
ESTABLISHED = State.ESTABLISHED
FIN_WAIT_1 = State.FIN_WAIT_1
FIN_WAIT_2 = State.FIN_WAIT_2
CLOSE_WAIT = State.CLOSE_WAIT
CLOSING = State.CLOSING
LAST_ACK = State.LAST_ACK
TIME_WAIT = State.TIME_WAIT


class ConnectionHandler(Protocol):
    """The application side of a connection."""

    def connection_made(self, conn: Connection) -> None: ...

    def data_received(self, data: bytes) -> None: ...

    def eof_received(self) -> None: ...

    def connection_lost(self, reason: str | None) -> None:
        """The connection is gone: ``reason`` None for a clean close, else what went wrong."""

    def writable(self) -> None:
        """The send buffer drained below ``send_low_water`` after ``want_writable`` was set."""


class ConnectionHost(Protocol):
    """What a connection needs from the stack it belongs to."""

    stats: Counter[str]

    def emit(self, packet: bytes) -> None:
        """Send one IPv6 packet."""

    def arm_timer(self, conn: Connection, at: float) -> None:
        """Call ``conn.on_timer`` once the time is ``at``."""

    def defer_ack(self, conn: Connection) -> bool:
        """While a batch of inbound packets is handled: remember that ``conn`` owes an ACK, to
        send one for the whole batch at its end (True); outside a batch, False."""

    def remove_connection(self, conn: Connection) -> None:
        """``conn`` is CLOSED: it leaves the stack's table."""

    def syn_to_listener(
        self, src: bytes, dst: bytes, sport: int, dport: int, seq: int, seg: bytes, doff: int, now: float
    ) -> None:
        """Hand a SYN to the listener of ``dport`` (the connection it was addressed to is gone)."""


def _unwrap(value: int, ref: int) -> int:
    return ref + ((value - ref + HALF) & M32) - HALF


class Connection:
    def __init__(
        self,
        host: ConnectionHost,
        local: bytes,
        lport: int,
        remote: bytes,
        rport: int,
        cfg: TCPConfig,
        now: float,
        *,
        iss: int,
        mtu: int,
        ts_offset: int,
    ) -> None:
        """``iss`` is the initial sequence number, ``mtu`` that of the path to ``remote`` and
        ``ts_offset`` a random offset of our timestamp clock (RFC 7323 §5.4)."""
        self.host = host
        self.local = local
        self.lport = lport
        self.remote = remote
        self.rport = rport
        self.key = (remote, rport, local, lport)
        # Pseudo-header (addresses, next header 6) plus the ports: constant for the connection.
        self._pseudo = int.from_bytes(local + remote, "big") + 6 + lport + rport
        self.cfg = cfg
        self.handler: ConnectionHandler | None = None
        self.listener: Listener | None = None
        self.state = CLOSED
        # An IPv6 payload length is 16 bits (no jumbograms).
        self.mtu = min(mtu, 0xFFFF + 40)
        self.adv_mss = max(self.mtu, min(cfg.receive_mtu, 0xFFFF + 40)) - 60
        self.peer_mss = 1220
        self.iss = iss
        self.snd_una = self.snd_nxt = self.snd_max = iss
        self.snd_wnd = 0
        self.max_snd_wnd = 0
        self.snd_wl1 = self.snd_wl2 = 0
        self.sendbuf = SendBuffer(iss + 1)
        self.irs = self.rcv_nxt = self.rcv_adv = 0
        self.rcv_wscale = cfg.wscale()
        self.snd_wscale = 0
        self.snd_wscale_ok = False
        self.rcvbuf = cfg.rcvbuf
        self.ooo = Reassembly()
        self.ooo_fin: int | None = None
        self.rcv_queue: list[bytes] = []
        self.rcv_queued = 0
        self.paused = False
        self.eof_pending = False
        self.ts_ok = False
        self.ts_recent = 0
        self.ts_offset = ts_offset
        self.sack_ok = False
        self.rtt = RTOEstimator(cfg.initial_rto, cfg.min_rto, cfg.max_rto)
        self.mss = self.mtu - 60
        self.cc = congestion.make(cfg.congestion, self.mss, cfg.initial_window, cfg.bdp_floor and cfg.sack)
        self.sb = Scoreboard()
        self.in_recovery = False
        self.recover = iss
        self.rto_recover = iss  # snd_max at the last timeout (RFC 6582 §4's "recover" for it)
        self.dupacks = 0
        self.high_rxt = iss
        self.lost_floor = iss
        self.rack = Rack()
        self.t_rack: float | None = None  # RACK's reorder timer
        self.t_tlp: float | None = None  # the tail loss probe timeout (PTO)
        self.tlp_end: int | None = None  # snd_max when the outstanding probe went out
        self.tlp_rexmit = False
        # Proportional rate reduction (RFC 6937) during SACK recovery.
        self.prr_delivered = 0
        self.prr_out = 0
        self.prr_ack = 0  # DeliveredData of the ACK being handled
        self.recover_fs = 0
        # Eifel (RFC 3522): the congestion state before a cut, the timestamp (ms of our clock)
        # of the retransmission that came with it and the sequence number it started at.
        self.undo_cc: tuple | None = None
        self.undo_ts = 0
        self.undo_seq = 0
        self.undo_rto = False
        self.t_rexmit: float | None = None
        self.t_dack: float | None = None
        self.t_persist: float | None = None
        self.t_keep: float | None = None
        self.t_wait: float | None = None
        self.persist_backoff = 0
        self.retries = 0
        self.ka_probes = 0
        self.last_recv = now
        self.ack_pending = 0
        self.ack_now = False
        self.closed_by_app = False
        self.want_writable = False
        self.lost_notified = False
        self._lost_pending = False
        self.error: str | None = None
        # The earliest time the host's timer holds for us (INF: none); on_timer re-arms.
        self.timer_at = INF
        self._last_oow = -INF

    # ------------------------------------------------------------------ helpers

    def __repr__(self) -> str:
        return f"<Connection {self.lport}->{self.rport} {self.state.name}>"

    @property
    def state_name(self) -> str:
        return self.state.name

    @property
    def send_buffered(self) -> int:
        """Bytes written and not yet acknowledged."""
        return len(self.sendbuf.data)

    @property
    def write_closed(self) -> bool:
        """The application ended its side (our FIN is queued or sent)."""
        return self.sendbuf.fin is not None

    def _schedule(self, t: float) -> None:
        if t < self.timer_at:
            self.timer_at = t
            self.host.arm_timer(self, t)

    def _set_mss(self) -> None:
        opt = 12 if self.ts_ok else 0
        self.mss = max(min(self.peer_mss, self.mtu - 60) - opt, 64)
        self.cc.set_mss(self.mss)

    def _tsval(self, now: float) -> int:
        return (int(now * 1000) + self.ts_offset) & M32

    def _window(self) -> int:
        """The window field for an outgoing non-SYN segment; never shrinks the right edge."""
        free = self.rcvbuf - self.rcv_queued - self.ooo.size
        cur = self.rcv_adv - self.rcv_nxt
        s = self.rcv_wscale
        if free <= cur or (free - cur < self.adv_mss and free < self.rcvbuf):
            # Never move the right edge left (beyond the rounding to the scale, RFC 7323 §2.4);
            # grow it only by a useful amount (receiver silly window avoidance).
            free = cur if cur > 0 else 0
        w = free >> s
        if w > 0xFFFF:
            w = 0xFFFF
        edge = self.rcv_nxt + (w << self.rcv_wscale)
        if edge > self.rcv_adv:
            self.rcv_adv = edge
        return w

    def _emit(self, seq: int, flags: int, data: bytes, now: float, sack: bool = False) -> None:
        # The hot path of every outgoing segment: headers in one struct call, the checksum from
        # the per-connection pseudo-header sum plus the fields (see checksum.py).
        if self.ts_ok:
            tsval = (int(now * 1000) + self.ts_offset) & M32
            if sack and self.sack_ok and self.ooo:
                opts = build_options(ts=(tsval, self.ts_recent), sack=self.ooo.blocks(3))
                osum = int.from_bytes(opts, "big")
            else:
                opts = _TS_PREFIX + _II.pack(tsval, self.ts_recent)
                osum = 0x0101080A + tsval + self.ts_recent
        elif sack and self.sack_ok and self.ooo:
            opts = build_options(sack=self.ooo.blocks(4))
            osum = int.from_bytes(opts, "big")
        else:
            opts = b""
            osum = 0
        if flags & ACK:
            ack = self.rcv_nxt & M32
            self.ack_pending = 0
            self.ack_now = False
            self.t_dack = None
        else:
            ack = 0
        seq &= M32
        window = self._window()
        hlen = 20 + len(opts)
        tcp_len = hlen + len(data)
        offflags = (hlen << 10) | flags
        total = self._pseudo + tcp_len + seq + ack + offflags + window + osum
        if data:
            total += int.from_bytes(data, "big") << 8 if len(data) & 1 else int.from_bytes(data, "big")
        hdr = _PACKET(
            0x60000000, tcp_len, 6, 64, self.local, self.remote, self.lport, self.rport,
            seq, ack, offflags, window, 0xFFFF - total % 0xFFFF, 0,
        )
        self.host.emit(hdr + opts + data if data else hdr + opts)

    def _send_ack(self, now: float) -> None:
        # snd_max, not a rewound snd_nxt (after a timeout): like Linux, so the ACK always falls
        # in the peer's window.
        self._emit(self.snd_max, ACK, b"", now, sack=True)

    def send_deferred_ack(self, now: float) -> None:
        """The batch of inbound packets that ``defer_ack`` spoke of has ended: ACK it, if owed."""
        if self.state is not CLOSED and self.ack_pending:
            self._send_ack(now)

    def _send_oow_ack(self, now: float) -> None:
        """Answer an unacceptable segment without data (or a RST/SYN needing a challenge ACK),
        at most twice a second: two stacks that disagree must not ping-pong ACKs (RFC 5961 §7,
        Linux's tcp_invalid_ratelimit)."""
        if now - self._last_oow < 0.5:
            self.host.stats["tcp_oow_ack_limited"] += 1
            return
        self._last_oow = now
        self._send_ack(now)

    def _send_syn(self, now: float, with_ack: bool) -> None:
        cfg = self.cfg
        if with_ack:
            # Answer only with the options the peer offered (RFC 7323, RFC 2018).
            ts = (self._tsval(now), self.ts_recent) if self.ts_ok else None
            opts = build_options(
                mss=self.adv_mss,
                wscale=self.rcv_wscale if self.snd_wscale_ok else None,
                sack_permitted=self.sack_ok,
                ts=ts,
            )
            flags = SYN | ACK
        else:
            opts = build_options(
                mss=self.adv_mss,
                wscale=self.rcv_wscale if cfg.window_scaling else None,
                sack_permitted=cfg.sack,
                ts=(self._tsval(now), 0) if cfg.timestamps else None,
            )
            flags = SYN
        window = min(self.rcvbuf, 0xFFFF)
        self.rcv_adv = self.rcv_nxt + window
        self.host.emit(
            build_packet(
                self.local, self.remote, self.lport, self.rport, self.iss, self.rcv_nxt, flags, window, opts, b""
            )
        )

    def _send_rst(self) -> None:
        self.host.emit(
            build_packet(self.local, self.remote, self.lport, self.rport, self.snd_nxt, self.rcv_nxt, RST | ACK, 0, b"", b"")
        )

    def _send_rst_for_ack(self, ack: int) -> None:
        """A RST for an unacceptable ACK, with the sequence number the ACK asked for (RFC 9293
        3.10.7.3, 3.10.7.4 fifth step)."""
        self.host.emit(build_packet(self.local, self.remote, self.lport, self.rport, ack, 0, RST, 0, b"", b""))

    def _negotiate(self, opts: Options) -> None:
        cfg = self.cfg
        if opts.mss:
            self.peer_mss = max(opts.mss, 64)
        wscale = opts.wscale
        if wscale is not None and cfg.window_scaling:
            self.snd_wscale_ok = True
            self.snd_wscale = min(wscale, 14)
        else:
            self.snd_wscale_ok = False
            self.snd_wscale = 0
            self.rcv_wscale = 0
            self.rcvbuf = min(self.rcvbuf, 0xFFFF)
        self.sack_ok = opts.sack_permitted and cfg.sack
        ts = opts.ts
        self.ts_ok = ts is not None and cfg.timestamps
        if ts is not None and self.ts_ok:
            self.ts_recent = ts[0]
        self._set_mss()

    # ------------------------------------------------------------------ opening

    def open_active(self, now: float) -> None:
        """The application's OPEN (RFC 9293 3.10.1): send our SYN."""
        self.state = SYN_SENT
        self.snd_nxt = self.snd_max = self.iss + 1
        self.rtt.time(self.iss + 1, now)
        self._send_syn(now, False)
        self.t_rexmit = now + self.rtt.rto
        self._schedule(self.t_rexmit)
        self._arm_keepalive(now)

    def open_passive(self, seq: int, opts: Options, now: float) -> None:
        """RFC 9293 3.10.7.2, a SYN to a listener (which the stack has checked): take the peer's
        sequence number and options, and answer with our SYN-ACK."""
        self.state = SYN_RECEIVED
        self.irs = seq
        self.rcv_nxt = seq + 1
        self._negotiate(opts)
        self.snd_nxt = self.snd_max = self.iss + 1
        self.rtt.time(self.iss + 1, now)
        self._send_syn(now, True)
        self.t_rexmit = now + self.rtt.rto
        self._schedule(self.t_rexmit)

    def _established(self, now: float) -> None:
        self.state = ESTABLISHED
        self.retries = 0
        listener = self.listener
        if listener is not None:
            listener.pending -= 1
            self.listener = None
            if listener.closed:
                self.abort()
                return
            handler = listener.accept(self)
            if handler is None:
                self.host.stats["tcp_refused_by_app"] += 1
                self.abort()
                return
            self.handler = handler
        self._arm_keepalive(now)
        assert self.handler is not None  # given to connect(), or by the listener just now
        self.handler.connection_made(self)

    # ------------------------------------------------------------------ SEGMENT ARRIVES

    def input(self, seg: bytes, doff: int, seq: int, ack: int, flags: int, win: int, now: float) -> None:
        """Process one segment addressed to this connection (checksum already verified)."""
        tsval: int | None = None
        tsecr: int | None = None
        sack_blocks = None
        opts = None
        if doff > 20:
            if doff == 32 and seg[20:24] == _TS_PREFIX:
                tsval, tsecr = _II.unpack_from(seg, 24)
            else:
                try:
                    opts = parse_options(seg, 20, doff)
                except tcpsegment.Malformed:
                    self.host.stats["tcp_bad_options"] += 1
                    return
                if opts.ts is not None:
                    tsval, tsecr = opts.ts
                if opts.sack:
                    sack_blocks = opts.sack
        state = self.state
        # Header prediction, for the two segments an established connection mostly sees: the
        # next in-order one, with only ACK (and PSH) set and no SACK blocks, that is either a
        # pure ACK of new data outside recovery, or data that ACKs nothing new while nothing of
        # ours is in flight.
        if state is ESTABLISHED and flags & 0x37 == ACK and sack_blocks is None and seq == self.rcv_nxt & M32:
            if len(seg) == doff:
                una = self.snd_una
                ack_u = una + ((ack - una + HALF) & M32) - HALF
                if una < ack_u <= self.snd_max and not self.in_recovery:
                    self._predicted_ack(ack_u, win, tsval, tsecr, now)
                    return
            elif (
                ack == self.snd_una & M32
                and self.snd_max == self.snd_una
                and not self.ooo
                and not self.paused
                and not self.rcv_queue
                and (win << self.snd_wscale) == self.snd_wnd
                and len(seg) <= doff + self.rcv_adv - self.rcv_nxt
                and (tsval is None or not (tsval - self.ts_recent) & HALF)
            ):
                self._predicted_data(seg, doff, tsval, now)
                return
        if state is SYN_SENT:
            if opts is None:
                opts = Options(ts=(tsval, tsecr) if tsval is not None and tsecr is not None else None)
            self._syn_sent(seq, ack, flags, win, opts, tsecr, now)
        else:
            self._synchronized(seg, doff, seq, ack, flags, win, tsval, tsecr, sack_blocks, now)

    def _predicted_ack(self, ack_u: int, win: int, tsval: int | None, tsecr: int | None, now: float) -> None:
        """A predicted pure ACK: of 3.10.7.4 only the fifth step has anything to do, and of it
        only taking the acknowledgment and the window."""
        self.last_recv = now
        self.ka_probes = 0
        if tsval is not None and not (tsval - self.ts_recent) & HALF:
            self.ts_recent = tsval
        seq_u = self.rcv_nxt
        self._ack_advance(ack_u, tsecr, now)
        if self.state is CLOSED:
            return
        if self.snd_wl1 < seq_u or (self.snd_wl1 == seq_u and self.snd_wl2 <= ack_u):
            self._update_send_window(seq_u, ack_u, win << self.snd_wscale)
        self._respond(now)

    def _predicted_data(self, seg: bytes, doff: int, tsval: int | None, now: float) -> None:
        """Predicted in-order data: of 3.10.7.4 only the seventh step has anything to do."""
        self.last_recv = now
        self.ka_probes = 0
        if tsval is not None:
            self.ts_recent = tsval
        self.rcv_nxt += len(seg) - doff
        self.ack_pending += 1
        handler = self.handler
        assert handler is not None  # ESTABLISHED
        handler.data_received(seg[doff:])
        if self.state is not ESTABLISHED:
            return
        if self.ack_pending >= 2 and (self.ack_pending >= 32 or not self.host.defer_ack(self)):
            self.ack_now = True
        buf = self.sendbuf
        if buf.seq + len(buf.data) > self.snd_nxt or buf.fin is not None:
            self._output(now)
        if self.ack_now:
            self._send_ack(now)
        elif self.ack_pending == 1 and self.t_dack is None:
            self.t_dack = now + self.cfg.delayed_ack
            self._schedule(self.t_dack)

    def _syn_sent(
        self, seq: int, ack: int, flags: int, win: int, opts: Options, tsecr: int | None, now: float
    ) -> None:
        """RFC 9293 3.10.7.3: the answer to our SYN, a SYN-ACK (or the peer's own SYN)."""
        if flags & ACK:
            ack_u = _unwrap(ack, self.snd_una)
            if ack_u <= self.iss or ack_u > self.snd_max:
                if not flags & RST:
                    self._send_rst_for_ack(ack)
                return
            if flags & RST:
                self._fail("connection refused")
                return
        elif flags & RST:
            return
        if not flags & SYN:
            return
        self.irs = seq
        self.rcv_nxt = seq + 1
        self.rcv_adv = self.rcv_nxt + min(self.rcvbuf, 0xFFFF)
        self._negotiate(opts)
        self.snd_wnd = self.max_snd_wnd = win  # never scaled in a SYN (RFC 7323 §2.2)
        self.snd_wl1 = seq
        if flags & ACK:
            self.snd_wl2 = self.iss + 1
            self._ack_advance(self.iss + 1, tsecr, now)
            self.state = ESTABLISHED
            self.retries = 0
            self.t_rexmit = None
            self.ack_now = True
            self._arm_keepalive(now)
            assert self.handler is not None  # an active open has its handler from the start
            self.handler.connection_made(self)
            if self.state is CLOSED:
                return
            self._output(now)
            if self.ack_now:
                self._send_ack(now)
        else:
            # Simultaneous open (RFC 9293 Figure 7).
            self.state = SYN_RECEIVED
            self.host.stats["tcp_simultaneous_open"] += 1
            self.rtt.cancel()
            self._send_syn(now, True)

    def _synchronized(
        self,
        seg: bytes,
        doff: int,
        seq: int,
        ack: int,
        flags: int,
        win: int,
        tsval: int | None,
        tsecr: int | None,
        sack_blocks: list[tuple[int, int]] | None,
        now: float,
    ) -> None:
        """RFC 9293 3.10.7.4: SYN_RECEIVED and the synchronized states, step by step."""
        self.last_recv = now
        self.ka_probes = 0
        rcv_nxt = self.rcv_nxt
        seq_u = rcv_nxt + ((seq - rcv_nxt + HALF) & M32) - HALF
        dlen = len(seg) - doff
        state = self.state
        if state is TIME_WAIT and flags & SYN and not flags & ACK and seq_u > rcv_nxt:
            self._new_incarnation(seq, seg, doff, now)
            return
        if state is SYN_RECEIVED and flags & SYN and not flags & RST and seq_u == self.irs:
            if not flags & ACK:
                self._send_syn(now, True)  # our SYN-ACK was lost; the peer sent its SYN again
                return
            # Simultaneous open: the peer's SYN-ACK repeats its SYN; take it as an ACK.
            flags &= ~SYN
            seq_u += 1

        # First, check the sequence number: timestamps (PAWS), then the window.
        if tsval is not None and self._paws_rejects(tsval, flags, dlen, now):
            return
        seg_len = dlen + (flags & SYN and 1) + (flags & FIN and 1)
        checked = self._check_sequence(seq_u, seg_len, dlen, flags, now)
        if checked is None:
            return
        dlen, flags = checked
        # Second, the RST bit.
        if flags & RST:
            self._rst_arrives(seq_u, now)
            return
        # Third, security: the segment's security option must match, and IPv6 has none.
        # Fourth, the SYN bit.
        if flags & SYN:
            self._syn_arrives(now)
            return
        # Fifth, the ACK field.
        if not flags & ACK:
            return
        if not self._ack_arrives(seq_u, ack, win, seg_len, tsval, tsecr, sack_blocks, now):
            return
        # Sixth, the URG bit: ignored (RFC 6093; nothing here sends or reads urgent data).
        # Seventh, the segment text (and a FIN that comes with it).
        if dlen:
            self._segment_text(seq_u, seg, doff, dlen, flags & FIN, now)
            if self.state is CLOSED:
                return
        # Eighth, the FIN bit of a segment without text.
        elif flags & FIN:
            self._fin_arrives(seq_u, now)
            if self.state is CLOSED:
                return
        self._respond(now)

    def _respond(self, now: float) -> None:
        """After a segment: send what the windows allow, and our ACK now or delayed."""
        self._output(now)
        if self.ack_now:
            self._send_ack(now)
        elif self.ack_pending and self.t_dack is None and self.ack_pending < 2:
            self.t_dack = now + self.cfg.delayed_ack
            self._schedule(self.t_dack)

    def _new_incarnation(self, seq: int, seg: bytes, doff: int, now: float) -> None:
        """A new SYN in TIME_WAIT (RFC 9293 3.10.7.4 / RFC 6191): end TIME_WAIT and let a
        listener take it."""
        self._remove()
        self.host.syn_to_listener(self.remote, self.local, self.rport, self.lport, seq, seg, doff, now)

    def _paws_rejects(self, tsval: int, flags: int, dlen: int, now: float) -> bool:
        """PAWS (RFC 7323 §5): drop (and ACK) a segment whose timestamp is older than the last
        one we took.  Like Linux, a pure ACK is exempt: a reordered ACK carries an older
        timestamp but still-valid SACK and window information, and old duplicates are harmless."""
        if (
            self.ts_ok
            and (tsval - self.ts_recent) & HALF
            and not flags & RST
            and (dlen or flags & (SYN | FIN))
        ):
            self.host.stats["tcp_paws_drop"] += 1
            self._send_ack(now)
            return True
        return False

    def _check_sequence(self, seq_u: int, seg_len: int, dlen: int, flags: int, now: float) -> tuple[int, int] | None:
        """Is the segment acceptable (RFC 9293 3.10.7.4, first check)?  None: it goes no
        further; else the text length and flags to go on with."""
        rcv_nxt = self.rcv_nxt
        rwnd = self.rcv_adv - rcv_nxt
        if seq_u == rcv_nxt and (seg_len == 0 or rwnd > 0):
            return dlen, flags
        if seg_len == 0:
            if rcv_nxt <= seq_u < rcv_nxt + rwnd:
                return dlen, flags
            if not flags & RST:
                self._send_oow_ack(now)
            return None
        if rwnd > 0 and (rcv_nxt <= seq_u < rcv_nxt + rwnd or rcv_nxt < seq_u + seg_len <= rcv_nxt + rwnd):
            return dlen, flags
        if flags & RST:
            return None
        if rwnd == 0 and seq_u == rcv_nxt:
            # Zero window: the ACK and window still count (and a bare FIN, as Linux takes it);
            # data does not.
            if dlen:
                dlen = 0
                flags &= ~FIN
            self.ack_now = True
            return dlen, flags
        self.host.stats["tcp_out_of_window"] += 1
        self._send_ack(now)
        return None

    def _rst_arrives(self, seq_u: int, now: float) -> None:
        """Second check: only a RST at exactly ``rcv_nxt`` resets; one elsewhere in the window
        gets a challenge ACK (RFC 5961 §3)."""
        if seq_u != self.rcv_nxt:
            self._send_oow_ack(now)
            return
        self.host.stats["tcp_rst_received"] += 1
        if self.state is SYN_RECEIVED:
            if self.handler is None:
                self._remove()  # a passive open nobody has seen yet
            else:
                self._fail("connection refused")
        else:
            self._fail("connection reset")

    def _syn_arrives(self, now: float) -> None:
        """Fourth check: a SYN in the window of a synchronized connection gets a challenge ACK
        (RFC 5961 §4), not a reset."""
        self._send_oow_ack(now)

    def _ack_arrives(
        self,
        seq_u: int,
        ack: int,
        win: int,
        seg_len: int,
        tsval: int | None,
        tsecr: int | None,
        sack_blocks: list[tuple[int, int]] | None,
        now: float,
    ) -> bool:
        """Fifth check, the ACK field: our data acknowledged, SACK, the send window, loss
        detection.  False: the segment goes no further."""
        snd_una = self.snd_una
        ack_u = snd_una + ((ack - snd_una + HALF) & M32) - HALF
        if self.state is SYN_RECEIVED and not self._ack_of_syn(seq_u, ack, ack_u, win, now):
            return False
        if ack_u > self.snd_max:
            self._send_ack(now)  # it acknowledges what we never sent
            return False
        if tsval is not None and seq_u <= self.rcv_nxt and not (tsval - self.ts_recent) & HALF:
            self.ts_recent = tsval  # RFC 7323 §4.3
        new_wnd = win << self.snd_wscale
        sacked_before = self.sb.sacked
        if ack_u > snd_una:
            self._ack_advance(ack_u, tsecr, now)
            if self.state is CLOSED:
                return False
        elif ack_u == snd_una and seg_len == 0 and new_wnd == self.snd_wnd and self.snd_max > snd_una:
            self.dupacks += 1
        newly_sacked = self._sack_arrives(sack_blocks, tsecr, now) if sack_blocks and self.sack_ok else 0
        if newly_sacked and self.cc.model is not None:
            self.cc.model.on_delivered(newly_sacked, now, self.rtt.srtt)
        if self.snd_wl1 < seq_u or (self.snd_wl1 == seq_u and self.snd_wl2 <= ack_u):
            self._update_send_window(seq_u, ack_u, new_wnd)
        if self.in_recovery and self.sack_ok:
            # PRR's DeliveredData (RFC 6937): what this ACK told us reached the peer.
            d = (ack_u - snd_una if ack_u > snd_una else 0) + self.sb.sacked - sacked_before
            self.prr_delivered += d
            self.prr_ack = d
        if (
            self.in_recovery
            or newly_sacked
            or self.dupacks >= self.cfg.dupthresh
            or (self.sack_ok and (self.sb or self.rack.rexmit_end > self.snd_una or self.rack.lost))
        ):
            self._detect_loss(ack_u > snd_una, newly_sacked, now)
        return True

    def _ack_of_syn(self, seq_u: int, ack: int, ack_u: int, win: int, now: float) -> bool:
        """The ACK field in SYN_RECEIVED: one that acknowledges our SYN establishes the
        connection; any other gets a RST.  False: the segment goes no further."""
        if not self.snd_una < ack_u <= self.snd_max:
            self._send_rst_for_ack(ack)
            return False
        self.snd_wnd = win << self.snd_wscale
        self.max_snd_wnd = self.snd_wnd
        self.snd_wl1 = seq_u
        self.snd_wl2 = ack_u
        self._established(now)
        return self.state is not CLOSED

    def _tsecr_ms(self, tsecr: int | None, now: float) -> int | None:
        """An echoed timestamp as milliseconds of ``now``'s clock (None: none to go by)."""
        if not self.ts_ok or not tsecr:
            return None
        ms = int(now * 1000)
        return ms - (((ms + self.ts_offset) - tsecr) & M32)

    def _sack_arrives(self, blocks: list[tuple[int, int]], tsecr: int | None, now: float) -> int:
        """Record the peer's SACK blocks (RFC 2018); returns how many bytes are newly SACKed."""
        newly_sacked = 0
        una = self.snd_una
        smax = self.snd_max
        rack = self.rack
        tsecr_ms = self._tsecr_ms(tsecr, now)
        for left, right in blocks:
            lu = una + ((left - una + HALF) & M32) - HALF
            ru = una + ((right - una + HALF) & M32) - HALF
            if lu < una:
                lu = una
            if ru > smax:
                ru = smax
            if lu < ru:
                added = self.sb.add(lu, ru)
                if added:
                    newly_sacked += added
                    rack.on_sack(lu, ru, now, tsecr_ms)
        return newly_sacked

    def _update_send_window(self, seq_u: int, ack_u: int, new_wnd: int) -> None:
        """A segment newer than the one the window was last taken from (RFC 9293 3.10.7.4,
        SND.WL1/SND.WL2): take its window."""
        if new_wnd > self.snd_wnd:
            self.persist_backoff = 0
            self.t_persist = None
        self.snd_wnd = new_wnd
        if new_wnd > self.max_snd_wnd:
            self.max_snd_wnd = new_wnd
        self.snd_wl1 = seq_u
        self.snd_wl2 = ack_u

    def _detect_loss(self, advanced: bool, newly_sacked: int, now: float) -> None:
        """Loss detection: leave fast recovery once all that was outstanding at its start is
        ACKed (RFC 6582), then RACK (with SACK) or NewReno (without) decides what is lost."""
        if self.in_recovery and self.snd_una >= self.recover:
            self.in_recovery = False
            self.dupacks = 0
            self.cc.exit_recovery(self.snd_max - self.snd_una - self.sb.sacked)
            if self.sack_ok and self.snd_max > self.snd_una:
                self._arm_tlp(now)  # what recovery sent last has no probe yet
        if self.sack_ok:
            self._rack_detect(now)
            return
        if self.in_recovery:
            if advanced:
                # Partial ACK: the segment at the new snd_una is lost too.
                self.lost_floor = min(self.snd_una + self.mss, self.snd_max)
                if self.high_rxt < self.snd_una:
                    self.high_rxt = self.snd_una
                if not self.sack_ok:
                    self._retransmit_first(now)  # RFC 6582 §3.2 step 5
        elif self.snd_max > self.snd_una and self.dupacks >= self.cfg.dupthresh and self.snd_una > self.recover:
            self._enter_recovery(now)

    def _rack_detect(self, now: float) -> None:
        """RACK (RFC 8985 §6.2): mark what is lost, arm the reorder timer for what may be, and
        start fast recovery if anything is marked."""
        if self.snd_max == self.snd_una:
            self.t_rack = None
            return
        sb = self.sb
        rack = self.rack
        thresh = self.cfg.dupthresh
        dup = self.in_recovery or sb.sacked >= thresh * self.mss or self.dupacks >= thresh
        marked, due = rack.detect(sb, self.snd_una, self.snd_max, now, rack.reo_wnd(self.rtt.srtt, dup))
        self.t_rack = due
        if due is not None:
            self._schedule(due)
        if marked:
            self.host.stats["tcp_rack_marked_lost"] += marked
            if self.cc.model is not None:
                self.cc.model.on_lost(marked * self.mss)
        if rack.lost and not self.in_recovery:
            if self.tlp_end is not None:
                self.host.stats["tcp_tlp_recovered"] += 1  # the probe's ACK exposed the tail loss
                self.tlp_end = None
            # What was sent before a timeout is lost as the timeout said, and its reduction
            # has been made: recover it at slow start's pace (PRR), without a second cut.
            self._enter_recovery(now, cut=self.snd_una >= self.rto_recover)

    def _segment_text(self, seq_u: int, seg: bytes, doff: int, dlen: int, fin: int, now: float) -> None:
        """Seventh step: take the text (and a FIN right after it) in a state that receives;
        elsewhere both are ignored."""
        if self.state not in RECEIVING:
            return
        if self.closed_by_app:
            # Data for an application that has closed: Linux answers with RST.
            self.host.stats["tcp_data_after_close"] += 1
            self.abort()
            return
        rcv_nxt = self.rcv_nxt
        if seq_u < rcv_nxt:
            cut = rcv_nxt - seq_u
            if cut >= dlen:
                # Entirely old (a retransmission we already have): ACK at once (RFC 5681 §4.2).
                self.ack_now = True
                if fin and seq_u + dlen == rcv_nxt:
                    self._fin_received(now)
                return
            doff += cut
            dlen -= cut
            seq_u = rcv_nxt
        right = self.rcv_adv
        if seq_u + dlen > right:
            dlen = right - seq_u
            fin = 0
            if dlen <= 0:
                self.ack_now = True
                return
        data = seg[doff : doff + dlen] if doff or dlen != len(seg) else seg
        if seq_u == rcv_nxt:
            self.rcv_nxt = rcv_nxt + dlen
            self._deliver(data)
            if self.ooo:
                self.rcv_nxt, pieces = self.ooo.pop(self.rcv_nxt)
                for piece in pieces:
                    self._deliver(piece)
                self.ack_now = True
                if self.ooo_fin is not None and self.ooo_fin == self.rcv_nxt:
                    self.ooo_fin = None
                    fin = 1
            if fin:
                self._fin_received(now)
                return
            self.ack_pending += 1
            # Inside a batch of packets, one ACK at the end of the batch covers them all.
            if self.ack_pending >= 2 and (self.ack_pending >= 32 or not self.host.defer_ack(self)):
                self.ack_now = True
        else:
            self.host.stats["tcp_out_of_order"] += 1
            if not self.ooo.add(seq_u, data):
                self.host.stats["tcp_ooo_queue_full"] += 1
                self.ack_now = True
                return
            if fin:
                self.ooo_fin = seq_u + dlen
            # Out of order: ACK at once (RFC 5681 §4.2), but inside a batch of packets with SACK
            # one ACK at its end reports every piece of it in its blocks. The sender's RACK
            # needs the blocks, not a duplicate ACK per segment, and with a large window a
            # single loss would otherwise make every later segment of the window an ACK.
            if fin or not self.sack_ok or not self.host.defer_ack(self):
                self.ack_now = True
            else:
                self.ack_pending += 1

    def _deliver(self, data: bytes) -> None:
        if self.paused or self.rcv_queue:
            self.rcv_queue.append(data)
            self.rcv_queued += len(data)
        else:
            assert self.handler is not None  # a state that receives
            self.handler.data_received(data)

    def _fin_arrives(self, seq_u: int, now: float) -> None:
        """Eighth step, a FIN without text: in order it ends the peer's side; beyond a gap it
        waits for the gap to fill."""
        if seq_u == self.rcv_nxt:
            self._fin_received(now)
        elif seq_u > self.rcv_nxt:
            self.ooo_fin = seq_u
            self.ack_now = True

    def _fin_received(self, now: float) -> None:
        self.rcv_nxt += 1
        self.ack_now = True
        state = self.state
        if state is TIME_WAIT:
            self.t_wait = now + 2 * self.cfg.msl
            self._send_ack(now)
            return
        if state is SYN_RECEIVED or state is ESTABLISHED:
            self.state = CLOSE_WAIT
        elif state is FIN_WAIT_1:
            fin = self.sendbuf.fin
            if fin is not None and self.snd_una > fin:
                self._enter_time_wait(now, notify=False)
            else:
                self.state = CLOSING
        elif state is FIN_WAIT_2:
            self._enter_time_wait(now, notify=False)
        else:
            return
        # The read side ends, in every state (after a half close too), before the connection
        # is reported lost; a paused reader gets it after its queued data.
        if not self.closed_by_app and self.handler is not None:
            if self.paused or self.rcv_queue:
                self.eof_pending = True
            else:
                self.handler.eof_received()
                if self.state is CLOSED:
                    return
        if self.state is TIME_WAIT:
            self._send_ack(now)
            self._notify_lost(None)

    def _enter_time_wait(self, now: float, notify: bool = True) -> None:
        self.state = TIME_WAIT
        self.t_rexmit = self.t_persist = self.t_keep = self.t_dack = self.t_rack = self.t_tlp = None
        self.t_wait = now + 2 * self.cfg.msl
        self._schedule(self.t_wait)
        if notify:
            self._notify_lost(None)

    # ------------------------------------------------------------------ acknowledged data

    def _ack_advance(self, ack_u: int, tsecr: int | None, now: float) -> None:
        """The peer acknowledged new data, up to ``ack_u``."""
        acked = ack_u - self.snd_una
        delivered = acked
        if self.sack_ok:
            rack = self.rack
            # The echoed timestamp matters only for segments that were retransmitted.
            rack.acked(self.snd_una, ack_u, now, self._tsecr_ms(tsecr, now) if rack.rexmit_end > self.snd_una else None)
        self.sendbuf.acknowledge(ack_u)
        if self.sb:
            # What was SACKed before reached the peer then, not now (slow start counts this).
            delivered -= self.sb.sacked_between(self.snd_una, ack_u)
            self.sb.advance(ack_u)
        self.snd_una = ack_u
        if self.snd_nxt < ack_u:
            self.snd_nxt = ack_u
        # RTT (RFC 6298 / RFC 7323 §4): timestamps when we have them, else one timed segment.
        rtt = self.rtt
        r: float | None
        if self.ts_ok and tsecr:
            r = (((int(now * 1000) + self.ts_offset) - tsecr) & M32) / 1000.0
            if r > 600:
                r = None
        else:
            r = rtt.timed_sample(ack_u, now)
        if r is not None:
            rtt.sample(r)
        model = self.cc.model
        if model is not None:
            # RACK's round trip of the newest delivered segment: timed to the clock, where the
            # timestamp option's milliseconds read 0 on a sub-millisecond path.
            if self.sack_ok and self.rack.rtt > 0:
                model.on_rtt(self.rack.rtt, now)
            model.on_delivered(delivered, now, rtt.srtt)
        # Progress ends a run of timeouts, with a sample or without (Karn: a retransmitted
        # segment gives none, and its backed-off RTO stays).
        self.retries = 0
        self.dupacks = 0
        if self.undo_cc is not None and ack_u > self.undo_seq:
            self._eifel(tsecr, now)
        tlp_end = self.tlp_end
        if tlp_end is not None and ack_u >= tlp_end:
            # The probe's episode ends (RFC 8985 §7.4): a retransmitted tail was repaired
            # without a timeout (or was never lost; without DSACK we cannot tell).
            self.tlp_end = None
            if self.tlp_rexmit:
                self.host.stats["tcp_tlp_recovered"] += 1
        if ack_u >= self.snd_max:
            self.t_rexmit = self.t_tlp = self.t_rack = None
        else:
            self.t_rexmit = now + rtt.rto
            if self.t_rexmit < self.timer_at:
                self._schedule(self.t_rexmit)
            if self.sack_ok and not self.in_recovery:
                self._arm_tlp(now)
        if not self.in_recovery:
            cc = self.cc
            cc.on_ack(acked, now, rtt.srtt, delivered)
            # Do not let cwnd grow without bound while the peer's window is what limits us.
            cap = 2 * self.max_snd_wnd + 10 * self.mss
            if cc.cwnd > cap:
                cc.cwnd = cap
        if self.want_writable and len(self.sendbuf.data) <= self.cfg.send_low_water:
            self.want_writable = False
            if self.handler is not None:
                self.handler.writable()
        fin = self.sendbuf.fin
        if fin is not None and ack_u > fin:
            self._fin_acked(now)

    def _save_for_undo(self, now: float, rto: bool) -> None:
        """A cut comes with a retransmission starting at ``snd_una``: remember what to restore
        if the first ACK of it turns out to answer the original (RFC 3522)."""
        if not self.ts_ok or self.undo_cc is not None:
            return
        self.undo_cc = self.cc.snapshot()
        self.undo_ts = int(now * 1000)
        self.undo_seq = self.snd_una
        self.undo_rto = rto

    def _eifel(self, tsecr: int | None, now: float) -> None:
        """The first ACK for the retransmitted segment (RFC 3522 §3): an echoed timestamp older
        than the retransmission means the original arrived, so the loss (and the cut) was
        spurious: restore the congestion state; after a timeout, also stop going back N."""
        state = self.undo_cc
        self.undo_cc = None
        tsecr_ms = self._tsecr_ms(tsecr, now)
        if state is None or tsecr_ms is None or tsecr_ms >= self.undo_ts:
            return
        self.host.stats["tcp_spurious_undone"] += 1
        self.cc.restore(state)
        self.rack.clear_lost()
        self.rack.reordering_seen = True  # what looked lost was late: allow for reordering
        self.in_recovery = False
        self.t_rack = None
        if self.undo_rto and self.snd_nxt < self.snd_max:
            self.snd_nxt = self.snd_max
        if self.sack_ok and self.snd_max > self.snd_una:
            self._arm_tlp(now)

    def _fin_acked(self, now: float) -> None:
        """Our FIN is acknowledged (RFC 9293 3.10.7.4, fifth check in FIN_WAIT_1, CLOSING and
        LAST_ACK)."""
        state = self.state
        if state is FIN_WAIT_1:
            self.state = FIN_WAIT_2
            if self.closed_by_app:
                self.t_wait = now + self.cfg.fin_timeout
                self._schedule(self.t_wait)
                self._notify_lost(None)
        elif state is CLOSING:
            self._enter_time_wait(now)
        elif state is LAST_ACK:
            self._notify_lost(None)
            self._remove()

    # ------------------------------------------------------------------ loss recovery

    def _enter_recovery(self, now: float, cut: bool = True) -> None:
        self.in_recovery = True
        self.recover = self.snd_max
        self.t_tlp = None
        if cut:
            self.host.stats["tcp_fast_retransmit"] += 1
            flight = self.snd_max - self.snd_una - self.sb.sacked
            self._save_for_undo(now, False)
            self.cc.enter_recovery(flight, now)
        self.rtt.cancel()
        if self.sack_ok:
            self.host.stats["tcp_prr_recoveries"] += 1
            self.prr_delivered = self.prr_out = self.prr_ack = 0
            self.recover_fs = self.snd_max - self.snd_una
            # The first lost segment goes out at once, whatever the pipe (RFC 5681 §3.2 step 2).
            seg = self.rack.first_lost()
            if seg is not None:
                self.prr_out += self._retransmit_entry(seg, now)
            return
        una = self.snd_una
        self.lost_floor = min(una + self.mss, self.snd_max)
        self._retransmit_first(now)

    def _retransmit_entry(self, seg: list, now: float) -> int:
        """Retransmit one segment of RACK's log (at most an MSS of it); returns its length."""
        s = seg[0]
        n = min(seg[1] - s, self.mss, self.sendbuf.end - s)
        if n <= 0:
            n = 0
            if s != self.sendbuf.fin:
                self.rack.clear_lost()  # nothing there to send (cannot happen): never spin on it
                return 0
        self.host.stats["tcp_retransmits"] += 1
        self._send_range(s, n, now)
        return n or 1

    def _retransmit_first(self, now: float) -> None:
        # Retransmit the first missing segment now, whatever the pipe says (RFC 5681 §3.2 step 2).
        una = self.snd_una
        hole = self.sb.next_hole(una, self.snd_max) or (una, self.snd_max)
        s = hole[0]
        data_end = self.sendbuf.end
        n = max(0, min(hole[1] - s, self.mss, data_end - s))
        self.host.stats["tcp_retransmits"] += 1
        self._send_range(s, n, now)
        self.high_rxt = s + (n or 1)

    # ------------------------------------------------------------------ sending

    def _send_range(self, seq: int, n: int, now: float) -> None:
        """Send data [seq, seq + n) (and our FIN if it directly follows)."""
        buf = self.sendbuf
        data = buf.take(seq, n) if n else b""
        flags = ACK | PSH if n else ACK
        end = seq + n
        if end == buf.fin:
            flags |= FIN
            end += 1
        self._emit(seq, flags, data, now)
        rtt = self.rtt
        if self.sack_ok and end > seq:
            rack = self.rack
            if seq >= rack.top:  # new data: RACK's log grows by one entry (inline: every segment)
                rack.sends += 1
                rack.segs.append([seq, end, now, 0, rack.sends])
                rack.top = end
            else:
                rack.on_send(seq, end, now)
        if end > self.snd_max:
            if rtt.timed_seq is None and not self.ts_ok:
                rtt.time(end, now)
            self.snd_max = end
            if self.t_rexmit is None:
                self.t_rexmit = now + rtt.rto
                self._schedule(self.t_rexmit)
            # Arm the probe if it is not (each ACK of new data re-arms it).
            if self.t_tlp is None and self.sack_ok and not self.in_recovery and self.tlp_end is None:
                self._arm_tlp(now)
        elif rtt.timed_seq is not None and seq < rtt.timed_seq:
            rtt.cancel()  # Karn: never time a retransmitted segment
        if self.t_rexmit is None:
            self.t_rexmit = now + rtt.rto
            self._schedule(self.t_rexmit)
        if end > self.snd_nxt:
            self.snd_nxt = end

    def flush(self, now: float) -> None:
        """Send what the windows allow (the application calls this after ``write``)."""
        self._output(now)
        if self.ack_now:
            self._send_ack(now)

    def _output(self, now: float) -> None:
        if self.state not in SENDING:
            return
        if self.in_recovery:
            if self.sack_ok:
                self._output_rack(now)
            else:
                self._output_recovery(now)
            return
        mss = self.mss
        una = self.snd_una
        sb = self.sb
        buf = self.sendbuf
        data_end = buf.seq + len(buf.data)
        fin = buf.fin
        wnd_edge = una + self.snd_wnd
        cwnd = self.cc.cwnd
        nxt = self.snd_nxt
        smax = self.snd_max
        if nxt < smax:
            flight = nxt - una - (sb.sacked_between(una, nxt) if sb else 0)
        else:
            flight = nxt - una - sb.sacked
        while True:
            limit = data_end
            if nxt < smax and sb:
                hole = sb.next_hole(nxt, smax)
                if hole is None:
                    nxt = self.snd_nxt = smax
                    continue
                if hole[0] > nxt:
                    nxt = self.snd_nxt = hole[0]
                if hole[1] < limit:
                    limit = hole[1]
            if nxt >= data_end:
                if fin is not None and nxt == fin:
                    self._send_range(nxt, 0, now)
                    smax = self.snd_max
                break
            n = limit - nxt
            if n > mss:
                n = mss
            room = cwnd - flight
            wroom = wnd_edge - nxt
            if wroom < room:
                room = wroom
            if room < n:
                if room <= 0 or (room < mss and flight > 0):
                    break
                n = room
            self._send_range(nxt, n, now)
            nxt = self.snd_nxt
            smax = self.snd_max
            flight += n
        if self.snd_wnd == 0 or wnd_edge <= self.snd_nxt:
            if self.snd_nxt < data_end and self.snd_max == self.snd_una and self.t_persist is None:
                self._arm_persist(now)

    def _prr_sndcnt(self) -> int:
        """How much PRR lets us send now (RFC 6937 §3, with the slow start reduction bound):
        while the pipe is above ssthresh, in proportion to what was delivered, so that the
        window comes down to ssthresh over the recovery's round trip instead of at once; below
        it, growing back towards ssthresh at most as fast as slow start."""
        pipe = self.snd_max - self.snd_una - self.sb.sacked - self.rack.lost_bytes()
        ssthresh = self.cc.ssthresh
        if pipe > ssthresh:
            fs = self.recover_fs if self.recover_fs > 0 else 1
            sndcnt = -(-self.prr_delivered * ssthresh // fs) - self.prr_out
        else:
            limit = max(self.prr_delivered - self.prr_out, self.prr_ack) + self.mss
            sndcnt = min(ssthresh - pipe, limit)
        return sndcnt if sndcnt > 0 else 0

    def _output_rack(self, now: float) -> None:
        """Sending in SACK recovery: the segments RACK marked lost, lowest first, then new data,
        as much as PRR allows."""
        mss = self.mss
        rack = self.rack
        buf = self.sendbuf
        sndcnt = self._prr_sndcnt()
        self.prr_ack = 0
        while sndcnt > 0:
            una = self.snd_una
            smax = self.snd_max
            seg = rack.first_lost()
            if seg is not None:
                n = self._retransmit_entry(seg, now)
                if n:
                    self.prr_out += n
                    sndcnt -= n
                continue
            # New data, if the peer's window allows (never re-sending below snd_max: what is
            # missing there is RACK's to mark).
            nxt = smax
            if self.snd_nxt < nxt:
                self.snd_nxt = nxt
            n = min(buf.end - nxt, mss, una + self.snd_wnd - nxt)
            if n <= 0:
                if nxt == buf.fin:
                    self._send_range(nxt, 0, now)
                    self.prr_out += 1
                break
            self._send_range(nxt, n, now)
            self.prr_out += n
            sndcnt -= n

    def _output_recovery(self, now: float) -> None:
        mss = self.mss
        sb = self.sb
        cwnd = self.cc.cwnd
        while True:
            una = self.snd_una
            smax = self.snd_max
            lost_edge = sb.lost_edge(una, self.cfg.dupthresh * mss) if sb else una
            if self.lost_floor > lost_edge:
                lost_edge = self.lost_floor
            hr = self.high_rxt if self.high_rxt > una else una
            pipe = smax - una - sb.sacked
            if hr < lost_edge:
                pipe -= (lost_edge - hr) - sb.sacked_between(hr, lost_edge)
            if not self.sack_ok:
                pipe -= self.dupacks * mss
            if cwnd - pipe < mss:
                break
            if hr < lost_edge:
                hole = sb.next_hole(hr, lost_edge)
                if hole is not None:
                    s = hole[0]
                    n = min(hole[1] - s, mss)
                    data_end = self.sendbuf.end
                    if s >= data_end:
                        n = 0
                    elif s + n > data_end:
                        n = data_end - s
                    self.host.stats["tcp_retransmits"] += 1
                    self._send_range(s, n, now)
                    self.high_rxt = s + n + (1 if n == 0 else 0)
                    continue
                self.high_rxt = lost_edge
            # New data, if the peer's window allows.
            nxt = self.snd_nxt
            data_end = self.sendbuf.end
            n = min(data_end - nxt, mss, una + self.snd_wnd - nxt)
            if n <= 0:
                if nxt == self.sendbuf.fin:
                    self._send_range(nxt, 0, now)
                break
            self._send_range(nxt, n, now)

    # ------------------------------------------------------------------ timers

    def _arm_tlp(self, now: float) -> None:
        """Arm the tail loss probe (RFC 8985 §7.2): PTO = 2 SRTT, plus the peer's worst-case
        delayed ACK when one segment is in flight; none if the RTO would come first."""
        srtt = self.rtt.srtt
        if srtt is None:
            return
        pto = 2 * srtt
        if self.snd_max - self.snd_una <= self.mss:
            pto += WC_DELACK
        if pto < self.cfg.tlp_min:
            pto = self.cfg.tlp_min
        at = now + pto
        if self.t_rexmit is not None and at >= self.t_rexmit:
            self.t_tlp = None
            return
        self.t_tlp = at
        self._schedule(at)

    def _on_tlp(self, now: float) -> None:
        """The probe timeout: send one new segment if there is one, else the last segment
        again, so that the peer's ACK (with SACK) shows RACK what of the tail is missing."""
        if (
            self.in_recovery
            or self.tlp_end is not None
            or self.state not in SENDING
            or self.snd_max == self.snd_una
            or self.snd_nxt < self.snd_max
        ):
            return
        self.host.stats["tcp_tlp_probes"] += 1
        buf = self.sendbuf
        nxt = self.snd_max
        n = min(buf.end - nxt, self.mss, self.snd_una + self.snd_wnd - nxt)
        if n > 0:
            self.tlp_rexmit = False
            self._send_range(nxt, n, now)
        else:
            segs = self.rack.segs
            if len(segs) == self.rack.head:
                return
            self.tlp_rexmit = True
            self._retransmit_entry(segs[-1], now)
        self.tlp_end = self.snd_max
        self.t_rexmit = now + self.rtt.rto

    def _on_rack_timer(self, now: float) -> None:
        if self.state not in SENDING:
            return
        was = self.in_recovery
        self._rack_detect(now)
        if self.in_recovery or was:
            self._output(now)

    def _arm_persist(self, now: float) -> None:
        cfg = self.cfg
        t = min(max(self.rtt.rto, cfg.min_rto) * (1 << self.persist_backoff), cfg.max_rto)
        self.t_persist = now + t
        self._schedule(self.t_persist)

    def _arm_keepalive(self, now: float) -> None:
        if self.cfg.keepalive:
            self.t_keep = now + self.cfg.keepalive_idle
            self._schedule(self.t_keep)

    def on_timer(self, now: float) -> None:
        self.timer_at = INF
        if self.t_wait is not None and self.t_wait <= now:
            self.t_wait = None
            if self.state in (TIME_WAIT, FIN_WAIT_2):
                self._remove()
                return
        if self.t_rexmit is not None and self.t_rexmit <= now:
            self.t_rexmit = None
            self._on_rexmit_timeout(now)
            if self.state is CLOSED:
                return
        if self.t_rack is not None and self.t_rack <= now:
            self.t_rack = None
            self._on_rack_timer(now)
        if self.t_tlp is not None and self.t_tlp <= now:
            self.t_tlp = None
            self._on_tlp(now)
        if self.t_persist is not None and self.t_persist <= now:
            self.t_persist = None
            if self.snd_max == self.snd_una and self.snd_nxt < self.sendbuf.end:
                self.host.stats["tcp_window_probes"] += 1
                # Probe with an already-ACKed sequence number: any live peer answers with an ACK
                # that carries its current window.
                self._emit(self.snd_una - 1, ACK, b"", now)
                self.persist_backoff = min(self.persist_backoff + 1, 16)
                self._arm_persist(now)
        if self.t_dack is not None and self.t_dack <= now:
            self.t_dack = None
            if self.ack_pending:
                self._send_ack(now)
        if self.t_keep is not None and self.t_keep <= now:
            self.t_keep = None
            self._on_keepalive(now)
            if self.state is CLOSED:
                return
        t = INF
        for x in (self.t_wait, self.t_rexmit, self.t_rack, self.t_tlp, self.t_persist, self.t_dack, self.t_keep):
            if x is not None and x < t:
                t = x
        if t != INF:
            self._schedule(t)

    def _on_keepalive(self, now: float) -> None:
        cfg = self.cfg
        if self.state not in (ESTABLISHED, CLOSE_WAIT):
            return
        idle = now - self.last_recv
        if idle < cfg.keepalive_idle and not self.ka_probes:
            self.t_keep = self.last_recv + cfg.keepalive_idle
            return
        if self.ka_probes >= cfg.keepalive_count:
            self._fail("keepalive timed out", send_rst=True)
            return
        if self.snd_max == self.snd_una:
            self.host.stats["tcp_keepalive_probes"] += 1
            self._emit(self.snd_una - 1, ACK, b"", now)
            self.ka_probes += 1
        self.t_keep = now + cfg.keepalive_interval

    def _on_rexmit_timeout(self, now: float) -> None:
        cfg = self.cfg
        state = self.state
        self.retries += 1
        self.host.stats["tcp_timeouts"] += 1
        self.rtt.cancel()  # Karn
        self.rtt.back_off()
        if state in (SYN_SENT, SYN_RECEIVED):
            if self.retries > cfg.syn_retries:
                if state is SYN_RECEIVED and self.handler is None:
                    self._remove()
                else:
                    self._fail("connection timed out")
                return
            self._send_syn(now, state is SYN_RECEIVED)
            self.t_rexmit = now + self.rtt.rto
            return
        if state not in SENDING or self.snd_max == self.snd_una:
            return
        if self.retries > cfg.retries:
            self._fail("connection timed out", send_rst=True)
            return
        flight = self.snd_max - self.snd_una - self.sb.sacked
        if self.retries == 1:
            # The timeout's retransmission is the one to judge (a pending fast retransmit's
            # undo is superseded); later timeouts of the same run keep this first one.
            self.undo_cc = None
            self._save_for_undo(now, True)
            self.cc.on_timeout(flight, now)
        else:
            self.cc.cwnd = self.mss
        self.in_recovery = False
        self.recover = self.rto_recover = self.snd_max
        self.dupacks = 0
        # Go back N: everything not SACKed is sent again, so RACK's marks have done their part.
        self.rack.clear_lost()
        self.t_rack = self.t_tlp = None
        self.tlp_end = None
        self.snd_nxt = self.snd_una
        self.high_rxt = self.snd_una
        self.host.stats["tcp_retransmits"] += 1
        self._output(now)
        if self.snd_nxt == self.snd_una:
            # Nothing went out (e.g. the window shrank to zero): probe instead.
            self._emit(self.snd_una - 1, ACK, b"", now)
        self.t_rexmit = now + self.rtt.rto

    # ------------------------------------------------------------------ ICMPv6

    def packet_too_big(self, mtu: int, seq: int, now: float) -> None:
        """RFC 8201: lower the path MTU, if the quoted segment is plausibly ours (RFC 5927)."""
        seq_u = _unwrap(seq, self.snd_una)
        if not (self.snd_una <= seq_u < self.snd_max):
            self.host.stats["icmp_ptb_ignored"] += 1
            return
        mtu = max(mtu, 1280)
        if mtu >= self.mtu:
            return
        self.mtu = mtu
        self._set_mss()
        if self.state in SENDING and not self.in_recovery:
            self.snd_nxt = self.snd_una
            self.rtt.cancel()
            self._output(now)

    def set_mtu(self, mtu: int, now: float) -> None:
        """The path to the peer changed (e.g. direct UDP vs. DERP): segment for ``mtu``.  Our
        segments stay within the MSS the peer announced; theirs within the one we announced."""
        mtu = max(1280, min(mtu, 0xFFFF + 40))
        lower = mtu < self.mtu
        self.mtu = mtu
        if self.state is not SYN_SENT and self.state is not CLOSED:
            self._set_mss()
        if lower and self.state in SENDING and not self.in_recovery and self.snd_max > self.snd_una:
            self.snd_nxt = self.snd_una
            self.rtt.cancel()
            self._output(now)

    # ------------------------------------------------------------------ application API

    def write(self, data: bytes) -> None:
        """Queue bytes for sending; call ``flush`` (or let the stack's caller do it) afterwards."""
        if self.sendbuf.fin is not None or self.state in (CLOSED, TIME_WAIT):
            raise ConnectionError("connection is closed for writing")
        self.sendbuf.append(data)

    def close(self, now: float) -> None:
        """Full close: send what is buffered, then FIN; no more data is read."""
        self.closed_by_app = True
        self.paused = False
        self.rcv_queue = []
        self.rcv_queued = 0
        self.eof_pending = False
        if self._lost_pending:
            self._lost_pending = False
            self._notify_lost(None)
            return
        self.shutdown_write(now)

    def shutdown_write(self, now: float) -> None:
        """Half close: FIN after the buffered data; reading goes on."""
        state = self.state
        if self.sendbuf.fin is not None or state in (CLOSED, TIME_WAIT):
            return
        if state is SYN_SENT:
            self._notify_lost(None)
            self._remove()
            return
        self.sendbuf.close()
        if state in (SYN_RECEIVED, ESTABLISHED):
            self.state = FIN_WAIT_1
        elif state is CLOSE_WAIT:
            self.state = LAST_ACK
        self.flush(now)

    def abort(self, reason: str = "connection aborted") -> None:
        if self.state is CLOSED:
            return
        if self.state not in (SYN_SENT, TIME_WAIT):
            self._send_rst()
        self._fail(reason)

    def set_keepalive(self, on: bool, now: float) -> None:
        self.cfg = TCPConfig(**{**self.cfg.__dict__, "keepalive": on})
        if on:
            self._arm_keepalive(now)
        else:
            self.t_keep = None

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self, now: float) -> None:
        """Deliver what was queued while paused (also after the connection has finished)."""
        self.paused = False
        while self.rcv_queue and not self.paused and self.handler is not None:
            data = b"".join(self.rcv_queue)
            self.rcv_queue = []
            self.rcv_queued = 0
            self.handler.data_received(data)
        if self.paused or self.rcv_queue:
            return
        if self.eof_pending:
            self.eof_pending = False
            if not self.lost_notified and self.handler is not None:
                self.handler.eof_received()
        if self._lost_pending:
            self._lost_pending = False
            self._notify_lost(None)
        if self.state in RECEIVING or self.state is CLOSE_WAIT:
            cur = self.rcv_adv - self.rcv_nxt
            free = self.rcvbuf - self.rcv_queued - self.ooo.size
            if free - cur >= min(self.rcvbuf // 2, 2 * self.adv_mss):
                self.host.stats["tcp_window_updates"] += 1
                self._send_ack(now)

    # ------------------------------------------------------------------ teardown

    def _notify_lost(self, reason: str | None) -> None:
        if self.lost_notified:
            return
        if reason is None and (self.rcv_queue or self.eof_pending) and self.handler is not None:
            # A clean end while the reader is paused: report it after the queued data.
            self._lost_pending = True
            return
        self.lost_notified = True
        if self.handler is not None:
            self.handler.connection_lost(reason)

    def _fail(self, reason: str, send_rst: bool = False) -> None:
        if send_rst and self.state not in (CLOSED, SYN_SENT, TIME_WAIT):
            self._send_rst()
        self.error = reason
        self._remove()
        self._notify_lost(reason)

    def _remove(self) -> None:
        if self.listener is not None:
            self.listener.pending -= 1
            self.listener = None
        self.state = CLOSED
        self.t_rexmit = self.t_persist = self.t_keep = self.t_dack = self.t_wait = self.t_rack = self.t_tlp = None
        self.host.remove_connection(self)
