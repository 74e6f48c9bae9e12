"""Path-MTU probing between two namespaces joined by one veth pair (names prefixed ``cspm``)::

    ns cspm-a<tag>  va 10.77.<n>.1 ── vb 10.77.<n>.2  ns cspm-b<tag>
    (relay :8080, peer A)                              (peer B)

- veth MTU 1500: the kernel refuses the 8928 and 65472 probes (EMSGSIZE, counted); the path
  gets 1440, whose WireGuard datagrams fill exactly 1500, and TCP over the tunnel is exact.
- veth MTU 9000 but anything above 1500 silently dropped on the way (iptables length match, a
  black hole such as a smaller hop that sends no ICMP): only the 1440 probe is answered, so the
  path again gets 1440 and no data is lost to the hole.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.netlab.magicsock_lab import LAB_WAIT, REPO_ROOT, LineProcess, available, like_a_wire, sh
from tests.netlab.magicsock_lab import MagicsockLab as _Spawner
from tests.support.waiting import wait_until

SKIP = available()


class PeerProcess(LineProcess):
    """Also keeps the transfer results ({"sent": ...}, {"received": ...}) and errors."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.results: dict = {}

    def outReceived(self, data: bytes) -> None:
        for line in (self.buf + data).split(b"\n")[:-1]:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                for key in ("sent", "received", "error"):
                    if key in msg:
                        self.results[key] = msg[key]
        super().outReceived(data)


class PMTULab(_Spawner):
    """Two namespaces and one veth (reuses the NAT lab's process spawning and stopping)."""

    def __init__(self, mtu: int, drop_above: int | None = None) -> None:
        tag = f"{os.getpid() % 10000}{uuid.uuid4().hex[:2]}"
        self.ns = {"a": f"cspm-a{tag}", "b": f"cspm-b{tag}"}
        self.namespaces: list[str] = []
        self.procs: list[LineProcess] = []
        n = 1 + int(uuid.uuid4().hex[:2], 16) % 250
        self.ip = {"a": f"10.77.{n}.1", "b": f"10.77.{n}.2"}
        for name in self.ns.values():
            sh("ip", "netns", "add", name)
            self.namespaces.append(name)
            sh("ip", "link", "set", "lo", "up", ns=name)
        sh("ip", "link", "add", f"cspma{tag}", "netns", self.ns["a"], "mtu", str(mtu), "type", "veth",
           "peer", "name", f"cspmb{tag}", "netns", self.ns["b"], "mtu", str(mtu))
        for side in ("a", "b"):
            dev = f"cspm{side}{tag}"
            sh("ip", "addr", "add", f"{self.ip[side]}/24", "dev", dev, ns=self.ns[side])
            sh("ip", "link", "set", dev, "up", ns=self.ns[side])
            like_a_wire(dev, self.ns[side])
            if drop_above is not None:
                sh("iptables", "-A", "INPUT", "-p", "udp", "-m", "length", "--length",
                   f"{drop_above + 1}:65535", "-j", "DROP", ns=self.ns[side])

    def spawn(self, name: str, ns: str, *args: str) -> LineProcess:
        proc = PeerProcess(name)
        ip = shutil.which("ip") or "/usr/sbin/ip"
        reactor.spawnProcess(proc, ip, ["ip", "netns", "exec", ns, sys.executable, *args],
                             env=self.env(), path=REPO_ROOT)
        self.procs.append(proc)
        return proc

    def derp_map(self) -> str:
        host = self.ip["a"]
        return json.dumps({"Regions": {"1": {
            "RegionID": 1, "RegionCode": "lab", "RegionName": "Lab Relay",
            "Nodes": [{"Name": "1a", "RegionID": 1, "HostName": host, "IPv4": host,
                       "DERPPort": 8080, "ForceHTTP": True, "STUNPort": -1}]}}})

    async def start_peers(self) -> tuple[LineProcess, LineProcess]:
        relay = self.spawn("relay", self.ns["a"], "-m", "tests.netlab.relay_server", "--http", "8080")
        await wait_until(lambda: b"Traceback" in relay.stderr or relay.ended.called or b"ready" in relay.lines, "the relay server to start", timeout=LAB_WAIT, interval=0.05)
        if b"ready" not in relay.lines:
            raise RuntimeError(f"relay did not start: {relay.stderr.decode(errors='replace')}")
        a = self.spawn("a", self.ns["a"], "-m", "tests.netlab.pmtu_peer", "--derp-map", self.derp_map())
        b = self.spawn("b", self.ns["b"], "-m", "tests.netlab.pmtu_peer", "--derp-map", self.derp_map())
        a.on_node = lambda node: b.send({"peer": node})
        b.on_node = lambda node: a.send({"peer": node})
        await wait_until(lambda: a.nodes and b.nodes or a.ended.called or b.ended.called, "both peers' nodes", timeout=LAB_WAIT, interval=0.05)
        for p in (a, b):
            if p.ended.called:
                raise RuntimeError(f"peer {p.name} died: {p.stderr.decode(errors='replace')}")
        b.send({"peer": a.nodes[-1]})
        a.send({"peer": b.nodes[-1]})
        return a, b


class NamespacePMTUTests(unittest.TestCase):
    timeout = 90
    skip = SKIP

    async def lab(self, mtu: int, drop_above: int | None = None) -> tuple[PMTULab, LineProcess, LineProcess]:
        lab = PMTULab(mtu, drop_above)
        self.addCleanup(lab.cleanup)  # runs last: namespaces go once the processes have ended
        self.addCleanup(lambda: defer.ensureDeferred(lab.stop()))
        a, b = await lab.start_peers()
        return lab, a, b

    async def transfer_and_check(self, a: LineProcess, b: LineProcess, expect_mtu: int) -> None:
        a.send({"ping": True})
        await wait_until(lambda: a.status.get("path", "").startswith("p2p") and a.status.get("path_mtu") == expect_mtu
                         or a.ended.called, "a direct path at the expected MTU", timeout=LAB_WAIT, interval=0.05)
        self.assertTrue(a.status["pmtu"])
        # Larger probes went with the discovery pings: a ping sent now over the direct path is
        # answered after any of them, and a status line after that shows what they proved.
        pings = len(a.pings)
        await a.do({"ping": True})
        await wait_until(lambda: len(a.pings) > pings, "the ping", timeout=LAB_WAIT, interval=0.05)
        self.assertIn("ping", a.pings[-1])  # answered, not {"ping_error": ...}
        await a.do({})
        self.assertEqual(a.status["path_mtu"], expect_mtu)
        await b.do({"serve": 7000})
        total = 8 << 20
        a.send({"send": [7000, total]})
        await wait_until(lambda: _received(b) or a.ended.called or b.ended.called, "the transfer at B", timeout=LAB_WAIT, interval=0.05)
        sent, got = _sent(a), _received(b)
        self.assertEqual(got, sent)
        self.assertEqual(got[0], total)
        self.assertTrue(a.status["path"].startswith("p2p"), a.status)

    async def test_veth_1500(self) -> None:
        lab, a, b = await self.lab(1500)
        await self.transfer_and_check(a, b, 1440)
        self.assertGreater(a.status["drops"].get("udp-emsgsize", 0), 0)  # the kernel refused

    async def test_black_hole_above_1500(self) -> None:
        lab, a, b = await self.lab(9000, drop_above=1500)
        await self.transfer_and_check(a, b, 1440)


def _sent(p: LineProcess):
    return p.results.get("sent")  # type: ignore[attr-defined]


def _received(p: LineProcess):
    return p.results.get("received")  # type: ignore[attr-defined]
