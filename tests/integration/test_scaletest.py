"""``coderstack scaletest`` against a real server process: workspaces made through the API, their
agents simulated in one process, clients moving bytes to them direct and relayed, the summary's
figures (including the server's own from /metrics), and cleanup."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import sys

from twisted.trial import unittest

from tests.support.processes import Deployment, Process

AGENTS = 4


def udp_sockets(pid: int) -> int:
    """How many UDP sockets (IPv4 or IPv6) the process has open."""
    inodes = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as f:
            inodes |= {line.split()[9] for line in list(f)[1:]}
    fds = os.listdir(f"/proc/{pid}/fd")
    links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds if os.path.exists(f"/proc/{pid}/fd/{fd}")]
    return sum(1 for link in links if link.startswith("socket:[") and link[8:-1] in inodes)


class ScaletestTests(unittest.TestCase):
    timeout = 240

    async def test_agents_traffic_and_cleanup(self) -> None:
        d = Deployment(self)
        await d.start_server()
        alice = d.user("alice")
        await alice.login_first("alice")
        run_file = os.path.join(alice.home, "run.json")

        out = await alice.ok("scaletest", "create-workspaces", str(AGENTS), "--run-file", run_file)
        self.assertIn(f"{AGENTS} workspaces", out)
        self.assertEqual(stat.S_IMODE(os.stat(run_file).st_mode), 0o600)  # it holds agent tokens
        listed = json.loads(await alice.ok("list", "-o", "json"))
        self.assertEqual(len([w for w in listed if re.match(r"^scaletest-[0-9a-f]{6}-\d+$", w["name"])]), AGENTS)

        agents = Process(self, "scaletest-agents",
                         [sys.executable, "-m", "coderstack", "scaletest", "agents", "--run-file", run_file,
                          "--duration", "10m", "--announce-every", "500ms", "-o", "json"],
                         alice.cli_env(), alice.home)
        await agents.output_shows(f"{AGENTS} of {AGENTS} agents connected", timeout=60)
        shown = await alice.show(json.load(open(run_file))["agents"][0]["workspace"])
        self.assertEqual(shown["agents"][0]["status"], "connected")
        self.assertEqual(udp_sockets(agents.pid), 1)  # the agents share one socket

        direct = json.loads(await alice.ok("scaletest", "traffic", "--run-file", run_file, "--duration", "3s",
                                           "--bytes-per-tick", "1000", "--tick-interval", "50ms", "-o", "json"))
        self.assertEqual((direct["connected"], direct["errors"]), (AGENTS, {}), direct)
        self.assertEqual(direct["bytes_received"], direct["bytes_sent"])
        self.assertGreaterEqual(direct["bytes_sent"], AGENTS * 1000 * 50)  # 60 ticks each, most of them
        self.assertGreater(direct["latency"]["count"], AGENTS * 50)
        self.assertGreater(direct["fanout"]["count"], 0)  # the agents re-announce every 500 ms
        self.assertLess(direct["fanout"]["p50_ms"], 1000)
        self.assertEqual(direct["paths"], {"p2p": AGENTS})
        self.assertGreater(direct["generator_cpu_percent"], 0)
        # Every datagram the clients' shared socket read found its client.
        self.assertEqual({k: v for k, v in direct["socket_drops"].items() if k.endswith("unclaimed")}, {})
        server = direct["server"]
        self.assertGreater(server["rss_bytes"], 10 * 2**20)
        self.assertGreater(server["open_fds"], AGENTS * 2)
        self.assertIsNotNone(server["cpu_percent"])
        # The coordinator's own share of the fan-out, from its histogram on /metrics.
        self.assertIsNotNone(server["coordinator_fanout_p99_ms_at_most"])

        relayed = json.loads(await alice.ok("scaletest", "traffic", "--run-file", run_file, "--relay",
                                            "--connections", "6", "--duration", "2s", "-o", "json"))
        self.assertEqual((relayed["connected"], relayed["errors"]), (6, {}), relayed)
        self.assertEqual(relayed["paths"], {"derp": 6})  # two clients share an agent
        self.assertGreater(relayed["server"]["derp_packets_per_second"], 0)

        agents.signal(signal.SIGTERM)  # ends the run early, with its summary
        self.assertEqual(await agents.wait(timeout=60), 0, agents.log())
        held = json.loads(agents.log()[agents.log().index("{"):])
        self.assertEqual((held["connected"], held["errors"]), (AGENTS, {}), held)
        # (The agents' socket may drop what clients that have gone still send: peers they forgot.)
        self.assertEqual(held["connect"]["count"], AGENTS)

        out = await alice.ok("scaletest", "cleanup", "--run-file", run_file)
        self.assertIn(f"{AGENTS} scale-test workspaces deleted", out)
        self.assertFalse(os.path.exists(run_file))
        self.assertEqual(json.loads(await alice.ok("list", "-o", "json")), [])

    async def test_shards_split_agents_and_connections(self) -> None:
        """Two ``--shard`` processes run half the agents each; a traffic shard dials only its own
        half, and the two traffic shards together cover every agent once."""
        d = Deployment(self)
        await d.start_server()
        alice = d.user("alice")
        await alice.login_first("alice")
        run_file = os.path.join(alice.home, "run.json")
        await alice.ok("scaletest", "create-workspaces", str(AGENTS), "--run-file", run_file)
        shards = [Process(self, f"scaletest-agents-{i}",
                          [sys.executable, "-m", "coderstack", "scaletest", "agents", "--run-file", run_file,
                           "--shard", f"{i}/2", "--duration", "10m", "-o", "json"],
                          alice.cli_env(), alice.home)
                  for i in range(2)]
        for shard in shards:
            await shard.output_shows(f"{AGENTS // 2} of {AGENTS // 2} agents connected", timeout=60)
        for name in (e["workspace"] for e in json.load(open(run_file))["agents"]):
            self.assertEqual((await alice.show(name))["agents"][0]["status"], "connected", name)

        async def traffic(shard: int) -> dict:
            got = json.loads(await alice.ok("scaletest", "traffic", "--run-file", run_file, "--relay", "--shard",
                                            f"{shard}/2", "--duration", "1s", "-o", "json"))
            self.assertEqual((got["wanted"], got["connected"], got["errors"]), (AGENTS // 2, AGENTS // 2, {}), got)
            self.assertEqual(got["bytes_received"], got["bytes_sent"])
            return got

        for i in range(2):
            await traffic(i)
        for shard in reversed(shards):
            shard.signal(signal.SIGTERM)
            self.assertEqual(await shard.wait(timeout=60), 0, shard.log())
            held = json.loads(shard.log()[shard.log().index("{"):])
            self.assertEqual((held["wanted"], held["connected"], held["errors"]), (AGENTS // 2, AGENTS // 2, {}))
            if shard is shards[1]:
                await traffic(0)  # with the other half's agents gone, shard 0 still reaches all of its own

    async def test_a_missing_run_file_is_a_clear_error(self) -> None:
        d = Deployment(self)
        await d.start_server()
        alice = d.user("alice")
        await alice.login_first("alice")
        code, out, err = await alice.run("scaletest", "agents", "--run-file", os.path.join(alice.home, "none.json"))
        self.assertEqual(code, 1)
        self.assertIn("no run file at", err)
        self.assertIn("create-workspaces", err)
