"""``coderstack open app <workspace>[.agent] <slug> [--open]``: the URL a browser opens a
workspace app at (through the server: path-based, or its own subdomain), printed; ``--open``
also hands it to the system's browser."""

from __future__ import annotations

import webbrowser
from typing import Any

from twisted.python import usage

from coderstack.cli.command import Command, CommandGroup
from coderstack.cli.context import Context


class AppOptions(Command):
    synopsis = "coderstack open app <workspace>[.<agent>] <app slug> [--open]"
    longdesc = "Print the URL of a workspace app, as the server serves it to browsers."
    optFlags = [["open", None, "Also open the URL in this machine's browser."]]

    def parseArgs(self, workspace: str, slug: str) -> None:  # type: ignore[override]  # usage.Options passes the positional arguments to it, one parameter each
        self["workspace"] = workspace
        self["slug"] = slug


class OpenOptions(CommandGroup):
    synopsis = "coderstack open <app>"
    subCommands = [["app", None, AppOptions, "The URL of a workspace app (and --open it)."]]


def _agent_of(ws: dict[str, Any], name: str | None) -> dict[str, Any]:
    agents = ws.get("agents") or []
    if name is not None:
        for agent in agents:
            if agent["name"] == name:
                return agent
        raise usage.UsageError(f"workspace {ws['name']!r} has no agent {name!r}")
    if len(agents) != 1:
        raise usage.UsageError(
            f"workspace {ws['name']!r} has {len(agents)} agents: name one as {ws['name']}.<agent>")
    return agents[0]


async def run(reactor: Any, opts: OpenOptions, ctx: Context) -> int:
    sub = opts.subOptions
    name, _dot, agent_name = sub["workspace"].partition(".")
    ws = await ctx.api.workspace_by_name(name)
    agent = await ctx.api.get(f"/api/v2/workspaceagents/{_agent_of(ws, agent_name or None)['id']}")
    apps = {a["slug"]: a for a in agent.get("apps") or []}
    app = apps.get(sub["slug"])
    if app is None:
        known = ", ".join(sorted(apps)) or "none"
        ctx.err(f"error: workspace {ws['name']!r} has no app {sub['slug']!r} (apps: {known})")
        return 1
    url = app.get("browser_url")
    if not url:
        why = ("it runs a command" if app.get("command") and not app.get("url")
               else "the server does not serve it (subdomain apps need --wildcard-access-url; "
                    "path apps may be disabled)")
        ctx.err(f"error: app {sub['slug']!r} has no browser URL: {why}")
        return 1
    ctx.out(url)
    if sub["open"] and not webbrowser.open(url):
        ctx.err("error: no browser found on this machine; open the URL above yourself")
        return 1
    return 0


Options = OpenOptions
