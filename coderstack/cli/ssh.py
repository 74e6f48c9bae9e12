"""``coderstack ssh WORKSPACE [-- command]`` and ``coderstack ssh --stdio`` (OpenSSH's ProxyCommand).

``--stdio`` dials the workspace's tunnel and joins stdin/stdout to TCP port 22 on the agent's
tunnel address: OpenSSH speaks SSH over it. Without ``--stdio`` we run the system's ``ssh`` with
that ProxyCommand, so the terminal, PTY, resizing, agent forwarding and exit status are OpenSSH's
own. Host keys are not pinned: the WireGuard tunnel already authenticated the agent (like Coder's
generated ssh config, which also sets StrictHostKeyChecking=no).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

from twisted.internet import defer, protocol, stdio
from twisted.python import usage

from coderstack.cli import tunnel
from coderstack.cli.command import Command
from coderstack.cli.context import Context
from coderstack.envopts import boolean
from coderstack.sdk import SDKError

SSH_PORT = 22


class Options(Command):
    synopsis = "coderstack ssh <workspace> [-- command ...]"
    optFlags = [
        ["stdio", None, "Join stdin/stdout to the workspace's SSH server (for ProxyCommand) [env CODER_SSH_STDIO]."],
        ["forward-agent", "A", "Forward your SSH agent into the workspace."],
    ]
    optParameters = [
        ["ssh-host-prefix", None, "", "Strip this prefix from the workspace name (e.g. coder.)."],
        ["hostname-suffix", None, "", "Strip this suffix from the workspace name."],
    ]

    def parseArgs(self, workspace: str, *command: str) -> None:
        self["workspace"] = workspace
        self["command"] = list(command)

    def postOptions(self) -> None:
        if not self["stdio"] and os.environ.get("CODER_SSH_STDIO"):
            try:
                self["stdio"] = boolean(os.environ["CODER_SSH_STDIO"])
            except ValueError:
                raise usage.UsageError("invalid value for --stdio (from CODER_SSH_STDIO)") from None
        if self["stdio"] and self["command"]:
            raise usage.UsageError("--stdio takes no command")


class _Tunnel(protocol.Protocol):
    """The TCP connection to the agent's SSH port: bytes to stdout."""

    def __init__(self, out: Any, done: defer.Deferred[None]) -> None:
        self.out, self.done = out, done

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.out.write(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if not self.done.called:
            self.done.callback(None)


class _Stdin(protocol.Protocol):
    """Our stdin: bytes to the tunnel; EOF half-closes it so the server sees the end."""

    def __init__(self, tunnel_transport: Any) -> None:
        self.tunnel = tunnel_transport

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.tunnel.write(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        lose_write = getattr(self.tunnel, "loseWriteConnection", None)
        if lose_write is not None:
            lose_write()
        else:
            self.tunnel.loseConnection()


async def proxy_stdio(reactor: Any, ctx: Context, name: str) -> int:
    ws = await tunnel.connect(reactor, ctx, name, quiet=True)
    try:
        done: defer.Deferred[None] = defer.Deferred()
        out = getattr(ctx.stdout, "buffer", ctx.stdout)
        factory = protocol.Factory.forProtocol(lambda: _Tunnel(out, done))
        conn = await ws.endpoint(SSH_PORT).connect(factory)
        stdin = stdio.StandardIO(_Stdin(conn.transport), reactor=reactor)
        await done
        stdin.loseConnection()
        out.flush()
    finally:
        await ws.close()
    return 0


async def run(reactor: Any, opts: Options, ctx: Context) -> int:
    name = tunnel.split_host(opts["workspace"], opts["ssh-host-prefix"], opts["hostname-suffix"])
    if opts["stdio"]:
        return await proxy_stdio(reactor, ctx, name)
    ssh = shutil.which("ssh")
    if ssh is None:
        raise SDKError("ssh (OpenSSH's client) is not installed; `coderstack ssh --stdio` works as a ProxyCommand")
    # Fail here, in one line, rather than inside OpenSSH's ProxyCommand.
    await tunnel.find_agent(ctx, name)
    argv = ssh_argv(ssh, ctx, name, forward_agent=opts["forward-agent"], command=opts["command"])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(ssh, argv)
    return 0  # not reached


def ssh_argv(ssh: str, ctx: Context, name: str, *, forward_agent: bool, command: list[str]) -> list[str]:
    proxy = [sys.executable, "-m", "coderstack", "--global-config", ctx.config.path]
    if ctx.url_override:
        proxy += ["--url", ctx.url_override]
    if ctx.disable_direct:
        proxy.append("--disable-direct-connections")
    proxy += ["ssh", "--stdio", name]
    argv = [
        ssh,
        "-o", "ProxyCommand=" + " ".join(_quote(p) for p in proxy),
        "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR",
    ]
    if forward_agent:
        argv.append("-A")
    argv.append(f"coder.{name}")
    if command:
        argv += ["--", *command]
    return argv


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
