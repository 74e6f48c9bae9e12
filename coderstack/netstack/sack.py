"""The sender's SACK scoreboard (RFC 2018, loss recovery as in RFC 6675).

Sequence numbers here are unwrapped (plain growing integers), so ranges compare with ``<``.
The scoreboard is a sorted list of disjoint half-open ``[start, end)`` ranges the receiver has
reported holding above the cumulative ACK.
"""

from __future__ import annotations

from bisect import bisect_right

__all__ = ["Scoreboard"]


class Scoreboard:
    __slots__ = ("ranges", "sacked")

    def __init__(self) -> None:
        self.ranges: list[list[int]] = []
        self.sacked = 0

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def clear(self) -> None:
        self.ranges = []
        self.sacked = 0

    def add(self, start: int, end: int) -> int:
        """Record ``[start, end)``; return how many bytes were newly SACKed."""
        if end <= start:
            return 0
        ranges = self.ranges
        # first range whose end >= start (may merge), last whose start <= end
        i = 0
        lo = bisect_right([r[1] for r in ranges], start - 1) if len(ranges) > 8 else None
        if lo is not None:
            i = lo
        else:
            while i < len(ranges) and ranges[i][1] < start:
                i += 1
        j = i
        new_start, new_end = start, end
        covered = 0
        while j < len(ranges) and ranges[j][0] <= end:
            s, e = ranges[j]
            covered += e - s
            if s < new_start:
                new_start = s
            if e > new_end:
                new_end = e
            j += 1
        ranges[i:j] = [[new_start, new_end]]
        added = (new_end - new_start) - covered
        self.sacked += added
        return added

    def advance(self, una: int) -> None:
        """Forget everything below the new cumulative ACK ``una``."""
        ranges = self.ranges
        while ranges and ranges[0][0] < una:
            s, e = ranges[0]
            if e <= una:
                self.sacked -= e - s
                del ranges[0]
            else:
                self.sacked -= una - s
                ranges[0][0] = una
                break

    def sacked_between(self, a: int, b: int) -> int:
        total = 0
        for s, e in self.ranges:
            if s >= b:
                break
            if e <= a:
                continue
            total += min(e, b) - max(s, a)
        return total

    def lost_edge(self, una: int, threshold: int) -> int:
        """RFC 6675 IsLost, approximately: unSACKed bytes below the returned sequence number are
        deemed lost because at least ``threshold`` bytes above them have been SACKed."""
        acc = 0
        for s, e in reversed(self.ranges):
            acc += e - s
            if acc >= threshold:
                return max(una, s)
        return una

    def next_hole(self, seq: int, limit: int) -> tuple[int, int] | None:
        """The first unSACKed range at or after ``seq`` and below ``limit``."""
        for s, e in self.ranges:
            if e <= seq:
                continue
            if s > seq:
                return (seq, min(s, limit)) if seq < limit else None
            seq = e
        return (seq, limit) if seq < limit else None
