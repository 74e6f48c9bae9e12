"""``coderstack port-share list|add|remove <workspace>[.agent] [PORT]``: share a workspace's
listening ports with other users through the server (each port opens on its own subdomain,
``PORT--agent--workspace--user.<wildcard>``; unshared, only the owner opens it)."""

from __future__ import annotations

import json
from typing import Any

from twisted.python import usage

from coderstack.cli.command import Command, CommandGroup
from coderstack.cli.context import Context
from coderstack.cli.output import OutputOption, table
from coderstack.wire.ports import MIN_FORWARDED_PORT

LEVELS = ("owner", "authenticated", "public")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise usage.UsageError(f"PORT must be a number, not {text!r}") from None
    if not MIN_FORWARDED_PORT <= port <= 65535:
        raise usage.UsageError(f"PORT must be from {MIN_FORWARDED_PORT} to 65535 (got {port})")
    return port


class ListOptions(OutputOption, Command):
    synopsis = "coderstack port-share list <workspace> [--output table|json]"

    def parseArgs(self, workspace: str | None = None) -> None:
        if not workspace:
            raise usage.UsageError("missing WORKSPACE: coderstack port-share list WORKSPACE")
        self["workspace"] = workspace


class AddOptions(Command):
    synopsis = "coderstack port-share add <workspace>[.<agent>] PORT [--share-level L] [--protocol P]"
    optParameters = [
        ["share-level", None, "authenticated", "Who may open it: owner, authenticated or public."],
        ["protocol", None, "http", "What the port speaks: http or https."],
    ]

    def parseArgs(self, workspace: str | None = None, port: str | None = None) -> None:
        if not workspace or not port:
            raise usage.UsageError("missing arguments: coderstack port-share add WORKSPACE[.AGENT] PORT")
        self["workspace"], self["port"] = workspace, _port(port)

    def postOptions(self) -> None:
        if self["share-level"] not in LEVELS:
            raise usage.UsageError(f"--share-level must be one of {', '.join(LEVELS)} (got {self['share-level']!r})")
        if self["protocol"] not in ("http", "https"):
            raise usage.UsageError(f"--protocol must be http or https (got {self['protocol']!r})")


class RemoveOptions(Command):
    synopsis = "coderstack port-share remove <workspace>[.<agent>] PORT"

    def parseArgs(self, workspace: str | None = None, port: str | None = None) -> None:
        if not workspace or not port:
            raise usage.UsageError("missing arguments: coderstack port-share remove WORKSPACE[.AGENT] PORT")
        self["workspace"], self["port"] = workspace, _port(port)


class PortShareOptions(CommandGroup):
    aliases = {"ls": "list", "rm": "remove"}
    synopsis = "coderstack port-share <list|add|remove>"
    subCommands = [
        ["list", None, ListOptions, "List the workspace's shared ports (alias: ls)."],
        ["add", None, AddOptions, "Share a port, or change how it is shared."],
        ["remove", None, RemoveOptions, "Stop sharing a port (alias: rm)."],
    ]


def _agent_name(ws: dict[str, Any], name: str) -> str:
    agents = [a["name"] for a in ws.get("agents") or []]
    if name:
        if name not in agents:
            raise usage.UsageError(f"workspace {ws['name']!r} has no agent {name!r} (agents: {', '.join(agents)})")
        return name
    if len(agents) != 1:
        raise usage.UsageError(f"workspace {ws['name']!r} has {len(agents)} agents: name one as {ws['name']}.<agent>")
    return str(agents[0])


async def run(reactor: Any, opts: PortShareOptions, ctx: Context) -> int:
    sub = opts.subOptions
    name, _dot, agent = sub["workspace"].partition(".")
    ws = await ctx.api.workspace_by_name(name)
    path = f"/api/v2/workspaces/{ws['id']}/port-share"
    if opts.subCommand == "add":
        share = await ctx.api.post(path, {"agent_name": _agent_name(ws, agent), "port": sub["port"],
                                          "share_level": sub["share-level"], "protocol": sub["protocol"]})
        ctx.out(f"Port {share['port']} of {ws['name']}.{share['agent_name']} is shared: {share['share_level']}.")
        return 0
    if opts.subCommand == "remove":
        got = await ctx.api.request("DELETE", path, {"agent_name": _agent_name(ws, agent), "port": sub["port"]})
        ctx.out(got["message"])
        return 0
    shares = (await ctx.api.get(path))["shares"]
    if sub["output"] == "json":
        ctx.out(json.dumps(shares, indent=2))
        return 0
    ctx.out(table(["AGENT", "PORT", "SHARE", "PROTOCOL"],
                  [[s["agent_name"], str(s["port"]), s["share_level"], s["protocol"]] for s in shares]))
    return 0


Options = PortShareOptions
