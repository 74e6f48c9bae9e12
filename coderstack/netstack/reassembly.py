"""The receiver's out-of-order queue and the SACK blocks it reports (RFC 2018 §4).

Segments that arrive beyond ``rcv_nxt`` (unwrapped sequence numbers) are kept, trimmed so they do
not overlap, sorted by sequence number, until the gap before them is filled.  The SACK blocks
list the block holding the most recently received segment first, then other recent blocks, then
the highest ones.  The number of queued pieces is capped (``limit``) so that a peer sending many
tiny out-of-order segments cannot make us hold millions of objects; beyond it new pieces are
refused (the sender retransmits them later).

The contiguous blocks are kept beside the pieces (``starts``/``ends``, merged as pieces arrive),
so that reporting them costs a bisection each: with a large window and a loss, one block can
hold thousands of pieces, and walking them on every ACK made the receiver quadratic.
"""

from __future__ import annotations

from bisect import bisect_left

__all__ = ["Reassembly"]


class Reassembly:
    __slots__ = ("segments", "size", "recent", "limit", "starts", "ends")

    def __init__(self, limit: int = 16384) -> None:
        self.segments: list[tuple[int, bytes]] = []  # sorted by seq, non-overlapping
        self.starts: list[int] = []  # the contiguous blocks the pieces make: sorted, disjoint,
        self.ends: list[int] = []  # never adjacent
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
        if data:
            self._cover(seq, end)
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

    def _cover(self, start: int, end: int) -> None:
        """Merge [start, end) into the blocks."""
        starts, ends = self.starts, self.ends
        i = bisect_left(ends, start)  # the first block ending at or after start: it may touch
        j = i
        while j < len(starts) and starts[j] <= end:
            j += 1
        if i < j:
            start = min(start, starts[i])
            end = max(end, ends[j - 1])
        starts[i:j] = [start]
        ends[i:j] = [end]

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
        starts, ends = self.starts, self.ends
        k = 0
        while k < len(starts) and starts[k] <= rcv_nxt:
            k += 1
        del starts[:k]
        del ends[:k]
        if not segs:
            self.recent = []
        return rcv_nxt, out

    def _block_of(self, seq: int) -> tuple[int, int] | None:
        """The contiguous block holding ``seq``, if any."""
        i = bisect_left(self.starts, seq + 1) - 1
        if i < 0 or self.ends[i] <= seq:
            return None
        return self.starts[i], self.ends[i]

    def blocks(self, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` SACK blocks, the one holding the most recent arrival first."""
        if not self.segments:
            return []
        out: list[tuple[int, int]] = []
        for seq in self.recent:
            block = self._block_of(seq)
            if block is not None and block not in out:
                out.append(block)
                if len(out) >= limit:
                    return out
        starts, ends = self.starts, self.ends
        i = len(starts) - 1
        while i >= 0 and len(out) < limit:
            block = (starts[i], ends[i])
            if block not in out:
                out.append(block)
            i -= 1
        return out
