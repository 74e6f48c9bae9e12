"""Slow and greedy HTTP clients against a real server: request heads dripped a line at a time,
one source opening hundreds of connections, several sources filling the fd budget."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from tests.hostile.attack import (
    RSS_BOUND_KIB,
    Dripper,
    LivePing,
    healthz_ok,
    nofile_limits,
    open_fds,
    ping_ok,
    rss_kib,
    workspace,
)
from tests.support.waiting import wait_until

PER_SOURCE = 128  # the server's default --max-connections-per-source


class HTTPFloodTests(unittest.TestCase):
    timeout = 240

    async def drip(self, d, source: str, n: int, every: float = 2.0) -> list[Dripper]:
        """``n`` connections from ``source``, each dripping a request head."""
        drippers = [Dripper(every) for _ in range(n)]
        ep = TCP4ClientEndpoint(reactor, d.host, d.port, bindAddress=(source, 0))
        await gatherResults([connectProtocol(ep, p) for p in drippers])

        def close_all() -> None:
            for p in drippers:
                if not p.closed and p.transport is not None:
                    p.transport.abortConnection()

        self.addCleanup(close_all)
        return drippers

    async def test_dripped_heads_are_capped_per_source_and_cut_at_the_deadline(self) -> None:
        d, alice, _agent = await workspace(self, nofile=(256, 1024))
        pid = d.server.pid
        # The soft open-file limit was raised to the hard one at start.
        self.assertEqual(nofile_limits(pid), (1024, 1024))
        before = open_fds(pid)
        drippers = await self.drip(d, "127.0.0.2", 300)
        refused = await wait_until(
            lambda: [p for p in drippers if p.status().startswith(b"HTTP/1.1 503")]
            if sum(p.closed for p in drippers) >= 300 - PER_SOURCE else None,
            "the connections past the per-source cap to be refused", timeout=30, interval=0.1,
        )
        self.assertEqual(len(refused), 300 - PER_SOURCE)
        self.assertIn(b"per source address", refused[0].received)
        held = [p for p in drippers if not p.closed]
        self.assertEqual(len(held), PER_SOURCE)
        self.assertLess(open_fds(pid), before + PER_SOURCE + 20)
        # Everyone else is still served while the flood holds its connections.
        await healthz_ok(self, d)
        await ping_ok(self, alice)
        # However slowly they drip, the held heads end at the 10 s head deadline, with a 408.
        await wait_until(lambda: all(p.closed for p in held), "the head deadline to end the dripping clients",
                         timeout=25, interval=0.1)
        self.assertEqual({p.status() for p in held}, {b"HTTP/1.1 408 Request Timeout"})
        self.assertLess(max(p.lines for p in held), 7)  # ~10 s of 2 s drips, not forever
        await wait_until(lambda: open_fds(pid) <= before + 5, "the server to release the closed connections' fds",
                         timeout=30, interval=0.1)
        self.assertLess(rss_kib(pid), RSS_BOUND_KIB)

    async def test_near_the_fd_limit_healthz_still_answers(self) -> None:
        # 400 descriptors: 336 for HTTP connections, 32 more kept for sources that hold none.
        d, alice, _agent = await workspace(self, nofile=(200, 400))
        pid = d.server.pid
        self.assertEqual(nofile_limits(pid), (400, 400))
        live = LivePing(self, alice, count=30, wait="300ms")
        await live.first_pong
        flood = []
        for i in range(2, 5):  # three sources, each up to its cap: 384 > 336
            flood += await self.drip(d, f"127.0.0.{i}", PER_SOURCE, every=1.0)
        await wait_until(lambda: sum(p.closed for p in flood) >= 3 * PER_SOURCE - 336,
                         "the server to refuse connections past its fd budget", timeout=30, interval=0.1)
        at_limit = [p for p in flood if p.closed and b"open connections" in p.received]
        self.assertTrue(at_limit, [p.received[:80] for p in flood if p.closed][:3])
        self.assertLess(open_fds(pid), 400 - 16)  # accept() never ran out of descriptors
        # A fresh source still gets through (the spare slots), and the live tunnel keeps working.
        # (127.0.0.1 itself, holding the agent's and the CLI's connections, waits like the flood.)
        await healthz_ok(self, d, source="127.0.0.9")
        await live.assert_all_pongs(self)
        self.assertLess(rss_kib(pid), RSS_BOUND_KIB)
        await wait_until(lambda: all(p.closed for p in flood), "the head deadline to end the flood",
                         timeout=25, interval=0.1)
        await healthz_ok(self, d, source="127.0.0.2")  # the flood's own sources recover too
        await ping_ok(self, alice)
