"""The real product in the NAT lab: what users run, through NATs (namespaces prefixed ``csuc``)::

    agent ns  10.81.<n>.2 ── NAT A 203.0.113.10 ─┐   wan ns, br0 203.0.113.2:
                                                 ├─   twistd coderstack-server :3000 (API, coordinator,
    CLI ns    10.82.<n>.2 ── NAT B 203.0.113.11 ─┘    DERP /derp) + its STUN :3478 and :3479 — the access URL
                                                      203.0.113.3: a second STUN server (optional)

The topology is :class:`tests.netlab.magicsock_lab.MagicsockLab`'s (stateful NATs, ``--random-fully``
for hard NAT, ``block_udp``); the processes are :mod:`tests.support.processes`' ``Deployment``
with each role in its namespace: ``twistd coderstack-server`` on the wan, ``twistd
coderstack-agent`` behind NAT A, the ``coderstack`` CLI (logged in as alice) behind NAT B. All run
this checkout's code (``PYTHONPATH``).

The server's STUN runs with its defaults (two ports, both in the embedded DERP region), which is
enough for netcheck to call a NAT that maps per destination hard; ``second_stun`` adds a STUN
server on another address too (``--derp-server-stun-addresses`` puts it in the DERP map as a
STUN-only region, as an admin would).

Cleanup, also when a test fails: every process by PID (SIGTERM, then SIGKILL), the descendants
of long-lived CLI sessions by PID (OpenSSH and its ProxyCommand), then any PID still inside one of
our namespaces (``ip netns pids``), then the namespaces.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.internet import defer, protocol, reactor

from tests.netlab.magicsock_lab import LAB_WAIT, NAT_IPS, SERVER_IP, MagicsockLab, available, sh
from tests.support.processes import CLIUser, Deployment, Process, in_netns, pid_alive, sleep
from tests.support.waiting import wait_until

__all__ = ["NAT_IPS", "SERVER_IP", "UserLab", "available", "Session"]

SERVER_PORT = 3000
STUN_PORT = 3478
SECOND_STUN_IP = "203.0.113.3"
REGION_NAME = "Coder Embedded Relay"
WORKSPACE = "box"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found via /proc), deepest last."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def cmdline(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


def kill_pids(pids: list[int], signum: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


class Session(protocol.ProcessProtocol):
    """A long-lived CLI command (``coderstack ssh box -- ...``) with stdin we write to."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.out = b""
        self.err = b""
        # Exit status. (processEnded would also wait for OpenSSH, which shares our pipes.)
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.pid: int | None = None
        self.tree: dict[int, bytes | None] = {}  # every descendant seen (OpenSSH, the ProxyCommand)

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err = (self.err + data)[-16000:]

    def processExited(self, reason: Any) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))

    def write(self, data: bytes) -> None:
        self.remember_tree()
        self.transport.write(data)

    def close_stdin(self) -> None:
        self.transport.closeStdin()

    def remember_tree(self) -> None:
        if self.pid is not None and not self.ended.called:
            for pid in descendants(self.pid):
                self.tree.setdefault(pid, cmdline(pid))

    async def wait_output(self, needle: bytes) -> None:
        def shown() -> bool:
            if needle in self.out:
                return True
            if self.ended.called:
                raise AssertionError(f"{self.name} ended; out={self.out!r} err={self.err!r}")
            return False

        await wait_until(shown, lambda: f"{needle!r} from {self.name}; out={self.out!r}",
                         timeout=LAB_WAIT, interval=0.05)

    async def stop(self) -> None:
        """By PID: the CLI, then whatever it started that is still alive."""
        self.remember_tree()
        if not self.ended.called and self.pid is not None:
            kill_pids([self.pid], signal.SIGTERM)
            for _ in range(40):
                if self.ended.called:
                    break
                await sleep(0.05)
            if not self.ended.called:
                kill_pids([self.pid])
                await self.ended
        # Only those still running what we saw them run (a PID may have been reused since).
        kill_pids([p for p, cmd in self.tree.items() if pid_alive(p) and cmdline(p) == cmd])


class UserLab:
    """Server, agent and a logged-in CLI user, each in its namespace, behind the lab's NATs."""

    def __init__(self, testcase: Any, nat: str = "easy", *server_args: str, second_stun: bool = False) -> None:
        self.testcase = testcase
        self.net = MagicsockLab(nat, prefix="csuc")
        testcase.addCleanup(self.cleanup)  # runs last: the processes' own cleanups come first
        ns = self.net.ns
        self.second_stun = second_stun
        stun_args: tuple[str, ...] = ()
        if second_stun:
            sh("ip", "addr", "add", f"{SECOND_STUN_IP}/24", "dev", "br0", ns=ns["wan"])
            stun_args = ("--derp-server-stun-addresses", f"{SECOND_STUN_IP}:{STUN_PORT}")
        self.d = Deployment(
            testcase, "--access-url", f"http://{SERVER_IP}:{SERVER_PORT}",
            "--stun-address", "", *stun_args, *server_args,  # "": the default STUN ports
            host=SERVER_IP, port=SERVER_PORT,
            netns={"server": ns["wan"], "agent": ns["pa"], "cli": ns["pb"]})
        self.agent: Process | None = None
        self.stun2: Process | None = None
        self.user: CLIUser = self.d.user("alice")
        self.sessions: list[Session] = []

    async def start(self) -> CLIUser:
        """The server up, alice logged in, workspace ``box`` with its agent connected."""
        if self.second_stun:
            argv = [sys.executable, "-m", "tests.netlab.relay_server", "--http", "8081",
                    "--stun", f"{SECOND_STUN_IP}:{STUN_PORT}"]
            self.stun2 = Process(self.testcase, "stun2", in_netns(self.net.ns["wan"], argv),
                                 self.d.env(self.d.dir), self.d.dir)
            await self.stun2.output_shows("ready")
        await self.d.start_server()
        await self.user.login_first("alice")
        token = await self.user.create(WORKSPACE)
        self.agent = self.d.start_agent(token)
        await self.user.wait_status(WORKSPACE, "connected", watch=[self.agent])
        return self.user

    async def restart_server(self, down_for: float = 0.0) -> None:
        await self.d.stop_server()
        if down_for:
            await sleep(down_for)
        await self.d.start_server()

    def block_udp(self, side: str, on: bool = True) -> None:
        """Drop forwarded UDP at NAT ``a`` (agent) or ``b`` (CLI)."""
        self.net.block_udp(side, on)

    def udp_forwarded(self, side: str) -> int:
        """Packets of UDP the NAT of ``side`` forwarded between the two NATs' public addresses
        (the direct path; DERP is TCP to the server), counted by a rule :meth:`count_direct` added."""
        out = sh("iptables", "-nvxL", "FORWARD", ns=self.net.ns["n" + side]).stdout
        total = 0
        for line in out.splitlines():
            if "csuc-direct" in line:
                total += int(line.split()[0])
        return total

    def count_direct(self, side: str) -> None:
        """Count UDP from this NAT's LAN to the other NAT's public address (a comment-tagged rule
        with no verdict, first in FORWARD)."""
        other = NAT_IPS["a" if side == "b" else "b"]
        sh("iptables", "-I", "FORWARD", "-o", "n1", "-p", "udp", "-d", other,
           "-m", "comment", "--comment", "csuc-direct", ns=self.net.ns["n" + side])

    def session(self, *argv: str, **env: str) -> Session:
        """``coderstack ARGV`` behind NAT B, kept running with stdin open."""
        s = Session(" ".join(argv))
        full = in_netns(self.user.netns, [sys.executable, "-m", "coderstack", *argv])
        reactor.spawnProcess(s, full[0], full, env=self.user.cli_env(**env), path=self.user.home)
        self.sessions.append(s)
        self.testcase.addCleanup(s.stop)
        return s

    def cleanup(self) -> None:
        # Anything still alive in our namespaces (all started by this test) goes by PID.
        for name in self.net.namespaces:
            out = sh("ip", "netns", "pids", name, check=False).stdout
            kill_pids([int(p) for p in out.split() if p.isdigit()])
        self.net.cleanup()
