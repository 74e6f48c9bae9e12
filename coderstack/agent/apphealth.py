"""App health: poll each manifest app's ``healthcheck.url`` and report changes.

For every app whose ``healthcheck`` has a URL and a positive interval:

- every ``interval`` seconds the agent GETs the URL (no redirects followed, no agent token sent,
  the request given up after ``interval`` seconds); a 2xx or 3xx answer is a success;
- the app is ``initializing`` until the first success, ``healthy`` after a success, and
  ``unhealthy`` after ``threshold`` consecutive failures (threshold 0 counts as 1);
- the agent posts ``{"healths": {app id: health}}`` (``POST app-health``) once at start and then
  only when some app's health changed; while the server is unreachable the newest map waits and
  is retried with the agent's backoff.

:class:`HealthState` is the sans-IO part (results in, health out); :class:`AppHealthWatcher` does
the HTTP on the injected reactor.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from twisted.internet import protocol, task
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

from coderstack.agent.reports import OneSender, refused_for_good, report_backoff
from coderstack.sdk import SDKError

log = Logger()


class _Response(Protocol):
    """What a probe reads of an HTTP response (Twisted's ``IResponse``)."""

    code: int

    def deliverBody(self, protocol: protocol.Protocol) -> None: ...

INITIALIZING = "initializing"
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class HealthCheck:
    app_id: str
    url: str
    interval: float
    threshold: int

    @classmethod
    def from_app(cls, app: dict[str, Any]) -> HealthCheck | None:
        hc = app.get("healthcheck")
        if not isinstance(hc, dict):
            return None
        url, interval = str(hc.get("url") or ""), _seconds(hc.get("interval"))
        if not app.get("id") or not url or interval <= 0:
            return None
        return cls(str(app["id"]), url, interval, max(1, int(hc.get("threshold") or 0)))


def _seconds(value: Any) -> float:
    seconds = float(value or 0)
    if not math.isfinite(seconds):
        raise ValueError(f"not a number of seconds: {value!r}")
    return min(seconds, 86400.0)


class HealthState:
    """One app's health from its check results."""

    def __init__(self, threshold: int) -> None:
        self.threshold = max(1, threshold)
        self.health = INITIALIZING
        self.failures = 0

    def result(self, ok: bool) -> str:
        if ok:
            self.failures = 0
            self.health = HEALTHY
        else:
            self.failures += 1
            if self.failures >= self.threshold:
                self.health = UNHEALTHY
        return self.health


class _Discard(protocol.Protocol):
    def __init__(self, done: Deferred[None]) -> None:
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(None)


class AppHealthWatcher:
    def __init__(self, reactor: Any, checks: list[HealthCheck],
                 send: Callable[[dict[str, str]], Awaitable[None]], backoff_cap: float = 10.0) -> None:
        self.reactor = reactor
        self.checks = checks
        self.send = send
        self.backoff = report_backoff(backoff_cap)
        self.states = {c.app_id: HealthState(c.threshold) for c in checks}
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)
        self.reported: dict[str, str] | None = None
        self._loops: list[task.LoopingCall] = []
        self._inflight: dict[str, Deferred[Any]] = {}
        self._sender = OneSender(self._send)
        self._dirty = False

    def healths(self) -> dict[str, str]:
        return {app_id: s.health for app_id, s in self.states.items()}

    def start(self) -> None:
        if not self.checks:
            return
        self._changed()
        for check in self.checks:
            loop = task.LoopingCall(self._tick, check)
            loop.clock = self.reactor
            # The first check waits one interval, as Coder's does: apps take a moment to start.
            loop.start(check.interval, now=False).addErrback(lambda f: log.failure("app health loop", f))
            self._loops.append(loop)

    def stop(self) -> Deferred[Any]:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        for d in list(self._inflight.values()):
            d.cancel()
        self._sender.cancel()
        return self.pool.closeCachedConnections()

    def _tick(self, check: HealthCheck) -> None:
        if check.app_id in self._inflight:
            return
        d = Deferred.fromCoroutine(self.probe(check))
        self._inflight[check.app_id] = d

        def done(ok: Any) -> None:
            self._inflight.pop(check.app_id, None)
            if isinstance(ok, bool):
                before = self.states[check.app_id].health
                if self.states[check.app_id].result(ok) != before:
                    self._changed()

        d.addBoth(done)

    async def probe(self, check: HealthCheck) -> bool:
        """One GET of the healthcheck URL: True on a 2xx or 3xx answer within the interval."""
        try:
            d = self.agent.request(b"GET", check.url.encode())
            d.addTimeout(check.interval, self.reactor)
            response = cast(_Response, await d)
            body: Deferred[None] = Deferred()
            discard = _Discard(body)
            response.deliverBody(discard)
            body.addTimeout(check.interval, self.reactor)
            try:
                await body
            except Exception:
                # A body that never ends: stop reading it.
                if discard.transport is not None:
                    discard.transport.stopProducing()
            return 200 <= response.code < 400
        except CancelledError:
            raise
        except Exception:
            return False

    def _changed(self) -> None:
        self._dirty = True
        self._sender.start()

    async def _send(self) -> None:
        self.backoff.reset()
        while self._dirty:
            self._dirty = False
            healths = self.healths()
            if healths == self.reported:
                continue
            try:
                await self.send(healths)
                self.reported = healths
                self.backoff.reset()
            except SDKError as err:
                if refused_for_good(err):
                    log.warn("server refused app health: {why}", why=str(err))
                    self.reported = healths
                    continue
                self._dirty = True
                await task.deferLater(self.reactor, self.backoff.next_delay(), lambda: None)
