"""``coder stat``: parsing /proc and cgroup text (fixtures), Coder's text shapes, the command."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.agent import coder_command, stat
from coderstack.agent.stat import Result, StatError

PROC_STAT_1 = """cpu  1000 0 500 8000 500 0 0 0 0 0
cpu0 500 0 250 4000 250 0 0 0 0 0
cpu1 500 0 250 4000 250 0 0 0 0 0
intr 123
"""
PROC_STAT_2 = """cpu  1300 0 600 8500 600 0 0 0 0 0
cpu0 650 0 300 4250 300 0 0 0 0 0
"""
MEMINFO = """MemTotal:        4089840 kB
MemFree:          500000 kB
MemAvailable:    2826800 kB
Buffers:          100000 kB
"""
MEMORY_STAT_V2 = "anon 1000\nfile 5000\ninactive_file 268435456\nactive_file 10\n"
MEMORY_STAT_V1 = "cache 10\ntotal_inactive_file 1048576\n"


class TextShapeTests(unittest.TestCase):
    def test_coder_shapes(self) -> None:
        self.assertEqual(Result(0.42, 2, "cores").text(), "0.42/2 cores (21%)")
        gib = 1024**3
        self.assertEqual(Result(1.2 * gib, 3.9 * gib, "B", "Gi").text(), "1.2/3.9 GiB (31%)")
        self.assertEqual(Result(12.345 * gib, 50 * gib, "B", "Gi").text(), "12.3/50 GiB (25%)")
        self.assertEqual(Result(123.4 * gib, 250 * gib, "B", "Gi").text(), "123/250 GiB (49%)")
        self.assertEqual(Result(0, 0, "cores").text(), "0/0 cores")
        self.assertEqual(Result(5, None, "seconds").text(), "5 seconds")

    def test_json_is_unscaled(self) -> None:
        self.assertEqual(json.loads(Result(1024.0, 2048.0, "B", "Ki").json()),
                         {"total": 2048.0, "unit": "B", "used": 1024.0})

    def test_humanize_precision(self) -> None:
        self.assertEqual([stat.humanize(v) for v in (0, 0.12345, 1.006, 2.0, 9.999, 12.25, 99.95, 1234.5)],
                         ["0", "0.123", "1.01", "2", "10", "12.3", "100", "1235"])

    @given(st.floats(min_value=0, max_value=1e9, allow_nan=False), st.floats(min_value=0.001, max_value=1e9))
    def test_text_always_parses_back(self, used: float, total: float) -> None:
        text = Result(used, total, "cores").text()
        numbers, unit, pct = text.split(" ")
        u, t = numbers.split("/")
        float(u), float(t)
        self.assertEqual(unit, "cores")
        self.assertRegex(pct, r"^\(\d+%\)$")


class ParseTests(unittest.TestCase):
    def test_host_cpu_from_two_samples(self) -> None:
        # 1000 jiffies passed, 600 of them idle+iowait: 40% of 2 CPUs busy.
        r = stat.host_cpu(PROC_STAT_1, PROC_STAT_2, 2)
        self.assertAlmostEqual(r.used, 0.8)
        self.assertEqual(r.text(), "0.8/2 cores (40%)")

    def test_host_cpu_without_progress_is_zero(self) -> None:
        self.assertEqual(stat.host_cpu(PROC_STAT_1, PROC_STAT_1, 4).used, 0)

    def test_bad_proc_stat(self) -> None:
        for text in ("", "intr 1\n", "cpu a b c d\n", "cpu 1 2\n"):
            with self.assertRaises(StatError):
                stat.proc_stat_cpu(text)

    def test_host_memory_uses_available(self) -> None:
        r = stat.host_memory(MEMINFO)
        self.assertEqual(r.total, 4089840 * 1024)
        self.assertEqual(r.used, (4089840 - 2826800) * 1024)
        self.assertEqual(r.text(), "1.2/3.9 GiB (31%)")
        with self.assertRaises(StatError):
            stat.host_memory("Garbage: 1\n")

    def test_cgroup_v2(self) -> None:
        self.assertEqual(stat.cgroup2_cpu_usage_usec("usage_usec 2500000\nuser_usec 1\n"), 2500000)
        self.assertEqual(stat.cgroup2_cpu_limit("max 100000\n", 8), 8)
        self.assertEqual(stat.cgroup2_cpu_limit("150000 100000\n", 8), 1.5)
        r = stat.container_cpu(2.5, 3.0, 1.0, 1.5)
        self.assertEqual(r.text(), "0.5/1.5 cores (33%)")
        gib = 1024**3
        m = stat.container_memory_v2(str(gib + 268435456), str(2 * gib), MEMORY_STAT_V2, 8 * gib)
        self.assertEqual(m.text(), "1/2 GiB (50%)")
        unlimited = stat.container_memory_v2(str(gib), "max\n", "", 8 * gib)
        self.assertEqual(unlimited.total, 8 * gib)

    def test_cgroup_v1(self) -> None:
        self.assertEqual(stat.cgroup1_cpu_limit("-1\n", "100000\n", 4), 4)
        self.assertEqual(stat.cgroup1_cpu_limit("50000\n", "100000\n", 4), 0.5)
        gib = 1024**3
        m = stat.container_memory_v1(str(gib + 1048576), str(4 * gib), MEMORY_STAT_V1, 8 * gib)
        self.assertEqual((m.used, m.total), (gib, 4 * gib))
        unlimited = stat.container_memory_v1(str(gib), "9223372036854771712", "", 8 * gib)
        self.assertEqual(unlimited.total, 8 * gib)

    def test_containerized(self) -> None:
        self.assertTrue(stat.is_containerized("0::/kubepods/besteffort/pod1\n"))
        self.assertTrue(stat.is_containerized("12:cpu:/docker/abc\n"))
        self.assertTrue(stat.is_containerized("0::/\n", marker_files=True))
        self.assertFalse(stat.is_containerized("0::/init.scope\n"))

    def test_disk(self) -> None:
        r = stat.disk(total_blocks=1000, free_blocks=250, fragment_size=4096, prefix="Ki")
        self.assertEqual(r.text(), "3000/4000 KiB (75%)")


class CommandTests(unittest.TestCase):
    """The command over a fake filesystem (no sleeping: the sampler is given)."""

    def files(self, files: dict[str, str]):
        samples = iter([PROC_STAT_1, PROC_STAT_2])

        def read(path: str) -> str:
            if path == "/proc/stat":
                return next(samples)
            if path == "/sys/fs/cgroup/cpu.stat":
                return next(self.usage)
            if path in files:
                return files[path]
            raise FileNotFoundError(path)

        return read, files.__contains__

    def test_cpu_host_and_container(self) -> None:
        read, exists = self.files({"/proc/1/cgroup": "0::/\n"})
        r = coder_command.cpu(False, sleep=lambda s: None, read=read, exists=exists, nproc=2)
        self.assertEqual(r.text(), "0.8/2 cores (40%)")
        files = {"/proc/1/cgroup": "0::/docker/x\n", "/sys/fs/cgroup/cpu.stat": "",
                 "/sys/fs/cgroup/cpu.max": "200000 100000\n"}
        self.usage = iter(["usage_usec 1000000\n", "usage_usec 1500000\n"])
        read, exists = self.files(files)
        ticks = iter([10.0, 11.0])
        r = coder_command.cpu(False, sleep=lambda s: None, read=read, exists=exists,
                              clock=lambda: next(ticks), nproc=8)
        self.assertEqual(r.text(), "0.5/2 cores (25%)")

    def test_mem_in_a_cgroup_v2_container(self) -> None:
        gib = 1024**3
        files = {"/proc/1/cgroup": "0::/kubepods/x\n", "/proc/meminfo": MEMINFO,
                 "/sys/fs/cgroup/memory.current": str(gib + 268435456),
                 "/sys/fs/cgroup/memory.max": "max\n", "/sys/fs/cgroup/memory.stat": MEMORY_STAT_V2}
        read, exists = self.files(files)
        r = coder_command.mem(False, "Mi", read=read, exists=exists)
        self.assertEqual((r.used, r.total), (gib, 4089840 * 1024))
        host = coder_command.mem(True, "Gi", read=read, exists=exists)
        self.assertEqual(host.text(), "1.2/3.9 GiB (31%)")

    def test_main_prints_text_or_json(self) -> None:
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(coder_command.main(["stat", "disk", "--path", "/", "--prefix", "Mi"]), 0)
        self.assertRegex(out.getvalue(), r"^[0-9.]+/[0-9.]+ MiB \(\d+%\)\n$")
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(coder_command.main(["stat", "mem", "--host", "-o", "json"]), 0)
        self.assertEqual(json.loads(out.getvalue())["unit"], "B")
        with self.assertRaises(SystemExit):
            coder_command.main(["stat", "disk", "--output", "yaml"])


class FuzzTests(unittest.TestCase):
    """Whatever a /proc or cgroup file holds, parsing gives a result or an error coder stat
    reports (StatError or ValueError), never anything else."""

    @given(st.text(max_size=200), st.text(max_size=50), st.text(max_size=50))
    def test_parsers_fail_only_cleanly(self, a: str, b: str, c: str) -> None:
        calls = [
            lambda: stat.host_cpu(a, b, 2), lambda: stat.host_memory(a),
            lambda: stat.cgroup2_cpu_usage_usec(a), lambda: stat.cgroup2_cpu_limit(a, 2),
            lambda: stat.cgroup1_cpu_limit(a, b, 2), lambda: stat.container_memory_v2(a, b, c, 1 << 30),
            lambda: stat.container_memory_v1(a, b, c, 1 << 30),
        ]
        for call in calls:
            try:
                result = call()
            except (StatError, ValueError):
                continue
            if isinstance(result, Result):
                result.text()
                result.json()

    @given(st.lists(st.integers(0, 2**40), min_size=4, max_size=10), st.lists(st.integers(0, 2**40), min_size=4,
                                                                               max_size=10))
    def test_host_cpu_is_within_the_core_count(self, first: list[int], second: list[int]) -> None:
        later = [max(x, y) for x, y in zip(first, second + first[len(second):], strict=False)]
        r = stat.host_cpu("cpu " + " ".join(map(str, first)), "cpu " + " ".join(map(str, later)), 4)
        self.assertTrue(0 <= r.used <= 4, r)
