"""netcheck: pure plan / home selection / assembly with plain data, then the driver on a fake
clock with a simulated network (STUN answered by our responder, HTTP by a fake)."""

from __future__ import annotations

import json

from twisted.internet import defer, task
from twisted.trial import unittest

from coderstack.derpmap import DERPMap, build_server_map
from coderstack.netinfo import Interface
from coderstack.stun.client import STUNClient
from coderstack.stun.server import STUNResponder
from coderstack.tailnet.netcheck.checker import Netchecker
from coderstack.tailnet.netcheck.health import (
    CODE_STUN_MAP_VARY_DEST,
    derp_health_report,
    interfaces_report,
)
from coderstack.tailnet.netcheck.home import ReportHistory, select_preferred_derp
from coderstack.tailnet.netcheck.plan import (
    REPORT_TIMEOUT,
    captive_portal_url,
    latency_check_url,
    make_probe_plan,
)
from coderstack.tailnet.netcheck.report import ProbeResult, Report, assemble_report


def region(rid, nodes, **extra):
    return {"RegionID": rid, "RegionCode": f"r{rid}", "RegionName": f"Region {rid}",
            "Nodes": nodes, **extra}


def node(name, rid, ip, **extra):
    return {"Name": name, "RegionID": rid, "HostName": f"{name}.example", "IPv4": ip, **extra}


# 1 and 2: relay + STUN; 999: Coder's embedded relay (no STUN, ForceHTTP);
# 1000: STUN-only; 5: never measured.
MAP = DERPMap.from_json({"Regions": {
    "1": region(1, [node("1a", 1, "198.51.100.1"), node("1b", 1, "198.51.100.2")]),
    "2": region(2, [node("2a", 2, "198.51.100.3")]),
    "5": region(5, [node("5a", 5, "198.51.100.5")], NoMeasureNoHome=True),
    "999": region(999, [{"Name": "999b", "RegionID": 999, "HostName": "coder.example",
                         "DERPPort": 3000, "STUNPort": -1, "ForceHTTP": True}],
                  EmbeddedRelay=True),
    "1000": region(1000, [node("1000stun0", 1000, "203.0.113.7", STUNOnly=True)]),
}})


class ProbePlanTests(unittest.TestCase):
    def test_initial_plan(self) -> None:
        plan = make_probe_plan(MAP, have_v4=True, have_v6=False)
        self.assertEqual(sorted(plan), ["region-1-v4", "region-1000-v4", "region-2-v4"])
        p1 = plan["region-1-v4"]
        self.assertEqual([(p.node, p.delay) for p in p1], [("1a", 0.0), ("1b", 0.1), ("1a", 0.2)])

    def test_initial_plan_v6_and_disabled_families(self) -> None:
        m = DERPMap.from_json({"Regions": {
            "1": region(1, [{"Name": "1a", "RegionID": 1, "HostName": "h", "IPv4": "none",
                             "IPv6": "2001:db8::1"}])}})
        plan = make_probe_plan(m, have_v4=True, have_v6=True)
        self.assertEqual(sorted(plan), ["region-1-v6"])

    def test_incremental_plan(self) -> None:
        m = DERPMap.from_json({"Regions": {str(i): region(i, [node(f"{i}a", i, f"192.0.2.{i}")])
                                           for i in range(1, 6)}})
        last = Report(region_latency={1: 0.050, 2: 0.010, 3: 0.020, 4: 0.030},
                      region_v4_latency={1: 0.050, 2: 0.010, 3: 0.020, 4: 0.030},
                      preferred_derp=1)
        plan = make_probe_plan(m, have_v4=True, have_v6=False, last=last)
        # Home first (4 tries), then the fastest (2 tries, being within the first two), then 1.
        self.assertEqual(sorted(plan), ["region-1-v4", "region-2-v4", "region-3-v4"])
        self.assertEqual(len(plan["region-1-v4"]), 4)
        self.assertEqual(len(plan["region-2-v4"]), 2)
        self.assertEqual(len(plan["region-3-v4"]), 1)
        # delay(k) = k * max(1.2 * prev, 200 ms) (+ k * 50 ms for k > 1); home prev = 50 ms.
        delays = [round(p.delay, 4) for p in plan["region-1-v4"]]
        self.assertEqual(delays, [0.0, 0.06, 0.22, 0.33])
        self.assertEqual([round(p.delay, 4) for p in plan["region-2-v4"]], [0.0, 0.012])

    def test_incremental_plan_default_retransmit_without_latency(self) -> None:
        m = DERPMap.from_json({"Regions": {"1": region(1, [node("1a", 1, "192.0.2.1")]),
                                           "2": region(2, [node("2a", 2, "192.0.2.2")])}})
        last = Report(region_latency={1: 0.01}, preferred_derp=0)
        plan = make_probe_plan(m, have_v4=True, last=last)
        self.assertEqual([p.delay for p in plan["region-2-v4"]], [0.0, 0.2])


class HomeRegionTests(unittest.TestCase):
    def pick(self, current, history=None, **kw):
        best = dict(current)
        for h in history or []:
            for k, v in h.items():
                best[k] = min(v, best.get(k, v))
        return select_preferred_derp(MAP, current, best, **kw)

    def test_lowest_latency_relay_region(self) -> None:
        # 1000 is STUN-only and 5 is NoMeasureNoHome: never home even when fastest.
        self.assertEqual(self.pick({1: 0.030, 2: 0.020, 1000: 0.001, 5: 0.0001}), 2)

    def test_nothing_measured(self) -> None:
        self.assertEqual(self.pick({}), 0)
        self.assertEqual(self.pick({1000: 0.01}), 0)

    def test_keep_old_home_within_10ms(self) -> None:
        self.assertEqual(self.pick({1: 0.040, 2: 0.031}, previous=1), 1)

    def test_keep_old_home_unless_one_and_a_half_times_better(self) -> None:
        # 100 ms -> 70 ms: 30 ms better but not below 2/3 of 100 ms: stay.
        self.assertEqual(self.pick({1: 0.100, 2: 0.070}, previous=1), 1)
        # 100 ms -> 60 ms: below 2/3: move.
        self.assertEqual(self.pick({1: 0.100, 2: 0.060}, previous=1), 2)

    def test_history_minimum_is_used(self) -> None:
        # Region 1 measured 20 ms a minute ago: still the best recent, even if 50 ms now.
        self.assertEqual(self.pick({1: 0.050, 2: 0.030}, history=[{1: 0.020}]), 1)

    def test_region_score(self) -> None:
        m = DERPMap.from_json({**MAP.to_json(), "HomeParams": {"RegionScore": {"2": 3.0}}})
        self.assertEqual(select_preferred_derp(m, {1: 0.030, 2: 0.020}, {1: 0.030, 2: 0.020}), 1)

    def test_old_home_inaccessible_moves(self) -> None:
        self.assertEqual(self.pick({2: 0.040}, previous=1, now=100.0), 2)

    def test_old_home_alive_by_frames_stays(self) -> None:
        # Not in this report (probe lost), but a DERP frame arrived 3 s ago.
        self.assertEqual(self.pick({2: 0.040}, previous=1, now=100.0,
                                   derp_frame_times={1: 97.0}), 1)
        # A frame 20 s ago is too old.
        self.assertEqual(self.pick({2: 0.040}, previous=1, now=100.0,
                                   derp_frame_times={1: 80.0}), 2)

    def test_nothing_measured_keeps_recent_home(self) -> None:
        self.assertEqual(self.pick({}, previous=1, now=100.0, derp_frame_times={1: 10.0}), 1)
        self.assertEqual(self.pick({}, previous=1, now=200.0, derp_frame_times={1: 10.0}), 0)

    def test_force_preferred(self) -> None:
        self.assertEqual(self.pick({1: 0.1, 2: 0.01}, force_preferred=1), 1)
        self.assertEqual(self.pick({2: 0.01}, force_preferred=1), 2)

    def test_history_window(self) -> None:
        h = ReportHistory()
        h.add(0.0, {1: 0.010})
        h.add(300.0, {1: 0.050})
        self.assertEqual(h.best_recent(), {1: 0.010})
        h.prune(305.0)
        self.assertEqual(h.best_recent(), {1: 0.010})
        h.prune(305.1)
        self.assertEqual(h.best_recent(), {1: 0.050})


class AssembleTests(unittest.TestCase):
    def test_easy_nat(self) -> None:
        pub = ("192.0.2.99", 40000)
        results = [
            ProbeResult(1, "1a", 4, 0.030, pub, ("198.51.100.1", 3478)),
            ProbeResult(2, "2a", 4, 0.020, pub, ("198.51.100.3", 3478)),
            ProbeResult(2, "2a", 6, 0.025, ("2001:db8::99", 40000), ("2001:db8::3", 3478)),
            ProbeResult(999, "999b", 0, 0.015),
        ]
        r = assemble_report(MAP, results)
        self.assertTrue(r.udp and r.ipv4 and r.ipv6)
        self.assertEqual(r.global_v4, "192.0.2.99:40000")
        self.assertEqual(r.global_v6, "[2001:db8::99]:40000")
        self.assertIs(r.mapping_varies_by_dest_ip, False)
        self.assertEqual(r.region_latency, {1: 0.030, 2: 0.020, 999: 0.015})
        self.assertEqual(r.region_v4_latency, {1: 0.030, 2: 0.020})
        self.assertEqual(r.region_v6_latency, {2: 0.025})
        self.assertEqual(r.preferred_derp, 999)

    def test_hard_nat(self) -> None:
        results = [
            ProbeResult(1, "1a", 4, 0.030, ("192.0.2.99", 40000), ("198.51.100.1", 3478)),
            ProbeResult(2, "2a", 4, 0.020, ("192.0.2.99", 51234), ("198.51.100.3", 3478)),
        ]
        self.assertIs(assemble_report(MAP, results).mapping_varies_by_dest_ip, True)

    def test_one_server_cannot_tell(self) -> None:
        results = [ProbeResult(1, "1a", 4, 0.030, ("192.0.2.99", 1), ("198.51.100.1", 3478)),
                   ProbeResult(1, "1a", 4, 0.031, ("192.0.2.99", 1), ("198.51.100.1", 3478))]
        self.assertIsNone(assemble_report(MAP, results).mapping_varies_by_dest_ip)

    def test_udp_blocked_https_latency(self) -> None:
        results = [ProbeResult(1, "1a", 4, error="STUNTimeout", server=("198.51.100.1", 3478)),
                   ProbeResult(1, "1a", 0, 0.040), ProbeResult(2, "2a", 0, 0.050)]
        r = assemble_report(MAP, results)
        self.assertFalse(r.udp)
        self.assertFalse(r.ipv4)
        self.assertTrue(r.ipv4_can_send)
        self.assertEqual(r.region_latency, {1: 0.040, 2: 0.050})
        self.assertEqual(r.preferred_derp, 1)

    def test_hysteresis_through_history(self) -> None:
        h = ReportHistory()
        r1 = assemble_report(MAP, [ProbeResult(1, "1a", 0, 0.030), ProbeResult(2, "2a", 0, 0.035)],
                             history=h, now=0.0)
        self.assertEqual(r1.preferred_derp, 1)
        r2 = assemble_report(MAP, [ProbeResult(1, "1a", 0, 0.038), ProbeResult(2, "2a", 0, 0.029)],
                             history=h, now=30.0, previous_preferred=1)
        self.assertEqual(r2.preferred_derp, 1)

    def test_json_shape(self) -> None:
        r = Report(udp=True, ipv4=True, region_latency={2: 0.0123456789}, preferred_derp=2,
                   global_v4="192.0.2.1:5")
        j = r.to_json()
        self.assertEqual(list(j), [
            "UDP", "IPv6", "IPv4", "IPv6CanSend", "IPv4CanSend", "OSHasIPv6", "ICMPv4",
            "MappingVariesByDestIP", "HairPinning", "UPnP", "PMP", "PCP", "PreferredDERP",
            "RegionLatency", "RegionV4Latency", "RegionV6Latency", "GlobalV4", "GlobalV6",
            "CaptivePortal"])
        self.assertEqual(j["RegionLatency"], {"2": 12345679})
        self.assertIsNone(j["MappingVariesByDestIP"])
        self.assertIn('"CaptivePortal": null', json.dumps(j))


class CoderShapeTests(unittest.TestCase):
    def test_derp_health_report(self) -> None:
        r = assemble_report(MAP, [
            ProbeResult(1, "1a", 4, 0.030, ("192.0.2.99", 1), ("198.51.100.1", 3478)),
            ProbeResult(2, "2a", 4, 0.020, ("192.0.2.99", 2), ("198.51.100.3", 3478)),
            ProbeResult(999, "999b", 0, 0.0015),
        ])
        d = derp_health_report(MAP, r)
        self.assertEqual(set(d), {"severity", "warnings", "dismissed", "healthy", "regions",
                                  "netcheck", "netcheck_logs"})
        self.assertEqual(d["warnings"][0]["code"], "ESTUN02")
        n999 = d["regions"]["999"]["node_reports"][0]
        self.assertEqual(n999["round_trip_ping"], "1.5ms")
        self.assertEqual(n999["round_trip_ping_ms"], 1)
        self.assertEqual(n999["stun"], {"Enabled": False, "CanSTUN": False, "Error": None})
        self.assertTrue(d["regions"]["1"]["node_reports"][0]["stun"]["CanSTUN"])
        self.assertEqual(d["regions"]["999"]["region"]["EmbeddedRelay"], True)
        self.assertEqual(d["netcheck"]["PreferredDERP"], 999)

    def test_no_stun_warning(self) -> None:
        r = assemble_report(MAP, [ProbeResult(1, "1a", 4, error="STUNTimeout"),
                                  ProbeResult(1, "1a", 0, 0.04)])
        d = derp_health_report(MAP, r)
        self.assertEqual([w["code"] for w in d["warnings"]], ["ESTUN01"])
        self.assertEqual(d["severity"], "warning")

    def test_interfaces_report(self) -> None:
        rep = interfaces_report([
            Interface("eth0", 1500, ("192.0.2.5/24", "fe80::1/64")),
            Interface("wg0", 1280, ("10.0.0.1/32",)),
            Interface("ll", 1000, ("fe80::2/64",)),  # link-local only: left out
            Interface("down", 1000, ("10.1.0.1/24",), up=False),
        ])
        self.assertEqual([i["name"] for i in rep["interfaces"]], ["eth0", "wg0"])
        self.assertEqual(rep["severity"], "warning")
        self.assertEqual(len(rep["warnings"]), 1)
        self.assertEqual(rep["warnings"][0]["code"], "EIF01")
        self.assertIn("wg0 has MTU 1280 (less than 1378)", rep["warnings"][0]["message"])

    def test_urls(self) -> None:
        n999 = MAP.region(999).nodes[0]
        self.assertEqual(latency_check_url(n999), "http://coder.example:3000/derp/latency-check")
        self.assertEqual(captive_portal_url(n999), "http://coder.example:3000/generate_204")
        n1 = MAP.region(1).nodes[0]
        self.assertEqual(latency_check_url(n1), "https://1a.example/derp/latency-check")
        self.assertIsNone(captive_portal_url(n1))
        p80 = DERPMap.from_json({"Regions": {"1": region(1, [node("x", 1, "192.0.2.8",
                                                                  CanPort80=True)])}})
        self.assertEqual(captive_portal_url(p80.region(1).nodes[0]), "http://192.0.2.8/generate_204")


# --- the driver, on a simulated network --------------------------------------------------------


class FakeNet:
    """STUN servers at given IPs with a round-trip time each; ``nat(dst) -> mapped addr``."""

    def __init__(self, clock, rtts, nat, udp_blocked=False) -> None:
        self.clock = clock
        self.rtts = rtts
        self.nat = nat
        self.udp_blocked = udp_blocked
        self.responder = STUNResponder()
        self.client = STUNClient(self.send, clock)
        self.sent = []

    def send(self, data, addr) -> None:
        self.sent.append(addr)
        if self.udp_blocked or addr[0] not in self.rtts:
            return
        reply = self.responder.handle(data, self.nat(addr), self.clock.seconds())
        self.clock.callLater(self.rtts[addr[0]], self.client.datagram_received, reply, addr)


class FakeHTTP:
    def __init__(self, clock, routes) -> None:
        self.clock = clock
        self.routes = routes  # url prefix -> (delay, status, headers function)
        self.calls = []

    def __call__(self, url, *, headers, timeout, insecure=False, follow_redirects=False):
        self.calls.append((url, dict(headers)))
        for prefix, (delay, status, hdrs) in self.routes.items():
            if url.startswith(prefix):
                d = defer.Deferred()
                self.clock.callLater(delay, d.callback, (status, hdrs(headers)))
                return d
        return defer.Deferred()  # never answers (cancelled at the deadline)


def drive(clock, d, step=0.001, limit=10.0):
    t = 0.0
    while not d.called and t < limit:
        clock.advance(step)
        t += step
    return t


EASY = lambda dst: ("192.0.2.99", 41000)  # noqa: E731


class DriverTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1000)

    def checker(self, net, http, **kw) -> Netchecker:
        return Netchecker(self.clock, net.client, http, have_v6=False, os_has_ipv6=True, **kw)

    def http_ok(self):
        return FakeHTTP(self.clock, {
            "http://coder.example:3000/derp/latency-check": (0.012, 200, lambda h: {}),
            "https://1a.example/derp/latency-check": (0.040, 200, lambda h: {}),
            "https://2a.example/derp/latency-check": (0.050, 200, lambda h: {}),
            "http://coder.example:3000/generate_204": (
                0.012, 204,
                lambda h: {"x-tailscale-response": "response " + h["X-Tailscale-Challenge"]}),
        })

    def test_udp_works(self) -> None:
        net = FakeNet(self.clock, {"198.51.100.1": 0.030, "198.51.100.2": 0.030,
                                   "198.51.100.3": 0.020, "203.0.113.7": 0.005}, EASY)
        http = self.http_ok()
        d = self.checker(net, http).get_report(MAP)
        elapsed = drive(self.clock, d)
        r = self.successResultOf(d)
        self.assertTrue(r.udp)
        self.assertEqual(r.global_v4, "192.0.2.99:41000")
        self.assertIs(r.mapping_varies_by_dest_ip, False)
        self.assertLess(abs(r.region_latency[2] - 0.020), 0.002)
        self.assertLess(abs(r.region_latency[1000] - 0.005), 0.002)
        # The embedded region (no STUN) was measured over HTTP: 2nd request's time.
        self.assertLess(abs(r.region_latency[999] - 0.012), 0.002)
        self.assertEqual(r.preferred_derp, 999)
        # Enough regions answered: did not wait for the 3 s STUN timeout.
        self.assertLess(elapsed, 1.0)
        # NoMeasureNoHome region 5 was never probed.
        self.assertNotIn(("198.51.100.5", 3478), net.sent)
        # UDP answered before 200 ms: no captive-portal check.
        self.assertIsNone(r.captive_portal)
        self.assertFalse(any("generate_204" in u for u, _ in http.calls))
        # Every timer and transaction of the run is gone.
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(net.client.pending, 0)

    def test_hard_nat(self) -> None:
        ports = {}

        def symmetric(dst):
            return ("192.0.2.99", ports.setdefault(dst, 50000 + len(ports)))

        net = FakeNet(self.clock, {"198.51.100.1": 0.03, "198.51.100.3": 0.02}, symmetric)
        d = self.checker(net, self.http_ok()).get_report(MAP)
        drive(self.clock, d)
        self.assertIs(self.successResultOf(d).mapping_varies_by_dest_ip, True)

    def test_udp_blocked_falls_back_to_https_and_checks_portal(self) -> None:
        net = FakeNet(self.clock, {}, EASY, udp_blocked=True)
        http = self.http_ok()
        d = self.checker(net, http).get_report(MAP)
        elapsed = drive(self.clock, d)
        r = self.successResultOf(d)
        self.assertFalse(r.udp)
        self.assertEqual(r.global_v4, "")
        self.assertLess(abs(r.region_latency[1] - 0.040), 0.002)
        self.assertLess(abs(r.region_latency[2] - 0.050), 0.002)
        self.assertNotIn(1000, r.region_latency)  # STUN-only: no HTTP endpoint
        self.assertIn("UDP is blocked, trying HTTPS", r.logs)
        self.assertIs(r.captive_portal, False)
        self.assertGreaterEqual(elapsed, 3.0)
        self.assertLessEqual(elapsed, REPORT_TIMEOUT + 0.01)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        h = derp_health_report(MAP, r)
        self.assertEqual([w["code"] for w in h["warnings"]], ["ESTUN01"])

    def test_captive_portal_detected(self) -> None:
        net = FakeNet(self.clock, {}, EASY, udp_blocked=True)
        http = FakeHTTP(self.clock, {"http://coder.example:3000/generate_204":
                                     (0.01, 302, lambda h: {"location": "http://portal/"})})
        d = self.checker(net, http).get_report(MAP)
        drive(self.clock, d)
        r = self.successResultOf(d)
        self.assertIs(r.captive_portal, True)
        url, headers = [c for c in http.calls if "generate_204" in c[0]][0]
        self.assertEqual(headers, {"X-Tailscale-Challenge": "ts_coder.example"})
        # Nothing answered the latency checks: the report still ends at 5 s.
        self.assertEqual(r.region_latency, {})

    def test_hysteresis_across_reports(self) -> None:
        rtts = {"198.51.100.1": 0.030, "198.51.100.2": 0.030, "198.51.100.3": 0.034}
        m = DERPMap.from_json({"Regions": {k: v for k, v in MAP.to_json()["Regions"].items()
                                           if k in ("1", "2")}})
        net = FakeNet(self.clock, rtts, EASY)
        checker = self.checker(net, self.http_ok(), captive_portal_check=False)
        d = checker.get_report(m)
        drive(self.clock, d)
        self.assertEqual(self.successResultOf(d).preferred_derp, 1)
        self.clock.advance(30)
        rtts["198.51.100.1"] = rtts["198.51.100.2"] = 0.041
        rtts["198.51.100.3"] = 0.032
        d = checker.get_report(m)
        drive(self.clock, d)
        # 2 is now faster than 1 now, but 1's recent best (30 ms) beats it anyway: stays.
        self.assertEqual(self.successResultOf(d).preferred_derp, 1)
        self.clock.advance(400)  # history expired; 2 is 9 ms better: < 10 ms, still stays
        d = checker.get_report(m)
        drive(self.clock, d)
        self.assertEqual(self.successResultOf(d).preferred_derp, 1)
        rtts["198.51.100.3"] = 0.010  # now much better: move
        self.clock.advance(400)
        d = checker.get_report(m)
        drive(self.clock, d)
        self.assertEqual(self.successResultOf(d).preferred_derp, 2)

    def test_not_reentrant(self) -> None:
        net = FakeNet(self.clock, {"198.51.100.3": 0.02}, EASY)
        checker = self.checker(net, self.http_ok())
        d1 = checker.get_report(MAP)
        self.failureResultOf(checker.get_report(MAP), RuntimeError)
        drive(self.clock, d1)
        self.successResultOf(d1)
        d3 = checker.get_report(MAP)
        drive(self.clock, d3)
        self.successResultOf(d3)

    def test_incremental_report_after_full(self) -> None:
        net = FakeNet(self.clock, {"198.51.100.1": 0.030, "198.51.100.2": 0.030,
                                   "198.51.100.3": 0.020, "203.0.113.7": 0.005}, EASY)
        checker = self.checker(net, self.http_ok())
        d = checker.get_report(MAP)
        drive(self.clock, d)
        first = len(net.sent)
        self.clock.advance(25)
        d = checker.get_report(MAP)  # within 5 min of the full one: incremental
        drive(self.clock, d)
        r = self.successResultOf(d)
        self.assertTrue(r.udp)
        self.assertEqual(r.preferred_derp, 999)
        # Incremental: at most 3 regions, fewer probes than the full report's.
        self.assertLessEqual(len(net.sent) - first, first)


# The server's default map: only the embedded region, its STUN server on two ports (the relay
# node's 3478 and a STUN-only node on 3479).
ONE_SERVER = build_server_map("http://192.0.2.10:3000", embedded_stun_port=3478, embedded_stun_alt_ports=(3479,))


class OneServerTwoPortsTests(unittest.TestCase):
    """Hard-NAT detection with the embedded STUN server alone: two ports, one region."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1000)

    def test_the_plan_probes_both_ports(self) -> None:
        plan = make_probe_plan(ONE_SERVER, have_v4=True)
        self.assertEqual([p.node for p in plan["region-999-v4"]], ["999b", "999stun1", "999b"])
        last = Report(region_latency={999: 0.004}, region_v4_latency={999: 0.004}, preferred_derp=999)
        incremental = make_probe_plan(ONE_SERVER, have_v4=True, last=last)
        self.assertEqual({p.node for p in incremental["region-999-v4"]}, {"999b", "999stun1"})

    def test_report_compares_the_two_ports(self) -> None:
        def results(second_port: int) -> list[ProbeResult]:
            return [ProbeResult(999, "999b", 4, 0.004, ("192.0.2.99", 40000), ("192.0.2.10", 3478)),
                    ProbeResult(999, "999stun1", 4, 0.005, ("192.0.2.99", second_port), ("192.0.2.10", 3479))]

        self.assertIs(assemble_report(ONE_SERVER, results(40000)).mapping_varies_by_dest_ip, False)
        self.assertIs(assemble_report(ONE_SERVER, results(51234)).mapping_varies_by_dest_ip, True)
        # The relay node's port alone cannot tell.
        self.assertIsNone(assemble_report(ONE_SERVER, results(40000)[:1]).mapping_varies_by_dest_ip)

    def report(self, nat) -> tuple[Report, list]:
        net = FakeNet(self.clock, {"192.0.2.10": 0.004}, nat)
        http = FakeHTTP(self.clock, {"http://192.0.2.10:3000/": (0.004, 204, lambda h: {})})
        d = Netchecker(self.clock, net.client, http, have_v6=False, os_has_ipv6=True).get_report(ONE_SERVER)
        drive(self.clock, d)
        return self.successResultOf(d), net.sent

    def test_a_fast_first_answer_does_not_end_the_set_before_the_second_port(self) -> None:
        # The first answer comes in 4 ms, long before the 100 ms probe to 3479 is due: the set
        # goes on because only that probe can tell whether the mapping varies.
        report, sent = self.report(EASY)
        self.assertIs(report.mapping_varies_by_dest_ip, False)
        self.assertEqual(sorted(set(sent)), [("192.0.2.10", 3478), ("192.0.2.10", 3479)])
        self.assertEqual(len(sent), 2)  # and then it stops: the third probe would add nothing

    def test_hard_nat_seen_through_two_ports(self) -> None:
        ports: dict = {}

        def per_destination(dst):
            return ("192.0.2.99", ports.setdefault(dst, 50000 + len(ports)))

        report, _sent = self.report(per_destination)
        self.assertIs(report.mapping_varies_by_dest_ip, True)
        health = derp_health_report(ONE_SERVER, report)
        self.assertIn(CODE_STUN_MAP_VARY_DEST, [w["code"] for w in health["warnings"]])
