#!/usr/bin/env python3
"""One server process under ``coderstack scaletest``: 100 / 500 / 1,000 simulated agents and as
many clients, on this machine.

The server (``twistd coderstack-server``, SQLite, embedded DERP) is pinned to CPU 0 with
``taskset``; the load generator's two processes (``scaletest agents`` and ``scaletest traffic``)
share CPU 1, so what the server costs is what CPU 0 shows. For each size: the agents connect (idle
RSS and descriptors read from the server's ``/metrics``), then one client per agent holds a
relayed tunnel moving ``--bytes-per-tick`` every ``--tick-interval`` (default Coder's 4 KiB per
100 ms, 40 KB/s) for ``--seconds``, while each agent re-announces its node every 5 s (the
node-update fan-out the clients time), then the same clients idle (``--bytes-per-tick 1`` per
second). Everything is removed at the end, also on failure.

Usage: python bench/bench_scaletest.py [--sizes 100,500,1000] [--seconds 20] [--clients-per-agent 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from coderstack.scaletest.stats import parse_metrics  # noqa: E402

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bench:
    def __init__(self, work: str) -> None:
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ, HOME=work, CODER_CONFIG_DIR=os.path.join(work, "config"))
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, cpu: int, *argv: str) -> subprocess.Popen[bytes]:
        log = open(os.path.join(self.work, f"{name}.log"), "wb")
        p = subprocess.Popen(["taskset", "-c", str(cpu), *argv], env=self.env, cwd=self.work,
                             stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        with open(os.path.join(self.work, f"{name}.log"), errors="replace") as f:
            return f.read()

    def cli(self, *argv: str, cpu: int = 1, timeout: float = 900) -> str:
        out = subprocess.run(["taskset", "-c", str(cpu), sys.executable, "-m", "coderstack", *argv],
                             env=self.env, cwd=self.work, capture_output=True, text=True, timeout=timeout)
        if out.returncode not in (0, 1) or not out.stdout.strip():
            raise RuntimeError(f"coderstack {' '.join(argv)} exited {out.returncode}:\n{out.stderr[-3000:]}")
        return out.stdout

    def start_server(self) -> None:
        self.spawn("server", 0, TWISTD, "-n", "--pidfile=", "coderstack-server",
                   "--data-dir", os.path.join(self.work, "data"), "--http-address", f"127.0.0.1:{self.port}",
                   "--stun-address", "disable", "--coordinator-peers-per-user", "5000",
                   "--derp-connections-per-user", "5000",
                   # Every simulated peer comes from 127.0.0.1.
                   "--max-connections-per-source", "0")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=2).read()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("the server did not come up:\n" + self.log("server"))
        self.cli("login", self.url, "--first-user-username", "bench", "--first-user-email", "b@example.com",
                 "--first-user-password", "bench password")
        with open(os.path.join(self.work, "config", "session")) as f:
            self.token = f.read().strip()

    def metrics(self) -> dict[str, float]:
        req = urllib.request.Request(self.url + "/metrics", headers={"Coder-Session-Token": self.token})
        return parse_metrics(urllib.request.urlopen(req, timeout=30).read().decode())

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def one_size(b: Bench, n: int, seconds: float, bytes_per_tick: int, tick: str,
             clients_per_agent: int = 1, direct: bool = False) -> dict[str, Any]:
    run_file = os.path.join(b.work, f"run-{n}.json")
    b.cli("scaletest", "create-workspaces", str(n), "--run-file", run_file, "--concurrency", "16")
    name = f"agents-{n}"
    agents = b.spawn(name, 1, sys.executable, "-m", "coderstack", "scaletest", "agents", "--run-file", run_file,
                     "--duration", "30m", "--announce-every", "5s", "--rate", "100",
                     "--connect-timeout", "5m", "-o", "json")
    deadline = time.monotonic() + 600
    while "agents connected" not in b.log(name):
        if agents.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the agents did not connect:\n{b.log(name)[-3000:]}")
        time.sleep(0.5)
    time.sleep(3)
    idle = b.metrics()
    row: dict[str, Any] = {"agents": n, "idle_rss_mib": idle.get("process_resident_memory_bytes", 0) / 2**20,
                           "idle_fds": idle.get("process_open_fds")}
    conns = ["--connections", str(n * clients_per_agent)] + ([] if direct else ["--relay"])
    loaded = json.loads(b.cli("scaletest", "traffic", "--run-file", run_file, *conns, "--duration",
                              f"{seconds:.0f}s", "--bytes-per-tick", str(bytes_per_tick), "--tick-interval",
                              tick, "--rate", "50", "-o", "json"))
    row["loaded"] = loaded
    quiet = json.loads(b.cli("scaletest", "traffic", "--run-file", run_file, *conns, "--duration",
                             f"{seconds:.0f}s", "--bytes-per-tick", "1", "--tick-interval", "1s",
                             "--rate", "50", "-o", "json"))
    row["quiet"] = quiet
    agents.send_signal(signal.SIGTERM)
    agents.wait(120)
    log = b.log(name)
    if "{" not in log:
        raise RuntimeError(f"the agents printed no summary (exit {agents.returncode}):\n{log[-3000:]}")
    row["agents_summary"] = json.loads(log[log.index("{"):])
    b.cli("scaletest", "cleanup", "--run-file", run_file)
    after = b.metrics()
    row["after_rss_mib"] = after.get("process_resident_memory_bytes", 0) / 2**20
    return row


def ms(s: dict[str, Any], key: str) -> str:
    v = s.get(key)
    return "-" if v is None else f"{v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,500,1000")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--bytes-per-tick", type=int, default=4096)
    ap.add_argument("--tick-interval", default="100ms")
    ap.add_argument("--clients-per-agent", type=int, default=1,
                    help="clients per agent (spread round-robin), for the fan-out to many clients of one agent")
    ap.add_argument("--direct", action="store_true",
                    help="clients go direct (UDP between generator processes), not through the relay")
    args = ap.parse_args()
    if shutil.which("taskset") is None:
        sys.exit("cannot run: taskset (util-linux) is not installed")
    work = tempfile.mkdtemp(prefix="bench-scale-")
    b = Bench(work)
    rows = []
    try:
        b.start_server()
        for n in [int(x) for x in args.sizes.split(",")]:
            row = one_size(b, n, args.seconds, args.bytes_per_tick, args.tick_interval, args.clients_per_agent,
                           args.direct)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        b.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs; server on CPU 0, "
          f"load generator on CPU 1; {'direct' if args.direct else 'relayed'}, {args.bytes_per_tick} B per {args.tick_interval} per connection\n")
    print("| agents | held | idle RSS MiB | loaded: conns, errors | RSS MiB | server CPU | DERP pkt/s "
          "| echo p50/p99 ms | fan-out p50/p99 ms | coordinator p99 ≤ ms | generator lag p99 ms "
          "| quiet: RSS MiB | CPU | fan-out p50/p99 ms | coordinator p99 ≤ ms | generator lag p99 ms |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lo, q, a = r["loaded"], r["quiet"], r["agents_summary"]
        ls, qs = lo["server"], q["server"]
        print(f"| {r['agents']} | {a['connected']} | {r['idle_rss_mib']:.0f} "
              f"| {lo['connected']}, {sum(lo['errors'].values())} {lo['errors'] or ''} "
              f"| {ls.get('rss_bytes', 0) / 2**20:.0f} | {ls.get('cpu_percent')}% | {ls.get('derp_packets_per_second')} "
              f"| {ms(lo['latency'], 'p50_ms')}/{ms(lo['latency'], 'p99_ms')} "
              f"| {ms(lo['fanout'], 'p50_ms')}/{ms(lo['fanout'], 'p99_ms')} "
              f"| {ls.get('coordinator_fanout_p99_ms_at_most')} | {ms(lo['generator_lag'], 'p99_ms')} "
              f"| {qs.get('rss_bytes', 0) / 2**20:.0f} | {qs.get('cpu_percent')}% "
              f"| {ms(q['fanout'], 'p50_ms')}/{ms(q['fanout'], 'p99_ms')} "
              f"| {qs.get('coordinator_fanout_p99_ms_at_most')} | {ms(q['generator_lag'], 'p99_ms')} |")


if __name__ == "__main__":
    main()
