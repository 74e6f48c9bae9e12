"""The server's DERP relay is closed: tokens to connect, coordinator tunnels to relay.

A real server (makeService on 127.0.0.1:0), a real agent coordination websocket, a real client
coordination websocket with a tunnel, and real DERP clients logging in with node keys that match
the nodes the coordinator holds.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from typing import Any

from twisted.internet import reactor, task
from twisted.trial import unittest

from coderstack.coordinator.client import open_coordination
from coderstack.derp.client import DERPClient, DERPClientHandler
from coderstack.derpmap import DERPMap
from coderstack.sdk import Client
from coderstack.server.options import ServerOptions
from coderstack.server.relaypolicy import CoordinatorRelayPolicy, Principal
from coderstack.server.service import makeService
from coderstack.wire import derp as w
from coderstack.wire.coordination import CoordinateRequest, address_from_uuid
from tests.support.tempdirs import made_dir
from tests.support.waiting import wait_until


class Inbox(DERPClientHandler):
    def __init__(self) -> None:
        self.packets: list[tuple[bytes, bytes]] = []
        self.up = False
        self.reasons: list[str] = []

    def packet_received(self, src: bytes, data: bytes) -> None:
        self.packets.append((src, data))

    def connected(self, server_key: bytes, node: Any, websocket: bool) -> None:
        self.up = True

    def disconnected(self, reason: str) -> None:
        self.up = False
        self.reasons.append(reason)


def node(peer_id: uuid.UUID, key: bytes) -> dict[str, Any]:
    addr = f"{address_from_uuid(peer_id)}/128"
    return {
        "id": 1, "as_of": datetime.now(UTC).isoformat(), "key": "nodekey:" + key.hex(),
        "disco": "discokey:" + os.urandom(32).hex(), "preferred_derp": 999, "derp_latency": {},
        "derp_forced_websockets": {}, "addresses": [addr], "allowed_ips": [addr], "endpoints": [],
    }


class ClosedRelayTests(unittest.TestCase):
    async def start_server(self) -> str:
        """Start a server in-process; ``self.svc`` is its service."""
        opts = ServerOptions(environ={})
        data = made_dir(self)
        opts.parseOptions(["--http-address", "127.0.0.1:0", "--data-dir", data, "--stun-address", "disable"])
        svc = makeService(opts, reactor)
        svc.startService()
        self.addCleanup(svc.stopService)
        await svc.ready
        self.svc = svc
        return svc.config["access-url"]

    def client(self, url: str, token: str | None = None) -> Client:
        c = Client(reactor, url, token)
        self.addCleanup(c.close)
        return c

    def derp(self, region: Any, key: bytes, token: str) -> tuple[DERPClient, Inbox]:
        inbox = Inbox()
        dc = DERPClient(reactor, region, key, inbox, token=token)
        dc.start()
        self.addCleanup(dc.stop)
        return dc, inbox

    async def coordinate(self, api: Client, path: str, query: dict[str, str] | None = None) -> Any:
        got: list[Any] = []
        factory = await open_coordination(api, path, got.append, query)
        factory.updates = got

        def close() -> None:
            if factory.proto is not None:
                factory.proto.sendClose()

        # Cleanups run last-in first-out: close first, then wait for the close to finish.
        self.addCleanup(lambda: factory.closed)
        self.addCleanup(close)
        return factory

    async def test_tokens_and_tunnels_gate_the_relay(self) -> None:
        url = await self.start_server()
        anon = self.client(url)
        await anon.post("/api/v2/users/first", {"username": "alice", "email": "a@example.com", "password": "alice password"})
        alice = self.client(url, (await anon.post("/api/v2/users/login", {"email": "a@example.com", "password": "alice password"}))["session_token"])
        await alice.post("/api/v2/users", {"username": "bob", "email": "b@example.com", "password": "bobs password"})
        bob = self.client(url, (await anon.post("/api/v2/users/login", {"email": "b@example.com", "password": "bobs password"}))["session_token"])
        ws = await alice.post("/api/v2/users/me/workspaces", {"name": "dev"})
        agent_id = uuid.UUID(ws["agents"][0]["id"])
        agent_api = self.client(url, ws["agent_token"])
        region = DERPMap.from_json((await alice.connection_info(str(agent_id)))["derp_map"]).regions[999]

        agent_key, alice_key, bob_key = (w.generate_private_key() for _ in range(3))
        agent_pub, alice_pub, bob_pub = (w.public_key(k) for k in (agent_key, alice_key, bob_key))

        agent_coord = await self.coordinate(agent_api, "/api/v2/workspaceagents/me/coordinate")
        agent_coord.proto.send_request(CoordinateRequest.from_json({"update_self": {"node": node(agent_id, agent_pub)}}))
        alice_peer = uuid.uuid4()
        alice_coord = await self.coordinate(alice, f"/api/v2/workspaceagents/{agent_id}/coordinate", {"peer_id": str(alice_peer)})
        alice_coord.proto.send_request(CoordinateRequest.from_json({
            "update_self": {"node": node(alice_peer, alice_pub)}, "add_tunnel": {"id": str(agent_id)},
        }))
        # The agent hears of alice's node: the tunnel exists.
        await wait_until(lambda: any(u.to_json()["peer_updates"] for u in agent_coord.updates), "the agent to hear of alice's node")

        # Bob may not even coordinate with alice's agent.
        with self.assertRaises(ConnectionError) as refused:
            await self.coordinate(bob, f"/api/v2/workspaceagents/{agent_id}/coordinate")
        self.assertIn("404", str(refused.exception))

        agent_derp, agent_inbox = self.derp(region, agent_key, ws["agent_token"])
        alice_derp, alice_inbox = self.derp(region, alice_key, alice.token)
        bob_derp, bob_inbox = self.derp(region, bob_key, bob.token)
        nobody_derp, nobody_inbox = self.derp(region, w.generate_private_key(), "")
        await wait_until(lambda: agent_inbox.up and alice_inbox.up and bob_inbox.up, "the three DERP logins")

        alice_derp.send(agent_pub, b"hello agent")
        await wait_until(lambda: agent_inbox.packets, "alice's packet at the agent")
        self.assertEqual(agent_inbox.packets, [(alice_pub, b"hello agent")])
        agent_derp.send(alice_pub, b"hello alice")
        await wait_until(lambda: alice_inbox.packets, "the agent's packet at alice")
        self.assertEqual(alice_inbox.packets, [(agent_pub, b"hello alice")])

        # Bob is logged in to the relay but shares no tunnel: dropped, counted, never delivered.
        bob_derp.send(agent_pub, b"let me in")
        bob_derp.send(alice_pub, b"or you")
        alice_derp.send(agent_pub, b"marker")
        await wait_until(lambda: len(agent_inbox.packets) == 2, "the marker at the agent")
        self.assertEqual(agent_inbox.packets[-1], (alice_pub, b"marker"))
        self.assertEqual(len(alice_inbox.packets), 1)
        self.assertGreaterEqual(self.svc.deployment.relay.drops["unauthorized"], 2)

        # No token: refused before the upgrade.
        await wait_until(lambda: nobody_derp.last_error, "the tokenless DERP login to be refused")
        self.assertFalse(nobody_inbox.up)
        self.assertIn("401", str(nobody_derp.last_error))


class PolicyTests(unittest.SynchronousTestCase):
    def test_rules(self) -> None:
        from coderstack.coordinator.core import AgentAuth, ClientAuth, Coordinator

        coord = Coordinator(task.Clock())
        agent, other_agent, alice, bob = (uuid.uuid4() for _ in range(4))
        keys = {p: os.urandom(32) for p in (agent, other_agent, alice)}
        sent: list[Any] = []
        a = coord.connect(agent, "a", AgentAuth(agent), sent.append, lambda: None)
        a.handle(CoordinateRequest.from_json({"update_self": {"node": node(agent, keys[agent])}}))
        o = coord.connect(other_agent, "o", AgentAuth(other_agent), sent.append, lambda: None)
        o.handle(CoordinateRequest.from_json({"update_self": {"node": node(other_agent, keys[other_agent])}}))
        alice_user = uuid.uuid4()
        c = coord.connect(alice, "c", ClientAuth(agent_id=agent, user_id=alice_user), sent.append, lambda: None)
        c.handle(CoordinateRequest.from_json({"update_self": {"node": node(alice, keys[alice])}, "add_tunnel": {"id": str(agent)}}))

        policy = CoordinatorRelayPolicy(api=None, coordinator=coord)
        as_alice = Principal("user", alice_user)
        as_agent = Principal("agent", agent)
        self.assertTrue(policy.allows(as_alice, keys[alice], keys[agent]))
        self.assertTrue(policy.allows(as_agent, keys[agent], keys[alice]))
        # No tunnel between alice and the other agent.
        self.assertFalse(policy.allows(as_alice, keys[alice], keys[other_agent]))
        # A principal cannot send as a key it does not own.
        self.assertFalse(policy.allows(Principal("user", bob), keys[alice], keys[agent]))
        self.assertFalse(policy.allows(Principal("agent", other_agent), keys[agent], keys[alice]))
        # Unknown keys and non-principals never pass.
        self.assertFalse(policy.allows(as_alice, os.urandom(32), keys[agent]))
        self.assertFalse(policy.allows("alice", keys[alice], keys[agent]))
        # A LOST agent keeps its node and the tunnel keeps working; a removed tunnel does not.
        a.lost()
        self.assertTrue(policy.allows(as_alice, keys[alice], keys[agent]))
        c.handle(CoordinateRequest.from_json({"remove_tunnel": {"id": str(agent)}}))
        self.assertFalse(policy.allows(as_alice, keys[alice], keys[agent]))
