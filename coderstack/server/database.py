"""The database connection: SQLAlchemy Core over SQLite (the embedded default) or PostgreSQL,
run off the reactor thread.

Every transaction runs on a dedicated thread pool and answers with a Deferred, so the reactor
never blocks on the database.  SQLite gets one thread (it serialises writers anyway and a single
connection avoids "database is locked"); PostgreSQL gets several.  The SQLite files hold password
and token hashes, so they are readable by this user only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from coderstack.server import schema

T = TypeVar("T")


def database_url(data_dir: str | None, postgres_url: str | None) -> str:
    """The SQLAlchemy URL: PostgreSQL (psycopg 3) when given, else SQLite in the data dir."""
    if postgres_url:
        url = sa.engine.make_url(postgres_url)
        if url.drivername in ("postgres", "postgresql"):
            url = url.set(drivername="postgresql+psycopg")
        return url.render_as_string(hide_password=False)
    assert data_dir is not None
    return "sqlite:///" + os.path.join(data_dir, "coderstack.db")


def private_sqlite_file(path: str | None) -> None:
    """The SQLite database and its -wal and -shm files readable by this user only (0600),
    whatever the directory's mode or the umask: they hold password and token hashes.

    The database file is created here, 0600, before SQLite opens it; SQLite gives the -wal and
    -shm files the database file's mode, and they are made 0600 again after every connect."""
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


class Database:
    """The engine and its threads. Construct, ``start()``, then ``await db.migrate()``."""

    def __init__(self, url: str, reactor: IReactorFromThreads) -> None:
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

    def transact(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """``fn(connection, *args)`` inside one transaction, on the database threads."""

        def work() -> T:
            with self.engine.begin() as conn:
                return fn(conn, *args)

        return self._run(work)

    def ping(self) -> Deferred[None]:
        """One round trip to the database (``SELECT 1``), as the health report times it."""

        def work(conn: Any) -> None:
            conn.exec_driver_sql("SELECT 1")

        return self.transact(work)

    # -- schema ----------------------------------------------------------------------------

    def migrate(self) -> Deferred[int]:
        """Bring the schema up to date (:func:`coderstack.server.schema.migrate`)."""
        return self._run(schema.migrate, self.engine)
