"""Whether this server reaches its database, for ``/healthz``: one ping at a time, its answer
reused for a moment.

A load balancer health-checks every replica often (each balancer every 500 ms), and anyone may
ask, so a ping per request would let a flood of ``/healthz`` queue work on the database threads.
Instead at most one ping runs at a time, everyone asking meanwhile waits for it, and its outcome
stands for ``fresh`` seconds. A ping slower than ``timeout`` is a failure; while it is still
running no other is started (a database that hangs does not get one stuck thread per check).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from coderstack.twistedtypes import Clock

log = Logger()

FRESH = 1.0
TIMEOUT = 2.0


class DatabaseCheck:
    """``problem()``: None while the database answers ``ping()``, else why not (for the log
    and tests; ``/healthz`` does not show it)."""

    def __init__(self, clock: Clock, ping: Callable[[], defer.Deferred[Any]], fresh: float = FRESH,
                 timeout: float = TIMEOUT) -> None:
        self.clock = clock
        self.ping = ping
        self.fresh = fresh
        self.timeout = timeout
        self._answer: str | None = None
        self._answered_at: float | None = None
        self._waiters: list[defer.Deferred[str | None]] = []
        self._running = False  # a ping's thread has not returned yet (perhaps past the timeout)
        self._timer: Any = None

    def problem(self) -> defer.Deferred[str | None]:
        now = self.clock.seconds()
        if self._answered_at is not None and now - self._answered_at < self.fresh:
            return defer.succeed(self._answer)
        if self._running and not self._waiters:
            # The last ping outlived its timeout and has not come back: still no answer.
            return defer.succeed(self._answer)
        waiter: defer.Deferred[str | None] = defer.Deferred()
        self._waiters.append(waiter)
        if not self._running:
            self._start()
        return waiter

    def _start(self) -> None:
        self._running = True
        self._timer = self.clock.callLater(self.timeout, self._timed_out)
        try:
            d = self.ping()
        except Exception as err:  # a ping that cannot even start is an answer too
            d = defer.fail(err)
        d.addCallbacks(self._pinged, self._failed)

    def _pinged(self, _: Any) -> None:
        self._running = False
        self._answer_all(None)

    def _failed(self, failure: Any) -> None:
        self._running = False
        self._answer_all(f"{failure.type.__name__}: {failure.getErrorMessage()}"[:300])

    def _timed_out(self) -> None:
        self._timer = None
        self._answer_all(f"no answer within {self.timeout:g} s")

    def _answer_all(self, problem: str | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if problem != self._answer:
            if problem is None:
                log.info("the database answers again")
            else:
                log.warn("the database does not answer: {why}; /healthz answers 503", why=problem)
        self._answer, self._answered_at = problem, self.clock.seconds()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(problem)
