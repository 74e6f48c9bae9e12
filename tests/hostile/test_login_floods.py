"""Password guessing against a real server: one source, many sources, first-user floods."""

from __future__ import annotations

import json
import time

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial import unittest

from tests.hostile.attack import (
    RSS_BOUND_KIB,
    LivePing,
    get_json,
    healthz_ok,
    http_client,
    rss_kib,
    workspace,
)


class LoginFloodTests(unittest.TestCase):
    timeout = 300

    async def guess(self, client, d, email: str, n: int, parallel: int = 10) -> list[tuple[int, object]]:
        """``n`` wrong passwords for ``email``, ``parallel`` at a time; (status, Retry-After) each."""
        results: list[tuple[int, object]] = []

        async def one(i: int) -> None:
            code, _body, headers = await get_json(
                client, d.url + "/api/v2/users/login", method="POST",
                data=json.dumps({"email": email, "password": f"guess {i}"}).encode(),
                headers={"Content-Type": "application/json"},
            )
            results.append((code, (headers.getRawHeaders("Retry-After") or [None])[0]))

        for start in range(0, n, parallel):
            await gatherResults([Deferred.fromCoroutine(one(i)) for i in range(start, min(n, start + parallel))])
        return results

    async def test_a_thousand_wrong_guesses_are_throttled_and_the_owner_still_logs_in(self) -> None:
        d, alice, _agent = await workspace(self)
        pid = d.server.pid
        live = LivePing(self, alice, count=20, wait="500ms")
        await live.first_pong
        attacker = http_client("127.0.0.2")
        flood = self.guess(attacker, d, "alice@example.com", 1000)
        # The real owner, from the address she logged in from, during the flood.
        started = time.monotonic()
        await alice.login("alice")  # by username: the same account as the email the flood names
        took = time.monotonic() - started
        results = await flood
        codes = [c for c, _ in results]
        self.assertEqual(len(codes), 1000)
        self.assertEqual(set(codes) - {401, 429}, set(), sorted(set(codes)))
        # Ten free failures for the source, five for the account: only a handful were checked.
        self.assertLessEqual(codes.count(401), 11)
        self.assertGreaterEqual(codes.count(429), 989)
        self.assertTrue(all(ra is not None and int(ra) >= 1 for c, ra in results if c == 429))
        self.assertLess(took, 15.0, "the owner's login waited behind the flood")
        await healthz_ok(self, d)
        await live.assert_all_pongs(self)
        self.assertLess(rss_kib(pid), RSS_BOUND_KIB)

    async def test_guesses_spread_over_many_sources_hit_the_account_limit(self) -> None:
        d, alice, _agent = await workspace(self)
        results = []
        for i in range(2, 42):  # 40 sources, 3 guesses each
            results += await self.guess(http_client(f"127.0.1.{i}"), d, "alice@example.com", 3, parallel=3)
        codes = [c for c, _ in results]
        self.assertLessEqual(codes.count(401), 8, codes)
        self.assertGreaterEqual(codes.count(429), 112)
        await alice.login("alice")  # her own source is not locked out

    async def test_first_user_flood_after_setup_costs_no_hashing(self) -> None:
        d, alice, _agent = await workspace(self)
        pid = d.server.pid
        client = http_client("127.0.0.2")
        body = json.dumps({"username": "mallory", "email": "m@example.com", "password": "x" * 60}).encode()
        codes = []
        started = time.monotonic()
        for _ in range(20):
            batch = [Deferred.fromCoroutine(get_json(client, d.url + "/api/v2/users/first",
                                                     method="POST", data=body)) for _ in range(10)]
            codes += [code for code, _, _ in await gatherResults(batch)]
        took = time.monotonic() - started
        self.assertEqual(set(codes), {409})
        # 200 scrypt hashes would take >10 s of CPU here; the check before hashing takes ~1.
        self.assertLess(took, 10.0)
        await healthz_ok(self, d)
        self.assertLess(rss_kib(pid), RSS_BOUND_KIB)
