"""The store's side of the agent lifecycle: specs from builds, and what agents report.

Tables are defined (and created by migration 3) in schema.py; this module holds the queries.
Every public method of :class:`AgentStateStore` returns a Deferred and runs on the store's
database threads.  Writes happen once per agent request (a batch of logs, of metadata, a
lifecycle change), never per packet or heartbeat.

Agent logs are bounded at :data:`MAX_LOGS_BYTES` of output per agent (Coder's 1 MiB): the batch
that would pass the bound stores nothing, raises :class:`LogsOverflow` and marks the agent
``logs_overflowed`` until its next start build.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from twisted.internet.defer import Deferred

from coderstack.server.agentspec import empty_spec
from coderstack.server.database import Database
from coderstack.server.records import aware, now
from coderstack.server.schema import (
    agent_log_sources,
    agent_logs,
    agent_metadata,
    agent_states,
    app_healths,
    resource_metadata,
)

MAX_LOGS_BYTES = 1 << 20
LIFECYCLE_STATES = (
    "created", "starting", "start_timeout", "start_error", "ready",
    "shutting_down", "shutdown_timeout", "shutdown_error", "off",
)
#: The states that end a start: ``ready_at`` is the first of them.
START_ENDED = ("ready", "start_error", "start_timeout")
APP_HEALTHS = ("initializing", "healthy", "unhealthy")


class LogsOverflow(Exception):
    """The agent's logs would pass :data:`MAX_LOGS_BYTES`; nothing of the batch was stored."""


class UnknownApp(Exception):
    """An app-health report named an app without a healthcheck on this agent."""


@dataclass(frozen=True)
class LogLine:
    id: int
    created_at: datetime
    output: str
    level: str
    source_id: uuid.UUID


@dataclass(frozen=True)
class MetadataValue:
    key: str
    value: str
    error: str
    collected_at: datetime


@dataclass(frozen=True)
class AgentState:
    """An agent's spec (with each app's current ``health``) and what it reported."""

    spec: dict[str, Any]
    lifecycle_state: str
    lifecycle_changed_at: datetime | None
    started_at: datetime | None
    ready_at: datetime | None
    logs_length: int
    logs_overflowed: bool
    log_sources: list[dict[str, str]]


def store_spec(conn: sa.Connection, agent_id: uuid.UUID, spec: dict[str, Any], fresh: bool) -> None:
    """Keep a build's spec for an agent (inside ``Store.sync_agents``' transaction); on a fresh
    start forget what the previous run of the agent reported."""
    text = json.dumps(spec)
    where = agent_states.c.agent_id == agent_id
    exists = conn.execute(sa.select(agent_states.c.agent_id).where(where)).first() is not None
    if exists and not fresh:
        conn.execute(agent_states.update().where(where).values(spec=text))
    else:
        if exists:
            conn.execute(agent_states.delete().where(where))
        for table in (agent_logs, agent_metadata, app_healths, agent_log_sources):
            conn.execute(table.delete().where(table.c.agent_id == agent_id))
        conn.execute(agent_states.insert().values(
            agent_id=agent_id, spec=text, lifecycle_state="created", logs_length=0,
            logs_overflowed=False,
        ))
    have = set(conn.execute(
        sa.select(agent_log_sources.c.id).where(agent_log_sources.c.agent_id == agent_id)
    ).scalars())
    t = now()
    for src in spec.get("log_sources", []):
        sid = uuid.UUID(src["id"])
        if sid not in have:
            conn.execute(agent_log_sources.insert().values(
                agent_id=agent_id, id=sid, display_name=src["display_name"],
                icon=src.get("icon") or "", created_at=t,
            ))


def _ensure_state(conn: sa.Connection, agent_id: uuid.UUID) -> Any:
    row = conn.execute(sa.select(agent_states).where(agent_states.c.agent_id == agent_id)).first()
    if row is None:  # an agent no build described (made by hand): an empty spec
        conn.execute(agent_states.insert().values(
            agent_id=agent_id, spec=json.dumps(empty_spec()), lifecycle_state="created",
            logs_length=0, logs_overflowed=False,
        ))
        row = conn.execute(
            sa.select(agent_states).where(agent_states.c.agent_id == agent_id)
        ).first()
    return row


def _spec_of(row: Any) -> dict[str, Any]:
    try:
        spec = json.loads(row.spec or "{}")
    except ValueError:
        spec = {}
    return {**empty_spec(), **spec}


class AgentStateStore:
    """The queries about agents' reports, on the store's database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def state(self, agent_id: uuid.UUID) -> Deferred[AgentState]:
        def work(conn: sa.Connection) -> AgentState:
            row = _ensure_state(conn, agent_id)
            spec = _spec_of(row)
            health = dict(conn.execute(
                sa.select(app_healths.c.app_id, app_healths.c.health)
                .where(app_healths.c.agent_id == agent_id)
            ).tuples().all())
            for app in spec["apps"]:
                if app.get("healthcheck"):
                    app["health"] = health.get(uuid.UUID(app["id"]), "initializing")
                else:
                    app["health"] = "disabled"
            sources = [
                {"id": str(r.id), "display_name": r.display_name, "icon": r.icon}
                for r in conn.execute(
                    sa.select(agent_log_sources)
                    .where(agent_log_sources.c.agent_id == agent_id)
                    .order_by(agent_log_sources.c.created_at, agent_log_sources.c.display_name)
                )
            ]
            return AgentState(
                spec=spec,
                lifecycle_state=row.lifecycle_state,
                lifecycle_changed_at=aware(row.lifecycle_changed_at),
                started_at=aware(row.started_at),
                ready_at=aware(row.ready_at),
                logs_length=row.logs_length,
                logs_overflowed=bool(row.logs_overflowed),
                log_sources=sources,
            )

        return self.db.transact(work)

    def report_lifecycle(
        self, agent_id: uuid.UUID, state: str, changed_at: datetime
    ) -> Deferred[None]:
        if state not in LIFECYCLE_STATES:
            raise ValueError(f"unknown lifecycle state {state!r}")

        def work(conn: sa.Connection) -> None:
            _ensure_state(conn, agent_id)
            c = agent_states.c
            values: dict[str, Any] = {"lifecycle_state": state, "lifecycle_changed_at": changed_at}
            if state == "starting":
                values["started_at"] = sa.func.coalesce(c.started_at, changed_at)
            if state in START_ENDED:
                values["ready_at"] = sa.func.coalesce(c.ready_at, changed_at)
            conn.execute(agent_states.update().where(c.agent_id == agent_id).values(**values))

        return self.db.transact(work)

    def register_log_source(
        self, agent_id: uuid.UUID, source_id: uuid.UUID, display_name: str, icon: str
    ) -> Deferred[None]:
        def work(conn: sa.Connection) -> None:
            _ensure_state(conn, agent_id)
            exists = conn.execute(sa.select(agent_log_sources.c.id).where(
                agent_log_sources.c.agent_id == agent_id, agent_log_sources.c.id == source_id
            )).first()
            if exists is None:
                conn.execute(agent_log_sources.insert().values(
                    agent_id=agent_id, id=source_id, display_name=display_name, icon=icon,
                    created_at=now(),
                ))

        return self.db.transact(work)

    def append_logs(
        self, agent_id: uuid.UUID, source_id: uuid.UUID, lines: list[tuple[datetime, str, str]]
    ) -> Deferred[None]:
        """Store a batch of (created_at, output, level); fails with :class:`LogsOverflow` past
        the bound (and with ``LookupError`` for an unregistered source)."""
        size = sum(len(output.encode()) for _, output, _ in lines)

        def work(conn: sa.Connection) -> bool:
            row = _ensure_state(conn, agent_id)
            where = agent_states.c.agent_id == agent_id
            if row.logs_overflowed or row.logs_length + size > MAX_LOGS_BYTES:
                conn.execute(agent_states.update().where(where).values(logs_overflowed=True))
                return False
            known = conn.execute(sa.select(agent_log_sources.c.id).where(
                agent_log_sources.c.agent_id == agent_id, agent_log_sources.c.id == source_id
            )).first()
            if known is None:
                raise LookupError(f"log source {source_id} is not registered")
            if lines:
                conn.execute(agent_logs.insert(), [
                    {"agent_id": agent_id, "source_id": source_id, "created_at": t,
                     "output": output, "level": level}
                    for t, output, level in lines
                ])
                conn.execute(agent_states.update().where(where).values(
                    logs_length=agent_states.c.logs_length + size))
            return True

        def check(stored: bool) -> None:
            if not stored:
                raise LogsOverflow(f"at most {MAX_LOGS_BYTES} bytes of logs per agent")

        return self.db.transact(work).addCallback(check)

    def logs(
        self, agent_id: uuid.UUID, after: int = 0, limit: int = 10000
    ) -> Deferred[list[LogLine]]:
        def work(conn: sa.Connection) -> list[LogLine]:
            rows = conn.execute(
                sa.select(agent_logs)
                .where(agent_logs.c.agent_id == agent_id, agent_logs.c.id > after)
                .order_by(agent_logs.c.id)
                .limit(limit)
            )
            return [
                LogLine(r.id, aware(r.created_at), r.output, r.level, r.source_id) for r in rows
            ]

        return self.db.transact(work)

    def set_metadata(self, agent_id: uuid.UUID, values: list[MetadataValue]) -> Deferred[int]:
        """Keep the latest value per key; keys the spec does not define are ignored.  Fires
        with the number of keys stored."""

        def work(conn: sa.Connection) -> int:
            keys = {m["key"] for m in _spec_of(_ensure_state(conn, agent_id))["metadata"]}
            stored = 0
            for v in values:
                if v.key not in keys:
                    continue
                conn.execute(agent_metadata.delete().where(
                    agent_metadata.c.agent_id == agent_id, agent_metadata.c.key == v.key))
                conn.execute(agent_metadata.insert().values(
                    agent_id=agent_id, key=v.key, value=v.value, error=v.error,
                    collected_at=v.collected_at,
                ))
                stored += 1
            return stored

        return self.db.transact(work)

    def metadata(
        self, agent_id: uuid.UUID
    ) -> Deferred[tuple[list[dict[str, Any]], dict[str, MetadataValue]]]:
        """(the spec's metadata definitions, the latest value per key)."""

        def work(conn: sa.Connection) -> tuple[list[dict[str, Any]], dict[str, MetadataValue]]:
            spec = _spec_of(_ensure_state(conn, agent_id))
            rows = conn.execute(
                sa.select(agent_metadata).where(agent_metadata.c.agent_id == agent_id)
            )
            latest = {
                r.key: MetadataValue(r.key, r.value, r.error, aware(r.collected_at)) for r in rows
            }
            return spec["metadata"], latest

        return self.db.transact(work)

    def set_app_health(
        self, agent_id: uuid.UUID, healths: dict[uuid.UUID, str]
    ) -> Deferred[None]:
        """Record apps' health; :class:`UnknownApp` (nothing stored) for an app id that is not
        one of the agent's apps with a healthcheck."""

        def work(conn: sa.Connection) -> None:
            spec = _spec_of(_ensure_state(conn, agent_id))
            checked = {uuid.UUID(a["id"]) for a in spec["apps"] if a.get("healthcheck")}
            unknown = [str(i) for i in healths if i not in checked]
            if unknown:
                raise UnknownApp(", ".join(sorted(unknown)))
            for app_id, health in healths.items():
                conn.execute(app_healths.delete().where(
                    app_healths.c.agent_id == agent_id, app_healths.c.app_id == app_id))
                conn.execute(app_healths.insert().values(
                    agent_id=agent_id, app_id=app_id, health=health))

        return self.db.transact(work)

    def resource_metadata(self, workspace_id: uuid.UUID) -> Deferred[list[dict[str, Any]]]:
        def work(conn: sa.Connection) -> list[dict[str, Any]]:
            row = conn.execute(sa.select(resource_metadata.c.entries).where(
                resource_metadata.c.workspace_id == workspace_id)).first()
            return json.loads(row.entries) if row else []

        return self.db.transact(work)
