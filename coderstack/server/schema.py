"""The store's tables, and the migrations that create them.

Schema versions live in ``schema_migrations``; :func:`migrate` applies the missing steps in
order at start-up, inside one transaction per step.  The same definitions serve SQLite and
PostgreSQL (SQLAlchemy Core types only).  Secrets are never stored: API keys keep only a SHA-256
of their secret part, agent tokens only their SHA-256, passwords an scrypt hash.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

from coderstack.server import pglock
from coderstack.server.records import now

metadata = sa.MetaData()

schema_migrations = sa.Table(
    "schema_migrations",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("username", sa.String(64), nullable=False, unique=True),
    sa.Column("email", sa.String(320), nullable=False, unique=True),
    sa.Column("name", sa.String(256), nullable=False, default=""),
    sa.Column("password_hash", sa.String(512), nullable=False),
    sa.Column("roles", sa.String(256), nullable=False, default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("user_id", sa.Uuid, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("hashed_secret", sa.LargeBinary(32), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_used", sa.DateTime(timezone=True), nullable=False),
)

templates = sa.Table(
    "templates",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("created_by", sa.Uuid, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("source", sa.LargeBinary, nullable=True),
)

workspaces = sa.Table(
    "workspaces",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("owner_id", sa.Uuid, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("template_id", sa.Uuid, sa.ForeignKey("templates.id"), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("owner_id", "name", name="workspaces_owner_name"),
)

agents = sa.Table(
    "workspace_agents",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column(
        "workspace_id", sa.Uuid, sa.ForeignKey("workspaces.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("auth_token_hash", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("os", sa.String(32), nullable=False, default="linux"),
    sa.Column("arch", sa.String(32), nullable=False, default="amd64"),
    sa.Column("directory", sa.String(1024), nullable=False, default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("first_connected_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("last_connected_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("disconnected_at", sa.DateTime(timezone=True), nullable=True),
    sa.UniqueConstraint("workspace_id", "name", name="workspace_agents_workspace_name"),
)


def _v1(conn: sa.Connection) -> None:
    for table in (users, api_keys, templates, workspaces, agents):
        table.create(conn, checkfirst=True)


# -- step 2: templates with versions, workspace builds, the URL each agent was given ------------

template_versions = sa.Table(
    "template_versions",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column(
        "template_id", sa.Uuid, sa.ForeignKey("templates.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("created_by", sa.Uuid, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # JSON {file name: base64 content}
    sa.Column("source", sa.LargeBinary, nullable=False),
    sa.UniqueConstraint("template_id", "number", name="template_versions_template_number"),
)

workspace_builds = sa.Table(
    "workspace_builds",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column(
        "workspace_id", sa.Uuid, sa.ForeignKey("workspaces.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("transition", sa.String(16), nullable=False),
    # pending | running | succeeded | failed
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column(
        "template_version_id",
        sa.Uuid,
        sa.ForeignKey("template_versions.id", ondelete="SET NULL"),
        nullable=True,
    ),
    sa.Column("created_by", sa.Uuid, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("log", sa.Text, nullable=False, default=""),
    sa.UniqueConstraint("workspace_id", "number", name="workspace_builds_workspace_number"),
)

agent_urls = sa.Table(
    "workspace_agent_urls",
    metadata,
    sa.Column(
        "agent_id",
        sa.Uuid,
        sa.ForeignKey("workspace_agents.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    # The access URL the agent was given (the template's provider url, or the access URL).
    sa.Column("access_url", sa.String(2048), nullable=False),
)


def _v2(conn: sa.Connection) -> None:
    for table in (template_versions, workspace_builds, agent_urls):
        table.create(conn, checkfirst=True)


# -- step 3: what builds tell agents, and what agents report back (see agentstore.py) -------

_agent_fk = sa.ForeignKey("workspace_agents.id", ondelete="CASCADE")

agent_states = sa.Table(
    "workspace_agent_states",
    metadata,
    sa.Column("agent_id", sa.Uuid, _agent_fk, primary_key=True),
    # JSON: the agent's part of the manifest from its last build (agentspec.py)
    sa.Column("spec", sa.Text, nullable=False, default="{}"),
    sa.Column("lifecycle_state", sa.String(32), nullable=False, default="created"),
    sa.Column("lifecycle_changed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("logs_length", sa.BigInteger, nullable=False, default=0),
    sa.Column("logs_overflowed", sa.Boolean, nullable=False, default=False),
)

agent_log_sources = sa.Table(
    "workspace_agent_log_sources",
    metadata,
    sa.Column("agent_id", sa.Uuid, sa.ForeignKey("workspace_agents.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("display_name", sa.String(256), nullable=False),
    sa.Column("icon", sa.String(2048), nullable=False, default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

agent_logs = sa.Table(
    "workspace_agent_logs",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("agent_id", sa.Uuid, sa.ForeignKey("workspace_agents.id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("source_id", sa.Uuid, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("output", sa.Text, nullable=False),
    sa.Column("level", sa.String(8), nullable=False),
)

agent_metadata = sa.Table(
    "workspace_agent_metadata",
    metadata,
    sa.Column("agent_id", sa.Uuid, sa.ForeignKey("workspace_agents.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("value", sa.Text, nullable=False, default=""),
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("collected_at", sa.DateTime(timezone=True), nullable=False),
)

app_healths = sa.Table(
    "workspace_app_healths",
    metadata,
    sa.Column("agent_id", sa.Uuid, sa.ForeignKey("workspace_agents.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("app_id", sa.Uuid, primary_key=True),
    sa.Column("health", sa.String(16), nullable=False),
)

resource_metadata = sa.Table(
    "workspace_resource_metadata",
    metadata,
    sa.Column("workspace_id", sa.Uuid, sa.ForeignKey("workspaces.id", ondelete="CASCADE"),
              primary_key=True),
    # JSON: the coder_metadata of the last build (agentspec.resource_metadata_json)
    sa.Column("entries", sa.Text, nullable=False, default="[]"),
)


port_shares = sa.Table(
    "workspace_agent_port_share",
    metadata,
    sa.Column("workspace_id", sa.Uuid, sa.ForeignKey("workspaces.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("agent_name", sa.String(64), primary_key=True),
    sa.Column("port", sa.Integer, primary_key=True),
    sa.Column("share_level", sa.String(16), nullable=False),
    sa.Column("protocol", sa.String(8), nullable=False),
)

template_port_share_limits = sa.Table(
    "template_port_share_limits",
    metadata,
    sa.Column("template_id", sa.Uuid, sa.ForeignKey("templates.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("max_level", sa.String(16), nullable=False),
)

# Random keys the deployment makes once and every replica shares (the app key sealing key).
deployment_secrets = sa.Table(
    "deployment_secrets",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


def _v3(conn: sa.Connection) -> None:
    for table in (agent_states, agent_log_sources, agent_logs, agent_metadata, app_healths,
                  resource_metadata):
        table.create(conn, checkfirst=True)


def _v4(conn: sa.Connection) -> None:
    for table in (port_shares, template_port_share_limits, deployment_secrets):
        table.create(conn, checkfirst=True)


# -- step 5: the server replicas sharing this database (see replicas.py) ---------------------

replicas = sa.Table(
    "replicas",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),  # a UUID, as text
    sa.Column("hostname", sa.String(256), nullable=False),
    sa.Column("region_id", sa.Integer, nullable=False),
    # This replica's own address for the DERP mesh ("" when it has none).
    sa.Column("relay_url", sa.String(2048), nullable=False, default=""),
    sa.Column("version", sa.String(64), nullable=False),
    # Why the replica is unhealthy, as it last reported it ("" when healthy).
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("database_latency_ms", sa.Float, nullable=False, default=0.0),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
)


def _v5(conn: sa.Connection) -> None:
    replicas.create(conn, checkfirst=True)


# The coordinator peers and tunnels each replica holds, for the other replicas
# (coderstack.server.pgcoord). Ids are UUID text; times are the holding replica's clock.
tailnet_peers = sa.Table(
    "tailnet_peers",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("replica_id", sa.String(36), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # agent | client | server
    sa.Column("agent_id", sa.String(36), nullable=True),
    sa.Column("user_id", sa.String(36), nullable=True),
    sa.Column("node", sa.Text, nullable=True),  # the coordination JSON of its last node
    sa.Column("lost", sa.Boolean, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

tailnet_tunnels = sa.Table(
    "tailnet_tunnels",
    metadata,
    sa.Column("replica_id", sa.String(36), primary_key=True),
    sa.Column("src_id", sa.String(36), primary_key=True),
    sa.Column("dst_id", sa.String(36), primary_key=True),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Index("tailnet_tunnels_dst", "dst_id"),
)


def _v6(conn: sa.Connection) -> None:
    for table in (tailnet_peers, tailnet_tunnels):
        table.create(conn, checkfirst=True)


#: Login failure counts every replica shares (``loginstore.py``). ``key`` is an HMAC of the
#: source address or account (never the name or address itself); ``scope`` is ``source``,
#: ``account`` or ``trust`` (a source that logged in to an account: ``failures`` 0, ``last_at``
#: the login). ``last_at`` is seconds since the epoch on the servers' clocks.
login_failures = sa.Table(
    "login_failures",
    metadata,
    sa.Column("scope", sa.String(16), primary_key=True),
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("last_at", sa.Double, nullable=False),
    sa.Index("login_failures_last_at", "last_at"),
)


def _v7(conn: sa.Connection) -> None:
    login_failures.create(conn, checkfirst=True)


# (version, step). Append new steps; never edit an applied one. Versions need not be
# consecutive: each missing one is applied, in this list's order.
MIGRATIONS: list[tuple[int, Callable[[sa.Connection], None]]] = [
    (1, _v1), (2, _v2), (3, _v3), (4, _v4), (5, _v5), (6, _v6), (7, _v7)]


def migrate(engine: sa.Engine) -> int:
    """Apply the steps of :data:`MIGRATIONS` the database lacks; the schema version reached.

    On PostgreSQL under an advisory lock: replicas starting together against one database take
    turns, and each one after the first finds the steps already done."""
    with pglock.session_lock(engine, pglock.MIGRATE_KEY):
        return _migrate(engine)


def _migrate(engine: sa.Engine) -> int:
    with engine.begin() as conn:
        schema_migrations.create(conn, checkfirst=True)
        done = {r.version for r in conn.execute(sa.select(schema_migrations.c.version))}
    version = max(done, default=0)
    for step_version, step in MIGRATIONS:
        if step_version in done:
            continue
        with engine.begin() as conn:
            step(conn)
            conn.execute(schema_migrations.insert().values(version=step_version, applied_at=now()))
        version = max(version, step_version)  # a step listed late may be older than one applied
    return version
