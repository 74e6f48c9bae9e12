"""Shared pieces of the hostile-client tests: a real deployment with a workspace whose agent is
connected, attackers on other loopback addresses (127.0.0.2 and up, so per-source limits see
them as other hosts), and what the tests watch (server RSS and open descriptors, /healthz, a
live ``coderstack ping``)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.web.client import Agent, HTTPConnectionPool

from tests.support.processes import TWISTD, CLIUser, Deployment, Process, box_connected

#: The server's resident memory may not grow past this during an attack (its RSS after start-up
#: on this machine is about 80 MiB, idle).
RSS_BOUND_KIB = 200 * 1024


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open-files line")


def http_client(source: str = "127.0.0.1") -> HTTPClient:
    """A treq client whose connections come from ``source`` (any 127/8 address on Linux)."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent(reactor, bindAddress=(source, 0), pool=pool))


async def get_json(client: HTTPClient, url: str, **kw: Any) -> tuple[int, Any, Any]:
    resp = await client.request(kw.pop("method", "GET"), url, **kw)
    body = await resp.content()
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = body
    return resp.code, parsed, resp.headers


class LimitedDeployment(Deployment):
    """A Deployment whose server starts under ``prlimit --nofile=SOFT:HARD`` (prlimit execs it,
    so the PID is the server's)."""

    nofile: tuple[int, int] | None = None

    async def start_server(self, *extra: str, env: dict[str, str] | None = None) -> Process:
        self.starts += 1
        argv = [TWISTD, "-n", "--pidfile=", "coderstack-server", "--data-dir", self.data_dir,
                "--stun-address", "disable", *self.server_args, *extra]
        if self.nofile is not None:
            argv = ["prlimit", f"--nofile={self.nofile[0]}:{self.nofile[1]}", *argv]
        self.server = Process(self.testcase, f"server{self.starts}", argv, env or self.env(self.dir), self.dir)
        await self.wait_healthy(self.server)
        return self.server


async def workspace(testcase: Any, *server_args: str, nofile: tuple[int, int] | None = None
                    ) -> tuple[LimitedDeployment, CLIUser, Process]:
    """A server, user alice logged in (from 127.0.0.1), workspace ``box`` with its agent connected."""
    d = LimitedDeployment(testcase, *server_args)
    d.nofile = nofile
    alice, _, agent = await box_connected(d)
    return d, alice, agent


async def ping_ok(testcase: Any, user: CLIUser, name: str = "box", count: int = 3) -> str:
    code, out, err = await user.run("ping", name, "-n", str(count), "--wait", "200ms")
    testcase.assertEqual(code, 0, f"ping failed:\n{out}\n{err}")
    pongs = [line for line in out.splitlines() if line.startswith(f"pong from {name} ")]
    testcase.assertEqual(len(pongs), count, out)
    return out


async def healthz_ok(testcase: Any, d: Deployment, source: str = "127.0.0.1") -> None:
    """A fresh connection's GET /healthz is answered 200 OK."""
    client = http_client(source)
    code, body, _ = await get_json(client, d.url + "/healthz")
    testcase.assertEqual((code, body), (200, b"OK"))


class Dripper(Protocol):
    """Sends a request head one header line every ``every`` seconds and never finishes it."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.received = b""
        self.closed = False
        self.lines = 0
        self._call: Any = None

    def connectionMade(self) -> None:
        self.transport.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        self._call = reactor.callLater(self.every, self._drip)

    def _drip(self) -> None:
        self.lines += 1
        self.transport.write(b"X-Drip-%d: 1\r\n" % self.lines)
        self._call = reactor.callLater(self.every, self._drip)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.closed = True
        if self._call is not None and self._call.active():
            self._call.cancel()

    def status(self) -> bytes:
        return self.received.split(b"\r\n", 1)[0]


class LivePing(ProcessProtocol):
    """``coderstack ping NAME -n COUNT`` running beside an attack; ``first_pong`` fires when its
    tunnel is up, ``ended`` with (exit status, stdout, stderr)."""

    def __init__(self, testcase: Any, user: CLIUser, name: str = "box", count: int = 20,
                 wait: str = "500ms") -> None:
        self.name, self.count = name, count
        self.out = b""
        self.err = b""
        self.first_pong: Deferred[None] = Deferred()
        self.ended: Deferred[tuple[int, str, str]] = Deferred()
        argv = [sys.executable, "-m", "coderstack", "ping", name, "-n", str(count), "--wait", wait]
        self.transport = reactor.spawnProcess(self, argv[0], argv, env=user.cli_env(), path=user.home)
        testcase.addCleanup(self.stop)

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if b"pong from " in self.out and not self.first_pong.called:
            self.first_pong.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        code = reason.value.exitCode if reason.value.exitCode is not None else -1
        if not self.first_pong.called:
            self.first_pong.errback(AssertionError(f"ping ended before a pong:\n{self.err.decode()}"))
        self.ended.callback((code, self.out.decode(), self.err.decode()))

    def stop(self) -> None:
        if not self.ended.called:
            self.transport.signalProcess("KILL")

    async def assert_all_pongs(self, testcase: Any) -> str:
        code, out, err = await self.ended
        testcase.assertEqual(code, 0, f"ping failed:\n{out}\n{err}")
        pongs = [line for line in out.splitlines() if line.startswith(f"pong from {self.name} ")]
        testcase.assertEqual(len(pongs), self.count, out)
        return out
