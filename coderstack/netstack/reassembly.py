"""The receiver's out-of-order queue and the SACK blocks it reports (RFC 2018 §4).

Segments that arrive beyond ``rcv_nxt`` (unwrapped sequence numbers) are kept, trimmed so they do
not overlap, until the gap before them is filled.  The SACK blocks list the block holding the most
recently received segment first, then other recent blocks.
"""

from __future__ import annotations

from bisect import insort

__all__ = ["Reassembly"]


class Reassembly:
    __slots__ = ("segments", "size", "recent")

    def __init__(self) -> None:
        self.segments: list[tuple[int, bytes]] = []  # sorted by seq, non-overlapping
        self.size = 0
        self.recent: list[int] = []  # seqs of the latest arrivals, newest first

    def __bool__(self) -> bool:
        return bool(self.segments)

    def add(self, seq: int, data: bytes) -> None:
        end = seq + len(data)
        for s, d in self.segments:
            e = s + len(d)
            if e <= seq or s >= end:
                continue
            # Overlap: keep what we have, store only the new parts.
            if s <= seq and e >= end:
                self._touch(seq)
                return
            if s > seq:
                self.add(seq, data[: s - seq])
            if e < end:
                self.add(e, data[e - seq :])
            return
        insort(self.segments, (seq, data))
        self.size += len(data)
        self._touch(seq)

    def _touch(self, seq: int) -> None:
        recent = self.recent
        if seq in recent:
            recent.remove(seq)
        recent.insert(0, seq)
        del recent[8:]

    def pop(self, rcv_nxt: int) -> tuple[int, list[bytes]]:
        """Take the segments that are now in order; returns ``(new rcv_nxt, data pieces)``."""
        out = []
        segs = self.segments
        while segs and segs[0][0] <= rcv_nxt:
            s, d = segs.pop(0)
            self.size -= len(d)
            e = s + len(d)
            if e > rcv_nxt:
                out.append(d[rcv_nxt - s :])
                rcv_nxt = e
        if not segs:
            self.recent = []
        return rcv_nxt, out

    def blocks(self, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` SACK blocks, the one holding the most recent arrival first."""
        # Merge adjacent segments into blocks.
        merged: list[list[int]] = []
        for s, d in self.segments:
            e = s + len(d)
            if merged and merged[-1][1] == s:
                merged[-1][1] = e
            else:
                merged.append([s, e])
        out: list[tuple[int, int]] = []
        for seq in self.recent:
            for s, e in merged:
                if s <= seq < e:
                    if (s, e) not in out:
                        out.append((s, e))
                    break
            if len(out) >= limit:
                return out
        for s, e in reversed(merged):
            if len(out) >= limit:
                break
            if (s, e) not in out:
                out.append((s, e))
        return out
