"""The speedtest protocol's own ceiling: our client and agent server over plain loopback TCP,
beside iperf3 on the same loopback in the same run (no tunnel: this is what the tunnel's
figures should be read against).

Run: ``python bench/bench_speedtest.py`` (quick: 2 s tests, 3 runs) or ``--full`` (5 s, 5 runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

SERVER = """
from twisted.internet import reactor
from coderstack.agent.speedtest import SpeedtestServerFactory
port = reactor.listenTCP(0, SpeedtestServerFactory(reactor), interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""

CLIENT = """
import sys
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from coderstack.agent.speedtest import run_speedtest

def main(reactor):
    ep = TCP4ClientEndpoint(reactor, "127.0.0.1", int(sys.argv[1]))
    d = defer.ensureDeferred(run_speedtest(ep, int(sys.argv[2]), float(sys.argv[3]), reactor))
    d.addCallback(lambda r: print(r.total[2] * 8 / 1e6 / r.total[1], flush=True))
    return d

task.react(main)
"""


def run_ours(port: int, direction: int, seconds: float) -> float:
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", CLIENT, str(port), str(direction), str(seconds)],
                         capture_output=True, text=True, env=env, check=True).stdout
    return float(out.strip().splitlines()[-1])


def run_iperf3(seconds: float, reverse: bool) -> float | None:
    if shutil.which("iperf3") is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # iperf3 -s -1 serves exactly one test: no readiness probe
        args = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"] + (["-R"] if reverse else [])
        doc = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
        return doc["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s tests, 3 runs (the default)")
    parser.add_argument("--full", action="store_true", help="5 s tests, 5 runs")
    args = parser.parse_args()
    seconds, runs = (5.0, 5) if args.full else (2.0, 3)
    env = dict(os.environ, PYTHONPATH=ROOT)
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True, env=env)
    try:
        port = int(server.stdout.readline())
        down = statistics.median(run_ours(port, 0, seconds) for _ in range(runs))
        up = statistics.median(run_ours(port, 1, seconds) for _ in range(runs))
    finally:
        server.terminate()
        server.wait()
    iperf = [run_iperf3(seconds, False) for _ in range(runs)]
    iperf_med = statistics.median(iperf) if all(v is not None for v in iperf) else None
    print(f"## Speedtest protocol on loopback TCP ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {seconds:g} s tests, median of {runs})\n")
    print("| path | throughput |")
    print("|---|---|")
    print(f"| coderstack speedtest, download (agent sends) | {down:.0f} Mbit/s |")
    print(f"| coderstack speedtest, upload (client sends) | {up:.0f} Mbit/s |")
    print(f"| iperf3 on the same loopback | {'n/a' if iperf_med is None else f'{iperf_med:.0f} Mbit/s'} |")


if __name__ == "__main__":
    main()
