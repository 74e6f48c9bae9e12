"""The parts of ``coderstack show`` that Coder's workspace page has: each agent's lifecycle,
metadata values (with their age or error), apps with their URL and health, scripts and the last
lines of their logs; and the resources' ``coder_metadata`` (sensitive values as "(sensitive)").
"""

from __future__ import annotations

from typing import Any

from coderstack.cli.agentlogs import fetch_logs, format_line, sources_of
from coderstack.cli.context import Context
from coderstack.cli.output import ago, table

#: Lines of script logs ``show`` prints per agent.
LOG_TAIL = 5


def lifecycle_text(agent: dict[str, Any]) -> str:
    state = agent.get("lifecycle_state") or "created"
    if state in ("ready", "start_error", "start_timeout") and agent.get("started_at") and agent.get(
            "ready_at"):
        from datetime import datetime

        took = (datetime.fromisoformat(agent["ready_at"])
                - datetime.fromisoformat(agent["started_at"])).total_seconds()
        return f"{state} (start took {took:.1f}s)"
    if state == "starting" and agent.get("started_at"):
        return f"starting (since {ago(agent['started_at'])})"
    return state


def healthy(agent: dict[str, Any]) -> str:
    """Coder's HEALTHY: connected, started without trouble, every checked app healthy."""
    ok = agent.get("status") == "connected" and agent.get("lifecycle_state") == "ready"
    ok = ok and all(a.get("health") in ("healthy", "disabled") for a in agent.get("apps") or [])
    return "true" if ok else "false"


def metadata_rows(items: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for item in items:
        d, r = item["description"], item["result"]
        if r.get("error"):
            value = f"error: {r['error'].splitlines()[0] if r['error'].strip() else r['error']}"
        elif r.get("collected_at"):
            value = r.get("value", "").strip()
        else:
            value = "(not collected yet)"
        when = ago(r["collected_at"]) if r.get("collected_at") else ""
        rows.append([d.get("display_name") or d["key"], value, when])
    return rows


def app_rows(apps: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for app in sorted(apps, key=lambda a: (a.get("order", 0), a["slug"])):
        if app.get("hidden"):
            continue
        # Through the server when it serves the app; else where the app itself listens.
        where = app.get("browser_url") or app.get("url") or (
            f"command: {app['command']}" if app.get("command") else "")
        if app.get("external"):
            where += " (external)"
        rows.append([app.get("display_name") or app["slug"], where, app.get("health", "disabled")])
    return rows


def script_text(script: dict[str, Any]) -> str:
    when = []
    if script.get("run_on_start"):
        when.append("on start")
    if script.get("run_on_stop"):
        when.append("on stop")
    if script.get("cron"):
        when.append(f"cron {script['cron']}")
    if script.get("start_blocks_login"):
        when.append("blocks login")
    if script.get("timeout_seconds"):
        when.append(f"timeout {script['timeout_seconds']}s")
    return f"{script['display_name']} ({', '.join(when)})"


def indent(text: str, by: str) -> list[str]:
    return [by + line for line in text.splitlines()]


async def agent_lines(ctx: Context, agent_id: str) -> list[str]:
    """The lifecycle parts of one agent, as lines (already indented for ``show``)."""
    agent = await ctx.api.get(f"/api/v2/workspaceagents/{agent_id}")
    out = [f"    lifecycle   {lifecycle_text(agent)}"]
    if agent.get("troubleshooting_url"):
        out.append(f"    troubleshooting {agent['troubleshooting_url']}")
    metadata = await ctx.api.get(f"/api/v2/workspaceagents/{agent_id}/metadata")
    if metadata:
        out.append("    metadata:")
        out += indent(table(["NAME", "VALUE", "COLLECTED"], metadata_rows(metadata)), "      ")
    rows = app_rows(agent.get("apps") or [])
    if rows:
        out.append("    apps:")
        out += indent(table(["APP", "URL", "HEALTH"], rows), "      ")
    if agent.get("scripts"):
        out.append("    scripts:")
        out += [f"      {script_text(s)}" for s in agent["scripts"]]
    logs = await fetch_logs(ctx, agent_id)
    if logs:
        sources = sources_of(agent)
        out.append(f"    logs (last {min(LOG_TAIL, len(logs))} of {len(logs)} lines; "
                   "all with `coderstack logs`):")
        out += [f"      {format_line(line, sources)}" for line in logs[-LOG_TAIL:]]
    if agent.get("logs_overflowed"):
        out.append("    (the logs passed the 1 MiB limit: later lines were not kept)")
    return out


async def resource_lines(ctx: Context, workspace_id: str) -> list[str]:
    got = await ctx.api.get(f"/api/v2/workspaces/{workspace_id}/resources")
    out = []
    for res in got.get("resources") or []:
        if res.get("hide"):
            continue
        head = f"  resource {res['name']}"
        if res.get("daily_cost"):
            head += f"  (daily cost {res['daily_cost']})"
        out.append(head)
        rows = [[m["key"], "(sensitive)" if m.get("sensitive") else
                 ("(null)" if m.get("is_null") else m.get("value", ""))]
                for m in res.get("metadata") or []]
        if rows:
            out += indent(table(["KEY", "VALUE"], rows), "    ")
    return out
