"""Path-MTU probing, end to end: `coderstack speedtest`'s protocol through two real tailnet Conns
(each with its Netstack, in its own process, like the CLI and the agent) on loopback, with a DERP
relay process:

- direct UDP with probing on (the default: loopback proves 65472) vs forced 1280
  (``CODERSTACK_PMTUD=0``);
- relayed through DERP (direct paths blocked) at the default 64 KiB DERP MTU vs 1280.

Run: ``python bench/bench_pmtu.py`` (quick: 2 s tests, 3 runs each way) or ``--full`` (5 s, 5).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import UTC, datetime

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

RELAY = """
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site
from coderstack.derp.policy import AllowAllPolicy
from coderstack.derp.server import make_derp_resources, make_relay
from coderstack.wire import derp as w

policy = AllowAllPolicy()
relay = make_relay(w.generate_private_key(), policy, reactor)
root = Resource()
for path, res in make_derp_resources(relay, policy).items():
    root.putChild(path.lstrip("/").encode(), res)
site = Site(root)
site.noisy = False
print(reactor.listenTCP(0, site, interface="127.0.0.1").getHost().port, flush=True)
reactor.run()
"""

# One node: prints {"node": ...} lines, reads the peer's node from stdin. The agent serves the
# speedtest on tunnel port 3; the client waits for the expected path and MTU, then runs the tests
# and prints {"results": {"down": [...], "up": [...], "mtu": N, "path": "..."}}.
NODE = r"""
import ipaddress, json, sys
from twisted.internet import defer, reactor, stdio, task
from twisted.protocols.basic import LineReceiver
from coderstack.agent.speedtest import DOWNLOAD, UPLOAD, SpeedtestServerFactory, run_speedtest
from coderstack.derpmap import DERPMap
from coderstack.tailnet.conn import Conn
from coderstack.tailnet.stack import attach_netstack, client_endpoint, server_endpoint
from coderstack.wire.coordination import Node

role, derp_map, block, derp_mtu, seconds, runs = sys.argv[1:7]
conn = Conn(reactor, derp_token="bench", netcheck=False, block_endpoints=block == "1",
            derp_mtu=int(derp_mtu), interface_addresses=lambda: [ipaddress.ip_address("127.0.0.1")])
conn.start(0, "127.0.0.1")
conn.set_derp_map(DERPMap.loads(derp_map))
ns = attach_netstack(conn, reactor)
conn.on_node_change(lambda n: print(json.dumps({"node": n.to_json()}), flush=True))
if role == "agent":
    server_endpoint(ns, 3).listen(SpeedtestServerFactory(reactor))

async def measure(peer):
    key = peer.key
    want_p2p = block != "1"
    for _ in range(200):
        try:
            await conn.ping(key)
        except Exception:
            pass
        path = conn.path(key)[0]
        if path.startswith("p2p") == want_p2p and (not conn.sock.pmtu_enabled or conn.path_mtu(key) > 1280
                                                     or int(derp_mtu) == 1280 and not want_p2p):
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    await task.deferLater(reactor, 0.5, lambda: None)
    ep = client_endpoint(ns, peer.addresses[0].network_address, 3)
    res = {"down": [], "up": []}
    # The client's smoothed RTT while it has data in flight (the uploads): queueing or stalls
    # on the path show here.
    srtts = []
    def sample():
        for c in list(ns.stack.connections.values()):
            if c.rtt.srtt is not None and c.snd_nxt != c.snd_una:
                srtts.append(c.rtt.srtt * 1000)
    sampler = task.LoopingCall(sample)
    sampler.start(0.05, now=False)
    for _ in range(int(runs)):
        for name, direction in (("down", DOWNLOAD), ("up", UPLOAD)):
            r = await run_speedtest(ep, direction, float(seconds), reactor)
            res[name].append(r.total[2] * 8 / 1e6 / r.total[1])
    sampler.stop()
    srtts.sort()
    res["srtt_ms"] = srtts[len(srtts) // 2] if srtts else None
    res.update(mtu=conn.path_mtu(key), path=conn.path(key)[0], pmtu=conn.sock.pmtu_enabled,
               drops=dict(conn.sock.drops), retransmits=ns.stats["tcp_retransmits"])
    print(json.dumps({"results": res}), flush=True)
    reactor.stop()

class In(LineReceiver):
    delimiter = b"\n"
    started = False
    def lineReceived(self, line):
        peer = Node.from_json(json.loads(line))
        conn.update_peer(peer)
        if role == "client" and not self.started:
            self.started = True
            defer.ensureDeferred(measure(peer)).addErrback(lambda f: (f.printTraceback(), reactor.stop()))

stdio.StandardIO(In())
reactor.run()
"""


def derp_map(port: int) -> str:
    return json.dumps({"Regions": {"999": {
        "RegionID": 999, "RegionCode": "bench", "RegionName": "bench relay", "EmbeddedRelay": True,
        "Nodes": [{"Name": "1", "RegionID": 999, "HostName": "127.0.0.1", "DERPPort": port,
                   "STUNPort": -1, "ForceHTTP": True}]}}})


def _node(proc: subprocess.Popen) -> str:
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("node process ended early")
        msg = json.loads(line)
        if "node" in msg:
            return json.dumps(msg["node"])


def run_case(relay_port: int, *, pmtu: bool, relayed: bool, derp_mtu: int, seconds: float, runs: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, CODERSTACK_PMTUD="1" if pmtu else "0")
    args = [derp_map(relay_port), "1" if relayed else "0", str(derp_mtu), str(seconds), str(runs)]
    procs = {role: subprocess.Popen([sys.executable, "-c", NODE, role, *args], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=env)
             for role in ("agent", "client")}
    try:
        agent, client = procs["agent"], procs["client"]
        a_node, c_node = _node(agent), _node(client)
        agent.stdin.write(c_node + "\n")
        agent.stdin.flush()
        client.stdin.write(a_node + "\n")
        client.stdin.flush()
        for line in client.stdout:
            msg = json.loads(line)
            if "results" in msg:
                return msg["results"]
        raise RuntimeError("client ended without results")
    finally:
        for p in procs.values():
            p.terminate()
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s tests, 3 runs (the default)")
    parser.add_argument("--full", action="store_true", help="5 s tests, 5 runs")
    parser.add_argument("--only", choices=("direct", "derp"), help="one pair of cases")
    args = parser.parse_args()
    seconds, runs = (5.0, 5) if args.full else (2.0, 3)
    env = dict(os.environ, PYTHONPATH=ROOT)
    relay = subprocess.Popen([sys.executable, "-c", RELAY], stdout=subprocess.PIPE, text=True, env=env)
    cases = [
        ("direct UDP, probing on (default)", dict(pmtu=True, relayed=False, derp_mtu=1280)),
        ("direct UDP, forced 1280 (CODERSTACK_PMTUD=0)", dict(pmtu=False, relayed=False, derp_mtu=1280)),
        ("DERP relay, MTU 65472 (default)", dict(pmtu=True, relayed=True, derp_mtu=65472)),
        ("DERP relay, MTU 1280 (CODERSTACK_PMTUD=0 or before)", dict(pmtu=True, relayed=True, derp_mtu=1280)),
    ]
    if args.only:
        cases = [c for c in cases if c[1]["relayed"] == (args.only == "derp")]
    rows = []
    try:
        port = int(relay.stdout.readline())
        for name, kw in cases:
            r = run_case(port, seconds=seconds, runs=runs, **kw)
            rows.append((name, r))
    finally:
        relay.terminate()
        relay.wait()
    print(f"## Path MTU end to end: speedtest through two tailnet Conns on loopback "
          f"({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{seconds:g} s tests, median of {runs})\n")
    print("| path | tunnel MTU | download | upload | TCP retransmits | upload srtt (median) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        srtt = f"{r['srtt_ms']:.1f} ms" if r.get("srtt_ms") is not None else "-"
        print(f"| {name} | {r['mtu']} | {statistics.median(r['down']):.0f} Mbit/s | "
              f"{statistics.median(r['up']):.0f} Mbit/s | {r['retransmits']} | {srtt} |")
    for i in range(0, len(rows), 2):
        (name_a, on), (name_b, off) = rows[i], rows[i + 1]
        for d in ("down", "up"):
            ratio = statistics.median(on[d]) / statistics.median(off[d])
            print(f"\n{name_a} / {name_b}, {d}: {ratio:.2f}x", end="")
    print()


if __name__ == "__main__":
    main()
