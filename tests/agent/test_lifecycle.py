"""The agent lifecycle: Coder's transitions, and reports that survive an unreachable server."""

from __future__ import annotations

from twisted.internet import task
from twisted.trial import unittest

from coderstack.agent import lifecycle as lc
from coderstack.agent.lifecycle import Lifecycle, LifecycleError, LifecycleReporter
from coderstack.backoff import Backoff
from coderstack.sdk import SDKError


class LifecycleTests(unittest.TestCase):
    def test_start_and_shutdown_paths(self) -> None:
        for start in (lc.READY, lc.START_ERROR, lc.START_TIMEOUT):
            for end in (lc.OFF, lc.SHUTDOWN_ERROR, lc.SHUTDOWN_TIMEOUT):
                life = Lifecycle()
                for i, state in enumerate((lc.STARTING, start, lc.SHUTTING_DOWN, end)):
                    life.to(state, float(i))
                self.assertEqual([c.state for c in life.history], [lc.STARTING, start, lc.SHUTTING_DOWN, end])
                self.assertEqual(life.state, end)

    def test_a_stop_before_start_finished_may_shut_down(self) -> None:
        life = Lifecycle()
        life.to(lc.STARTING, 1)
        life.to(lc.SHUTTING_DOWN, 2)
        self.assertEqual(life.state, lc.SHUTTING_DOWN)

    def test_impossible_changes_are_refused(self) -> None:
        life = Lifecycle()
        with self.assertRaises(LifecycleError):
            life.to(lc.READY, 0)
        life.to(lc.STARTING, 0)
        life.to(lc.READY, 1)
        for bad in (lc.STARTING, lc.OFF, lc.START_ERROR, "sleeping"):
            with self.assertRaises(LifecycleError):
                life.to(bad, 2)
        self.assertEqual(life.state, lc.READY)


class ReporterTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.sent: list[tuple[str, str]] = []
        self.answers: list[Exception | None] = []  # next answers; empty = success
        self.send_times: list[float] = []

    async def send(self, state: str, changed_at: str) -> None:
        answer = self.answers.pop(0) if self.answers else None
        self.sent.append((state, changed_at))
        self.send_times.append(self.clock.seconds())
        if answer is not None:
            raise answer

    def test_reports_every_change_in_order_with_rfc3339_times(self) -> None:
        self.clock.advance(1764633600.25)  # 2025-12-02T00:00:00.25Z
        rep = LifecycleReporter(self.clock, Lifecycle(), self.send)
        rep.to(lc.STARTING)
        rep.to(lc.READY)
        self.assertEqual(self.sent, [("starting", "2025-12-02T00:00:00.250000Z"),
                                     ("ready", "2025-12-02T00:00:00.250000Z")])
        self.successResultOf(rep.drained())

    def test_unreachable_server_is_retried_with_backoff_and_the_latest_state_arrives_last(self) -> None:
        rep = LifecycleReporter(self.clock, Lifecycle(), self.send, backoff_cap=4)
        down = SDKError("cannot reach the server")
        self.answers = [down, down, down]
        rep.to(lc.STARTING)
        rep.to(lc.READY)
        drained = rep.drained()
        self.assertEqual([s for s, _ in self.sent], ["starting"])
        self.assertNoResult(drained)
        for _ in range(20):
            self.clock.advance(1)
        self.assertEqual([s for s, _ in self.sent], ["starting"] * 4 + ["ready"])
        self.successResultOf(drained)
        self.assertEqual(rep.lifecycle.unreported, [])

    def test_backoff_grows_and_is_capped(self) -> None:
        rep = LifecycleReporter(self.clock, Lifecycle(), self.send, backoff_cap=2)
        self.answers = [SDKError("down", 503)] * 6
        times: list[float] = []
        self.send_times = times
        rep.to(lc.STARTING)
        self.clock.pump([0.01] * 2000)
        self.assertEqual(len(self.sent), 7)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        self.assertTrue(all(0.3 <= g <= 2.05 for g in gaps), gaps)
        self.assertGreater(gaps[-1], gaps[0])

    def test_retries_follow_the_agent_backoff_and_a_success_resets_it(self) -> None:
        rep = LifecycleReporter(self.clock, Lifecycle(), self.send, backoff_cap=2)
        self.assertEqual((rep.backoff.first, rep.backoff.cap, rep.backoff.jitter), (0.5, 2, 0.3))
        rep.backoff = Backoff(first=0.5, cap=2, rng=lambda: 0.0)  # no jitter: exact waits
        down = SDKError("down", 503)
        self.answers = [down] * 4
        rep.to(lc.STARTING)
        self.clock.pump([0.125] * 80)
        gaps = [b - a for a, b in zip(self.send_times, self.send_times[1:], strict=False)]
        self.assertEqual(gaps, [0.5, 1.0, 2.0, 2.0])
        self.answers = [down]
        rep.to(lc.READY)
        self.clock.pump([0.125] * 8)
        self.assertEqual(self.send_times[-1] - self.send_times[-2], 0.5)  # from the start again

    def test_a_refused_state_does_not_block_later_ones(self) -> None:
        rep = LifecycleReporter(self.clock, Lifecycle(), self.send)
        self.answers = [SDKError("bad state", 400)]
        rep.to(lc.STARTING)
        rep.to(lc.READY)
        self.assertEqual([s for s, _ in self.sent], ["starting", "ready"])
        self.successResultOf(rep.drained())

    def test_stop_cancels_the_retry_wait(self) -> None:
        rep = LifecycleReporter(self.clock, Lifecycle(), self.send)
        self.answers = [SDKError("down")]
        rep.to(lc.STARTING)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        rep.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
