"""The manifest's scripts: start scripts, cron scripts and stop scripts.

Each entry of the manifest's ``scripts`` (its JSON is described in ``coderstack/server/agentspec.py``) runs like this:

- its text is written to ``<data dir>/scripts/<log_source_id>.sh`` (0700) and executed: directly
  when it starts with ``#!`` (so ``#!/bin/bash`` scripts get bash), else by ``/bin/sh``;
- in the workspace directory with the workspace environment (:mod:`coderstack.agent.session_env`),
  in its own process group, killed (the group) past ``timeout_seconds`` (0: no limit) — see
  :mod:`coderstack.agent.process`;
- its stdout and stderr go, line by line, to the agent logs under the script's ``log_source_id``
  and are appended to ``log_path`` when set.

``run_on_start`` scripts run concurrently at agent start; the outcome is ``ready`` when all exit
0, ``start_timeout`` when one timed out, else ``start_error``. A failure is also told in the
agent's own log source: the script's name, how it ended and the last lines of its output.
Scripts with a ``cron`` run on that schedule (:mod:`coderstack.cron`) on the injected clock; a run
still going when the next is due is not doubled. ``run_on_stop`` scripts run on a graceful stop:
``off``, ``shutdown_timeout`` or ``shutdown_error`` likewise.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from coderstack import cron
from coderstack.agent.lifecycle import (
    OFF,
    READY,
    SHUTDOWN_ERROR,
    SHUTDOWN_TIMEOUT,
    START_ERROR,
    START_TIMEOUT,
)
from coderstack.agent.logs import AgentLogs, LineSplitter
from coderstack.agent.process import Exit, GroupProcess

log = Logger()

TAIL_LINES = 10


@dataclass(frozen=True)
class Script:
    log_source_id: str
    display_name: str
    script: str
    cron: str = ""
    run_on_start: bool = False
    run_on_stop: bool = False
    start_blocks_login: bool = False
    timeout_seconds: float = 0
    log_path: str = ""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Script:
        return cls(
            log_source_id=str(d.get("log_source_id") or ""),
            display_name=str(d.get("display_name") or "Script"),
            script=str(d.get("script") or ""),
            cron=str(d.get("cron") or ""),
            run_on_start=bool(d.get("run_on_start")),
            run_on_stop=bool(d.get("run_on_stop")),
            start_blocks_login=bool(d.get("start_blocks_login")),
            timeout_seconds=_timeout(d.get("timeout_seconds")),
            log_path=str(d.get("log_path") or ""),
        )


def _timeout(value: Any) -> float:
    seconds = float(value or 0)
    if not math.isfinite(seconds):
        raise ValueError(f"timeout_seconds is not a number: {value!r}")
    return max(0.0, seconds)


@dataclass(frozen=True)
class ScriptResult:
    script: Script
    exit: Exit
    tail: tuple[str, ...]


def outcome(results: list[ScriptResult], stopping: bool = False) -> str:
    """The lifecycle state a set of start (or stop) script results leads to."""
    if any(r.exit.timed_out for r in results):
        return SHUTDOWN_TIMEOUT if stopping else START_TIMEOUT
    if any(not r.exit.ok for r in results):
        return SHUTDOWN_ERROR if stopping else START_ERROR
    return OFF if stopping else READY


class ScriptRunner:
    def __init__(self, reactor: Any, scripts: list[Script], logs: AgentLogs, agent_source_id: str,
                 script_dir: str, env: Callable[[], dict[str, str]], cwd: Callable[[], str],
                 kill_grace: float = 3.0, pipe_grace: float = 10.0) -> None:
        self.reactor = reactor
        self.scripts = scripts
        self.logs = logs
        self.agent_source_id = agent_source_id
        self.script_dir = script_dir
        self.env = env
        self.cwd = cwd
        self.kill_grace = kill_grace
        self.pipe_grace = pipe_grace
        self.running: dict[int, GroupProcess] = {}  # index in scripts -> its current run
        self.cron_runs: dict[int, int] = {}  # how often each cron script was started
        self._cron_timers: dict[int, Any] = {}
        self._cron_schedules: dict[int, cron.Schedule] = {}

    # -- start and stop ----------------------------------------------------------------------

    async def run_start(self) -> tuple[str, list[ScriptResult]]:
        return await self._run_all([i for i, s in enumerate(self.scripts) if s.run_on_start], stopping=False)

    async def run_stop(self) -> tuple[str, list[ScriptResult]]:
        return await self._run_all([i for i, s in enumerate(self.scripts) if s.run_on_stop], stopping=True)

    async def _run_all(self, indexes: list[int], stopping: bool) -> tuple[str, list[ScriptResult]]:
        runs = [Deferred.fromCoroutine(self.run(i)) for i in indexes]
        results: list[ScriptResult] = await gatherResults(runs) if runs else []
        return outcome(results, stopping), results

    def kill_all(self) -> Deferred[Any]:
        """Kill every running script (its whole group); fires once they are gone."""
        procs = list(self.running.values())
        for proc in procs:
            proc.kill()
        return gatherResults([proc.done for proc in procs])

    # -- cron --------------------------------------------------------------------------------

    def start_cron(self) -> None:
        for i, s in enumerate(self.scripts):
            if not s.cron:
                continue
            try:
                self._cron_schedules[i] = cron.parse(s.cron)
            except cron.CronError as err:
                self._agent_log(f"{s.display_name}: invalid cron expression: {err}", "error")
                continue
            self._schedule(i)

    def stop_cron(self) -> None:
        for timer in self._cron_timers.values():
            if timer.active():
                timer.cancel()
        self._cron_timers.clear()
        self._cron_schedules.clear()

    def _schedule(self, i: int) -> None:
        sched = self._cron_schedules.get(i)
        if sched is None:
            return
        now = self.reactor.seconds()
        nxt = sched.next_after(dt.datetime.fromtimestamp(now, dt.UTC))
        if nxt is None:
            return
        self._cron_timers[i] = self.reactor.callLater(max(0.0, nxt.timestamp() - now), self._cron_fire, i)

    def _cron_fire(self, i: int) -> None:
        self._cron_timers.pop(i, None)
        if i not in self.running:
            self.cron_runs[i] = self.cron_runs.get(i, 0) + 1
            d = Deferred.fromCoroutine(self.run(i))
            d.addErrback(lambda f: log.failure("cron script failed to run", f))
        else:
            log.info("{name}: previous cron run still going; skipped", name=self.scripts[i].display_name)
        self._schedule(i)

    # -- one run -----------------------------------------------------------------------------

    async def run(self, i: int) -> ScriptResult:
        script = self.scripts[i]
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        splitters = {1: LineSplitter(), 2: LineSplitter()}
        log_file = _open_log(script.log_path)

        def line(text: str, level: str = "info") -> None:
            tail.append(text)
            if script.log_source_id:
                self.logs.add(script.log_source_id, text, level)
            if log_file is not None:
                try:
                    log_file.write(text.encode("utf-8", "replace") + b"\n")
                except OSError:
                    pass

        def output(fd: int, data: bytes) -> None:
            for text in splitters.get(fd, splitters[1]).feed(data):
                line(text, "error" if fd == 2 else "info")

        try:
            argv = self._write(i, script)
            env = self._env(script)
        except OSError as err:
            result = ScriptResult(script, Exit(None, error=str(err)), ())
            self._report_failure(result)
            return result
        proc = GroupProcess(self.reactor, output, timeout=script.timeout_seconds,
                            kill_grace=self.kill_grace, pipe_grace=self.pipe_grace)
        self.running[i] = proc
        try:
            exit_ = await proc.start(argv, env, self.cwd())
        finally:
            self.running.pop(i, None)
            for fd, splitter in splitters.items():
                for text in splitter.flush():
                    line(text, "error" if fd == 2 else "info")
        if exit_.pipes_open:
            line(f"WARNING: the script exited, but something it started still held its output open after "
                 f"{self.pipe_grace:g}s; the agent stopped reading it. Redirect a background process's "
                 "output (e.g. > /tmp/app.log 2>&1) or give it a coder_script of its own.", "warn")
            if log_file is not None:
                log_file.close()
        result = ScriptResult(script, exit_, tuple(tail))
        if not exit_.ok and not exit_.killed:
            self._report_failure(result)
        return result

    def _env(self, script: Script) -> dict[str, str]:
        # As Coder's agent: a data directory per script, and a bin directory scripts may fill.
        env = self.env()
        data = os.path.join(self.script_dir, "data", script.log_source_id or "default")
        bin_dir = os.path.join(self.script_dir, "bin")
        for path in (data, bin_dir):
            os.makedirs(path, mode=0o700, exist_ok=True)
        env["CODER_SCRIPT_DATA_DIR"] = data
        env["CODER_SCRIPT_BIN_DIR"] = bin_dir
        return env

    def _write(self, i: int, script: Script) -> list[str]:
        os.makedirs(self.script_dir, mode=0o700, exist_ok=True)
        name = (script.log_source_id or f"script-{i}").replace("/", "_")
        path = os.path.join(self.script_dir, f"{name}.sh")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(script.script)
        os.chmod(path, 0o700)
        return [path] if script.script.startswith("#!") else ["/bin/sh", path]

    def _report_failure(self, result: ScriptResult) -> None:
        script, exit_ = result.script, result.exit
        if exit_.timed_out:
            how = f"timed out after {script.timeout_seconds:g}s"
        else:
            how = exit_.describe()
        message = f'"{script.display_name}" script {how}'
        log.warn("{message}", message=message)
        self._agent_log(message, "error")
        if result.tail:
            self._agent_log(f"last {len(result.tail)} lines of its output:", "error")
            for text in result.tail:
                self._agent_log("  " + text, "error")

    def _agent_log(self, text: str, level: str = "info") -> None:
        self.logs.add(self.agent_source_id, text, level)


def _open_log(path: str) -> Any:
    if not path:
        return None
    try:
        path = os.path.expanduser(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        return open(path, "ab", buffering=0)
    except OSError as err:
        log.warn("cannot append to script log {path}: {why}", path=path, why=str(err))
        return None
