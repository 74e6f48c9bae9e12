"""``coderstack ssh WS [-- command]`` and ``coderstack ssh --stdio HOST`` (OpenSSH's ProxyCommand).

``--stdio`` dials the agent's SSH port (1) over the tunnel and copies bytes between it and
stdin/stdout, with backpressure both ways; stdin EOF half-closes the connection. The host
name may carry config-ssh's prefix (``coder.dev``) or ``--hostname-suffix`` (``dev.coder``).

The interactive form runs the stock ``ssh`` client with this same command as its
ProxyCommand (so PTYs, escape sequences, ``-A`` and every OpenSSH option behave as users
expect) and returns its exit status.

``--stdio`` is first answered by :mod:`coderstack.cli.warm` (through the per-user tunnel daemon,
without importing Twisted); this module's bridge is the fallback when the daemon cannot be used.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from typing import Any

from twisted.internet import defer, protocol, stdio
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.python import usage
from zope.interface import implementer

from coderstack.cli import agentwait, tunnel
from coderstack.cli.command import Command
from coderstack.cli.dialing import Connect
from coderstack.cli.warm import workspace_name
from coderstack.twistedtypes import NotConnected, StreamTransport, stream_transport
from coderstack.wire.ports import SSH_PORT


class Options(Command):
    synopsis = "coderstack ssh [--stdio] [-A] <workspace> [-- command...]"
    longdesc = "Start a shell or run a command in a workspace over its tunnel."
    optFlags = [
        ["stdio", None, "Speak raw SSH on stdin/stdout (for ProxyCommand) [env CODER_SSH_STDIO]."],
        ["forward-agent", "A", "Forward the local SSH agent [env CODER_SSH_FORWARD_AGENT]."],
    ]
    optParameters = [
        ["wait", None, None, "Wait for startup scripts: yes, no or auto (only scripts that block "
         "login) [env CODER_SSH_WAIT, default auto]."],
        ["ssh-host-prefix", None, None, "Strip this prefix from the host name [env CODER_SSH_SSH_HOST_PREFIX]."],
        ["hostname-suffix", None, None, "Strip .SUFFIX from the host name [env CODER_SSH_HOSTNAME_SUFFIX]."],
    ]

    def parseArgs(self, workspace: str, *command: str) -> None:  # type: ignore[override]  # usage.Options passes the positional arguments to it, one parameter each
        self["workspace"] = workspace
        self["command"] = list(command)

    def postOptions(self) -> None:
        if self["wait"] is not None:
            agentwait.wait_mode(self["wait"], {})


class _Agent(protocol.Protocol):
    """The tunnel side: bytes from the agent go to stdout."""

    def __init__(self, bridge: _Bridge):
        self.bridge = bridge

    def connectionMade(self) -> None:
        self.bridge.agent_connected(self)

    def dataReceived(self, data: bytes) -> None:
        stream_transport(self.bridge.stdio).write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.bridge.agent_lost()


@implementer(IHalfCloseableProtocol)
class _Stdio(protocol.Protocol):
    def __init__(self, bridge: _Bridge):
        self.bridge = bridge

    def dataReceived(self, data: bytes) -> None:
        self.bridge.agent_transport().write(data)

    def readConnectionLost(self) -> None:
        transport = self.bridge.agent_transport()
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        else:
            transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.bridge.agent_transport().loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self.bridge.agent is not None:
            stream_transport(self.bridge.agent).loseConnection()


class _Bridge:
    def __init__(self, reactor: Any, stdin_fd: int, stdout_fd: int):
        self.reactor, self.stdin_fd, self.stdout_fd = reactor, stdin_fd, stdout_fd
        self.agent: _Agent | None = None
        self.stdio = _Stdio(self)
        self.done: defer.Deferred[None] = defer.Deferred()

    def agent_transport(self) -> StreamTransport:
        """The tunnel connection; stdin is only read once it is there."""
        if self.agent is None:
            raise NotConnected("the agent's SSH port is not connected yet")
        return stream_transport(self.agent)

    def agent_connected(self, agent: _Agent) -> None:
        self.agent = agent
        io = stdio.StandardIO(self.stdio, stdin=self.stdin_fd, stdout=self.stdout_fd,  # type: ignore[call-arg]  # mypy reads stdio's Windows StandardIO, which takes no fds
                              reactor=self.reactor)
        # Backpressure: a slow stdout pauses the tunnel, a slow tunnel pauses stdin.
        transport = stream_transport(agent)
        io.registerProducer(transport, True)
        transport.registerProducer(io, True)

    def agent_lost(self) -> None:
        if self.stdio.transport is not None:
            stream_transport(self.stdio).loseConnection()
        if not self.done.called:
            self.done.callback(None)


async def run_stdio(reactor: Any, conn: Any, stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    bridge = _Bridge(reactor, stdin_fd, stdout_fd)
    await conn.endpoint(SSH_PORT).connect(protocol.Factory.forProtocol(lambda: _Agent(bridge)))
    await bridge.done
    return 0


def proxy_command(global_config: str, workspace: str, disable_direct: bool = False) -> str:
    """The ProxyCommand: a new ``coderstack`` process, so this run's global flags must be passed on
    (``--disable-direct-connections`` given on the command line would otherwise be lost)."""
    argv = [os.path.abspath(sys.executable), "-m", "coderstack", "--global-config", global_config]
    if disable_direct:
        argv.append("--disable-direct-connections")
    argv += ["ssh", "--stdio", workspace]
    return shlex.join(argv)


def proxy_env(ctx: Any) -> dict[str, str]:
    """OpenSSH's environment, which its ProxyCommand inherits: ``--url``/``--token`` given to this
    run go on as ``CODER_URL``/``CODER_SESSION_TOKEN`` (the environment, not the command line,
    keeps the token out of ``ps``)."""
    env = dict(ctx.environ)
    if ctx.url_override:
        env["CODER_URL"] = ctx.url_override
    if ctx.token_override:
        env["CODER_SESSION_TOKEN"] = ctx.token_override
    return env


def openssh_argv(ssh: str, proxy: str, workspace: str, forward_agent: bool, command: list[str]) -> list[str]:
    argv = [ssh, "-o", f"ProxyCommand={proxy}", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    if forward_agent:
        argv.append("-A")
    argv.append(f"coderstack.{workspace}")
    if command:
        argv += ["--", *command]
    return argv


class _Exit(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.done: defer.Deferred[int] = defer.Deferred()

    def processEnded(self, reason: Any) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.done.callback(255 if code is None else code)


async def run_with(reactor: Any, options: Options, ctx: Any, connect: Connect) -> int:
    env = ctx.environ
    prefix = options["ssh-host-prefix"] or env.get("CODER_SSH_SSH_HOST_PREFIX")
    suffix = options["hostname-suffix"] or env.get("CODER_SSH_HOSTNAME_SUFFIX")
    name = workspace_name(options["workspace"], prefix, suffix)
    stdio_mode = options["stdio"] or env.get("CODER_SSH_STDIO", "").lower() in ("1", "true", "yes")
    await agentwait.wait_for_agent(reactor, ctx, name, agentwait.wait_mode(options["wait"], env))
    if stdio_mode:
        conn = await connect(reactor, ctx, name)
        try:
            return await run_stdio(reactor, conn, _fileno(ctx.stdin, 0), _fileno(ctx.stdout, 1))
        finally:
            conn.close()
    ssh = shutil.which("ssh")
    if ssh is None:
        raise usage.UsageError("the OpenSSH client (ssh) is not installed")
    # A missing workspace or an offline agent is one clear line here, not an error from
    # inside OpenSSH's ProxyCommand.
    await tunnel.find_agent(ctx, name)
    argv = openssh_argv(ssh, proxy_command(ctx.config.path, name, ctx.disable_direct), name,
                        bool(options["forward-agent"]), options["command"])
    child = _Exit()
    reactor.spawnProcess(child, ssh, argv, env=proxy_env(ctx), childFDs={0: 0, 1: 1, 2: 2})
    return await child.done


def _fileno(stream: Any, default: int) -> int:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return default


run = tunnel.command(run_with)
