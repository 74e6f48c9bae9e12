"""coderstack.cli.sharedcall: one run of a call for every waiter, its failure included."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from coderstack.cli.sharedcall import SharedCall


class SharedCallTests(unittest.TestCase):
    def setUp(self) -> None:
        self.runs: list[defer.Deferred[Any]] = []

    async def call(self) -> Any:
        d: defer.Deferred[Any] = defer.Deferred()
        self.runs.append(d)
        return await d

    def test_every_waiter_gets_the_one_result(self) -> None:
        shared = SharedCall(self.call)
        first, second = shared.wait(), shared.wait()
        self.assertEqual((len(self.runs), shared.running), (1, True))
        self.runs[0].callback("tunnel")
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), ("tunnel", "tunnel"))
        self.assertFalse(shared.running)

    def test_every_waiter_gets_the_failure(self) -> None:
        shared = SharedCall(self.call)
        waiters = [shared.wait() for _ in range(3)]
        self.runs[0].errback(RuntimeError("agent offline"))
        for waiter in waiters:
            self.assertEqual(str(self.failureResultOf(waiter, RuntimeError).value), "agent offline")

    def test_once_over_the_next_wait_runs_it_again(self) -> None:
        shared = SharedCall(self.call)
        d = shared.wait()
        self.runs[0].errback(RuntimeError("first"))
        self.failureResultOf(d, RuntimeError)
        d = shared.wait()
        self.assertEqual(len(self.runs), 2)
        self.runs[1].callback("second")
        self.assertEqual(self.successResultOf(d), "second")

    def test_a_call_that_completes_at_once(self) -> None:
        async def now() -> str:
            return "done"

        shared = SharedCall(now)
        self.assertEqual(self.successResultOf(shared.wait()), "done")
        self.assertFalse(shared.running)
