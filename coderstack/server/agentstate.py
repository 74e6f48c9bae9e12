"""The agent-facing lifecycle API: what an agent reports about itself.

All routes authenticate with the agent token (``Coder-Session-Token``) and answer errors as
``{"message", "detail"}``; times are RFC 3339 (``2026-12-01T23:59:59.123456Z``).

``GET  /api/v2/workspaceagents/me/manifest`` gains, from the agent's last build (agentspec.py):
``directory``, ``motd_path``, ``environment_variables``, ``scripts``, ``apps`` (each with its
current ``health``) and ``metadata``.

``POST  /api/v2/workspaceagents/me/report-lifecycle``  ``{"state", "changed_at"}`` -> 204;
        ``state`` is one of Coder's (``created starting start_timeout start_error ready
        shutting_down shutdown_timeout shutdown_error off``), anything else 400.
``PATCH /api/v2/workspaceagents/me/logs``  ``{"log_source_id", "logs": [{"created_at",
        "output", "level"}]}`` -> 200 ``{}``; at most 1000 lines and 1 MiB of output a request;
        level ``trace debug info warn error``; past the agent's 1 MiB in total -> 413
        ``{"message": "logs limit exceeded"}`` and nothing of the request is stored.
``POST  /api/v2/workspaceagents/me/log-source``  ``{"id", "display_name", "icon"}`` -> 201
        (idempotent).
``POST  /api/v2/workspaceagents/me/metadata``  ``{"metadata": [{"key", "value", "error",
        "collected_at"}]}`` -> 204; keys the manifest does not define are ignored; a value or
        error above 64 KiB is 400.
``POST  /api/v2/workspaceagents/me/app-health``  ``{"healths": {"<app id>": "healthy" |
        "unhealthy" | "initializing"}}`` -> 200 ``{}``; only apps with a healthcheck.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Protocol

from klein import Klein

from coderstack.server.agentevents import AgentEvents
from coderstack.server.agentstore import (
    APP_HEALTHS,
    LIFECYCLE_STATES,
    AgentStateStore,
    LogsOverflow,
    MetadataValue,
    UnknownApp,
)
from coderstack.server.jsonhttp import APIError, HTTPRequest, parse_uuid, read_json, write_json
from coderstack.server.records import Agent, Workspace


class ReportsHost(Protocol):
    """What these routes need of the API whose Klein app they join (its instance is their
    ``self``)."""

    agent_state: AgentStateStore
    agent_events: AgentEvents

    async def require_agent(self, request: HTTPRequest) -> tuple[Agent, Workspace]:
        """The agent whose token authenticates the request; APIError 401 without one."""
        ...


LOG_LEVELS = ("trace", "debug", "info", "warn", "error")
MAX_LOG_LINES = 1000
MAX_LOG_BATCH = 1 << 20
MAX_METADATA_FIELD = 64 * 1024
#: JSON bodies around the largest batches (escaping can double the output's size).
MAX_LOGS_BODY = 3 * MAX_LOG_BATCH
MAX_METADATA_BODY = 4 << 20


def parse_time(value: Any, name: str) -> datetime:
    if not isinstance(value, str):
        raise APIError(400, f"Field {name!r} must be an RFC 3339 time string.")
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise APIError(400, f"Field {name!r} is not an RFC 3339 time.", value[:64]) from None
    if t.tzinfo is None:
        raise APIError(400, f"Field {name!r} needs a time zone.", value[:64])
    return t.astimezone(UTC)


def _str(obj: dict[str, Any], name: str, default: str | None = None) -> str:
    value = obj.get(name, default)
    if not isinstance(value, str):
        raise APIError(400, f"Field {name!r} must be a string.")
    return value


def rfc3339(t: datetime | None) -> str | None:
    if t is None:
        return None
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def manifest_fields(agent_state: AgentStateStore, agent: Agent) -> dict[str, Any]:
    """The manifest's fields that come from the agent's build."""
    state = await agent_state.state(agent.id)
    spec = state.spec
    return {
        "directory": spec["directory"] or agent.directory,
        "motd_path": spec["motd_path"],
        "environment_variables": spec["environment_variables"],
        "scripts": spec["scripts"],
        "apps": spec["apps"],
        "metadata": spec["metadata"],
    }


def register(app: Klein) -> None:
    """Add the agent-facing lifecycle routes to the API's Klein app."""

    @app.route("/api/v2/workspaceagents/me/report-lifecycle", methods=["POST"],
               endpoint="agent_report_lifecycle")
    async def report_lifecycle(self: ReportsHost, request: HTTPRequest) -> bytes:
        agent, _ws = await self.require_agent(request)
        body = read_json(request)
        state = _str(body, "state", "")
        if state not in LIFECYCLE_STATES:
            raise APIError(400, f"Unknown lifecycle state {state!r}.", " ".join(LIFECYCLE_STATES))
        changed = parse_time(body["changed_at"], "changed_at") if "changed_at" in body else None
        await self.agent_state.report_lifecycle(agent.id, state, changed or datetime.now(UTC))
        self.agent_events.publish(agent.id, "lifecycle")
        request.setResponseCode(204)
        return b""

    @app.route("/api/v2/workspaceagents/me/logs", methods=["PATCH"], endpoint="agent_patch_logs")
    async def patch_logs(self: ReportsHost, request: HTTPRequest) -> bytes:
        agent, _ws = await self.require_agent(request)
        body = read_json(request, MAX_LOGS_BODY)
        source = parse_uuid(_str(body, "log_source_id", ""), "log_source_id")
        raw = body.get("logs")
        if not isinstance(raw, list):
            raise APIError(400, "Field 'logs' must be a list.")
        if len(raw) > MAX_LOG_LINES:
            raise APIError(400, f"At most {MAX_LOG_LINES} log lines per request.", str(len(raw)))
        lines = []
        for item in raw:
            if not isinstance(item, dict):
                raise APIError(400, "Each log must be an object.")
            level = _str(item, "level", "info")
            if level not in LOG_LEVELS:
                raise APIError(400, f"Unknown log level {level!r}.", " ".join(LOG_LEVELS))
            lines.append((parse_time(item.get("created_at"), "created_at"),
                          _str(item, "output"), level))
        if sum(len(o.encode()) for _, o, _ in lines) > MAX_LOG_BATCH:
            raise APIError(413, "Too much log output in one request.", f"at most {MAX_LOG_BATCH} bytes")
        try:
            await self.agent_state.append_logs(agent.id, source, lines)
        except LogsOverflow as err:
            self.agent_events.publish(agent.id, "logs")
            raise APIError(413, "logs limit exceeded", str(err)) from None
        except LookupError as err:
            raise APIError(400, "Unknown log source.", str(err)) from None
        self.agent_events.publish(agent.id, "logs")
        return write_json(request, {})

    @app.route("/api/v2/workspaceagents/me/log-source", methods=["POST"],
               endpoint="agent_log_source")
    async def log_source(self: ReportsHost, request: HTTPRequest) -> bytes:
        agent, _ws = await self.require_agent(request)
        body = read_json(request)
        sid = parse_uuid(_str(body, "id", ""), "id")
        name = _str(body, "display_name", "")
        icon = _str(body, "icon", "")
        if not name or len(name) > 256 or len(icon) > 2048:
            raise APIError(400, "A log source needs a display_name (at most 256 characters).")
        await self.agent_state.register_log_source(agent.id, sid, name, icon)
        return write_json(request, {"id": str(sid), "display_name": name, "icon": icon}, 201)

    @app.route("/api/v2/workspaceagents/me/metadata", methods=["POST"],
               endpoint="agent_post_metadata")
    async def post_metadata(self: ReportsHost, request: HTTPRequest) -> bytes:
        agent, _ws = await self.require_agent(request)
        body = read_json(request, MAX_METADATA_BODY)
        raw = body.get("metadata")
        if not isinstance(raw, list):
            raise APIError(400, "Field 'metadata' must be a list.")
        values = []
        for item in raw:
            if not isinstance(item, dict):
                raise APIError(400, "Each metadata result must be an object.")
            key, value, error = _str(item, "key"), _str(item, "value", ""), _str(item, "error", "")
            for name, text in (("value", value), ("error", error)):
                if len(text.encode()) > MAX_METADATA_FIELD:
                    raise APIError(400, f"Metadata {name} of {key[:64]!r} is too large.",
                                   f"at most {MAX_METADATA_FIELD} bytes")
            values.append(MetadataValue(key, value, error,
                                        parse_time(item.get("collected_at"), "collected_at")))
        if await self.agent_state.set_metadata(agent.id, values):
            self.agent_events.publish(agent.id, "metadata")
        request.setResponseCode(204)
        return b""

    @app.route("/api/v2/workspaceagents/me/app-health", methods=["POST"],
               endpoint="agent_app_health")
    async def app_health(self: ReportsHost, request: HTTPRequest) -> bytes:
        agent, _ws = await self.require_agent(request)
        raw = read_json(request).get("healths")
        if not isinstance(raw, dict):
            raise APIError(400, "Field 'healths' must be an object of app id -> health.")
        healths: dict[uuid.UUID, str] = {}
        for app_id, health in raw.items():
            if health not in APP_HEALTHS:
                raise APIError(400, f"Unknown app health {health!r}.", " ".join(APP_HEALTHS))
            healths[parse_uuid(app_id, "app id")] = health
        try:
            await self.agent_state.set_app_health(agent.id, healths)
        except UnknownApp as err:
            raise APIError(400, "No app with a healthcheck has that id.", str(err)) from None
        self.agent_events.publish(agent.id, "health")
        return write_json(request, {})
