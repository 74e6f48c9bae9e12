"""What the agent does with the template, once it has its first manifest.

Start (:meth:`Workspace.start`): lifecycle ``starting``; the start scripts run concurrently and
their outcome sets ``ready``, ``start_error`` or ``start_timeout``; meanwhile cron scripts are
scheduled, metadata collected and app health watched (:mod:`~coderstack.agent.scripts`,
:mod:`~coderstack.agent.metadata`, :mod:`~coderstack.agent.apphealth`).

Stop (:meth:`Workspace.stop`, on a graceful agent stop): the loops stop, start scripts still
running are killed, lifecycle ``shutting_down``, the stop scripts run with their timeouts, then
``off`` / ``shutdown_error`` / ``shutdown_timeout``. The logs and lifecycle reports are given up
to ``report_grace`` seconds to reach the server before the agent goes on exiting.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from coderstack.agent import lifecycle as lc
from coderstack.agent.apphealth import AppHealthWatcher, HealthCheck
from coderstack.agent.lifecycle import Lifecycle, LifecycleReporter
from coderstack.agent.logs import AGENT_SOURCE_NAME, AgentLogs, agent_source_id
from coderstack.agent.metadata import MetadataCollector, MetadataItem
from coderstack.agent.reports import ServerReports
from coderstack.agent.scripts import Script, ScriptRunner
from coderstack.agent.session_env import SessionEnvironment
from coderstack.sdk import Client

log = Logger()

T = TypeVar("T")


def parse_entries(raw: Any, parse: Callable[[dict[str, Any]], T], what: str,
                  bad: Callable[[str, str], None]) -> list[T]:
    """Each usable entry of a manifest list; the others are told to ``bad`` and skipped."""
    out: list[T] = []
    if raw is None:
        return out
    if not isinstance(raw, list):
        bad(what + " list", f"expected a list, got {type(raw).__name__}")
        return out
    for entry in raw:
        if not isinstance(entry, dict):
            bad(what, f"expected an object, got {type(entry).__name__}")
            continue
        try:
            out.append(parse(entry))
        except (TypeError, ValueError, OverflowError) as err:
            bad(what, str(err) or type(err).__name__)
    return out


class Workspace:
    def __init__(self, reactor: Any, client: Client, data_dir: str, session_env: SessionEnvironment,
                 backoff_cap: float = 10.0, report_grace: float = 10.0,
                 kill_grace: float = 3.0, pipe_grace: float = 10.0) -> None:
        self.reactor = reactor
        self.reports = ServerReports(client)
        self.data_dir = data_dir
        self.session_env = session_env
        self.report_grace = report_grace
        self.lifecycle = Lifecycle()
        self.reporter = LifecycleReporter(reactor, self.lifecycle, self.reports.lifecycle, backoff_cap)
        self.logs = AgentLogs(reactor, self.reports, backoff_cap=backoff_cap)
        self.kill_grace = kill_grace
        self.pipe_grace = pipe_grace
        self.backoff_cap = backoff_cap
        self.scripts: ScriptRunner | None = None
        self.metadata: MetadataCollector | None = None
        self.apps: AppHealthWatcher | None = None
        self.started: Deferred[str] | None = None  # fires with the start outcome
        self._stopping = False

    def start(self, manifest: dict[str, Any]) -> Deferred[str]:
        agent_source = agent_source_id(str(manifest["agent_id"]))
        self.logs.register(agent_source, AGENT_SOURCE_NAME)

        def bad(what: str, why: str) -> None:
            log.warn("the manifest has an unusable {what}: {why}", what=what, why=why)
            self.logs.add(agent_source, f"ignored an unusable {what} in the manifest: {why}", "error")

        self.scripts = ScriptRunner(
            self.reactor, parse_entries(manifest.get("scripts"), Script.from_json, "script", bad),
            self.logs, agent_source, os.path.join(self.data_dir, "scripts"),
            env=self.session_env.environment, cwd=self.session_env.directory,
            kill_grace=self.kill_grace, pipe_grace=self.pipe_grace)
        self.metadata = MetadataCollector(
            self.reactor, parse_entries(manifest.get("metadata"), MetadataItem.from_json, "metadata item", bad),
            self.reports, env=self.session_env.environment, cwd=self.session_env.directory,
            backoff_cap=self.backoff_cap)
        checks = parse_entries(manifest.get("apps"), HealthCheck.from_app, "app", bad)
        self.apps = AppHealthWatcher(self.reactor, [c for c in checks if c is not None],
                                     self.reports.app_health, self.backoff_cap)
        self.reporter.to(lc.STARTING)
        self.started = Deferred.fromCoroutine(self._start())
        self.started.addErrback(self._start_failed)
        self.scripts.start_cron()
        self.metadata.start()
        self.apps.start()
        return self.started

    async def _start(self) -> str:
        assert self.scripts is not None
        state, _results = await self.scripts.run_start()
        if self.lifecycle.state == lc.STARTING:
            self.reporter.to(state)
        return state

    def _start_failed(self, failure: Any) -> str:
        log.failure("start scripts failed to run", failure)
        if self.lifecycle.state == lc.STARTING:
            self.reporter.to(lc.START_ERROR)
        return lc.START_ERROR

    async def stop(self) -> None:
        if self.scripts is None or self._stopping:
            return
        self._stopping = True
        self.scripts.stop_cron()
        if self.metadata is not None:
            await self.metadata.stop()
        if self.apps is not None:
            await self.apps.stop()
        await self.scripts.kill_all()
        if self.started is not None:
            await self.started
        self.reporter.to(lc.SHUTTING_DOWN)
        state, _results = await self.scripts.run_stop()
        self.reporter.to(state)
        await self._reports_out()
        self.reporter.stop()
        self.logs.stop()

    async def _reports_out(self) -> None:
        both = defer.DeferredList([self.logs.flushed(), self.reporter.drained()], consumeErrors=True)
        both.addTimeout(self.report_grace, self.reactor)
        try:
            await both
        except defer.TimeoutError:
            log.warn("the server did not take the agent's last reports within {s}s", s=self.report_grace)
