"""Agent logs: script output and the agent's own messages, streamed to the server in batches.

Wire format (``PATCH /api/v2/workspaceagents/me/logs``, see :mod:`coderstack.agent.reports`)::

    {"log_source_id": "<uuid>", "logs": [{"created_at": "<RFC 3339>", "output": "line",
                                          "level": "info"}]}

- Output is cut into lines (``\\n``; a trailing ``\\r`` dropped); a line longer than
  :data:`MAX_LINE` bytes keeps its first :data:`MAX_LINE` bytes and the rest up to the newline is
  dropped. Bytes that are not UTF-8 become U+FFFD.
- Lines wait at most :data:`FLUSH_INTERVAL` seconds, or go at once when a source has
  :data:`FLUSH_LINES` waiting; a request carries at most 1000 lines and 1 MiB of output.
- One request is in flight at a time, so each source's lines arrive in order. When the server is
  unreachable the lines wait (at most :data:`MAX_QUEUED` per source; older ones are dropped and
  counted) and the batch is retried with the agent's backoff.
- The first 413 means the agent's log allowance for this build is used up: the agent stops
  sending logs for good (this run) and drops what is queued.
- Sources the agent makes itself (:data:`AGENT_SOURCE_NAME` for its own messages) are registered
  with ``POST log-source`` before their first lines; the manifest's script sources already exist.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from coderstack.agent.reports import (
    OneSender,
    ServerReports,
    refused_for_good,
    report_backoff,
    rfc3339,
)
from coderstack.sdk import SDKError
from coderstack.twistedtypes import Clock, sleep

log = Logger()

MAX_LINE = 64 * 1024
FLUSH_INTERVAL = 0.25
FLUSH_LINES = 100
MAX_BATCH_LINES = 1000
MAX_BATCH_BYTES = 1 << 20
MAX_QUEUED = 10000
AGENT_SOURCE_NAME = "Agent"
LEVELS = ("trace", "debug", "info", "warn", "error")


def agent_source_id(agent_id: str) -> str:
    """The stable id of the agent's own log source for one agent."""
    return str(uuid.uuid5(uuid.UUID(agent_id), "coderstack agent log source"))


class LineSplitter:
    """Bytes in, complete lines out, each at most ``max_line`` bytes (sans-IO)."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._partial = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[str]:
        lines: list[str] = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            chunk = data[start:] if nl < 0 else data[start:nl]
            if not self._discarding:
                room = self.max_line - len(self._partial)
                self._partial += chunk[:room]
                if len(chunk) > room:
                    self._discarding = True
            if nl < 0:
                break
            lines.append(self._take())
            start = nl + 1
        return lines

    def flush(self) -> list[str]:
        """The unterminated last line, if any (at the end of the output)."""
        if not self._partial and not self._discarding:
            return []
        return [self._take()]

    def _take(self) -> str:
        line = bytes(self._partial)
        self._partial.clear()
        self._discarding = False
        if line.endswith(b"\r"):
            line = line[:-1]
        return line.decode("utf-8", "replace")


@dataclass
class _Source:
    source_id: str
    display_name: str | None  # set: register it with POST log-source first
    queue: deque[dict[str, str]]
    dropped: int = 0


class AgentLogs:
    """The agent's log sender (one per agent run)."""

    def __init__(self, clock: Clock, reports: ServerReports,
                 send: Callable[[str, list[dict[str, str]]], Awaitable[None]] | None = None,
                 backoff_cap: float = 10.0) -> None:
        self.clock = clock
        self.reports = reports
        self.send = send or reports.logs
        self.backoff = report_backoff(backoff_cap)
        self.sources: dict[str, _Source] = {}
        self.overflowed = False
        self.sent_lines = 0
        self._timer: Any = None
        self._sender = OneSender(self._send_all, after=self._sent)
        self._idle: list[Deferred[None]] = []
        self._stopped = False

    def register(self, source_id: str, display_name: str) -> None:
        """A source of the agent's own; it is created on the server before its first lines."""
        src = self._source(source_id)
        src.display_name = display_name

    def add(self, source_id: str, output: str, level: str = "info", at: float | None = None) -> None:
        if self.overflowed or self._stopped:
            return
        src = self._source(source_id)
        if len(output.encode("utf-8", "replace")) > MAX_LINE:
            output = output.encode("utf-8", "replace")[:MAX_LINE].decode("utf-8", "ignore")
        if len(src.queue) >= MAX_QUEUED:
            src.queue.popleft()
            src.dropped += 1
        when = self.clock.seconds() if at is None else at
        src.queue.append({"created_at": rfc3339(when), "output": output,
                          "level": level if level in LEVELS else "info"})
        if len(src.queue) >= FLUSH_LINES:
            self._start_sending()
        elif self._timer is None and not self._sender.running:
            self._timer = self.clock.callLater(FLUSH_INTERVAL, self._on_timer)

    def flushed(self) -> Deferred[None]:
        """Fires when nothing is queued any more (sent, or dropped after an overflow)."""
        if not self._pending():
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        self._start_sending()
        return d

    def stop(self) -> None:
        """Stop sending (queued lines are dropped)."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._sender.cancel()
        self._release()

    # -- sending ----------------------------------------------------------------------------

    def _source(self, source_id: str) -> _Source:
        src = self.sources.get(source_id)
        if src is None:
            src = self.sources[source_id] = _Source(source_id, None, deque())
        return src

    def _pending(self) -> bool:
        return not self.overflowed and not self._stopped and any(s.queue for s in self.sources.values())

    def _on_timer(self) -> None:
        self._timer = None
        self._start_sending()

    def _start_sending(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._stopped:
            self._sender.start()

    async def _send_all(self) -> None:
        self.backoff.reset()
        while self._pending():
            src = next(s for s in self.sources.values() if s.queue)
            batch = _batch(src.queue)
            try:
                if src.display_name is not None:
                    await self.reports.log_source(src.source_id, src.display_name)
                    src.display_name = None
                await self.send(src.source_id, batch)
            except SDKError as err:
                if err.status == 413:
                    self.overflowed = True
                    for s in self.sources.values():
                        s.queue.clear()
                    log.warn("the server's log limit for this agent is reached; no more logs are sent")
                    break
                if refused_for_good(err):
                    log.warn("server refused {n} log lines: {why}", n=len(batch), why=str(err))
                    _drop(src.queue, len(batch))
                    continue
                await sleep(self.clock, self.backoff.next_delay())
                continue
            self.backoff.reset()
            _drop(src.queue, len(batch))
            self.sent_lines += len(batch)

    def _sent(self) -> None:
        self._release()
        # Lines that arrived during the last request wait for the next timer.
        if self._pending() and self._timer is None:
            self._timer = self.clock.callLater(FLUSH_INTERVAL, self._on_timer)

    def _release(self) -> None:
        if self._pending() and not self._stopped:
            return
        waiters, self._idle = self._idle, []
        for d in waiters:
            d.callback(None)


def _batch(queue: deque[dict[str, str]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    size = 0
    for entry in queue:
        n = len(entry["output"].encode("utf-8", "replace"))
        if out and (len(out) >= MAX_BATCH_LINES or size + n > MAX_BATCH_BYTES):
            break
        out.append(entry)
        size += n
    return out


def _drop(queue: deque[dict[str, str]], n: int) -> None:
    for _ in range(min(n, len(queue))):
        queue.popleft()
