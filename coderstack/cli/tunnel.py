"""Reaching a workspace from the CLI: find it, check its agent, dial the tunnel.

Progress goes to stderr while dialing; every failure is one line: unknown workspace, agent
offline, server unreachable, or a tunnel that did not come up.
"""

from __future__ import annotations

from typing import Any

from coderstack.cli.context import Context
from coderstack.sdk import SDKError


class Workspace:
    def __init__(self, ws: dict[str, Any], agent: dict[str, Any], conn: Any) -> None:
        self.ws, self.agent, self.conn = ws, agent, conn

    @property
    def name(self) -> str:
        return self.ws["name"]

    def endpoint(self, port: int, timeout: float = 30) -> Any:
        from coderstack.tailnet.dial import agent_endpoint

        return agent_endpoint(self.conn, port, timeout=timeout)

    async def close(self) -> None:
        await self.conn.close()


def split_host(name: str, prefix: str = "", suffix: str = "") -> str:
    """``coder.dev`` -> ``dev`` for OpenSSH's ProxyCommand (``--ssh-host-prefix coder.``)."""
    if prefix and name.startswith(prefix):
        name = name[len(prefix):]
    if suffix and name.endswith(suffix):
        name = name[: -len(suffix)]
    return name


async def find_agent(ctx: Context, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    ws = await ctx.api.workspace_by_name(name)
    if not ws.get("agents"):
        raise SDKError(f"workspace {ws['name']!r} has no agent")
    agent = ws["agents"][0]
    if agent["status"] not in ("connected", "lost"):
        raise SDKError(
            f"the agent of workspace {ws['name']!r} is {agent['status']}; start it, then try again"
        )
    return ws, agent


async def connect(reactor: Any, ctx: Context, name: str, *, quiet: bool = False) -> Workspace:
    from coderstack.tailnet.dial import DialError, dial_agent

    ws, agent = await find_agent(ctx, name)
    if not quiet:
        ctx.err(f"Connecting to workspace {ws['name']!r}...")
    try:
        conn = await dial_agent(reactor, ctx.api, agent["id"], disable_direct=ctx.disable_direct)
    except DialError as err:
        raise SDKError(f"cannot reach the agent of workspace {ws['name']!r}: {err}") from None
    return Workspace(ws, agent, conn)
