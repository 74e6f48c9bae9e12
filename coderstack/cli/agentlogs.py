"""``coderstack logs WS [--follow] [--output json]``: the agent's script logs.

A line prints as ``<time> [<source>] <output>`` (the level too when it is not ``info``);
``--output json`` prints the API's objects, one per line, with the source's ``source_name``.
``--follow`` keeps printing new lines until interrupted.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from twisted.python import usage

from coderstack.cli.command import Command
from coderstack.cli.context import Context


class Options(Command):
    synopsis = "coderstack logs <workspace> [--follow] [--output text|json]"
    longdesc = "Print the logs of a workspace's agent: the output of its startup and other scripts."
    optFlags = [["follow", "f", "Keep printing new lines as they arrive."]]
    optParameters = [["output", "o", "text", "Output format: text or json."]]

    def parseArgs(self, workspace: str) -> None:  # type: ignore[override]  # usage.Options passes the positional arguments to it, one parameter each
        self["workspace"] = workspace

    def postOptions(self) -> None:
        if self["output"] not in ("text", "json"):
            raise usage.UsageError(f"invalid value for --output: {self['output']!r} (text or json)")


def format_line(line: dict[str, Any], sources: dict[str, str]) -> str:
    name = sources.get(line.get("source_id", ""), "Agent")
    try:
        when = datetime.fromisoformat(line["created_at"]).strftime("%H:%M:%S.%f")[:-3]
    except (KeyError, TypeError, ValueError):
        when = "--:--:--.---"
    level = line.get("level", "info")
    mark = "" if level == "info" else f" {level.upper()}"
    return f"{when} [{name}]{mark} {line.get('output', '')}"


def sources_of(agent: dict[str, Any]) -> dict[str, str]:
    return {s["id"]: s["display_name"] for s in agent.get("log_sources") or []}


async def fetch_logs(ctx: Context, agent_id: str, after: int = 0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    await ctx.api.stream_json_lines(f"/api/v2/workspaceagents/{agent_id}/logs?after={after}",
                                    got.append)
    return got


async def run(reactor: Any, opts: Options, ctx: Context) -> int:
    ws = await ctx.api.workspace_by_name(opts["workspace"])
    if not ws.get("agents"):
        ctx.err(f"Workspace {ws['name']!r} has no agent.")
        return 1
    agent = await ctx.api.get(f"/api/v2/workspaceagents/{ws['agents'][0]['id']}")
    sources = sources_of(agent)

    def emit(line: dict[str, Any]) -> None:
        if opts["output"] == "json":
            name = sources.get(line.get("source_id", ""), "Agent")
            ctx.out(json.dumps({**line, "source_name": name}))
        else:
            ctx.out(format_line(line, sources))

    path = f"/api/v2/workspaceagents/{agent['id']}/logs"
    if opts["follow"]:
        await ctx.api.stream_json_lines(path + "?follow=true", emit)
        return 0
    for line in await fetch_logs(ctx, agent["id"]):
        emit(line)
    if agent.get("logs_overflowed"):
        ctx.err("The agent's logs passed the 1 MiB limit: later lines were not kept.")
    return 0
