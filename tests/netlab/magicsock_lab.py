"""Two peers, each behind its own NAT, and a server on a shared "wan" (names prefixed ``csms``)::

    peer A ns  a0 10.81.<n>.2 ── n0 10.81.<n>.1  NAT A ns  n1 203.0.113.10 ─┐
                                                                           br0 (wan ns) 203.0.113.2
    peer B ns  b0 10.82.<n>.2 ── n0 10.82.<n>.1  NAT B ns  n1 203.0.113.11 ─┘  relay :8080, STUN :3478

Each NAT masquerades out of ``n1`` (``--random-fully`` for a hard NAT) and is a stateful firewall
(only ESTABLISHED/RELATED forwarded or accepted from the wan side, INPUT from the wan dropped),
as in reference/baselines-and-real-peers.md. ``same_lan`` puts both peers in one LAN behind NAT A.
Processes are spawned with ``ip netns exec`` through the reactor and ended by PID; namespaces are
deleted in the cleanup.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from typing import Any

from twisted.internet import defer, protocol, reactor, task

from tests.support.waiting import wait_until

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER_IP = "203.0.113.2"
NAT_IPS = {"a": "203.0.113.10", "b": "203.0.113.11", "c": "203.0.113.12"}
# Waits in the lab: NAT and path changes heal on the product's own timers (a re-STUN every 23 s).
LAB_WAIT = 60.0
DERP_MAP = json.dumps({"Regions": {"1": {
    "RegionID": 1, "RegionCode": "lab", "RegionName": "Lab Relay",
    "Nodes": [{"Name": "1a", "RegionID": 1, "HostName": SERVER_IP, "IPv4": SERVER_IP,
               "DERPPort": 8080, "ForceHTTP": True, "STUNPort": 3478}]}}})


def available() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def sh(*cmd: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    return subprocess.run(full, check=check, capture_output=True, text=True, timeout=30)


def like_a_wire(dev: str, ns: str) -> None:
    """Datagrams leave ``dev`` one by one, as a real NIC puts them on the wire. A veth passes a
    UDP GSO burst (up to 64 datagrams in one buffer) through whole, so the NATs' and the labs'
    iptables rules (a length match for a black hole, packet counters, random loss) would see one
    packet where a network sees many; with at most one segment per buffer the kernel splits it
    before the veth."""
    sh("ip", "link", "set", "dev", dev, "gso_max_segs", "1", ns=ns)


class LineProcess(protocol.ProcessProtocol):
    """A child printing JSON lines; keeps the latest of each kind."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.buf = b""
        self.nodes: list[dict] = []
        self.status: dict = {}
        self.pings: list[Any] = []
        self.stderr = b""
        self.lines: list[bytes] = []
        self.sent_lines = 0
        self.done = 0  # stdin lines the child has handled
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.on_node: Any = None

    def outReceived(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                self.lines.append(line)
                continue
            if not isinstance(msg, dict):
                continue
            if "node" in msg:
                self.nodes.append(msg["node"])
                if self.on_node is not None:
                    self.on_node(msg["node"])
            if "status" in msg:
                self.status = msg["status"]
            if "ping" in msg or "ping_error" in msg:
                self.pings.append(msg)
            if "done" in msg:
                self.done = msg["done"]

    def errReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[-8000:]

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def send(self, obj: dict) -> None:
        self.transport.write(json.dumps(obj).encode() + b"\n")
        self.sent_lines += 1

    async def do(self, obj: dict) -> None:
        """Send ``obj`` and wait until the child has handled it."""
        self.send(obj)
        n = self.sent_lines
        await wait_until(lambda: self.done >= n or self.ended.called, f"{self.name} to handle {obj}",
                         timeout=LAB_WAIT)
        if self.done < n:
            raise AssertionError(f"{self.name} ended: {self.stderr.decode(errors='replace')}")


class MagicsockLab:
    def __init__(self, nat: str = "easy", same_lan: bool = False, block_udp: tuple[str, ...] = (),
                 prefix: str = "csms") -> None:
        tag = f"{os.getpid() % 100000}{uuid.uuid4().hex[:4]}"
        self.ns = {k: f"{prefix}-{k}{tag}" for k in ("wan", "na", "nb", "pa", "pb")}
        self.subnet = 1 + int(uuid.uuid4().hex[:2], 16) % 250
        self.namespaces: list[str] = []
        self.procs: list[LineProcess] = []
        self.same_lan = same_lan
        self._build(nat)
        for side in block_udp:
            self.block_udp(side)

    # -- topology --

    def _build(self, nat: str) -> None:
        ns = self.ns
        for name in ns.values():
            sh("ip", "netns", "add", name)
            self.namespaces.append(name)
            sh("ip", "link", "set", "lo", "up", ns=name)
        wan = ns["wan"]
        sh("ip", "link", "add", "br0", "type", "bridge", ns=wan)
        sh("ip", "addr", "add", f"{SERVER_IP}/24", "dev", "br0", ns=wan)
        sh("ip", "link", "set", "br0", "up", ns=wan)
        for side, lan in (("a", f"10.81.{self.subnet}"), ("b", f"10.82.{self.subnet}")):
            natns, peerns = ns["n" + side], ns["p" + side]
            sh("ip", "link", "add", "n1", "netns", natns, "type", "veth", "peer", "name", f"w{side}", "netns", wan)
            sh("ip", "link", "set", f"w{side}", "master", "br0", ns=wan)
            sh("ip", "link", "set", f"w{side}", "up", ns=wan)
            sh("ip", "addr", "add", f"{NAT_IPS[side]}/24", "dev", "n1", ns=natns)
            if self.same_lan and side == "b":
                continue  # B's NAT stays unused; B joins A's LAN below
            sh("ip", "link", "add", "n0", "netns", natns, "type", "veth", "peer", "name", "l0", "netns", peerns)
            sh("ip", "addr", "add", f"{lan}.1/24", "dev", "n0", ns=natns)
            for dev in ("n0", "n1"):
                sh("ip", "link", "set", dev, "up", ns=natns)
            sh("ip", "addr", "add", f"{lan}.2/24", "dev", "l0", ns=peerns)
            sh("ip", "link", "set", "l0", "up", ns=peerns)
            like_a_wire("l0", peerns)
            sh("ip", "route", "add", "default", "via", f"{lan}.1", ns=peerns)
            sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=natns)
            masq = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "n1", "-j", "MASQUERADE"]
            if nat == "hard":
                masq.append("--random-fully")
            sh(*masq, ns=natns)
            est = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
            for chain in ("FORWARD", "INPUT"):
                sh("iptables", "-A", chain, "-i", "n1", *est, ns=natns)
                sh("iptables", "-A", chain, "-i", "n1", "-j", "DROP", ns=natns)
        if self.same_lan:
            # B on A's LAN: a bridge in NAT A's namespace joins both peers' links.
            na, pb = ns["na"], ns["pb"]
            lan = f"10.81.{self.subnet}"
            sh("ip", "link", "add", "lanbr", "type", "bridge", ns=na)
            sh("ip", "addr", "del", f"{lan}.1/24", "dev", "n0", ns=na)
            sh("ip", "link", "set", "n0", "master", "lanbr", ns=na)
            sh("ip", "addr", "add", f"{lan}.1/24", "dev", "lanbr", ns=na)
            sh("ip", "link", "set", "lanbr", "up", ns=na)
            sh("ip", "link", "add", "n2", "netns", na, "type", "veth", "peer", "name", "l0", "netns", pb)
            sh("ip", "link", "set", "n2", "master", "lanbr", ns=na)
            sh("ip", "link", "set", "n2", "up", ns=na)
            sh("ip", "addr", "add", f"{lan}.3/24", "dev", "l0", ns=pb)
            sh("ip", "link", "set", "l0", "up", ns=pb)
            like_a_wire("l0", pb)
            sh("ip", "route", "add", "default", "via", f"{lan}.1", ns=pb)

    def add_uplink(self, side: str = "a") -> None:
        """A second NAT ("c", public 203.0.113.12) whose LAN reaches ``side``'s peer as ``l1``
        (10.83.<n>.2), not yet used: :meth:`move_to_uplink` switches the peer over."""
        natns, peerns, wan = self._ns("nc"), self.ns["p" + side], self.ns["wan"]
        lan = f"10.83.{self.subnet}"
        sh("ip", "link", "set", "lo", "up", ns=natns)
        sh("ip", "link", "add", "n1", "netns", natns, "type", "veth", "peer", "name", "wc", "netns", wan)
        sh("ip", "link", "set", "wc", "master", "br0", ns=wan)
        sh("ip", "link", "set", "wc", "up", ns=wan)
        sh("ip", "addr", "add", f"{NAT_IPS['c']}/24", "dev", "n1", ns=natns)
        sh("ip", "link", "add", "n0", "netns", natns, "type", "veth", "peer", "name", "l1", "netns", peerns)
        like_a_wire("l1", peerns)
        sh("ip", "addr", "add", f"{lan}.1/24", "dev", "n0", ns=natns)
        for dev in ("n0", "n1"):
            sh("ip", "link", "set", dev, "up", ns=natns)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=natns)
        sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "n1", "-j", "MASQUERADE", ns=natns)
        est = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
        for chain in ("FORWARD", "INPUT"):
            sh("iptables", "-A", chain, "-i", "n1", *est, ns=natns)
            sh("iptables", "-A", chain, "-i", "n1", "-j", "DROP", ns=natns)
        self.uplink_lan = lan

    def move_to_uplink(self, side: str = "a") -> None:
        """The laptop leaves its first network for the second: ``l0`` loses its address and goes
        down, ``l1`` gets one and carries the default route (as a Wi-Fi roam would)."""
        peerns = self.ns["p" + side]
        lan = self.uplink_lan
        sh("ip", "addr", "flush", "dev", "l0", ns=peerns)
        sh("ip", "link", "set", "l0", "down", ns=peerns)
        sh("ip", "addr", "add", f"{lan}.2/24", "dev", "l1", ns=peerns)
        sh("ip", "link", "set", "l1", "up", ns=peerns)
        sh("ip", "route", "replace", "default", "via", f"{lan}.1", ns=peerns)

    def renumber(self, side: str = "a", host: int = 7) -> str:
        """DHCP gives ``side``'s peer another address on the same LAN (the old one is gone)."""
        peerns = self.ns["p" + side]
        lan = f"10.8{'ab'.index(side) + 1}.{self.subnet}"
        sh("ip", "addr", "flush", "dev", "l0", ns=peerns)
        sh("ip", "addr", "add", f"{lan}.{host}/24", "dev", "l0", ns=peerns)
        sh("ip", "route", "replace", "default", "via", f"{lan}.1", ns=peerns)
        return f"{lan}.{host}"

    def _ns(self, key: str) -> str:
        name = self.ns.setdefault(key, self.ns["wan"].replace("-wan", f"-{key}", 1))
        if name not in self.namespaces:
            sh("ip", "netns", "add", name)
            self.namespaces.append(name)
        return name

    def block_udp(self, side: str, on: bool = True) -> None:
        """Drop forwarded UDP at one NAT (inserted before the conntrack ACCEPT)."""
        op = "-I" if on else "-D"
        sh("iptables", op, "FORWARD", "-p", "udp", "-j", "DROP", ns=self.ns["n" + side])

    # -- processes --

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def spawn(self, name: str, ns: str, *args: str, env: dict[str, str] | None = None) -> LineProcess:
        proc = LineProcess(name)
        ip = shutil.which("ip") or "/usr/sbin/ip"
        reactor.spawnProcess(proc, ip, ["ip", "netns", "exec", ns, sys.executable, *args],
                             env={**self.env(), **(env or {})}, path=REPO_ROOT)
        self.procs.append(proc)
        return proc

    async def start(self, block_endpoints: tuple[str, ...] = (),
                    force_websockets: tuple[str, ...] = (),
                    peer_env: dict[str, str] | None = None) -> tuple[LineProcess, LineProcess]:
        server = self.spawn("server", self.ns["wan"], "-m", "tests.netlab.relay_server",
                            "--http", "8080", "--stun", f"{SERVER_IP}:3478")
        await wait_until(lambda: b"Traceback" in server.stderr or server.ended.called or _ready(server), "the relay server to start", timeout=LAB_WAIT, interval=0.05)
        if not _ready(server):
            raise RuntimeError(f"relay server did not start: {server.stderr.decode(errors='replace')}")
        peers = []
        for side in ("a", "b"):
            extra = ("--block-endpoints",) if side in block_endpoints else ()
            if side in force_websockets:
                extra += ("--derp-force-websockets",)
            peers.append(self.spawn(side, self.ns["p" + side], "-m", "tests.netlab.peer",
                                    "--derp-map", DERP_MAP, *extra, env=peer_env))
        a, b = peers
        # The test process plays coordinator: every node change goes to the other peer.
        a.on_node = lambda node: b.send({"peer": node})
        b.on_node = lambda node: a.send({"peer": node})
        for n in a.nodes:
            b.send({"peer": n})
        for n in b.nodes:
            a.send({"peer": n})
        await wait_until(lambda: a.nodes and b.nodes and "path" in a.status and "path" in b.status, "both peers' nodes and paths", timeout=LAB_WAIT, interval=0.05)
        return a, b

    async def stop(self) -> None:
        for p in self.procs:
            if not p.ended.called:
                try:
                    p.transport.signalProcess("TERM")
                except Exception:
                    pass
        for p in self.procs:
            if not p.ended.called:
                timeout = reactor.callLater(5, lambda p=p: p.ended.called or p.transport.signalProcess("KILL"))
                await p.ended
                if timeout.active():
                    timeout.cancel()

    def cleanup(self) -> None:
        for name in reversed(self.namespaces):
            sh("ip", "netns", "del", name, check=False)


def _ready(proc: LineProcess) -> bool:
    return b"ready" in proc.lines


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)
