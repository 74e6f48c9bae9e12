"""Tunnels across server replicas: a client coordinated by one replica reaches an agent
coordinated by another (three real replicas on one PostgreSQL, HAProxy in front, the DERP mesh
between them), direct and relayed. Replicas killed under open sessions: test_replica_sessions."""

from __future__ import annotations

import json
from typing import Any

from twisted.trial import unittest

from tests.support import replicas
from tests.support.processes import CLIUser, Process
from tests.support.replicas import ReplicaSet


class ReplicaTunnelTests(unittest.TestCase):
    timeout = 240

    def setUp(self) -> None:
        why = replicas.available()
        if why is not None:
            raise unittest.SkipTest(why)

    async def workspace(self, *server_args: str) -> tuple[ReplicaSet, CLIUser, Process]:
        """Three replicas; alice on replica 2 owns "box", whose agent uses replica 0. Their
        DERP connections go through the load balancer (the access URL)."""
        rs = ReplicaSet(self, 3, *server_args)
        await rs.start()
        alice = rs.replicas[2].user("alice")
        await alice.login_first("alice")
        token = await alice.create("box")
        home = rs.replicas[0]
        agent = home.start_agent(token)
        await alice.wait_status("box", "connected", watch=[agent])
        return rs, alice, agent

    async def ping(self, alice: CLIUser, n: int = 3) -> dict[str, Any]:
        code, out, err = await alice.run("ping", "box", "-n", str(n), "--wait", "200ms", "--output", "json")
        self.assertEqual(code, 0, err)
        doc: dict[str, Any] = json.loads(out)
        self.assertEqual(doc["summary"]["successful"], n, out)
        return doc

    async def test_direct_across_replicas(self) -> None:
        rs, alice, agent = await self.workspace()
        doc = await self.ping(alice, 5)
        self.assertTrue(doc["pongs"][-1]["direct"], doc)

    async def test_relayed_across_replicas(self) -> None:
        rs, alice, agent = await self.workspace("--block-direct-connections", "true")
        doc = await self.ping(alice)
        self.assertEqual([p["direct"] for p in doc["pongs"]], [False, False, False])
