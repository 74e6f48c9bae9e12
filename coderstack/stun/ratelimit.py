"""Per-source token buckets: pure, the current time is passed in.

A STUN server answers UDP, whose source address can be forged; without a limit it would reflect a
flood at a victim. Each source IP gets ``burst`` tokens refilled at ``rate`` per second; the table
is bounded (least recently seen sources are forgotten first: a forgotten source starts full
again, which is what a refilled bucket would be anyway after a pause).
"""

from __future__ import annotations

from collections import OrderedDict


class TokenBuckets:
    def __init__(self, rate: float = 20.0, burst: float = 40.0, max_sources: int = 65536) -> None:
        if rate <= 0 or burst < 1 or max_sources < 1:
            raise ValueError("rate must be > 0, burst >= 1 and max_sources >= 1")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, source: str, now: float) -> bool:
        """Take one token for ``source`` at time ``now`` (seconds); False when empty."""
        entry = self._buckets.pop(source, None)
        if entry is None:
            tokens = self.burst
        else:
            tokens, last = entry
            elapsed = now - last
            if elapsed > 0:
                tokens = min(self.burst, tokens + elapsed * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[source] = (tokens, now)
        if len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)
