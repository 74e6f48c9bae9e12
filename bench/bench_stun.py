"""STUN benchmark: server answers per second on loopback, and client round-trip median.

    python bench/bench_stun.py [--quick | --full]

Servers (each in its own process on 127.0.0.1): ours (``listen_stun``) with the per-source limit
raised out of the way, ours with the default limit (100/s, burst 200, per source IP), and coturn's
``turnserver --stun-only`` as the reference. Load: one raw-socket client keeping a window of
requests in flight. Round trip: our Twisted ``STUNClient`` (one socket, sequential queries), and a
raw blocking socket for comparison. Prints a Markdown table (medians of the runs).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from coderstack.wire import stun  # noqa: E402

OUR_SERVER = """
import sys
from twisted.internet import reactor
from coderstack.stun.server import STUNResponder, listen_stun
rate = float(sys.argv[1])
p = listen_stun(reactor, "127.0.0.1", 0, responder=STUNResponder(rate=rate, burst=2 * rate))
print(p.getHost().port, flush=True)
reactor.run()
"""


def start_ours(rate: float) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-c", OUR_SERVER, str(rate)], stdout=subprocess.PIPE,
                         text=True, env=env)
    return p, int(p.stdout.readline())


def start_coturn() -> tuple[subprocess.Popen, int, str] | None:
    exe = shutil.which("turnserver")
    if not exe:
        return None
    tmp = tempfile.mkdtemp(prefix="csst-bench-")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.Popen(
        [exe, "-n", "--stun-only", "-L", "127.0.0.1", "-p", str(port), "--no-cli", "--no-tls",
         "--no-dtls", "--no-tcp", "--log-file", "stdout", "--simple-log", "--pidfile",
         os.path.join(tmp, "pid"), "--userdb", os.path.join(tmp, "db")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
    # Wait until it answers.
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(0.2)
    _, req = stun.binding_request()
    for _ in range(50):
        c.sendto(req, ("127.0.0.1", port))
        try:
            c.recvfrom(2048)
            break
        except TimeoutError:
            continue
    c.close()
    return p, port, tmp


def stop(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def flood(port: int, seconds: float, window: int = 32) -> float:
    """Answers per second with ``window`` requests in flight."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.settimeout(0.05)
    _, req = stun.binding_request(b"\x01" * 12)
    dst = ("127.0.0.1", port)
    got = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        for _ in range(window):
            s.sendto(req, dst)
        for _ in range(window):
            try:
                s.recvfrom(2048)
                got += 1
            except TimeoutError:
                break
    elapsed = time.perf_counter() - t0
    s.close()
    return got / elapsed


def raw_rtt(port: int, n: int) -> float:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    times = []
    for _ in range(n):
        tid, req = stun.binding_request()
        t0 = time.perf_counter()
        s.sendto(req, ("127.0.0.1", port))
        s.recvfrom(2048)
        times.append(time.perf_counter() - t0)
    s.close()
    return statistics.median(times)


def client_rtts(ports: dict[str, int], n: int, runs: int) -> dict[str, float]:
    """Median round trip of our Twisted STUNClient (sequential queries) per server."""
    from coderstack.stun.client import open_stun_client

    out: dict[str, float] = {}

    async def go(reactor) -> None:
        sock = open_stun_client(reactor, v4_interface="127.0.0.1")
        try:
            for name, port in ports.items():
                meds = []
                for _ in range(runs):
                    rtts = []
                    for _ in range(n):
                        r = await sock.query(("127.0.0.1", port), timeout=2)
                        rtts.append(r.rtt)
                    meds.append(statistics.median(rtts))
                out[name] = statistics.median(meds)
        finally:
            await sock.close()

    from twisted.internet import defer, reactor

    errors = []
    d = defer.ensureDeferred(go(reactor))
    d.addErrback(errors.append)
    d.addBoth(lambda _: reactor.stop())
    reactor.run()  # not task.react: that exits the process when done
    if errors:
        errors[0].raiseException()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short runs (the default)")
    ap.add_argument("--full", action="store_true", help="longer runs")
    args = ap.parse_args()
    seconds, runs, n = (3.0, 5, 2000) if args.full else (1.0, 3, 300)

    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    tmpdirs = []
    try:
        servers["coderstack (limit off)"] = start_ours(1e9)
        servers["coderstack (default limit 100/s/IP)"] = start_ours(100)
        coturn = start_coturn()
        if coturn:
            servers["coturn turnserver --stun-only"] = coturn[:2]
            tmpdirs.append(coturn[2])
        rows = []
        for name, (_p, port) in servers.items():
            rates = [flood(port, seconds) for _ in range(runs)]
            if "default" in name:
                rtt = None  # the flood used up this source's tokens: that is the point
            else:
                rtt = statistics.median(raw_rtt(port, n) for _ in range(runs))
            rows.append([name, statistics.median(rates), rtt])
        rtt_ports = {name: port for name, (_p, port) in servers.items() if "default" not in name}
        ours = client_rtts(rtt_ports, n, runs)
    finally:
        for p, _port in servers.values():
            stop(p)
        for d in tmpdirs:
            shutil.rmtree(d, True)

    print(f"STUN benchmark, {datetime.date.today().isoformat()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}; medians of {runs} runs"
          f" ({seconds:g} s floods, window 32; {n} sequential round trips)\n")
    print("| server (loopback) | answered req/s (1 client) | RTT raw socket | RTT our STUNClient |")
    print("|---|---:|---:|---:|")
    for name, rate, rtt in rows:
        ours_rtt = ours.get(name)
        ours_s = f"{ours_rtt * 1e6:.0f} µs" if ours_rtt is not None else "—"
        rtt_s = f"{rtt * 1e6:.0f} µs" if rtt is not None else "—"
        print(f"| {name} | {rate:,.0f} | {rtt_s} | {ours_s} |")


if __name__ == "__main__":
    main()
