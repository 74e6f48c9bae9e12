"""Agent logs: line splitting with a cap, batching on a clock, 413 ends sending, retries."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.trial import unittest

from coderstack.agent import logs
from coderstack.agent.logs import AgentLogs, LineSplitter, agent_source_id
from coderstack.sdk import SDKError


class LineSplitterTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=40), max_size=12), st.integers(4, 30))
    def test_any_chunking_gives_the_capped_lines(self, chunks: list[bytes], cap: int) -> None:
        data = b"".join(chunks)
        splitter = LineSplitter(max_line=cap)
        got: list[str] = []
        for chunk in chunks:
            got += splitter.feed(chunk)
        got += splitter.flush()
        parts = data.split(b"\n")
        if parts[-1] == b"":
            parts.pop()
        expected = []
        for p in parts:
            p = p[:cap]
            expected.append((p[:-1] if p.endswith(b"\r") else p).decode("utf-8", "replace"))
        self.assertEqual(got, expected)

    def test_long_line_is_cut_at_the_cap_and_the_rest_dropped(self) -> None:
        s = LineSplitter()
        got = s.feed(b"x" * (logs.MAX_LINE + 5000)) + s.feed(b"yyy\nnext\r\n")
        self.assertEqual(got, ["x" * logs.MAX_LINE, "next"])
        self.assertEqual(s.flush(), [])


class FakeReports:
    def __init__(self) -> None:
        self.patches: list[tuple[str, list[dict[str, str]]]] = []
        self.sources: list[tuple[str, str]] = []
        self.answers: list[Exception | None] = []

    async def logs(self, source_id: str, batch: list[dict[str, str]]) -> None:
        answer = self.answers.pop(0) if self.answers else None
        self.patches.append((source_id, list(batch)))
        if answer is not None:
            raise answer

    async def log_source(self, source_id: str, display_name: str, icon: str = "") -> None:
        self.sources.append((source_id, display_name))


class AgentLogsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.reports = FakeReports()
        self.logs = AgentLogs(self.clock, self.reports)  # type: ignore[arg-type]

    def outputs(self) -> list[str]:
        return [e["output"] for _, batch in self.reports.patches for e in batch]

    def test_lines_wait_for_the_flush_interval_then_go_in_one_batch(self) -> None:
        for i in range(3):
            self.logs.add("s1", f"line {i}")
        self.assertEqual(self.reports.patches, [])
        self.clock.advance(logs.FLUSH_INTERVAL)
        self.assertEqual(len(self.reports.patches), 1)
        self.assertEqual(self.outputs(), ["line 0", "line 1", "line 2"])
        self.assertEqual(self.reports.patches[0][1][0]["level"], "info")
        self.assertTrue(self.reports.patches[0][1][0]["created_at"].endswith("Z"))

    def test_a_hundred_lines_go_at_once(self) -> None:
        for i in range(logs.FLUSH_LINES):
            self.logs.add("s1", str(i))
        self.assertEqual(len(self.outputs()), logs.FLUSH_LINES)

    def test_batches_hold_at_most_1000_lines_and_sources_stay_apart(self) -> None:
        self.reports.answers = [SDKError("down")]  # hold everything back once
        self.logs.add("s2", "other")
        for i in range(2500):
            self.logs.add("s1", str(i))
        self.clock.pump([1] * 20)
        sizes = [(sid, len(b)) for sid, b in self.reports.patches[1:]]
        self.assertTrue(all(n <= logs.MAX_BATCH_LINES for _, n in sizes), sizes)
        self.assertEqual([e["output"] for sid, b in self.reports.patches[1:] if sid == "s1" for e in b],
                         [str(i) for i in range(2500)])
        self.assertIn(("s2", 1), sizes)

    def test_413_stops_all_sending_for_good(self) -> None:
        self.reports.answers = [SDKError("logs limit exceeded", 413)]
        for i in range(5):
            self.logs.add("s1", str(i))
        self.clock.advance(1)
        self.assertTrue(self.logs.overflowed)
        self.logs.add("s1", "after")
        self.logs.add("s2", "after")
        self.clock.advance(10)
        self.assertEqual(len(self.reports.patches), 1)
        self.successResultOf(self.logs.flushed())

    def test_unreachable_server_keeps_lines_and_retries(self) -> None:
        self.reports.answers = [SDKError("down"), SDKError("down", 502)]
        self.logs.add("s1", "a")
        flushed = self.logs.flushed()
        self.assertNoResult(flushed)
        self.clock.pump([0.5] * 10)
        self.assertEqual(self.outputs()[-1:], ["a"])
        self.assertEqual(len(self.reports.patches), 3)
        self.successResultOf(flushed)

    def test_agent_source_is_registered_before_its_first_lines(self) -> None:
        sid = agent_source_id("6f1e2d3c-4b5a-4978-8a9b-0c1d2e3f4a5b")
        self.assertEqual(sid, agent_source_id("6f1e2d3c-4b5a-4978-8a9b-0c1d2e3f4a5b"))
        self.logs.register(sid, "Agent")
        self.clock.advance(1)
        self.assertEqual(self.reports.sources, [])  # nothing to say yet
        self.logs.add(sid, "script failed", "error")
        self.logs.add(sid, "again", "error")
        self.clock.advance(1)
        self.assertEqual(self.reports.sources, [(sid, "Agent")])
        self.assertEqual([e["level"] for e in self.reports.patches[0][1]], ["error", "error"])

    def test_oversized_line_is_capped_and_unknown_level_is_info(self) -> None:
        self.logs.add("s1", "é" * logs.MAX_LINE, "loud")
        self.clock.advance(1)
        entry = self.reports.patches[0][1][0]
        self.assertLessEqual(len(entry["output"].encode()), logs.MAX_LINE)
        self.assertEqual(entry["level"], "info")

    def test_stop_cancels_timers(self) -> None:
        self.logs.add("s1", "a")
        self.logs.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.logs.add("s1", "b")
        self.assertEqual(self.clock.getDelayedCalls(), [])
