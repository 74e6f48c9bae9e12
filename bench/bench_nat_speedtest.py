#!/usr/bin/env python3
"""``coderstack speedtest`` on a real 1500-byte network: the NAT lab's namespaces (veth pairs,
stateful easy NATs, the server on the "internet" between them), direct and relayed, with the
tunnel's UDP socket batched (GSO/GRO, the default) and not (``CODERSTACK_UDP_BATCH=0``), beside
wireguard-go + kernel TCP (iperf3 both ways through two wireguard-go TUNs in two namespaces on
a 1500-byte veth), all in the same run.

The lab is ``tests/netlab/user_lab.py``'s (server, agent behind NAT A, CLI behind NAT B); every
process and namespace it makes is removed at the end, also on failure. Needs root, iproute2,
iptables, wireguard-go, wireguard-tools and iperf3. Median of 3 runs of 5 s per direction.

``--loss P`` drops a fraction P of the data direction's tunnel datagrams at random (iptables
``statistic`` match: at the sender's NAT for the direct path; for wireguard-go at the receiver,
its veth peer splitting GSO bursts first), and measures only wireguard-go and the direct path
with and without the TCP window's bandwidth-delay floor (``CODERSTACK_TCP_BDP_FLOOR=0``).

Usage: sudo python bench/bench_nat_speedtest.py [--loss P]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_netstack import bench_wg_kernel  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

from tests.netlab.user_lab import NAT_IPS, UserLab, available, sh  # noqa: E402

RUNS, SECONDS = 3, 5


class _Bench:
    """What the lab wants of a test case: temp dirs and cleanups (run in reverse at the end)."""

    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="bench-nat-")
        self.cleanups: list[tuple[Any, tuple[Any, ...]]] = []
        self.n = 0

    def mktemp(self) -> str:
        self.n += 1
        return os.path.join(self.base, f"t{self.n}")

    def addCleanup(self, f: Any, *args: Any) -> None:
        self.cleanups.append((f, args))

    async def clean(self) -> None:
        while self.cleanups:
            f, args = self.cleanups.pop()
            try:
                await defer.maybeDeferred(f, *args)
            except Exception as e:  # keep cleaning
                print(f"cleanup {f}: {e}", file=sys.stderr)


LOSS = 0.0


def _loss_rule(lab: Any, direction: str, op: str) -> None:
    """Add (-I) or remove (-D) random loss of the direct path's UDP at the sending side's NAT:
    the CLI's (b) for up, the agent's (a) for down."""
    side = "b" if direction == "up" else "a"
    other = NAT_IPS["a" if side == "b" else "b"]
    sh("iptables", op, "FORWARD", "-p", "udp", "-d", other, "-m", "statistic", "--mode", "random",
       "--probability", str(LOSS), "-j", "DROP", ns=lab.net.ns["n" + side])


async def one(user: Any, direction: str, lab: Any = None, **env: str) -> float:
    if LOSS and lab is not None:
        _loss_rule(lab, direction, "-I")
    try:
        code, out, err = await user.run("speedtest", "box", "-t", f"{SECONDS}s", "-o", "json", "--direction",
                                        direction, CODERSTACK_TCP_STATS="1", **env)
    finally:
        if LOSS and lab is not None:
            _loss_rule(lab, direction, "-D")
    if code != 0:
        raise AssertionError(f"speedtest exited {code}: {err}")
    if direction == "up":  # the CLI sent: its counters are the sender's
        for line in err.splitlines():
            if line.startswith("tcp: "):
                print(f"    sender {line}", flush=True)
    return float(json.loads(out)["overall"]["throughput_mbits"])


async def main(reactor: Any) -> None:
    global LOSS
    ap = argparse.ArgumentParser()
    ap.add_argument("--loss", type=float, default=0.0, help="random loss of the data direction (0..1)")
    LOSS = ap.parse_args().loss
    why = available()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return
    # The lab's processes keep their files under the working directory: a temp dir of ours.
    work = tempfile.mkdtemp(prefix="bench-nat-")
    os.chdir(work)
    try:
        await measure()
    finally:
        os.chdir(ROOT)
        shutil.rmtree(work, ignore_errors=True)


async def measure() -> None:
    rows: dict[str, dict[str, float]] = {}
    # The baseline first, alone on the machine (it blocks: nothing else runs yet).
    base = {d: [bench_wg_kernel(SECONDS, prefix="csbn", reverse=(d == "down"), loss=LOSS) for _ in range(RUNS)]
            for d in ("up", "down")}
    rows["wireguard-go + kernel TCP (iperf3)"] = {d: statistics.median(v) for d, v in base.items()}
    print(f"  wireguard-go + kernel TCP: {base}", flush=True)
    configs: tuple[tuple[str, dict[str, str], tuple[str, ...]], ...] = (
        ("direct, batched UDP (GSO/GRO, the default)", {}, ()),
        ("direct, loss-based window only (CODERSTACK_TCP_BDP_FLOOR=0)", {"CODERSTACK_TCP_BDP_FLOOR": "0"}, ()),
        ("direct, one datagram per call (CODERSTACK_UDP_BATCH=0)", {"CODERSTACK_UDP_BATCH": "0"}, ()),
        ("relayed (DERP)", {}, ("--block-direct-connections", "true")),
    )
    for label, env, server_args in configs[:2] if LOSS else configs:
        bench = _Bench()
        try:
            os.environ.update(env)  # the lab's processes inherit it: server, agent and CLI
            lab = UserLab(bench, "easy", *server_args)
            user = await lab.start()
            await one(user, "up", **env)  # settle on the direct path before any loss
            got = {d: [await one(user, d, lab, **env) for _ in range(RUNS)] for d in ("up", "down")}
            rows[label] = {d: statistics.median(v) for d, v in got.items()}
            print(f"  {label}: {got}", flush=True)
        finally:
            for k in env:
                os.environ.pop(k, None)
            await bench.clean()
    load = os.getloadavg()[0]
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load:.1f} at the end; easy NATs, 1500-byte veths"
          + (f"; {LOSS:.1%} random loss of the data direction" if LOSS else "") + "\n")
    base_row = rows["wireguard-go + kernel TCP (iperf3)"]
    print("| path | up Mbit/s | down Mbit/s | vs wireguard-go (up / down) |\n|---|---:|---:|---:|")
    for label, row in rows.items():
        print(f"| {label} | {row['up']:.0f} | {row['down']:.0f} | "
              f"{row['up'] / base_row['up']:.2f}× / {row['down'] / base_row['down']:.2f}× |")


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
