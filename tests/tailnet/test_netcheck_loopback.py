"""netcheck over real sockets on 127.0.0.1: our STUN server, treq against the test endpoints."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest

from coderstack.derpmap import DERPMap
from coderstack.stun.client import open_stun_client
from coderstack.stun.server import listen_stun
from coderstack.tailnet.netcheck.checker import Netchecker, run_netcheck
from coderstack.tailnet.netcheck.httpget import TreqHTTP
from tests.tailnet.derp_endpoints import endpoints_site


def dead_udp_port() -> int:
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class LoopbackNetcheckTests(unittest.TestCase):
    def setUp(self) -> None:
        self.stun_port = listen_stun(reactor, "127.0.0.1", 0)
        self.addCleanup(self.stun_port.stopListening)
        self.http_port = reactor.listenTCP(0, endpoints_site(), interface="127.0.0.1")
        self.addCleanup(self.http_port.stopListening)

    def coder_map(self, stun_port: int) -> DERPMap:
        http = self.http_port.getHost().port
        return DERPMap.from_json({"Regions": {
            "999": {"RegionID": 999, "RegionCode": "coder", "RegionName": "Coder Embedded Relay",
                    "EmbeddedRelay": True,
                    "Nodes": [{"Name": "999b", "RegionID": 999, "HostName": "127.0.0.1",
                               "DERPPort": http, "STUNPort": -1, "ForceHTTP": True}]},
            "1000": {"RegionID": 1000, "RegionCode": "coder_stun_1000",
                     "RegionName": "Coder STUN 1000",
                     "Nodes": [{"Name": "1000stun0", "RegionID": 1000, "HostName": "127.0.0.1",
                                "STUNPort": stun_port, "STUNOnly": True}]},
        }})

    @defer.inlineCallbacks
    def test_udp_works(self):
        m = self.coder_map(self.stun_port.getHost().port)
        r = yield defer.ensureDeferred(run_netcheck(reactor, m, have_v6=False))
        self.assertTrue(r.udp)
        self.assertTrue(r.ipv4)
        self.assertTrue(r.global_v4.startswith("127.0.0.1:"))
        self.assertEqual(sorted(r.region_latency), [999, 1000])
        self.assertEqual(r.preferred_derp, 999)
        self.assertIsNone(r.mapping_varies_by_dest_ip)  # one STUN server only

    @defer.inlineCallbacks
    def test_udp_blocked_uses_http_latency_and_portal_check(self):
        http = self.http_port.getHost().port
        m = DERPMap.from_json({"Regions": {"1": {
            "RegionID": 1, "RegionCode": "one", "RegionName": "One",
            "Nodes": [{"Name": "1a", "RegionID": 1, "HostName": "127.0.0.1", "DERPPort": http,
                       "STUNPort": dead_udp_port(), "ForceHTTP": True}]}}})
        sock = open_stun_client(reactor, v4_interface="127.0.0.1")
        treq_http = TreqHTTP(reactor)
        self.addCleanup(treq_http.close)
        self.addCleanup(sock.close)
        checker = Netchecker(reactor, sock.client, treq_http, have_v6=False,
                             stun_probe_timeout=0.5, report_timeout=3.0)
        r = yield checker.get_report(m)
        self.assertFalse(r.udp)
        self.assertIn(1, r.region_latency)
        self.assertEqual(r.preferred_derp, 1)
        self.assertIs(r.captive_portal, False)
        self.assertIn("UDP is blocked, trying HTTPS", r.logs)


class LoopbackTLSTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_https_latency_check_insecure_for_tests(self):
        from tests.tailnet.derp_endpoints import self_signed_tls

        web = reactor.listenSSL(0, endpoints_site(), self_signed_tls(), interface="127.0.0.1")
        self.addCleanup(web.stopListening)
        m = DERPMap.from_json({"Regions": {"7": {
            "RegionID": 7, "RegionCode": "tls", "RegionName": "TLS",
            "Nodes": [{"Name": "7a", "RegionID": 7, "HostName": "127.0.0.1",
                       "DERPPort": web.getHost().port, "STUNPort": -1,
                       "InsecureForTests": True}]}}})
        http = TreqHTTP(reactor)
        self.addCleanup(http.close)
        sock = open_stun_client(reactor, v4_interface="127.0.0.1")
        self.addCleanup(sock.close)
        checker = Netchecker(reactor, sock.client, http, have_v6=False, report_timeout=3.0)
        r = yield checker.get_report(m)
        self.assertIn(7, r.region_latency, r.logs)
        self.assertEqual(r.preferred_derp, 7)

    @defer.inlineCallbacks
    def test_https_self_signed_refused_without_insecure(self):
        from tests.tailnet.derp_endpoints import self_signed_tls

        web = reactor.listenSSL(0, endpoints_site(), self_signed_tls(), interface="127.0.0.1")
        self.addCleanup(web.stopListening)
        m = DERPMap.from_json({"Regions": {"7": {
            "RegionID": 7, "RegionCode": "tls", "RegionName": "TLS",
            "Nodes": [{"Name": "7a", "RegionID": 7, "HostName": "127.0.0.1",
                       "DERPPort": web.getHost().port, "STUNPort": -1}]}}})
        http = TreqHTTP(reactor)
        self.addCleanup(http.close)
        sock = open_stun_client(reactor, v4_interface="127.0.0.1")
        self.addCleanup(sock.close)
        checker = Netchecker(reactor, sock.client, http, have_v6=False, report_timeout=3.0)
        r = yield checker.get_report(m)
        self.assertEqual(r.region_latency, {})
        self.assertEqual(r.preferred_derp, 0)
        self.assertTrue(any("latency check" in line for line in r.logs), r.logs)
        # Twisted logs the failed verification; that refusal is the point of this test.
        self.flushLoggedErrors()
