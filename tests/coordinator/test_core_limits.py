"""Coordinator bounds on a task.Clock: responses split under the message bound, per-user caps on
connected client peers and on LOST peers kept."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID, uuid4

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from coderstack.coordinator.core import (
    AgentAuth,
    ClientAuth,
    Coordinator,
    PeerLimitExceeded,
    PeerLimits,
)
from coderstack.wire.coordination import (
    MAX_RESPONSE_MESSAGE_BYTES,
    CoordinateRequest,
    Node,
    parse_response,
    prefix_from_uuid,
)
from tests.coordinator.test_core import AGENT, USER, Peer, make_node

OTHER_USER = UUID("99999999-2222-3333-4444-555555555555")


def big_node(peer_id: UUID, n: int) -> Node:
    """A node with the most endpoints a peer may send (64)."""
    addr = prefix_from_uuid(peer_id)
    return Node(
        id=n,
        as_of=datetime(2026, 11, 22, 17, 0, 0, tzinfo=UTC),
        key=peer_id.bytes + n.to_bytes(16, "big"),
        disco=bytes(reversed(peer_id.bytes)) * 2,
        preferred_derp=999,
        derp_latency={"999-v4": 0.01},
        addresses=[addr],
        allowed_ips=[addr],
        endpoints=[f"[2001:db8:{n:x}::{i:x}]:{40000 + i}" for i in range(64)],
    )


class LimitedPeer(Peer):
    def __init__(self, coordinator: Coordinator, peer_id: UUID, auth, limits: PeerLimits | None) -> None:
        self.id = peer_id
        self.responses = []
        self.closes = 0
        self.conn = coordinator.connect(
            peer_id, "client", auth, self.responses.append, self._close, limits=limits
        )


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.coord = Coordinator(self.clock)

    def agent(self, agent_id: UUID = AGENT) -> Peer:
        return Peer(self.coord, agent_id, AgentAuth(agent_id), "agent")

    def client(self, limits: PeerLimits | None, user: UUID = USER, peer_id: UUID | None = None) -> LimitedPeer:
        return LimitedPeer(self.coord, peer_id or uuid4(), ClientAuth(AGENT, user), limits)


class BatchingTests(Base):
    def test_a_reconnecting_agent_gets_every_peer_in_messages_under_the_bound(self) -> None:
        agent = self.agent()
        agent.conn.handle(CoordinateRequest(update_self=make_node(AGENT, 1)))
        clients = []
        for n in range(100):
            c = self.client(None, user=uuid4())
            c.conn.handle(CoordinateRequest(update_self=big_node(c.id, n + 2), add_tunnel=AGENT))
            clients.append(c)
        # Half the clients drop (LOST, nodes kept); then the agent's websocket drops and it comes back.
        for c in clients[::2]:
            c.conn.lost()
        agent.conn.lost()
        back = self.agent()
        sent = back.responses
        self.assertGreater(len(sent), 1)
        texts = [r.to_text() for r in sent]
        for text in texts:
            self.assertLessEqual(len(text.encode()), MAX_RESPONSE_MESSAGE_BYTES)
        updates = [u for text in texts for u in parse_response(text).peer_updates]
        nodes = {u.id: u.node for u in updates if str(u.kind) == "NODE"}
        self.assertEqual(set(nodes), {c.id for c in clients})
        self.assertTrue(all(len(node.endpoints) == 64 for node in nodes.values()))
        lost = [u.id for u in updates if str(u.kind) == "LOST"]
        self.assertEqual(set(lost), {c.id for c in clients[::2]})
        # A LOST peer's NODE comes before its LOST, as in one message.
        order = [(u.id, str(u.kind)) for u in updates]
        for peer_id in lost:
            self.assertLess(order.index((peer_id, "NODE")), order.index((peer_id, "LOST")))
        self.assertGreater(sum(len(t) for t in texts), 256 * 1024)

    def test_small_responses_go_as_they_are(self) -> None:
        agent = self.agent()
        c = self.client(None)
        c.conn.handle(CoordinateRequest(update_self=make_node(c.id, 2), add_tunnel=AGENT))
        self.assertEqual(len(agent.take()), 1)


class PeerLimitTests(Base):
    LIMITS = PeerLimits(connected=2, lost=2)

    def test_the_user_over_its_limit_is_refused_naming_it(self) -> None:
        self.client(self.LIMITS)
        self.client(self.LIMITS)
        problem = self.coord.limit_problem(uuid4(), ClientAuth(AGENT, USER), self.LIMITS)
        self.assertIn("limit is 2", problem)
        with self.assertRaises(PeerLimitExceeded) as caught:
            self.client(self.LIMITS)
        self.assertIn("limit is 2", str(caught.exception))
        self.assertEqual(self.coord.counters["peer_limit_refused"], 1)
        self.assertEqual(len(self.coord.peer_ids()), 2)

    def test_other_users_and_agents_are_not_affected(self) -> None:
        self.client(self.LIMITS)
        self.client(self.LIMITS)
        self.client(self.LIMITS, user=OTHER_USER)
        self.agent()
        self.assertEqual(len(self.coord.peer_ids()), 4)

    def test_replacing_its_own_connection_is_not_one_more(self) -> None:
        a = self.client(self.LIMITS)
        self.client(self.LIMITS)
        again = self.client(self.LIMITS, peer_id=a.id)
        self.assertTrue(again.conn.active)
        self.assertEqual(a.closes, 1)

    def test_a_slot_frees_when_a_peer_leaves(self) -> None:
        a = self.client(self.LIMITS)
        self.client(self.LIMITS)
        a.conn.disconnect()
        self.client(self.LIMITS)
        # A LOST peer is not connected: it does not hold a slot either.
        b = self.client(self.LIMITS, user=OTHER_USER)
        self.client(self.LIMITS, user=OTHER_USER)
        b.conn.lost()
        self.client(self.LIMITS, user=OTHER_USER)

    def test_without_limits_nothing_is_capped(self) -> None:
        for _ in range(5):
            self.client(None)
        self.assertEqual(len(self.coord.peer_ids()), 5)


class LostLimitTests(Base):
    LIMITS = PeerLimits(connected=10, lost=2)

    def test_the_oldest_lost_peers_beyond_the_cap_are_forgotten(self) -> None:
        agent = self.agent()
        clients = []
        for n in range(4):
            c = self.client(self.LIMITS)
            c.conn.handle(CoordinateRequest(update_self=make_node(c.id, n + 2), add_tunnel=AGENT))
            clients.append(c)
        agent.take()
        for c in clients[:3]:
            self.clock.advance(1)
            c.conn.lost()
        kept = set(self.coord.peer_ids())
        self.assertNotIn(clients[0].id, kept)
        self.assertTrue({clients[1].id, clients[2].id, clients[3].id, AGENT} <= kept)
        self.assertIn((clients[0].id, "DISCONNECTED", "lost limit", None), agent.updates())
        self.assertEqual(self.coord.counters["lost_evicted"], 1)
        # The forgotten peer's grace timer went with it; the kept ones still have theirs.
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        # Its tunnel went too.
        self.assertFalse(self.coord.tunnel_between(clients[0].id, AGENT))

    def test_lost_peers_of_another_user_do_not_count(self) -> None:
        for user in (USER, OTHER_USER):
            for _ in range(2):
                self.client(self.LIMITS, user=user).conn.lost()
        self.assertEqual(len(self.coord.peer_ids()), 4)
        self.assertEqual(self.coord.counters["lost_evicted"], 0)
