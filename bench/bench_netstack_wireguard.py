"""Benchmark our TCP over our WireGuard, direct on loopback, beside wireguard-go + kernel TCP.

    python bench/bench_netstack_wireguard.py [--quick] [--runs N] [--size MiB] [--profile DIR]

Rows (medians of --runs runs, Mbit/s of application payload):
- wireguard-go + kernel TCP: iperf3 through two wireguard-go TUNs in two network namespaces
  (root only), measured in this run as the baseline;
- ours: two processes on 127.0.0.1, each a Twisted reactor with a Netstack behind a WireGuard
  Device on a UDP socket (WireGuardUDP, joined by tests/interop/netstack_wg_lab.TunnelLink); one
  sends N MiB as fast as it can, the other sinks it and answers when it has everything.  At the
  tunnel default MTU 1280 and at larger path MTUs set with ``Netstack.set_path_mtu`` (WireGuard
  carries any datagram up to 65507 bytes, so 65000 is the largest that fits).
``--profile DIR`` runs both ends under cProfile and writes DIR/{sender,receiver}-MTU.prof.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

MTUS = (1280, 9000, 65000)
STACK_A, STACK_B = "fd00::1", "fd00::2"
PORT = 5001
# How the Netstack is glued to WireGuardUDP (TunnelLink): inbound batched or not ("in"/"-"),
# outbound batching ("always", "input", "never"), UDP socket connected to the peer or not.
GLUES = ("in,always,connected", "in,always,-", "in,input,connected", "-,never,connected", "-,never,-")
GLUE = GLUES[0]
# A transfer must take a second or more to be measured well, so larger MTUs send this much more.
VERBOSE = False
SIZE_FACTOR = {1280: 1, 9000: 4, 65000: 4}


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _end(role: str, mtu: int, my_port: int, peer_port: int, my_key: bytes, peer_key: bytes, size: int,
         glue: str = GLUE) -> None:
    """Child: one end (``sender`` or ``receiver``) of the tunnel, run until the transfer ends."""
    from twisted.internet import protocol, reactor
    from twisted.internet.interfaces import IPushProducer
    from zope.interface import implementer

    from coderstack.netstack.endpoints import Netstack
    from coderstack.wire.wireguard import Device, public_key
    from tests.interop.netstack_wg_lab import TunnelLink, big_buffers
    from tests.support.wgudp import WireGuardUDP

    me, peer = (STACK_A, STACK_B) if role == "sender" else (STACK_B, STACK_A)
    device = Device(my_key, mtu=mtu)
    device.add_peer(public_key(peer_key))
    batch_in, batch_out, connected = glue.split(",")
    link = TunnelLink(reactor, batch_in=batch_in == "in", batch_out=batch_out)
    wg = WireGuardUDP(device, public_key(peer_key), ("127.0.0.1", peer_port), reactor, link.received)
    port = reactor.listenUDP(my_port, wg, interface="127.0.0.1", maxPacketSize=1 << 16)
    big_buffers(port)
    if connected == "connected":
        # A connected UDP socket: the kernel skips the per-datagram route lookup, and Twisted
        # its per-write address checks.
        port.connect("127.0.0.1", peer_port)
    ns = Netstack(me, link.send, reactor, mtu=1280)
    link.netstack, link.wg = ns, wg
    if mtu != 1280:
        ns.set_path_mtu(peer, mtu)
    result = {}

    if role == "receiver":
        class Sink(protocol.Protocol):
            n = 0

            def dataReceived(self, data):
                self.n += len(data)
                if self.n >= size:
                    self.transport.write(b"done\n")
                    # Time enough for "done" to cross (and be retransmitted if lost).
                    reactor.callLater(1.0, reactor.stop)

        ns.listen_tcp(PORT, protocol.Factory.forProtocol(Sink))
        print("ready", flush=True)
        reactor.callLater(300, reactor.stop)
        reactor.run()
        return

    chunk = random.Random(1).randbytes(256 << 10)

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
            reactor.callLater(0.1, reactor.stop)

    d = ns.connect_tcp(peer, PORT, protocol.Factory.forProtocol(Send))
    d.addErrback(lambda f: (print(f, file=sys.stderr), reactor.stop()))
    reactor.callLater(300, reactor.stop)
    reactor.run()
    st = ns.stats
    recovery = ", ".join(f"{k[4:]} {st[k]}" for k in (
        "tcp_timeouts", "tcp_fast_retransmit", "tcp_rack_marked_lost", "tcp_tlp_probes", "tcp_tlp_recovered",
        "tcp_prr_recoveries", "tcp_spurious_undone"))
    print(f"sender: retransmits {st['tcp_retransmits']} ({recovery}), wg send errors {link.send_errors}, "
          f"wg drops {dict(device.drops)}", file=sys.stderr)
    print(size * 8 / result["t"] / 1e6 if "t" in result else "nan", flush=True)


def bench_ours(size: int, mtu: int, profile: str | None = None, glue: str = GLUE) -> float:
    from coderstack.wire.wireguard import generate_private_key

    ka, kb = generate_private_key(), generate_private_key()
    pa, pb = _free_udp_port(), _free_udp_port()
    env = dict(os.environ, PYTHONPATH=ROOT)

    def argv(role: str, my_port: int, peer_port: int, mine: bytes, theirs: bytes) -> list[str]:
        prof = ["-m", "cProfile", "-o", os.path.join(profile, f"{role}-{mtu}.prof")] if profile else []
        return [sys.executable, *prof, __file__, "--end", role, "--mtu", str(mtu), "--size", str(size),
                "--ports", f"{my_port},{peer_port}", "--keys", f"{mine.hex()},{theirs.hex()}", f"--glue={glue}"]

    receiver = subprocess.Popen(argv("receiver", pb, pa, kb, ka), env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        if receiver.stdout.readline().strip() != "ready":
            raise RuntimeError("receiver did not start")
        out = subprocess.run(argv("sender", pa, pb, ka, kb), env=env, capture_output=True, text=True, timeout=600)
        receiver.wait(10)  # lets cProfile write its file
        if VERBOSE:
            print(f"MTU {mtu}, glue {glue}: {out.stdout.split()[-1]} Mbit/s; {out.stderr.strip()}", file=sys.stderr)
        return float(out.stdout.split()[-1])
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, help="MiB per run at MTU 1280 (default 128, 16 with --quick)")
    ap.add_argument("--profile")
    ap.add_argument("--mtus", default=",".join(map(str, MTUS)))
    ap.add_argument("--glue", default=GLUE, help="batch_in,batch_out,connected as in GLUES")
    ap.add_argument("--compare-glue", action="store_true", help="also measure the other GLUES")
    ap.add_argument("-v", "--verbose", action="store_true", help="each run's result and sender stats")
    ap.add_argument("--end")
    ap.add_argument("--mtu", type=int, default=1280)
    ap.add_argument("--ports")
    ap.add_argument("--keys")
    args = ap.parse_args()
    if args.end:
        my_port, peer_port = map(int, args.ports.split(","))
        mine, theirs = (bytes.fromhex(k) for k in args.keys.split(","))
        _end(args.end, args.mtu, my_port, peer_port, mine, theirs, args.size, glue=args.glue)
        return
    global VERBOSE
    VERBOSE = args.verbose
    size = (args.size or (16 if args.quick else 128)) << 20
    runs = 1 if args.quick and args.runs == 3 else args.runs
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    rows = []
    base = None
    if os.geteuid() == 0:
        from bench_netstack import bench_wg_kernel

        base_runs = [bench_wg_kernel(prefix="cswt") for _ in range(runs)]
        base = statistics.median(base_runs)
        rows.append(("wireguard-go + kernel TCP (iperf3, two namespaces, TUN MTU 1420)", base_runs))
    for mtu in map(int, args.mtus.split(",")):
        rows.append((f"our TCP over our WireGuard, loopback, MTU {mtu}",
                     [bench_ours(size * SIZE_FACTOR.get(mtu, 1), mtu, args.profile) for _ in range(runs)]))
    if args.compare_glue:
        for glue in GLUES:
            if glue == args.glue:
                continue
            for mtu in map(int, args.mtus.split(",")):
                rows.append((f"same, glue {glue}, MTU {mtu}",
                             [bench_ours(size * SIZE_FACTOR.get(mtu, 1), mtu, args.profile, glue) for _ in range(runs)]))
    print(f"## our TCP over our WireGuard — {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"ours sends {size >> 20} MiB per run at MTU 1280, 4x that at larger MTUs; median of {runs}")
    print()
    if base is None:
        print("(not root: no wireguard-go baseline this run)")
        print()
    print("| path | Mbit/s (median) | min–max | vs wireguard-go + kernel TCP |")
    print("|---|---:|---:|---:|")
    for name, values in rows:
        v = statistics.median(values)
        ratio = f"{v / base:.2f}x" if base else "n/a"
        print(f"| {name} | {v:.0f} | {min(values):.0f}–{max(values):.0f} | {ratio} |")


if __name__ == "__main__":
    main()
