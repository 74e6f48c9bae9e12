"""Metadata: real short scripts (value, error, timeout, a 10 MB flood cut short), and batched
posts with retries on a task.Clock."""

from __future__ import annotations

import os

from twisted.internet import reactor, task
from twisted.trial import unittest

from coderstack.agent import metadata as md
from coderstack.agent.metadata import MetadataCollector, MetadataItem
from coderstack.sdk import SDKError


class FakeReports:
    def __init__(self) -> None:
        self.posts: list[list[dict[str, str]]] = []
        self.answers: list[Exception | None] = []

    async def metadata(self, results: list[dict[str, str]]) -> None:
        answer = self.answers.pop(0) if self.answers else None
        self.posts.append(results)
        if answer is not None:
            raise answer


def env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", os.defpath), "GREETING": "hello"}


class CollectTests(unittest.TestCase):
    timeout = 30

    def collector(self) -> MetadataCollector:
        return MetadataCollector(reactor, [], FakeReports(), env=env, cwd=lambda: "/",  # type: ignore[arg-type]
                                 kill_grace=0.5, pipe_grace=0.2)

    async def test_value_is_stripped_output_in_the_workspace_env(self) -> None:
        got = await self.collector().collect(MetadataItem("k", 'echo "  $GREETING  "', 5, 5))
        self.assertEqual((got["key"], got["value"], got["error"]), ("k", "hello", ""))
        self.assertTrue(got["collected_at"].endswith("Z"))
        got = await self.collector().collect(MetadataItem("k", "echo ' on stderr ' >&2", 5, 5))
        self.assertEqual(got["value"], "on stderr")

    async def test_failing_script_reports_its_error(self) -> None:
        got = await self.collector().collect(MetadataItem("k", "echo partial; exit 7", 5, 5))
        self.assertEqual((got["value"], got["error"]), ("partial", "exit status 7"))

    async def test_timeout_kills_and_reports(self) -> None:
        got = await self.collector().collect(MetadataItem("k", "echo early; sleep 30", 5, 0.3))
        self.assertEqual((got["value"], got["error"]), ("early", "timed out after 0.3s"))

    async def test_ten_megabytes_are_truncated_not_stored(self) -> None:
        c = self.collector()
        got = await c.collect(MetadataItem("k", "head -c 10000000 /dev/zero | tr '\\0' x", 5, 20))
        self.assertEqual(got["value"], "x" * md.MAX_VALUE)
        self.assertEqual(got["error"], "")
        self.assertEqual(c.running, {})

    def test_item_defaults(self) -> None:
        item = MetadataItem.from_json({"key": "cpu", "script": "coder stat cpu", "interval": 0, "timeout": 0})
        self.assertEqual((item.interval, item.timeout), (1.0, 1.0))
        item = MetadataItem.from_json({"key": "cpu", "script": "x", "interval": 10, "timeout": 2})
        self.assertEqual((item.interval, item.timeout), (10.0, 2.0))


class ReportingTests(unittest.TestCase):
    """collect() replaced by canned results so the schedule runs on a task.Clock."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.reports = FakeReports()
        items = [MetadataItem("a", "x", 2, 1), MetadataItem("b", "x", 5, 1)]
        self.c = MetadataCollector(self.clock, items, self.reports, env=dict, cwd=str)  # type: ignore[arg-type]
        self.runs: dict[str, int] = {}

        async def collect(item: MetadataItem) -> dict[str, str]:
            self.runs[item.key] = self.runs.get(item.key, 0) + 1
            return {"key": item.key, "value": f"{item.key}{self.runs[item.key]}", "error": "",
                    "collected_at": "t"}

        self.c.collect = collect  # type: ignore[method-assign]

    def test_each_item_on_its_interval_and_posts_are_batched(self) -> None:
        self.c.start()
        self.assertEqual(self.runs, {"a": 1, "b": 1})
        self.clock.advance(md.REPORT_DELAY)
        self.assertEqual([sorted(r["key"] for r in p) for p in self.reports.posts], [["a", "b"]])
        self.clock.pump([1] * 10)
        self.assertEqual(self.runs, {"a": 6, "b": 3})
        self.c.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unreachable_server_keeps_the_newest_per_key(self) -> None:
        self.reports.answers = [SDKError("down"), SDKError("down")]
        self.c.start()
        self.clock.pump([0.5] * 12)
        for loop in self.c._loops:  # no new results from here on; the sender goes on
            loop.stop()
        self.clock.pump([0.5] * 40)
        self.c.stop()
        posted_a = [r["value"] for p in self.reports.posts for r in p if r["key"] == "a"]
        self.assertEqual(posted_a[-1], f"a{self.runs['a']}")
        self.assertEqual(posted_a[:2], ["a1", "a1"])  # the failed post, retried

    def test_a_run_still_going_is_not_doubled(self) -> None:
        self.c.running["a"] = object()  # type: ignore[assignment]
        self.c._tick(self.c.items[0])
        self.assertNotIn("a", self.runs)
