"""RACK-TLP loss detection (RFC 8985), the sender's time-based view of what is lost.

``Rack`` keeps a log of the segments in flight, in sequence order: each ``[start, end, xmit_ts,
flags, order]`` with the time it was last (re)transmitted, whether it was retransmitted, whether
it is marked lost, and a count of transmissions that orders it among all others.  Sequence numbers are unwrapped, as everywhere in the connection.

RACK (§6): of the segments the peer has delivered (cumulatively ACKed or SACKed), remember the
one sent most recently and the round trip it took
(``rtt``).  A segment not delivered yet that was sent before it is lost once ``rtt + reo_wnd``
has passed since it was sent; one not that old yet is checked again by the reorder timer the
connection arms at the returned time.  The reorder window is a quarter of the minimum RTT,
bounded by SRTT, and zero while no reordering has been seen and at least DupThresh segments
are SACKed or recovery is under way (§6.2 step 4), so a plain loss is repaired at once.  A
retransmission is timed the same way, so a lost retransmission is detected like any other
lost segment instead of waiting for the retransmission timeout.

Finding lost segments walks only the holes of the SACK scoreboard, and stops at the first
segment past every retransmission that was sent after the RACK segment or is not old enough
yet: from there on segments were sent in sequence order, so none later can be lost either.

"Sent before" compares the transmission count, not the time and sequence number as the RFC's
tie-break does: many segments leave in the same instant, and a retransmission sent in that
instant after new data must not count as sent before it.

Tail Loss Probe (§7) lives in the connection: it needs the send path.
"""

from __future__ import annotations

from bisect import bisect_right
from operator import itemgetter

from .sack import Scoreboard

__all__ = ["LOST", "RETRANS", "Rack"]

RETRANS = 1
LOST = 2
_START = itemgetter(0)


class Rack:
    __slots__ = ("segs", "head", "top", "lost", "rexmit_end", "xmit_ts", "order", "rtt", "min_rtt", "fack",
                 "reordering_seen", "sends")

    def __init__(self) -> None:
        self.segs: list[list] = []  # [start, end, xmit_ts, flags, order]; live from ``head`` on
        self.head = 0
        self.top = 0  # the end of the last entry: new data starts here (see ``on_send``)
        self.lost: list[list] = []  # the entries marked lost and not retransmitted since
        self.rexmit_end = 0  # above this no segment in flight was ever retransmitted
        self.xmit_ts = -1.0  # RACK.xmit_ts, and the transmission count of that segment
        self.order = -1
        self.sends = 0
        self.rtt = 0.0
        self.min_rtt = float("inf")
        self.fack = 0  # the highest sequence number delivered
        self.reordering_seen = False

    # ------------------------------------------------------------------ the log

    def _index(self, seq: int) -> int:
        """Index of the entry holding ``seq``, or of the first one after it."""
        segs = self.segs
        i = bisect_right(segs, seq, lo=self.head, key=_START) - 1
        if i < self.head or segs[i][1] <= seq:
            i += 1
        return i

    def _split(self, seq: int) -> int:
        """Make ``seq`` an entry boundary; return the index of the entry starting there (or after)."""
        i = self._index(seq)
        segs = self.segs
        if i < len(segs) and segs[i][0] < seq:
            s = segs[i]
            tail = [seq, s[1], s[2], s[3], s[4]]
            s[1] = seq
            segs.insert(i + 1, tail)
            if s[3] & LOST:
                self.lost.append(tail)
            i += 1
        return i

    def on_send(self, start: int, end: int, now: float) -> None:
        """``[start, end)`` went out ``now``: new data, or a retransmission.  (The connection
        appends new data itself, the hot path: ``sends += 1``, an entry, ``top = end``.)"""
        segs = self.segs
        self.sends = order = self.sends + 1
        top = self.top
        if len(segs) == self.head or start >= top:
            segs.append([start, end, now, 0, order])
            self.top = end
            return
        hi = end if end < top else top
        i = self._split(start)
        j = self._split(hi)
        for k in range(i, j):
            s = segs[k]
            if s[3] & LOST:
                self._unmark(s)
            s[2] = now
            s[3] = RETRANS
            s[4] = order
        if end > top:
            segs.append([top, end, now, RETRANS, order])
            self.top = end
        if end > self.rexmit_end:
            self.rexmit_end = end

    def advance(self, una: int) -> None:
        """Everything below ``una`` is acknowledged: forget it."""
        segs = self.segs
        n = len(segs)
        if self.lost:
            h = self.head
            while h < n and segs[h][1] <= una:
                if segs[h][3] & LOST:
                    self._unmark(segs[h])
                h += 1
        else:
            h = self._index(una)
        if h < n and segs[h][0] < una:
            segs[h][0] = una
        if h > 512 and h * 2 > n:
            del segs[:h]
            h = 0
        self.head = h

    def clear_lost(self) -> None:
        for s in self.lost:
            s[3] &= ~LOST
        self.lost = []

    def _unmark(self, s: list) -> None:
        s[3] &= ~LOST
        self.lost = [x for x in self.lost if x is not s]

    def first_lost(self) -> list | None:
        """The lowest entry marked lost and not retransmitted since."""
        return min(self.lost, key=_START) if self.lost else None

    def lost_bytes(self) -> int:
        return sum(s[1] - s[0] for s in self.lost)

    # ------------------------------------------------------------------ delivery (§6.1 step 2)

    def _delivered(self, s: list, now: float, tsecr_ms: int | None) -> None:
        xmit = s[2]
        if s[3] & RETRANS:
            # Which copy does this ACK answer?  The echoed timestamp says (the retransmission's
            # or later); without timestamps, an RTT below the minimum points at the original.
            if tsecr_ms is not None:
                if tsecr_ms < int(xmit * 1000):
                    return
            elif now - xmit < self.min_rtt:
                return
        if s[4] > self.order:
            self.xmit_ts = xmit
            self.order = s[4]
            self.rtt = now - xmit
            if self.rtt < self.min_rtt:
                self.min_rtt = self.rtt

    def on_ack(self, una: int, ack: int, now: float, tsecr_ms: int | None) -> None:
        """A cumulative ACK moved from ``una`` to ``ack`` (call before ``advance``)."""
        segs = self.segs
        h = self.head
        if h == len(segs):
            return
        if self.rexmit_end > una:
            i = h
            while i < len(segs) and segs[i][0] < ack:
                self._delivered(segs[i], now, tsecr_ms)
                i += 1
        else:
            # No retransmission among them: the last one covered was sent last.
            i = self._index(ack - 1)
            if i < len(segs) and segs[i][0] < ack:
                self._delivered(segs[i], now, tsecr_ms)
        s = segs[h]
        if s[0] < ack and s[1] <= self.fack and not s[3] & RETRANS:
            self.reordering_seen = True  # an original filled a hole below what was delivered
        if ack > self.fack:
            self.fack = ack

    def acked(self, una: int, ack: int, now: float, tsecr_ms: int | None) -> None:
        """``on_ack`` then ``advance``; in one pass when nothing in flight was retransmitted
        or is marked lost (the common case: every ACK of a bulk transfer)."""
        segs = self.segs
        h = self.head
        if self.lost or self.rexmit_end > una or h == len(segs):
            self.on_ack(una, ack, now, tsecr_ms)
            self.advance(ack)
            return
        i = bisect_right(segs, ack - 1, lo=h, key=_START) - 1
        if i < h:
            return  # it covers only what the log does not hold (our SYN)
        s = segs[i]
        if s[4] > self.order:  # the last one covered was sent last (see on_ack)
            self.xmit_ts = s[2]
            self.order = s[4]
            rtt = self.rtt = now - s[2]
            if rtt < self.min_rtt:
                self.min_rtt = rtt
        first = segs[h]
        if first[1] <= self.fack and not first[3] & RETRANS:
            self.reordering_seen = True
        if ack > self.fack:
            self.fack = ack
        if s[1] <= ack:
            i += 1
        elif s[0] < ack:
            s[0] = ack
        if i > 512 and i * 2 > len(segs):
            del segs[:i]
            i = 0
        self.head = i

    def on_sack(self, start: int, end: int, now: float, tsecr_ms: int | None) -> None:
        """``[start, end)`` is a SACK block that delivered new bytes."""
        segs = self.segs
        i = self._index(end - 1)
        if i < len(segs) and segs[i][0] < end:
            last = segs[i]
            self._delivered(last, now, tsecr_ms)
            if not last[3] & RETRANS and end < self.fack:
                self.reordering_seen = True
        if self.rexmit_end > start:
            k = self._index(start)
            stop = min(end, self.rexmit_end)
            while k < len(segs) and segs[k][0] < stop:
                if segs[k][3] & RETRANS:
                    self._delivered(segs[k], now, tsecr_ms)
                k += 1
        if self.lost:
            for s in [x for x in self.lost if start <= x[0] and x[1] <= end]:
                self._unmark(s)  # marked lost, yet it arrived: reordering
                self.reordering_seen = True
        if end > self.fack:
            self.fack = end

    # ------------------------------------------------------------------ loss (§6.2)

    def reo_wnd(self, srtt: float | None, dupthresh_reached: bool) -> float:
        if not self.reordering_seen and dupthresh_reached:
            return 0.0
        w = self.min_rtt / 4 if self.min_rtt != float("inf") else 0.0
        return min(w, srtt) if srtt is not None else w

    def detect(self, sb: Scoreboard, una: int, smax: int, now: float, reo_wnd: float) -> tuple[int, float | None]:
        """Mark what is lost; returns how many entries were newly marked, and when the reorder
        timer is due (None: no segment waits)."""
        if self.xmit_ts < 0:
            return 0, None
        ro = self.order
        wait = self.rtt + reo_wnd
        segs = self.segs
        n = len(segs)
        rexmit_end = self.rexmit_end
        marked = 0
        due: float | None = None
        seq = una
        while seq < smax:
            hole = sb.next_hole(seq, smax) if sb else (seq, smax)
            if hole is None:
                break
            hs, he = hole
            i = self._index(hs)
            while i < n:
                s = segs[i]
                if s[0] >= he:
                    break
                i += 1
                ordered = s[0] >= rexmit_end  # from here on, sent in sequence order
                if s[3] & LOST:
                    continue
                if s[4] < ro:
                    at = s[2] + wait
                    if at <= now + 1e-9:  # rounding: a segment sent with the RACK one
                        s[3] |= LOST
                        self.lost.append(s)
                        marked += 1
                        continue
                    if due is None or at < due:
                        due = at
                if ordered:
                    return marked, due
            seq = he
        return marked, due
