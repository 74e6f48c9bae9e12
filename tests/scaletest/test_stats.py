"""The scale test's arithmetic: nearest-rank percentiles, /metrics parsing, server figures, the
summary's JSON and table."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.scaletest.stats import (
    Samples,
    Summary,
    bucket_quantile,
    error_kind,
    parse_buckets,
    parse_metrics,
    server_figures,
)
from coderstack.sdk import SDKError

METRICS = """\
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.048576e+08
process_cpu_seconds_total 12.5
process_open_fds 40
coderstack_derp_packets_relayed_total 1000
coderstack_derp_packets_dropped_total{reason="unknown_dest"} 3
coderstack_derp_packets_dropped_total{reason="queue_head"} 2
not a metric line at all
broken{label="x" 5
nan_metric NaN
"""


class SamplesTests(unittest.TestCase):
    def test_nearest_rank(self) -> None:
        s = Samples()
        for v in range(1, 101):
            s.add(v / 1000)
        self.assertEqual(s.percentile(50), 0.050)
        self.assertEqual(s.percentile(99), 0.099)
        self.assertEqual(s.percentile(100), 0.100)
        self.assertEqual(s.to_json(), {"count": 100, "p50_ms": 50.0, "p95_ms": 95.0, "p99_ms": 99.0,
                                       "max_ms": 100.0})

    def test_empty_and_bad_percentiles(self) -> None:
        s = Samples()
        self.assertIsNone(s.percentile(50))
        self.assertEqual(s.to_json()["p99_ms"], None)
        self.assertRaises(ValueError, s.percentile, 0)
        self.assertRaises(ValueError, s.percentile, 101)

    def test_clock_skew_and_nan_do_not_poison(self) -> None:
        s = Samples()
        s.add(-0.002)  # a node made "after" it arrived: clocks a hair apart
        s.add(float("nan"))
        self.assertEqual((len(s), s.percentile(100)), (1, 0.0))

    @given(st.lists(st.floats(0, 1e6), min_size=1), st.floats(0.01, 100), st.floats(0.01, 100))
    def test_percentiles_are_samples_and_monotone(self, values, p, q) -> None:
        s = Samples()
        for v in values:
            s.add(v)
        lo, hi = sorted((p, q))
        self.assertIn(s.percentile(p), values)
        self.assertLessEqual(s.percentile(lo), s.percentile(hi))


class MetricsTests(unittest.TestCase):
    def test_parse_sums_labels_and_skips_garbage(self) -> None:
        got = parse_metrics(METRICS)
        self.assertEqual(got["process_resident_memory_bytes"], 104857600)
        self.assertEqual(got["coderstack_derp_packets_dropped_total"], 5)
        self.assertNotIn("broken", got)
        self.assertNotIn("nan_metric", got)
        self.assertNotIn("not", got)

    @given(st.text())
    def test_parse_never_raises(self, text) -> None:
        parse_metrics(text)

    def test_server_figures_over_an_interval(self) -> None:
        before = parse_metrics(METRICS)
        after = dict(before, process_cpu_seconds_total=13.5, coderstack_derp_packets_relayed_total=3000)
        got = server_figures(before, after, 2.0)
        self.assertEqual(got["cpu_percent"], 50.0)
        self.assertEqual(got["derp_packets_per_second"], 1000.0)
        self.assertEqual(got["rss_bytes"], 104857600)
        self.assertEqual(got["open_fds"], 40)
        self.assertIsNone(got["derp_bytes_per_second"])  # this server does not say

    def test_counters_that_went_backwards_read_zero(self) -> None:
        # A restarted server's counters start again from 0.
        got = server_figures({"process_cpu_seconds_total": 10.0}, {"process_cpu_seconds_total": 1.0}, 1.0)
        self.assertEqual(got["cpu_percent"], 0.0)


class SummaryTests(unittest.TestCase):
    def test_json_and_table(self) -> None:
        s = Summary("traffic", 3, connected=2, seconds=2.0, bytes_sent=8000, bytes_received=8000)
        s.errors.add("dial-timeout")
        s.latency.add(0.004)
        s.paths["p2p"] += 2
        s.server = {"rss_bytes": 200 * 2**20, "cpu_percent": 12.5, "open_fds": 50,
                    "derp_packets_per_second": None}
        j = s.to_json()
        self.assertEqual((j["connected"], j["errors"], j["paths"]), (2, {"dial-timeout": 1}, {"p2p": 2}))
        self.assertTrue(s.failed)
        rows = dict(s.rows())
        self.assertEqual(rows["traffic connected"], "2 of 3")
        self.assertEqual(rows["errors"], "dial-timeout 1")
        self.assertEqual(rows["server RSS"], "200 MiB")
        self.assertEqual(rows["relay packets/s"], "unknown")
        self.assertIn("4.0 kB/s", rows["bytes sent / echoed"])

    def test_generator_cpu(self) -> None:
        s = Summary("agents", 1, seconds=4.0)
        self.assertIsNone(s.to_json()["generator_cpu_percent"])
        self.assertEqual(dict(s.rows())["generator CPU"], "unknown")
        s.cpu_seconds = 3.0
        self.assertEqual(s.to_json()["generator_cpu_percent"], 75.0)
        self.assertEqual(dict(s.rows())["generator CPU"], "75.0% of a core")
        self.assertIsNone(Summary("agents", 1, seconds=0.0, cpu_seconds=1.0).cpu_percent)

    def test_all_held_and_no_errors_is_a_pass(self) -> None:
        self.assertFalse(Summary("agents", 2, connected=2).failed)
        self.assertTrue(Summary("agents", 2, connected=1).failed)

    def test_error_kinds(self) -> None:
        self.assertEqual(error_kind(SDKError("no", 403)), "http-403")
        self.assertEqual(error_kind(ConnectionRefusedError()), "refused")
        self.assertEqual(error_kind(KeyError("x")), "KeyError")


HISTOGRAM = """\
# TYPE coderstack_coordinator_fanout_seconds histogram
coderstack_coordinator_fanout_seconds_bucket{le="0.001"} %d
coderstack_coordinator_fanout_seconds_bucket{le="0.01"} %d
coderstack_coordinator_fanout_seconds_bucket{le="0.1"} %d
coderstack_coordinator_fanout_seconds_bucket{le="+Inf"} %d
coderstack_coordinator_fanout_seconds_sum 1.5
coderstack_coordinator_fanout_seconds_count %d
coderstack_coordinator_fanout_seconds_bucket{le=broken 3
"""


class BucketTests(unittest.TestCase):
    def test_quantiles_of_what_was_observed_between_scrapes(self) -> None:
        before = parse_buckets(HISTOGRAM % (10, 10, 10, 10, 10))
        self.assertEqual(before, {0.001: 10, 0.01: 10, 0.1: 10, float("inf"): 10})
        # Then 100 more: 50 under 1 ms, 45 under 10 ms, 4 under 100 ms, 1 beyond.
        after = parse_buckets(HISTOGRAM % (60, 105, 109, 110, 110))
        self.assertEqual(bucket_quantile(before, after, 0.5), 0.001)
        self.assertEqual(bucket_quantile(before, after, 0.95), 0.01)
        self.assertEqual(bucket_quantile(before, after, 0.99), 0.1)
        self.assertEqual(bucket_quantile(before, after, 1.0), float("inf"))
        self.assertIsNone(bucket_quantile(before, before, 0.5))  # nothing observed meanwhile
        got = server_figures({}, {}, 1.0, buckets=(before, after))
        self.assertEqual((got["coordinator_fanout_p50_ms_at_most"], got["coordinator_fanout_p99_ms_at_most"]),
                         (1.0, 100.0))

    @given(st.text())
    def test_parse_never_raises(self, text) -> None:
        parse_buckets("coderstack_coordinator_fanout_seconds_bucket{" + text)
