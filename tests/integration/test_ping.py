"""``coderstack ping`` against a real server and agent: Coder's lines, the honest path verdict."""

from __future__ import annotations

import json

from twisted.trial import unittest

from tests.support.processes import Deployment, connected_workspace


class PingTests(unittest.TestCase):
    timeout = 120

    async def workspace(self, *server_args: str):
        d, alice, _agent = await connected_workspace(self, *server_args)
        return d, alice

    async def test_goes_direct_and_says_so(self) -> None:
        d, alice = await self.workspace()
        code, out, err = await alice.run("ping", "box", "-n", "5", "--wait", "200ms")
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        pongs = [line for line in lines if line.startswith("pong from box ")]
        self.assertEqual(len(pongs), 5, out)
        # Coder's rule: the "established" line appears when the path turned p2p during the run;
        # a tunnel already direct at the first (silent, diagnostic) ping goes straight to p2p pongs.
        if not pongs[0].startswith("pong from box p2p"):
            self.assertIn("p2p connection established in ", out)
        self.assertRegex(pongs[-1], r"^pong from box p2p via [0-9.]+:\d+ in [0-9.]+(µs|ms|s)$")
        self.assertIn("✔ You are connected directly (p2p)", err)
        # The summary table: a dashed line, the header, one row.
        self.assertTrue(lines[-3].startswith("-----"), out)
        self.assertEqual(lines[-2].split(), ["WORKSPACE", "TOTAL", "SUCCESSFUL", "MIN", "AVG", "MAX", "VARIANCE"])
        self.assertEqual(lines[-1].split()[:3], ["box", "5", "5"])

    async def test_relayed_when_the_deployment_blocks_direct(self) -> None:
        d, alice = await self.workspace("--block-direct-connections", "true")
        code, out, err = await alice.run("ping", "box", "-n", "3", "--wait", "100ms", "--output", "json")
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual(doc["workspace"], "box")
        self.assertEqual([p["direct"] for p in doc["pongs"]], [False, False, False])
        self.assertEqual({p["derp_region"] for p in doc["pongs"]}, {"Coder Embedded Relay"})
        self.assertEqual(doc["summary"]["successful"], 3)
        self.assertIn("proxied via DERP(Coder Embedded Relay)", err)
        self.assertIn("❗ Your Coder administrator has blocked direct connections", err)
        self.assertIn("❗ You are connected via a DERP relay, not directly (p2p)", err)

    async def test_speedtest_both_directions(self) -> None:
        d, alice = await self.workspace()
        code, out, err = await alice.run("speedtest", "box", "-t", "1s")
        self.assertEqual(code, 0, err)
        self.assertIn("Starting a 1s download test...", err)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["INTERVAL", "THROUGHPUT"])
        self.assertRegex(lines[-1], r"^0\.00-\d+\.\d\d sec +\d+\.\d{4} Mbits/sec$")
        self.assertGreater(float(lines[-1].split()[2]), 1.0)
        code, out, err = await alice.run("speedtest", "box", "-t", "1s", "--direction", "up", "-o", "json")
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertGreater(doc["overall"]["throughput_mbits"], 1.0)
        self.assertIn("upload", err)

    async def test_bad_flag_names_it(self) -> None:
        d = Deployment(self)
        alice = d.user("alice")
        code, out, err = await alice.run("ping", "box", "--wait", "soon")
        self.assertEqual(code, 2)
        self.assertIn("--wait", err)
