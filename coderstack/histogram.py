"""A Prometheus-style histogram: cumulative buckets, a sum and a count, in text exposition format.

Pure (no clock, no I/O), so a sans-IO core can keep one and record durations it measured with its
injected clock; whoever serves ``/metrics`` asks it for :meth:`Histogram.exposition`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable

__all__ = ["Histogram", "LATENCY_BUCKETS"]

#: Seconds, 100 µs to 2.5 s: one in-memory fan-out is microseconds for a handful of peers and
#: tens of milliseconds for thousands.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)


class Histogram:
    """Counts of observations at or below each upper bound (``le``), plus ``+Inf``."""

    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        bounds = sorted(set(float(b) for b in buckets))
        if not bounds or any(math.isnan(b) for b in bounds):
            raise ValueError("a histogram needs at least one bucket bound, none NaN")
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds: tuple[float, ...] = tuple(bounds)
        # Per-bucket (not cumulative) counts; cumulated when exposed, so observe() stays O(log n).
        self._counts = [0] * len(self.bounds)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        if math.isnan(value):
            return  # would poison the sum forever
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) for every bucket, ``+Inf`` last."""
        out, running = [], 0
        for bound, n in zip(self.bounds, self._counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def exposition(self, name: str, help_: str) -> list[str]:
        """The ``# HELP``/``# TYPE`` lines and the ``_bucket``, ``_sum`` and ``_count`` samples."""
        lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        for bound, n in self.cumulative():
            le = "+Inf" if bound == math.inf else repr(bound)
            lines.append(f'{name}_bucket{{le="{le}"}} {n}')
        lines.append(f"{name}_sum {self.sum!r}")
        lines.append(f"{name}_count {self.count}")
        return lines
