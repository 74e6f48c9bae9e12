"""A network namespace whose TUN device is wired to one of our netstacks, for interop tests and
benchmarks with Linux's own TCP as the peer.

    kernel TCP (namespace, fd00::1) <-> TUN <-> link <-> Netstack (this process, fd00::2)

The ``link`` between the TUN descriptor and the stack is pluggable: ``DirectLink`` passes packets
through, ``ReorderingLink`` holds some back.  Anything with ``to_kernel(packet)`` and
``to_stack(packets)`` fits, e.g. a wireguard-go path later.  Loss is added inside the namespace
with ip6tables' ``statistic`` match (this kernel has no netem).

Everything made here (namespace, TUN, processes) is removed in the test's cleanups, by name and
by PID.
"""

from __future__ import annotations

import collections
import os
import random
import secrets
import subprocess
import sys

from twisted.internet import defer, protocol, reactor

from coderstack.netstack.endpoints import Netstack
from coderstack.netstack.tun import TunReader, open_tun

KERNEL_ADDR = "fd00::1"
STACK_ADDR = "fd00::2"
ROUTED_KERNEL_ADDR = "fd00:1::2"  # the kernel peer behind the router namespace

KERNEL_CLIENT = r"""
import hashlib, random, socket, sys, time
host, port, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = random.Random(seed).randbytes(size)
s = socket.create_connection((host, port), timeout=60)
t = time.monotonic()
s.sendall(data)
s.shutdown(socket.SHUT_WR)
reply = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    reply += chunk
elapsed = time.monotonic() - t
print(reply.decode().strip(), f"{elapsed:.6f}", flush=True)
"""

KERNEL_SERVER = r"""
import hashlib, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((host, port))
ls.listen(1)
print("READY", flush=True)
c, _ = ls.accept()
h = hashlib.sha256()
n = 0
t = None
while True:
    chunk = c.recv(1 << 20)
    if t is None:
        t = time.monotonic()
    if not chunk:
        break
    h.update(chunk)
    n += len(chunk)
elapsed = time.monotonic() - (t or time.monotonic())
c.close()
print(n, h.hexdigest(), f"{elapsed:.6f}", flush=True)
"""


def can_run() -> str | None:
    """None if this process can build the lab, else why not (tests skip with that reason)."""
    if os.geteuid() != 0:
        return "needs root: creates a network namespace and a TUN device"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun on this machine"
    return None


class DirectLink:
    def __init__(self, to_kernel, to_stack) -> None:
        self.to_kernel = to_kernel
        self.to_stack = to_stack


class DelayLink:
    """Delays every packet, each direction, by ``one_way`` seconds: a WAN's round trip between
    our stack and the kernel's (the kernel has no netem here), in order, one timer per direction."""

    def __init__(self, to_kernel, to_stack, one_way: float = 0.01) -> None:
        self._kernel = to_kernel
        self._stack = to_stack
        self.one_way = one_way
        self.queues = {"k": collections.deque(), "s": collections.deque()}
        self.timers = {"k": None, "s": None}
        self.stopped = False

    def _later(self, key: str, item) -> None:
        if self.stopped:
            return  # the lab is being taken down: what the stack still says goes nowhere
        self.queues[key].append((reactor.seconds() + self.one_way, item))
        if self.timers[key] is None:
            self.timers[key] = reactor.callLater(self.one_way, self._due, key)

    def _due(self, key: str) -> None:
        self.timers[key] = None
        q = self.queues[key]
        now = reactor.seconds()
        while q and q[0][0] <= now:
            _, item = q.popleft()
            if key == "k":
                self._kernel(item)
            else:
                self._stack(item)
        if q:
            self.timers[key] = reactor.callLater(max(0.0, q[0][0] - now), self._due, key)

    def to_kernel(self, packet: bytes) -> None:
        self._later("k", packet)

    def to_stack(self, packets: list[bytes]) -> None:
        self._later("s", packets)

    def stop(self) -> None:
        self.stopped = True
        for key, timer in self.timers.items():
            if timer is not None and timer.active():
                timer.cancel()
            self.timers[key] = None


class ReorderingLink:
    """Holds back a fraction of packets (each direction) until ``hold`` later packets have passed,
    or ``max_hold`` seconds have gone by."""

    def __init__(self, to_kernel, to_stack, probability: float = 0.02, hold: int = 3,
                 max_hold: float = 0.002, seed: int = 1) -> None:
        self._kernel = to_kernel
        self._stack = to_stack
        self.p = probability
        self.hold = hold
        self.max_hold = max_hold
        self.rng = random.Random(seed)
        self.held = {"k": [], "s": []}
        self.reordered = 0
        self._timer = None

    def _pass(self, key: str, packets: list[bytes]) -> list[bytes]:
        out = []
        held = self.held[key]
        for pkt in packets:
            if self.rng.random() < self.p:
                held.append([self.hold, pkt])
                self.reordered += 1
                continue
            out.append(pkt)
            if held:
                for h in held:
                    h[0] -= 1
                out.extend(h[1] for h in held if h[0] <= 0)
                held[:] = [h for h in held if h[0] > 0]
        if (self.held["k"] or self.held["s"]) and self._timer is None:
            self._timer = reactor.callLater(self.max_hold, self._flush)
        return out

    def _flush(self) -> None:
        self._timer = None
        k, s = self.held["k"], self.held["s"]
        self.held = {"k": [], "s": []}
        for _n, pkt in k:
            self._kernel(pkt)
        if s:
            self._stack([pkt for _n, pkt in s])

    def to_kernel(self, packet: bytes) -> None:
        for pkt in self._pass("k", [packet]):
            self._kernel(pkt)

    def to_stack(self, packets: list[bytes]) -> None:
        out = self._pass("s", packets)
        if out:
            self._stack(out)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


class Lab:
    """``routed=False``: the kernel peer sits in the TUN's namespace at ``KERNEL_ADDR``.

    ``routed=True``: the TUN's namespace is a router, and the kernel peer sits behind it on a veth
    pair at ``ROUTED_KERNEL_ADDR``.  Loss rules then go in the router's FORWARD chain, so they drop
    packets in flight: a drop in the sender's own OUTPUT chain is reported back to its TCP as a
    local error, which retransmits at once instead of experiencing loss.
    """

    def __init__(self, mtu: int = 1280, link=None, cleanup=None, routed: bool = False, **netstack_kwargs) -> None:
        suffix = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.ns = f"csns{suffix}"
        self.dev = f"csnst{secrets.token_hex(4)}"[:15]
        self._cleanups = []
        add = cleanup or self._cleanups.append
        sh("ip", "netns", "add", self.ns)
        add(lambda: sh("ip", "netns", "del", self.ns, check=False))
        fd = open_tun(self.dev, f"/run/netns/{self.ns}")
        self.exec("ip", "link", "set", "lo", "up")
        self.exec("ip", "link", "set", self.dev, "up", "mtu", str(mtu), "txqueuelen", "1000")
        # One packet per GSO unit, so the ip6tables loss rules drop single segments, not bursts.
        self.exec("ip", "link", "set", self.dev, "gso_max_segs", "1")
        self.exec("ip", "-6", "addr", "add", f"{KERNEL_ADDR}/64", "dev", self.dev, "nodad")
        self.peer_ns = self.ns
        self.kernel_addr = KERNEL_ADDR
        self.routed = routed
        if routed:
            self.peer_ns = f"csnsh{suffix}"
            sh("ip", "netns", "add", self.peer_ns)
            add(lambda: sh("ip", "netns", "del", self.peer_ns, check=False))
            vr, vh = f"csnsvr{suffix}"[:15], f"csnsvh{suffix}"[:15]
            self.exec("ip", "link", "add", vr, "type", "veth", "peer", "name", vh)
            self.exec("ip", "link", "set", vh, "netns", self.peer_ns)
            self.exec("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
            self.exec("ip", "link", "set", vr, "up", "mtu", str(mtu))
            self.exec("ip", "-6", "addr", "add", "fd00:1::1/64", "dev", vr, "nodad")
            peer = ("ip", "netns", "exec", self.peer_ns)
            sh(*peer, "ip", "link", "set", "lo", "up")
            sh(*peer, "ip", "link", "set", vh, "up", "mtu", str(mtu), "gso_max_segs", "1")
            sh(*peer, "ip", "-6", "addr", "add", f"{ROUTED_KERNEL_ADDR}/64", "dev", vh, "nodad")
            sh(*peer, "ip", "-6", "route", "add", "default", "via", "fd00:1::1")
            self.kernel_addr = ROUTED_KERNEL_ADDR
        self.netstack = Netstack(STACK_ADDR, self._to_kernel, reactor, mtu=mtu, **netstack_kwargs)
        self.reader = TunReader(fd, self._from_kernel, reactor)
        self.link = (link or DirectLink)(self.reader.write_packet, self.netstack.packets_received)
        self.reader.startReading()
        add(self.reader.close)
        add(self.netstack.stop)
        if hasattr(self.link, "stop"):
            add(self.link.stop)
        self.processes: list = []

    def _to_kernel(self, packet: bytes) -> None:
        self.link.to_kernel(packet)

    def _from_kernel(self, packets: list[bytes]) -> None:
        self.link.to_stack(packets)

    def exec(self, *args: str) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns, *args)

    def add_loss(self, probability: float) -> None:
        """Random loss in both directions on the router (needs ``routed=True``)."""
        assert self.routed, "loss needs the routed lab"
        for opt in ("-i", "-o"):
            self.exec("ip6tables", "-A", "FORWARD", opt, self.dev, "-m", "statistic", "--mode", "random",
                      "--probability", str(probability), "-j", "DROP")

    def dropped(self) -> int:
        out = self.exec("ip6tables", "-L", "-v", "-n", "-x").stdout
        return sum(int(line.split()[0]) for line in out.splitlines() if "statistic" in line)

    def spawn(self, script: str, *args: str, cleanup=None) -> LineProcess:
        """Run a Python script in the kernel peer's namespace."""
        return self.spawn_argv([sys.executable, "-c", script, *args], cleanup=cleanup)

    def spawn_argv(self, argv: list[str], cleanup=None) -> LineProcess:
        """Run a program in the kernel peer's namespace (killed by PID at cleanup)."""
        proto = LineProcess()
        argv = ["ip", "netns", "exec", self.peer_ns, *argv]
        transport = reactor.spawnProcess(proto, argv[0], argv, env=os.environ.copy())
        (cleanup or self._cleanups.append)(lambda: proto.kill(transport))
        return proto

    def close(self) -> None:
        for fn in reversed(self._cleanups):
            fn()
        self._cleanups = []


class LineProcess(protocol.ProcessProtocol):
    """Collects stdout lines; ``line()`` waits for the next one, ``ended`` fires on exit."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.all_lines: list[str] = []
        self.stderr = b""
        self._waiting: list[defer.Deferred] = []
        self._buf = b""
        self.ended = defer.Deferred()
        self.pid = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def outReceived(self, data: bytes) -> None:
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            self.lines.append(line.decode())
            self.all_lines.append(line.decode())
        while self._waiting and self.lines:
            self._waiting.pop(0).callback(self.lines.pop(0))

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def line(self) -> defer.Deferred:
        if self.lines:
            return defer.succeed(self.lines.pop(0))
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def processEnded(self, reason) -> None:
        for d in self._waiting:
            d.errback(RuntimeError(f"process ended: {self.stderr.decode(errors='replace')[-500:]}"))
        self._waiting = []
        self.ended.callback(reason.value.exitCode)

    def kill(self, transport) -> None:
        if transport.pid is not None:
            try:
                os.kill(transport.pid, 9)
            except ProcessLookupError:
                pass
