"""Several server replicas on one PostgreSQL behind HAProxy, as real processes, for tests.

A :class:`ReplicaSet` makes one database on the shared test cluster (``postgres.py``), runs N
``twistd coderstack-server`` processes (each a ``processes.Deployment``: its own data dir and its
own ``--http-address 127.0.0.1:PORT``), each told ``--postgres-url`` the shared database,
``--derp-server-relay-url`` its own address (a replica's relay is meshed through its own URL,
never the load balancer's) and ``--access-url`` the load balancer's frontend; then starts HAProxy
(``haproxy.py``) in front of them. Every process is stopped by PID at the test's cleanup.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Callable
from typing import Any

from tests.support import haproxy, postgres
from tests.support.haproxy import HAProxy
from tests.support.processes import Deployment, Process, free_port


def available() -> str | None:
    """None when replicas behind HAProxy can run here, else why not."""
    return postgres.available() or haproxy.available()


class ReplicaSet:
    """``n`` replicas behind one HAProxy; :attr:`url` is the load balancer's (the access URL).

    ``server_args`` go to every replica. :attr:`replicas` are their ``Deployment``s (their
    :attr:`Deployment.server` the running process, :attr:`Deployment.url` their own address).
    """

    def __init__(self, testcase: Any, n: int = 2, *server_args: str, balance: str = "roundrobin",
                 postgres_url_for: Callable[[int, str], str] | None = None) -> None:
        """``postgres_url_for(i, url)``: the database URL replica ``i`` is given instead of the
        shared database's ``url`` (to reach it through something a test can cut)."""
        self.testcase = testcase
        self.postgres_url = postgres.cluster().new_database()
        # Not mktemp(): HAProxy's admin socket lives here, and trial's per-test paths can pass a
        # unix socket's 107-byte limit. Removed at the test's cleanup (registered first, so it
        # runs after HAProxy has stopped).
        lb_dir = tempfile.mkdtemp(prefix="cs-lb-")
        testcase.addCleanup(shutil.rmtree, lb_dir, True)
        lb_port = free_port()  # known first: it is every replica's access URL
        self.url = f"http://127.0.0.1:{lb_port}"
        self.replicas: list[Deployment] = []
        for i in range(n):
            url = self.postgres_url if postgres_url_for is None else postgres_url_for(i, self.postgres_url)
            d = Deployment(testcase, "--postgres-url", url, "--access-url", self.url, *server_args)
            d.server_args += ["--derp-server-relay-url", d.url]
            self.replicas.append(d)
        self.lb = HAProxy(testcase, lb_dir, [(d.host, d.port) for d in self.replicas], port=lb_port,
                          balance=balance)

    async def start(self) -> None:
        """Every replica until it answers ``/healthz`` on its own address, then HAProxy until
        its health checks have them all UP."""
        for i in range(len(self.replicas)):
            await self.start_replica(i)
        await self.lb.start(wait_up=True)

    async def start_replica(self, i: int) -> Process:
        """Replica ``i`` (again), on its port and data dir; returns once it answers /healthz."""
        return await self.replicas[i].start_server()

    def process(self, i: int) -> Process:
        server = self.replicas[i].server
        assert server is not None, f"replica {i} was never started"
        return server

    async def kill9(self, i: int, wait_down: bool = True) -> None:
        """SIGKILL replica ``i`` (no shutdown of any kind); with ``wait_down``, until HAProxy's
        health checks have taken it out."""
        proc = self.process(i)
        proc.signal(signal.SIGKILL)
        await proc.wait()
        if wait_down:
            await self.lb.wait_status(i, "DOWN")

    async def restart(self, i: int) -> None:
        """Replica ``i`` stopped (SIGTERM, if it runs) and started again, until HAProxy has it UP."""
        await self.process(i).stop()
        await self.start_replica(i)
        await self.lb.wait_status(i, "UP")

    async def served(self) -> list[int]:
        """Responses (any status) each replica has sent through the load balancer so far."""
        rows = [await self.lb.server(i) for i in range(len(self.replicas))]
        return [sum(int(row[f"hrsp_{k}xx"] or 0) for k in range(1, 6)) for row in rows]

    async def stop(self) -> None:
        """HAProxy, then every replica (each by PID; the cleanups would do the same)."""
        await self.lb.stop()
        for d in self.replicas:
            if d.server is not None:
                await d.server.stop()
