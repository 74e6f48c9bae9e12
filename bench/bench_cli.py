#!/usr/bin/env python3
"""How long the CLI takes to start: ``coderstack --version``, ``--help`` and ``ping -n 1`` (a real
deployment on loopback, direct), wall time of the whole process, beside ``python -c pass`` (the
interpreter's own start) in the same run.

Median of 15 runs each (5 for ping, which builds a tunnel every time).

Usage: python bench/bench_cli.py
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tunnel_deployment import TunnelDeployment

COLD_RUNS, PING_RUNS = 15, 5


def wall(argv: list[str], env: dict[str, str] | None = None, runs: int = COLD_RUNS) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise RuntimeError(f"{argv} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return statistics.median(times) * 1000


def main() -> int:
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
        rows.append(("coderstack ping box -n 1", wall(cli + ["ping", "box", "-n", "1"], env=dep.cli_env(),
                                                     runs=PING_RUNS)))
    finally:
        dep.close()
    load = os.getloadavg()[0]
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, load average {load:.1f} at the end\n")
    print("| command | wall time (median) |\n|---|---:|")
    for name, ms in rows:
        print(f"| `{name}` | {ms:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
