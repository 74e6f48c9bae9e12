"""The manifest's ``metadata`` items: run each script every ``interval`` s, report its output.

- A script runs through ``/bin/sh -c`` in the workspace environment and directory, in its own
  process group, and is killed (the group) past ``timeout`` seconds (0: the interval).
- stdout and stderr together make the value, read up to :data:`MAX_VALUE` bytes: a script that
  prints more is killed and the rest never read (nothing is buffered whole). The value is
  stripped of surrounding whitespace.
- A script that exits non-zero, times out or cannot start reports ``error`` (e.g. ``exit status
  1``, ``timed out after 1s``) along with whatever it printed.
- Results are posted (``POST metadata``, see :mod:`coderstack.agent.reports`) in a batch shortly
  after they arrive; while the server is unreachable the newest result per key waits and is
  retried with the agent's backoff. A run still going when the next is due is not doubled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from coderstack.agent.process import GroupProcess
from coderstack.agent.reports import (
    OneSender,
    ServerReports,
    refused_for_good,
    report_backoff,
    rfc3339,
)
from coderstack.sdk import SDKError

log = Logger()

MAX_VALUE = 10 * 1024
REPORT_DELAY = 0.5


@dataclass(frozen=True)
class MetadataItem:
    key: str
    script: str
    interval: float
    timeout: float

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MetadataItem:
        interval = max(1.0, _seconds(d.get("interval")))
        timeout = max(0.0, _seconds(d.get("timeout"))) or interval
        return cls(str(d.get("key") or ""), str(d.get("script") or ""), interval, timeout)


def _seconds(value: Any) -> float:
    seconds = float(value or 0)
    if not math.isfinite(seconds):
        raise ValueError(f"not a number of seconds: {value!r}")
    return min(seconds, 86400.0)


def _truncate(text: str) -> str:
    data = text.encode("utf-8", "replace")
    return text if len(data) <= MAX_VALUE else data[:MAX_VALUE].decode("utf-8", "ignore")


class MetadataCollector:
    def __init__(self, reactor: Any, items: list[MetadataItem], reports: ServerReports,
                 env: Callable[[], dict[str, str]], cwd: Callable[[], str],
                 backoff_cap: float = 10.0, kill_grace: float = 1.0, pipe_grace: float = 0.5) -> None:
        self.reactor = reactor
        self.items = [i for i in items if i.key]
        self.reports = reports
        self.env = env
        self.cwd = cwd
        self.backoff = report_backoff(backoff_cap)
        self.kill_grace = kill_grace
        self.pipe_grace = pipe_grace
        self.pending: dict[str, dict[str, str]] = {}
        self.running: dict[str, GroupProcess] = {}
        self._loops: list[task.LoopingCall] = []
        self._timer: Any = None
        self._sender = OneSender(self._send)
        self._stopped = False

    def start(self) -> None:
        for item in self.items:
            loop = task.LoopingCall(self._tick, item)
            loop.clock = self.reactor
            loop.start(item.interval, now=True).addErrback(lambda f: log.failure("metadata loop", f))
            self._loops.append(loop)

    def stop(self) -> Deferred[Any]:
        """Stop collecting; fires once the scripts still running are gone."""
        self._stopped = True
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        for proc in list(self.running.values()):
            proc.kill()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._sender.cancel()
        return gatherResults([proc.done for proc in self.running.values()])

    def _tick(self, item: MetadataItem) -> None:
        if item.key in self.running or self._stopped:
            return
        d = Deferred.fromCoroutine(self.collect(item))
        d.addCallback(self._collected, item)
        d.addErrback(lambda f: log.failure("metadata {key}", f, key=item.key))

    async def collect(self, item: MetadataItem) -> dict[str, str]:
        """Run ``item``'s script once; its result as the server takes it."""
        buf = bytearray()
        too_long = False

        def output(fd: int, data: bytes) -> None:
            nonlocal too_long
            if too_long:
                return
            room = MAX_VALUE - len(buf)
            buf.extend(data[:room])
            if len(data) > room:
                too_long = True
                proc.kill()  # the rest is never read

        proc = GroupProcess(self.reactor, output, timeout=item.timeout, kill_grace=self.kill_grace,
                            pipe_grace=self.pipe_grace)
        self.running[item.key] = proc
        try:
            exit_ = await proc.start(["/bin/sh", "-c", item.script], self.env(), self.cwd())
        finally:
            self.running.pop(item.key, None)
        value = _truncate(buf.decode("utf-8", "replace").strip())
        error = ""
        if exit_.timed_out:
            error = f"timed out after {item.timeout:g}s"
        elif not too_long and not exit_.ok:
            error = exit_.describe()
        return {"key": item.key, "value": value, "error": _truncate(error),
                "collected_at": rfc3339(self.reactor.seconds())}

    def _collected(self, result: dict[str, str], item: MetadataItem) -> None:
        if self._stopped:
            return
        self.pending[item.key] = result
        if self._timer is None and not self._sender.running:
            self._timer = self.reactor.callLater(REPORT_DELAY, self._send_soon)

    def _send_soon(self) -> None:
        self._timer = None
        self._sender.start()

    async def _send(self) -> None:
        while self.pending and not self._stopped:
            batch, self.pending = list(self.pending.values()), {}
            try:
                await self.reports.metadata(batch)
                self.backoff.reset()
            except SDKError as err:
                if refused_for_good(err):
                    log.warn("server refused metadata: {why}", why=str(err))
                    continue
                for r in batch:  # keep the newest per key
                    self.pending.setdefault(r["key"], r)
                await task.deferLater(self.reactor, self.backoff.next_delay(), lambda: None)
