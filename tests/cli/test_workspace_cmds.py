"""ping and speedtest commands over a loopback stand-in for the tunnel (the Connect hook)."""

from __future__ import annotations

import io
import json

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.server import Site

from coderstack.agent.api import AgentAPI
from coderstack.agent.speedtest import SpeedtestServerFactory
from coderstack.cli import ping, speedtest
from coderstack.netinfo import Interface
from coderstack.tailnet.endpoint import PingResult
from tests.support.loopback import LoopbackConnection, loopback_connect


class FakeAPI:
    async def connection_info(self):
        return {"disable_direct_connections": False, "derp_map": {"Regions": {"999": {
            "RegionID": 999, "RegionCode": "coder", "RegionName": "Coder Embedded Relay",
            "Nodes": [{"Name": "999a", "RegionID": 999, "HostName": "127.0.0.1", "STUNPort": -1}]}}}}


class StunMapAPI(FakeAPI):
    async def connection_info(self):
        return {"disable_direct_connections": False, "derp_map": {"Regions": {"999": {
            "RegionID": 999, "RegionCode": "coder", "RegionName": "Coder Embedded Relay",
            "Nodes": [{"Name": "999a", "RegionID": 999, "HostName": "127.0.0.1"}]}}}}


class Ctx:
    def __init__(self, disable_direct=False, verbose=False):
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self.api = FakeAPI()
        self.disable_direct, self.verbose = disable_direct, verbose
        self.environ = {}

    def out(self, line=""):
        self.stdout.write(line + "\n")

    def err(self, line=""):
        self.stderr.write(line + "\n")


def parse(cls, args):
    opts = cls()
    opts.parseOptions(args)
    return opts


class PingCommandTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        async def agent_netcheck():
            return {"UDP": False, "MappingVariesByDestIP": True}
        api = AgentAPI(agent_netcheck, ports=lambda: [], interfaces=lambda: [Interface("eth0", 1500, ("192.0.2.5/24",))])
        self.api_port = reactor.listenTCP(0, Site(api.resource()), interface="127.0.0.1")
        self.addCleanup(self.api_port.stopListening)

    def conn(self, pings):
        return LoopbackConnection(
            reactor, {4: self.api_port.getHost().port}, pings=pings, regions={999: "Coder Embedded Relay"},
            diagnostics={"preferred_derp": 999, "derp_region_names": {999: "Coder Embedded Relay"},
                         "sent_node": True, "received_node": {"derp": "127.3.3.40:999", "endpoints": []},
                         "last_handshake": None})

    @defer.inlineCallbacks
    def test_relayed_then_direct_with_a_timeout(self):
        conn = self.conn([PingResult.relayed(0.030, 999),          # silent first ping
                          PingResult.relayed(0.0421, 999), None,
                          PingResult.direct(0.0031, "198.51.100.7:41641")])
        ctx = Ctx(verbose=True)
        code = yield defer.ensureDeferred(ping.run_with(
            reactor, parse(ping.Options, ["dev", "-n", "3", "--wait", "0s"]), ctx, loopback_connect(conn)))
        self.assertEqual(code, 0)
        self.assertTrue(conn.closed)
        out = ctx.stdout.getvalue().splitlines()
        self.assertEqual(out[0], "pong from dev proxied via DERP(Coder Embedded Relay) in 42ms")
        self.assertEqual(out[1], 'ping to "dev" timed out ')
        self.assertTrue(out[2].startswith("p2p connection established in "))
        self.assertEqual(out[3], "pong from dev p2p via 198.51.100.7:41641 in 3ms")
        self.assertEqual(out[5].split(), ["WORKSPACE", "TOTAL", "SUCCESSFUL", "MIN", "AVG", "MAX", "VARIANCE"])
        self.assertEqual(out[6].split()[:3], ["dev", "3", "2"])
        err = ctx.stderr.getvalue()
        self.assertIn("✔ preferred DERP region: 999 (Coder Embedded Relay)\n", err)
        self.assertIn("✘ Wireguard is not connected\n", err)
        self.assertIn("❗ The DERP map is not configured to use STUN", err)          # the map has no STUN
        self.assertIn(" - Agent is potentially behind a hard NAT", err)            # from the agent's API
        self.assertIn("✔ You are connected directly (p2p)\n", err)
        self.assertIn("❗ 1 of 3 pings were lost (33.3%)", err)

    @defer.inlineCallbacks
    def test_relayed_diagnostics_wait_for_the_first_netcheck(self):
        # With UDP blocked, the report that says so is in only after the STUN probes time out
        # (seconds after dialing); the relayed ping's diagnostics wait for it (found in the NAT lab).
        conn = self.conn([PingResult.relayed(0.001, 999)] * 2)
        conn.report = {"UDP": False, "MappingVariesByDestIP": None}
        ctx = Ctx()
        ctx.api = StunMapAPI()
        code = yield defer.ensureDeferred(ping.run_with(
            reactor, parse(ping.Options, ["dev", "-n", "1"]), ctx, loopback_connect(conn)))
        self.assertEqual(code, 0)
        self.assertIn(" - Client could not connect to STUN over UDP\n", ctx.stderr.getvalue())

    @defer.inlineCallbacks
    def test_relayed_ping_names_the_hard_nats(self):
        # Both netchecks (ours and the agent's) saw the mapping vary between the two ports of
        # the server's STUN: the verdict says that is why the connection is relayed.
        conn = self.conn([PingResult.relayed(0.002, 999)] * 2)
        conn.report = {"UDP": True, "MappingVariesByDestIP": True}
        ctx = Ctx()
        ctx.api = StunMapAPI()
        yield defer.ensureDeferred(ping.run_with(
            reactor, parse(ping.Options, ["dev", "-n", "1"]), ctx, loopback_connect(conn)))
        err = ctx.stderr.getvalue()
        self.assertIn(" - Client is potentially behind a hard NAT", err)
        self.assertIn(" - Agent is potentially behind a hard NAT", err)
        self.assertIn("❗ You are connected via a DERP relay, not directly (p2p)\n"
                      "   Why: both sides are behind hard NATs (their mappings vary by destination), "
                      "so hole punching cannot work\n", err)

    @defer.inlineCallbacks
    def test_json_output(self):
        conn = self.conn([PingResult.relayed(0.5, 999)] * 3)
        ctx = Ctx()
        yield defer.ensureDeferred(ping.run_with(
            reactor, parse(ping.Options, ["dev", "-n", "2", "--wait", "0s", "-o", "json"]), ctx, loopback_connect(conn)))
        doc = json.loads(ctx.stdout.getvalue())
        self.assertEqual(doc["workspace"], "dev")
        self.assertEqual([p["derp_region"] for p in doc["pongs"]], ["Coder Embedded Relay"] * 2)
        self.assertEqual(doc["summary"]["successful"], 2)
        self.assertIn("pong from dev proxied via DERP(Coder Embedded Relay) in 500ms", ctx.stderr.getvalue())
        self.assertIn("❗ You are connected via a DERP relay, not directly (p2p)", ctx.stderr.getvalue())
        self.assertIn("❗ Average round-trip time 500ms is above the 400ms", ctx.stderr.getvalue())

    def test_bad_flags(self):
        from twisted.python import usage
        for args in (["dev", "--wait", "1x"], ["dev", "-n", "-1"], ["dev", "-o", "yaml"]):
            self.assertRaises(usage.UsageError, parse, ping.Options, args)


class SpeedtestCommandTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        factory = SpeedtestServerFactory()
        self.closed = []
        build = factory.buildProtocol

        def tracked(addr):
            proto, d = build(addr), defer.Deferred()
            lost = proto.connectionLost
            self.closed.append(d)

            def connection_lost(reason=None):
                lost(reason)
                d.callback(None)
            proto.connectionLost = connection_lost
            return proto
        factory.buildProtocol = tracked
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def run_cmd(self, args, pings, ctx=None):
        conn = LoopbackConnection(reactor, {3: self.port.getHost().port}, pings=pings, regions={999: "coder"})
        ctx = ctx or Ctx()
        code = yield defer.ensureDeferred(speedtest.run_with(
            reactor, parse(speedtest.Options, args), ctx, loopback_connect(conn)))
        yield defer.gatherResults(self.closed)  # the server side has seen the close too
        return code, ctx

    @defer.inlineCallbacks
    def test_table_download(self):
        code, ctx = yield self.run_cmd(["dev", "-t", "1100ms"], [PingResult.relayed(0.029, 999)])
        self.assertEqual(code, 0)
        self.assertEqual(ctx.stderr.getvalue(), "29ms via coder\nStarting a 1.1s download test...\n")
        lines = ctx.stdout.getvalue().splitlines()
        self.assertEqual(lines[0].split(), ["INTERVAL", "THROUGHPUT"])
        self.assertTrue(set(lines[-2]) == {"-"})
        self.assertRegex(lines[-1], r"^0\.00-\d+\.\d\d sec  \d+\.\d{4} Mbits/sec$")

    @defer.inlineCallbacks
    def test_json_upload_waiting_for_direct(self):
        code, ctx = yield self.run_cmd(
            ["dev", "-t", "1s", "--direction", "up", "--direct", "-o", "json"],
            [PingResult.relayed(0.029, 999), PingResult.direct(0.002, "127.0.0.1:1")])
        doc = json.loads(ctx.stdout.getvalue())
        self.assertGreater(doc["overall"]["throughput_mbits"], 0)
        self.assertEqual(ctx.stderr.getvalue().splitlines(), [
            "Waiting for a direct connection... (29ms via coder)", "2ms via direct", "Starting a 1s upload test..."])

    def test_direct_conflicts_with_disable_direct(self):
        from twisted.python import usage
        d = defer.ensureDeferred(speedtest.run_with(
            reactor, parse(speedtest.Options, ["dev", "-d"]), Ctx(disable_direct=True), None))
        self.failureResultOf(d, usage.UsageError)
        for args in (["dev", "-t", "0s"], ["dev", "--direction", "sideways"], ["dev", "-t", "10m"]):
            self.assertRaises(usage.UsageError, parse, speedtest.Options, args)
