"""Benchmark the netstack's TCP throughput.

    python bench/bench_netstack.py [--quick] [--runs N] [--no-tun]
    python bench/bench_netstack.py --loss 0,0.005,0.01 [--runs N] [--size BYTES]
    sudo python bench/bench_netstack.py --wan [--runs N]

Rows (medians of --runs runs, Mbit/s of application payload):
- in-process: two of our stacks in one process over a simulated link (CPU cost of both ends);
- loopback UDP: two processes, each a Twisted reactor with one netstack, packets carried in UDP
  datagrams over 127.0.0.1 (roughly what a WireGuard data plane minus crypto would see);
- TUN: our stack <-> Linux TCP through a TUN device in a network namespace (root only), both
  directions, as the interop tests run it.
Each at MTU 1280 (the tunnel default) and larger MTUs, to see whether bigger segments pay.
Compared with the 546 Mbit/s wireguard-go + kernel TCP baseline (reference/baselines doc).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from coderstack.netstack.stack import Stack  # noqa: E402
from coderstack.netstack.tcp import TCPConfig  # noqa: E402
from coderstack.netstack.testing import Wire  # noqa: E402

BASELINE_WG_KERNEL = 546.0
# 65000: the largest that fits one UDP datagram on loopback (65507) with room for tunnel headers.
MTUS = (1280, 9000, 65000)


class _Sink:
    def __init__(self):
        self.count = 0
        self.done = False
        self.conn = None

    def connection_made(self, conn):
        self.conn = conn

    def data_received(self, data):
        self.count += len(data)

    def eof_received(self):
        self.done = True

    def connection_lost(self, reason):
        self.done = True

    def writable(self):
        pass


STAT_KEYS = ("tcp_timeouts", "tcp_fast_retransmit", "tcp_retransmits", "tcp_rack_marked_lost", "tcp_tlp_probes",
             "tcp_tlp_recovered", "tcp_prr_recoveries", "tcp_spurious_undone")


def bench_inproc(size: int, mtu: int, loss: float = 0.0, seed: int = 1, stats: dict | None = None) -> float:
    """Wall-clock Mbit/s of two stacks in one process; with ``stats`` also fill in the
    simulated-link goodput (``sim_mbps``) and the sender's loss-recovery counters."""
    w = Wire(delay=0.0002, loss=loss, seed=seed)
    cfg = TCPConfig(mtu=mtu)
    w.a = Stack("fd00::1", w.to_b, config=cfg)
    w.b = Stack("fd00::2", w.to_a, config=cfg)
    sink = _Sink()
    w.b.listen(80, lambda c: sink)
    src = _Sink()
    conn = w.a.connect("fd00::2", 80, src, 0.0)
    chunk = random.Random(1).randbytes(1 << 20)
    w.run(until=lambda: src.conn is not None)
    t = time.perf_counter()
    t_sim = w.now
    sent = 0
    while sent < size:
        while conn.send_buffered < (4 << 20) and sent < size:
            conn.write(chunk)
            sent += len(chunk)
        conn.flush(w.now)
        w.run(until=lambda: conn.send_buffered < (2 << 20) or sink.count >= size)
    w.run(until=lambda: sink.count >= size)
    wall = time.perf_counter() - t
    if stats is not None:
        stats["sim_mbps"] = size * 8 / max(w.now - t_sim, 1e-9) / 1e6
        for k in STAT_KEYS:
            stats[k] = w.a.stats[k]
    return size * 8 / wall / 1e6


def bench_loss(size: int, losses: list[float], runs: int) -> None:
    """In-process rows at random loss (both directions): wall and simulated-link goodput,
    medians of ``runs`` (seeds 1..runs), and the sender's counters of the median run."""
    print("| loss | wall Mbit/s | simulated-link Mbit/s | " + " | ".join(k[4:] for k in STAT_KEYS) + " |")
    print("|---:|---:|---:|" + "---:|" * len(STAT_KEYS))
    for loss in losses:
        res = []
        for seed in range(1, runs + 1):
            st: dict = {}
            res.append((bench_inproc(size, 1280, loss, seed, st), st))
        res.sort(key=lambda r: r[1]["sim_mbps"])
        mid = res[len(res) // 2][1]
        wall = statistics.median(r[0] for r in res)
        print(f"| {loss:.1%} | {wall:.0f} | {mid['sim_mbps']:.0f} | " + " | ".join(str(mid[k]) for k in STAT_KEYS) + " |")


# ---------------------------------------------------------------- loopback UDP, two processes

def _big_buffers(port) -> None:
    import socket

    sock = port.getHandle()
    for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # SO_*BUFFORCE as root
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, 16 << 20)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, 16 << 20)


def udp_peer(port_file: str, mtu: int) -> None:
    """Child: a netstack on UDP 127.0.0.1 with a discard sink that reports the byte count."""
    from twisted.internet import protocol, reactor

    from coderstack.netstack.endpoints import Netstack

    class Pipe(protocol.DatagramProtocol):
        peer = None

        def datagramReceived(self, data, addr):
            self.peer = addr
            ns.packet_received(data)

    pipe = Pipe()
    port = reactor.listenUDP(0, pipe, interface="127.0.0.1", maxPacketSize=1 << 16)
    _big_buffers(port)
    ns = Netstack("fd00::2", lambda pkt: pipe.transport.write(pkt, pipe.peer), reactor, mtu=mtu)

    class Count(protocol.Protocol):
        n = 0

        def dataReceived(self, data):
            self.n += len(data)

        def connectionLost(self, reason):
            pass

    class Reply(protocol.Protocol):
        def connectionMade(self):
            self.n = 0

        def dataReceived(self, data):
            self.n += len(data)
            if self.n >= self.factory.size:
                self.transport.write(b"done\n")

    f = protocol.Factory.forProtocol(Reply)
    f.size = int(os.environ["BENCH_SIZE"])
    ns.listen_tcp(5001, f)
    with open(port_file + ".tmp", "w") as fh:
        fh.write(str(port.getHost().port))
    os.rename(port_file + ".tmp", port_file)
    reactor.run()


def udp_client(peer_port: int, size: int, mtu: int) -> None:
    """Child: connect over UDP to the peer's netstack, send ``size`` bytes, print Mbit/s."""
    from twisted.internet import protocol, reactor
    from twisted.internet.interfaces import IPushProducer
    from zope.interface import implementer

    from coderstack.netstack.endpoints import Netstack

    class Pipe(protocol.DatagramProtocol):
        def datagramReceived(self, data, addr):
            ns.packet_received(data)

    pipe = Pipe()
    _big_buffers(reactor.listenUDP(0, pipe, interface="127.0.0.1", maxPacketSize=1 << 16))
    ns = Netstack("fd00::1", lambda pkt: pipe.transport.write(pkt, ("127.0.0.1", peer_port)), reactor, mtu=mtu)
    chunk = random.Random(1).randbytes(256 << 10)
    result = {}

    @implementer(IPushProducer)
    class Send(protocol.Protocol):
        def connectionMade(self):
            self.sent = 0
            self.t = time.perf_counter()
            self.paused = False
            self.transport.registerProducer(self, True)
            self.resumeProducing()

        def resumeProducing(self):
            self.paused = False
            while not self.paused and self.sent < size:
                self.transport.write(chunk)
                self.sent += len(chunk)

        def pauseProducing(self):
            self.paused = True

        def stopProducing(self):
            self.paused = True

        def dataReceived(self, data):
            result["t"] = time.perf_counter() - self.t
            self.transport.loseConnection()
            reactor.callLater(0.05, reactor.stop)

    d = ns.connect_tcp("fd00::2", 5001, protocol.Factory.forProtocol(Send))
    d.addErrback(lambda f: (print(f, file=sys.stderr), reactor.stop()))
    reactor.callLater(300, reactor.stop)
    reactor.run()
    print(size * 8 / result["t"] / 1e6 if "t" in result else "nan")


def bench_udp(size: int, mtu: int) -> float:
    import tempfile

    port_file = tempfile.mktemp(prefix="csns-bench-")
    env = dict(os.environ, BENCH_SIZE=str(size), PYTHONPATH=ROOT)
    child = subprocess.Popen([sys.executable, __file__, "--udp-peer", port_file, "--mtu", str(mtu)], env=env)
    try:
        for _ in range(200):
            if os.path.exists(port_file):
                break
            time.sleep(0.05)
        peer_port = open(port_file).read()
        os.unlink(port_file)
        out = subprocess.run(
            [sys.executable, __file__, "--udp-client", peer_port, "--mtu", str(mtu), "--size", str(size)],
            env=env, capture_output=True, text=True, timeout=600,
        )
        return float(out.stdout.split()[-1])
    finally:
        child.kill()
        child.wait()


# ---------------------------------------------------------------- TUN, Linux TCP peer

def _lab_script(setup: str, measure: str, watchdog: float) -> str:
    """A Python script that runs one interop-lab measurement in a reactor of its own: ``setup``
    (lines that make ``t``, the test case) and ``measure`` (lines run inside a generator with
    ``cleanups`` and ``out`` in scope, appending to ``out``), every cleanup run at the end and by a
    watchdog, so no namespace is left behind; the script prints ``out[0]`` (``nan`` if none)."""
    indent = lambda text: "".join(f"        {line}\n" for line in text.strip().splitlines())  # noqa: E731
    return f"""
import json, sys
sys.path.insert(0, {ROOT!r})
from twisted.internet import reactor, defer
{setup.strip()}
cleanups = []
t.addCleanup = cleanups.append
out = []
def clean():
    for c in reversed(cleanups):
        try:
            c()
        except Exception:
            pass
    cleanups.clear()
@defer.inlineCallbacks
def main():
    try:
        t.setUp()
{indent(measure)}    except Exception as e:
        print("error", e, file=sys.stderr)
    finally:
        clean()
        reactor.stop()
def watchdog():
    clean()  # never leave a namespace behind
    if reactor.running:
        reactor.stop()
reactor.callLater({watchdog!r}, watchdog)
reactor.callWhenRunning(main)
# With signal handlers: Twisted reaps child processes on SIGCHLD (without, processEnded can be
# missed and the run hangs).
reactor.run()
result = out[0] if out else "nan"
print(*(result if isinstance(result, tuple) else (result,)))
"""


def bench_tun(size: int, mtu: int, cls: str = "CleanPathTests") -> tuple[float, float]:
    """Returns (kernel->us, us->kernel) Mbit/s.  ``cls`` "LossyPathTests": 1% loss each way."""
    code = _lab_script(
        f"from tests.interop.test_netstack_linux import {cls} as Tests\n"
        f"t = Tests('test_kernel_client_to_our_server')\nt.mtu = {mtu}",
        f"a = yield t.kernel_to_us(size={size})\nb = yield t.us_to_kernel(size={size})\nout.append((a, b))",
        240)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    a, b = res.stdout.split()[-2:]
    return float(a), float(b)


def bench_wan(size: int, floor: bool, one_way: float = 0.01, loss: float = 0.005) -> float:
    """Our stack -> Linux TCP through a TUN with ``one_way`` seconds of delay each way (a
    userspace forwarder on our side) and ``loss`` random loss each way on the router: Mbit/s
    seen by the kernel receiver, with the window's bandwidth-delay floor or without."""
    code = _lab_script(
        "from coderstack.netstack.tcpconfig import TCPConfig\n"
        "from tests.interop.netstack_lab import DelayLink\n"
        "from tests.interop.test_netstack_linux import WANPathTests as Tests\n"
        "t = Tests('test_the_floor_keeps_a_lossy_wan_path_full')\n"
        f"t.config = TCPConfig(bdp_floor={floor!r})\nt.loss = {loss!r}\n"
        f"t.link = staticmethod(lambda k, s: DelayLink(k, s, one_way={one_way!r}))",
        f"out.append((yield t.us_to_kernel(size={size})))",
        300)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    return float(res.stdout.split()[-1])


def bench_wg_kernel(seconds: int = 3, prefix: str = "csns", reverse: bool = False, loss: float = 0.0) -> float:
    """wireguard-go in two namespaces, kernel TCP (iperf3) through it: the baseline row.
    ``prefix`` starts every namespace and interface name (each caller has its own); ``reverse``
    has the server send (iperf3 -R); ``loss`` drops that fraction of the sender's WireGuard
    datagrams at random (iptables statistic match at the receiver)."""
    import json
    import secrets

    tag = secrets.token_hex(3)
    ns = [f"{prefix}wa{tag}", f"{prefix}wb{tag}"]
    wg = [f"{prefix}ga{tag}", f"{prefix}gb{tag}"]
    procs = []

    def run(*a, check=True):
        return subprocess.run(a, check=check, capture_output=True, text=True)

    def nse(i, *a, check=True):
        return run("ip", "netns", "exec", ns[i], *a, check=check)

    try:
        for n in ns:
            run("ip", "netns", "add", n)
        run("ip", "link", "add", f"{prefix}va{tag}", "netns", ns[0], "type", "veth", "peer", "name", f"{prefix}vb{tag}", "netns", ns[1])
        keys = []
        for i in (0, 1):
            nse(i, "ip", "link", "set", "lo", "up")
            veth = f"{prefix}v{'ab'[i]}{tag}"
            nse(i, "ip", "addr", "add", f"10.77.0.{i + 1}/24", "dev", veth)
            nse(i, "ip", "link", "set", veth, "up")
            priv = run("wg", "genkey").stdout.strip()
            pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True).stdout.strip()
            keys.append((priv, pub))
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns[i], "wireguard-go", "-f", wg[i]],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        for i in (0, 1):
            j = 1 - i
            keyfile = f"/tmp/{wg[i]}.key"
            with open(keyfile, "w") as fh:
                fh.write(keys[i][0])
            nse(i, "wg", "set", wg[i], "listen-port", "51820", "private-key", keyfile, "peer", keys[j][1],
                "allowed-ips", f"10.78.0.{j + 1}/32", "endpoint", f"10.77.0.{j + 1}:51820")
            os.unlink(keyfile)
            nse(i, "ip", "addr", "add", f"10.78.0.{i + 1}/24", "dev", wg[i])
            nse(i, "ip", "link", "set", wg[i], "up")
        if loss:
            # Dropped on arrival, with the sender's veth splitting UDP GSO bursts first (as a
            # NIC would): a rule on the way out would see, and drop, a whole burst at once.
            sender = 1 if reverse else 0
            nse(sender, "ip", "link", "set", "dev", f"{prefix}v{'ab'[sender]}{tag}", "gso_max_segs", "1")
            nse(1 - sender, "iptables", "-A", "INPUT", "-p", "udp", "-s", f"10.77.0.{sender + 1}", "-m", "statistic",
                "--mode", "random", "--probability", str(loss), "-j", "DROP")
        server = subprocess.Popen(["ip", "netns", "exec", ns[1], "iperf3", "-s", "-1", "-B", "10.78.0.2"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(server)
        time.sleep(0.5)
        out = nse(0, "iperf3", "-c", "10.78.0.2", "-t", str(seconds), "-J", *(["-R"] if reverse else []),
                  check=False).stdout
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for n in ns:
            run("ip", "netns", "del", n, check=False)


def bench_iperf3_tun(mtu: int, seconds: int = 3) -> float:
    """``iperf3 -c`` from the kernel to the iperf3-protocol sink on our stack, via TUN."""
    code = _lab_script(
        "from tests.interop.test_netstack_linux import Iperf3Tests\n"
        "from tests.interop.netstack_lab import STACK_ADDR\n"
        "from tests.interop.iperf3_sink import Iperf3SinkFactory\n"
        "from coderstack.netstack.endpoints import NetstackServerEndpoint\n"
        f"t = Iperf3Tests('test_iperf3_client_to_our_sink')\nt.mtu = {mtu}",
        "f = Iperf3SinkFactory(reactor)\n"
        "yield NetstackServerEndpoint(t.lab.netstack, 5201).listen(f)\n"
        f"proc = t.lab.spawn_argv(['iperf3', '-c', STACK_ADDR, '-t', '{seconds}', '-J'], cleanup=cleanups.append)\n"
        "yield proc.ended\n"
        "out.append(json.loads('\\n'.join(proc.all_lines))['end']['sum_received']['bits_per_second'] / 1e6)",
        240)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return float(res.stdout.split()[-1])

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-tun", action="store_true")
    ap.add_argument("--udp-peer")
    ap.add_argument("--udp-client", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--mtu", type=int, default=1280)
    ap.add_argument("--loss", help="comma-separated loss rates: only the in-process rows at those losses")
    ap.add_argument("--wan", action="store_true",
                    help="only our stack -> Linux TCP over a 20 ms round trip at 0.5%% loss, with the "
                         "bandwidth-delay floor and without (root)")
    args = ap.parse_args()
    if args.wan:
        size = args.size or (12 << 20)
        print(f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
              f"our stack -> Linux TCP via TUN, 20 ms round trip, 0.5% loss each way, {size >> 20} MiB, "
              f"median of {args.runs}\n")
        print("| window | Mbit/s (runs) |\n|---|---:|")
        for floor, loss in ((True, 0.0), (False, 0.005), (True, 0.005)):
            got = [bench_wan(size, floor, loss=loss) for _ in range(args.runs)]
            label = "CUBIC + bandwidth-delay floor (default)" if floor else "CUBIC alone (CODERSTACK_TCP_BDP_FLOOR=0)"
            label += "" if loss else ", no loss (the path without it)"
            print(f"| {label} | {statistics.median(got):.1f} ({', '.join(f'{g:.1f}' for g in got)}) |", flush=True)
        return
    if args.loss:
        bench_loss(args.size or (16 << 20), [float(x) for x in args.loss.split(",")], args.runs)
        return
    if args.udp_peer:
        udp_peer(args.udp_peer, args.mtu)
        return
    if args.udp_client:
        udp_client(args.udp_client, args.size, args.mtu)
        return
    size = (16 if args.quick else 64) << 20
    runs = 1 if args.quick and args.runs == 3 else args.runs
    rows = []

    def med(fn, *a):
        return statistics.median(fn(*a) for _ in range(runs))

    for mtu in MTUS:
        rows.append((f"in-process, two stacks, MTU {mtu}", med(bench_inproc, size, mtu)))
    for mtu in MTUS:
        rows.append((f"loopback UDP, two processes, MTU {mtu}", med(bench_udp, size, mtu)))
    tun_rows = []
    if not args.no_tun and os.geteuid() == 0:
        base = statistics.median(bench_wg_kernel() for _ in range(runs))
        rows.insert(0, ("wireguard-go + kernel TCP, iperf3, namespaces (this run)", base))
        for mtu in MTUS:
            tun_rows.append((f"iperf3 -c (Linux) -> our iperf3 sink via TUN, MTU {mtu}",
                             statistics.median(bench_iperf3_tun(mtu) for _ in range(runs))))
        for mtu in MTUS:
            results = [bench_tun(size, mtu) for _ in range(runs)]
            tun_rows.append((f"Linux TCP -> our stack via TUN, MTU {mtu}", statistics.median(r[0] for r in results)))
            tun_rows.append((f"our stack -> Linux TCP via TUN, MTU {mtu}", statistics.median(r[1] for r in results)))
        results = [bench_tun(size // 2, 1280, "LossyPathTests") for _ in range(runs)]
        tun_rows.append(("Linux TCP -> our stack via TUN + router, 1% loss each way, MTU 1280",
                         statistics.median(r[0] for r in results)))
        tun_rows.append(("our stack -> Linux TCP via TUN + router, 1% loss each way, MTU 1280",
                         statistics.median(r[1] for r in results)))
    rows += tun_rows
    print(f"## netstack TCP throughput — {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{size >> 20} MiB per run, median of {runs}")
    print()
    base = rows[0][1] if rows[0][0].startswith("wireguard-go") else BASELINE_WG_KERNEL
    print(f"| path | Mbit/s | vs wireguard-go + kernel TCP ({base:.0f}) |")
    print("|---|---:|---:|")
    for name, v in rows:
        print(f"| {name} | {v:.0f} | {v / base:.2f}x |")


if __name__ == "__main__":
    main()
