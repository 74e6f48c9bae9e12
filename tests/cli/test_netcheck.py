"""``coderstack netcheck`` with a fake context whose API returns a DERP map pointing at loopback."""

from __future__ import annotations

import io
import json

from twisted.internet import defer, reactor
from twisted.trial import unittest

from coderstack.cli import netcheck
from coderstack.stun.server import listen_stun
from tests.tailnet.derp_endpoints import endpoints_site


class FakeAPI:
    def __init__(self, info) -> None:
        self.info = info

    async def connection_info(self):
        return self.info


class FakeCtx:
    def __init__(self, info) -> None:
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.api = FakeAPI(info)


class NetcheckCommandTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_prints_coder_shaped_json(self):
        stun = listen_stun(reactor, "127.0.0.1", 0)
        self.addCleanup(stun.stopListening)
        web = reactor.listenTCP(0, endpoints_site(), interface="127.0.0.1")
        self.addCleanup(web.stopListening)
        derp_map = {"Regions": {
            "999": {"RegionID": 999, "RegionCode": "coder", "RegionName": "Coder Embedded Relay",
                    "EmbeddedRelay": True,
                    "Nodes": [{"Name": "999b", "RegionID": 999, "HostName": "127.0.0.1",
                               "DERPPort": web.getHost().port, "STUNPort": -1,
                               "ForceHTTP": True}]},
            "1000": {"RegionID": 1000, "RegionCode": "coder_stun_1000",
                     "RegionName": "Coder STUN 1000",
                     "Nodes": [{"Name": "1000stun0", "RegionID": 1000, "HostName": "127.0.0.1",
                                "STUNPort": stun.getHost().port, "STUNOnly": True}]}}}
        ctx = FakeCtx({"derp_map": derp_map, "disable_direct_connections": False})
        opts = netcheck.Options()
        opts.parseOptions([])
        code = yield defer.ensureDeferred(netcheck.run(reactor, opts, ctx))
        self.assertEqual(code, 0)
        self.assertEqual(ctx.stderr.getvalue(),
                         "Gathering a network report. This may take a few seconds...\n")
        out = ctx.stdout.getvalue()
        self.assertTrue(out.startswith('{\n  "derp": {'))
        doc = json.loads(out)
        self.assertEqual(set(doc), {"derp", "interfaces"})
        nc = doc["derp"]["netcheck"]
        self.assertTrue(nc["UDP"])
        self.assertEqual(nc["PreferredDERP"], 999)
        self.assertEqual(sorted(nc["RegionLatency"]), ["1000", "999"])
        self.assertTrue(doc["derp"]["regions"]["1000"]["node_reports"][0]["stun"]["CanSTUN"])
        self.assertIn("lo", [i["name"] for i in doc["interfaces"]["interfaces"]])
        self.assertIn(doc["interfaces"]["severity"], ("ok", "warning"))

    @defer.inlineCallbacks
    def test_bad_derp_map(self):
        ctx = FakeCtx({"derp_map": {"Regions": {"1": {"RegionID": 2}}}})
        opts = netcheck.Options()
        opts.parseOptions([])
        code = yield defer.ensureDeferred(netcheck.run(reactor, opts, ctx))
        self.assertEqual(code, 1)
        self.assertIn("unusable DERP map", ctx.stderr.getvalue())
        self.assertEqual(ctx.stdout.getvalue(), "")
