"""The server's store: every query, each one transaction on the database threads.

Tables are in :mod:`coderstack.server.schema`, the records the queries answer with in
:mod:`coderstack.server.records`, the engine and its threads in
:mod:`coderstack.server.database`; what agents report is queried by
:mod:`coderstack.server.agentstore`.  Every public method returns a Deferred.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from twisted.internet.defer import Deferred

from coderstack.server.agentstore import store_spec
from coderstack.server.database import Database
from coderstack.server.records import (
    SUSPENDED,
    Agent,
    AgentRecord,
    Build,
    DictRow,
    Template,
    TemplateVersion,
    User,
    Workspace,
    agent_from_row,
    aware,
    build_from_row,
    decode_files,
    encode_files,
    now,
    user_from_row,
)
from coderstack.server.schema import (
    agent_states,
    agent_urls,
    agents,
    api_keys,
    resource_metadata,
    template_versions,
    templates,
    users,
    workspace_builds,
    workspaces,
)


class StoreError(Exception):
    """A store operation that cannot be done as asked (e.g. a name already taken)."""


class Conflict(StoreError):
    pass


class Store(Database):
    """All database access but the agents' reports. Construct, ``start()``, then
    ``await store.migrate()``."""

    # -- users -----------------------------------------------------------------------------

    def count_users(self) -> Deferred[int]:
        return self.transact(lambda c: c.execute(sa.select(sa.func.count()).select_from(users)).scalar_one())

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
            return user_from_row(DictRow(row))

        return self.transact(work)

    def user_by_id(self, user_id: uuid.UUID) -> Deferred[User | None]:
        def work(conn: sa.Connection) -> User | None:
            row = conn.execute(sa.select(users).where(users.c.id == user_id)).first()
            return user_from_row(row) if row else None

        return self.transact(work)

    def user_by_login(self, login: str) -> Deferred[tuple[User, str] | None]:
        """The user with this email or username, and its password hash."""

        def work(conn: sa.Connection) -> tuple[User, str] | None:
            row = conn.execute(
                sa.select(users).where(sa.or_(users.c.email == login, users.c.username == login))
            ).first()
            return (user_from_row(row), row.password_hash) if row else None

        return self.transact(work)

    def list_users(self) -> Deferred[list[User]]:
        return self.transact(
            lambda c: [user_from_row(r) for r in c.execute(sa.select(users).order_by(users.c.created_at))]
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
            return user_from_row(row)

        return self.transact(work)

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

        return self.transact(work)

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

        return self.transact(work)

    def api_key(self, key_id: str) -> Deferred[tuple[bytes, datetime, User] | None]:
        def work(conn: sa.Connection) -> tuple[bytes, datetime, User] | None:
            row = conn.execute(
                sa.select(api_keys.c.hashed_secret, api_keys.c.expires_at, users)
                .join(users, users.c.id == api_keys.c.user_id)
                .where(api_keys.c.id == key_id)
            ).first()
            if row is None:
                return None
            return row.hashed_secret, aware(row.expires_at), user_from_row(row)

        return self.transact(work)

    def delete_api_key(self, key_id: str) -> Deferred[None]:
        def work(conn: sa.Connection) -> None:
            conn.execute(api_keys.delete().where(api_keys.c.id == key_id))

        return self.transact(work)

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

        return self.transact(work)

    def workspace(self, workspace_id: uuid.UUID) -> Deferred[Workspace | None]:
        return self.transact(_find_workspace, workspace_id)

    def workspace_by_name(self, owner_id: uuid.UUID, name: str) -> Deferred[Workspace | None]:
        def work(conn: sa.Connection) -> Workspace | None:
            row = conn.execute(
                sa.select(workspaces.c.id).where(
                    workspaces.c.owner_id == owner_id, workspaces.c.name == name
                )
            ).first()
            return _load_workspace(conn, row.id) if row else None

        return self.transact(work)

    def list_workspaces(self, owner_id: uuid.UUID | None = None) -> Deferred[list[Workspace]]:
        def work(conn: sa.Connection) -> list[Workspace]:
            q = sa.select(workspaces.c.id).order_by(workspaces.c.created_at)
            if owner_id is not None:
                q = q.where(workspaces.c.owner_id == owner_id)
            return [_load_workspace(conn, r.id) for r in conn.execute(q)]

        return self.transact(work)

    def delete_workspace(self, workspace_id: uuid.UUID) -> Deferred[bool]:
        def work(conn: sa.Connection) -> bool:
            conn.execute(agents.delete().where(agents.c.workspace_id == workspace_id))
            res = conn.execute(workspaces.delete().where(workspaces.c.id == workspace_id))
            return res.rowcount > 0

        return self.transact(work)

    def agent_by_token_hash(self, token_hash: bytes) -> Deferred[tuple[Agent, Workspace] | None]:
        return self.transact(_find_agent, agents.c.auth_token_hash == token_hash)

    def agent(self, agent_id: uuid.UUID) -> Deferred[tuple[Agent, Workspace] | None]:
        return self.transact(_find_agent, agents.c.id == agent_id)

    def set_agent_token(self, agent_id: uuid.UUID, token_hash: bytes) -> Deferred[bool]:
        def work(conn: sa.Connection) -> bool:
            res = conn.execute(
                agents.update().where(agents.c.id == agent_id).values(auth_token_hash=token_hash)
            )
            return res.rowcount > 0

        return self.transact(work)

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

        return self.transact(work)

    def note_agent_disconnected(self, agent_id: uuid.UUID) -> Deferred[None]:
        def work(conn: sa.Connection) -> None:
            t = now()
            conn.execute(
                agents.update()
                .where(agents.c.id == agent_id)
                .values(last_connected_at=t, disconnected_at=t)
            )

        return self.transact(work)

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

        return self.transact(work)

    def template_by_name(self, name: str) -> Deferred[Template | None]:
        def work(conn: sa.Connection) -> Template | None:
            row = conn.execute(sa.select(templates.c.id).where(templates.c.name == name)).first()
            return _load_template(conn, row.id) if row else None

        return self.transact(work)

    def template(self, template_id: uuid.UUID) -> Deferred[Template | None]:
        return self.transact(_find_template, template_id)

    def list_templates(self) -> Deferred[list[Template]]:
        def work(conn: sa.Connection) -> list[Template]:
            ids = conn.execute(sa.select(templates.c.id).order_by(templates.c.name)).scalars()
            return [_load_template(conn, i) for i in ids]

        return self.transact(work)

    def template_version_files(self, version_id: uuid.UUID) -> Deferred[TemplateVersion | None]:
        def work(conn: sa.Connection) -> TemplateVersion | None:
            row = conn.execute(
                sa.select(template_versions).where(template_versions.c.id == version_id)
            ).first()
            if row is None:
                return None
            return TemplateVersion(
                id=row.id, template_id=row.template_id, number=row.number,
                created_at=aware(row.created_at), files=decode_files(row.source),
            )

        return self.transact(work)

    # -- workspace builds ------------------------------------------------------------------

    def create_templated_workspace(
        self, owner_id: uuid.UUID, name: str, template_id: uuid.UUID
    ) -> Deferred[Workspace]:
        """A workspace built from a template: its agents come from its builds."""

        def work(conn: sa.Connection) -> Workspace:
            ws_id, _ = _insert_workspace(conn, owner_id, name, template_id)
            return _load_workspace(conn, ws_id)

        return self.transact(work)

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
            return build_from_row(DictRow(row))

        return self.transact(work)

    def finish_build(
        self, build_id: uuid.UUID, status: str, error: str = "", log: str = ""
    ) -> Deferred[None]:
        def work(conn: sa.Connection) -> None:
            conn.execute(
                workspace_builds.update()
                .where(workspace_builds.c.id == build_id)
                .values(status=status, error=error, log=log, completed_at=now())
            )

        return self.transact(work)

    def build(self, build_id: uuid.UUID) -> Deferred[tuple[Build, str] | None]:
        """The build and its stored log."""

        def work(conn: sa.Connection) -> tuple[Build, str] | None:
            row = conn.execute(
                sa.select(workspace_builds).where(workspace_builds.c.id == build_id)
            ).first()
            return (build_from_row(row), row.log or "") if row else None

        return self.transact(work)

    def fail_unfinished_builds(self, reason: str) -> Deferred[int]:
        """Builds left running by a previous server process can never finish: fail them."""

        def work(conn: sa.Connection) -> int:
            res = conn.execute(
                workspace_builds.update()
                .where(workspace_builds.c.status.in_(("pending", "running")))
                .values(status="failed", error=reason, completed_at=now())
            )
            return res.rowcount

        return self.transact(work)

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
                    store_spec(conn, a.id, a.spec, fresh_start)
            if resource_items is not None:
                conn.execute(
                    resource_metadata.delete().where(resource_metadata.c.workspace_id == workspace_id)
                )
                conn.execute(resource_metadata.insert().values(
                    workspace_id=workspace_id, entries=json.dumps(resource_items)))
            return changed

        return self.transact(work)


def _find_agent(
    conn: sa.Connection, where: sa.ColumnElement[bool]
) -> tuple[Agent, Workspace] | None:
    """The agent the ``where`` clause picks, and its workspace."""
    row = conn.execute(_agent_select().where(where)).first()
    if row is None:
        return None
    return agent_from_row(row), _load_workspace(conn, row.workspace_id)


def _agent_select() -> sa.Select:
    return (
        sa.select(
            agents, agent_urls.c.access_url, agent_states.c.lifecycle_state,
            agent_states.c.started_at, agent_states.c.ready_at,
        )
        .outerjoin(agent_urls, agent_urls.c.agent_id == agents.c.id)
        .outerjoin(agent_states, agent_states.c.agent_id == agents.c.id)
    )


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


def _load_workspace(conn: sa.Connection, workspace_id: uuid.UUID) -> Workspace:
    """A workspace this transaction knows to exist (it just made or found its row)."""
    ws = _find_workspace(conn, workspace_id)
    if ws is None:
        raise LookupError(f"workspace {workspace_id} is gone")
    return ws


def _load_template(conn: sa.Connection, template_id: uuid.UUID) -> Template:
    """A template this transaction knows to exist."""
    template = _find_template(conn, template_id)
    if template is None:
        raise LookupError(f"template {template_id} is gone")
    return template


def _find_workspace(conn: sa.Connection, workspace_id: uuid.UUID) -> Workspace | None:
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
        created_at=aware(row.created_at),
        updated_at=aware(row.updated_at),
        agents=tuple(agent_from_row(a) for a in agent_rows),
        template_name=template_name,
        latest_build=build_from_row(latest) if latest else None,
    )


def _find_template(conn: sa.Connection, template_id: uuid.UUID) -> Template | None:
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
        created_at=aware(row.created_at),
        updated_at=aware(row.updated_at),
        active_version=TemplateVersion(
            id=v.id, template_id=template_id, number=v.number, created_at=aware(v.created_at)
        )
        if v
        else None,
    )
