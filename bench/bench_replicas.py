#!/usr/bin/env python3
"""Server replicas on one PostgreSQL behind HAProxy, under ``coderstack scaletest``: 1, 2 and 3
replicas with the same simulated agents and clients.

For each replica count: a fresh database on one throwaway PostgreSQL cluster, N ``twistd
coderstack-server --postgres-url`` processes (each its own ``--derp-server-relay-url``, the
balancer's address as access URL) and Debian's ``haproxy`` (the README's config, round robin)
in front — all of them on **CPU 0** with ``taskset``, with PostgreSQL; the load generator
(``scaletest agents`` and ``scaletest traffic`` through the balancer, so agents and clients
spread over the replicas and most tunnels cross them) on **CPU 1**. The agents connect and
re-announce their nodes every 5 s; one client per agent holds a relayed tunnel and sends one
byte a second (the quiet run of ``bench_scaletest.py``), timing each node update from its
``as_of`` to its arrival (end-to-end fan-out). Per replica, from ``/metrics``: the
coordinator's own fan-out p99 bound, RSS and the shared coordinator's database transactions.

Usage: python bench/bench_replicas.py [--agents 500] [--replicas 1,2,3] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench_scaletest import TWISTD, Bench, free_port, ms  # noqa: E402

from coderstack.scaletest.stats import bucket_quantile, parse_buckets, parse_metrics  # noqa: E402
from tests.support import haproxy, postgres  # noqa: E402


def wait_http(url: str, what: str, log: Any, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up:\n{log()[-3000:]}")


class Replicas(Bench):
    """``n`` replicas and HAProxy; :attr:`url` is the balancer's (what the CLI logs in to)."""

    def __init__(self, work: str, n: int, database: str) -> None:
        super().__init__(work)  # self.port/self.url: the balancer's
        self.n = n
        self.database = database
        self.replica_ports = [free_port() for _ in range(n)]

    def start_server(self) -> None:
        for i, port in enumerate(self.replica_ports):
            own = f"http://127.0.0.1:{port}"
            self.spawn(f"replica{i}", 0, TWISTD, "-n", "--pidfile=", "coderstack-server",
                       "--data-dir", os.path.join(self.work, f"data{i}"), "--http-address", f"127.0.0.1:{port}",
                       "--postgres-url", self.database, "--access-url", self.url,
                       "--derp-server-relay-url", own, "--stun-address", "disable",
                       "--coordinator-peers-per-user", "5000", "--derp-connections-per-user", "5000",
                       # Every simulated peer comes from 127.0.0.1, and through the balancer.
                       "--max-connections-per-source", "0")
            wait_http(own + "/healthz", f"replica {i}", lambda i=i: self.log(f"replica{i}"))
        cfg = os.path.join(self.work, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(haproxy.config(self.port, [("127.0.0.1", p) for p in self.replica_ports],
                                   os.path.join(self.work, "haproxy.sock")))
        self.spawn("haproxy", 0, "haproxy", "-db", "-f", cfg)
        wait_http(self.url + "/healthz", "haproxy", lambda: self.log("haproxy"))
        time.sleep(2)  # every server UP in its health checks (500 ms apart), not just the first
        self.cli("login", self.url, "--first-user-username", "bench", "--first-user-email", "b@example.com",
                 "--first-user-password", "bench password")
        with open(os.path.join(self.work, "config", "session")) as f:
            self.token = f.read().strip()

    def replica_metrics(self) -> list[tuple[dict[str, float], dict[float, float]]]:
        """Each replica's /metrics: its series, and its coordinator fan-out histogram."""
        out = []
        for port in self.replica_ports:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                         headers={"Coder-Session-Token": self.token})
            text = urllib.request.urlopen(req, timeout=30).read().decode()
            out.append((parse_metrics(text), parse_buckets(text)))
        return out


def one(work: str, cluster: postgres.PostgresCluster, n: int, agents: int, seconds: float) -> dict[str, Any]:
    b = Replicas(os.path.join(work, f"r{n}"), n, cluster.new_database())
    os.makedirs(b.work)
    try:
        b.start_server()
        run_file = os.path.join(b.work, "run.json")
        b.cli("scaletest", "create-workspaces", str(agents), "--run-file", run_file, "--concurrency", "16")
        gen = b.spawn("agents", 1, sys.executable, "-m", "coderstack", "scaletest", "agents", "--run-file",
                      run_file, "--duration", "30m", "--announce-every", "5s", "--rate", "100",
                      "--connect-timeout", "5m", "-o", "json")
        deadline = time.monotonic() + 600
        while "agents connected" not in b.log("agents"):
            if gen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agents did not connect:\n{b.log('agents')[-3000:]}")
            time.sleep(0.5)
        time.sleep(3)
        before = b.replica_metrics()
        quiet = json.loads(b.cli("scaletest", "traffic", "--run-file", run_file, "--relay", "--duration",
                                 f"{seconds:.0f}s", "--bytes-per-tick", "1", "--tick-interval", "1s",
                                 "--rate", "50", "-o", "json"))
        after = b.replica_metrics()
        gen.send_signal(signal.SIGTERM)
        gen.wait(120)
        log = b.log("agents")
        held = json.loads(log[log.index("{"):]) if "{" in log else {}

        def tx(m: tuple[dict[str, float], dict[float, float]]) -> float:
            return m[0].get("coderstack_pgcoord_transactions_total", 0)

        def p99_ms(z: tuple[Any, dict[float, float]], a: tuple[Any, dict[float, float]]) -> float | None:
            v = bucket_quantile(z[1], a[1], 0.99)
            return None if v is None else v * 1000

        return {
            "replicas": n, "agents": agents, "held": held.get("connected"), "agent_errors": held.get("errors"),
            "clients": quiet["connected"], "errors": quiet["errors"], "fanout": quiet["fanout"],
            "generator_lag": quiet["generator_lag"], "echo": quiet["latency"],
            "coordinator_p99_ms": [p99_ms(z, a) for z, a in zip(before, after, strict=True)],
            "rss_mib": [m.get("process_resident_memory_bytes", 0) / 2**20 for m, _ in after],
            "db_tx_per_s": sum(tx(a) - tx(z) for a, z in zip(after, before, strict=True)) / seconds,
            "remote_peers": [m.get("coderstack_coordinator_remote_peers") for m, _ in after],
        }
    finally:
        b.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=500)
    ap.add_argument("--replicas", default="1,2,3")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--keep", action="store_true", help="keep the logs and data (prints where)")
    args = ap.parse_args()
    for tool, why in (("taskset", "util-linux"), ("haproxy", "apt-get install haproxy")):
        if shutil.which(tool) is None:
            sys.exit(f"cannot run: {tool} is not installed ({why})")
    if postgres.available():
        sys.exit(f"cannot run: {postgres.available()}")
    work = tempfile.mkdtemp(prefix="bench-replicas-")
    cluster = postgres.PostgresCluster()
    # PostgreSQL shares CPU 0 with the replicas.
    subprocess.run(["sh", "-c", f"for p in $(pgrep -f {cluster.dir}); do taskset -pc 0 $p; done"],
                   capture_output=True)
    rows = []
    try:
        for n in [int(x) for x in args.replicas.split(",")]:
            row = one(work, cluster, n, args.agents, args.seconds)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs; replicas, HAProxy "
          f"and PostgreSQL on CPU 0, load generator on CPU 1; {args.agents} agents + {args.agents} relayed "
          f"clients, nodes re-announced every 5 s, {args.seconds:.0f} s\n")
    print("| replicas | agents held, clients, errors | end-to-end fan-out p50 / p99 ms | generator lag p99 ms "
          "| coordinator fan-out p99 ≤ ms (each replica) | DB transactions/s | RSS MiB (each) |")
    print("|---:|---|---:|---:|---|---:|---|")
    for r in rows:
        errors = sum((r["errors"] or {}).values()) + sum((r["agent_errors"] or {}).values())
        print(f"| {r['replicas']} | {r['held']}, {r['clients']}, {errors} "
              f"| {ms(r['fanout'], 'p50_ms')} / {ms(r['fanout'], 'p99_ms')} | {ms(r['generator_lag'], 'p99_ms')} "
              f"| {', '.join('-' if x is None else f'{x:g}' for x in r['coordinator_p99_ms'])} "
              f"| {r['db_tx_per_s']:.0f} | {', '.join(f'{x:.0f}' for x in r['rss_mib'])} |")


if __name__ == "__main__":
    main()
