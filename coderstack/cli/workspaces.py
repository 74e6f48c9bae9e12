"""Workspace commands: ``create``, ``list``, ``show``, ``start``, ``stop``, ``delete``,
``agent-token``.

Workspaces are named ``NAME`` (yours) or ``OWNER/NAME``. Without ``--template``, ``create`` and
``agent-token`` print the agent token exactly once (the server keeps only its hash) and you start
the agent yourself. With ``--template``, ``create`` runs a build (terraform init + apply on the
server, which starts the agents) and streams its log; ``stop``/``start`` run builds with those
transitions and ``delete`` runs a destroy build, then the server forgets the workspace.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.python import usage

from coderstack.cli import agentshow
from coderstack.cli.command import Command
from coderstack.cli.context import Context
from coderstack.cli.output import OutputOption, ago, table


class _NameArg(Command):
    def parseArgs(self, name: str) -> None:  # type: ignore[override]  # usage.Options passes the positional arguments to it, one parameter each
        self["name"] = name


class CreateOptions(_NameArg):
    synopsis = "coderstack create <name> [--template T]"
    optParameters = [
        ["template", "t", None, "Build the workspace from this template (see `templates list`)."],
    ]


class StartOptions(_NameArg):
    synopsis = "coderstack start <name>"


class StopOptions(_NameArg):
    synopsis = "coderstack stop <name>"


class ListOptions(OutputOption, Command):
    synopsis = "coderstack list [--output table|json] [--all]"
    optFlags = [["all", "a", "Every user's workspaces (owners only)."]]


class ShowOptions(OutputOption, _NameArg):
    synopsis = "coderstack show <name> [--output table|json]"


class DeleteOptions(_NameArg):
    synopsis = "coderstack delete <name> [--yes] [--orphan]"
    optFlags = [
        ["yes", "y", "Do not ask for confirmation."],
        ["orphan", None, "Forget a template workspace without running terraform destroy."],
    ]


class AgentTokenOptions(_NameArg):
    synopsis = "coderstack agent-token <name>"


def _agent_instructions(ctx: Context, token: str) -> None:
    url = ctx.server_url()
    ctx.out("Start its agent on any machine that can reach the server:")
    ctx.out("")
    ctx.out(f"    CODER_AGENT_URL={url} CODER_AGENT_TOKEN={token} twistd -n --pidfile= coderstack-agent")
    ctx.out("")
    ctx.out("The token is shown only this once; `coderstack agent-token <name>` makes a new one.")


async def follow_build(ctx: Context, build: dict[str, Any]) -> dict[str, Any]:
    """Print a build's log as it happens; returns the finished build."""
    ctx.err(f"Build #{build['build_number']} ({build['transition']}) of the workspace:")
    final: dict[str, Any] = {}

    def on_object(obj: dict[str, Any]) -> None:
        if "output" in obj:
            ctx.out(f"  {obj['output']}")
        elif "build" in obj:
            final.update(obj["build"])

    await ctx.api.stream_json_lines(f"/api/v2/workspacebuilds/{build['id']}/logs?follow=true", on_object)
    if not final:  # the stream ended early: ask for the build's state
        final = await ctx.api.get(f"/api/v2/workspacebuilds/{build['id']}")
    return final


def _build_failed(ctx: Context, build: dict[str, Any]) -> int:
    ctx.err(f"error: the {build['transition']} build failed:")
    for line in (build.get("error") or "(no message)").splitlines():
        ctx.err(f"  {line}")
    return 1


async def _transition(ctx: Context, name: str, transition: str) -> tuple[dict[str, Any], dict[str, Any]]:
    ws = await ctx.api.workspace_by_name(name)
    build = await ctx.api.post(f"/api/v2/workspaces/{ws['id']}/builds", {"transition": transition})
    return ws, await follow_build(ctx, build)


async def create(reactor: Any, opts: CreateOptions, ctx: Context) -> int:
    if opts["template"]:
        ws = await ctx.api.post(
            "/api/v2/users/me/workspaces", {"name": opts["name"], "template_name": opts["template"]}
        )
        build = await follow_build(ctx, ws["latest_build"])
        if build["status"] != "succeeded":
            _build_failed(ctx, build)
            ctx.err(f"The workspace is kept, without agents: fix the template and run "
                    f"`coderstack start {ws['name']}`, or remove it with `coderstack delete {ws['name']}`.")
            return 1
        ctx.out(f"Workspace {ws['name']!r} created from template {opts['template']!r}.")
        ctx.out(f"Its agents are starting; see them with: coderstack show {ws['name']}")
        return 0
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
                agent.get("lifecycle_state", "-") if agent else "-",
                agentshow.healthy(agent) if agent else "-",
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
    ctx.out(table(["WORKSPACE", "AGENT", "STATUS", "LIFECYCLE", "HEALTHY", "LAST SEEN"],
                  _rows(got["workspaces"], opts["all"])))
    return 0


async def show(reactor: Any, opts: ShowOptions, ctx: Context) -> int:
    ws = await ctx.api.workspace_by_name(opts["name"])
    if opts["output"] == "json":
        ctx.out(json.dumps(ws, indent=2))
        return 0
    ctx.out(f"Workspace {ws['owner_name']}/{ws['name']}  (id {ws['id']}, created {ago(ws['created_at'])})")
    build = ws.get("latest_build")
    if ws.get("template_name") or build:
        state = f"build #{build['build_number']} {build['transition']} {build['status']}" if build else "no build"
        ctx.out(f"  template {ws.get('template_name') or '(deleted)'}: {state}")
        if build and build.get("error"):
            ctx.out(f"    error: {build['error'].splitlines()[0] if build['error'] else ''}")
    for agent in ws["agents"]:
        seen = "now" if agent["status"] == "connected" else ago(agent.get("last_seen_at"))
        ctx.out(f"  agent {agent['name']}: {agent['status']}, last seen {seen}")
        ctx.out(f"    id          {agent['id']}")
        ctx.out(f"    address     {agent['ip']}")
        ctx.out(f"    access URL  {agent['access_url']}")
        for line in await agentshow.agent_lines(ctx, agent["id"]):
            ctx.out(line)
    for line in await agentshow.resource_lines(ctx, ws["id"]):
        ctx.out(line)
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
    if ws.get("template_id") and not opts["orphan"]:
        build = await ctx.api.post(f"/api/v2/workspaces/{ws['id']}/builds", {"transition": "destroy"})
        build = await follow_build(ctx, build)
        if build["status"] != "succeeded":
            return _build_failed(ctx, build)
        ctx.out(f"Workspace {ws['name']!r} destroyed and deleted.")
        return 0
    suffix = "?orphan=true" if opts["orphan"] else ""
    await ctx.api.delete(f"/api/v2/workspaces/{ws['id']}{suffix}")
    ctx.out(f"Workspace {ws['name']!r} deleted.")
    return 0


async def _build_and_report(ctx: Context, name: str, transition: str, done: str) -> int:
    ws, build = await _transition(ctx, name, transition)
    if build["status"] != "succeeded":
        return _build_failed(ctx, build)
    ctx.out(f"Workspace {ws['name']!r} {done}.")
    return 0


async def start(reactor: Any, opts: StartOptions, ctx: Context) -> int:
    return await _build_and_report(ctx, opts["name"], "start", "started")


async def stop(reactor: Any, opts: StopOptions, ctx: Context) -> int:
    return await _build_and_report(ctx, opts["name"], "stop", "stopped")


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
    "start": (StartOptions, start),
    "stop": (StopOptions, stop),
    "agent-token": (AgentTokenOptions, agent_token),
}
