"""Reaching a workspace from the CLI: find it, check its agent, dial the tunnel.

Progress goes to stderr while dialing; every failure is one line: unknown workspace, agent
offline, server unreachable, or a tunnel that did not come up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint

from coderstack.cli.context import Context
from coderstack.cli.dialing import Connect
from coderstack.forward.datagram import datagram_flow_dial
from coderstack.sdk import SDKError
from coderstack.tailnet.client import DialError
from coderstack.tailnet.dial import AgentTunnel, dial_agent
from coderstack.tailnet.endpoint import PingResult


async def find_agent(ctx: Context, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    ws = await ctx.api.workspace_by_name(name)
    return ws, agent_of(ws)


def agent_of(ws: dict[str, Any]) -> dict[str, Any]:
    """The workspace's agent, if it can be dialed; else the one line saying why not."""
    if not ws.get("agents"):
        raise SDKError(f"workspace {ws['name']!r} has no agent")
    agent = ws["agents"][0]
    if agent["status"] not in ("connected", "lost"):
        raise SDKError(
            f"the agent of workspace {ws['name']!r} is {agent['status']}; start it, then try again"
        )
    return agent


class TunnelConnection:
    """The ``AgentConnection`` the workspace commands use (``coderstack.cli.dialing``), over a real
    tunnel: TCP/UDP through the netstack, pings and diagnostics from the Conn."""

    def __init__(self, tunnel: AgentTunnel, disable_direct: bool) -> None:
        self.tunnel = tunnel
        self.conn = tunnel.conn
        self.disable_direct = disable_direct
        self.udp_dial = datagram_flow_dial(tunnel.client.netstack.listen_udp, str(tunnel.address))
        self._closing: Deferred[None] | None = None

    def endpoint(self, port: int) -> IStreamClientEndpoint:
        # The netstack's endpoint provides the interface (zope's adaptation hands it back as is).
        return IStreamClientEndpoint(self.tunnel.endpoint(port))

    async def ping(self) -> PingResult:
        return await self.tunnel.ping()

    def tcp_stats(self) -> dict[str, int]:
        """This side's netstack TCP counters (retransmissions, timeouts, RACK, TLP, PRR, undo)."""
        return {k: v for k, v in self.tunnel.client.netstack.stats.items() if k.startswith("tcp_")}

    def derp_region_names(self) -> dict[int, str]:
        m = self.conn.derp_map
        return {rid: m.regions[rid].region_name for rid in m.regions} if m is not None else {}

    def peer_diagnostics(self) -> dict[str, Any]:
        status = self.conn.status()
        key, node = self.tunnel.key, self.tunnel.node
        peer = status["peers"].get(key.hex(), {}) if key else {}
        return {
            "preferred_derp": status["home_region"],
            "derp_region_names": self.derp_region_names(),
            "sent_node": self.conn.node() is not None,
            "received_node": (
                {"derp": f"127.3.3.40:{node.preferred_derp}", "endpoints": list(node.endpoints)}
                if node is not None else None
            ),
            "last_handshake": peer.get("last_handshake"),
        }

    def netinfo(self) -> dict[str, Any] | None:
        report = self.conn.last_report
        return report.to_json() if report is not None else None

    async def await_netinfo(self, timeout: float) -> None:
        """Until the Conn's first netcheck report is in, at most ``timeout`` seconds. It comes at
        once when UDP works; when UDP is blocked it comes only after the STUN probes time out,
        and that report is the one that says so."""
        conn = self.conn
        if not conn.netcheck_enabled:
            return
        step, waited = 0.05, 0.0
        while conn.last_report is None and waited < timeout:
            await task.deferLater(conn.reactor, step, lambda: None)
            waited += step

    def close(self) -> Deferred[None]:
        if self._closing is None:
            self._closing = Deferred.fromCoroutine(self.tunnel.close())
        return self._closing


async def connect_agent(reactor: Any, ctx: Context, name: str) -> TunnelConnection:
    """The real ``Connect`` hook: find the workspace, dial its agent, wrap the tunnel."""
    ws, agent = await find_agent(ctx, name)
    try:
        tunnel = await dial_agent(reactor, ctx.api, agent["id"], disable_direct=ctx.disable_direct)
    except DialError as err:
        raise SDKError(f"cannot reach the agent of workspace {ws['name']!r}: {err}") from None
    return TunnelConnection(tunnel, ctx.disable_direct)


RunWith = Callable[[Any, Any, Context, Connect], Awaitable[int]]


def _debugging(ctx: Context) -> bool:
    from coderstack.cli import warm

    return ctx.verbose or ctx.environ.get(warm.DEBUG_ENV, "").lower() in warm.TRUE_VALUES


async def connect_via_daemon(reactor: Any, ctx: Context, name: str) -> Any:
    """The tunnel daemon's tunnel to ``name`` (:mod:`coderstack.cli.daemonconn`), or None when the
    daemon is turned off or cannot be used (said on stderr with ``-v`` or the debug variable)."""
    from coderstack.cli import daemonconn, warm

    if not warm.enabled(ctx.environ):
        return None
    try:
        return await daemonconn.connect(reactor, ctx, name)
    except warm.Unavailable as why:
        if _debugging(ctx):
            ctx.err(f"coderstack: not using the tunnel daemon ({why}); dialing here")
        return None


async def hold_via_daemon(reactor: Any, ctx: Context, name: str,
                          dial_here: Callable[[], Awaitable[TunnelConnection]]) -> Any:
    """:func:`connect_via_daemon` for a long-running command (:mod:`coderstack.cli.heldconn`):
    the daemon held for as long as it runs, ``dial_here`` once it is gone; None as there."""
    from coderstack.cli import heldconn, warm

    daemon = await connect_via_daemon(reactor, ctx, name)
    if daemon is None:
        return None
    debugging = _debugging(ctx)
    try:
        return await heldconn.hold(daemon, dial_here, ctx.err if debugging else lambda line: None)
    except warm.Unavailable as why:
        if debugging:
            ctx.err(f"coderstack: not using the tunnel daemon ({why}); dialing here")
        return None


def command(run_with: RunWith, via_daemon: bool = False,
            hold: bool = False) -> Callable[[Any, Any, Context], Awaitable[int]]:
    """``run(reactor, options, ctx)`` for a command written as ``run_with(..., connect)``; waits
    for every tunnel it opened to close (a graceful coordinator disconnect) before returning.
    ``via_daemon``: use the tunnel daemon's tunnel when it can be had; ``hold``: the same for a
    long-running command, which holds the daemon and falls back to its own tunnel later."""

    async def run(reactor: Any, options: Any, ctx: Context) -> int:
        opened: list[TunnelConnection] = []

        async def dial_here(reactor: Any, ctx: Context, name: str) -> TunnelConnection:
            conn = await connect_agent(reactor, ctx, name)
            opened.append(conn)
            return conn

        async def hook(reactor: Any, ctx: Context, name: str) -> Any:
            if hold:
                held = await hold_via_daemon(reactor, ctx, name, lambda: dial_here(reactor, ctx, name))
                if held is not None:
                    return held
            elif via_daemon:
                held = await connect_via_daemon(reactor, ctx, name)
                if held is not None:
                    return held
            return await dial_here(reactor, ctx, name)

        try:
            return await run_with(reactor, options, ctx, hook)
        finally:
            for conn in opened:
                await conn.close()

    return run
