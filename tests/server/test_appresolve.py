"""The app router's lookups: one lookup however many requests ask at once, and kept briefly."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from coderstack.server.appauth import Refused
from coderstack.server.apps import RESOLVE_TTL, AppRouter
from coderstack.server.appurl import AppTarget

TARGET = AppTarget("alice", "box", None, "code")


def router() -> tuple[AppRouter, task.Clock, list[defer.Deferred[Any]]]:
    clock = task.Clock()
    api = SimpleNamespace(d=SimpleNamespace(reactor=clock))
    r = AppRouter(api, None, None, None, wildcard=None)  # type: ignore[arg-type]
    lookups: list[defer.Deferred[Any]] = []

    async def lookup(target: AppTarget, subdomain: bool) -> Any:
        d: defer.Deferred[Any] = defer.Deferred()
        lookups.append(d)
        return await d

    r._lookup = lookup  # type: ignore[method-assign]
    return r, clock, lookups


class ResolveTests(unittest.TestCase):
    def resolve(self, r: AppRouter) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(r._resolve(TARGET, True))

    def test_concurrent_requests_share_one_lookup_then_the_cache(self) -> None:
        r, clock, lookups = router()
        first, second = self.resolve(r), self.resolve(r)
        self.assertEqual(len(lookups), 1)
        lookups[0].callback("the app")
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), ("the app", "the app"))
        self.assertEqual(self.successResultOf(self.resolve(r)), "the app")
        self.assertEqual(len(lookups), 1)
        clock.advance(RESOLVE_TTL + 0.1)
        self.resolve(r)
        self.assertEqual(len(lookups), 2)

    def test_a_failed_lookup_fails_every_waiter_and_is_not_kept(self) -> None:
        r, clock, lookups = router()
        first, second = self.resolve(r), self.resolve(r)
        lookups[0].errback(Refused(404, "Application not found", "no"))
        self.failureResultOf(first, Refused)
        self.failureResultOf(second, Refused)
        self.resolve(r)
        self.assertEqual(len(lookups), 2)

    def test_an_answer_from_before_forget_resolved_is_not_kept(self) -> None:
        r, clock, lookups = router()
        first = self.resolve(r)
        r.forget_resolved()
        lookups[0].callback("stale")
        self.assertEqual(self.successResultOf(first), "stale")
        self.resolve(r)
        self.assertEqual(len(lookups), 2)
