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

With ``--shards K`` the generator is K pairs of processes (``--shard I/K``), pinned round-robin to
``--generator-cpus``; with ``--probe P`` a further quiet pair runs P agents with 10 relayed clients
each (on ``--probe-cpu``, default the server's CPU, which the server leaves mostly idle) and times
the same node fan-out without the loaded generator's own lag.

Usage: python bench/bench_scaletest.py [--sizes 100,500,1000] [--seconds 20] [--clients-per-agent 1]
       [--direct] [--shards 1] [--generator-cpus 1] [--probe 0] [--probe-cpu 0]
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


def spawn_cli(b: Bench, name: str, cpu: int, *argv: str) -> subprocess.Popen[bytes]:
    """``coderstack <argv>`` in the background, its stdout (the JSON summary) in ``<name>.json``."""
    out = open(os.path.join(b.work, f"{name}.json"), "wb")
    err = open(os.path.join(b.work, f"{name}.log"), "wb")
    p = subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-m", "coderstack", *argv], env=b.env,
                         cwd=b.work, stdout=out, stderr=err)
    b.procs.append(p)
    return p


def summary_of(b: Bench, name: str, p: subprocess.Popen[bytes], timeout: float = 900) -> dict[str, Any]:
    p.wait(timeout)
    with open(os.path.join(b.work, f"{name}.json")) as f:
        text = f.read()
    if "{" not in text:
        raise RuntimeError(f"{name} printed no summary (exit {p.returncode}):\n{b.log(name)[-3000:]}")
    return json.loads(text[text.index("{"):])


def merged(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One phase's summary from its shards': counts and errors added, each latency the worst
    shard's (percentiles do not add up), the server's figures from the first shard."""
    out = dict(parts[0])
    for key in ("wanted", "connected", "bytes_sent", "bytes_received"):
        out[key] = sum(p[key] for p in parts)
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
    out["errors"] = errors
    for key in ("latency", "fanout", "generator_lag"):
        out[key] = max((p[key] for p in parts), key=lambda j: j.get("p99_ms") or 0)
    cpus = [p.get("generator_cpu_percent") or 0 for p in parts]
    out["generator_cpu_percent"] = round(sum(cpus), 1)
    return out


def one_size(b: Bench, n: int, seconds: float, bytes_per_tick: int, tick: str,
             clients_per_agent: int = 1, direct: bool = False, shards: int = 1,
             generator_cpus: tuple[int, ...] = (1,), probe: int = 0, probe_cpu: int = 0) -> dict[str, Any]:
    run_file = os.path.join(b.work, f"run-{n}.json")
    probe_file = os.path.join(b.work, f"probe-{n}.json")
    b.cli("scaletest", "create-workspaces", str(n), "--run-file", run_file, "--concurrency", "16")
    if probe:
        b.cli("scaletest", "create-workspaces", str(probe), "--run-file", probe_file)

    def agents_process(name: str, cpu: int, file: str, *extra: str) -> subprocess.Popen[bytes]:
        return spawn_cli(b, name, cpu, "scaletest", "agents", "--run-file", file, "--duration", "30m",
                         "--rate", "100", "--connect-timeout", "5m", "-o", "json", *extra)

    agents = {f"agents-{n}-{i}": agents_process(f"agents-{n}-{i}", generator_cpus[i % len(generator_cpus)],
                                                 run_file, "--announce-every", "5s", "--shard", f"{i}/{shards}")
              for i in range(shards)}
    if probe:
        # The probe's agents re-announce every second: more samples, and still a light load.
        agents[f"probe-agents-{n}"] = agents_process(f"probe-agents-{n}", probe_cpu, probe_file,
                                                     "--announce-every", "1s")
    deadline = time.monotonic() + 600
    for name, p in agents.items():
        while "agents connected" not in b.log(name):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agents did not connect:\n{b.log(name)[-3000:]}")
            time.sleep(0.5)
    time.sleep(3)
    idle = b.metrics()
    row: dict[str, Any] = {"agents": n, "idle_rss_mib": idle.get("process_resident_memory_bytes", 0) / 2**20,
                           "idle_fds": idle.get("process_open_fds")}
    conns = ["--connections", str(n * clients_per_agent)] + ([] if direct else ["--relay"])

    def phase(label: str, per_tick: str, interval: str) -> None:
        running = {f"{label}-{n}-{i}": spawn_cli(
            b, f"{label}-{n}-{i}", generator_cpus[i % len(generator_cpus)], "scaletest", "traffic",
            "--run-file", run_file, *conns, "--shard", f"{i}/{shards}", "--duration", f"{seconds:.0f}s",
            "--bytes-per-tick", per_tick, "--tick-interval", interval, "--rate", str(max(1, 50 // shards)),
            "-o", "json") for i in range(shards)}
        if probe:
            # A quiet observer: clients of the probe's agents in their own process, timing node
            # updates that cross the same loaded server without the generator's lag.
            running[f"probe-{label}-{n}"] = spawn_cli(
                b, f"probe-{label}-{n}", probe_cpu, "scaletest", "traffic", "--run-file", probe_file,
                "--relay", "--connections", str(probe * 10), "--duration", f"{seconds:.0f}s",
                "--bytes-per-tick", "1", "--tick-interval", "1s", "--rate", "20", "-o", "json")
        got = {name: summary_of(b, name, p) for name, p in running.items()}
        row[label] = merged([v for k, v in got.items() if not k.startswith("probe-")])
        if probe:
            row[f"probe_{label}"] = got[f"probe-{label}-{n}"]

    phase("loaded", str(bytes_per_tick), tick)
    phase("quiet", "1", "1s")
    summaries = []
    for name, p in agents.items():
        p.send_signal(signal.SIGTERM)
        summaries.append(summary_of(b, name, p, timeout=120))
    row["agents_summary"] = {"connected": sum(s["connected"] for s in summaries[:shards]),
                             "errors": sum(sum(s["errors"].values()) for s in summaries),
                             "cpu_percent": round(sum(s.get("generator_cpu_percent") or 0
                                                      for s in summaries[:shards]), 1)}
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
    ap.add_argument("--shards", type=int, default=1,
                    help="split the load generator into this many agents + traffic process pairs")
    ap.add_argument("--generator-cpus", default="1",
                    help="CPUs the generator's shards are pinned to, round-robin (e.g. 1 or 0,1)")
    ap.add_argument("--probe", type=int, default=0,
                    help="also run this many quiet probe agents with 10 relayed clients each in their "
                         "own pair of processes, timing the fan-out without the generator's lag")
    ap.add_argument("--probe-cpu", type=int, default=0, help="the CPU the probe's processes run on")
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
                           args.direct, args.shards, tuple(int(c) for c in args.generator_cpus.split(",")),
                           args.probe, args.probe_cpu)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        b.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs; server on CPU 0, "
          f"{args.shards} generator shard(s) on CPU {args.generator_cpus}"
          + (f", {args.probe} probe agents x 10 clients on CPU {args.probe_cpu}" if args.probe else "")
          + f"; {'direct' if args.direct else 'relayed'}, {args.bytes_per_tick} B per {args.tick_interval} "
          "per connection\n")
    print("| agents | held | idle RSS MiB | loaded: conns, errors | RSS MiB | server CPU | DERP pkt/s "
          "| echo p50/p99 ms | fan-out p50/p99 ms | probe fan-out p50/p99 ms | coordinator p99 ≤ ms "
          "| generator CPU % / lag p99 ms "
          "| quiet: RSS MiB | CPU | fan-out p50/p99 ms | probe fan-out p50/p99 ms | coordinator p99 ≤ ms "
          "| generator CPU % / lag p99 ms |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lo, q, a = r["loaded"], r["quiet"], r["agents_summary"]
        ls, qs = lo["server"], q["server"]
        plo, pq = r.get("probe_loaded", {}).get("fanout", {}), r.get("probe_quiet", {}).get("fanout", {})
        print(f"| {r['agents']} | {a['connected']} | {r['idle_rss_mib']:.0f} "
              f"| {lo['connected']}, {sum(lo['errors'].values())} {lo['errors'] or ''} "
              f"| {ls.get('rss_bytes', 0) / 2**20:.0f} | {ls.get('cpu_percent')}% | {ls.get('derp_packets_per_second')} "
              f"| {ms(lo['latency'], 'p50_ms')}/{ms(lo['latency'], 'p99_ms')} "
              f"| {ms(lo['fanout'], 'p50_ms')}/{ms(lo['fanout'], 'p99_ms')} | {ms(plo, 'p50_ms')}/{ms(plo, 'p99_ms')} "
              f"| {ls.get('coordinator_fanout_p99_ms_at_most')} "
              f"| {lo.get('generator_cpu_percent')} / {ms(lo['generator_lag'], 'p99_ms')} "
              f"| {qs.get('rss_bytes', 0) / 2**20:.0f} | {qs.get('cpu_percent')}% "
              f"| {ms(q['fanout'], 'p50_ms')}/{ms(q['fanout'], 'p99_ms')} | {ms(pq, 'p50_ms')}/{ms(pq, 'p99_ms')} "
              f"| {qs.get('coordinator_fanout_p99_ms_at_most')} "
              f"| {q.get('generator_cpu_percent')} / {ms(q['generator_lag'], 'p99_ms')} |")

if __name__ == "__main__":
    main()
