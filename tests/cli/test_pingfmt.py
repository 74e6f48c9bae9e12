"""ping/speedtest output: exact strings (Coder's formats) and Welford statistics."""

from __future__ import annotations

import json
import statistics

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.agent.speedtest import Result
from coderstack.cli import pingfmt, speedtestfmt
from coderstack.cli.pingfmt import ConnDiags, PingSummary, go_duration, go_duration_ns

URL = "https://coder.com/docs/admin/networking/troubleshooting"


class GoDurationTests(unittest.TestCase):
    def test_matches_go(self):
        cases = {0: "0s", 1: "1ns", 999: "999ns", 1_000: "1µs", 1_500: "1.5µs", 1_000_000: "1ms",
                 1_234_567: "1.234567ms", 42_000_000: "42ms", 1_000_000_000: "1s", 1_203_000_000: "1.203s",
                 61_000_000_000: "1m1s", 300_000_000_000: "5m0s", 3_600_000_000_000: "1h0m0s",
                 3_723_500_000_000: "1h2m3.5s", -1_500_000: "-1.5ms"}
        for ns, want in cases.items():
            self.assertEqual(go_duration_ns(ns), want, ns)

    def test_rounding(self):
        self.assertEqual(go_duration(0.0415, 0.001), "42ms")   # half rounds away from zero
        self.assertEqual(go_duration(0.0414, 0.001), "41ms")
        self.assertEqual(go_duration(11.4, 1.0), "11s")
        self.assertEqual(go_duration(0.0004, 0.001), "0s")


class PingLineTests(unittest.TestCase):
    def test_pong_lines(self):
        self.assertEqual(pingfmt.pong_line("dev", 0.0031, True, "198.51.100.7:41641"),
                         "pong from dev p2p via 198.51.100.7:41641 in 3ms")
        self.assertEqual(pingfmt.pong_line("dev", 0.04201, False, derp_region="Coder Embedded Relay"),
                         "pong from dev proxied via DERP(Coder Embedded Relay) in 42ms")
        self.assertEqual(pingfmt.pong_line("dev", 0.0042, False, timestamp="2026-11-22T18:00:00Z"),
                         "[2026-11-22T18:00:00Z] pong from dev proxied via DERP(unknown) in 4ms")
        self.assertEqual(pingfmt.p2p_established_line(2.3456), "p2p connection established in 2.346s")
        self.assertEqual(pingfmt.timeout_line("dev"), 'ping to "dev" timed out ')
        self.assertEqual(pingfmt.failed_line("dev", "boom"), 'ping to "dev" failed boom')

    def test_closing_lines(self):
        self.assertEqual(pingfmt.closing_lines(True, "198.51.100.7:1", URL), "✔ You are connected directly (p2p)\n")
        self.assertEqual(pingfmt.closing_lines(True, "192.168.1.5:41641", URL),
                         "✔ You are connected directly (p2p), over a private network\n")
        self.assertEqual(pingfmt.closing_lines(True, "[fd00::1]:41641", URL),
                         "✔ You are connected directly (p2p), over a private network\n")
        self.assertEqual(pingfmt.closing_lines(False, "", URL),
                         "❗ You are connected via a DERP relay, not directly (p2p)\n"
                         f"   {URL}#common-problems-with-direct-connections\n")
        self.assertEqual(pingfmt.closing_lines(False, "", URL, "this side is behind a hard NAT"),
                         "❗ You are connected via a DERP relay, not directly (p2p)\n"
                         "   Why: this side is behind a hard NAT\n"
                         f"   {URL}#common-problems-with-direct-connections\n")
        # A direct connection needs no reason.
        self.assertEqual(pingfmt.closing_lines(True, "198.51.100.7:1", URL, "x"), "✔ You are connected directly (p2p)\n")

    def test_hard_nat_reason(self):
        hard, easy, unknown = ({"MappingVariesByDestIP": v} for v in (True, False, None))
        reason = pingfmt.hard_nat_reason
        self.assertTrue(reason(hard, hard).startswith("both sides are behind hard NATs"))
        self.assertTrue(reason(hard, easy).startswith("this side is behind a hard NAT"))
        self.assertTrue(reason(hard, None).startswith("this side is behind a hard NAT"))
        self.assertTrue(reason(unknown, hard).startswith("the workspace's side is behind a hard NAT"))
        for here, there in ((easy, easy), (unknown, unknown), (None, None), (easy, unknown)):
            self.assertEqual(reason(here, there), "")


class DiagnosticsTests(unittest.TestCase):
    def test_peer_diagnostics_all_good(self):
        d = {"preferred_derp": 999, "derp_region_names": {999: "Coder Embedded Relay"}, "sent_node": True,
             "received_node": {"derp": "127.3.3.40:999", "endpoints": ["198.51.100.7:41641", "10.0.0.2:41641"]},
             "last_handshake": 1000.0}
        self.assertEqual(pingfmt.peer_diagnostics(d, now=1011.2), (
            "✔ preferred DERP region: 999 (Coder Embedded Relay)\n"
            "✔ sent local data to Coder networking coordinator\n"
            "✔ received remote agent data from Coder networking coordinator\n"
            "    preferred DERP region: 999 (Coder Embedded Relay)\n"
            "    endpoints: 198.51.100.7:41641, 10.0.0.2:41641\n"
            "✔ Wireguard handshake 11s ago\n"))

    def test_peer_diagnostics_all_bad_and_stale(self):
        self.assertEqual(pingfmt.peer_diagnostics({}, now=0), (
            "✘ not connected to DERP\n"
            "✘ have not sent local data to Coder networking coordinator\n"
            "✘ have not received remote agent data from Coder networking coordinator\n"
            "✘ Wireguard is not connected\n"))
        d = {"preferred_derp": 7, "received_node": {"derp": "127.3.3.40:8", "endpoints": []}, "last_handshake": 100.0}
        out = pingfmt.peer_diagnostics(d, now=100.0 + 301)
        self.assertIn("✔ preferred DERP region: 7 (unknown)\n", out)
        self.assertIn("    preferred DERP region: 8 (unknown)\n    endpoints: \n", out)
        self.assertIn("⚠ Wireguard handshake 5m1s ago\n", out)

    def test_conn_diagnostics_verbose_everything(self):
        mtu = {"warnings": [{"message": "Network interface wg0 has MTU 1280 (less than 1378), which may degrade "
                                        "the quality of direct connections or render them unusable."}]}
        out = ConnDiags(
            troubleshooting_url=URL, verbose=True, disable_direct=True, deployment_blocks_direct=True,
            derp_map_has_stun=True, local_netinfo={"UDP": False, "MappingVariesByDestIP": True},
            local_interfaces=mtu, agent_netcheck={"netinfo": {"UDP": False, "MappingVariesByDestIP": True},
                                                  "interfaces": {"warnings": []}},
            client_ip_is_aws=True, agent_ip_is_aws=True).render()
        self.assertEqual(out, (
            "\n"
            "❗ Direct connections are disabled locally, by `--disable-direct-connections` or "
            "`CODER_DISABLE_DIRECT_CONNECTIONS`.\n   They may still be established over a private network.\n"
            f"❗ Your Coder administrator has blocked direct connections\n   {URL}#disabled-deployment-wide\n"
            "\n"
            "Possible client-side issues with direct connection:\n\n"
            " - Network interface wg0 has MTU 1280 (less than 1378), which may degrade the quality of direct "
            f"connections or render them unusable.\n{URL}#low-mtu\n\n"
            f" - Client could not connect to STUN over UDP\n   {URL}#udp-blocked\n\n"
            " - Client is potentially behind a hard NAT, as multiple endpoints were retrieved from different STUN "
            f"servers\n  {URL}#endpoint-dependent-nat-hard-nat\n\n"
            f" - Client IP address is within an AWS range (AWS uses hard NAT)\n   {URL}#endpoint-dependent-nat-hard-nat\n\n"
            "Possible agent-side issues with direct connections:\n\n"
            " - Agent is potentially behind a hard NAT, as multiple endpoints were retrieved from different STUN "
            f"servers\n   {URL}#endpoint-dependent-nat-hard-nat\n\n"
            f" - Agent could not connect to STUN over UDP\n   {URL}#udp-blocked\n\n"
            f" - Agent IP address is within an AWS range (AWS uses hard NAT)\n   {URL}#endpoint-dependent-nat-hard-nat\n\n"))

    def test_conn_diagnostics_short_circuits(self):
        # A p2p ping without -v: only MTU warnings.
        out = ConnDiags(troubleshooting_url=URL, ping_p2p=True, local_netinfo={"UDP": False},
                        derp_map_has_stun=False).render()
        self.assertEqual(out, "\n")
        # Direct disabled locally without -v: that line only.
        out = ConnDiags(troubleshooting_url=URL, disable_direct=True, derp_map_has_stun=False).render()
        self.assertTrue(out.startswith("\n❗ Direct connections are disabled locally"))
        self.assertNotIn("STUN", out)
        # No STUN in the DERP map replaces the UDP check.
        out = ConnDiags(troubleshooting_url=URL, derp_map_has_stun=False, local_netinfo={"UDP": False}).render()
        self.assertEqual(out, f"\n❗ The DERP map is not configured to use STUN\n   {URL}#no-stun-servers\n\n")


class SummaryTests(unittest.TestCase):
    def test_table_and_json(self):
        s = PingSummary("dev")
        for v in (0.25, None, 0.5, 0.75):  # binary-exact, so no float residue
            s.add(v)
        table = s.table()
        lines = table.split("\n")
        self.assertEqual(lines[1], "WORKSPACE  TOTAL  SUCCESSFUL  MIN    AVG    MAX    VARIANCE")
        self.assertEqual(lines[0], "-" * len(lines[1]))
        self.assertEqual(lines[2], "dev        4      3           250ms  500ms  750ms  62.5ms")
        doc = json.loads(pingfmt.ping_json("dev", [pingfmt.pong_json(1, "2026-11-22T18:00:00Z", 0.25, True)], s))
        self.assertEqual(doc["summary"], {"total": 4, "successful": 3, "min_ms": 250, "avg_ms": 500, "max_ms": 750,
                                          "variance_ms": 62.5})
        self.assertEqual(doc["pongs"], [{"sequence": 1, "time": "2026-11-22T18:00:00Z", "latency_ms": 250, "direct": True}])
        self.assertEqual(pingfmt.ping_json("dev", [], PingSummary("dev")),
                         '{\n  "workspace": "dev",\n  "pongs": null,\n  "summary": {\n    "total": 0,\n'
                         '    "successful": 0\n  }\n}\n')

    def test_single_pong_has_no_variance(self):
        s = PingSummary("dev")
        s.add(0.005)
        self.assertTrue(s.table().split("\n")[2].endswith("5ms  5ms  5ms"))
        self.assertNotIn("variance_ms", s.json_summary())

    @given(st.lists(st.floats(min_value=0.0001, max_value=5.0), min_size=2, max_size=50))
    def test_welford_equals_sample_variance(self, values):
        s = PingSummary("w")
        for v in values:
            s.add(v)
        self.assertAlmostEqual(s.variance, statistics.variance(values), delta=1e-9)
        self.assertAlmostEqual(s.avg, statistics.mean(values), delta=1e-9)

    def test_quality_warnings(self):
        good = PingSummary("dev")
        for _ in range(200):
            good.add(0.050)
        good.add(None)  # 1 of 201 lost: under 0.5%
        self.assertEqual(pingfmt.quality_warnings(good), [])
        bad = PingSummary("dev")
        for v in (0.5, 0.45, None):
            bad.add(v)
        self.assertEqual(pingfmt.quality_warnings(bad), [
            "❗ Average round-trip time 475ms is above the 400ms that a good connection to a workspace needs",
            "❗ 1 of 3 pings were lost (33.3%), above the 0.5% that a good connection to a workspace tolerates"])


class SpeedtestFmtTests(unittest.TestCase):
    def result(self):
        return Result(intervals=[(0.0, 1.0, 78_842_550), (1.0, 2.0, 125_000_000), (2.0, 2.5, 10_000_000)],
                      total=(0.0, 2.5, 213_842_550))

    def test_table_exact(self):
        self.assertEqual(speedtestfmt.table(self.result()), (
            "INTERVAL       THROUGHPUT\n"
            "0.00-1.00 sec  630.7404 Mbits/sec\n"
            "1.00-2.00 sec  1000.0000 Mbits/sec\n"
            "2.00-2.50 sec  160.0000 Mbits/sec\n"
            "----------------------------------\n"
            "0.00-2.50 sec  684.2962 Mbits/sec\n"))

    def test_json(self):
        doc = json.loads(speedtestfmt.to_json(self.result()))
        self.assertEqual(doc["overall"], {"start_time_seconds": 0, "end_time_seconds": 2.5,
                                          "throughput_mbits": 684.296160})
        self.assertEqual(len(doc["intervals"]), 3)
        self.assertEqual(doc["intervals"][1]["throughput_mbits"], 1000)

    def test_stderr_lines(self):
        self.assertEqual(speedtestfmt.starting_line(5.0, "down"), "Starting a 5s download test...")
        self.assertEqual(speedtestfmt.starting_line(10.0, "up"), "Starting a 10s upload test...")
        self.assertEqual(speedtestfmt.path_line(0.0291, "coder"), "29ms via coder")
        self.assertEqual(speedtestfmt.waiting_line(0.0291, "coder"), "Waiting for a direct connection... (29ms via coder)")
