"""TCP connections: the RFC 9293 state machine, sans-IO.

A ``Connection`` is driven by its ``Stack``: ``input`` with one parsed segment, ``on_timer`` when
one of its timers is due, and the application calls ``write``/``flush``/``close``/
``shutdown_write``/``abort``/``pause_reading``/``resume_reading``.  Everything takes the current
time ``now`` (seconds, float) from the caller; packets leave through ``stack.emit``.

Internally sequence numbers are *unwrapped*: plain Python integers that keep growing from the ISN,
so comparisons are ordinary ``<``.  Numbers from the wire are unwrapped against ``snd_una`` or
``rcv_nxt``; outgoing ones are masked to 32 bits when packed.

Implemented: active, passive and simultaneous open; MSS; window scaling and timestamps with PAWS
(RFC 7323); SACK (RFC 2018) with RFC 6675-style loss recovery; RTO per RFC 6298 with Karn's rule
and exponential backoff; fast retransmit and NewReno recovery (RFC 5681, RFC 6582) with CUBIC
(RFC 9438, default) or NewReno congestion avoidance; delayed ACK
(every second segment or 40 ms); no Nagle; zero-window probes; keepalive; FIN/RST with RFC 5961
challenge ACKs; TIME_WAIT; ICMPv6 packet-too-big lowering the MSS.

The application side is a handler object with ``connection_made(conn)``, ``data_received(bytes)``,
``eof_received()``, ``connection_lost(reason: str | None)`` and ``writable()``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import congestion, tcpsegment
from .reassembly import Reassembly
from .sack import Scoreboard
from .tcpsegment import ACK, FIN, PSH, RST, SYN, build_options, build_packet, parse_options

__all__ = ["Connection", "Listener", "TCPConfig", "STATE_NAMES"]

M32 = 0xFFFFFFFF
HALF = 0x80000000
INF = float("inf")
_II = struct.Struct("!II")
_PACKET = tcpsegment.PACKET.pack
_TS_FAST = b"\x01\x01\x08\x0a"
_PAD_TS = b"\x01\x01\x08\x0a"

(
    CLOSED,
    LISTEN,
    SYN_SENT,
    SYN_RECEIVED,
    ESTABLISHED,
    FIN_WAIT_1,
    FIN_WAIT_2,
    CLOSE_WAIT,
    CLOSING,
    LAST_ACK,
    TIME_WAIT,
) = range(11)
STATE_NAMES = [
    "CLOSED",
    "LISTEN",
    "SYN_SENT",
    "SYN_RECEIVED",
    "ESTABLISHED",
    "FIN_WAIT_1",
    "FIN_WAIT_2",
    "CLOSE_WAIT",
    "CLOSING",
    "LAST_ACK",
    "TIME_WAIT",
]
_SENDING = frozenset((ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, CLOSING, LAST_ACK))
_RECEIVING = frozenset((ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2))


@dataclass
class TCPConfig:
    """Tunables.  Defaults follow the RFCs and Linux where the RFCs leave room."""

    mtu: int = 1280
    # The largest IPv6 packet we can take in (0: ``mtu``). The MSS we announce comes from it, not
    # from the path MTU we send on: the tunnel may carry more towards us than we may send back,
    # and the sender bounds its segments by its own path MTU anyway (RFC 9293 3.7.1).
    receive_mtu: int = 0
    rcvbuf: int = 4 << 20  # receive window we can offer (needs window scaling above 64 KiB)
    initial_rto: float = 1.0  # RFC 6298 (2.1)
    min_rto: float = 0.2  # Linux's; RFC 6298 suggests 1 s
    max_rto: float = 60.0
    syn_retries: int = 6
    retries: int = 12  # consecutive timeouts before giving up on a connection
    delayed_ack: float = 0.04
    msl: float = 30.0  # TIME_WAIT lasts 2 * MSL
    fin_timeout: float = 60.0  # orphaned FIN_WAIT_2
    keepalive: bool = False
    keepalive_idle: float = 7200.0
    keepalive_interval: float = 75.0
    keepalive_count: int = 9
    timestamps: bool = True
    sack: bool = True
    window_scaling: bool = True
    initial_window: int = 10  # segments, RFC 6928
    congestion: str = "cubic"  # or "newreno"
    dupthresh: int = 3
    send_low_water: int = 1 << 20  # writable() fires when unACKed+unsent bytes fall below this

    def wscale(self) -> int:
        if not self.window_scaling:
            return 0
        s = 0
        while (0xFFFF << s) < self.rcvbuf and s < 14:
            s += 1
        return s


def _unwrap(value: int, ref: int) -> int:
    return ref + ((value - ref + HALF) & M32) - HALF


class Listener:
    """A passive open on a port: SYNs become connections until ``backlog`` are half-open."""

    def __init__(self, stack, port: int, accept, backlog: int, address: bytes | None) -> None:
        self.stack = stack
        self.port = port
        self.accept = accept  # callable(conn) -> handler or None (refuse with RST)
        self.backlog = backlog
        self.address = address
        self.pending = 0  # connections in SYN_RECEIVED
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.stack._remove_listener(self)


class Connection:
    def __init__(self, stack, local: bytes, lport: int, remote: bytes, rport: int, cfg: TCPConfig, now: float) -> None:
        self.stack = stack
        self.local = local
        self.lport = lport
        self.remote = remote
        self.rport = rport
        self.key = (remote, rport, local, lport)
        # Pseudo-header (addresses, next header 6) plus the ports: constant for the connection.
        self._pseudo = int.from_bytes(local + remote, "big") + 6 + lport + rport
        self.cfg = cfg
        self.handler = None
        self.listener: Listener | None = None
        self.state = CLOSED
        # An IPv6 payload length is 16 bits (no jumbograms); a per-peer path MTU wins.
        self.mtu = min(stack.path_mtu.get(remote, cfg.mtu), 0xFFFF + 40)
        self.adv_mss = max(self.mtu, min(cfg.receive_mtu, 0xFFFF + 40)) - 60
        self.peer_mss = 1220
        iss = stack.isn(local, lport, remote, rport, now)
        self.iss = iss
        self.snd_una = self.snd_nxt = self.snd_max = iss
        self.snd_wnd = 0
        self.max_snd_wnd = 0
        self.snd_wl1 = self.snd_wl2 = 0
        self.sndbuf = bytearray()
        self.buf_seq = iss + 1
        self.fin_seq: int | None = None
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
        self.ts_offset = stack.rng.getrandbits(32)
        self.sack_ok = False
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = cfg.initial_rto
        self.rtt_seq: int | None = None
        self.rtt_time = 0.0
        self.mss = self.mtu - 60
        self.cc = congestion.make(cfg.congestion, self.mss, cfg.initial_window)
        self.sb = Scoreboard()
        self.in_recovery = False
        self.recover = iss
        self.dupacks = 0
        self.high_rxt = iss
        self.lost_floor = iss
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
        self._armed = INF
        self._last_oow = -INF

    # ------------------------------------------------------------------ helpers

    def __repr__(self) -> str:
        return f"<Connection {self.lport}->{self.rport} {STATE_NAMES[self.state]}>"

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.state]

    @property
    def send_buffered(self) -> int:
        """Bytes written and not yet acknowledged."""
        return len(self.sndbuf)

    def _schedule(self, t: float) -> None:
        if t < self._armed:
            self._armed = t
            self.stack._arm(self, t)

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
                opts = _PAD_TS + _II.pack(tsval, self.ts_recent)
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
        self.stack.emit(hdr + opts + data if data else hdr + opts)

    def _send_ack(self, now: float) -> None:
        # snd_max, not a rewound snd_nxt (after a timeout): like Linux, so the ACK always falls
        # in the peer's window.
        self._emit(self.snd_max, ACK, b"", now, sack=True)

    def _send_oow_ack(self, now: float) -> None:
        """Answer an unacceptable segment without data (or a RST/SYN needing a challenge ACK),
        at most twice a second: two stacks that disagree must not ping-pong ACKs (RFC 5961 §7,
        Linux's tcp_invalid_ratelimit)."""
        if now - self._last_oow < 0.5:
            self.stack.stats["tcp_oow_ack_limited"] += 1
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
        self.stack.emit(
            build_packet(
                self.local, self.remote, self.lport, self.rport, self.iss, self.rcv_nxt, flags, window, opts, b""
            )
        )

    def _send_rst(self) -> None:
        self.stack.emit(
            build_packet(self.local, self.remote, self.lport, self.rport, self.snd_nxt, self.rcv_nxt, RST | ACK, 0, b"", b"")
        )

    def _negotiate(self, opts) -> None:
        cfg = self.cfg
        if opts.mss:
            self.peer_mss = max(opts.mss, 64)
        self.snd_wscale_ok = opts.wscale is not None and cfg.window_scaling
        if self.snd_wscale_ok:
            self.snd_wscale = min(opts.wscale, 14)
        else:
            self.snd_wscale = 0
            self.rcv_wscale = 0
            self.rcvbuf = min(self.rcvbuf, 0xFFFF)
        self.sack_ok = opts.sack_permitted and cfg.sack
        self.ts_ok = opts.ts is not None and cfg.timestamps
        if self.ts_ok:
            self.ts_recent = opts.ts[0]
        self._set_mss()

    # ------------------------------------------------------------------ opening

    def open_active(self, now: float) -> None:
        self.state = SYN_SENT
        self.snd_nxt = self.snd_max = self.iss + 1
        self.rtt_seq = self.iss + 1
        self.rtt_time = now
        self._send_syn(now, False)
        self.t_rexmit = now + self.rto
        self._schedule(self.t_rexmit)
        self._arm_keepalive(now)

    def open_passive(self, seq: int, opts, now: float) -> None:
        self.state = SYN_RECEIVED
        self.irs = seq
        self.rcv_nxt = seq + 1
        self._negotiate(opts)
        self.snd_nxt = self.snd_max = self.iss + 1
        self.rtt_seq = self.iss + 1
        self.rtt_time = now
        self._send_syn(now, True)
        self.t_rexmit = now + self.rto
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
                self.stack.stats["tcp_refused_by_app"] += 1
                self.abort()
                return
            self.handler = handler
        self._arm_keepalive(now)
        self.handler.connection_made(self)

    # ------------------------------------------------------------------ input

    def input(self, seg: bytes, doff: int, seq: int, ack: int, flags: int, win: int, now: float) -> None:
        """Process one segment addressed to this connection (checksum already verified)."""
        tsval = tsecr = None
        sack_blocks = None
        opts = None
        if doff > 20:
            if doff == 32 and seg[20:24] == _TS_FAST:
                tsval, tsecr = _II.unpack_from(seg, 24)
            else:
                try:
                    opts = parse_options(seg, 20, doff)
                except tcpsegment.Malformed:
                    self.stack.stats["tcp_bad_options"] += 1
                    return
                if opts.ts is not None:
                    tsval, tsecr = opts.ts
                if opts.sack:
                    sack_blocks = opts.sack
        state = self.state
        # Fast path ("header prediction"): the next in-order data segment on an established
        # connection that ACKs nothing new, with nothing of ours in flight or pending recovery.
        if (
            state == ESTABLISHED
            and flags & 0x37 == ACK
            and sack_blocks is None
            and seq == self.rcv_nxt & M32
            and ack == self.snd_una & M32
            and self.snd_max == self.snd_una
            and not self.ooo
            and not self.paused
            and not self.rcv_queue
            and (win << self.snd_wscale) == self.snd_wnd
            and doff < len(seg) <= doff + self.rcv_adv - self.rcv_nxt
            and (tsval is None or not (tsval - self.ts_recent) & HALF)
        ):
            self.last_recv = now
            self.ka_probes = 0
            if tsval is not None:
                self.ts_recent = tsval
            self.rcv_nxt += len(seg) - doff
            self.ack_pending += 1
            self.handler.data_received(seg[doff:])
            if self.state != ESTABLISHED:
                return
            if self.ack_pending >= 2:
                batch = self.stack._batch_acks
                if batch is None or self.ack_pending >= 32:
                    self.ack_now = True
                else:
                    batch.add(self)
            if self.buf_seq + len(self.sndbuf) > self.snd_nxt or self.fin_seq is not None:
                self._output(now)
            if self.ack_now:
                self._send_ack(now)
            elif self.ack_pending == 1 and self.t_dack is None:
                self.t_dack = now + self.cfg.delayed_ack
                self._schedule(self.t_dack)
            return
        if state == SYN_SENT:
            if opts is None:
                opts = tcpsegment.Options(ts=(tsval, tsecr) if tsval is not None else None)
            self._input_syn_sent(seq, ack, flags, win, opts, tsecr, now)
            return
        self.last_recv = now
        self.ka_probes = 0

        rcv_nxt = self.rcv_nxt
        seq_u = rcv_nxt + ((seq - rcv_nxt + HALF) & M32) - HALF
        dlen = len(seg) - doff
        if state == TIME_WAIT and flags & SYN and not flags & ACK and seq_u > rcv_nxt:
            # A new incarnation (RFC 9293 3.10.7.4 / RFC 6191): end TIME_WAIT and let a listener take it.
            self._remove()
            self.stack._tcp_syn_to_listener(self.remote, self.local, self.rport, self.lport, seq, seg, doff, now)
            return

        if state == SYN_RECEIVED and flags & SYN and not flags & RST and seq_u == self.irs:
            if not flags & ACK:
                self._send_syn(now, True)  # our SYN-ACK was lost; the peer sent its SYN again
                return
            # Simultaneous open: the peer's SYN-ACK repeats its SYN; take it as an ACK.
            flags &= ~SYN
            seq_u += 1

        # PAWS (RFC 7323 §5).  Like Linux, a pure ACK is exempt: a reordered ACK carries an older
        # timestamp but still-valid SACK and window information, and old duplicates are harmless.
        if (
            self.ts_ok
            and tsval is not None
            and (tsval - self.ts_recent) & HALF
            and not flags & RST
            and (len(seg) > doff or flags & (SYN | FIN))
        ):
            self.stack.stats["tcp_paws_drop"] += 1
            self._send_ack(now)
            return

        # Acceptability (RFC 9293 3.10.7.4, first check)
        seg_len = dlen + (flags & SYN and 1) + (flags & FIN and 1)
        rwnd = self.rcv_adv - rcv_nxt
        if seq_u == rcv_nxt and (seg_len == 0 or rwnd > 0):
            pass
        elif seg_len == 0:
            if not (rcv_nxt <= seq_u < rcv_nxt + rwnd):
                if not flags & RST:
                    self._send_oow_ack(now)
                return
        elif not (
            rwnd > 0
            and (rcv_nxt <= seq_u < rcv_nxt + rwnd or rcv_nxt < seq_u + seg_len <= rcv_nxt + rwnd)
        ):
            if flags & RST:
                return
            if rwnd == 0 and seq_u == rcv_nxt:
                # Zero window: the ACK and window still count (and a bare FIN, as Linux takes
                # it); data does not.
                if dlen:
                    dlen = 0
                    flags &= ~FIN
                self.ack_now = True
            else:
                self.stack.stats["tcp_out_of_window"] += 1
                self._send_ack(now)
                return

        if flags & RST:
            if seq_u == rcv_nxt:
                self.stack.stats["tcp_rst_received"] += 1
                if state == SYN_RECEIVED and self.handler is None:
                    self._remove()
                else:
                    self._fail("connection refused" if state == SYN_RECEIVED else "connection reset")
            else:
                self._send_oow_ack(now)  # challenge ACK, RFC 5961 §3
            return
        if flags & SYN:
            self._send_oow_ack(now)  # challenge ACK, RFC 5961 §4
            return
        if not flags & ACK:
            return

        snd_una = self.snd_una
        ack_u = snd_una + ((ack - snd_una + HALF) & M32) - HALF
        if state == SYN_RECEIVED:
            if snd_una < ack_u <= self.snd_max:
                self.snd_wnd = win << self.snd_wscale
                self.max_snd_wnd = self.snd_wnd
                self.snd_wl1 = seq_u
                self.snd_wl2 = ack_u
                self._established(now)
                if self.state == CLOSED:
                    return
                state = self.state
            else:
                self.stack.emit(
                    build_packet(self.local, self.remote, self.lport, self.rport, ack, 0, RST, 0, b"", b"")
                )
                return
        if ack_u > self.snd_max:
            self._send_ack(now)
            return
        if tsval is not None and seq_u <= rcv_nxt and not (tsval - self.ts_recent) & HALF:
            self.ts_recent = tsval

        new_wnd = win << self.snd_wscale
        if ack_u > snd_una:
            self._ack_advance(ack_u, tsecr, now)
            if self.state == CLOSED:
                return
            state = self.state
        elif (
            ack_u == snd_una
            and seg_len == 0
            and new_wnd == self.snd_wnd
            and self.snd_max > snd_una
        ):
            self.dupacks += 1
        newly_sacked = 0
        if sack_blocks and self.sack_ok:
            una = self.snd_una
            smax = self.snd_max
            for left, right in sack_blocks:
                lu = una + ((left - una + HALF) & M32) - HALF
                ru = una + ((right - una + HALF) & M32) - HALF
                if lu < una:
                    lu = una
                if ru > smax:
                    ru = smax
                if lu < ru:
                    newly_sacked += self.sb.add(lu, ru)
        if self.snd_wl1 < seq_u or (self.snd_wl1 == seq_u and self.snd_wl2 <= ack_u):
            if new_wnd > self.snd_wnd:
                self.persist_backoff = 0
                self.t_persist = None
            self.snd_wnd = new_wnd
            if new_wnd > self.max_snd_wnd:
                self.max_snd_wnd = new_wnd
            self.snd_wl1 = seq_u
            self.snd_wl2 = ack_u

        # Loss detection (RFC 5681 / 6582 / 6675)
        if self.in_recovery:
            if self.snd_una >= self.recover:
                self.in_recovery = False
                self.dupacks = 0
                self.cc.exit_recovery(self.snd_max - self.snd_una - self.sb.sacked)
            elif ack_u > snd_una:
                # Partial ACK: the segment at the new snd_una is lost too.
                self.lost_floor = min(self.snd_una + self.mss, self.snd_max)
                if self.high_rxt < self.snd_una:
                    self.high_rxt = self.snd_una
                if not self.sack_ok:
                    self._retransmit_first(now)  # RFC 6582 §3.2 step 5
        elif self.snd_max > self.snd_una and (
            self.dupacks >= self.cfg.dupthresh
            or (newly_sacked and self.sb.sacked >= self.cfg.dupthresh * self.mss)
        ):
            if self.sack_ok or self.snd_una > self.recover:
                self._enter_recovery(now)
        # Data
        if dlen:
            if state in _RECEIVING:
                if self.closed_by_app:
                    # Data for an application that has closed: Linux answers with RST.
                    self.stack.stats["tcp_data_after_close"] += 1
                    self.abort()
                    return
                self._receive_data(seq_u, seg, doff, dlen, flags & FIN, now)
                if self.state == CLOSED:
                    return
            elif flags & FIN:
                flags &= ~FIN
        if flags & FIN and not dlen:
            fin_pos = seq_u
            if fin_pos == self.rcv_nxt:
                self._fin_received(now)
                if self.state == CLOSED:
                    return
            elif fin_pos > self.rcv_nxt:
                self.ooo_fin = fin_pos
                self.ack_now = True
        self._output(now)
        if self.ack_now:
            self._send_ack(now)
        elif self.ack_pending and self.t_dack is None and self.ack_pending < 2:
            self.t_dack = now + self.cfg.delayed_ack
            self._schedule(self.t_dack)

    def _input_syn_sent(self, seq, ack, flags, win, opts, tsecr, now) -> None:
        if flags & ACK:
            ack_u = _unwrap(ack, self.snd_una)
            if ack_u <= self.iss or ack_u > self.snd_max:
                if not flags & RST:
                    self.stack.emit(
                        build_packet(self.local, self.remote, self.lport, self.rport, ack, 0, RST, 0, b"", b"")
                    )
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
            self.handler.connection_made(self)
            if self.state == CLOSED:
                return
            self._output(now)
            if self.ack_now:
                self._send_ack(now)
        else:
            # Simultaneous open (RFC 9293 Figure 7).
            self.state = SYN_RECEIVED
            self.stack.stats["tcp_simultaneous_open"] += 1
            self.rtt_seq = None
            self._send_syn(now, True)

    def _receive_data(self, seq_u: int, seg: bytes, doff: int, dlen: int, fin: int, now: float) -> None:
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
            if self.ack_pending >= 2:
                batch = self.stack._batch_acks
                if batch is None or self.ack_pending >= 32:
                    self.ack_now = True
                else:
                    # Inside a batch of packets: one ACK at the end of the batch covers them all.
                    batch.add(self)
        else:
            self.stack.stats["tcp_out_of_order"] += 1
            if not self.ooo.add(seq_u, data):
                self.stack.stats["tcp_ooo_queue_full"] += 1
                self.ack_now = True
                return
            if fin:
                self.ooo_fin = seq_u + dlen
            self.ack_now = True

    def _deliver(self, data: bytes) -> None:
        if self.paused or self.rcv_queue:
            self.rcv_queue.append(data)
            self.rcv_queued += len(data)
        else:
            self.handler.data_received(data)

    def _fin_received(self, now: float) -> None:
        self.rcv_nxt += 1
        self.ack_now = True
        state = self.state
        if state == TIME_WAIT:
            self.t_wait = now + 2 * self.cfg.msl
            self._send_ack(now)
            return
        if state in (SYN_RECEIVED, ESTABLISHED):
            self.state = CLOSE_WAIT
        elif state == FIN_WAIT_1:
            if self.snd_una > self.fin_seq:
                self._enter_time_wait(now, notify=False)
            else:
                self.state = CLOSING
        elif state == FIN_WAIT_2:
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
                if self.state == CLOSED:
                    return
        if self.state == TIME_WAIT:
            self._send_ack(now)
            self._notify_lost(None)

    def _enter_time_wait(self, now: float, notify: bool = True) -> None:
        self.state = TIME_WAIT
        self.t_rexmit = self.t_persist = self.t_keep = self.t_dack = None
        self.t_wait = now + 2 * self.cfg.msl
        self._schedule(self.t_wait)
        if notify:
            self._notify_lost(None)

    def _ack_advance(self, ack_u: int, tsecr: int | None, now: float) -> None:
        una = self.snd_una
        acked = ack_u - una
        n = ack_u - self.buf_seq
        if n > 0:
            buf = self.sndbuf
            if n >= len(buf):
                self.buf_seq += len(buf)
                buf.clear()
            else:
                del buf[:n]
                self.buf_seq = ack_u
        self.snd_una = ack_u
        if self.snd_nxt < ack_u:
            self.snd_nxt = ack_u
        if self.sb:
            self.sb.advance(ack_u)
        # RTT (RFC 6298 / RFC 7323 §4): timestamps when we have them, else one timed segment.
        r = None
        if self.ts_ok and tsecr:
            r = (((int(now * 1000) + self.ts_offset) - tsecr) & M32) / 1000.0
            if r > 600:
                r = None
        elif self.rtt_seq is not None and ack_u >= self.rtt_seq:
            r = now - self.rtt_time
            self.rtt_seq = None
        if r is not None:
            srtt = self.srtt
            if srtt is None:
                self.srtt = r
                self.rttvar = r / 2
            else:
                d = srtt - r
                self.rttvar = 0.75 * self.rttvar + 0.25 * (d if d > 0 else -d)
                self.srtt = 0.875 * srtt + 0.125 * r
            rto = self.srtt + max(0.001, 4 * self.rttvar)
            cfg = self.cfg
            self.rto = cfg.min_rto if rto < cfg.min_rto else (cfg.max_rto if rto > cfg.max_rto else rto)
            self.retries = 0
        elif self.retries:
            # Karn: a retransmitted segment gives no sample, but progress ends the backoff run.
            self.retries = 0
        self.dupacks = 0
        if ack_u >= self.snd_max:
            self.t_rexmit = None
        else:
            self.t_rexmit = now + self.rto
            if self.t_rexmit < self._armed:
                self._schedule(self.t_rexmit)
        if not self.in_recovery:
            cc = self.cc
            cc.on_ack(acked, now, self.srtt)
            # Do not let cwnd grow without bound while the peer's window is what limits us.
            cap = 2 * self.max_snd_wnd + 10 * self.mss
            if cc.cwnd > cap:
                cc.cwnd = cap
        if self.want_writable and len(self.sndbuf) <= self.cfg.send_low_water:
            self.want_writable = False
            if self.handler is not None:
                self.handler.writable()
        fin = self.fin_seq
        if fin is not None and ack_u > fin:
            state = self.state
            if state == FIN_WAIT_1:
                self.state = FIN_WAIT_2
                if self.closed_by_app:
                    self.t_wait = now + self.cfg.fin_timeout
                    self._schedule(self.t_wait)
                    self._notify_lost(None)
            elif state == CLOSING:
                self._enter_time_wait(now)
            elif state == LAST_ACK:
                self._notify_lost(None)
                self._remove()

    def _enter_recovery(self, now: float) -> None:
        self.stack.stats["tcp_fast_retransmit"] += 1
        self.in_recovery = True
        self.recover = self.snd_max
        flight = self.snd_max - self.snd_una - self.sb.sacked
        self.cc.enter_recovery(flight, now)
        una = self.snd_una
        self.lost_floor = min(una + self.mss, self.snd_max)
        self.rtt_seq = None
        self._retransmit_first(now)

    def _retransmit_first(self, now: float) -> None:
        # Retransmit the first missing segment now, whatever the pipe says (RFC 5681 §3.2 step 2).
        una = self.snd_una
        hole = self.sb.next_hole(una, self.snd_max) or (una, self.snd_max)
        s = hole[0]
        data_end = self.buf_seq + len(self.sndbuf)
        n = max(0, min(hole[1] - s, self.mss, data_end - s))
        self.stack.stats["tcp_retransmits"] += 1
        self._send_range(s, n, now)
        self.high_rxt = s + (n or 1)

    # ------------------------------------------------------------------ output

    def _send_range(self, seq: int, n: int, now: float) -> None:
        """Send data [seq, seq + n) (and our FIN if it directly follows)."""
        off = seq - self.buf_seq
        data = bytes(self.sndbuf[off : off + n]) if n else b""
        flags = ACK | PSH if n else ACK
        end = seq + n
        if self.fin_seq is not None and end == self.fin_seq:
            flags |= FIN
            end += 1
        self._emit(seq, flags, data, now)
        if end > self.snd_max:
            if self.rtt_seq is None and not self.ts_ok:
                self.rtt_seq = end
                self.rtt_time = now
            self.snd_max = end
        elif self.rtt_seq is not None and seq < self.rtt_seq:
            self.rtt_seq = None  # Karn: never time a retransmitted segment
        if self.t_rexmit is None:
            self.t_rexmit = now + self.rto
            self._schedule(self.t_rexmit)
        if end > self.snd_nxt:
            self.snd_nxt = end

    def flush(self, now: float) -> None:
        """Send what the windows allow (the application calls this after ``write``)."""
        self._output(now)
        if self.ack_now:
            self._send_ack(now)

    def _output(self, now: float) -> None:
        if self.state not in _SENDING:
            return
        if self.in_recovery:
            self._output_recovery(now)
            return
        mss = self.mss
        una = self.snd_una
        sb = self.sb
        data_end = self.buf_seq + len(self.sndbuf)
        fin = self.fin_seq
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
                    data_end = self.buf_seq + len(self.sndbuf)
                    if s >= data_end:
                        n = 0
                    elif s + n > data_end:
                        n = data_end - s
                    self.stack.stats["tcp_retransmits"] += 1
                    self._send_range(s, n, now)
                    self.high_rxt = s + n + (1 if n == 0 else 0)
                    continue
                self.high_rxt = lost_edge
            # New data, if the peer's window allows.
            nxt = self.snd_nxt
            data_end = self.buf_seq + len(self.sndbuf)
            n = min(data_end - nxt, mss, una + self.snd_wnd - nxt)
            if n <= 0:
                if self.fin_seq is not None and nxt == self.fin_seq:
                    self._send_range(nxt, 0, now)
                break
            self._send_range(nxt, n, now)

    # ------------------------------------------------------------------ timers

    def _arm_persist(self, now: float) -> None:
        cfg = self.cfg
        t = min(max(self.rto, cfg.min_rto) * (1 << self.persist_backoff), cfg.max_rto)
        self.t_persist = now + t
        self._schedule(self.t_persist)

    def _arm_keepalive(self, now: float) -> None:
        if self.cfg.keepalive:
            self.t_keep = now + self.cfg.keepalive_idle
            self._schedule(self.t_keep)

    def on_timer(self, now: float) -> None:
        self._armed = INF
        if self.t_wait is not None and self.t_wait <= now:
            self.t_wait = None
            if self.state in (TIME_WAIT, FIN_WAIT_2):
                self._remove()
                return
        if self.t_rexmit is not None and self.t_rexmit <= now:
            self.t_rexmit = None
            self._on_rexmit_timeout(now)
            if self.state == CLOSED:
                return
        if self.t_persist is not None and self.t_persist <= now:
            self.t_persist = None
            if self.snd_max == self.snd_una and self.snd_nxt < self.buf_seq + len(self.sndbuf):
                self.stack.stats["tcp_window_probes"] += 1
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
            if self.state == CLOSED:
                return
        t = INF
        for x in (self.t_wait, self.t_rexmit, self.t_persist, self.t_dack, self.t_keep):
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
            self.stack.stats["tcp_keepalive_probes"] += 1
            self._emit(self.snd_una - 1, ACK, b"", now)
            self.ka_probes += 1
        self.t_keep = now + cfg.keepalive_interval

    def _on_rexmit_timeout(self, now: float) -> None:
        cfg = self.cfg
        state = self.state
        self.retries += 1
        self.stack.stats["tcp_timeouts"] += 1
        self.rtt_seq = None  # Karn
        self.rto = min(self.rto * 2, cfg.max_rto)
        if state in (SYN_SENT, SYN_RECEIVED):
            if self.retries > cfg.syn_retries:
                if state == SYN_RECEIVED and self.handler is None:
                    self._remove()
                else:
                    self._fail("connection timed out")
                return
            self._send_syn(now, state == SYN_RECEIVED)
            self.t_rexmit = now + self.rto
            return
        if state not in _SENDING or self.snd_max == self.snd_una:
            return
        if self.retries > cfg.retries:
            self._fail("connection timed out", send_rst=True)
            return
        flight = self.snd_max - self.snd_una - self.sb.sacked
        if self.retries == 1:
            self.cc.on_timeout(flight, now)
        else:
            self.cc.cwnd = self.mss
        self.in_recovery = False
        self.recover = self.snd_max
        self.dupacks = 0
        self.snd_nxt = self.snd_una
        self.high_rxt = self.snd_una
        self.stack.stats["tcp_retransmits"] += 1
        self._output(now)
        if self.snd_nxt == self.snd_una:
            # Nothing went out (e.g. the window shrank to zero): probe instead.
            self._emit(self.snd_una - 1, ACK, b"", now)
        self.t_rexmit = now + self.rto

    # ------------------------------------------------------------------ ICMPv6

    def packet_too_big(self, mtu: int, seq: int, now: float) -> None:
        """RFC 8201: lower the path MTU, if the quoted segment is plausibly ours (RFC 5927)."""
        seq_u = _unwrap(seq, self.snd_una)
        if not (self.snd_una <= seq_u < self.snd_max):
            self.stack.stats["icmp_ptb_ignored"] += 1
            return
        mtu = max(mtu, 1280)
        if mtu >= self.mtu:
            return
        self.mtu = mtu
        self._set_mss()
        if self.state in _SENDING and not self.in_recovery:
            self.snd_nxt = self.snd_una
            self.rtt_seq = None
            self._output(now)

    def set_mtu(self, mtu: int, now: float) -> None:
        """The path to the peer changed (e.g. direct UDP vs. DERP): segment for ``mtu``.  Our
        segments stay within the MSS the peer announced; theirs within the one we announced."""
        mtu = max(1280, min(mtu, 0xFFFF + 40))
        lower = mtu < self.mtu
        self.mtu = mtu
        if self.state != SYN_SENT and self.state != CLOSED:
            self._set_mss()
        if lower and self.state in _SENDING and not self.in_recovery and self.snd_max > self.snd_una:
            self.snd_nxt = self.snd_una
            self.rtt_seq = None
            self._output(now)

    # ------------------------------------------------------------------ application API

    def write(self, data: bytes) -> None:
        """Queue bytes for sending; call ``flush`` (or let the stack's caller do it) afterwards."""
        if self.fin_seq is not None or self.state in (CLOSED, TIME_WAIT):
            raise ConnectionError("connection is closed for writing")
        self.sndbuf += data

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
        if self.fin_seq is not None or state in (CLOSED, TIME_WAIT):
            return
        if state == SYN_SENT:
            self._notify_lost(None)
            self._remove()
            return
        self.fin_seq = self.buf_seq + len(self.sndbuf)
        if state in (SYN_RECEIVED, ESTABLISHED):
            self.state = FIN_WAIT_1
        elif state == CLOSE_WAIT:
            self.state = LAST_ACK
        self.flush(now)

    def abort(self, reason: str = "connection aborted") -> None:
        if self.state == CLOSED:
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
            if not self.lost_notified:
                self.handler.eof_received()
        if self._lost_pending:
            self._lost_pending = False
            self._notify_lost(None)
        if self.state in _RECEIVING or self.state == CLOSE_WAIT:
            cur = self.rcv_adv - self.rcv_nxt
            free = self.rcvbuf - self.rcv_queued - self.ooo.size
            if free - cur >= min(self.rcvbuf // 2, 2 * self.adv_mss):
                self.stack.stats["tcp_window_updates"] += 1
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
        self.t_rexmit = self.t_persist = self.t_keep = self.t_dack = self.t_wait = None
        self.stack._remove_connection(self)
