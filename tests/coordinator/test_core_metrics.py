"""What the coordinator measures for /metrics, on a task.Clock: update counters, peers by kind,
tunnels, and the fan-out histogram (the clock advanced inside the recipients' send)."""

from __future__ import annotations

import math
from uuid import uuid4

from coderstack.coordinator.core import AgentAuth, ClientAuth, ServerAuth
from coderstack.wire.coordination import CoordinateRequest, CoordinateResponse
from tests.coordinator.test_core import AGENT, OTHER_AGENT, USER, Base, Peer, make_node


class CounterTests(Base):
    def test_node_updates_received_and_peer_updates_sent(self) -> None:
        agent, client, _, _ = self.tunnelled()
        counters = self.coord.counters
        # tunnelled(): two update_self; the agent's reached nobody, the client's add_tunnel sent
        # one NODE each way.
        self.assertEqual((counters["node_updates_received"], counters["peer_updates_sent"]), (2, 2))
        agent.conn.handle(CoordinateRequest(update_self=make_node(OTHER_AGENT)))  # refused
        self.assertEqual(counters["node_updates_received"], 3)
        self.assertEqual(counters["peer_updates_sent"], 2)  # an error carries no peer update
        agent.conn.handle(CoordinateRequest(update_self=make_node(AGENT, 5)))
        self.assertEqual(counters["peer_updates_sent"], 3)
        self.assertEqual(len(client.updates()), 1)
        client.conn.lost()  # LOST to the agent
        self.assertEqual(counters["peer_updates_sent"], 4)
        self.coord.connect(client.conn.peer_id, "c", client.conn.auth, lambda r: None, lambda: None)
        # Resumed: its tunnel peer's node comes back to it, its own goes back to the agent.
        self.assertEqual(self.coord.debug()["counters"]["peer_updates_sent"], 6)

    def test_a_failed_send_is_not_counted(self) -> None:
        agent = self.agent()

        def broken(_response: CoordinateResponse) -> None:
            raise OSError("socket gone")

        self.coord.connect(uuid4(), "bad", ClientAuth(AGENT, USER), broken, lambda: None
                           ).handle(CoordinateRequest(add_tunnel=AGENT))  # fmt: skip
        agent.conn.handle(CoordinateRequest(update_self=make_node(AGENT)))
        self.assertEqual(self.coord.counters["peer_updates_sent"], 0)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


class GaugeTests(Base):
    def test_peers_by_kind_and_tunnels(self) -> None:
        counts = self.coord.peer_counts()
        self.assertEqual(set(counts.values()), {0})
        self.assertEqual(len(counts), 6)  # every kind and status, even at zero
        self.assertEqual(self.coord.tunnel_count(), 0)
        agent, client, _, _ = self.tunnelled()
        other = self.client()
        other.conn.handle(CoordinateRequest(add_tunnel=AGENT))
        server = Peer(self.coord, uuid4(), ServerAuth(), "server")
        server.conn.handle(CoordinateRequest(add_tunnel=OTHER_AGENT))  # an agent not yet here
        Peer(self.coord, OTHER_AGENT, AgentAuth(OTHER_AGENT), "agent2").conn.lost()
        client.conn.lost()
        self.assertEqual(self.coord.peer_counts(), {
            ("agent", "connected"): 1, ("agent", "lost"): 1,
            ("client", "connected"): 1, ("client", "lost"): 1,
            ("server", "connected"): 1, ("server", "lost"): 0,
        })
        # A LOST source keeps its tunnel for the grace period.
        self.assertEqual(self.coord.tunnel_count(), 3)
        other.conn.disconnect()
        self.assertEqual(self.coord.tunnel_count(), 2)


class FanoutTests(Base):
    def slow_clients(self, n: int, cost: float) -> list[list[CoordinateResponse]]:
        """``n`` clients tunnelled to the agent whose send takes ``cost`` seconds each."""
        inboxes: list[list[CoordinateResponse]] = []
        for _ in range(n):
            inbox: list[CoordinateResponse] = []

            def send(response: CoordinateResponse, inbox: list[CoordinateResponse] = inbox) -> None:
                inbox.append(response)
                self.clock.advance(cost)

            conn = self.coord.connect(uuid4(), "c", ClientAuth(AGENT, USER), send, lambda: None)
            conn.handle(CoordinateRequest(add_tunnel=AGENT))
            inboxes.append(inbox)
        return inboxes

    def test_time_to_reach_every_tunnel_peer(self) -> None:
        agent = self.agent()
        agent.conn.handle(CoordinateRequest(update_self=make_node(AGENT, 1)))
        self.assertEqual(self.coord.fanout_seconds.count, 0)  # nobody to tell: not a fan-out
        inboxes = self.slow_clients(3, 0.004)
        agent.conn.handle(CoordinateRequest(update_self=make_node(AGENT, 2)))
        self.assertEqual([len(i) for i in inboxes], [2, 2, 2])  # add tunnel, then node update
        h = self.coord.fanout_seconds
        self.assertEqual(h.count, 1)
        self.assertAlmostEqual(h.sum, 0.012)
        self.assertEqual(dict(h.cumulative())[0.01], 0)
        self.assertEqual(dict(h.cumulative())[0.025], 1)
        agent.conn.handle_text(CoordinateRequest(update_self=make_node(AGENT, 3)).to_text())
        self.assertEqual(h.count, 2)
        self.assertAlmostEqual(h.sum, 0.024)
        self.assertEqual(dict(h.cumulative())[math.inf], 2)

    def test_refused_and_nested_updates_are_not_timed(self) -> None:
        agent = self.agent()
        self.slow_clients(1, 0.001)
        agent.conn.handle(CoordinateRequest(update_self=make_node(OTHER_AGENT)))  # refused
        self.assertEqual(self.coord.fanout_seconds.count, 0)
        # A peer that answers from inside its send(): its update goes out after this call
        # returns, in the outer flush, so only the outer update is timed.
        nested: list[CoordinateResponse] = []

        def send(response: CoordinateResponse) -> None:
            nested.append(response)
            if len(nested) == 1:
                me.handle(CoordinateRequest(update_self=make_node(me.peer_id, 9)))

        me = self.coord.connect(uuid4(), "n", ClientAuth(AGENT, USER), send, lambda: None)
        me.handle(CoordinateRequest(add_tunnel=AGENT))
        agent.take()
        agent.conn.handle(CoordinateRequest(update_self=make_node(AGENT, 4)))
        self.assertEqual(len(agent.updates()), 1)  # the nested update did reach the agent
        self.assertEqual(self.coord.fanout_seconds.count, 1)
        self.assertEqual(self.coord.counters["node_updates_received"], 3)
