"""What a build tells each agent to do, as the JSON the store keeps and the manifest serves.

:func:`agent_spec` turns a :class:`~coderstack.server.tfstate.Agent` read from the Terraform
state into one JSON object (stored per agent by ``Store.sync_agents``)::

    {"directory": "", "motd_path": "", "environment_variables": {"NAME": "value"},
     "scripts": [{"log_source_id", "display_name", "script", "cron", "run_on_start",
                  "run_on_stop", "start_blocks_login", "timeout_seconds", "log_path"}],
     "apps": [{"id", "slug", "display_name", "url", "command", "external", "subdomain",
               "sharing_level", "hidden", "order", "group", "open_in", "icon", "tooltip",
               "healthcheck": {"url", "interval", "threshold"} | null}],
     "metadata": [{"key", "display_name", "script", "interval", "timeout", "order"}],
     "log_sources": [{"id", "display_name", "icon"}],
     "startup_script_behavior": "non-blocking", "troubleshooting_url": "",
     "connection_timeout_seconds": 120, "display_apps": {"vscode": true, ...}}

Scripts are in Coder's order: the agent's ``startup_script`` first ("Startup Script", run on
start, blocking login iff ``startup_script_behavior`` is ``blocking``), then its
``shutdown_script`` ("Shutdown Script", run on stop), then each ``coder_script``.  A
``coder_script``'s log source is its resource id; the two agent scripts get a UUID derived from
the agent id and their name, so every source is stable for one build.  The environment is the
``coder_env`` merge with the agent's ``env`` on top (``tfstate.read_agents`` does that).
"""

from __future__ import annotations

import uuid
from typing import Any

from coderstack.provider.agent import DISPLAY_APPS_DEFAULTS
from coderstack.server.tfstate import Agent, ResourceMetadata

STARTUP_SCRIPT = "Startup Script"
SHUTDOWN_SCRIPT = "Shutdown Script"


def script_source_id(agent_id: str, name: str) -> str:
    """The log source of the agent's own startup or shutdown script."""
    return str(uuid.uuid5(uuid.UUID(agent_id), name))


def _script(source: str, name: str, script: str, **kw: Any) -> dict[str, Any]:
    out = {
        "log_source_id": source,
        "display_name": name,
        "script": script,
        "cron": "",
        "run_on_start": False,
        "run_on_stop": False,
        "start_blocks_login": False,
        "timeout_seconds": 0,
        "log_path": "",
    }
    out.update(kw)
    return out


def agent_spec(agent: Agent) -> dict[str, Any]:
    scripts = []
    sources = []
    if agent.startup_script:
        sid = script_source_id(agent.id, STARTUP_SCRIPT)
        scripts.append(_script(
            sid, STARTUP_SCRIPT, agent.startup_script, run_on_start=True,
            start_blocks_login=agent.startup_script_behavior == "blocking",
        ))
        sources.append({"id": sid, "display_name": STARTUP_SCRIPT, "icon": ""})
    if agent.shutdown_script:
        sid = script_source_id(agent.id, SHUTDOWN_SCRIPT)
        scripts.append(_script(sid, SHUTDOWN_SCRIPT, agent.shutdown_script, run_on_stop=True))
        sources.append({"id": sid, "display_name": SHUTDOWN_SCRIPT, "icon": ""})
    for s in agent.scripts:
        scripts.append(_script(
            s.id, s.display_name, s.script, cron=s.cron or "", run_on_start=s.run_on_start,
            run_on_stop=s.run_on_stop, start_blocks_login=s.start_blocks_login,
            timeout_seconds=s.timeout or 0, log_path=s.log_path or "",
        ))
        sources.append({"id": s.id, "display_name": s.display_name, "icon": s.icon or ""})
    apps = [
        {
            "id": a.id,
            "slug": a.slug,
            "display_name": a.display_name or a.slug,
            "url": a.url or "",
            "command": a.command or "",
            "external": a.external,
            "subdomain": a.subdomain,
            "sharing_level": a.share,
            "hidden": a.hidden,
            "order": a.order or 0,
            "group": a.group or "",
            "open_in": a.open_in,
            "icon": a.icon or "",
            "tooltip": a.tooltip or "",
            "healthcheck": {
                "url": a.healthcheck.url,
                "interval": a.healthcheck.interval,
                "threshold": a.healthcheck.threshold,
            }
            if a.healthcheck
            else None,
        }
        for a in agent.apps
    ]
    metadata = [
        {
            "key": m.key,
            "display_name": m.display_name or m.key,
            "script": m.script,
            "interval": m.interval,
            "timeout": m.timeout or 0,
            "order": m.order or 0,
        }
        for m in agent.metadata
    ]
    return {
        "directory": agent.dir or "",
        "motd_path": agent.motd_file or "",
        "environment_variables": dict(agent.env),
        "scripts": scripts,
        "apps": apps,
        "metadata": metadata,
        "log_sources": sources,
        "startup_script_behavior": agent.startup_script_behavior,
        "troubleshooting_url": agent.troubleshooting_url or "",
        "connection_timeout_seconds": agent.connection_timeout,
        "display_apps": dict(agent.display_apps),
    }


def empty_spec() -> dict[str, Any]:
    """The spec of an agent no build described (a workspace made without a template)."""
    return {
        "directory": "",
        "motd_path": "",
        "environment_variables": {},
        "scripts": [],
        "apps": [],
        "metadata": [],
        "log_sources": [],
        "startup_script_behavior": "non-blocking",
        "troubleshooting_url": "",
        "connection_timeout_seconds": 120,
        "display_apps": dict(DISPLAY_APPS_DEFAULTS),
    }


def resource_metadata_json(found: tuple[ResourceMetadata, ...]) -> list[dict[str, Any]]:
    """``coder_metadata`` as stored with the workspace (values in full; the API masks the
    sensitive ones)."""
    return [
        {
            "resource": m.resource,
            "resource_type": m.resource_type,
            "hide": m.hide,
            "icon": m.icon or "",
            "daily_cost": m.daily_cost,
            "items": [
                {"key": i.key, "value": i.value or "", "sensitive": i.sensitive,
                 "is_null": i.is_null}
                for i in m.items
            ],
        }
        for m in found
    ]
