"""The server's store: SQLAlchemy Core over SQLite (the embedded default) or PostgreSQL.

Every public method returns a Deferred and runs its SQL on a dedicated thread pool, so the
reactor never blocks on the database. SQLite gets one thread (it serialises writers anyway and a
single connection avoids "database is locked"); PostgreSQL gets several.

Secrets are never stored: API keys keep only a SHA-256 of their secret part, agent tokens only
their SHA-256, passwords an scrypt hash.

Schema versions live in ``schema_migrations``; ``migrate()`` applies the missing steps in order at
start-up, inside one transaction per step.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

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


def _v3(conn: sa.Connection) -> None:
    for table in (agent_states, agent_log_sources, agent_logs, agent_metadata, app_healths,
                  resource_metadata):
        table.create(conn, checkfirst=True)


# (version, step). Append new steps; never edit an applied one.
MIGRATIONS: list[tuple[int, Callable[[sa.Connection], None]]] = [(1, _v1), (2, _v2), (3, _v3)]


class StoreError(Exception):
    """A store operation that cannot be done as asked (e.g. a name already taken)."""


class Conflict(StoreError):
    pass


def now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything we store is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


#: A suspended user carries this marker among its roles (the users table keeps the status there).
SUSPENDED = "suspended"


@dataclass(frozen=True)
class User:
    id: uuid.UUID
    username: str
    email: str
    name: str
    roles: tuple[str, ...]
    created_at: datetime

    @property
    def is_owner(self) -> bool:
        return "owner" in self.roles

    @property
    def is_suspended(self) -> bool:
        return SUSPENDED in self.roles

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.username,
            "email": self.email,
            "name": self.name,
            "roles": [{"name": r} for r in self.roles if r != SUSPENDED],
            "created_at": self.created_at.isoformat(),
            "status": "suspended" if self.is_suspended else "active",
        }


@dataclass(frozen=True)
class Agent:
    id: uuid.UUID
    workspace_id: uuid.UUID
    name: str
    os: str
    arch: str
    directory: str
    created_at: datetime
    first_connected_at: datetime | None
    last_connected_at: datetime | None
    disconnected_at: datetime | None
    #: The URL the agent was given by its template's build (None: created without a template).
    access_url: str | None = None
    #: Coder's lifecycle state as the agent last reported it, and when it started / got ready.
    lifecycle_state: str = "created"
    started_at: datetime | None = None
    ready_at: datetime | None = None


@dataclass(frozen=True)
class Build:
    """One workspace build: a terraform run with a transition (start, stop, destroy)."""

    id: uuid.UUID
    workspace_id: uuid.UUID
    number: int
    transition: str
    status: str  # pending | running | succeeded | failed
    template_version_id: uuid.UUID | None
    created_at: datetime
    completed_at: datetime | None
    error: str

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "workspace_id": str(self.workspace_id),
            "build_number": self.number,
            "transition": self.transition,
            "status": self.status,
            "template_version_id": str(self.template_version_id) if self.template_version_id else None,
            "created_at": self.created_at.isoformat(),
            "completed_at": self.completed_at.isoformat() if self.completed_at else None,
            "error": self.error,
        }


@dataclass(frozen=True)
class TemplateVersion:
    id: uuid.UUID
    template_id: uuid.UUID
    number: int
    created_at: datetime
    #: The template's files by name (only loaded when asked for).
    files: dict[str, bytes] | None = None


@dataclass(frozen=True)
class Template:
    id: uuid.UUID
    name: str
    created_by: uuid.UUID
    created_at: datetime
    updated_at: datetime
    active_version: TemplateVersion | None

    def to_json(self) -> dict[str, Any]:
        v = self.active_version
        return {
            "id": str(self.id),
            "name": self.name,
            "created_by": str(self.created_by),
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "active_version_id": str(v.id) if v else None,
            "active_version": v.number if v else None,
        }


@dataclass(frozen=True)
class AgentRecord:
    """An agent as a build found it in the Terraform state (what ``sync_agents`` stores)."""

    id: uuid.UUID
    name: str
    token_hash: bytes = field(repr=False)
    os: str
    arch: str
    directory: str
    access_url: str
    #: The agent's part of the manifest (agentspec.py); None leaves what is stored.
    spec: dict[str, Any] | None = None


@dataclass(frozen=True)
class Workspace:
    id: uuid.UUID
    owner_id: uuid.UUID
    owner_name: str
    name: str
    template_id: uuid.UUID | None
    created_at: datetime
    updated_at: datetime
    agents: tuple[Agent, ...] = ()
    template_name: str | None = None
    latest_build: Build | None = None


def _user(row: Any) -> User:
    return User(
        id=row.id,
        username=row.username,
        email=row.email,
        name=row.name,
        roles=tuple(r for r in row.roles.split(",") if r),
        created_at=_aware(row.created_at),
    )


def _agent(row: Any) -> Agent:
    return Agent(
        id=row.id,
        workspace_id=row.workspace_id,
        name=row.name,
        os=row.os,
        arch=row.arch,
        directory=row.directory,
        created_at=_aware(row.created_at),
        first_connected_at=_aware(row.first_connected_at),
        last_connected_at=_aware(row.last_connected_at),
        disconnected_at=_aware(row.disconnected_at),
        access_url=getattr(row, "access_url", None),
        lifecycle_state=getattr(row, "lifecycle_state", None) or "created",
        started_at=_aware(getattr(row, "started_at", None)),
        ready_at=_aware(getattr(row, "ready_at", None)),
    )


def _build(row: Any) -> Build:
    return Build(
        id=row.id,
        workspace_id=row.workspace_id,
        number=row.number,
        transition=row.transition,
        status=row.status,
        template_version_id=row.template_version_id,
        created_at=_aware(row.created_at),
        completed_at=_aware(row.completed_at),
        error=row.error or "",
    )


def _agent_select() -> sa.Select:
    return (
        sa.select(
            agents, agent_urls.c.access_url, agent_states.c.lifecycle_state,
            agent_states.c.started_at, agent_states.c.ready_at,
        )
        .outerjoin(agent_urls, agent_urls.c.agent_id == agents.c.id)
        .outerjoin(agent_states, agent_states.c.agent_id == agents.c.id)
    )


def encode_files(files: dict[str, bytes]) -> bytes:
    return json.dumps(
        {name: base64.b64encode(content).decode() for name, content in sorted(files.items())}
    ).encode()


def decode_files(blob: bytes) -> dict[str, bytes]:
    return {name: base64.b64decode(text) for name, text in json.loads(blob).items()}


def database_url(data_dir: str | None, postgres_url: str | None) -> str:
    """The SQLAlchemy URL: PostgreSQL (psycopg 3) when given, else SQLite in the data dir."""
    if postgres_url:
        url = sa.engine.make_url(postgres_url)
        if url.drivername in ("postgres", "postgresql"):
            url = url.set(drivername="postgresql+psycopg")
        return url.render_as_string(hide_password=False)
    assert data_dir is not None
    import os

    return "sqlite:///" + os.path.join(data_dir, "coderstack.db")


def private_sqlite_file(path: str | None) -> None:
    """The SQLite database and its -wal and -shm files readable by this user only (0600),
    whatever the directory's mode or the umask: they hold password and token hashes.

    The database file is created here, 0600, before SQLite opens it; SQLite gives the -wal and
    -shm files the database file's mode, and they are made 0600 again after every connect."""
    import os

    if not path or path == ":memory:" or path.startswith("file:"):
        return
    old = os.umask(0o077)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    finally:
        os.umask(old)
    for name in (path, path + "-wal", path + "-shm"):
        try:
            os.chmod(name, 0o600)
        except FileNotFoundError:
            pass


class Store:
    """All database access. Construct, ``start()``, then ``await store.migrate()``."""

    def __init__(self, url: str, reactor: Any) -> None:
        self.url = url
        self._reactor = reactor
        is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False}
            kwargs["poolclass"] = sa.pool.SingletonThreadPool
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["pool_size"] = 5
        self.engine = sa.create_engine(url, **kwargs)
        if is_sqlite:
            db_path = sa.engine.make_url(url).database
            private_sqlite_file(db_path)

            @sa.event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=5000")
                cur.close()
                private_sqlite_file(db_path)

        self._pool = ThreadPool(minthreads=1, maxthreads=1 if is_sqlite else 5, name="coderstack-db")
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if not self._started:
            self._pool.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self._pool.stop()
            self._started = False
            self.engine.dispose()

    def _run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        self.start()
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def _tx(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        def work() -> T:
            with self.engine.begin() as conn:
                return fn(conn, *args)

        return self._run(work)

    # -- schema ----------------------------------------------------------------------------

    def migrate(self) -> Deferred[int]:
        def work() -> int:
            with self.engine.begin() as conn:
                schema_migrations.create(conn, checkfirst=True)
                done = {r.version for r in conn.execute(sa.select(schema_migrations.c.version))}
            version = max(done, default=0)
            for step_version, step in MIGRATIONS:
                if step_version in done:
                    continue
                with self.engine.begin() as conn:
                    step(conn)
                    conn.execute(
                        schema_migrations.insert().values(version=step_version, applied_at=now())
                    )
                version = step_version
            return version

        return self._run(work)

    # -- users -----------------------------------------------------------------------------

    def count_users(self) -> Deferred[int]:
        return self._tx(lambda c: c.execute(sa.select(sa.func.count()).select_from(users)).scalar_one())

    def create_user(
        self, username: str, email: str, password_hash: str, roles: tuple[str, ...] = (), name: str = "",
        only_if_first: bool = False,
    ) -> Deferred[User]:
        def work(conn: sa.Connection) -> User:
            if only_if_first:
                n = conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one()
                if n:
                    raise Conflict("the first user has already been created")
            clash = conn.execute(
                sa.select(users.c.username, users.c.email).where(
                    sa.or_(users.c.username == username, users.c.email == email)
                )
            ).first()
            if clash is not None:
                field = "username" if clash.username == username else "email"
                raise Conflict(f"a user with that {field} already exists")
            row = dict(
                id=uuid.uuid4(),
                username=username,
                email=email,
                name=name,
                password_hash=password_hash,
                roles=",".join(roles),
                created_at=now(),
            )
            conn.execute(users.insert().values(**row))
            return _user(_Obj(row))

        return self._tx(work)

    def user_by_id(self, user_id: uuid.UUID) -> Deferred[User | None]:
        def work(conn: sa.Connection) -> User | None:
            row = conn.execute(sa.select(users).where(users.c.id == user_id)).first()
            return _user(row) if row else None

        return self._tx(work)

    def user_by_login(self, login: str) -> Deferred[tuple[User, str] | None]:
        """The user with this email or username, and its password hash."""

        def work(conn: sa.Connection) -> tuple[User, str] | None:
            row = conn.execute(
                sa.select(users).where(sa.or_(users.c.email == login, users.c.username == login))
            ).first()
            return (_user(row), row.password_hash) if row else None

        return self._tx(work)

    def list_users(self) -> Deferred[list[User]]:
        return self._tx(
            lambda c: [_user(r) for r in c.execute(sa.select(users).order_by(users.c.created_at))]
        )

    def set_user_suspended(self, user_id: uuid.UUID, suspended: bool) -> Deferred[User | None]:
        """Suspend or reactivate a user; the updated user, or None if there is none."""

        def work(conn: sa.Connection) -> User | None:
            row = conn.execute(sa.select(users).where(users.c.id == user_id)).first()
            if row is None:
                return None
            roles = [r for r in row.roles.split(",") if r and r != SUSPENDED]
            if suspended:
                roles.append(SUSPENDED)
            conn.execute(users.update().where(users.c.id == user_id).values(roles=",".join(roles)))
            row = conn.execute(sa.select(users).where(users.c.id == user_id)).first()
            return _user(row)

        return self._tx(work)

    def delete_user(self, user_id: uuid.UUID) -> Deferred[bool]:
        """Delete a user and its sessions. Raises :class:`Conflict` while it still owns
        workspaces or created templates or builds that others keep."""

        def work(conn: sa.Connection) -> bool:
            if conn.execute(sa.select(workspaces.c.id).where(workspaces.c.owner_id == user_id)).first():
                raise Conflict("the user still owns workspaces; delete them first")
            for table in (templates, template_versions, workspace_builds):
                if conn.execute(sa.select(table.c.id).where(table.c.created_by == user_id)).first():
                    raise Conflict("the user created templates or builds that are kept")
            conn.execute(api_keys.delete().where(api_keys.c.user_id == user_id))
            return conn.execute(users.delete().where(users.c.id == user_id)).rowcount > 0

        return self._tx(work)

    # -- API keys --------------------------------------------------------------------------

    def insert_api_key(
        self, key_id: str, user_id: uuid.UUID, hashed_secret: bytes, expires_at: datetime
    ) -> Deferred[None]:
        def work(conn: sa.Connection) -> None:
            t = now()
            conn.execute(
                api_keys.insert().values(
                    id=key_id,
                    user_id=user_id,
                    hashed_secret=hashed_secret,
                    created_at=t,
                    expires_at=expires_at,
                    last_used=t,
                )
            )

        return self._tx(work)

    def api_key(self, key_id: str) -> Deferred[tuple[bytes, datetime, User] | None]:
        def work(conn: sa.Connection) -> tuple[bytes, datetime, User] | None:
            row = conn.execute(
                sa.select(api_keys.c.hashed_secret, api_keys.c.expires_at, users)
                .join(users, users.c.id == api_keys.c.user_id)
                .where(api_keys.c.id == key_id)
            ).first()
            if row is None:
                return None
            return row.hashed_secret, _aware(row.expires_at), _user(row)

        return self._tx(work)

    def delete_api_key(self, key_id: str) -> Deferred[None]:
        def work(conn: sa.Connection) -> None:
            conn.execute(api_keys.delete().where(api_keys.c.id == key_id))

        return self._tx(work)

    # -- workspaces and agents -------------------------------------------------------------

    def create_workspace(
        self,
        owner_id: uuid.UUID,
        name: str,
        agent_token_hash: bytes,
        agent_name: str = "main",
        template_id: uuid.UUID | None = None,
    ) -> Deferred[Workspace]:
        """A workspace with one agent, created together or not at all."""

        def work(conn: sa.Connection) -> Workspace:
            ws_id, t = _insert_workspace(conn, owner_id, name, template_id)
            conn.execute(
                agents.insert().values(
                    id=uuid.uuid4(), workspace_id=ws_id, name=agent_name,
                    auth_token_hash=agent_token_hash, os="linux", arch="amd64", directory="",
                    created_at=t,
                )
            )
            return _load_workspace(conn, ws_id)

        return self._tx(work)

    def workspace(self, workspace_id: uuid.UUID) -> Deferred[Workspace | None]:
        return self._tx(_load_workspace, workspace_id)

    def workspace_by_name(self, owner_id: uuid.UUID, name: str) -> Deferred[Workspace | None]:
        def work(conn: sa.Connection) -> Workspace | None:
            row = conn.execute(
                sa.select(workspaces.c.id).where(
                    workspaces.c.owner_id == owner_id, workspaces.c.name == name
                )
            ).first()
            return _load_workspace(conn, row.id) if row else None

        return self._tx(work)

    def list_workspaces(self, owner_id: uuid.UUID | None = None) -> Deferred[list[Workspace]]:
        def work(conn: sa.Connection) -> list[Workspace]:
            q = sa.select(workspaces.c.id).order_by(workspaces.c.created_at)
            if owner_id is not None:
                q = q.where(workspaces.c.owner_id == owner_id)
            return [_load_workspace(conn, r.id) for r in conn.execute(q)]

        return self._tx(work)

    def delete_workspace(self, workspace_id: uuid.UUID) -> Deferred[bool]:
        def work(conn: sa.Connection) -> bool:
            conn.execute(agents.delete().where(agents.c.workspace_id == workspace_id))
            res = conn.execute(workspaces.delete().where(workspaces.c.id == workspace_id))
            return res.rowcount > 0

        return self._tx(work)

    def agent_by_token_hash(self, token_hash: bytes) -> Deferred[tuple[Agent, Workspace] | None]:
        def work(conn: sa.Connection) -> tuple[Agent, Workspace] | None:
            row = conn.execute(_agent_select().where(agents.c.auth_token_hash == token_hash)).first()
            if row is None:
                return None
            return _agent(row), _load_workspace(conn, row.workspace_id)

        return self._tx(work)

    def agent(self, agent_id: uuid.UUID) -> Deferred[tuple[Agent, Workspace] | None]:
        def work(conn: sa.Connection) -> tuple[Agent, Workspace] | None:
            row = conn.execute(_agent_select().where(agents.c.id == agent_id)).first()
            if row is None:
                return None
            return _agent(row), _load_workspace(conn, row.workspace_id)

        return self._tx(work)

    def set_agent_token(self, agent_id: uuid.UUID, token_hash: bytes) -> Deferred[bool]:
        def work(conn: sa.Connection) -> bool:
            res = conn.execute(
                agents.update().where(agents.c.id == agent_id).values(auth_token_hash=token_hash)
            )
            return res.rowcount > 0

        return self._tx(work)

    def note_agent_connected(self, agent_id: uuid.UUID) -> Deferred[None]:
        def work(conn: sa.Connection) -> None:
            t = now()
            conn.execute(
                agents.update()
                .where(agents.c.id == agent_id)
                .values(
                    first_connected_at=sa.func.coalesce(agents.c.first_connected_at, t),
                    last_connected_at=t,
                    disconnected_at=None,
                )
            )

        return self._tx(work)

    def note_agent_disconnected(self, agent_id: uuid.UUID) -> Deferred[None]:
        def work(conn: sa.Connection) -> None:
            t = now()
            conn.execute(
                agents.update()
                .where(agents.c.id == agent_id)
                .values(last_connected_at=t, disconnected_at=t)
            )

        return self._tx(work)

    # -- templates and their versions ------------------------------------------------------

    def push_template(
        self, name: str, created_by: uuid.UUID, files: dict[str, bytes]
    ) -> Deferred[Template]:
        """Create template ``name`` with these files as version 1, or add them as its next
        version; the newest version is the active one."""

        def work(conn: sa.Connection) -> Template:
            t = now()
            blob = encode_files(files)
            row = conn.execute(sa.select(templates.c.id).where(templates.c.name == name)).first()
            if row is None:
                template_id = uuid.uuid4()
                conn.execute(
                    templates.insert().values(
                        id=template_id, name=name, created_by=created_by, created_at=t,
                        updated_at=t, source=blob,
                    )
                )
                number = 1
            else:
                template_id = row.id
                last = conn.execute(
                    sa.select(sa.func.max(template_versions.c.number)).where(
                        template_versions.c.template_id == template_id
                    )
                ).scalar_one()
                number = (last or 0) + 1
                conn.execute(
                    templates.update()
                    .where(templates.c.id == template_id)
                    .values(updated_at=t, source=blob)
                )
            conn.execute(
                template_versions.insert().values(
                    id=uuid.uuid4(), template_id=template_id, number=number,
                    created_by=created_by, created_at=t, source=blob,
                )
            )
            return _load_template(conn, template_id)

        return self._tx(work)

    def template_by_name(self, name: str) -> Deferred[Template | None]:
        def work(conn: sa.Connection) -> Template | None:
            row = conn.execute(sa.select(templates.c.id).where(templates.c.name == name)).first()
            return _load_template(conn, row.id) if row else None

        return self._tx(work)

    def template(self, template_id: uuid.UUID) -> Deferred[Template | None]:
        return self._tx(_load_template, template_id)

    def list_templates(self) -> Deferred[list[Template]]:
        def work(conn: sa.Connection) -> list[Template]:
            ids = conn.execute(sa.select(templates.c.id).order_by(templates.c.name)).scalars()
            return [t for t in (_load_template(conn, i) for i in ids) if t is not None]

        return self._tx(work)

    def template_version_files(self, version_id: uuid.UUID) -> Deferred[TemplateVersion | None]:
        def work(conn: sa.Connection) -> TemplateVersion | None:
            row = conn.execute(
                sa.select(template_versions).where(template_versions.c.id == version_id)
            ).first()
            if row is None:
                return None
            return TemplateVersion(
                id=row.id, template_id=row.template_id, number=row.number,
                created_at=_aware(row.created_at), files=decode_files(row.source),
            )

        return self._tx(work)

    # -- workspace builds ------------------------------------------------------------------

    def create_templated_workspace(
        self, owner_id: uuid.UUID, name: str, template_id: uuid.UUID
    ) -> Deferred[Workspace]:
        """A workspace built from a template: its agents come from its builds."""

        def work(conn: sa.Connection) -> Workspace:
            ws_id, _ = _insert_workspace(conn, owner_id, name, template_id)
            return _load_workspace(conn, ws_id)

        return self._tx(work)

    def start_build(
        self,
        workspace_id: uuid.UUID,
        transition: str,
        template_version_id: uuid.UUID | None,
        created_by: uuid.UUID,
    ) -> Deferred[Build]:
        """Record a running build; :class:`Conflict` while another build of the workspace runs."""

        def work(conn: sa.Connection) -> Build:
            busy = conn.execute(
                sa.select(workspace_builds.c.number).where(
                    workspace_builds.c.workspace_id == workspace_id,
                    workspace_builds.c.status.in_(("pending", "running")),
                )
            ).first()
            if busy is not None:
                raise Conflict(f"build #{busy.number} of this workspace is still running")
            last = conn.execute(
                sa.select(sa.func.max(workspace_builds.c.number)).where(
                    workspace_builds.c.workspace_id == workspace_id
                )
            ).scalar_one()
            row = dict(
                id=uuid.uuid4(), workspace_id=workspace_id, number=(last or 0) + 1,
                transition=transition, status="running", template_version_id=template_version_id,
                created_by=created_by, created_at=now(), completed_at=None, error="", log="",
            )
            conn.execute(workspace_builds.insert().values(**row))
            conn.execute(
                workspaces.update().where(workspaces.c.id == workspace_id).values(updated_at=now())
            )
            return _build(_Obj(row))

        return self._tx(work)

    def finish_build(
        self, build_id: uuid.UUID, status: str, error: str = "", log: str = ""
    ) -> Deferred[None]:
        def work(conn: sa.Connection) -> None:
            conn.execute(
                workspace_builds.update()
                .where(workspace_builds.c.id == build_id)
                .values(status=status, error=error, log=log, completed_at=now())
            )

        return self._tx(work)

    def build(self, build_id: uuid.UUID) -> Deferred[tuple[Build, str] | None]:
        """The build and its stored log."""

        def work(conn: sa.Connection) -> tuple[Build, str] | None:
            row = conn.execute(
                sa.select(workspace_builds).where(workspace_builds.c.id == build_id)
            ).first()
            return (_build(row), row.log or "") if row else None

        return self._tx(work)

    def fail_unfinished_builds(self, reason: str) -> Deferred[int]:
        """Builds left running by a previous server process can never finish: fail them."""

        def work(conn: sa.Connection) -> int:
            res = conn.execute(
                workspace_builds.update()
                .where(workspace_builds.c.status.in_(("pending", "running")))
                .values(status="failed", error=reason, completed_at=now())
            )
            return res.rowcount

        return self._tx(work)

    def sync_agents(
        self,
        workspace_id: uuid.UUID,
        found: list[AgentRecord],
        *,
        fresh_start: bool = False,
        resource_items: list[dict[str, Any]] | None = None,
    ) -> Deferred[list[uuid.UUID]]:
        """Make the workspace's agents exactly ``found`` (a build's state); returns the ids of
        agents removed or whose token changed (their live connections must go).

        Each record's ``spec`` is stored with it; ``fresh_start`` (a start build) also resets
        what its agent reported (lifecycle, logs, metadata, app health), since the agent starts
        again.  ``resource_items`` replaces the workspace's ``coder_metadata``."""

        def work(conn: sa.Connection) -> list[uuid.UUID]:
            current = {
                r.id: r
                for r in conn.execute(
                    sa.select(agents).where(agents.c.workspace_id == workspace_id)
                )
            }
            keep = {a.id for a in found}
            gone = [i for i in current if i not in keep]
            if gone:
                conn.execute(agents.delete().where(agents.c.id.in_(gone)))
            t = now()
            changed = list(gone)
            for a in found:
                values = dict(
                    name=a.name, auth_token_hash=a.token_hash, os=a.os, arch=a.arch,
                    directory=a.directory,
                )
                old = current.get(a.id)
                if old is None:
                    conn.execute(
                        agents.insert().values(
                            id=a.id, workspace_id=workspace_id, created_at=t, **values
                        )
                    )
                else:
                    if old.auth_token_hash != a.token_hash:
                        changed.append(a.id)
                    conn.execute(agents.update().where(agents.c.id == a.id).values(**values))
                conn.execute(agent_urls.delete().where(agent_urls.c.agent_id == a.id))
                conn.execute(agent_urls.insert().values(agent_id=a.id, access_url=a.access_url))
                if a.spec is not None:
                    from coderstack.server.agentstore import store_spec

                    store_spec(conn, a.id, a.spec, fresh_start)
            if resource_items is not None:
                conn.execute(
                    resource_metadata.delete().where(resource_metadata.c.workspace_id == workspace_id)
                )
                conn.execute(resource_metadata.insert().values(
                    workspace_id=workspace_id, entries=json.dumps(resource_items)))
            return changed

        return self._tx(work)


class _Obj:
    """Attribute access over a dict, so freshly inserted rows share the row converters."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)


def _insert_workspace(
    conn: sa.Connection, owner_id: uuid.UUID, name: str, template_id: uuid.UUID | None
) -> tuple[uuid.UUID, datetime]:
    """A new workspace row, refusing a name the owner already uses: (its id, creation time)."""
    exists = conn.execute(
        sa.select(workspaces.c.id).where(workspaces.c.owner_id == owner_id, workspaces.c.name == name)
    ).first()
    if exists is not None:
        raise Conflict(f"workspace {name!r} already exists")
    t = now()
    ws_id = uuid.uuid4()
    conn.execute(
        workspaces.insert().values(
            id=ws_id, owner_id=owner_id, name=name, template_id=template_id, created_at=t, updated_at=t,
        )
    )
    return ws_id, t


def _load_workspace(conn: sa.Connection, workspace_id: uuid.UUID) -> Workspace | None:
    row = conn.execute(
        sa.select(workspaces, users.c.username)
        .join(users, users.c.id == workspaces.c.owner_id)
        .where(workspaces.c.id == workspace_id)
    ).first()
    if row is None:
        return None
    agent_rows = conn.execute(
        _agent_select().where(agents.c.workspace_id == workspace_id).order_by(agents.c.name)
    )
    template_name = None
    if row.template_id is not None:
        template_name = conn.execute(
            sa.select(templates.c.name).where(templates.c.id == row.template_id)
        ).scalar_one_or_none()
    latest = conn.execute(
        sa.select(workspace_builds)
        .where(workspace_builds.c.workspace_id == workspace_id)
        .order_by(workspace_builds.c.number.desc())
        .limit(1)
    ).first()
    return Workspace(
        id=row.id,
        owner_id=row.owner_id,
        owner_name=row.username,
        name=row.name,
        template_id=row.template_id,
        created_at=_aware(row.created_at),
        updated_at=_aware(row.updated_at),
        agents=tuple(_agent(a) for a in agent_rows),
        template_name=template_name,
        latest_build=_build(latest) if latest else None,
    )


def _load_template(conn: sa.Connection, template_id: uuid.UUID) -> Template | None:
    row = conn.execute(sa.select(templates).where(templates.c.id == template_id)).first()
    if row is None:
        return None
    v = conn.execute(
        sa.select(
            template_versions.c.id, template_versions.c.number, template_versions.c.created_at
        )
        .where(template_versions.c.template_id == template_id)
        .order_by(template_versions.c.number.desc())
        .limit(1)
    ).first()
    return Template(
        id=row.id,
        name=row.name,
        created_by=row.created_by,
        created_at=_aware(row.created_at),
        updated_at=_aware(row.updated_at),
        active_version=TemplateVersion(
            id=v.id, template_id=template_id, number=v.number, created_at=_aware(v.created_at)
        )
        if v
        else None,
    )
