"""App health: the threshold rule, change-only reports with retries (task.Clock), and real probes
against a local HTTP server."""

from __future__ import annotations

from twisted.internet import reactor, task
from twisted.trial import unittest
from twisted.web import resource, server

from coderstack.agent.apphealth import (
    HEALTHY,
    INITIALIZING,
    UNHEALTHY,
    AppHealthWatcher,
    HealthCheck,
    HealthState,
)
from coderstack.sdk import SDKError


class HealthStateTests(unittest.TestCase):
    def test_threshold_consecutive_failures(self) -> None:
        s = HealthState(3)
        self.assertEqual(s.health, INITIALIZING)
        self.assertEqual([s.result(False) for _ in range(3)], [INITIALIZING, INITIALIZING, UNHEALTHY])
        self.assertEqual(s.result(True), HEALTHY)
        self.assertEqual([s.result(False), s.result(False), s.result(True)], [HEALTHY, HEALTHY, HEALTHY])
        self.assertEqual([s.result(False) for _ in range(3)][-1], UNHEALTHY)

    def test_zero_threshold_counts_as_one(self) -> None:
        s = HealthState(0)
        s.result(True)
        self.assertEqual(s.result(False), UNHEALTHY)

    def test_from_app(self) -> None:
        app = {"id": "a1", "healthcheck": {"url": "http://localhost:1/h", "interval": 5, "threshold": 6}}
        self.assertEqual(HealthCheck.from_app(app), HealthCheck("a1", "http://localhost:1/h", 5.0, 6))
        self.assertIsNone(HealthCheck.from_app({"id": "a2", "healthcheck": None}))
        self.assertIsNone(HealthCheck.from_app({"id": "a3", "healthcheck": {"url": "", "interval": 5}}))
        self.assertIsNone(HealthCheck.from_app({"id": "a4", "healthcheck": {"url": "http://x/", "interval": 0}}))


class WatcherReportTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.sent: list[dict[str, str]] = []
        self.answers: list[Exception | None] = []
        self.probe_results: dict[str, list[bool]] = {}

    async def send(self, healths: dict[str, str]) -> None:
        answer = self.answers.pop(0) if self.answers else None
        self.sent.append(dict(healths))
        if answer is not None:
            raise answer

    def watcher(self, checks: list[HealthCheck]) -> AppHealthWatcher:
        w = AppHealthWatcher(self.clock, checks, self.send)

        async def probe(check: HealthCheck) -> bool:
            return self.probe_results[check.app_id].pop(0)

        w.probe = probe  # type: ignore[method-assign]
        return w

    def test_initial_map_then_only_changes(self) -> None:
        w = self.watcher([HealthCheck("a", "http://x/", 1, 2), HealthCheck("b", "http://y/", 2, 1)])
        self.probe_results = {"a": [True, True, False, False, True, True], "b": [True, True, True]}
        w.start()
        self.assertEqual(self.sent, [{"a": INITIALIZING, "b": INITIALIZING}])
        self.clock.advance(1)  # a healthy
        self.clock.advance(1)  # a ok again, b healthy
        self.clock.advance(1)  # a fails once
        self.clock.advance(1)  # a fails twice: unhealthy; b ok
        self.clock.advance(1)  # a healthy again
        self.assertEqual(self.sent, [
            {"a": INITIALIZING, "b": INITIALIZING},
            {"a": HEALTHY, "b": INITIALIZING},
            {"a": HEALTHY, "b": HEALTHY},
            {"a": UNHEALTHY, "b": HEALTHY},
            {"a": HEALTHY, "b": HEALTHY},
        ])
        self.successResultOf(w.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unreachable_server_retries_the_newest_map(self) -> None:
        w = self.watcher([HealthCheck("a", "http://x/", 1, 1)])
        self.probe_results = {"a": [True, False]}
        self.answers = [SDKError("down"), SDKError("down"), SDKError("down")]
        w.start()
        self.clock.advance(1)
        self.clock.advance(1)
        w._loops[0].stop()
        self.clock.pump([0.5] * 30)
        self.assertEqual(self.sent[-1], {"a": UNHEALTHY})
        self.assertEqual(w.reported, {"a": UNHEALTHY})
        self.successResultOf(w.stop())

    def test_no_checks_no_reports(self) -> None:
        w = self.watcher([])
        w.start()
        self.assertEqual(self.sent, [])


class _Status(resource.Resource):
    isLeaf = True

    def __init__(self, code: int, body: bytes = b"ok") -> None:
        super().__init__()
        self.code, self.body = code, body

    def render_GET(self, request):
        request.setResponseCode(self.code)
        if self.code in (301, 302):
            request.setHeader(b"Location", b"http://127.0.0.1:1/elsewhere")
        return self.body


class ProbeTests(unittest.TestCase):
    timeout = 30

    def serve(self, code: int, body: bytes = b"ok") -> str:
        port = reactor.listenTCP(0, server.Site(_Status(code, body)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/healthz"

    async def probe(self, url: str, interval: float = 5) -> bool:
        w = AppHealthWatcher(reactor, [], self.send_nothing)
        self.addCleanup(w.stop)
        return await w.probe(HealthCheck("a", url, interval, 1))

    async def send_nothing(self, healths: dict[str, str]) -> None:
        raise AssertionError("nothing to send")

    async def test_2xx_and_3xx_are_healthy_without_following_redirects(self) -> None:
        self.assertTrue(await self.probe(self.serve(200)))
        self.assertTrue(await self.probe(self.serve(204, b"")))
        self.assertTrue(await self.probe(self.serve(302)))
        self.assertTrue(await self.probe(self.serve(200, b"x" * (4 << 20))))

    async def test_4xx_5xx_and_refused_are_failures(self) -> None:
        self.assertFalse(await self.probe(self.serve(404)))
        self.assertFalse(await self.probe(self.serve(503)))
        port = reactor.listenTCP(0, server.Site(resource.Resource()), interface="127.0.0.1")
        url = f"http://127.0.0.1:{port.getHost().port}/"
        await port.stopListening()
        self.assertFalse(await self.probe(url))
        self.assertFalse(await self.probe("not a url"))
