#!/usr/bin/env python3
"""How long the CLI takes to start: ``coderstack --version``, ``--help`` and ``ping -n 1`` (a real
deployment on loopback, direct), wall time of the whole process, beside ``python -c pass`` (the
interpreter's own start) in the same run.

``ping`` runs cold (``CODERSTACK_TUNNEL_DAEMON=0``: a new tunnel each time) and warm (over the
tunnel daemon's tunnel; the process still starts Twisted).

Then ``ssh coder.box true`` through config-ssh's ProxyCommand three ways: cold (the tunnel daemon
turned off, ``CODERSTACK_TUNNEL_DAEMON=0``: a Twisted start and a new tunnel every time), first
use (the daemon stopped before each run: it starts, then dials), and warm (the daemon holds the
tunnel); beside the same stock ``ssh`` on 127.0.0.1 without a tunnel to the agent's own SSH server
(conch) and to OpenSSH's sshd (``--no-sshd`` leaves that out: it needs root for its private mount
namespace).

Median of 15 runs each (5 for ping, which builds a tunnel every time; 11 for each ssh row).

Usage: python bench/bench_cli.py [--no-sshd]
"""

from __future__ import annotations

import glob
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_ssh import start_conch
from loopback_ssh import client_key, ssh_args, start_sshd, stop
from tunnel_deployment import TunnelDeployment

COLD_RUNS, PING_RUNS, SSH_RUNS = 15, 5, 11


def wall(argv: list[str], env: dict[str, str] | None = None, runs: int = COLD_RUNS) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise RuntimeError(f"{argv} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return statistics.median(times) * 1000


def daemon_pids(config_dir: str) -> list[int]:
    pids = []
    for path in glob.glob(os.path.join(config_dir, "run", "tunnel-*.pid")):
        try:
            with open(path) as f:
                pids.append(int(f.read()))
        except (OSError, ValueError):
            pass
    return pids


def stop_daemons(config_dir: str) -> None:
    """SIGTERM the tunnel daemon by the PID in its file; wait until it is gone."""
    for pid in daemon_pids(config_dir):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(500):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)


def ssh_rows(dep: TunnelDeployment) -> list[tuple[str, float]]:
    argv = ["ssh", "-F", dep.ssh_config, "coder.box", "true"]
    env = dep.cli_env()
    env.pop("XDG_RUNTIME_DIR", None)  # the daemon's files in the deployment's config dir
    off = dict(env, CODERSTACK_TUNNEL_DAEMON="0")
    on = dict(env, CODERSTACK_TUNNEL_DAEMON="1")
    rows = [("ssh coder.box true, cold (CODERSTACK_TUNNEL_DAEMON=0)", wall(argv, env=off, runs=SSH_RUNS))]
    first = []
    for _ in range(SSH_RUNS):
        stop_daemons(dep.config_dir)
        first.append(wall(argv, env=on, runs=1))
    rows.append(("ssh coder.box true, first use (daemon starts, dials)", statistics.median(first)))
    wall(argv, env=on, runs=1)  # the daemon is up and holds the tunnel
    rows.append(("ssh coder.box true, warm (daemon holds the tunnel)", wall(argv, env=on, runs=SSH_RUNS)))
    return rows


def loopback_rows(tmp: str, with_sshd: bool) -> list[tuple[str, float]]:
    """The same ``ssh host true`` to the agent's SSH server (conch) and to sshd on 127.0.0.1,
    no tunnel: what the tunnel and the ProxyCommand add, and the target."""
    key = client_key(tmp)
    conch, conch_port = start_conch(tmp)
    try:
        rows = [("ssh 127.0.0.1 true, the agent's conch server on loopback (no tunnel)",
                 wall([*ssh_args(conch_port, key), "127.0.0.1", "true"], runs=SSH_RUNS))]
    finally:
        stop(conch)
    if with_sshd:
        sshd, port = start_sshd(tmp, key)
        try:
            rows.append(("ssh 127.0.0.1 true, OpenSSH sshd on loopback (no tunnel)",
                         wall([*ssh_args(port, key), "127.0.0.1", "true"], runs=SSH_RUNS)))
        finally:
            stop(sshd)
    return rows


def main() -> int:
    with_sshd = "--no-sshd" not in sys.argv[1:]
    cli = [sys.executable, "-m", "coderstack"]
    rows = [
        ("python -c pass", wall([sys.executable, "-c", "pass"])),
        ("coderstack --version", wall(cli + ["--version"])),
        ("coderstack --help", wall(cli + ["--help"])),
    ]
    tmp = tempfile.mkdtemp(prefix="bench-cli-")
    dep = TunnelDeployment(tmp)
    try:
        dep.start()
        ping = cli + ["ping", "box", "-n", "1"]
        env = dep.cli_env()
        env.pop("XDG_RUNTIME_DIR", None)
        rows.append(("coderstack ping box -n 1, cold (CODERSTACK_TUNNEL_DAEMON=0)",
                     wall(ping, env=dict(env, CODERSTACK_TUNNEL_DAEMON="0"), runs=PING_RUNS)))
        wall(ping, env=env, runs=1)  # the daemon starts and holds the tunnel
        rows.append(("coderstack ping box -n 1, warm (the daemon's tunnel)", wall(ping, env=env, runs=PING_RUNS)))
        stop_daemons(dep.config_dir)
        rows += ssh_rows(dep)
        rows += loopback_rows(tmp, with_sshd)
    finally:
        stop_daemons(dep.config_dir)
        dep.close()
    load = os.getloadavg()[0]
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, load average {load:.1f} at the end\n")
    print("| command | wall time (median) |\n|---|---:|")
    for name, ms in rows:
        command, _, note = name.partition(", ")
        print(f"| `{command}`{', ' + note if note else ''} | {ms:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
