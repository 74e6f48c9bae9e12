"""The user-facing lifecycle API: an agent's state, logs and metadata, a workspace's resources.

Every route needs a session token and answers only for the caller's own agents (another user's
agent is "not found", as a missing one is).

``GET /api/v2/workspaceagents/{id}`` gains ``lifecycle_state``, ``started_at``, ``ready_at``,
``startup_script_behavior``, ``logs_length``, ``logs_overflowed``, ``log_sources``, ``apps``
(with ``health``), ``scripts``, ``troubleshooting_url``, ``display_apps`` and
``connection_timeout_seconds``.

``GET /api/v2/workspaceagents/{id}/logs?after=<id>&follow=true``: newline-delimited JSON, one
``{"id", "created_at", "output", "level", "source_id"}`` per line, ids ascending; with
``follow`` the response stays open and new lines follow as the agent sends them.

``GET /api/v2/workspaceagents/{id}/metadata``: ``[{"description": {"key", "display_name",
"script", "interval", "timeout"}, "result": {"collected_at", "age", "value", "error"}}]``
(``collected_at`` null and ``age`` 0 until a first value).
``GET /api/v2/workspaceagents/{id}/watch-metadata``: server-sent events; ``event: data`` with
that list at the start and on every change, and a ``: keep-alive`` comment between.

``GET /api/v2/workspaces/{id}/resources``: ``{"resources": [{"name", "type", "hide", "icon",
"daily_cost", "metadata": [{"key", "value", "sensitive", "is_null"}]}]}`` from the last build's
``coder_metadata``; a sensitive value is never sent (``value`` is "").
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from klein import Klein
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.error import AlreadyCancelled
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from coderstack.server.agentevents import AgentEvents
from coderstack.server.agentstate import rfc3339
from coderstack.server.agentstore import AgentStateStore, LogLine
from coderstack.server.jsonhttp import (
    APIError,
    HTTPRequest,
    query_flag,
    query_value,
    set_headers,
    write_json,
)
from coderstack.server.records import Agent, User, Workspace


class ViewsHost(Protocol):
    """What these routes need of the API whose Klein app they join (its instance is their
    ``self``)."""

    agent_state: AgentStateStore
    agent_events: AgentEvents

    @property
    def clock(self) -> IReactorTime:
        """Times the streams' re-reads and keep-alives."""
        ...

    async def my_agent(self, request: HTTPRequest, agent_id: str) -> tuple[User, Agent, Workspace]:
        """The caller, and the agent (of one of the caller's workspaces) ``agent_id`` names;
        APIError 404 for any other."""
        ...

    async def my_workspace(self, request: HTTPRequest, workspace_id: str) -> Workspace:
        """The caller's workspace ``workspace_id`` names; APIError 404 for any other."""
        ...


log = Logger()

#: Streams also re-read the store this often (notices from another replica do not reach us).
REREAD_SECONDS = 5.0
KEEPALIVE_SECONDS = 15.0


async def agent_fields(agent_state: AgentStateStore, agent: Agent) -> dict[str, Any]:
    """The agent's fields that come from its build and its reports."""
    state = await agent_state.state(agent.id)
    spec = state.spec
    return {
        "lifecycle_state": state.lifecycle_state,
        "started_at": rfc3339(state.started_at),
        "ready_at": rfc3339(state.ready_at),
        "startup_script_behavior": spec["startup_script_behavior"],
        "logs_length": state.logs_length,
        "logs_overflowed": state.logs_overflowed,
        "log_sources": state.log_sources,
        "apps": spec["apps"],
        "scripts": [
            {k: s[k] for k in ("log_source_id", "display_name", "run_on_start", "run_on_stop",
                               "start_blocks_login", "cron", "timeout_seconds")}
            for s in spec["scripts"]
        ],
        "troubleshooting_url": spec["troubleshooting_url"],
        "display_apps": spec["display_apps"],
        "connection_timeout_seconds": spec["connection_timeout_seconds"],
        "motd_path": spec["motd_path"],
    }


def log_json(line: LogLine) -> bytes:
    return json.dumps({
        "id": line.id,
        "created_at": rfc3339(line.created_at),
        "output": line.output,
        "level": line.level,
        "source_id": str(line.source_id),
    }).encode() + b"\n"


async def metadata_list(agent_state: AgentStateStore, agent_id: uuid.UUID) -> list[dict[str, Any]]:
    defs, latest = await agent_state.metadata(agent_id)
    t = datetime.now(UTC)
    out = []
    for d in sorted(defs, key=lambda d: (d.get("order", 0), d["key"])):
        got = latest.get(d["key"])
        out.append({
            "description": {k: d[k] for k in ("key", "display_name", "script", "interval",
                                              "timeout")},
            "result": {
                "collected_at": rfc3339(got.collected_at) if got else None,
                "age": max(0, int((t - got.collected_at).total_seconds())) if got else 0,
                "value": got.value if got else "",
                "error": got.error if got else "",
            },
        })
    return out


class _Follower:
    """Re-reads the store when told (or on the timer), one read at a time, and writes what is
    new to a streaming response."""

    def __init__(
        self,
        events: AgentEvents,
        clock: IReactorTime,
        agent_id: uuid.UUID,
        kinds: tuple[str, ...],
        read: Callable[[], Awaitable[None]],
    ) -> None:
        self.events, self.clock = events, clock
        self.agent_id, self.kinds, self.read = agent_id, kinds, read
        self.busy = self.again = self.gone = False
        self.ended: Deferred[None] = Deferred()

    def poke(self, kind: str = "") -> None:
        if not kind or kind in self.kinds:
            Deferred.fromCoroutine(self._pump())

    async def _pump(self) -> None:
        if self.busy:
            self.again = True
            return
        self.busy = True
        try:
            while not self.gone:
                self.again = False
                await self.read()
                if not self.again:
                    break
        except Exception:
            log.failure("streaming agent {id} failed", id=self.agent_id)
        finally:
            self.busy = False

    async def run(
        self, request: HTTPRequest, interval: float, on_tick: Callable[[], None] | None = None
    ) -> None:
        unsubscribe = self.events.subscribe(self.agent_id, self.poke)
        timer = task.LoopingCall(on_tick or self.poke)
        timer.clock = self.clock

        def lost(_: Any) -> None:
            self.gone = True
            if not self.ended.called:
                self.ended.callback(None)

        request.notifyFinish().addBoth(lost)
        timer.start(interval, now=True)
        try:
            await self.ended
        finally:
            unsubscribe()
            self.gone = True
            if timer.running:
                try:
                    timer.stop()
                except AlreadyCancelled:  # the reactor is being torn down under us
                    pass


def register(app: Klein) -> None:
    """Add the user-facing lifecycle routes to the API's Klein app."""

    @app.route("/api/v2/workspaceagents/<string:agent_id>/logs", methods=["GET"],
               endpoint="user_agent_logs")
    async def agent_logs(self: ViewsHost, request: HTTPRequest, agent_id: str) -> bytes:
        _user, agent, _ws = await self.my_agent(request, agent_id)
        raw_after = query_value(request, b"after", b"0")
        try:
            after = int(raw_after)
        except ValueError:
            raise APIError(400, "Query 'after' must be a log id.", repr(raw_after)[:64]) from None
        follow = query_flag(request, b"follow")
        set_headers(request, b"application/x-ndjson")
        if not follow:
            return b"".join(log_json(x) for x in await self.agent_state.logs(agent.id, after))
        last = after
        follower: _Follower

        async def read() -> None:
            nonlocal last
            for line in await self.agent_state.logs(agent.id, last):
                if follower.gone:
                    return
                request.write(log_json(line))
                last = line.id

        follower = _Follower(self.agent_events, self.clock, agent.id, ("logs",), read)
        await follower.run(request, REREAD_SECONDS)
        return b""

    @app.route("/api/v2/workspaceagents/<string:agent_id>/metadata", methods=["GET"],
               endpoint="user_agent_metadata")
    async def agent_metadata(self: ViewsHost, request: HTTPRequest, agent_id: str) -> bytes:
        _user, agent, _ws = await self.my_agent(request, agent_id)
        return write_json(request, await metadata_list(self.agent_state, agent.id))

    @app.route("/api/v2/workspaceagents/<string:agent_id>/watch-metadata", methods=["GET"],
               endpoint="user_agent_watch_metadata")
    async def watch_metadata(self: ViewsHost, request: HTTPRequest, agent_id: str) -> bytes:
        _user, agent, _ws = await self.my_agent(request, agent_id)
        set_headers(request, b"text/event-stream")
        sent: list[Any] = [None]
        follower: _Follower

        async def read() -> None:
            items = await metadata_list(self.agent_state, agent.id)
            # A change is a new value, error or collection, not an older age.
            fingerprint = [(i["description"], {**i["result"], "age": None}) for i in items]
            if fingerprint != sent[0] and not follower.gone:
                sent[0] = fingerprint
                request.write(b"event: data\ndata: " + json.dumps(items).encode() + b"\n\n")

        def tick() -> None:
            if sent[0] is not None and not follower.gone:
                request.write(b": keep-alive\n\n")
            follower.poke()

        follower = _Follower(self.agent_events, self.clock, agent.id, ("metadata",), read)
        await follower.run(request, KEEPALIVE_SECONDS, tick)
        return b""

    @app.route("/api/v2/workspaces/<string:workspace_id>/resources", methods=["GET"],
               endpoint="user_workspace_resources")
    async def workspace_resources(self: ViewsHost, request: HTTPRequest, workspace_id: str) -> bytes:
        ws = await self.my_workspace(request, workspace_id)
        found = await self.agent_state.resource_metadata(ws.id)
        resources = []
        for m in found:
            resources.append({
                "name": m["resource"],
                "type": m["resource_type"],
                "hide": m["hide"],
                "icon": m["icon"],
                "daily_cost": m["daily_cost"],
                "metadata": [
                    {"key": i["key"], "value": "" if i["sensitive"] else i["value"],
                     "sensitive": i["sensitive"], "is_null": i["is_null"]}
                    for i in m["items"]
                ],
            })
        return write_json(request, {"resources": resources})
