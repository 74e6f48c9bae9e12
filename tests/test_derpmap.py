"""The DERP map: Tailscale JSON, Coder's server map construction, merge/validate errors."""

from __future__ import annotations

import json
import os

from twisted.internet import defer
from twisted.trial import unittest
from twisted.web.resource import Resource

from coderstack.derp.mapconfig import load_server_map
from coderstack.derpmap import (
    DERPMap,
    DERPMapError,
    DERPNode,
    DERPRegion,
    build_server_map,
    embedded_region,
    merge_maps,
    rewrite_embedded,
    strip_stun,
    stun_regions,
)

# A copy of Tailscale's checked-in fallback map (12 regions), as shipped in /work/shared/data.
FALLBACK = os.path.join(os.path.dirname(__file__), "data", "tailscale-derpmap-fallback.json")

EXTRA = {
    "Regions": {
        "1": {"RegionID": 1, "RegionCode": "nyc", "RegionName": "New York City",
              "Nodes": [{"Name": "1f", "RegionID": 1, "HostName": "derp1f.example.com",
                         "IPv4": "192.0.2.1", "CanPort80": True}]},
        "900": {"RegionID": 900, "RegionCode": "own", "RegionName": "Own",
                "Nodes": [{"Name": "900a", "HostName": "relay.example.com", "STUNPort": -1}]},
    },
    "omitDefaultRegions": True,
}


class TailscaleShapeTests(unittest.TestCase):
    def test_fallback_map_parses(self) -> None:
        with open(FALLBACK, "rb") as f:
            m = DERPMap.loads(f.read())
        self.assertGreaterEqual(len(m.regions), 10)
        self.assertTrue(m.has_relay())
        r1 = m.region(1)
        self.assertEqual(r1.nodes[0].host_name, "derp1.tailscale.com")
        self.assertTrue(all(n.region_id == rid for rid, r in m.regions.items() for n in r.nodes))
        # Round trip through our writer keeps it equal.
        self.assertEqual(DERPMap.loads(m.dumps()), m)

    def test_node_region_id_filled_in(self) -> None:
        m = DERPMap.from_json(EXTRA)
        self.assertEqual(m.region(900).nodes[0].region_id, 900)
        self.assertTrue(m.omit_default_regions)


class BuildTests(unittest.TestCase):
    def test_embedded_region_https(self) -> None:
        r = embedded_region("https://coder.example.com")
        self.assertEqual(r.to_json(), {
            "RegionID": 999, "RegionCode": "coder", "RegionName": "Coder Embedded Relay",
            "EmbeddedRelay": True,
            "Nodes": [{"Name": "999b", "RegionID": 999, "HostName": "coder.example.com",
                       "STUNPort": -1, "DERPPort": 443}],
        })
        self.assertEqual(r.nodes[0].derp_url(), "https://coder.example.com/derp")

    def test_embedded_region_http_with_port_and_stun(self) -> None:
        r = embedded_region("http://127.0.0.1:3000", region_id=950, stun_port=3478)
        (n,) = r.nodes
        self.assertEqual((n.name, n.host_name, n.derp_port, n.force_http, n.stun_port),
                         ("950b", "127.0.0.1", 3000, True, 3478))
        self.assertEqual(n.derp_url(), "http://127.0.0.1:3000/derp")

    def test_embedded_region_with_a_second_stun_port(self) -> None:
        r = embedded_region("http://127.0.0.1:3000", stun_port=3478, alt_stun_ports=(3479,))
        self.assertEqual(r.to_json()["Nodes"], [
            {"Name": "999b", "RegionID": 999, "HostName": "127.0.0.1", "STUNPort": 3478,
             "DERPPort": 3000, "ForceHTTP": True},
            {"Name": "999stun1", "RegionID": 999, "HostName": "127.0.0.1", "STUNPort": 3479, "STUNOnly": True},
        ])
        self.assertEqual([n.name for n in r.derp_nodes], ["999b"])  # the relay is still one node
        self.assertEqual([n.name for n in r.stun_nodes], ["999b", "999stun1"])

    def test_server_map_advertises_every_embedded_stun_port(self) -> None:
        m = build_server_map("https://coder.example.com", embedded_stun_port=3478, embedded_stun_alt_ports=(3479,))
        self.assertEqual([(n.name, n.stun_port) for n in m.region(999).stun_nodes],
                         [("999b", 3478), ("999stun1", 3479)])
        self.assertEqual(DERPMap.loads(m.dumps()), m)
        # No STUN listener: no STUN nodes at all; blocked direct connections: none either.
        self.assertEqual(build_server_map("https://c.example.com", embedded_stun_alt_ports=(3479,))
                         .region(999).stun_nodes, ())
        blocked = build_server_map("https://c.example.com", embedded_stun_port=3478,
                                   embedded_stun_alt_ports=(3479,), block_direct=True)
        self.assertEqual([n.name for n in blocked.region(999).nodes], ["999b"])
        # An agent's access URL moves the STUN-only node's host too, and nothing else of it.
        n = rewrite_embedded(m, "http://10.0.0.5:7080").region(999).nodes[1]
        self.assertEqual((n.host_name, n.stun_port, n.derp_port, n.force_http), ("10.0.0.5", 3479, 0, False))

    def test_stun_regions(self) -> None:
        rs = stun_regions(["stun.l.google.com:19302", "[2001:db8::1]:3478"], 999)
        self.assertEqual([r.region_id for r in rs], [1000, 1001])
        self.assertEqual(rs[0].region_code, "coder_stun_1000")
        self.assertEqual(rs[0].region_name, "Coder STUN 1000")
        n = rs[1].nodes[0]
        self.assertEqual((n.name, n.host_name, n.stun_port, n.stun_only), ("1001stun0", "2001:db8::1", 3478, True))
        self.assertEqual(stun_regions(["disable"], 999), [])
        self.assertRaises(DERPMapError, stun_regions, ["no-port"], 999)

    def test_full_server_map(self) -> None:
        m = build_server_map(
            "https://coder.example.com:8443", stun_addresses=["stun.example.com:3478"],
            config_map=DERPMap.from_json(EXTRA), embedded_stun_port=3478,
        )
        self.assertEqual(m.region_ids(), [1, 900, 999, 1000])
        self.assertEqual(m.region(999).nodes[0].derp_port, 8443)
        self.assertEqual(m.region(999).nodes[0].stun_port, 3478)
        self.assertTrue(m.omit_default_regions)
        self.assertEqual(DERPMap.loads(m.dumps()), m)

    def test_block_direct_strips_stun(self) -> None:
        m = build_server_map("https://c.example.com", stun_addresses=["s.example.com:3478"],
                             embedded_stun_port=3478, config_map=DERPMap.from_json(EXTRA),
                             block_direct=True)
        self.assertEqual(m.region_ids(), [1, 900, 999])  # the STUN-only region is gone
        self.assertTrue(all(n.stun_port == -1 for r in m.regions.values() for n in r.nodes))
        self.assertEqual(m.region(1).stun_nodes, ())

    def test_rewrite_embedded(self) -> None:
        m = build_server_map("https://coder.example.com", config_map=DERPMap.from_json(EXTRA))
        r = rewrite_embedded(m, "http://10.0.0.5:7080")
        n = r.region(999).nodes[0]
        self.assertEqual((n.host_name, n.derp_port, n.force_http), ("10.0.0.5", 7080, True))
        self.assertEqual(r.region(1), m.region(1))  # other regions untouched
        self.assertEqual(m.region(999).nodes[0].host_name, "coder.example.com")


class ErrorTests(unittest.TestCase):
    def assertMapError(self, fragment: str, f, *a, **kw) -> None:
        with self.assertRaises(DERPMapError) as cm:
            f(*a, **kw)
        self.assertIn(fragment, str(cm.exception))

    def test_region_id_conflict(self) -> None:
        conflicting = DERPMap.from_json({"Regions": {"999": {
            "RegionID": 999, "RegionCode": "x", "Nodes": [{"Name": "x", "HostName": "x.example.com"}]}}})
        self.assertMapError(
            "DERP region ID 999 is used by both the embedded relay region (coder) and --derp-config-path m.json",
            build_server_map, "https://c.example.com", config_map=conflicting,
            config_source="--derp-config-path m.json",
        )

    def test_stun_region_conflicts_with_config(self) -> None:
        conflicting = DERPMap.from_json({"Regions": {"1000": {
            "RegionID": 1000, "Nodes": [{"Name": "y", "HostName": "y.example.com"}]}}})
        self.assertMapError("1000 is used by both STUN region coder_stun_1000", build_server_map,
                            "https://c.example.com", stun_addresses=["s:3478"], config_map=conflicting)

    def test_no_relay_node(self) -> None:
        stun_only = DERPMap.from_json({"Regions": {"5": {"RegionID": 5, "Nodes": [
            {"Name": "5s", "HostName": "s.example.com", "STUNOnly": True}]}}})
        self.assertMapError("has no relay node", build_server_map, "https://c.example.com",
                            derp_server_enable=False, config_map=stun_only)
        # ...and blocking direct connections strips such a map to nothing.
        self.assertMapError("has no relay node", build_server_map, "https://c.example.com",
                            derp_server_enable=False, config_map=stun_only, block_direct=True)

    def test_relay_disabled_without_map(self) -> None:
        self.assertMapError("--derp-server-enable=false needs another relay", build_server_map,
                            "https://c.example.com", derp_server_enable=False)

    def test_duplicate_node_names(self) -> None:
        dup = DERPMap.from_json({"Regions": {"5": {"RegionID": 5, "Nodes": [
            {"Name": "999b", "HostName": "s.example.com"}]}}})
        self.assertMapError("node name '999b'", build_server_map, "https://c.example.com", config_map=dup)

    def test_bad_access_url(self) -> None:
        self.assertMapError("must be an http", embedded_region, "ftp://x")

    def test_merge_names_both_sources(self) -> None:
        a = DERPMap({7: DERPRegion(7, "a", "A", (DERPNode("7a", 7, "a.example.com"),))})
        self.assertMapError("used by both one and two", merge_maps, ("one", a), ("two", a))

    def test_strip_stun_drops_empty_regions(self) -> None:
        m = DERPMap({5: DERPRegion(5, "s", "S", (DERPNode("5s", 5, "s", stun_only=True),))})
        self.assertEqual(strip_stun(m).regions, {})


class LoadTests(unittest.TestCase):
    def test_both_sources_refused(self) -> defer.Deferred:
        d = defer.ensureDeferred(load_server_map("https://c.example.com", config_url="https://x/map",
                                                 config_path="/tmp/map.json"))
        return self.assertFailure(d, DERPMapError).addCallback(
            lambda e: self.assertIn("cannot both be set", str(e)))

    def test_path(self) -> defer.Deferred:
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump(EXTRA, f)

        async def go() -> None:
            m = await load_server_map("https://c.example.com", config_path=path)
            self.assertEqual(m.region_ids(), [1, 900, 999])

        return defer.ensureDeferred(go())

    def test_path_errors_name_the_file(self) -> defer.Deferred:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("{not json")
        d = defer.ensureDeferred(load_server_map("https://c.example.com", config_path=path))
        return self.assertFailure(d, DERPMapError).addCallback(
            lambda e: self.assertIn(f"--derp-config-path {path}: DERP map: not valid JSON", str(e)))

    def test_url_via_stub_treq(self) -> defer.Deferred:
        from treq.testing import StubTreq

        class MapResource(Resource):
            isLeaf = True

            def render_GET(self, request):
                if request.path == b"/derpmap/default":
                    return json.dumps(EXTRA).encode()
                request.setResponseCode(404)
                return b"no"

        http = StubTreq(MapResource())

        async def go() -> None:
            m = await load_server_map("https://c.example.com", config_url="https://ctl/derpmap/default",
                                      http=http)
            self.assertEqual(m.region_ids(), [1, 900, 999])
            with self.assertRaises(DERPMapError) as cm:
                await load_server_map("https://c.example.com", config_url="https://ctl/missing", http=http)
            self.assertEqual(str(cm.exception), "--derp-config-url https://ctl/missing: HTTP 404")

        return defer.ensureDeferred(go())
