"""Real coderstack processes for integration tests: servers and agents under ``twistd``, the CLI as
``python -m coderstack``.

Every process runs this checkout's code (``PYTHONPATH`` is the repository root computed from this
file), on 127.0.0.1, in a temp dir of its own, with its output in a log file there. Each one is
stopped by PID at the test's cleanup — SIGTERM, then SIGKILL if it lingers — also when the test
fails; processes they start themselves (the ``--dev`` agent) are found in their logs and stopped
the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Any

from twisted.internet import reactor, task, utils

from coderstack.sdk import Client, SDKError, trust_root_from_env
from tests.support.waiting import wait_until

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
#: How long a real process may take to answer, log a line or reach a status (a loaded CI machine
#: starting a server or an agent takes seconds).
PROCESS_WAIT = 60.0


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port that was free a moment ago (the server must know its port before it starts),
    and never one this process handed out before: the kernel may offer a port again as soon as
    the probing socket closes, and a balancer and a replica once got the same one."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def base_env(home: str, **extra: str) -> dict[str, str]:
    """A clean environment: this checkout first on sys.path, no CODER_*/CODERSTACK_* from the
    caller, no tunnel daemon (and none in the caller's ``$XDG_RUNTIME_DIR``)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CODER_", "CODERSTACK_")) and k not in ("SSL_CERT_FILE", "XDG_RUNTIME_DIR")}
    env.update(PYTHONPATH=REPO_ROOT, HOME=home, XDG_DATA_HOME=os.path.join(home, ".local", "share"),
               XDG_CONFIG_HOME=os.path.join(home, ".config"), PYTHONUNBUFFERED="1",
               # The warm ProxyCommand's daemon outlives the command that started it: tests that
               # want it turn it on (CLIUser stops it by PID at cleanup).
               CODERSTACK_TUNNEL_DAEMON="0")
    env.update(extra)
    return env


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` for a child: SIGTERM when the test runner dies. A runner that is killed
    runs no cleanups; without this its servers, agents and real peers would live on."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, theirs, ...), from /proc, parents first."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


class Process:
    """One child process, its log, and its stop-by-PID cleanup."""

    def __init__(self, testcase: Any, name: str, argv: list[str], env: dict[str, str], cwd: str,
                 stdin: bool = False) -> None:
        """``stdin``: a pipe the test writes to (:meth:`write`) instead of /dev/null."""
        self.name = name
        self.argv = argv
        self.log_path = os.path.join(cwd, f"{name}.log")
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                      preexec_fn=die_with_parent)
        self.pid = self.popen.pid
        testcase.addCleanup(self.stop)

    def write(self, data: bytes) -> None:
        """To its stdin (a few bytes at a time: a pipe's buffer never fills)."""
        assert self.popen.stdin is not None, f"{self.name} was started without a stdin pipe"
        self.popen.stdin.write(data)
        self.popen.stdin.flush()

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            os.kill(self.pid, signum)

    def check_running(self) -> None:
        """Fail, showing its log, if the process has exited."""
        if not self.running():
            raise AssertionError(f"{self.name} exited {self.popen.returncode}:\n{self.log()}")

    async def output_shows(self, text: str, timeout: float = PROCESS_WAIT) -> str:
        """Its log, once that contains ``text``; fails at once if the process exits first."""
        def shown() -> str | None:
            exited = not self.running()
            log = self.log()
            if text in log:
                return log
            if exited:
                self.check_running()
            return None

        return await wait_until(shown, f"{text!r} in the output of {self.name}", timeout=timeout,
                                interval=0.1)

    async def wait(self, timeout: float = PROCESS_WAIT) -> int:
        """Wait (without blocking the reactor) until the process exits; its exit status."""
        await wait_until(lambda: self.popen.poll() is not None, f"{self.name} to exit",
                         timeout=timeout, interval=0.05)
        return self.popen.returncode

    async def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM by PID, then SIGKILL after ``grace`` seconds; the processes it started
        itself (an ``ssh`` and its ProxyCommand) are SIGKILLed by PID after it. Safe to call
        twice."""
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            self.popen.stdin.close()
        children = descendants(self.pid) if self.running() else []
        if self.running():
            os.kill(self.pid, signal.SIGTERM)
            waited = 0.0
            while self.running() and waited < grace:
                await sleep(0.05)
                waited += 0.05
            if self.running():
                os.kill(self.pid, signal.SIGKILL)
            await self.wait()
        for pid in children:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if not self._log.closed:
            self._log.close()
        return self.popen.returncode

    def child_pids(self, pattern: str) -> list[int]:
        """PIDs this process logged with ``pattern`` (a regex with one group)."""
        return [int(m) for m in re.findall(pattern, self.log())]


def in_netns(netns: str | None, argv: list[str]) -> list[str]:
    """``argv`` run inside network namespace ``netns`` (``ip netns exec`` execs it: same PID)."""
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


class Deployment:
    """A server (restartable on the same port and data dir), its agents, and CLI users.

    By default everything runs on 127.0.0.1 in this network namespace. ``host``/``port`` put the
    server on another address, and ``netns`` (role -> namespace name, roles ``server``,
    ``agent`` and ``cli``) runs each kind of process inside its own namespace (the NAT lab,
    tests/netlab/user_lab.py).
    """

    def __init__(self, testcase: Any, *server_args: str, tls: tuple[str, str, str] | None = None,
                 host: str = "127.0.0.1", port: int | None = None,
                 netns: dict[str, str] | None = None) -> None:
        self.testcase = testcase
        # Not mktemp(): tmux and other peers put unix sockets in here, and trial's per-test
        # paths can pass the 108-byte limit. The cwd is trial's temp dir; cleanups remove it.
        self.dir = tempfile.mkdtemp(prefix="cs-it-", dir=os.getcwd())
        self.port = free_port() if port is None else port
        self.host = host
        self.netns = dict(netns or {})
        self.data_dir = os.path.join(self.dir, "server-data")
        self.server_args = list(server_args)
        self.ca_file: str | None = None
        if tls is not None:
            ca, cert, key = tls
            self.ca_file = ca
            self.url = f"https://{host}:{self.port}"
            self.server_args += ["--http-address", "", "--tls-enable", "true",
                                 "--tls-address", f"{host}:{self.port}",
                                 "--tls-cert-file", cert, "--tls-key-file", key]
        else:
            self.url = f"http://{host}:{self.port}"
            self.server_args += ["--http-address", f"{host}:{self.port}"]
        self.server: Process | None = None
        self.starts = 0

    def env(self, home: str, **extra: str) -> dict[str, str]:
        if self.ca_file:
            extra.setdefault("SSL_CERT_FILE", self.ca_file)
        return base_env(home, **extra)

    async def start_server(self, *extra: str, env: dict[str, str] | None = None) -> Process:
        self.starts += 1
        argv = [TWISTD, "-n", "--pidfile=", "coderstack-server", "--data-dir", self.data_dir,
                "--stun-address", "disable", *self.server_args, *extra]
        argv = in_netns(self.netns.get("server"), argv)
        self.server = Process(self.testcase, f"server{self.starts}", argv,
                              env or self.env(self.dir), self.dir)
        await self.wait_healthy(self.server)
        return self.server

    async def wait_healthy(self, proc: Process) -> None:
        if self.netns.get("server"):
            return await self._wait_healthy_in_netns(proc)
        trust = trust_root_from_env({"SSL_CERT_FILE": self.ca_file}) if self.ca_file else None
        client = Client(reactor, self.url, trust_root=trust)

        async def healthy() -> bool:
            proc.check_running()
            try:
                await client.request("GET", "/healthz")
            except SDKError:
                return False
            return True

        try:
            await wait_until(healthy, f"{proc.name} to answer /healthz", timeout=PROCESS_WAIT,
                             interval=0.1)
        finally:
            await client.close()

    async def _wait_healthy_in_netns(self, proc: Process) -> None:
        """This process cannot reach a server in another namespace: curl from inside it."""
        argv = in_netns(self.netns["server"], ["curl", "-sf", "-o", "/dev/null", f"{self.url}/healthz"])

        async def healthy() -> bool:
            proc.check_running()
            return await utils.getProcessValue(argv[0], argv[1:], env=os.environ) == 0

        await wait_until(healthy, f"{proc.name} to answer /healthz", timeout=PROCESS_WAIT, interval=0.1)

    async def stop_server(self) -> int | None:
        assert self.server is not None
        return await self.server.stop()

    def start_agent(self, token: str, name: str = "agent", url: str | None = None, **env: str) -> Process:
        """An agent reaching the server at ``url`` (default: this deployment's own address)."""
        home = os.path.join(self.dir, name)
        os.makedirs(home, exist_ok=True)
        argv = [TWISTD, "-n", "--pidfile=", "coderstack-agent", "--data-dir", os.path.join(home, "data")]
        e = self.env(home, CODER_AGENT_URL=url or self.url, CODER_AGENT_TOKEN=token, **env)
        return Process(self.testcase, name, in_netns(self.netns.get("agent"), argv), e, home)

    def user(self, name: str) -> CLIUser:
        return CLIUser(self, name)


class CLIUser:
    """``python -m coderstack`` with a config dir of its own."""

    def __init__(self, deployment: Deployment, name: str) -> None:
        self.d = deployment
        self.home = os.path.join(deployment.dir, f"cli-{name}")
        os.makedirs(self.home, exist_ok=True)
        self.config_dir = os.path.join(self.home, "config")
        self.extra_env: dict[str, str] = {}
        self.netns = deployment.netns.get("cli")
        deployment.testcase.addCleanup(self.stop_tunnel_daemons)

    def tunnel_daemon_pids(self) -> list[int]:
        """The PIDs in this user's tunnel daemon PID files (``config/run/tunnel-*.pid``)."""
        pids = []
        for path in glob.glob(os.path.join(self.config_dir, "run", "tunnel-*.pid")):
            with contextlib.suppress(OSError, ValueError), open(path) as f:
                pids.append(int(f.read().strip()))
        return pids

    async def stop_tunnel_daemons(self) -> None:
        """SIGTERM each daemon by PID, SIGKILL one that lingers: none outlives its test."""
        for pid in self.tunnel_daemon_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            waited = 0.0
            while pid_alive(pid) and waited < 10:
                await sleep(0.05)
                waited += 0.05
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def cli_env(self, **env: str) -> dict[str, str]:
        """The environment this user's commands run with (its own config dir)."""
        e = self.d.env(self.home, CODER_CONFIG_DIR=self.config_dir, **self.extra_env)
        e.update(env)
        return e

    async def run(self, *argv: str, **env: str) -> tuple[int, str, str]:
        return await self.run_program(sys.executable, "-m", "coderstack", *argv, **env)

    async def run_program(self, *argv: str, **env: str) -> tuple[int, str, str]:
        """Any program (``ssh -F ...``) as this user, in the CLI's namespace if it has one."""
        full = in_netns(self.netns, list(argv))
        out, err, code = await utils.getProcessOutputAndValue(
            full[0], full[1:], env=self.cli_env(**env), path=self.home)
        return code, out.decode(), err.decode()

    async def ok(self, *argv: str, **env: str) -> str:
        code, out, err = await self.run(*argv, **env)
        if code != 0:
            raise AssertionError(f"coderstack {' '.join(argv)} exited {code}: {err}")
        return out

    async def login_first(self, username: str = "alice", url: str | None = None) -> None:
        """The first user, logged in at ``url`` (the deployment's own by default)."""
        await self.ok("login", url or self.d.url, "--first-user-username", username,
                      "--first-user-email", f"{username}@example.com",
                      "--first-user-password", f"{username} password")

    async def login(self, username: str) -> None:
        await self.ok("login", self.d.url, "--email", username, "--password", f"{username} password")

    async def create(self, name: str) -> str:
        """Create a workspace; returns the agent token it printed."""
        out = await self.ok("create", name)
        tokens = [w.split("=", 1)[1] for w in out.split() if w.startswith("CODER_AGENT_TOKEN=")]
        assert len(tokens) == 1, out
        return tokens[0]

    async def show(self, name: str) -> dict[str, Any]:
        return json.loads(await self.ok("show", name, "--output", "json"))

    async def wait_status(self, name: str, status: str, watch: list[Process] = (),
                          missing_ok: bool = False) -> dict[str, Any]:
        """Poll ``show NAME --output json`` until its agent has ``status``; fails at once if a
        process in ``watch`` exits.

        ``missing_ok``: keep polling while ``show`` fails (not logged in yet, no such workspace yet).
        """
        async def shown() -> dict[str, Any] | None:
            code, out, err = await self.run("show", name, "--output", "json")
            if code != 0 and not missing_ok:
                raise AssertionError(f"coderstack show {name} exited {code}: {err}")
            ws = json.loads(out) if code == 0 else None
            if ws is not None and ws["agents"][0]["status"] == status:
                return ws
            for proc in watch:
                proc.check_running()
            return None

        return await wait_until(shown, f"{name}'s agent to be {status}", timeout=PROCESS_WAIT,
                                interval=0.1)

    def session_token(self) -> str:
        with open(os.path.join(self.config_dir, "session")) as f:
            return f.read().strip()


async def box_connected(d: Deployment) -> tuple[CLIUser, str, Process]:
    """On ``d``'s server: alice as its first user, her workspace "box" (and its agent token) and
    the agent, once it is connected."""
    await d.start_server()
    alice = d.user("alice")
    await alice.login_first("alice")
    token = await alice.create("box")
    agent = d.start_agent(token)
    await alice.wait_status("box", "connected", watch=[agent])
    return alice, token, agent


async def connected_workspace(testcase: Any, *server_args: str) -> tuple[Deployment, CLIUser, Process]:
    """A server (``server_args``), alice as its first user, her workspace "box" and its agent,
    once the agent is connected."""
    d = Deployment(testcase, *server_args)
    alice, _, agent = await box_connected(d)
    return d, alice, agent
