"""Floods against a real server process: per-user caps on coordinator peers and DERP connections
refuse clearly (429 naming the limit, counted on /metrics) while /healthz and another user's
``coderstack ping`` keep working; and a reconnecting agent with 100 LOST peers of 64 endpoints
each gets every one of them (split across messages under the websocket's limit)."""

from __future__ import annotations

from datetime import UTC, datetime

import treq
from twisted.internet import reactor
from twisted.trial import unittest

from coderstack.coordinator.client import open_coordination
from coderstack.sdk import Client
from coderstack.wire.coordination import CoordinateRequest, address_from_uuid
from tests.hostile.live import RawPeer, healthz, metrics
from tests.support.processes import Deployment
from tests.support.waiting import wait_until


class Base(unittest.TestCase):
    timeout = 240
    server_args: tuple[str, ...] = ()

    async def setUp(self) -> None:
        d = self.d = Deployment(self, *self.server_args)
        await d.start_server()
        self.alice = d.user("alice")
        await self.alice.login_first("alice")
        await self.alice.ok("users", "create", "--username", "bob", "--email", "bob@example.com",
                            "--password", "bob password")
        self.bob = d.user("bob")
        await self.bob.login("bob")
        self.owner = Client(reactor, d.url, self.alice.session_token())
        self.addCleanup(self.owner.close)
        self.bob_api = Client(reactor, d.url, self.bob.session_token())
        self.addCleanup(self.bob_api.close)


class CapsTests(Base):
    server_args = ("--coordinator-peers-per-user", "3", "--derp-connections-per-user", "4")

    async def test_over_the_caps_is_refused_and_others_keep_working(self) -> None:
        alice_token = await self.alice.create("box")
        alice_agent = self.d.start_agent(alice_token, "alice-agent")
        bob_token = await self.bob.create("dev")
        bob_agent = self.d.start_agent(bob_token, "bob-agent")
        ws = await self.bob.wait_status("dev", "connected", watch=[bob_agent])
        await self.alice.wait_status("box", "connected", watch=[alice_agent])
        agent_id = ws["agents"][0]["id"]
        # Two peers with two DERP connections each: bob is at both caps (3 peers would be
        # allowed, 4 DERP connections are).
        held = []
        for _ in range(2):
            peer = RawPeer(self, self.d.url, self.bob_api.token, agent_id)
            await peer.open()
            held.append(peer)
        # A third peer's coordinator is fine; its DERP connections are over the cap.
        third = RawPeer(self, self.d.url, self.bob_api.token, agent_id)
        await third.open_coordinator()
        third.start_derp(await third.region())
        await wait_until(lambda: all("429" in dc.last_error for dc, _ in third.derps), "DERP refusals")
        # The refusal's body names the limit.
        resp = await treq.get(f"{self.d.url}/derp", persistent=False, headers={
            "Upgrade": "DERP", "Connection": "Upgrade", "Coder-Session-Token": self.bob_api.token})
        self.assertEqual(resp.code, 429)
        self.assertIn("the limit is 4", (await resp.json())["detail"])
        # A fourth coordinator peer is over that cap: 429 before the upgrade, naming it.
        fourth = RawPeer(self, self.d.url, self.bob_api.token, agent_id)
        with self.assertRaises(ConnectionError) as refused:
            await fourth.open_coordinator()
        self.assertIn("429", str(refused.exception))
        got = await metrics(self.d.url, self.owner.token)
        self.assertGreaterEqual(got['coderstack_derp_connections_refused_total{reason="per_user_limit"}'], 2)
        # agents + bob's + the server's own tailnet
        self.assertEqual(got['coderstack_coordinator_peers{status="connected"}'], 2 + 3 + 1)
        # Nothing else is affected.
        self.assertEqual(await healthz(self.d.url), 200)
        out = await self.alice.ok("ping", "box", "-n", "2", "--wait", "200ms")
        self.assertIn("pong from box", out)
        self.assertTrue(all(not p.coord.closed.called for p in held))


def big_node(peer_id, n: int) -> dict:
    addr = f"{address_from_uuid(peer_id)}/128"
    return {"id": n, "as_of": datetime.now(UTC).isoformat(), "key": "nodekey:" + peer_id.bytes.hex() * 2,
            "disco": "discokey:" + peer_id.bytes.hex()[::-1] * 2, "preferred_derp": 999,
            "addresses": [addr], "allowed_ips": [addr],
            "endpoints": [f"[2001:db8:{n:x}::{i:x}]:{40000 + i}" for i in range(64)]}


class ManyLostPeersTests(Base):
    async def test_a_reconnecting_agent_gets_100_lost_peers_with_64_endpoints(self) -> None:
        token = await self.bob.create("big")
        ws = await self.bob.show("big")
        agent_id = ws["agents"][0]["id"]
        agent_api = Client(reactor, self.d.url, token)
        self.addCleanup(agent_api.close)
        peers = []
        for n in range(100):
            peer = RawPeer(self, self.d.url, self.bob_api.token, agent_id)
            await peer.open_coordinator(big_node(peer.peer_id, n + 1))
            peers.append(peer)
        async def clients_with_nodes(status: str) -> int:
            got = await self.owner.get("/api/v2/debug/coordinator")
            return sum(p["kind"] == "client" and p["status"] == status and p["node"] is not None
                       for p in got["peers"])

        async def connected() -> bool:
            return await clients_with_nodes("connected") == 100

        async def lost() -> bool:
            return await clients_with_nodes("lost") == 100

        # Every node is in before the websockets drop (an abort discards unsent requests).
        await wait_until(connected, "100 peers with nodes")
        for peer in peers:
            peer.coord.proto.transport.abortConnection()
        await wait_until(lost, "100 LOST peers")
        # The agent connects (as after a restart): it must learn every peer.
        responses = []
        factory = await open_coordination(agent_api, "/api/v2/workspaceagents/me/coordinate", responses.append)
        self.addCleanup(lambda: factory.closed)
        self.addCleanup(lambda: factory.proto.sendClose() if not factory.closed.called else None)
        want = {str(p.peer_id) for p in peers}

        def learned(kind: str) -> set[str]:
            return {str(u.id) for r in responses for u in r.peer_updates if str(u.kind) == kind}

        await wait_until(lambda: learned("NODE") == want and learned("LOST") == want, "every peer's node")
        self.assertGreater(len(responses), 1)
        sizes = [len(r.to_text()) for r in responses]
        self.assertGreater(sum(sizes), 256 * 1024)
        self.assertLess(max(sizes), 256 * 1024)
        factory.proto.send_request(CoordinateRequest.from_json({"disconnect": {}}))
        self.assertEqual(await healthz(self.d.url), 200)
