"""``coderstack.agent.reports.OneSender``: one report loop at a time, and what follows its end."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from coderstack.agent.reports import OneSender


class OneSenderTests(unittest.TestCase):
    def test_a_second_start_while_running_does_nothing(self) -> None:
        gate: defer.Deferred[None] = defer.Deferred()
        runs: list[int] = []

        async def loop() -> None:
            runs.append(1)
            await gate

        sender = OneSender(loop)
        sender.start()
        sender.start()
        self.assertEqual(runs, [1])
        self.assertTrue(sender.running)
        gate.callback(None)
        self.assertFalse(sender.running)

    def test_a_loop_that_never_waits_is_not_left_running(self) -> None:
        runs: list[int] = []

        async def loop() -> None:
            runs.append(1)

        sender = OneSender(loop)
        sender.start()
        sender.start()
        self.assertEqual(runs, [1, 1])
        self.assertFalse(sender.running)

    def test_after_may_start_the_next_loop(self) -> None:
        # What ``after`` wakes may report again: that must start a new loop, not be dropped.
        gate: defer.Deferred[None] = defer.Deferred()
        runs: list[str] = []
        sender: OneSender

        async def loop() -> None:
            runs.append("loop")
            if len(runs) == 1:
                await gate

        def after() -> None:
            runs.append("after")
            if runs.count("after") == 1:
                sender.start()

        sender = OneSender(loop, after=after)
        sender.start()
        gate.callback(None)
        self.assertEqual(runs, ["loop", "after", "loop", "after"])

    def test_cancel_ends_the_loop_without_after(self) -> None:
        after: list[int] = []

        async def loop() -> None:
            await defer.Deferred()

        sender = OneSender(loop, after=lambda: after.append(1))
        sender.start()
        sender.cancel()
        self.assertFalse(sender.running)
        self.assertEqual(after, [])

    def test_an_error_clears_the_mark_and_skips_after(self) -> None:
        gate: defer.Deferred[None] = defer.Deferred()
        after: list[int] = []

        async def loop() -> None:
            await gate
            raise RuntimeError("boom")

        sender = OneSender(loop, after=lambda: after.append(1))
        sender.start()
        gate.callback(None)
        self.assertFalse(sender.running)
        self.assertEqual(after, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # logged, not lost
