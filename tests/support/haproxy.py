"""HAProxy in front of servers for tests: Debian's ``haproxy``, a config in the test's temp dir,
the frontend on 127.0.0.1 on a free port, stopped by PID at cleanup (also when the test fails).

The config is the one the README recommends for replicas: ``mode http`` (websockets and
``Upgrade: DERP`` pass once upgraded), hour-long client, server and tunnel timeouts, and a health
check of ``GET /healthz`` every 500 ms that takes a server out after two failures and back after
one success. HAProxy's admin socket (in the temp dir) answers :meth:`HAProxy.stats`: its CSV
statistics, one dict per frontend, backend and server.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from typing import Any

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.error import ConnectError

from tests.support.processes import PROCESS_WAIT, Process, free_port
from tests.support.waiting import wait_until

BACKEND = "replicas"


def available() -> str | None:
    """None when ``haproxy`` can run here, else why not."""
    if shutil.which("haproxy") is None:
        return "haproxy is not installed (apt-get install haproxy)"
    return None


def config(port: int, backends: list[tuple[str, int]], stats_socket: str,
           balance: str = "roundrobin") -> str:
    """The config text: a frontend on 127.0.0.1:``port`` and one checked server per backend
    (host, port), named ``replica0``, ``replica1``, ..."""
    servers = "".join(f"    server replica{i} {host}:{p} check\n" for i, (host, p) in enumerate(backends))
    return f"""\
global
    log stdout format raw local0
    stats socket {stats_socket} mode 600 level admin

defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    # Websockets (coordination, the DERP fallback, PTYs) and Upgrade: DERP are long-lived.
    timeout tunnel 1h
    # A request whose connection a dead server refused goes to another one.
    option redispatch
    retries 3

frontend coderstack
    bind 127.0.0.1:{port}
    option forwardfor
    default_backend {BACKEND}

backend {BACKEND}
    balance {balance}
    option httpchk GET /healthz
    http-check expect status 200
    # A busy replica may take longer than the 500 ms between checks to answer one; a dead one
    # refuses the connection at once.
    timeout check 2s
    default-server inter 500ms fall 2 rise 1
{servers}"""


class _Collect(protocol.Protocol):
    def __init__(self, command: bytes) -> None:
        self.command = command
        self.chunks: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.command + b"\n")

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(b"".join(self.chunks))


class HAProxy:
    """One ``haproxy`` process balancing ``backends`` (host, port) behind :attr:`url`.

    ``directory`` holds its config, admin socket and log (keep it short: a unix socket's path
    has at most 107 bytes). ``port`` is the frontend's (a free one by default); known before
    :meth:`start`, so the servers can be told their access URL first.
    """

    def __init__(self, testcase: Any, directory: str, backends: list[tuple[str, int]],
                 port: int | None = None, balance: str = "roundrobin") -> None:
        self.testcase = testcase
        self.dir = directory
        self.backends = list(backends)
        self.port = free_port() if port is None else port
        self.url = f"http://127.0.0.1:{self.port}"
        self.balance = balance
        self.socket_path = os.path.join(directory, "haproxy.sock")
        self.config_path = os.path.join(directory, "haproxy.cfg")
        self.process: Process | None = None

    async def start(self, wait_up: bool = True) -> Process:
        """Start it (in the foreground, ``-db``); with ``wait_up``, until every server is UP."""
        with open(self.config_path, "w") as f:
            f.write(config(self.port, self.backends, self.socket_path, self.balance))
        self.process = Process(self.testcase, "haproxy", ["haproxy", "-db", "-f", self.config_path],
                               dict(os.environ), self.dir)
        proc = self.process

        async def answering() -> bool:
            proc.check_running()
            try:
                await self.stats()
            except (OSError, ConnectionError, ConnectError):  # not listening yet
                return False
            return True

        await wait_until(answering, "haproxy's admin socket", timeout=PROCESS_WAIT, interval=0.05)
        if wait_up:
            for i in range(len(self.backends)):
                await self.wait_status(i, "UP")
        return proc

    async def command(self, line: str) -> str:
        """One command on the admin socket (``show stat``, ``show servers state``...), its answer."""
        ep = endpoints.UNIXClientEndpoint(reactor, self.socket_path, timeout=5)
        collect = _Collect(line.encode())
        await ep.connect(protocol.Factory.forProtocol(lambda: collect))
        return (await collect.done.addTimeout(10, reactor)).decode()

    async def stats(self) -> list[dict[str, str]]:
        """``show stat``: one row per proxy (``pxname``) and server (``svname``)."""
        text = await self.command("show stat")
        if not text.startswith("# "):
            raise ConnectionError(f"unexpected answer to show stat: {text[:200]!r}")
        return list(csv.DictReader(io.StringIO(text[2:])))

    async def server(self, i: int) -> dict[str, str]:
        """The stats row of server ``replica{i}``."""
        for row in await self.stats():
            if row["pxname"] == BACKEND and row["svname"] == f"replica{i}":
                return row
        raise AssertionError(f"no server replica{i} in haproxy's stats")

    async def wait_status(self, i: int, status: str, timeout: float = PROCESS_WAIT) -> None:
        """Until HAProxy's health checks have server ``i`` ``UP`` or ``DOWN`` (exactly: not
        the ``UP 1/2`` of a server on its way down)."""
        last: dict[str, str] = {}

        async def reached() -> bool:
            assert self.process is not None
            self.process.check_running()
            last.update(await self.server(i))
            return last.get("status") == status

        await wait_until(reached, lambda: f"haproxy to see replica{i} {status} (now {last.get('status')}, "
                         f"last check {last.get('check_status')} {last.get('last_chk')})",
                         timeout=timeout, interval=0.1)

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop()
