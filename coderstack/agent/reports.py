"""What the agent tells the server about the workspace (agent token auth, JSON bodies).

    POST  /api/v2/workspaceagents/me/report-lifecycle  {"state", "changed_at"}            -> 204
    PATCH /api/v2/workspaceagents/me/logs              {"log_source_id", "logs": [
                                                          {"created_at", "output", "level"}]} -> 200
                                                       413 once the agent's 1 MiB is used up
    POST  /api/v2/workspaceagents/me/log-source        {"id", "display_name", "icon"}      -> 201
    POST  /api/v2/workspaceagents/me/metadata          {"metadata": [
                                                          {"key", "value", "error", "collected_at"}]} -> 204
    POST  /api/v2/workspaceagents/me/app-health        {"healths": {app id: health}}       -> 200

Times are RFC 3339 UTC with microseconds and a ``Z``. Failures surface as ``SDKError`` (with
``status`` for HTTP answers); callers retry with a :class:`coderstack.backoff.Backoff` made by
:func:`report_backoff`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderstack.backoff import Backoff
from coderstack.sdk import Client, SDKError

BASE = "/api/v2/workspaceagents/me"

log = Logger()


def rfc3339(seconds: float) -> str:
    """A POSIX time (e.g. ``reactor.seconds()``) as an RFC 3339 UTC string."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def report_backoff(cap: float = 10.0) -> Backoff:
    """How a report waits before trying again: 0.5 s doubling per failure up to ``cap`` (the
    agent's ``reconnect_max``), shortened by up to 30% at random."""
    return Backoff(first=0.5, cap=cap)


def refused_for_good(err: SDKError) -> bool:
    """A 4xx answer other than 408 (timeout) and 429 (slow down): the server will never take
    this report, so it is dropped rather than retried (and blocks no later one)."""
    return err.status is not None and 400 <= err.status < 500 and err.status not in (408, 429)


class OneSender:
    """At most one report loop at a time: :meth:`start` runs ``loop`` unless it is running.

    The loop's end (return, error or cancel) clears the mark first, and only a loop that
    returned then calls ``after``: a report that ``after`` causes (a waiter woken by it
    reports again) starts a new loop instead of being taken for the one still running.
    """

    def __init__(self, loop: Callable[[], Coroutine[Any, Any, None]],
                 after: Callable[[], None] | None = None) -> None:
        self._loop = loop
        self._after = after
        self._running: Deferred[None] | None = None

    @property
    def running(self) -> bool:
        return self._running is not None

    def start(self) -> None:
        if self._running is not None:
            return
        d = Deferred.fromCoroutine(self._run())
        d.addErrback(_ended)
        if not d.called:  # a loop that finished without waiting is not running
            self._running = d

    def cancel(self) -> None:
        if self._running is not None:
            self._running.cancel()

    async def _run(self) -> None:
        try:
            await self._loop()
        finally:
            self._running = None
        if self._after is not None:
            self._after()


def _ended(failure: Failure) -> None:
    if not failure.check(CancelledError):  # cancelled: stopped on purpose
        log.failure("an agent report loop failed", failure)


class ServerReports:
    """The agent's workspace endpoints over an SDK ``Client``."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def lifecycle(self, state: str, changed_at: str) -> None:
        await self.client.request("POST", f"{BASE}/report-lifecycle",
                                  {"state": state, "changed_at": changed_at}, ok=(200, 204))

    async def logs(self, log_source_id: str, logs: list[dict[str, str]]) -> None:
        await self.client.request("PATCH", f"{BASE}/logs", {"log_source_id": log_source_id, "logs": logs},
                                  ok=(200, 204))

    async def log_source(self, source_id: str, display_name: str, icon: str = "") -> None:
        await self.client.request("POST", f"{BASE}/log-source",
                                  {"id": source_id, "display_name": display_name, "icon": icon},
                                  ok=(200, 201, 204))

    async def metadata(self, results: list[dict[str, Any]]) -> None:
        await self.client.request("POST", f"{BASE}/metadata", {"metadata": results}, ok=(200, 204))

    async def app_health(self, healths: dict[str, str]) -> None:
        await self.client.request("POST", f"{BASE}/app-health", {"healths": healths}, ok=(200, 204))
