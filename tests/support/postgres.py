"""A throwaway PostgreSQL cluster for tests: initdb + pg_ctl in a temp dir, stopped at cleanup.

PostgreSQL refuses to run as root, so when we are root the cluster's directory is owned by the
``postgres`` user and the commands run through ``su postgres``. One cluster is shared by a test
module (started lazily, stopped at interpreter exit or by ``stop()``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from typing import Any

from tests.support.waiting import wait_until_blocking

_cluster: PostgresCluster | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available() -> str | None:
    """None when a cluster can be made here, else why not."""
    for tool in ("initdb", "pg_ctl"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    return None


def require() -> None:
    """Skip the calling test when a cluster cannot be made here (CI installs PostgreSQL)."""
    from twisted.trial.unittest import SkipTest

    why = available()
    if why is not None:
        raise SkipTest(f"PostgreSQL cannot run here: {why}")


class PostgresCluster:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="cs-pg-")
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.user = "postgres" if self.as_postgres else os.environ.get("USER", "postgres")
        self._run(f"initdb -D {self.dir}/db -A trust -U {self.user} >/dev/null")
        self.start_server()
        self.running = True

    def _run(self, command: str) -> None:
        if self.as_postgres:
            args = ["su", "postgres", "-s", "/bin/sh", "-c", command]
        else:
            args = ["sh", "-c", command]
        subprocess.run(args, check=True, cwd=self.dir, timeout=120)

    def stop_server(self) -> None:
        """Stop PostgreSQL, keeping the cluster (``start_server`` brings it back)."""
        self._run(f"pg_ctl -D {self.dir}/db -m fast -w stop >/dev/null")

    def start_server(self) -> None:
        self._run(
            f"pg_ctl -D {self.dir}/db -o '-k {self.dir} -p {self.port} -h 127.0.0.1' "
            f"-l {self.dir}/log -w start >/dev/null"
        )

    def new_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        errors: list[str] = []

        def created() -> bool:
            try:
                with psycopg.connect(
                    f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres", autocommit=True
                ) as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')
            except psycopg.Error as err:  # the cluster may still be starting
                errors.append(str(err))
                return False
            return True

        wait_until_blocking(created, lambda: f"database {name} ({errors[-1] if errors else ''})",
                            timeout=5, interval=0.1)
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"

    def pause(self) -> None:
        """Stop the server but keep its data: the database is unreachable until :meth:`resume`."""
        self._run(f"pg_ctl -D {self.dir}/db -m immediate -w stop >/dev/null")

    def resume(self) -> None:
        self._run(
            f"pg_ctl -D {self.dir}/db -o '-k {self.dir} -p {self.port} -h 127.0.0.1' "
            f"-l {self.dir}/log -w start >/dev/null"
        )

    def stop(self) -> None:
        if self.running:
            self.running = False
            self._run(f"pg_ctl -D {self.dir}/db -m fast -w stop >/dev/null")
            shutil.rmtree(self.dir, ignore_errors=True)


async def migrated_store(testcase: Any, url: str | None = None) -> Any:
    """A :class:`~coderstack.server.store.Store` on ``url`` (a new database on the shared
    cluster by default), migrated, stopped at the test's cleanup."""
    from twisted.internet import reactor

    from coderstack.server.database import database_url
    from coderstack.server.store import Store

    s = Store(database_url(None, url or cluster().new_database()), reactor)
    testcase.addCleanup(s.stop)
    await s.migrate()
    return s


def cluster() -> PostgresCluster:
    global _cluster
    if _cluster is None:
        _cluster = PostgresCluster()
        atexit.register(_cluster.stop)
    return _cluster
