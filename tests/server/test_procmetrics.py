"""Process metrics: /proc parsing on fixed text and garbage, and a sample of this very process."""

from __future__ import annotations

import math
import os
import resource
import sys
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.server import procmetrics
from coderstack.server.procmetrics import ProcStat, from_proc, parse_boot_time, parse_stat

# A real line (Linux 6.x), its command name made awkward: spaces and a ")" inside the parentheses.
STAT = (
    "6752 (py ) thon) R 6709 6709 5228 0 -1 4194304 1610 0 1 0 250 75 0 0 20 0 1 0 178880 "
    "14917632 2893 18446744073709551615 94366691934208 94366691934549 140726529131504 0 0 0 0 "
    "16781312 2 0 0 0 17 1 0 0 0 0 0 94366691945904 94366691946520 94366834978816 "
    "140726529137251 140726529137381 140726529137381 140726529138663 0\n"
)
PROC_STAT = "cpu  1 2 3 4\ncpu0 1 2 3 4\nintr 12 0\nctxt 99\nbtime 1796309974\nprocesses 7\n"

NAMES = {
    "process_resident_memory_bytes", "process_virtual_memory_bytes", "process_cpu_seconds_total",
    "process_open_fds", "process_max_fds", "process_start_time_seconds",
}


class ParseTests(unittest.TestCase):
    def test_stat_fields(self) -> None:
        self.assertEqual(parse_stat(STAT), ProcStat(utime_ticks=250, stime_ticks=75,
                                                    start_ticks=178880, vsize_bytes=14917632,
                                                    rss_pages=2893))

    def test_boot_time(self) -> None:
        self.assertEqual(parse_boot_time(PROC_STAT), 1796309974.0)
        self.assertIsNone(parse_boot_time("cpu 1 2\n"))
        self.assertIsNone(parse_boot_time("btime soon\n"))
        self.assertIsNone(parse_boot_time("btime inf\n"))

    def test_stat_rejects_what_is_not_one(self) -> None:
        for text in ("", "6752 python R 1 2", "1 (x) R 1 2 3", STAT.replace(" 250 ", " x "),
                     STAT.replace(" 250 ", " -250 "), STAT.replace(" 250 ", f" {1 << 64} ")):
            self.assertIsNone(parse_stat(text), text)

    def test_from_proc(self) -> None:
        stat = parse_stat(STAT)
        assert stat is not None
        self.assertEqual(from_proc(stat, 1796309974.0, 100, 4096), {
            "process_cpu_seconds_total": 3.25,
            "process_virtual_memory_bytes": 14917632.0,
            "process_resident_memory_bytes": 2893 * 4096.0,
            "process_start_time_seconds": 1796309974.0 + 1788.8,
        })
        # No boot time: no start time, rather than one 56 years off.
        self.assertNotIn("process_start_time_seconds", from_proc(stat, None, 100, 4096))

    def test_text_format(self) -> None:
        text = procmetrics.metrics_text({"process_open_fds": 12.0, "process_cpu_seconds_total": 1.5})
        self.assertEqual(text, (
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n"
            "# TYPE process_cpu_seconds_total counter\n"
            "process_cpu_seconds_total 1.5\n"
            "# HELP process_open_fds Number of open file descriptors.\n"
            "# TYPE process_open_fds gauge\n"
            "process_open_fds 12.0\n"
        ))
        self.assertEqual(procmetrics.metrics_text({}), "")

    @settings(max_examples=500, deadline=None)
    @given(st.text())
    def test_garbage_never_raises(self, text: str) -> None:
        self.check_garbage(text)

    @settings(max_examples=500, deadline=None)
    @given(st.text(), st.lists(st.one_of(st.integers(-(1 << 70), 1 << 70).map(str), st.text()),
                               max_size=40))
    def test_stat_shaped_garbage_never_raises(self, comm: str, fields: list[str]) -> None:
        self.check_garbage(f"1 ({comm}) " + " ".join(fields))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.integers(0, 1 << 70).map(str), min_size=22, max_size=52))
    def test_any_numbers_give_finite_samples(self, fields: list[str]) -> None:
        # Parsed whenever all are u64s: the samples stay finite for the largest of them.
        text = "1 (x) " + " ".join(fields)
        fits = all(int(fields[i]) < 1 << 64 for i in (11, 12, 19, 20, 21))
        self.assertEqual(parse_stat(text) is not None, fits)
        self.check_garbage(text)

    def check_garbage(self, text: str) -> None:
        stat = parse_stat(text)
        if stat is not None:
            for value in from_proc(stat, parse_boot_time(text), 100, 4096).values():
                self.assertTrue(math.isfinite(value) and value >= 0, value)
        boot = parse_boot_time(text)
        self.assertTrue(boot is None or (math.isfinite(boot) and boot >= 0))


class ThisProcessTests(unittest.TestCase):
    def test_sample_reads_this_process(self) -> None:
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("reads /proc")
        before = time.process_time()
        s = procmetrics.sample()
        self.assertEqual(set(s), NAMES if resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                         != resource.RLIM_INFINITY else NAMES - {"process_max_fds"})
        # At least the CPU time this process had already used (ticks are coarser: 10 ms).
        self.assertGreaterEqual(s["process_cpu_seconds_total"], before - 0.02)
        self.assertGreater(s["process_resident_memory_bytes"], 1 << 20)
        self.assertGreaterEqual(s["process_virtual_memory_bytes"], s["process_resident_memory_bytes"])
        self.assertLessEqual(s["process_start_time_seconds"], time.time() + 1)
        self.assertGreater(s["process_start_time_seconds"], time.time() - 86400 * 365)
        fd = os.open(os.devnull, os.O_RDONLY)
        try:
            self.assertEqual(procmetrics.sample()["process_open_fds"], s["process_open_fds"] + 1)
        finally:
            os.close(fd)
        if "process_max_fds" in s:
            self.assertEqual(s["process_max_fds"], resource.getrlimit(resource.RLIMIT_NOFILE)[0])
