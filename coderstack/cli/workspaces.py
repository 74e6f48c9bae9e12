"""Workspace commands: ``create``, ``list``, ``show``, ``delete``, ``agent-token``.

Workspaces are named ``NAME`` (yours) or ``OWNER/NAME``. ``create`` and ``agent-token`` print the
agent token exactly once: the server keeps only its hash.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.python import usage

from coderstack.cli.command import Command
from coderstack.cli.context import Context
from coderstack.cli.output import OutputOption, ago, table


class _NameArg(Command):
    def parseArgs(self, name: str) -> None:
        self["name"] = name


class CreateOptions(_NameArg):
    synopsis = "coderstack create <name>"


class ListOptions(OutputOption, Command):
    synopsis = "coderstack list [--output table|json] [--all]"
    optFlags = [["all", "a", "Every user's workspaces (owners only)."]]


class ShowOptions(OutputOption, _NameArg):
    synopsis = "coderstack show <name> [--output table|json]"


class DeleteOptions(_NameArg):
    synopsis = "coderstack delete <name> [--yes]"
    optFlags = [["yes", "y", "Do not ask for confirmation."]]


class AgentTokenOptions(_NameArg):
    synopsis = "coderstack agent-token <name>"


def _agent_instructions(ctx: Context, token: str) -> None:
    url = ctx.server_url()
    ctx.out("Start its agent on any machine that can reach the server:")
    ctx.out("")
    ctx.out(f"    CODER_AGENT_URL={url} CODER_AGENT_TOKEN={token} twistd -n --pidfile= coderstack-agent")
    ctx.out("")
    ctx.out("The token is shown only this once; `coderstack agent-token <name>` makes a new one.")


async def create(reactor: Any, opts: CreateOptions, ctx: Context) -> int:
    ws = await ctx.api.post("/api/v2/users/me/workspaces", {"name": opts["name"]})
    ctx.out(f"Workspace {ws['name']!r} created (agent {ws['agents'][0]['id']}).")
    _agent_instructions(ctx, ws["agent_token"])
    return 0


def _rows(workspaces: list[dict[str, Any]], show_owner: bool) -> list[list[str]]:
    rows = []
    for ws in workspaces:
        name = f"{ws['owner_name']}/{ws['name']}" if show_owner else ws["name"]
        for agent in ws["agents"] or [{}]:
            rows.append([
                name,
                agent.get("name", "-"),
                agent.get("status", "-"),
                "now" if agent.get("status") == "connected" else ago(agent.get("last_seen_at")),
            ])
    return rows


async def list_(reactor: Any, opts: ListOptions, ctx: Context) -> int:
    got = await ctx.api.get("/api/v2/workspaces" + ("?all=1" if opts["all"] else ""))
    if opts["output"] == "json":
        ctx.out(json.dumps(got["workspaces"], indent=2))
        return 0
    if not got["workspaces"]:
        ctx.err("No workspaces yet. Create one with: coderstack create <name>")
        return 0
    ctx.out(table(["WORKSPACE", "AGENT", "STATUS", "LAST SEEN"], _rows(got["workspaces"], opts["all"])))
    return 0


async def show(reactor: Any, opts: ShowOptions, ctx: Context) -> int:
    ws = await ctx.api.workspace_by_name(opts["name"])
    if opts["output"] == "json":
        ctx.out(json.dumps(ws, indent=2))
        return 0
    ctx.out(f"Workspace {ws['owner_name']}/{ws['name']}  (id {ws['id']}, created {ago(ws['created_at'])})")
    for agent in ws["agents"]:
        seen = "now" if agent["status"] == "connected" else ago(agent.get("last_seen_at"))
        ctx.out(f"  agent {agent['name']}: {agent['status']}, last seen {seen}")
        ctx.out(f"    id          {agent['id']}")
        ctx.out(f"    address     {agent['ip']}")
        ctx.out(f"    access URL  {agent['access_url']}")
    return 0


async def delete(reactor: Any, opts: DeleteOptions, ctx: Context) -> int:
    ws = await ctx.api.workspace_by_name(opts["name"])
    if not opts["yes"]:
        if not ctx.stdin.isatty():
            raise usage.UsageError("refusing to delete without --yes when not run from a terminal")
        ctx.stderr.write(f"Delete workspace {ws['name']!r}? [y/N] ")
        ctx.stderr.flush()
        if ctx.stdin.readline().strip().lower() not in ("y", "yes"):
            ctx.err("Not deleted.")
            return 1
    await ctx.api.delete(f"/api/v2/workspaces/{ws['id']}")
    ctx.out(f"Workspace {ws['name']!r} deleted.")
    return 0


async def agent_token(reactor: Any, opts: AgentTokenOptions, ctx: Context) -> int:
    ws = await ctx.api.workspace_by_name(opts["name"])
    got = await ctx.api.post(f"/api/v2/workspaces/{ws['id']}/agent-token")
    ctx.out(f"New agent token for {ws['name']!r}; the previous one no longer works.")
    _agent_instructions(ctx, got["agent_token"])
    return 0


COMMANDS = {
    "create": (CreateOptions, create),
    "list": (ListOptions, list_),
    "show": (ShowOptions, show),
    "delete": (DeleteOptions, delete),
    "agent-token": (AgentTokenOptions, agent_token),
}
