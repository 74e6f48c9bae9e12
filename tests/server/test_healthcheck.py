"""The health report against a real server in this process (real sockets on 127.0.0.1): every
check passing, each failure said in its own section without hiding the others, and the pure
section builders."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest

from coderstack.derpmap import DERPMap
from coderstack.server import health, healthcheck, healthws
from coderstack.tailnet.netcheck.health import RelayProbe, derp_health_report
from coderstack.tailnet.netcheck.report import Report
from tests.support.inprocess import CLI, start_server


class RealServerHealthTests(unittest.TestCase):
    timeout = 60

    async def setUp(self) -> None:
        self.svc, self.url = await start_server(self, "--stun-address", "127.0.0.1:0")
        self.cli = CLI(self)
        code, _, err = await self.cli("login", self.url, "--first-user-username", "admin",
                                      "--first-user-email", "admin@example.com",
                                      "--first-user-password", "correct horse")
        self.assertEqual(code, 0, err)
        self.token = self.cli.read_config("session") or ""
        self.reactor = reactor

    async def run_report(self, token: str | None = None) -> dict[str, Any]:
        return await healthcheck.run(self.reactor, self.svc.deployment, self.token if token is None else token)

    async def test_everything_answers(self) -> None:
        r = await self.run_report()
        self.assertTrue(r["healthy"], r)
        # Over 15 ms for a database round trip (a loaded machine) is a warning, nothing else is.
        for section in ("access_url", "websocket", "derp"):
            self.assertEqual(r[section]["severity"], "ok", r[section])
        self.assertIn(r["database"]["severity"], ("ok", "warning"))
        self.assertEqual(r["severity"], r["database"]["severity"])
        self.assertEqual((r["access_url"]["status_code"], r["access_url"]["healthz_response"]), (200, "OK"))
        self.assertTrue(r["database"]["reachable"])
        self.assertTrue(r["websocket"]["body"].startswith("health "))
        nodes = {n["node"]["Name"]: n for region in r["derp"]["regions"].values() for n in region["node_reports"]}
        relays = [n for n in nodes.values() if not n["node"].get("STUNOnly")]
        self.assertTrue(relays)
        for node in relays:
            self.assertTrue(node["can_exchange_messages"], node)
            self.assertTrue(node["round_trip_ping"], node)
        self.assertTrue(all(n["stun"]["CanSTUN"] for n in nodes.values() if n["stun"]["Enabled"]), nodes)

    async def test_a_wrong_access_url_fails_its_checks_only(self) -> None:
        d = self.svc.deployment
        assert d is not None
        d.access_url = "http://127.0.0.1:9"  # nothing listens on the discard port
        r = await self.run_report()
        self.assertEqual(r["severity"], "error")
        self.assertFalse(r["access_url"]["reachable"])
        self.assertIn("ConnectionRefused", r["access_url"]["error"])
        self.assertEqual(r["websocket"]["warnings"][0]["code"], health.CODE_WEBSOCKET_DIAL)
        self.assertTrue(r["database"]["reachable"])
        self.assertEqual(r["derp"]["severity"], "ok")  # the relay's own address still answers

    async def test_a_refused_relay_login_is_the_nodes_error(self) -> None:
        r = await self.run_report(token="not-a-session")
        self.assertEqual(r["derp"]["severity"], "error")
        node = next(n for region in r["derp"]["regions"].values() for n in region["node_reports"]
                    if not n["node"].get("STUNOnly"))
        self.assertFalse(node["can_exchange_messages"])
        self.assertTrue(node["client_errs"], node)
        # The websocket echo wants an owner too.
        self.assertEqual(r["websocket"]["severity"], "error")

    async def test_the_echo_endpoint_echoes(self) -> None:
        got = await healthws.echo_through(self.reactor, self.url, self.token, "hello ✓", 10)
        self.assertEqual(got, "hello ✓")


class SectionTests(unittest.TestCase):
    def test_database_over_the_threshold_is_a_warning(self) -> None:
        self.assertEqual(health.database_section(0.004, None)["severity"], "ok")
        slow = health.database_section(0.050, None)
        self.assertEqual((slow["severity"], slow["healthy"], slow["latency_ms"]), ("warning", True, 50))
        self.assertEqual(slow["warnings"][0]["code"], health.CODE_DATABASE_SLOW)
        down = health.database_section(None, "OperationalError: gone")
        self.assertEqual((down["severity"], down["reachable"]), ("error", False))

    def test_access_url_answers(self) -> None:
        bad = health.access_url_section("http://x", health.Fetched(502, "<html>", None))
        self.assertEqual((bad["severity"], bad["warnings"][0]["code"]), ("error", health.CODE_ACCESS_URL_NOT_OK))
        gone = health.access_url_section("http://x", health.Fetched(None, "", "DNSLookupError: x"))
        self.assertEqual((gone["reachable"], gone["error"]), (False, "DNSLookupError: x"))

    def test_websocket_echo_must_match(self) -> None:
        self.assertEqual(health.websocket_section("a", "a", None)["severity"], "ok")
        self.assertEqual(health.websocket_section("b", "a", None)["warnings"][0]["code"], health.CODE_WEBSOCKET_ECHO)

    def test_the_worst_section_decides(self) -> None:
        ok = health.database_section(0.001, None)
        warn = health.database_section(1.0, None)
        r = health.report(version="1", access_url=ok, database=warn, websocket=ok, derp={"severity": "ok"})
        self.assertEqual((r["severity"], r["healthy"]), ("warning", True))

    def test_relay_probes_decide_relay_nodes(self) -> None:
        derp_map = DERPMap.from_json({"Regions": {"1": {
            "RegionID": 1, "RegionCode": "a", "RegionName": "A",
            "Nodes": [{"Name": "1a", "RegionID": 1, "HostName": "a.example", "STUNPort": -1},
                      {"Name": "1b", "RegionID": 1, "HostName": "b.example", "STUNPort": -1}]}}})
        fine = RelayProbe(0.002, True, None)
        down = RelayProbe(None, False, "no login within 5 s: refused")
        one = derp_health_report(derp_map, Report(), relay={"1a": fine, "1b": down})
        region = one["regions"]["1"]
        self.assertEqual(region["severity"], "warning")  # one node of two
        a, b = region["node_reports"]
        self.assertEqual((a["can_exchange_messages"], a["round_trip_ping"], a["uses_websocket"]), (True, "2ms", True))
        self.assertEqual((b["severity"], b["error"], b["client_errs"]), ("error", down.error, [[down.error]]))
        both = derp_health_report(derp_map, Report(), relay={"1a": down, "1b": down})
        self.assertEqual((both["severity"], both["healthy"]), ("error", False))
        # Without probes (the CLI's netcheck) the exchange is not counted.
        self.assertEqual(derp_health_report(derp_map, Report())["severity"], "ok")
