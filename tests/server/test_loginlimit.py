"""Login rate limits on a task.Clock: free failures, growing delays, trusted sources, bounds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.trial import unittest

from coderstack.server.loginlimit import LoginAttempt, LoginLimiter, Policy, Refused

SOURCE = Policy(free=3, base=1.0, cap=8.0, forget=100.0)
ACCOUNT = Policy(free=2, base=2.0, cap=60.0, forget=100.0)


class LoginLimiterTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.limiter = LoginLimiter(self.clock, SOURCE, ACCOUNT, max_in_flight=2)

    def attempt(self, login: str, source: str) -> LoginAttempt:
        got = self.limiter.begin(login, source)
        self.assertIsInstance(got, LoginAttempt)
        return got

    def failed_login(self, login: str, source: str) -> None:
        self.attempt(login, source).done(False)

    def test_free_failures_then_doubling_source_delays_up_to_the_cap(self) -> None:
        for i in range(3):
            self.failed_login(f"user{i}@x", "10.0.0.1")  # different accounts: only the source counts
        waits = []
        for i in range(3, 9):
            self.failed_login(f"user{i}@x", "10.0.0.1")
            refused = self.limiter.begin(f"user{i}@x", "10.0.0.1")
            self.assertIsInstance(refused, Refused)
            self.assertEqual(refused.reason, "source")
            waits.append(refused.retry_after)
            self.clock.advance(refused.retry_after)
        self.assertEqual(waits, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0])

    def test_refused_attempts_do_not_grow_the_delay(self) -> None:
        for i in range(4):
            self.failed_login(f"a{i}@x", "10.0.0.1")
        first = self.limiter.begin("b@x", "10.0.0.1")
        self.clock.advance(0.5)
        again = self.limiter.begin("b@x", "10.0.0.1")
        self.assertEqual((first.retry_after, again.retry_after), (1.0, 0.5))

    def test_account_limit_spans_sources(self) -> None:
        for i in range(3):
            self.failed_login("Victim@X", f"10.0.1.{i}")
        refused = self.limiter.begin("victim@x", "10.0.2.1")  # case and spacing do not matter
        self.assertEqual((refused.reason, refused.retry_after), ("account", 2.0))
        self.clock.advance(2.0)
        self.failed_login(" victim@x ", "10.0.2.1")
        refused = self.limiter.begin("victim@x", "10.0.2.2")
        self.assertEqual(refused.retry_after, 4.0)

    def test_the_owners_own_source_is_not_locked_out_of_its_account(self) -> None:
        self.attempt("alice@x", "192.0.2.7").done(True)
        for i in range(20):
            self.clock.advance(60)
            got = self.limiter.begin("alice@x", f"10.9.0.{i % 3}")
            if isinstance(got, LoginAttempt):
                got.done(False)
        self.assertIsInstance(self.limiter.begin("alice@x", "10.9.0.99"), Refused)
        self.attempt("alice@x", "192.0.2.7").done(True)

    def test_trust_expires(self) -> None:
        limiter = LoginLimiter(self.clock, SOURCE, ACCOUNT, trust_for=1000.0)
        limiter.begin("alice@x", "192.0.2.7").done(True)
        self.clock.advance(1000.0)
        for i in range(3):
            limiter.begin("alice@x", f"10.0.0.{i}").done(False)
        self.assertEqual(limiter.begin("alice@x", "192.0.2.7").reason, "account")

    def test_a_quiet_spell_forgets_failures(self) -> None:
        for i in range(4):
            self.failed_login(f"a{i}@x", "10.0.0.1")
        self.assertIsInstance(self.limiter.begin("a@x", "10.0.0.1"), Refused)
        self.clock.advance(100.0)
        self.failed_login("a@x", "10.0.0.1")  # counts as the first again
        self.attempt("a@x", "10.0.0.1").done(False)
        self.attempt("a@x", "10.0.0.1").abandon()

    def test_success_clears_the_source_only(self) -> None:
        for i in range(2):
            self.failed_login(f"a{i}@x", "10.0.0.1")
        self.attempt("b@x", "10.0.0.1").done(True)
        for i in range(3):
            self.failed_login(f"c{i}@x", "10.0.0.1")
        self.assertIsInstance(self.limiter.begin("c9@x", "10.0.0.1"), LoginAttempt)  # 3 free again
        self.limiter.begin("c9@x", "10.0.0.1")  # (left in flight)
        self.failed_login("d@x", "10.0.0.2")
        self.assertEqual(self.limiter.debug()["accounts"], 6)

    def test_concurrent_checks_per_source_are_bounded(self) -> None:
        a, b = self.attempt("a@x", "10.0.0.1"), self.attempt("a@x", "10.0.0.1")
        busy = self.limiter.begin("a@x", "10.0.0.1")
        self.assertEqual(busy.reason, "busy")
        self.attempt("a@x", "10.0.0.2").abandon()  # other sources are not held up
        a.abandon()
        a.abandon()  # idempotent: frees one slot, not two
        c = self.attempt("a@x", "10.0.0.1")
        self.assertEqual(self.limiter.begin("a@x", "10.0.0.1").reason, "busy")
        b.done(True)
        c.done(True)
        self.assertEqual(self.limiter.debug()["in_flight"], 0)

    def test_tables_are_bounded(self) -> None:
        limiter = LoginLimiter(self.clock, SOURCE, ACCOUNT, max_entries=50)
        for i in range(1000):
            limiter.begin(f"u{i}@x", f"10.{i // 250}.{i % 250}.1").done(i % 2 == 0)
        info = limiter.debug()
        self.assertLessEqual(max(info["sources"], info["accounts"], info["trusted"]), 50)


class LoginLimiterPropertyTests(unittest.SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans(),
                              st.floats(0, 50, allow_nan=False)), max_size=60))
    def test_refusals_are_short_and_expire(self, steps) -> None:
        """Whatever happened, a refusal waits at most the longest cap and ends when it says."""
        clock = task.Clock()
        limiter = LoginLimiter(clock, SOURCE, ACCOUNT, max_in_flight=10)
        for account, source, ok, pause in steps:
            got = limiter.begin(f"a{account}", f"s{source}")
            if isinstance(got, Refused):
                self.assertGreater(got.retry_after, 0)
                self.assertLessEqual(got.retry_after, max(SOURCE.cap, ACCOUNT.cap))
                if got.reason != "busy":
                    clock.advance(got.retry_after)
                    again = limiter.begin(f"a{account}", f"s{source}")
                    self.assertNotEqual(getattr(again, "reason", None), got.reason)
                    if isinstance(again, LoginAttempt):
                        again.abandon()
            else:
                got.done(ok)
            clock.advance(pause)
