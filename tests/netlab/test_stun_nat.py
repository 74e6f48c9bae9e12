"""STUN and netcheck through NATs built from network namespaces (needs root; CI runs as root).

Behind MASQUERADE the client learns the NAT's public address; behind MASQUERADE --random-fully
two STUN servers see different mappings (hard NAT), and so do the two ports of the server's own
STUN with its default options and no other STUN server; with UDP dropped on the NAT netcheck says
``UDP: false`` and still measures relay latency over HTTPS/HTTP.
"""

from __future__ import annotations

import json
import os

from twisted.trial import unittest

from tests.netlab.stun_lab import NAT_PUBLIC_IP, SERVER_IPS, NATLab, available

DERP_MAP = json.dumps({"Regions": {
    "1": {"RegionID": 1, "RegionCode": "one", "RegionName": "One (HTTPS)",
          "Nodes": [{"Name": "1a", "RegionID": 1, "HostName": SERVER_IPS[0], "IPv4": SERVER_IPS[0],
                     "DERPPort": 8443, "InsecureForTests": True}]},
    "2": {"RegionID": 2, "RegionCode": "two", "RegionName": "Two (HTTP)",
          "Nodes": [{"Name": "2a", "RegionID": 2, "HostName": SERVER_IPS[1], "IPv4": SERVER_IPS[1],
                     "DERPPort": 8080, "ForceHTTP": True}]},
}})


class STUNThroughNATTests(unittest.TestCase):
    def lab(self, **kw) -> NATLab:
        why = available()
        if why:
            raise unittest.SkipTest(why)
        lab = NATLab(**kw)
        self.addCleanup(lab.cleanup)
        lab.start_servers()
        return lab

    def test_client_learns_the_nat_public_address(self) -> None:
        lab = self.lab(nat="easy")
        out = json.loads(lab.run_client("query", SERVER_IPS[0], "3478"))
        self.assertEqual(out["mapped"][0], NAT_PUBLIC_IP)
        # Plain MASQUERADE keeps the source port when it can.
        self.assertEqual(out["mapped"][1], out["local"][1])
        report = json.loads(lab.run_client("netcheck", DERP_MAP))
        self.assertTrue(report["UDP"], report)
        self.assertTrue(report["GlobalV4"].startswith(NAT_PUBLIC_IP + ":"), report)
        self.assertIs(report["MappingVariesByDestIP"], False, report)
        self.assertEqual(sorted(report["RegionLatency"]), ["1", "2"])
        self.assertIn(report["PreferredDERP"], (1, 2))

    def test_hard_nat_mapping_varies(self) -> None:
        lab = self.lab(nat="hard")
        report = json.loads(lab.run_client("netcheck", DERP_MAP))
        self.assertTrue(report["UDP"], report)
        self.assertTrue(report["GlobalV4"].startswith(NAT_PUBLIC_IP + ":"), report)
        self.assertIs(report["MappingVariesByDestIP"], True, report)
        mapped = {tuple(p[4]) for p in report["probes"] if p[4]}
        self.assertGreaterEqual(len(mapped), 2, report["probes"])

    def embedded_only(self, nat: str) -> dict:
        """netcheck against the server's default STUN alone (its DERP map, no other server)."""
        why = available()
        if why:
            raise unittest.SkipTest(why)
        lab = NATLab(nat=nat)
        self.addCleanup(lab.cleanup)
        data = self.mktemp()
        os.makedirs(data)
        derp_map = lab.start_embedded_stun(data)
        region = json.loads(derp_map)["Regions"]["999"]
        self.assertEqual([(n["Name"], n.get("STUNPort")) for n in region["Nodes"]],
                         [("999b", 3478), ("999stun1", 3479)])
        report = json.loads(lab.run_client("netcheck", derp_map))
        self.assertTrue(report["UDP"], report)
        self.assertEqual({(p[1], p[2]) for p in report["probes"] if p[3] is not None},
                         {("999b", 4), ("999stun1", 4)}, report["probes"])
        return report

    def test_hard_nat_told_by_the_embedded_stun_alone(self) -> None:
        report = self.embedded_only("hard")
        self.assertIs(report["MappingVariesByDestIP"], True, report)

    def test_easy_nat_told_by_the_embedded_stun_alone(self) -> None:
        report = self.embedded_only("easy")
        self.assertIs(report["MappingVariesByDestIP"], False, report)
        self.assertTrue(report["GlobalV4"].startswith(NAT_PUBLIC_IP + ":"), report)

    def test_udp_blocked_falls_back_to_https(self) -> None:
        lab = self.lab(nat="easy", block_udp=True)
        report = json.loads(lab.run_client("netcheck", DERP_MAP))
        self.assertIs(report["UDP"], False, report)
        self.assertEqual(report["GlobalV4"], "")
        self.assertIsNone(report["MappingVariesByDestIP"])
        # Latency over HTTPS (region 1, self-signed, InsecureForTests) and HTTP (region 2).
        self.assertEqual(sorted(report["RegionLatency"]), ["1", "2"], report)
        self.assertIn(report["PreferredDERP"], (1, 2))
        self.assertIn("UDP is blocked, trying HTTPS", report["logs"])
        # The captive-portal check ran against the ForceHTTP node and found none.
        self.assertIs(report["CaptivePortal"], False)
