"""The warm CLI: ``coderstack ssh --stdio`` through a per-user tunnel daemon, without Twisted.

Every ``ssh coder.WS`` runs config-ssh's ProxyCommand, ``coderstack ssh --stdio WS``; dialing the
tunnel in that process costs a Twisted start, coordination, a WireGuard handshake and disco each
time. Instead the ProxyCommand asks a background daemon (``coderstack tunnel-daemon``,
:mod:`coderstack.cli.tunneld`) that keeps the tunnels to recently used workspaces open, and the
ProxyCommand itself only copies bytes between stdin/stdout and a unix socket. This module is that
client (the entry point, :mod:`coderstack.cli.entry`, calls it before the full CLI); it imports
nothing but the standard library, so the warm path costs an interpreter start.

Where things live
-----------------
One daemon per config dir *and* identity: the key is a hash of the config dir, the server URL,
the session token and ``--disable-direct-connections``, so a daemon holding another URL or
session is never asked. Its files are in a 0700 directory owned by the user,
``$XDG_RUNTIME_DIR/coderstack`` or else ``<config dir>/run``:

* ``tunnel-<key>.sock`` — the unix socket, mode 0600;
* ``tunnel-<key>.pid`` — the daemon's PID;
* ``tunnel-<key>.lock`` — held (``flock``) by the running daemon, so only one starts;

and its log is ``<config dir>/tunnel-daemon.log``. The daemon exits after
``CODERSTACK_TUNNEL_DAEMON_IDLE`` seconds (default 600) without a dial, an open stream or a
``HOLD``.
``CODERSTACK_TUNNEL_DAEMON=0`` turns all of this off; ``CODERSTACK_TUNNEL_DAEMON_DEBUG=1`` (or
``-v``) says on stderr why the daemon was not used.

The protocol
------------
One request line from the client (UTF-8, ``\\n``-terminated, fields separated by one space)::

    DIAL <fingerprint> <workspace> <port> <wait>     wait: yes, no or auto (as ssh --wait)
    STATUS <fingerprint>
    STREAM <fingerprint> <workspace> <port>          DIAL ... no, over the tunnel an OPEN holds
    HOLD <fingerprint>                               keep the daemon up while this is open

``fingerprint`` is the hex SHA-256 of the identity (URL, session, direct or not), never the token
itself: the daemon refuses a request whose fingerprint is not its own. Replies, one per line::

    MSG <text>      a line for the user's stderr (startup script logs while waiting); 0 or more
    OK              after DIAL or STREAM: from the next byte on the socket *is* the TCP stream to
                    <port> on the workspace; the client's shutdown(SHUT_WR) half-closes it, and
                    the workspace closing its side ends the socket
    FAIL <text>     the dial failed as an in-process one would (no such workspace, agent
                    offline, tunnel down): the client prints ``error: <text>`` and exits 1
    ERR <text>      refused (another uid, another identity, a bad request): the client falls
                    back to dialing in its own process
    {...}           after STATUS: one JSON line (pid, dials, tunnels made and reused, open
                    streams and holds, seconds since the last activity, ...)

``STREAM`` is for a client that has sent ``OPEN`` for the workspace (``port-forward``, one per
connection): it skips the workspace lookup a ``DIAL`` makes, using the tunnel that ``OPEN`` found;
when the daemon holds none for that name, or connecting over it fails, it is answered as
``DIAL <fingerprint> <workspace> <port> no`` (same replies, same ``FAIL`` texts).

After ``HOLD``'s ``OK`` the connection carries nothing more; while it is open the daemon counts
as active and does not exit idle, and the client closing it (or exiting) lets go. A long-running
client (``port-forward``, between its connections) holds the daemon this way; seeing the hold
end without having closed it tells that client the daemon is gone. (A daemon that predates
``HOLD`` answers ``ERR bad request``, and ``port-forward`` then dials in its own process.)

``OPEN``, ``PING`` and ``INFO`` (for ``ping`` and ``port-forward``, which run Twisted anyway) are
described in :mod:`coderstack.cli.daemonconn`.

Both ends check each other: the daemon compares the peer's ``SO_PEERCRED`` uid with its own
(and counts refusals), the client the directory's owner and mode and the daemon's uid.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING

# Only what the warm path itself needs is imported up front: it runs on every ``ssh coder.WS``.
if TYPE_CHECKING:
    import subprocess
    from typing import Any

PROTOCOL_ENV = "CODERSTACK_TUNNEL_DAEMON"
DEBUG_ENV = "CODERSTACK_TUNNEL_DAEMON_DEBUG"
IDLE_ENV = "CODERSTACK_TUNNEL_DAEMON_IDLE"
DEFAULT_IDLE = 600.0
#: How long a client waits for a daemon it started to listen (it imports Twisted first).
START_WAIT = 20.0
#: How long a client waits for any one reply line (a dial has its own, shorter timeout).
REPLY_WAIT = 300.0
BUFFER = 1 << 16
WAIT_CHOICES = ("yes", "no", "auto")
_FALSE = ("0", "false", "no", "off")
TRUE_VALUES = ("1", "true", "yes", "on")


class Unavailable(Exception):
    """The daemon cannot be used this time; dial in this process instead."""


class Failed(Exception):
    """The daemon dialed and the dial failed: report it, as an in-process dial would."""


# --- identity and paths ---------------------------------------------------------------------------


def default_config_dir(environ: dict[str, str]) -> str:
    """The same default as :func:`coderstack.cli.context.default_config_dir` (that module
    imports the SDK, so the fast path cannot)."""
    if environ.get("CODER_CONFIG_DIR"):
        return environ["CODER_CONFIG_DIR"]
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "coderstack")


def _read(config_dir: str, name: str) -> str | None:
    try:
        with open(os.path.join(config_dir, name)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def identity(config_dir: str, environ: dict[str, str]) -> tuple[str, str] | None:
    """The server URL and session token the CLI would use (as ``Context`` reads them), or None
    when not logged in (the in-process path then says so)."""
    url = environ.get("CODER_URL") or _read(config_dir, "url")
    token = environ.get("CODER_SESSION_TOKEN") or _read(config_dir, "session")
    if not url or not token:
        return None
    return url.rstrip("/"), token


def fingerprint(url: str, token: str, disable_direct: bool) -> str:
    material = "\0".join(["coderstack-tunnel-daemon/1", url, token, "relay" if disable_direct else "direct"])
    return hashlib.sha256(material.encode()).hexdigest()


class Paths:
    """Where one daemon's files are (see the module docstring)."""

    def __init__(self, config_dir: str, fingerprint: str, run_dir: str, socket: str, pid: str, lock: str,
                 log: str) -> None:
        self.config_dir, self.fingerprint, self.run_dir = config_dir, fingerprint, run_dir
        self.socket, self.pid, self.lock, self.log = socket, pid, lock, log


def paths_for(config_dir: str, fp: str, environ: dict[str, str]) -> Paths:
    config_dir = os.path.abspath(os.path.expanduser(config_dir))
    runtime = environ.get("XDG_RUNTIME_DIR")
    run_dir = os.path.join(runtime, "coderstack") if runtime else os.path.join(config_dir, "run")
    key = hashlib.sha256(f"{config_dir}\0{fp}".encode()).hexdigest()[:16]
    base = os.path.join(run_dir, f"tunnel-{key}")
    return Paths(config_dir, fp, run_dir, base + ".sock", base + ".pid", base + ".lock",
                 os.path.join(config_dir, "tunnel-daemon.log"))


def private_dir(path: str) -> None:
    """Make ``path`` (0700) or check it: it must be ours and closed to group and others."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise Unavailable(f"{path} belongs to uid {st.st_uid}")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def transport_peer_uid(transport: object) -> int:
    """:func:`peer_uid` of a Twisted unix transport's socket; -1 when it has none or the kernel
    will not say (never a match for a real uid)."""
    sock = getattr(transport, "socket", None)
    if sock is None:
        return -1
    try:
        return peer_uid(sock)
    except OSError:
        return -1


def workspace_name(host: str, prefix: str | None, suffix: str | None) -> str:
    """``coder.dev`` -> ``dev``; ``dev.coder`` with suffix ``coder`` -> ``dev``; else unchanged."""
    if prefix and host.startswith(prefix):
        return host[len(prefix):]
    if suffix:
        tail = "." + suffix.lstrip(".")
        if host.endswith(tail):
            return host[: -len(tail)]
    return host


# --- talking to the daemon --------------------------------------------------------------------------


def _connect(paths: Paths) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(paths.socket)
        if peer_uid(sock) != os.getuid():
            raise Unavailable("the daemon's socket belongs to another user")
    except BaseException:
        sock.close()
        raise
    return sock


def start_daemon(paths: Paths, environ: dict[str, str], disable_direct: bool) -> subprocess.Popen[bytes]:
    """``coderstack tunnel-daemon`` in a session of its own, its output appended to its log. It
    inherits this environment (``CODER_URL``/``CODER_SESSION_TOKEN`` stay out of ``ps``)."""
    import subprocess

    argv = [sys.executable, "-m", "coderstack", "--global-config", paths.config_dir]
    if disable_direct:
        argv.append("--disable-direct-connections")
    argv.append("tunnel-daemon")
    fd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(argv, env=environ, cwd="/", stdin=subprocess.DEVNULL, stdout=fd,
                                stderr=fd, start_new_session=True, close_fds=True)
    finally:
        os.close(fd)


def open_daemon(paths: Paths, environ: dict[str, str], disable_direct: bool, start: bool = True) -> socket.socket:
    """A connection to the running daemon, starting one if there is none (or only a stale
    socket of a dead one, which the new daemon replaces)."""
    private_dir(paths.run_dir)
    try:
        return _connect(paths)
    except (FileNotFoundError, ConnectionRefusedError) as err:
        if not start:
            raise Unavailable(f"no daemon ({err.strerror})") from None
    child = start_daemon(paths, environ, disable_direct)
    deadline = time.monotonic() + START_WAIT
    while True:
        try:
            return _connect(paths)
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        code = child.poll()
        # 0: another client's daemon won the lock; it will be listening in a moment.
        if (code is not None and code != 0) or time.monotonic() > deadline:
            raise Unavailable(f"the daemon did not start (see {paths.log})")
        time.sleep(0.01)


class _Lines:
    """Reply lines off a socket; whatever follows the last one read stays in ``rest``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.rest = sock, b""

    def line(self) -> str:
        while b"\n" not in self.rest:
            try:
                data = self.sock.recv(4096)
            except OSError as err:
                raise Unavailable(f"the daemon's reply: {err}") from None
            if not data:
                raise Unavailable("the daemon closed the connection before replying")
            self.rest += data
            if len(self.rest) > 1 << 16:
                raise Unavailable("the daemon's reply line is too long")
        line, self.rest = self.rest.split(b"\n", 1)
        return line.decode("utf-8", "replace")


def request(sock: socket.socket, line: str, stderr: Any) -> _Lines:
    """Send one request; read replies up to OK (MSG lines go to ``stderr``)."""
    sock.settimeout(REPLY_WAIT)
    try:
        sock.sendall(line.encode() + b"\n")
    except OSError as err:
        raise Unavailable(f"the daemon: {err}") from None
    lines = _Lines(sock)
    while True:
        reply = lines.line()
        kind, _, text = reply.partition(" ")
        if kind == "OK":
            sock.settimeout(None)
            return lines
        if kind == "MSG":
            stderr.write(text + "\n")
            stderr.flush()
        elif kind == "FAIL":
            raise Failed(text)
        elif kind == "ERR":
            raise Unavailable(f"the daemon refused: {text}")
        else:
            raise Unavailable(f"the daemon said {reply[:80]!r}")


def status(paths: Paths) -> dict[str, Any] | None:
    """The running daemon's counters (None when none answers)."""
    import json

    try:
        sock = _connect(paths)
    except (OSError, Unavailable):
        return None
    with sock:
        sock.settimeout(10)
        try:
            sock.sendall(f"STATUS {paths.fingerprint}\n".encode())
            line = _Lines(sock).line()
        except (OSError, Unavailable):
            return None
    try:
        answer = json.loads(line)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def pump(sock: socket.socket, early: bytes, stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    """Copy stdin -> socket and socket -> stdout until the workspace side closes. Stdin EOF
    half-closes the socket (so the remote sees EOF and can still answer).

    Non-blocking both ways, at most one buffer pending each way: a blocked write in one
    direction never stops the other from draining (an echo of a large upload would otherwise
    wedge with every buffer on the path full)."""
    sfd = sock.fileno()
    sock.setblocking(False)
    # Restored on the way out: a terminal's flags are shared with the shell that ran us.
    were = [(fd, os.get_blocking(fd)) for fd in (stdin_fd, stdout_fd)]
    for fd, _ in were:
        os.set_blocking(fd, False)
    try:
        return _copy(sock, sfd, bytearray(early), stdin_fd, stdout_fd)
    finally:
        for fd, blocking in were:
            with contextlib.suppress(OSError):
                os.set_blocking(fd, blocking)


def _copy(sock: socket.socket, sfd: int, to_stdout: bytearray, stdin_fd: int, stdout_fd: int) -> int:
    to_sock = bytearray()
    stdin_open = sock_open = True
    shut = False
    try:
        while sock_open or to_stdout:
            readers, writers = [], []
            if sock_open and len(to_stdout) < BUFFER:
                readers.append(sfd)
            if stdin_open and len(to_sock) < BUFFER:
                readers.append(stdin_fd)
            if to_stdout:
                writers.append(stdout_fd)
            if to_sock:
                writers.append(sfd)
            readable, writable, _ = select.select(readers, writers, [])
            if sfd in readable:
                with contextlib.suppress(BlockingIOError):
                    data = sock.recv(BUFFER)
                    if data:
                        to_stdout += data
                    else:
                        sock_open = False
            if stdin_fd in readable:
                with contextlib.suppress(BlockingIOError):
                    data = os.read(stdin_fd, BUFFER)
                    if data:
                        to_sock += data
                    else:
                        stdin_open = False
            if stdout_fd in writable:
                with contextlib.suppress(BlockingIOError):
                    del to_stdout[:os.write(stdout_fd, to_stdout)]
            if sfd in writable:
                with contextlib.suppress(BlockingIOError):
                    del to_sock[:sock.send(to_sock)]
            if not stdin_open and not to_sock and not shut and sock_open:
                shut = True
                sock.shutdown(socket.SHUT_WR)
        return 0
    except OSError as err:
        if err.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
            return 0  # either side went away: the session is over
        raise


# --- the fast ProxyCommand ------------------------------------------------------------------------


class StdioRequest:
    """What ``ssh --stdio`` was asked for."""

    def __init__(self, config_dir: str, disable_direct: bool, verbose: bool, host: str, prefix: str | None,
                 suffix: str | None, wait: str) -> None:
        self.config_dir, self.disable_direct, self.verbose, self.host = config_dir, disable_direct, verbose, host
        self.prefix, self.suffix, self.wait = prefix, suffix, wait


def parse_stdio(argv: list[str], environ: dict[str, str]) -> StdioRequest | None:
    """``[--global-config DIR] [--disable-direct-connections] [-v] ssh --stdio [--wait W]
    [--ssh-host-prefix P] [--hostname-suffix S] HOST`` (options in any order, as config-ssh and
    ``coderstack ssh`` write them); None for anything else, which the full CLI then parses."""
    config: str | None = None
    disable = verbose = False
    i = 0
    while i < len(argv) and argv[i] != "ssh":
        arg = argv[i]
        if arg == "--global-config" and i + 1 < len(argv):
            config, i = argv[i + 1], i + 1
        elif arg.startswith("--global-config="):
            config = arg.split("=", 1)[1]
        elif arg == "--disable-direct-connections":
            disable = True
        elif arg in ("-v", "--verbose"):
            verbose = True
        else:
            return None
        i += 1
    values: dict[str, str] = {}
    stdio = False
    hosts: list[str] = []
    rest = argv[i + 1:]
    j = 0
    while j < len(rest):
        arg = rest[j]
        name, eq, value = arg.partition("=")
        if arg == "--stdio":
            stdio = True
        elif name in ("--wait", "--ssh-host-prefix", "--hostname-suffix"):
            if not eq:
                if j + 1 >= len(rest):
                    return None
                value, j = rest[j + 1], j + 1
            values[name[2:]] = value
        elif arg.startswith("-"):
            return None  # -A, --, anything new: the full parser
        else:
            hosts.append(arg)
        j += 1
    if i >= len(argv) or not stdio or len(hosts) != 1:
        return None
    direct_env = environ.get("CODER_DISABLE_DIRECT_CONNECTIONS", "").lower()
    if direct_env in TRUE_VALUES:
        disable = True
    elif direct_env and direct_env not in _FALSE:
        return None  # let the full CLI name the bad value
    wait = values.get("wait") or environ.get("CODER_SSH_WAIT", "auto")
    if wait not in WAIT_CHOICES:
        return None
    verbose = verbose or environ.get("CODER_VERBOSE", "").lower() in ("1", "true")
    return StdioRequest(
        config_dir=config or default_config_dir(environ), disable_direct=disable, verbose=verbose,
        host=hosts[0], prefix=values.get("ssh-host-prefix") or environ.get("CODER_SSH_SSH_HOST_PREFIX"),
        suffix=values.get("hostname-suffix") or environ.get("CODER_SSH_HOSTNAME_SUFFIX"), wait=wait)


def enabled(environ: dict[str, str]) -> bool:
    return environ.get(PROTOCOL_ENV, "1").lower() not in _FALSE


SSH_PORT = 22


def ssh_stdio(req: StdioRequest, environ: dict[str, str]) -> int:
    """The ProxyCommand through the daemon; raises :class:`Unavailable` to fall back."""
    ident = identity(req.config_dir, environ)
    if ident is None:
        raise Unavailable("not logged in")
    fp = fingerprint(*ident, req.disable_direct)
    paths = paths_for(req.config_dir, fp, environ)
    name = workspace_name(req.host, req.prefix, req.suffix)
    if not name or any(c.isspace() for c in name):
        raise Unavailable("a workspace name the protocol cannot carry")
    try:
        sock = open_daemon(paths, environ, req.disable_direct)
    except OSError as err:  # a run dir we cannot make, a socket path too long, ...
        raise Unavailable(str(err)) from None
    with sock:
        try:
            lines = request(sock, f"DIAL {fp} {name} {SSH_PORT} {req.wait}", sys.stderr)
        except Failed as err:
            sys.stderr.write(f"error: {err}\n")
            return 1
        # From here on bytes have been exchanged: there is no falling back.
        return pump(sock, lines.rest)
