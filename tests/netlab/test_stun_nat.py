"""STUN and netcheck through NATs built from network namespaces (needs root; CI runs as root).

Behind MASQUERADE the client learns the NAT's public address; behind MASQUERADE --random-fully
two STUN servers see different mappings (hard NAT); with UDP dropped on the NAT netcheck says
``UDP: false`` and still measures relay latency over HTTPS/HTTP.
"""

from __future__ import annotations

import json

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
