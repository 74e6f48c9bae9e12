"""/healthz's database check on a task.Clock: one ping at a time, answers reused while fresh,
timeouts, a hung ping not doubled, recovery; and /healthz answering 503 meanwhile."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from coderstack.server.dbhealth import DatabaseCheck
from tests.support.api import Caller, make_deployment
from tests.support.waiting import wait_until


class FakeDatabase:
    def __init__(self) -> None:
        self.pings: list[defer.Deferred[None]] = []

    def ping(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.pings.append(d)
        return d


def result(d: defer.Deferred[Any]) -> Any:
    got: list[Any] = []
    d.addBoth(got.append)
    assert got, "not answered yet"
    return got[0]


class DatabaseCheckTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.db = FakeDatabase()
        self.check = DatabaseCheck(self.clock, self.db.ping, fresh=1.0, timeout=2.0)

    def test_askers_share_one_ping_and_its_answer_while_fresh(self) -> None:
        first, second = self.check.problem(), self.check.problem()
        self.assertEqual(len(self.db.pings), 1)
        self.assertNoResult(first)
        self.db.pings[0].callback(None)
        self.assertEqual((result(first), result(second)), (None, None))
        self.clock.advance(0.9)
        self.assertIsNone(result(self.check.problem()))
        self.assertEqual(len(self.db.pings), 1)
        self.clock.advance(0.1)
        self.check.problem()
        self.assertEqual(len(self.db.pings), 2)

    def test_a_failed_ping_is_a_problem_until_one_succeeds(self) -> None:
        d = self.check.problem()
        self.db.pings[0].errback(ConnectionRefusedError("refused"))
        self.assertIn("ConnectionRefusedError", result(d))
        self.assertIsNotNone(result(self.check.problem()))  # still fresh: no new ping
        self.assertEqual(len(self.db.pings), 1)
        self.clock.advance(1.0)
        d = self.check.problem()
        self.db.pings[1].callback(None)
        self.assertIsNone(result(d))

    def test_a_hung_ping_times_out_and_is_not_doubled(self) -> None:
        d = self.check.problem()
        self.clock.advance(2.0)
        self.assertEqual(result(d), "no answer within 2 s")
        for _ in range(5):  # checks keep coming while that ping's thread is stuck
            self.clock.advance(1.0)
            self.assertEqual(result(self.check.problem()), "no answer within 2 s")
        self.assertEqual(len(self.db.pings), 1)
        self.db.pings[0].callback(None)  # it came back at last: the database answers
        self.assertIsNone(result(self.check.problem()))
        self.clock.advance(1.0)
        d = self.check.problem()
        self.assertEqual(len(self.db.pings), 2)
        self.db.pings[1].callback(None)
        self.assertIsNone(result(d))
        self.assertFalse(self.clock.getDelayedCalls())

    def test_a_ping_that_raises_is_a_problem(self) -> None:
        def broken() -> defer.Deferred[None]:
            raise RuntimeError("pool stopped")

        check = DatabaseCheck(self.clock, broken)
        self.assertIn("pool stopped", result(check.problem()))
        self.assertFalse(self.clock.getDelayedCalls())


class HealthzTests(unittest.TestCase):
    async def test_healthz_is_503_while_the_database_does_not_answer(self) -> None:
        d, api = await make_deployment(self)
        c = Caller(api)
        self.assertEqual(await c.call("GET", "/healthz"), (200, b"OK"))
        db = FakeDatabase()
        clock = task.Clock()
        d.database_check = DatabaseCheck(clock, db.ping)
        asked = defer.Deferred.fromCoroutine(c.call("GET", "/healthz"))
        await wait_until(lambda: db.pings, "the check's ping")
        db.pings[0].errback(ConnectionRefusedError())
        self.assertEqual(await asked, (503, b"database unavailable"))
        clock.advance(1.0)
        asked = defer.Deferred.fromCoroutine(c.call("GET", "/healthz"))
        await wait_until(lambda: len(db.pings) == 2, "a second ping")
        db.pings[1].callback(None)
        self.assertEqual(await asked, (200, b"OK"))
