"""``coderstack ssh --wait=yes|no|auto``: wait for the agent's startup scripts before connecting.

Coder's semantics: ``yes`` waits while the agent is still starting (lifecycle ``created`` or
``starting``); ``auto`` (the default) waits only when one of its scripts blocks login; ``no``
never waits.  While waiting, the scripts' logs are printed to stderr as they arrive.  A start
that ended in ``start_error`` or ``start_timeout`` prints a warning, and the connection goes
ahead all the same: the workspace is reachable, maybe just not fully set up.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.python import usage

from coderstack.cli.agentlogs import fetch_logs, format_line, sources_of
from coderstack.cli.context import Context

WAIT_CHOICES = ("yes", "no", "auto")
STARTING = ("created", "starting")
#: Seconds between looks at the agent while waiting.
POLL_SECONDS = 1.0


def wait_mode(flag: str | None, environ: dict[str, str]) -> str:
    """The ``--wait`` value (``CODER_SSH_WAIT`` when the flag is not given); a usage error
    naming the flag for anything but yes, no or auto."""
    value = flag if flag is not None else environ.get("CODER_SSH_WAIT", "auto")
    if value not in WAIT_CHOICES:
        where = "" if flag is not None else " (from CODER_SSH_WAIT)"
        raise usage.UsageError(f"invalid value for --wait{where}: {value!r} (yes, no or auto)")
    return value


def should_wait(mode: str, agent: dict[str, Any]) -> bool:
    if mode == "no" or agent.get("lifecycle_state", "created") not in STARTING:
        return False
    if mode == "yes":
        return True
    return any(s.get("start_blocks_login") for s in agent.get("scripts") or [])


def start_warning(agent: dict[str, Any], workspace: str) -> list[str]:
    """What to tell the user about a start that did not end well (nothing when it did)."""
    state = agent.get("lifecycle_state")
    if state == "start_error":
        lines = ["Warning: a startup script of the workspace failed; it may not be fully set up."]
    elif state == "start_timeout":
        lines = ["Warning: a startup script of the workspace ran past its timeout; it may not "
                 "be fully set up."]
    else:
        return []
    lines.append(f"  See what the scripts printed with: coderstack logs {workspace}")
    if agent.get("troubleshooting_url"):
        lines.append(f"  Troubleshooting: {agent['troubleshooting_url']}")
    return lines


async def wait_for_agent(reactor: Any, ctx: Context, workspace: str, mode: str) -> None:
    if mode == "no":
        return  # not even a look: --wait=no connects at once
    ws = await ctx.api.workspace_by_name(workspace)
    if not ws.get("agents"):
        return  # nothing to wait for; connecting says why it cannot go on
    path = f"/api/v2/workspaceagents/{ws['agents'][0]['id']}"
    agent = await ctx.api.get(path)
    if should_wait(mode, agent):
        ctx.err(f"Waiting for the startup scripts of workspace {ws['name']!r} to finish "
                "(--wait=no connects at once)...")
        after = 0
        while True:
            sources = sources_of(agent)
            for line in await fetch_logs(ctx, agent["id"], after):
                ctx.err(format_line(line, sources))
                after = line["id"]
            if agent.get("lifecycle_state") not in STARTING:
                break
            await task.deferLater(reactor, POLL_SECONDS, lambda: None)
            agent = await ctx.api.get(path)
    for warning in start_warning(agent, ws["name"]):
        ctx.err(warning)
