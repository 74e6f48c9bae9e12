"""PostgreSQL advisory locks: how replicas sharing one database take turns at start-up.

Each use has its own fixed 64-bit key. On SQLite (one process per database file) the helpers do
nothing: SQLite serialises writers by itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

#: Held (session-level) around the schema migrations.
MIGRATE_KEY = 0x636F646572_0001
#: Held (transaction-level) while the deployment's shared secrets are read or made.
SECRETS_KEY = 0x636F646572_0002


def is_postgres(bind: sa.Engine | sa.Connection) -> bool:
    return bind.dialect.name == "postgresql"


def xact_lock(conn: sa.Connection, key: int) -> None:
    """Wait for ``key`` until the end of ``conn``'s transaction (PostgreSQL only)."""
    if is_postgres(conn):
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


@contextmanager
def session_lock(engine: sa.Engine, key: int) -> Iterator[None]:
    """Hold ``key`` on a connection of its own for the ``with`` block (PostgreSQL only); the
    block may use other connections meanwhile."""
    if not is_postgres(engine):
        yield
        return
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            conn.commit()
