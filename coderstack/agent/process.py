"""A workspace process in its own session and process group, with a timeout (Twisted adapter).

- The child calls ``setsid`` before it execs (through ``setsid(1)``, or the agent's interpreter
  when that is missing), so its pid is its process group: a timeout or :meth:`kill` signals the
  whole group, daemons it forked included — SIGTERM, then SIGKILL ``kill_grace`` seconds later.
- Finished means the child exited. A daemon it forked may keep stdout/stderr open forever, so
  after the exit the pipes get ``pipe_grace`` seconds (10 by default, as Coder's agent) to reach
  EOF and are then closed; the process counts as done then, with ``pipes_open`` set (Coder's
  agent counts that as a failure too), whatever is still holding the other end.
- Output reaches ``on_output(fd, data)`` as it arrives; stdin is closed at once.
- Nothing here blocks: spawning and signals go through the reactor's ``spawnProcess``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import error, protocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderstack.twistedtypes import process_transport

log = Logger()

SETSID = shutil.which("setsid")
_SETSID_PY = "import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])"


def in_new_session(argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed so that it runs in a new session (and process group)."""
    if SETSID is not None:
        return [SETSID, *argv]
    return [sys.executable, "-c", _SETSID_PY, *argv]


@dataclass(frozen=True)
class Exit:
    """How a process ended: ``code`` (None when a signal ended it), ``signal``, and whether the
    agent killed it for its timeout (``timed_out``) or on request (``killed``)."""

    code: int | None
    signal: int | None = None
    timed_out: bool = False
    killed: bool = False
    error: str = ""  # the process could not be started at all
    pipes_open: bool = False  # it exited but something it started still held stdout/stderr

    @property
    def ok(self) -> bool:
        return (self.code == 0 and not self.timed_out and not self.killed and not self.error
                and not self.pipes_open)

    def describe(self) -> str:
        if self.error:
            return f"could not start: {self.error}"
        if self.timed_out:
            return "timed out"
        if self.pipes_open and self.code == 0:
            return "exited, but its output pipes were still open"
        if self.code is not None:
            return f"exit status {self.code}"
        return f"killed by signal {self.signal}"


class GroupProcess(protocol.ProcessProtocol):
    """Spawn with :meth:`start`; ``done`` fires with an :class:`Exit` (never errbacks)."""

    def __init__(self, reactor: Any, on_output: Callable[[int, bytes], None] | None = None,
                 timeout: float = 0, kill_grace: float = 3.0, pipe_grace: float = 10.0) -> None:
        self.reactor = reactor
        self.on_output = on_output
        self.timeout = timeout
        self.kill_grace = kill_grace
        self.pipe_grace = pipe_grace
        self.done: Deferred[Exit] = Deferred()
        self.pid: int | None = None
        self._exit: Exit | None = None
        self._timed_out = False
        self._killed = False
        self._timers: list[Any] = []

    def start(self, argv: Sequence[str], env: dict[str, str], cwd: str) -> Deferred[Exit]:
        full = in_new_session(argv)
        try:
            self.reactor.spawnProcess(self, full[0], full, env=env, path=cwd,
                                      childFDs={0: "w", 1: "r", 2: "r"})
        except (OSError, error.ProcessExitedAlready) as err:
            self._finish(Exit(None, error=str(err)))
        return self.done

    # -- control -----------------------------------------------------------------------------

    def kill(self) -> None:
        """End the whole process group now (SIGTERM, then SIGKILL after ``kill_grace``)."""
        if self._exit is None:
            self._killed = True
            self._signal_group()

    def _on_timeout(self) -> None:
        if self._exit is None:
            self._timed_out = True
            self._signal_group()

    def _signal_group(self) -> None:
        self._kill_group(signal.SIGTERM)
        self._timers.append(self.reactor.callLater(self.kill_grace, self._kill_group, signal.SIGKILL))

    def _kill_group(self, sig: int) -> None:
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # -- ProcessProtocol ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = process_transport(self)
        self.pid = transport.pid
        transport.closeStdin()
        if self.timeout and self.timeout > 0:
            self._timers.append(self.reactor.callLater(self.timeout, self._on_timeout))

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if self.on_output is not None:
            self.on_output(childFD, data)

    def processExited(self, reason: Failure) -> None:
        value = reason.value
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        self._exit = Exit(code, sig, self._timed_out, self._killed)
        # A daemon the script started may hold our pipes: give them a moment, then let go.
        self._timers.append(self.reactor.callLater(self.pipe_grace, self._close_pipes))
        # The group may live on (a daemon); after a timeout or kill it must go too.
        if self._timed_out or self._killed:
            self._kill_group(signal.SIGKILL)

    def _close_pipes(self) -> None:
        if self.done.called:
            return
        if self._exit is not None:
            self._exit = dataclasses.replace(self._exit, pipes_open=True)
        transport = process_transport(self)
        for fd in (1, 2):
            try:
                transport.closeChildFD(fd)
            except Exception:  # already closed
                pass
        if self._exit is not None:
            self._finish(self._exit)

    def processEnded(self, reason: Failure) -> None:
        if self._exit is None:
            value = reason.value
            self._exit = Exit(getattr(value, "exitCode", None), getattr(value, "signal", None),
                              self._timed_out, self._killed)
        self._finish(self._exit)

    def _finish(self, result: Exit) -> None:
        if self.done.called:
            return
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []
        self.done.callback(result)
