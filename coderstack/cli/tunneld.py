"""``coderstack tunnel-daemon``: the per-user daemon that keeps workspace tunnels warm.

Started detached by the warm ProxyCommand (:mod:`coderstack.cli.warm`, which documents the
socket, its files and the line protocol); not meant to be run by hand. It

* takes ``tunnel-<key>.lock`` (or exits at once: another daemon for this identity runs), replaces
  a stale socket, listens on ``tunnel-<key>.sock`` (0600 in a 0700 directory) and writes its PID;
* answers each connection from its own uid (``SO_PEERCRED``; others are refused and counted)
  whose request carries its identity's fingerprint;
* for ``DIAL``: waits for startup scripts as ``ssh --wait`` does (their logs go back as ``MSG``
  lines), finds the workspace's agent, reuses the tunnel to it or dials a new one (the CLI's
  own tailnet Conn, :func:`coderstack.cli.tunnel.connect_agent`), connects to the port and joins
  that stream to the socket, with backpressure and half-close both ways;
* for ``STREAM`` (``port-forward``'s connections): the same over the tunnel an ``OPEN`` of that
  workspace holds, without asking the API again; a ``DIAL`` when there is none or it fails;
* for ``HOLD``: answers ``OK`` and counts the connection as activity until the client closes it
  (a long-running ``port-forward`` between its connections);
* exits after ``CODERSTACK_TUNNEL_DAEMON_IDLE`` seconds (default 600) with no dial, no open
  stream and no hold, closing its tunnels and removing its socket and PID file.

Its log (stdout/stderr, ``<config dir>/tunnel-daemon.log``) has one line per dial; it never
holds the session token (only its fingerprint's first characters, to tell daemons apart).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hmac
import json
import os
import socket
import sys
import time
from typing import IO, Any, cast

from twisted.internet import defer, error, protocol, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from zope.interface import implementer

from coderstack.cli import agentwait, tunnel, warm
from coderstack.cli.context import ConfigDir, Context
from coderstack.cli.sharedcall import SharedCall
from coderstack.sdk import SDKError
from coderstack.twistedtypes import stream_transport

#: Longest request line accepted.
MAX_REQUEST = 4096
#: Seconds to connect to a port over an existing tunnel before it is redialed.
REUSE_CONNECT_TIMEOUT = 5.0


def log(line: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} tunnel-daemon[{os.getpid()}] {line}\n")
    sys.stderr.flush()


def idle_seconds(environ: dict[str, str]) -> float:
    try:
        value = float(environ.get(warm.IDLE_ENV, "") or warm.DEFAULT_IDLE)
    except ValueError:
        value = warm.DEFAULT_IDLE
    return max(value, 0.1)


class _StderrToClient:
    """A ``Context.stderr`` whose lines go to the client as ``MSG`` lines."""

    def __init__(self, transport: Any) -> None:
        self.transport, self.partial = transport, ""

    def write(self, text: str) -> None:
        self.partial += text
        while "\n" in self.partial:
            line, self.partial = self.partial.split("\n", 1)
            self.transport.write(b"MSG " + line.encode() + b"\n")

    def flush(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class _Workspace(protocol.Protocol):
    """The tunnel side of one stream: bytes from the workspace go to the client's socket."""

    def __init__(self, client: _Client) -> None:
        self.client = client

    def dataReceived(self, data: bytes) -> None:
        stream_transport(self.client).write(data)

    def readConnectionLost(self) -> None:
        half_close = getattr(self.client.transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.client.workspace_lost()


@implementer(IHalfCloseableProtocol)
class _Client(protocol.Protocol):
    """One connection on the unix socket: a request line, then (after OK) the stream."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.buffer = b""
        self.request_done = False
        self.workspace: _Workspace | None = None
        self.client_eof = False
        self.gone = False
        self.holding = False

    def connectionMade(self) -> None:
        uid = warm.transport_peer_uid(self.transport)
        if uid != self.daemon.uid:
            self.daemon.refused += 1
            log(f"refused a connection from uid {uid}")
            self.refuse("permission denied")
            return
        self.daemon.clients += 1

    def refuse(self, why: str) -> None:
        self.request_done = True
        transport = stream_transport(self)
        transport.write(f"ERR {why}\n".encode())
        transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.workspace is not None:
            stream_transport(self.workspace).write(data)
            return
        if self.holding:
            return  # a hold carries nothing
        if self.request_done:
            self.buffer += data  # the client wrote before OK: kept for the stream
            return
        self.buffer += data
        if b"\n" not in self.buffer:
            if len(self.buffer) > MAX_REQUEST:
                self.refuse("request too long")
            return
        line, self.buffer = self.buffer.split(b"\n", 1)
        self.request_done = True
        stream_transport(self).pauseProducing()
        defer.Deferred.fromCoroutine(self.daemon.handle(self, line.decode("utf-8", "replace")))

    def hold(self) -> None:
        """HOLD: OK, then the open connection keeps the daemon up until the client closes it."""
        self.holding = True
        self.daemon.holds += 1
        transport = stream_transport(self)
        transport.write(b"OK\n")
        transport.resumeProducing()  # paused while the request was handled: EOF must reach us

    def joined(self, workspace: _Workspace) -> None:
        """The workspace port is connected: OK, then bytes both ways."""
        self.workspace = workspace
        mine, theirs = stream_transport(self), stream_transport(workspace)
        mine.write(b"OK\n")
        if self.buffer:
            theirs.write(self.buffer)
            self.buffer = b""
        # Backpressure: a slow client pauses the tunnel, a slow tunnel pauses the client.
        mine.registerProducer(theirs, True)
        theirs.registerProducer(mine, True)
        if self.client_eof:
            self.readConnectionLost()
        mine.resumeProducing()  # paused while dialing

    def readConnectionLost(self) -> None:
        self.client_eof = True
        if self.holding:
            stream_transport(self).loseConnection()  # the client let go
            return
        if self.workspace is not None:
            transport = stream_transport(self.workspace)
            half_close = getattr(transport, "loseWriteConnection", None)
            (half_close or transport.loseConnection)()

    def writeConnectionLost(self) -> None:
        if self.workspace is not None:
            stream_transport(self.workspace).loseConnection()

    def workspace_lost(self) -> None:
        if self.transport is not None and not self.gone:
            stream_transport(self).loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.gone = True
        if self.holding:
            self.holding = False
            self.daemon.holds -= 1
            self.daemon.touch()
        if self.workspace is not None:
            self.daemon.streams -= 1
            self.daemon.touch()
            if self.workspace.transport is not None:
                stream_transport(self.workspace).loseConnection()


def _info(held: _Tunnel) -> dict[str, Any]:
    conn = held.conn
    return {"peer_diagnostics": conn.peer_diagnostics(), "netinfo": conn.netinfo(),
            "derp_region_names": conn.derp_region_names()}


def _may_wait(mode: str, ws: dict[str, Any]) -> bool:
    """Whether ``ssh --wait`` would do anything (wait, or warn about a failed start) for this
    workspace. Usually not: one API call per dial then suffices."""
    agents = ws.get("agents") or []
    if mode == "no" or not agents:
        return False
    return agents[0].get("lifecycle_state") in (*agentwait.STARTING, "start_error", "start_timeout")


class _Factory(protocol.Factory):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def buildProtocol(self, addr: Any) -> _Client:
        return _Client(self.daemon)


@dataclasses.dataclass
class _Tunnel:
    conn: tunnel.TunnelConnection
    agent_id: str
    workspace: str
    dials: int = 0


class Daemon:
    def __init__(self, reactor: Any, ctx: Context, paths: warm.Paths, idle: float) -> None:
        self.reactor, self.ctx, self.paths, self.idle = reactor, ctx, paths, idle
        self.uid = os.getuid()
        self.tunnels: dict[str, _Tunnel] = {}  # by agent id
        self.dialing: dict[str, SharedCall[_Tunnel]] = {}
        self.names: dict[str, str] = {}  # workspace name -> agent id, as OPEN last found it
        self.started = time.time()
        self.last_active = time.monotonic()
        self.dials = self.tunnels_made = self.reused = self.refused = self.clients = self.failed = 0
        self.streams = 0
        self.holds = 0  # HOLD connections open
        self.busy = 0
        self.done: defer.Deferred[None] = defer.Deferred()

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(), "uid": self.uid, "started": self.started, "idle_timeout": self.idle,
            "dials": self.dials, "tunnels_made": self.tunnels_made, "reused": self.reused,
            "failed": self.failed, "refused_peers": self.refused, "open_streams": self.streams,
            "holds": self.holds, "idle_for": time.monotonic() - self.last_active,
            "tunnels": [{"workspace": t.workspace, "agent_id": t.agent_id, "dials": t.dials}
                        for t in self.tunnels.values()],
        }

    async def handle(self, client: _Client, line: str) -> None:
        if line.startswith("STATUS "):
            # Watching the daemon is no use of it: a STATUS neither counts as activity nor
            # resets the idle clock it reports.
            await self._handle(client, line)
            return
        self.busy += 1
        self.touch()
        try:
            await self._handle(client, line)
        except Exception as err:  # one client's trouble never ends the daemon
            log(f"request failed: {type(err).__name__}: {err}")
            if not client.gone and client.workspace is None:
                stream_transport(client).write(f"FAIL {err}\n".encode())
                stream_transport(client).loseConnection()
        finally:
            self.busy -= 1
            self.touch()

    async def _handle(self, client: _Client, line: str) -> None:
        words = line.split(" ")
        if len(words) < 2 or not hmac.compare_digest(words[1].encode(), self.paths.fingerprint.encode()):
            log("refused a request for another identity")
            client.refuse("not this daemon's identity")
            return
        if words[0] == "STATUS" and len(words) == 2:
            transport = stream_transport(client)
            transport.write(json.dumps(self.status()).encode() + b"\n")
            transport.loseConnection()
            return
        if words[0] == "HOLD" and len(words) == 2:
            log("hold")
            client.hold()
            return
        if words[0] in ("OPEN", "PING", "INFO"):
            await self._query(client, words)
            return
        if words[0] == "STREAM" and len(words) == 4 and words[3].isdigit():
            await self._stream(client, words[2], int(words[3]))
            return
        if words[0] != "DIAL" or len(words) != 5 or not words[3].isdigit() or words[4] not in warm.WAIT_CHOICES:
            client.refuse("bad request")
            return
        await self._dial_request(client, words[2], int(words[3]), words[4])

    async def _stream(self, client: _Client, name: str, port: int) -> None:
        """STREAM: over the tunnel an OPEN of ``name`` holds, with no lookup; else (none held,
        or it fails) exactly a ``DIAL ... no``."""
        agent_id = self.names.get(name, "")
        held = self.tunnels.get(agent_id)
        if held is None:
            await self._dial_request(client, name, port, "no")
            return
        start = time.monotonic()
        factory = protocol.Factory.forProtocol(lambda: _Workspace(client))
        try:
            workspace = await held.conn.tunnel.endpoint(port, timeout=REUSE_CONNECT_TIMEOUT).connect(factory)
        except error.ConnectionRefusedError:
            raise  # the agent answered: the tunnel works, that port takes no connection (FAIL)
        except Exception as err:
            log(f"stream {name}:{port}: the held tunnel failed ({type(err).__name__}); dialing again")
            if self.tunnels.get(agent_id) is held:
                del self.tunnels[agent_id]
                await held.conn.close()
            await self._dial_request(client, name, port, "no")
            return
        self.dials += 1
        held.dials += 1
        self.reused += 1
        log(f"stream {name}:{port} over the held tunnel (dial {held.dials} on it; "
            f"connect {(time.monotonic() - start) * 1000:.0f} ms)")
        self._join(client, cast(_Workspace, workspace))

    async def _dial_request(self, client: _Client, name: str, port: int, wait: str) -> None:
        """DIAL: look the workspace up (waiting for its startup scripts as ``wait`` says), then
        a stream over the held tunnel to its agent or a new one."""
        self.dials += 1
        ctx = dataclasses.replace(self.ctx, stderr=cast(IO[str], _StderrToClient(client.transport)))
        start = time.monotonic()
        try:
            ws = await ctx.api.workspace_by_name(name)
            if _may_wait(wait, ws):
                await agentwait.wait_for_agent(self.reactor, ctx, name, wait)
                ws = await ctx.api.workspace_by_name(name)
            agent = tunnel.agent_of(ws)
            looked = time.monotonic()
            workspace = await self._open(client, ws, agent, port, (looked - start) * 1000, looked)
        except SDKError as err:
            self.failed += 1
            log(f"dial {name}:{port} failed: {err}")
            if not client.gone:
                stream_transport(client).write(f"FAIL {err}\n".encode())
                stream_transport(client).loseConnection()
            return
        if workspace is not None:
            self._join(client, workspace)

    def _join(self, client: _Client, workspace: _Workspace) -> None:
        if client.gone:
            stream_transport(workspace).loseConnection()
            return
        self.streams += 1
        client.joined(workspace)

    async def _query(self, client: _Client, words: list[str]) -> None:
        """OPEN, PING and INFO (:mod:`coderstack.cli.daemonconn`): one ``OK <json>`` line."""
        kind, name = words[0], words[2] if len(words) > 2 else ""
        try:
            timeout = float(words[3]) if kind != "OPEN" and len(words) == 4 else -1.0
        except ValueError:
            timeout = -1.0
        if not name or len(words) != (3 if kind == "OPEN" else 4) or (kind != "OPEN" and timeout < 0):
            client.refuse("bad request")
            return
        transport = stream_transport(client)
        try:
            if kind == "OPEN":
                ws = await self.ctx.api.workspace_by_name(name)
                agent_id = str(tunnel.agent_of(ws)["id"])
                held = self.tunnels.get(agent_id) or await self._tunnel(name, agent_id)
                self.names[name] = agent_id
                log(f"open {name}")
            else:
                found = self.tunnels.get(self.names.get(name, ""))
                if found is None:
                    raise SDKError(f"no tunnel to {name!r} is open")
                held = found
            if kind == "PING":
                d = held.conn.tunnel.ping()
                if timeout > 0:
                    d.addTimeout(timeout, self.reactor)
                try:
                    pong = await d
                except (TimeoutError, defer.TimeoutError, defer.CancelledError):
                    transport.write(b"FAIL timeout\n")
                    transport.loseConnection()
                    return
                answer: dict[str, Any] = {"latency": pong.latency, "kind": pong.kind, "endpoint": pong.endpoint,
                                          "derp_region": pong.derp_region, "derp_name": pong.derp_name,
                                          "info": _info(held)}
            else:
                if kind == "INFO" and timeout > 0:
                    await held.conn.await_netinfo(timeout)
                answer = _info(held)
        except SDKError as err:
            self.failed += 1
            log(f"{kind.lower()} {name} failed: {err}")
            transport.write(f"FAIL {err}\n".encode())
            transport.loseConnection()
            return
        transport.write(b"OK " + json.dumps(answer).encode() + b"\n")
        transport.loseConnection()

    async def _open(self, client: _Client, ws: dict[str, Any], agent: dict[str, Any], port: int,
                    lookup_ms: float, looked: float) -> _Workspace | None:
        """Connect to ``port`` over the held tunnel (or a new one); logs how long the lookups
        (``lookup_ms``, the API) and the connect took."""
        name, agent_id = ws["name"], str(agent["id"])
        factory = protocol.Factory.forProtocol(lambda: _Workspace(client))
        held = self.tunnels.get(agent_id)
        if held is not None:
            try:
                endpoint = held.conn.tunnel.endpoint(port, timeout=REUSE_CONNECT_TIMEOUT)
                workspace = await endpoint.connect(factory)
            except error.ConnectionRefusedError:
                raise  # the agent answered: the tunnel works, that port takes no connection (FAIL)
            except Exception as err:
                log(f"dial {name}:{port}: the held tunnel failed ({type(err).__name__}); dialing again")
                self.tunnels.pop(agent_id, None)
                await held.conn.close()
            else:
                held.dials += 1
                self.reused += 1
                log(f"dial {name}:{port} over the held tunnel (dial {held.dials} on it; "
                    f"lookups {lookup_ms:.0f} ms, connect {(time.monotonic() - looked) * 1000:.0f} ms)")
                return cast(_Workspace, workspace)
        held = await self._tunnel(name, agent_id)
        workspace = await held.conn.tunnel.endpoint(port).connect(factory)
        held.dials += 1
        log(f"dial {name}:{port} over a new tunnel (lookups {lookup_ms:.0f} ms, "
            f"tunnel and connect {(time.monotonic() - looked) * 1000:.0f} ms)")
        return cast(_Workspace, workspace)

    async def _tunnel(self, name: str, agent_id: str) -> _Tunnel:
        """The tunnel to ``agent_id``, dialing it (once, however many ask at the same time)."""
        if agent_id in self.tunnels:
            return self.tunnels[agent_id]
        shared = self.dialing.get(agent_id)
        if shared is None:
            shared = self.dialing[agent_id] = SharedCall(lambda: self._dial(name, agent_id))
        return await shared.wait()

    async def _dial(self, name: str, agent_id: str) -> _Tunnel:
        try:
            conn = await tunnel.connect_agent(self.reactor, self.ctx, name)
        finally:
            self.dialing.pop(agent_id, None)
        held = _Tunnel(conn, agent_id, name)
        self.tunnels[agent_id] = held
        self.tunnels_made += 1
        log(f"tunnel to {name} (agent {agent_id}) is up")
        return held

    def check_idle(self) -> None:
        if self.streams or self.holds or self.busy or self.dialing:
            return
        if time.monotonic() - self.last_active >= self.idle:
            log(f"idle for {self.idle:g}s: exiting")
            if not self.done.called:
                self.done.callback(None)

    async def close(self) -> None:
        for held in list(self.tunnels.values()):
            await held.conn.close()
        self.tunnels.clear()


def _lock(paths: warm.Paths) -> int | None:
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _remove_stale(path: str) -> None:
    """The lock is ours, so a socket file left there belongs to a dead daemon."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_pid(path: str) -> None:
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(path + ".tmp", path)


def _remove_own(paths: warm.Paths) -> None:
    """The PID file, if it is still ours. (The listening port removes the socket itself when it
    stops, at exit or at the reactor's shutdown.)"""
    try:
        with open(paths.pid) as f:
            ours = f.read().strip() == str(os.getpid())
    except OSError:
        ours = False
    if ours:
        try:
            os.unlink(paths.pid)
        except FileNotFoundError:
            pass


async def serve(reactor: Any, ctx: Context, paths: warm.Paths, idle: float) -> int:
    lock = _lock(paths)
    if lock is None:
        return 0  # another daemon for this identity holds the lock: it serves
    _remove_stale(paths.socket)
    daemon = Daemon(reactor, ctx, paths, idle)
    port = reactor.listenUNIX(paths.socket, _Factory(daemon), mode=0o600)
    _write_pid(paths.pid)
    log(f"listening on {paths.socket} for {ctx.server_url()} (identity {paths.fingerprint[:12]}), "
        f"idle timeout {idle:g}s")
    trigger = reactor.addSystemEventTrigger("before", "shutdown", _remove_own, paths)
    check = task.LoopingCall(daemon.check_idle)
    check.clock = reactor
    check.start(min(max(idle / 4, 0.05), 5.0), now=False)
    try:
        await daemon.done
    finally:
        check.stop()
        _remove_own(paths)
        reactor.removeSystemEventTrigger(trigger)
        await port.stopListening()
        await daemon.close()
        os.close(lock)
    return 0


def main(args: list[str], environ: dict[str, str]) -> int:
    """``coderstack [--global-config DIR] [--disable-direct-connections] tunnel-daemon``."""
    config_dir = warm.default_config_dir(environ)
    disable = False
    i = 0
    while i < len(args):
        if args[i] == "--global-config" and i + 1 < len(args):
            config_dir = args[i + 1]
            i += 1
        elif args[i].startswith("--global-config="):
            config_dir = args[i].split("=", 1)[1]
        elif args[i] == "--disable-direct-connections":
            disable = True
        i += 1
    found = warm.identity(config_dir, environ)
    if found is None:
        log("not logged in: nothing to serve")
        return 1
    ident = found
    os.umask(0o077)
    paths = warm.paths_for(config_dir, warm.fingerprint(*ident, disable), environ)
    try:
        warm.private_dir(paths.run_dir)
    except warm.Unavailable as err:
        log(f"cannot use {paths.run_dir}: {err}")
        return 1
    # A socket's path must fit sockaddr_un (108 bytes on Linux).
    if len(paths.socket.encode()) >= 108:
        log(f"the socket path is too long: {paths.socket}")
        return 1
    socket.setdefaulttimeout(None)

    from twisted.internet import task as _task

    codes: list[int] = []

    async def run(reactor: Any) -> None:
        # The identity the fingerprint was made of, whatever the config dir says later.
        ctx = Context(reactor=reactor, config=ConfigDir(config_dir), environ=environ, disable_direct=disable,
                      url_override=ident[0], token_override=ident[1])
        try:
            codes.append(await serve(reactor, ctx, paths, idle_seconds(environ)))
        finally:
            closing = ctx.close()
            if isinstance(closing, defer.Deferred):
                await closing

    try:
        _task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    except SystemExit as exit_:
        return codes[0] if codes else (exit_.code if isinstance(exit_.code, int) else 1)
    return codes[0] if codes else 1
