"""The store's side of workspace apps: shared ports, templates' port-sharing caps, and the
deployment's app key (the secret app keys and tickets are sealed with; see ``appkeys.py``).

Tables are defined (and created by migration 4) in schema.py; this module holds the queries.
Every public method returns a Deferred and runs on the store's database threads.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from twisted.internet.defer import Deferred

from coderstack.server import pglock
from coderstack.server.appshare import LEVELS, SharingLevel, parse_level
from coderstack.server.database import Database
from coderstack.server.records import now
from coderstack.server.schema import (
    deployment_secrets,
    port_shares,
    template_port_share_limits,
    workspaces,
)

APP_KEY_NAME = "app_signing_key"
DEFAULT_MAX_PORT_SHARE: SharingLevel = "public"


@dataclass(frozen=True)
class PortShare:
    workspace_id: uuid.UUID
    agent_name: str
    port: int
    share_level: SharingLevel
    protocol: str  # http | https

    def to_json(self) -> dict[str, Any]:
        return {"workspace_id": str(self.workspace_id), "agent_name": self.agent_name,
                "port": self.port, "share_level": self.share_level, "protocol": self.protocol}


def _share(row: Any) -> PortShare:
    return PortShare(row.workspace_id, row.agent_name, row.port, parse_level(row.share_level), row.protocol)


class AppStore:
    """The queries about apps, on the store's database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def port_shares(self, workspace_id: uuid.UUID) -> Deferred[list[PortShare]]:
        def work(conn: sa.Connection) -> list[PortShare]:
            rows = conn.execute(sa.select(port_shares).where(port_shares.c.workspace_id == workspace_id)
                                .order_by(port_shares.c.agent_name, port_shares.c.port))
            return [_share(r) for r in rows]

        return self.db.transact(work)

    def port_share(self, workspace_id: uuid.UUID, agent_name: str, port: int) -> Deferred[PortShare | None]:
        def work(conn: sa.Connection) -> PortShare | None:
            row = conn.execute(sa.select(port_shares).where(
                port_shares.c.workspace_id == workspace_id, port_shares.c.agent_name == agent_name,
                port_shares.c.port == port)).first()
            return None if row is None else _share(row)

        return self.db.transact(work)

    def upsert_port_share(self, share: PortShare) -> Deferred[PortShare]:
        def work(conn: sa.Connection) -> PortShare:
            key = (port_shares.c.workspace_id == share.workspace_id,
                   port_shares.c.agent_name == share.agent_name, port_shares.c.port == share.port)
            values = {"share_level": share.share_level, "protocol": share.protocol}
            if conn.execute(port_shares.update().where(*key).values(**values)).rowcount == 0:
                conn.execute(port_shares.insert().values(
                    workspace_id=share.workspace_id, agent_name=share.agent_name, port=share.port, **values))
            return share

        return self.db.transact(work)

    def delete_port_share(self, workspace_id: uuid.UUID, agent_name: str, port: int) -> Deferred[bool]:
        def work(conn: sa.Connection) -> bool:
            return bool(conn.execute(port_shares.delete().where(
                port_shares.c.workspace_id == workspace_id, port_shares.c.agent_name == agent_name,
                port_shares.c.port == port)).rowcount)

        return self.db.transact(work)

    def max_port_share_level(self, template_id: uuid.UUID | None) -> Deferred[SharingLevel]:
        def work(conn: sa.Connection) -> SharingLevel:
            if template_id is None:
                return DEFAULT_MAX_PORT_SHARE
            value = conn.execute(sa.select(template_port_share_limits.c.max_level).where(
                template_port_share_limits.c.template_id == template_id)).scalar()
            return DEFAULT_MAX_PORT_SHARE if value is None else parse_level(value)

        return self.db.transact(work)

    def set_max_port_share_level(self, template_id: uuid.UUID, level: SharingLevel) -> Deferred[None]:
        """Also narrows the template's workspaces' existing shares to the new cap."""
        def work(conn: sa.Connection) -> None:
            t = template_port_share_limits
            if conn.execute(t.update().where(t.c.template_id == template_id).values(max_level=level)).rowcount == 0:
                conn.execute(t.insert().values(template_id=template_id, max_level=level))
            wider = [name for name in LEVELS if LEVELS.index(name) > LEVELS.index(level)]
            ws_ids = sa.select(workspaces.c.id).where(workspaces.c.template_id == template_id)
            conn.execute(port_shares.update().where(port_shares.c.workspace_id.in_(ws_ids),
                                                    port_shares.c.share_level.in_(wider))
                         .values(share_level=level))

        return self.db.transact(work)

    def deployment_secret(self, name: str, size: int = 32) -> Deferred[bytes]:
        """The secret called ``name``, made on first use; every replica gets the same one.

        On PostgreSQL the transaction first takes an advisory lock, so replicas starting together
        read and make the secrets one at a time (the insert's unique name is a second guard)."""

        def work(conn: sa.Connection) -> bytes:
            pglock.xact_lock(conn, pglock.SECRETS_KEY)
            value = conn.execute(sa.select(deployment_secrets.c.value)
                                 .where(deployment_secrets.c.name == name)).scalar()
            if value is not None:
                return bytes(value)
            try:
                with conn.begin_nested():
                    conn.execute(deployment_secrets.insert().values(
                        name=name, value=secrets.token_bytes(size), created_at=now()))
            except sa.exc.IntegrityError:
                pass  # another replica made it first: use theirs
            return bytes(conn.execute(sa.select(deployment_secrets.c.value)
                                      .where(deployment_secrets.c.name == name)).scalar_one())

        return self.db.transact(work)
