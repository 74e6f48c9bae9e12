"""The agent's lifecycle (Coder's states) and its reports to the server.

    created -> starting -> ready | start_timeout | start_error
    (any of those) -> shutting_down -> off | shutdown_timeout | shutdown_error

:class:`Lifecycle` is the state machine: it refuses a change the diagram does not have and keeps
every accepted change, in order, until it is reported. :class:`LifecycleReporter` posts them one
at a time (``report-lifecycle``), so the server sees every state in the order it happened and the
latest one last; while the server is unreachable it retries the oldest unreported change with the
agent's backoff. ``created`` is the state the server starts from, so it is never reported.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from coderstack.agent.reports import OneSender, refused_for_good, report_backoff, rfc3339
from coderstack.sdk import SDKError
from coderstack.twistedtypes import Clock, sleep

log = Logger()

CREATED = "created"
STARTING = "starting"
READY = "ready"
START_TIMEOUT = "start_timeout"
START_ERROR = "start_error"
SHUTTING_DOWN = "shutting_down"
SHUTDOWN_TIMEOUT = "shutdown_timeout"
SHUTDOWN_ERROR = "shutdown_error"
OFF = "off"

STATES = (CREATED, STARTING, START_TIMEOUT, START_ERROR, READY, SHUTTING_DOWN, SHUTDOWN_TIMEOUT,
          SHUTDOWN_ERROR, OFF)

_NEXT = {
    CREATED: {STARTING, SHUTTING_DOWN},
    STARTING: {READY, START_TIMEOUT, START_ERROR, SHUTTING_DOWN},
    READY: {SHUTTING_DOWN},
    START_TIMEOUT: {SHUTTING_DOWN},
    START_ERROR: {SHUTTING_DOWN},
    SHUTTING_DOWN: {OFF, SHUTDOWN_TIMEOUT, SHUTDOWN_ERROR},
    OFF: set(),
    SHUTDOWN_TIMEOUT: set(),
    SHUTDOWN_ERROR: set(),
}


class LifecycleError(ValueError):
    """A change the lifecycle does not allow (e.g. ready -> starting)."""


@dataclass(frozen=True)
class Change:
    state: str
    changed_at: float  # POSIX seconds


class Lifecycle:
    def __init__(self) -> None:
        self.state = CREATED
        self.history: list[Change] = []
        self.unreported: list[Change] = []

    def to(self, state: str, now: float) -> Change:
        if state not in _NEXT:
            raise LifecycleError(f"unknown lifecycle state {state!r}")
        if state not in _NEXT[self.state]:
            raise LifecycleError(f"lifecycle cannot go from {self.state} to {state}")
        change = Change(state, now)
        self.state = state
        self.history.append(change)
        self.unreported.append(change)
        return change

    def next_report(self) -> Change | None:
        return self.unreported[0] if self.unreported else None

    def reported(self, change: Change) -> None:
        if self.unreported and self.unreported[0] == change:
            self.unreported.pop(0)


class LifecycleReporter:
    """Reports a :class:`Lifecycle`'s changes with ``send(state, changed_at)``."""

    def __init__(self, clock: Clock, lifecycle: Lifecycle,
                 send: Callable[[str, str], Awaitable[None]], backoff_cap: float = 10.0) -> None:
        self.clock = clock
        self.lifecycle = lifecycle
        self.send = send
        self.backoff = report_backoff(backoff_cap)
        self._sender = OneSender(self._pump, after=self._reported)
        self._wait: Any = None
        self._drained: list[Deferred[None]] = []

    def to(self, state: str) -> None:
        """Change state now and report it (soon, or once the server answers again)."""
        self.lifecycle.to(state, self.clock.seconds())
        log.info("agent lifecycle: {state}", state=state)
        self._kick()

    def drained(self) -> Deferred[None]:
        """Fires once every change so far has been reported."""
        if self.lifecycle.next_report() is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def stop(self) -> None:
        self._sender.cancel()

    def _kick(self) -> None:
        self._sender.start()

    async def _pump(self) -> None:
        self.backoff.reset()
        while (change := self.lifecycle.next_report()) is not None:
            try:
                await self.send(change.state, rfc3339(change.changed_at))
            except SDKError as err:
                if refused_for_good(err):
                    # The server will never take this one; do not block the later ones on it.
                    log.warn("server refused lifecycle {state}: {why}", state=change.state, why=str(err))
                    self.lifecycle.reported(change)
                    continue
                delay = self.backoff.next_delay()
                log.info("cannot report lifecycle {state} ({why}); retrying in {delay:.1f}s",
                         state=change.state, why=str(err), delay=delay)
                self._wait = sleep(self.clock, delay)
                await self._wait
                continue
            self.backoff.reset()
            self.lifecycle.reported(change)

    def _reported(self) -> None:
        waiters, self._drained = self._drained, []
        for d in waiters:
            d.callback(None)

