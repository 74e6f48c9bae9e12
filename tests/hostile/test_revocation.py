"""Revocation against real processes: a logged-out, suspended or rotated token loses the
connections it opened (coordinator websocket, DERP over Upgrade: DERP and over a websocket)
within a second; the relay stops relaying for them; the coordinator's debug view drops them;
/healthz and another user's live ``coderstack ping`` keep working.

A server, two agents (bob's workspace ``dev``, alice's ``box``) and the CLI run as processes
(tests/support/processes.py); the revoked connections are held open from this process with
bob's tokens (tests/hostile/live.py).
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial import unittest

from coderstack.coordinator.websocket import CLOSE_KICKED
from coderstack.sdk import Client
from tests.hostile.live import RawPeer, coordinator_peers, healthz, metrics
from tests.support.processes import Deployment
from tests.support.waiting import seconds_until, wait_until

RELAYED = "coderstack_derp_packets_relayed_total"
RECEIVED = "coderstack_derp_packets_received_total"


class RevocationTests(unittest.TestCase):
    timeout = 180

    async def setUp(self) -> None:
        d = self.d = Deployment(self)
        await d.start_server()
        self.alice = d.user("alice")
        await self.alice.login_first("alice")
        await self.alice.ok("users", "create", "--username", "bob", "--email", "bob@example.com",
                            "--password", "bob password")
        self.bob = d.user("bob")
        await self.bob.login("bob")
        bob_token = await self.bob.create("dev")
        alice_token = await self.alice.create("box")
        self.bob_agent = d.start_agent(bob_token, "bob-agent")
        self.alice_agent = d.start_agent(alice_token, "alice-agent")
        ws = await self.bob.wait_status("dev", "connected", watch=[self.bob_agent])
        self.dev_agent_id = ws["agents"][0]["id"]
        await self.alice.wait_status("box", "connected", watch=[self.alice_agent])
        self.owner = Client(reactor, d.url, self.alice.session_token())
        self.addCleanup(self.owner.close)

    async def relayed(self) -> float:
        return (await metrics(self.d.url, self.owner.token))[RELAYED]

    async def open_bob_peer(self) -> RawPeer:
        """Bob's hand-held peer of his agent; proves the relay relays for it."""
        peer = RawPeer(self, self.d.url, self.bob.session_token(), self.dev_agent_id, backoff=0.5)
        await peer.open()
        before = await self.relayed()
        peer.send_packets(3)
        await wait_until(lambda: self.relayed_at_least(before + 6), "bob's packets to be relayed")
        self.assertIn(str(peer.peer_id), await coordinator_peers(self.owner))
        return peer

    async def relayed_at_least(self, n: float) -> bool:
        return await self.relayed() >= n

    async def assert_revoked(self, peer: RawPeer, reason: str) -> None:
        took = await seconds_until(peer.all_closed, "every connection of the revoked token to close", timeout=1.0)
        print(f"\n{reason}: closed {took * 1000:.0f} ms after the command returned")
        self.assertEqual(await peer.coord.closed, (CLOSE_KICKED, reason))
        self.assertNotIn(str(peer.peer_id), await coordinator_peers(self.owner))
        relayed = await self.relayed()
        # Sending on: the DERP clients redial with the revoked token and are refused (the event
        # we wait on); nothing of theirs is relayed meanwhile.
        peer.send_packets(3)
        await wait_until(lambda: all("401" in dc.last_error for dc, _ in peer.derps), "refused redials")
        self.assertEqual(await self.relayed(), relayed)
        self.assertFalse(any(inbox.up for _, inbox in peer.derps))

    async def assert_others_unaffected(self) -> None:
        self.assertEqual(await healthz(self.d.url), 200)
        out = await self.alice.ok("ping", "box", "-n", "2", "--wait", "200ms")
        self.assertIn("pong from box", out)

    async def test_logout(self) -> None:
        peer = await self.open_bob_peer()
        await self.bob.ok("logout")
        await self.assert_revoked(peer, "session logged out")
        await self.assert_others_unaffected()

    async def test_suspending_the_user(self) -> None:
        peer = await self.open_bob_peer()
        await self.alice.ok("users", "suspend", "bob")
        await self.assert_revoked(peer, "user suspended")
        code, _out, err = await self.bob.run("list")
        self.assertEqual(code, 1, err)
        await self.assert_others_unaffected()

    async def test_rotating_the_agent_token(self) -> None:
        peer = await self.open_bob_peer()
        agent_id = self.dev_agent_id
        self.assertEqual((await coordinator_peers(self.owner))[agent_id]["status"], "connected")
        await self.bob.ok("agent-token", "dev")
        # The agent's own coordinator websocket and DERP connection end: it leaves the debug
        # view, and bob's packets to it are no longer relayed (received, then dropped).
        took = await seconds_until(self.agent_gone, "the agent to leave the coordinator", timeout=1.0)
        print(f"\nagent token rotated: the agent left the coordinator {took * 1000:.0f} ms later")
        before = await metrics(self.d.url, self.owner.token)
        peer.send_packets(3)
        await wait_until(lambda: self.received_at_least(before[RECEIVED] + 6), "bob's packets to arrive")
        self.assertEqual(await self.relayed(), before[RELAYED])
        # Bob's session is not the agent's token: his connections stay.
        self.assertFalse(peer.coord.closed.called)
        self.assertTrue(all(inbox.up for _, inbox in peer.derps))
        self.assertTrue(self.bob_agent.running())
        await self.assert_others_unaffected()

    async def agent_gone(self) -> bool:
        return self.dev_agent_id not in await coordinator_peers(self.owner)

    async def received_at_least(self, n: float) -> bool:
        return (await metrics(self.d.url, self.owner.token))[RECEIVED] >= n
