"""Reconnecting PTYs (Coder's web terminal) served on the agent's tunnel port 2.

The wire format is in ``coderstack/wire/rpty.py``. Here the sessions live:

- A session is keyed by the init frame's ID. A new ID starts its command (``$SHELL -c
  command``, or the user's login shell when the command is empty) in a fresh PTY, with the
  environment and start directory SSH sessions get (``session_env.py``), ``TERM=xterm-256color``
  and the init frame's size (24x80 when it says 0).
- The same ID attaches to the running process: the new connection first gets the scrollback
  (the last :data:`SCROLLBACK` bytes of output, 256 KiB), then live output. Any number of
  connections may be attached; each gets all output and may type and resize. A size in the
  init frame of a reattach resizes the terminal too.
- A session with no connection left ends after :data:`IDLE_TIMEOUT` (5 minutes) unless one
  attaches; so does every session when the agent stops (:meth:`ReconnectingPTYServer.close`).
  Ending closes the PTY and sends SIGHUP to the process group, and SIGKILL :data:`KILL_GRACE`
  seconds later if the process is still there.
- When the process exits its remaining output goes to every connection, which is then closed,
  and the ID is forgotten (the next connection with it starts a new process). A child that
  ignores the hangup and keeps the PTY open gets :data:`EXIT_GRACE` seconds before the agent
  closes the PTY under it.
- At most :data:`MAX_SESSIONS` (32) sessions at once: a connection for a new ID beyond that is
  told so in its terminal and closed. A bad init frame or a malformed request closes the
  connection (counted in ``bad_inits`` and ``malformed`` of :class:`ReconnectingPTYServer`).
- A slow connection pauses reading the PTY (its transport's push-producer signal), so a
  process that prints fast cannot fill the agent's memory; detached sessions keep reading
  into the bounded scrollback.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import pwd
import signal
import struct
import termios
from collections.abc import Callable
from typing import Any, cast
from uuid import UUID

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from coderstack.agent.session_env import SessionEnvironment
from coderstack.agent.ssh import SessionReactor, session_base_env
from coderstack.twistedtypes import Clock, DelayedCall, cancel, stream_transport
from coderstack.wire.rpty import Init, Request, RPTYProtocolError, StreamDecoder

log = Logger()

SCROLLBACK = 256 * 1024
IDLE_TIMEOUT = 300.0
MAX_SESSIONS = 32
KILL_GRACE = 5.0
# After the process exited, how long something it left behind may hold the PTY open before
# the agent closes it (the session is over either way): a PTY's session leader exiting sends
# SIGHUP to its foreground group, but a child that ignores it keeps the PTY open.
EXIT_GRACE = 1.0
DEFAULT_SIZE = (24, 80)
TERM = "xterm-256color"


class Scrollback:
    """The last ``limit`` bytes of output. Trimming never leaves a partial UTF-8 character at
    the front (a replay then starts on a whole character)."""

    def __init__(self, limit: int = SCROLLBACK) -> None:
        self.limit = limit
        self._buf = bytearray()

    def append(self, data: bytes) -> None:
        self._buf += data
        excess = len(self._buf) - self.limit
        if excess > 0:
            # Skip continuation bytes (10xxxxxx) after the cut, at most 3 of them.
            end = min(excess + 3, len(self._buf))
            while excess < end and self._buf[excess] & 0xC0 == 0x80:
                excess += 1
            del self._buf[:excess]

    def __bytes__(self) -> bytes:
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)


def set_size(fd: int, height: int, width: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("4H", height, width, 0, 0))


class _PTYProcess(protocol.ProcessProtocol):
    def __init__(self, session: PTYSession) -> None:
        self.session = session

    def connectionMade(self) -> None:
        # Before spawnProcess returns, and before a child that is already gone is reaped (which
        # clears the transport's pid and may call processExited at once).
        self.session.process = self.transport
        self.session.pid = getattr(self.transport, "pid", None)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.session.output(data)

    def processExited(self, reason: Failure) -> None:
        self.session.exited()

    def processEnded(self, reason: Failure) -> None:
        self.session.ended()


class PTYSession:
    """One process in a PTY and the connections attached to it."""

    def __init__(self, server: ReconnectingPTYServer, session_id: UUID) -> None:
        self.server = server
        self.id = session_id
        self.scrollback = Scrollback(server.scrollback)
        self.connections: list[ReconnectingPTYProtocol] = []
        self.paused: set[ReconnectingPTYProtocol] = set()
        self.process: Any = None
        self.pid: int | None = None
        self.size = DEFAULT_SIZE
        self._waiting: list[defer.Deferred[None]] = []
        self.is_exited = False
        self.is_ended = False
        self._idle: DelayedCall | None = None
        self._kill: DelayedCall | None = None
        self._exit_grace: DelayedCall | None = None
        self._reading = True

    # -- the process --------------------------------------------------------------------------

    def spawn(self, command: str, size: tuple[int, int]) -> None:
        self.size = size
        user = self.server.user()
        shell = user["shell"]
        argv = [shell, "-c", command] if command else ["-" + os.path.basename(shell)]
        env = self.server.environment()
        env.update(USER=user["name"], LOGNAME=user["name"], HOME=user["home"], SHELL=shell, TERM=TERM)
        # The PTY is made here so it has its size before the child can ask for it.
        master, slave = pty.openpty()
        try:
            set_size(master, *size)
            self.server.reactor.spawnProcess(
                _PTYProcess(self), shell, argv, env, self.server.directory(),
                usePTY=(master, slave, os.ttyname(slave)))
        except BaseException:
            for fd in (master, slave):
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise

    def output(self, data: bytes) -> None:
        self.scrollback.append(data)
        for conn in list(self.connections):
            conn.send(data)

    def write(self, data: bytes) -> None:
        if self.process is not None and not self.is_exited:
            self.process.write(data)

    def resize(self, height: int, width: int) -> None:
        if self.process is None or self.is_ended:
            return
        self.size = (height, width)
        try:
            # On the master, so the child's foreground group gets SIGWINCH.
            set_size(self.process.fileno(), height, width)
        except OSError as err:
            if err.errno not in (errno.EBADF, errno.EIO, errno.ENOTTY):
                raise

    def exited(self) -> None:
        self.is_exited = True
        # Normally the PTY reaches EOF at once; a background child holding it open must not
        # keep the session (and its connections) around.
        if not self.is_ended:
            self._exit_grace = self.server.clock.callLater(EXIT_GRACE, self._close_pty)

    def _close_pty(self) -> None:
        self._exit_grace = None
        if self.process is not None and not self.is_ended:
            self.process.loseConnection()

    def ended(self) -> None:
        log.info("reconnecting PTY {id} ended (pid {pid})", id=self.id, pid=self.pid)
        self.is_ended = True
        self.is_exited = True
        for call in (self._idle, self._kill, self._exit_grace):
            cancel(call)
        self._idle = self._kill = self._exit_grace = None
        self.server.forget(self)
        for conn in list(self.connections):
            conn.close()
        self.connections.clear()
        self.paused.clear()
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def when_ended(self) -> defer.Deferred[None]:
        """Fires once the process is gone and every connection closed."""
        if self.is_ended:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    def end(self) -> defer.Deferred[None]:
        """Hang up the process group (SIGKILL after :data:`KILL_GRACE`); fires once it is gone."""
        if self.is_ended:
            return defer.succeed(None)
        cancel(self._idle)
        self._idle = None
        self._signal(signal.SIGHUP)
        if self.process is not None:
            self.process.loseConnection()  # the master's close hangs the terminal up too
        if self._kill is None:
            self._kill = self.server.clock.callLater(KILL_GRACE, self._signal, signal.SIGKILL)
        return self.when_ended()

    def _signal(self, sig: int) -> None:
        if self.pid is None or self.is_ended:
            return
        try:
            os.killpg(self.pid, sig)  # the PTY child leads its own session and group
        except ProcessLookupError:
            pass
        except PermissionError:
            log.warn("cannot signal reconnecting PTY {id}", id=self.id)

    # -- connections --------------------------------------------------------------------------

    def attach(self, conn: ReconnectingPTYProtocol, init: Init) -> None:
        cancel(self._idle)
        self._idle = None
        # First: a large replay may fill the transport, which then pauses this session.
        conn.session = self
        replay = bytes(self.scrollback)
        if replay:
            conn.send(replay)
        self.connections.append(conn)
        if init.height and init.width and (init.height, init.width) != self.size:
            self.resize(init.height, init.width)

    def detach(self, conn: ReconnectingPTYProtocol) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
        self.connection_resumed(conn)
        if not self.connections and not self.is_ended and self._idle is None:
            self._idle = self.server.clock.callLater(self.server.idle_timeout, self._idle_out)

    def _idle_out(self) -> None:
        self._idle = None
        log.info("reconnecting PTY {id} ended: no connection for {secs:g} s", id=self.id,
                 secs=self.server.idle_timeout)
        self.end()

    def connection_paused(self, conn: ReconnectingPTYProtocol) -> None:
        self.paused.add(conn)
        if self._reading and self.process is not None and not self.is_ended:
            self._reading = False
            self.process.pauseProducing()

    def connection_resumed(self, conn: ReconnectingPTYProtocol) -> None:
        self.paused.discard(conn)
        if not self.paused and not self._reading and self.process is not None and not self.is_ended:
            self._reading = True
            self.process.resumeProducing()


@implementer(IPushProducer)
class ReconnectingPTYProtocol(protocol.Protocol):
    """One connection on port 2: the init frame, then requests in and output out."""

    def __init__(self, server: ReconnectingPTYServer) -> None:
        self.server = server
        self.decoder = StreamDecoder()
        self.session: PTYSession | None = None
        self.closed = False

    def connectionMade(self) -> None:
        stream_transport(self).registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.decoder.feed(data)
        except RPTYProtocolError as err:
            if self.decoder.init is None:
                self.server.bad_inits += 1
            else:
                self.server.malformed += 1
            # The text says what was wrong, never what was sent (a command may hold secrets).
            log.info("reconnecting PTY connection closed: {why}", why=str(err))
            self.close()
            return
        for event in events:
            if self.closed:
                return
            if isinstance(event, Init):
                self.session = self.server.attach(self, event)
            elif self.session is not None:
                self._request(self.session, event)

    def _request(self, session: PTYSession, request: Request) -> None:
        if request.data:
            session.write(request.data.encode("utf-8"))
        if request.size is not None:
            session.resize(*request.size)

    def send(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            stream_transport(self).write(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._detach()
        if self.transport is not None:
            transport = stream_transport(self)
            transport.unregisterProducer()
            transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        self._detach()

    def _detach(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.detach(self)

    # IPushProducer: the transport says when it is full.
    def pauseProducing(self) -> None:
        if self.session is not None:
            self.session.connection_paused(self)

    def resumeProducing(self) -> None:
        if self.session is not None:
            self.session.connection_resumed(self)

    def stopProducing(self) -> None:
        pass


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class ReconnectingPTYServer(protocol.Factory):
    """The sessions and the factory of port-2 connections.

    ``clock`` runs the idle, exit and kill timers (the reactor unless given); processes are
    spawned by ``reactor``. ``env`` is the base environment (the agent's own, secrets removed);
    ``session_env`` adds the workspace's, as for SSH.
    """

    def __init__(self, reactor: SessionReactor | None = None, session_env: SessionEnvironment | None = None,
                 env: dict[str, str] | None = None, clock: Clock | None = None,
                 idle_timeout: float = IDLE_TIMEOUT, scrollback: int = SCROLLBACK,
                 max_sessions: int = MAX_SESSIONS, shell: str | None = None) -> None:
        self.reactor: SessionReactor = reactor if reactor is not None else cast(SessionReactor, _reactor())
        self.clock: Clock = clock if clock is not None else cast(Clock, self.reactor)
        self.session_env = session_env
        self.base_env = session_base_env(os.environ if env is None else env)
        self.idle_timeout = idle_timeout
        self.scrollback = scrollback
        self.max_sessions = max_sessions
        self.shell = shell
        self.sessions: dict[UUID, PTYSession] = {}
        self.bad_inits = 0
        self.malformed = 0
        self.refused = 0
        self.stopping = False
        self.on_session: Callable[[PTYSession], object] | None = None

    def buildProtocol(self, addr: Any) -> ReconnectingPTYProtocol:
        p = ReconnectingPTYProtocol(self)
        p.factory = self
        return p

    # -- what processes get ---------------------------------------------------------------------

    def user(self) -> dict[str, str]:
        entry = pwd.getpwuid(os.getuid())
        home = entry.pw_dir if os.path.isdir(entry.pw_dir) else "/"
        shell = self.shell or (entry.pw_shell if os.path.exists(entry.pw_shell or "") else "/bin/sh")
        return {"name": entry.pw_name, "home": home, "shell": shell}

    def environment(self) -> dict[str, str]:
        if self.session_env is None:
            return dict(self.base_env)
        return self.session_env.environment(self.base_env)

    def directory(self) -> str:
        home = self.user()["home"]
        return home if self.session_env is None else self.session_env.directory(home)

    # -- sessions ---------------------------------------------------------------------------------

    def attach(self, conn: ReconnectingPTYProtocol, init: Init) -> PTYSession | None:
        """Attach ``conn`` to the session ``init.id``, starting it if it is new; None (and
        ``conn`` closed) when that is refused."""
        session = self.sessions.get(init.id)
        if session is None:
            if self.stopping or len(self.sessions) >= self.max_sessions:
                self.refused += 1
                why = ("the agent is stopping" if self.stopping
                       else f"too many reconnecting PTY sessions (at most {self.max_sessions})")
                log.warn("reconnecting PTY {id} refused: {why}", id=init.id, why=why)
                conn.send(f"\r\nerror: {why}\r\n".encode())
                conn.close()
                return None
            session = PTYSession(self, init.id)
            try:
                session.spawn(init.command, (init.height or DEFAULT_SIZE[0], init.width or DEFAULT_SIZE[1]))
            except Exception as err:
                log.failure("reconnecting PTY {id} could not start", id=init.id)
                conn.send(f"\r\nerror: cannot start the terminal: {err}\r\n".encode())
                conn.close()
                return None
            self.sessions[init.id] = session
            log.info("reconnecting PTY {id} started (pid {pid})", id=init.id, pid=session.pid)
            if self.on_session is not None:
                self.on_session(session)
        session.attach(conn, init)
        return session

    def forget(self, session: PTYSession) -> None:
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]

    def close(self) -> defer.Deferred[None]:
        """End every session (the agent stops); fires when their processes are gone."""
        self.stopping = True
        ds = [session.end() for session in list(self.sessions.values())]
        return defer.gatherResults(ds).addCallback(lambda _: None)


__all__ = ["ReconnectingPTYServer", "PTYSession", "Scrollback", "SCROLLBACK", "IDLE_TIMEOUT", "MAX_SESSIONS"]
