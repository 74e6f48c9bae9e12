"""The receiver's out-of-order queue and the SACK blocks it reports (RFC 2018 §4).

Segments that arrive beyond ``rcv_nxt`` (unwrapped sequence numbers) are kept, trimmed so they do
not overlap, sorted by sequence number, until the gap before them is filled.  The SACK blocks
list the block holding the most recently received segment first, then other recent blocks, then
the highest ones.  The number of queued pieces is capped (``limit``) so that a peer sending many
tiny out-of-order segments cannot make us hold millions of objects; beyond it new pieces are
refused (the sender retransmits them later).
"""

from __future__ import annotations

from bisect import bisect_left

__all__ = ["Reassembly"]


class Reassembly:
    __slots__ = ("segments", "size", "recent", "limit")

    def __init__(self, limit: int = 16384) -> None:
        self.segments: list[tuple[int, bytes]] = []  # sorted by seq, non-overlapping
        self.size = 0
        self.recent: list[int] = []  # seqs of the latest arrivals, newest first
        self.limit = limit

    def __bool__(self) -> bool:
        return bool(self.segments)

    def add(self, seq: int, data: bytes) -> bool:
        """Queue ``data`` at ``seq``; False if refused because the queue is full."""
        if len(self.segments) >= self.limit:
            return False
        first = seq
        end = seq + len(data)
        segs = self.segments
        i = bisect_left(segs, (seq, b""))
        if i > 0:
            s, d = segs[i - 1]
            e = s + len(d)
            if e > seq:
                if e >= end:
                    self._touch(first)
                    return True
                data = data[e - seq :]
                seq = e
        while i < len(segs) and segs[i][0] < end:
            s, d = segs[i]
            if s > seq:
                segs.insert(i, (seq, data[: s - seq]))
                self.size += s - seq
                i += 1
            e = s + len(d)
            if e >= end:
                self._touch(first)
                return True
            data = data[e - seq :]
            seq = e
            i += 1
        segs.insert(i, (seq, data))
        self.size += len(data)
        self._touch(first)
        return True

    def _touch(self, seq: int) -> None:
        recent = self.recent
        if seq in recent:
            recent.remove(seq)
        recent.insert(0, seq)
        del recent[4:]

    def pop(self, rcv_nxt: int) -> tuple[int, list[bytes]]:
        """Take the segments that are now in order; returns ``(new rcv_nxt, data pieces)``."""
        out = []
        segs = self.segments
        k = 0
        n = len(segs)
        while k < n and segs[k][0] <= rcv_nxt:
            s, d = segs[k]
            self.size -= len(d)
            e = s + len(d)
            if e > rcv_nxt:
                out.append(d[rcv_nxt - s :])
                rcv_nxt = e
            k += 1
        del segs[:k]
        if not segs:
            self.recent = []
        return rcv_nxt, out

    def _block_at(self, i: int) -> tuple[int, int]:
        """The contiguous run of segments around index ``i``."""
        segs = self.segments
        lo = hi = i
        while lo > 0 and segs[lo - 1][0] + len(segs[lo - 1][1]) == segs[lo][0]:
            lo -= 1
        while hi + 1 < len(segs) and segs[hi][0] + len(segs[hi][1]) == segs[hi + 1][0]:
            hi += 1
        return segs[lo][0], segs[hi][0] + len(segs[hi][1])

    def blocks(self, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` SACK blocks, the one holding the most recent arrival first."""
        segs = self.segments
        if not segs:
            return []
        out: list[tuple[int, int]] = []
        for seq in self.recent:
            i = bisect_left(segs, (seq + 1, b"")) - 1  # the last segment starting at or before seq
            if i < 0 or segs[i][0] + len(segs[i][1]) <= seq:
                continue
            block = self._block_at(i)
            if block not in out:
                out.append(block)
                if len(out) >= limit:
                    return out
        i = len(segs) - 1
        while i >= 0 and len(out) < limit:
            block = self._block_at(i)
            if block not in out:
                out.append(block)
            i = bisect_left(segs, (block[0], b"")) - 1
        return out
