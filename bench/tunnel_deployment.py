"""A real coderstack deployment on 127.0.0.1 for benchmarks, without Twisted in the caller:
``twistd coderstack-server``, one user logged in with the CLI, workspace ``box`` and its
``twistd coderstack-agent``, plus the ``config-ssh`` file for stock OpenSSH.

Every process runs this checkout's code (``PYTHONPATH``), in a temp dir of its own, with its
output in a log file there; :meth:`TunnelDeployment.close` stops them by PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

from loopback_ssh import free_port, stop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class TunnelDeployment:
    def __init__(self, tmp: str, *server_args: str) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.cli_home = os.path.join(tmp, "cli")
        os.makedirs(self.cli_home)
        self.config_dir = os.path.join(self.cli_home, "config")
        self.ssh_config = os.path.join(self.cli_home, "ssh_config")
        self.server_args = list(server_args)

    def env(self, home: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CODER_")}
        env.update(PYTHONPATH=ROOT, HOME=home, PYTHONUNBUFFERED="1", **extra)
        return env

    def cli_env(self, **extra: str) -> dict[str, str]:
        return self.env(self.cli_home, CODER_CONFIG_DIR=self.config_dir, **extra)

    def spawn(self, name: str, argv: list[str], env: dict[str, str], cwd: str) -> subprocess.Popen:
        log = open(os.path.join(cwd, f"{name}.log"), "ab")
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        log.close()
        self.procs.append(proc)
        return proc

    def cli(self, *argv: str, **env: str) -> str:
        done = subprocess.run([sys.executable, "-m", "coderstack", *argv], env=self.cli_env(**env),
                              cwd=self.cli_home, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"coderstack {' '.join(argv)} exited {done.returncode}: {done.stderr}")
        return done.stdout

    def start(self) -> None:
        server = self.spawn("server", [
            TWISTD, "-n", "--pidfile=", "coderstack-server", "--data-dir", os.path.join(self.tmp, "server-data"),
            "--stun-address", "disable", "--http-address", f"127.0.0.1:{self.port}", *self.server_args,
        ], self.env(self.tmp), self.tmp)
        self._wait(lambda: self._healthy(), server, "the server to answer /healthz")
        self.cli("login", self.url, "--first-user-username", "bench", "--first-user-email", "bench@example.com",
                 "--first-user-password", "bench password")
        out = self.cli("create", "box")
        token = [w.split("=", 1)[1] for w in out.split() if w.startswith("CODER_AGENT_TOKEN=")][0]
        agent_home = os.path.join(self.tmp, "agent")
        os.makedirs(agent_home)
        agent = self.spawn("agent", [
            TWISTD, "-n", "--pidfile=", "coderstack-agent", "--data-dir", os.path.join(agent_home, "data"),
        ], self.env(agent_home, CODER_AGENT_URL=self.url, CODER_AGENT_TOKEN=token), agent_home)
        self._wait(lambda: json.loads(self.cli("show", "box", "--output", "json"))["agents"][0]["status"]
                   == "connected", agent, "the agent to connect")
        open(self.ssh_config, "w").close()
        self.cli("config-ssh", "--ssh-config-file", self.ssh_config, "--yes")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2):
                return True
        except OSError:
            return False

    @staticmethod
    def _wait(ready, proc: subprocess.Popen, what: str, deadline: float = 60.0) -> None:
        end = time.monotonic() + deadline
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"gave up waiting for {what}: process exited {proc.returncode}")
            if time.monotonic() > end:
                raise RuntimeError(f"gave up waiting for {what}")
            time.sleep(0.1)

    def close(self) -> None:
        for proc in reversed(self.procs):  # by PID, ours only
            stop(proc, grace=10.0)
        self.procs.clear()
