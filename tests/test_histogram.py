"""The Prometheus-style histogram: inclusive upper bounds, cumulative buckets, text exposition."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.histogram import LATENCY_BUCKETS, Histogram


class HistogramTests(unittest.TestCase):
    def test_buckets_are_cumulative_and_inclusive(self) -> None:
        h = Histogram([0.1, 1.0])
        for v in (0.05, 0.1, 0.5, 1.0, 7.0):
            h.observe(v)
        self.assertEqual(h.cumulative(), [(0.1, 2), (1.0, 4), (math.inf, 5)])
        self.assertEqual(h.count, 5)
        self.assertAlmostEqual(h.sum, 8.65)

    def test_exposition(self) -> None:
        h = Histogram([0.5, 0.001])  # unsorted on purpose
        h.observe(0.0002)
        h.observe(2.0)
        self.assertEqual(h.exposition("x_seconds", "How long."), [
            "# HELP x_seconds How long.",
            "# TYPE x_seconds histogram",
            'x_seconds_bucket{le="0.001"} 1',
            'x_seconds_bucket{le="0.5"} 1',
            'x_seconds_bucket{le="+Inf"} 2',
            "x_seconds_sum 2.0002",
            "x_seconds_count 2",
        ])

    def test_empty_has_every_bucket_at_zero(self) -> None:
        lines = Histogram().exposition("y", "h")
        self.assertEqual(len([s for s in lines if s.startswith("y_bucket")]), len(LATENCY_BUCKETS) + 1)
        self.assertIn("y_count 0", lines)
        self.assertIn("y_sum 0.0", lines)

    def test_nan_is_ignored_and_no_bounds_refused(self) -> None:
        h = Histogram([1.0])
        h.observe(math.nan)
        self.assertEqual((h.count, h.sum), (0, 0.0))
        self.assertRaises(ValueError, Histogram, [])
        self.assertRaises(ValueError, Histogram, [math.nan])

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.floats(allow_nan=False, min_value=-1e6, max_value=1e6)))
    def test_counts_agree_with_a_plain_count(self, values: list[float]) -> None:
        h = Histogram()
        for v in values:
            h.observe(v)
        for bound, n in h.cumulative():
            self.assertEqual(n, sum(1 for v in values if v <= bound))
        self.assertEqual(h.count, len(values))
