"""The coordinator core, driven directly with a task.Clock and recording callables."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from coderstack.coordinator.core import (
    AgentAuth,
    ClientAuth,
    Coordinator,
    PeerConnection,
    PeerIdConflict,
)
from coderstack.wire.coordination import (
    CODER_SERVICE_PREFIX,
    CoordinateRequest,
    CoordinateResponse,
    Node,
    PeerUpdate,
    parse_response,
    prefix_from_uuid,
)

AGENT = UUID("aaaaaaaa-aaaa-aaaa-aaaa-123456789abc")
USER = UUID("11111111-2222-3333-4444-555555555555")
OTHER_AGENT = UUID("bbbbbbbb-bbbb-bbbb-bbbb-123456789abc")


class Peer:
    """A fake transport: records what the coordinator sends and whether it closed us."""

    def __init__(self, coordinator: Coordinator, peer_id: UUID, auth, name: str = "") -> None:
        self.id = peer_id
        self.responses: list[CoordinateResponse] = []
        self.closes = 0
        self.conn: PeerConnection = coordinator.connect(
            peer_id, name or str(peer_id)[:8], auth, self.responses.append, self._close
        )

    def _close(self) -> None:
        self.closes += 1

    def take(self) -> list[CoordinateResponse]:
        out, self.responses[:] = list(self.responses), []
        return out

    def updates(self) -> list[tuple[UUID, str, str, Node | None]]:
        """Every peer update received since the last call, flattened."""
        return [(u.id, str(u.kind), u.reason, u.node) for r in self.take() for u in r.peer_updates]

    def errors(self) -> list[str]:
        return [r.error for r in self.take() if r.error]


def make_node(peer_id: UUID, n: int = 1, *, addresses=None, key: bytes | None = None) -> Node:
    addr = prefix_from_uuid(peer_id)
    return Node(
        id=n,
        as_of=datetime(2026, 11, 22, 17, 0, 0, tzinfo=UTC) + timedelta(seconds=n),
        key=key if key is not None else peer_id.bytes + n.to_bytes(16, "big"),
        disco=bytes(reversed(peer_id.bytes)) * 2,
        preferred_derp=999,
        derp_latency={"999-v4": 0.01 * n},
        addresses=[addr] if addresses is None else addresses,
        allowed_ips=[addr] if addresses is None else addresses,
        endpoints=[f"192.0.2.{n % 256}:41641"],
    )


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.coord = Coordinator(self.clock)

    def agent(self, agent_id: UUID = AGENT) -> Peer:
        return Peer(self.coord, agent_id, AgentAuth(agent_id), "agent")

    def client(self, agent_id: UUID = AGENT, user_id: UUID = USER) -> Peer:
        return Peer(self.coord, uuid4(), ClientAuth(agent_id, user_id), "client")

    def tunnelled(self) -> tuple[Peer, Peer, Node, Node]:
        """An agent and a client with nodes and a tunnel client -> agent; queues drained."""
        agent, client = self.agent(), self.client()
        anode, cnode = make_node(AGENT, 1), make_node(client.id, 2)
        agent.conn.handle(CoordinateRequest(update_self=anode))
        client.conn.handle(CoordinateRequest(update_self=cnode, add_tunnel=AGENT))
        agent.take()
        client.take()
        return agent, client, anode, cnode


class AddTunnelTests(Base):
    def test_add_tunnel_exchanges_nodes(self) -> None:
        agent, client = self.agent(), self.client()
        anode, cnode = make_node(AGENT, 1), make_node(client.id, 2)
        agent.conn.handle(CoordinateRequest(update_self=anode))
        client.conn.handle(CoordinateRequest(update_self=cnode))
        self.assertEqual(agent.take(), [])  # no tunnel yet: nobody hears anything
        self.assertEqual(client.take(), [])

        client.conn.handle(CoordinateRequest(add_tunnel=AGENT))
        self.assertEqual(client.updates(), [(AGENT, "NODE", "add tunnel", anode)])
        self.assertEqual(agent.updates(), [(client.id, "NODE", "add tunnel", cnode)])
        self.assertTrue(self.coord.tunnel_between(client.id, AGENT))
        self.assertTrue(self.coord.tunnel_between(AGENT, client.id))

    def test_add_tunnel_before_nodes(self) -> None:
        agent, client = self.agent(), self.client()
        client.conn.handle(CoordinateRequest(add_tunnel=AGENT))
        self.assertEqual(client.take(), [])
        self.assertEqual(agent.take(), [])
        anode = make_node(AGENT)
        agent.conn.handle(CoordinateRequest(update_self=anode))
        self.assertEqual(client.updates(), [(AGENT, "NODE", "node update", anode)])
        self.assertEqual(agent.take(), [])  # the sender does not hear its own update

    def test_agent_connecting_after_client_gets_waiting_client_nodes(self) -> None:
        client = self.client()
        cnode = make_node(client.id, 2)
        client.conn.handle(CoordinateRequest(update_self=cnode, add_tunnel=AGENT))
        self.assertEqual(client.take(), [])
        agent = self.agent()
        self.assertEqual(agent.updates(), [(client.id, "NODE", "add tunnel", cnode)])


class NodeUpdateTests(Base):
    def test_update_self_fans_out_both_directions(self) -> None:
        agent, client, _, _ = self.tunnelled()
        client2 = self.client()
        client2.conn.handle(CoordinateRequest(add_tunnel=AGENT))
        client2.take()
        agent.take()

        anode2 = make_node(AGENT, 7)
        agent.conn.handle(CoordinateRequest(update_self=anode2))
        self.assertEqual(client.updates(), [(AGENT, "NODE", "node update", anode2)])
        self.assertEqual(client2.updates(), [(AGENT, "NODE", "node update", anode2)])

        cnode2 = make_node(client.id, 8)
        client.conn.handle(CoordinateRequest(update_self=cnode2))
        self.assertEqual(agent.updates(), [(client.id, "NODE", "node update", cnode2)])
        self.assertEqual(client2.take(), [])  # clients of the same agent do not see each other
        self.assertEqual(self.coord.node(client.id), cnode2)

    def test_fan_out_shares_one_response(self) -> None:
        agent = self.agent()
        clients = [self.client() for _ in range(3)]
        for c in clients:
            c.conn.handle(CoordinateRequest(add_tunnel=AGENT))
        agent.conn.handle(CoordinateRequest(update_self=make_node(AGENT)))
        got = [c.take() for c in clients]
        self.assertEqual([len(g) for g in got], [1, 1, 1])
        self.assertIs(got[0][0], got[1][0])
        self.assertIs(got[1][0], got[2][0])

    def test_peer_for_node_key(self) -> None:
        agent, client, anode, cnode = self.tunnelled()
        self.assertEqual(self.coord.peer_for_node_key(anode.key), AGENT)
        self.assertEqual(self.coord.peer_for_node_key(cnode.key), client.id)
        self.assertIsNone(self.coord.peer_for_node_key(bytes(32)))
        new = make_node(AGENT, 9)
        agent.conn.handle(CoordinateRequest(update_self=new))
        self.assertIsNone(self.coord.peer_for_node_key(anode.key))
        self.assertEqual(self.coord.peer_for_node_key(new.key), AGENT)
        agent.conn.lost()
        self.assertEqual(self.coord.peer_for_node_key(new.key), AGENT)  # LOST peers count
        client.conn.disconnect()
        self.assertIsNone(self.coord.peer_for_node_key(cnode.key))


class RemoveAndDisconnectTests(Base):
    def test_remove_tunnel_disconnects_both(self) -> None:
        agent, client, _, _ = self.tunnelled()
        client.conn.handle(CoordinateRequest(remove_tunnel=AGENT))
        self.assertEqual(client.updates(), [(AGENT, "DISCONNECTED", "remove tunnel", None)])
        self.assertEqual(agent.updates(), [(client.id, "DISCONNECTED", "remove tunnel", None)])
        self.assertFalse(self.coord.tunnel_between(client.id, AGENT))
        # Further node updates no longer cross.
        agent.conn.handle(CoordinateRequest(update_self=make_node(AGENT, 3)))
        self.assertEqual(client.take(), [])
        # Removing a tunnel that does not exist is a no-op.
        client.conn.handle(CoordinateRequest(remove_tunnel=AGENT))
        self.assertEqual(client.take() + agent.take(), [])

    def test_graceful_disconnect_of_client(self) -> None:
        agent, client, _, _ = self.tunnelled()
        client.conn.handle(CoordinateRequest(disconnect=True))
        self.assertEqual(
            agent.updates(), [(client.id, "DISCONNECTED", "graceful disconnect", None)]
        )
        self.assertEqual(client.closes, 1)
        self.assertEqual(client.conn.close_reason, "graceful disconnect")
        self.assertIsNone(self.coord.status(client.id))
        self.assertIsNone(self.coord.node(client.id))
        self.assertFalse(self.coord.tunnel_between(client.id, AGENT))
        self.assertFalse(client.conn.active)
        # The adapter's later connectionLost is harmless.
        client.conn.lost()
        self.assertEqual(agent.take(), [])

    def test_graceful_disconnect_method(self) -> None:
        agent, client, _, _ = self.tunnelled()
        agent.conn.disconnect()
        self.assertEqual(client.updates(), [(AGENT, "DISCONNECTED", "graceful disconnect", None)])
        self.assertEqual(agent.closes, 1)
        self.assertIsNone(self.coord.status(AGENT))
        # The client's tunnel is its own and stays: when the agent returns, the client hears.
        self.assertTrue(self.coord.tunnel_between(client.id, AGENT))
        agent2 = self.agent()
        self.assertEqual([u[:3] for u in agent2.updates()], [(client.id, "NODE", "add tunnel")])
        anode = make_node(AGENT, 5)
        agent2.conn.handle(CoordinateRequest(update_self=anode))
        self.assertEqual(client.updates(), [(AGENT, "NODE", "node update", anode)])

    def test_request_parts_run_in_order_with_disconnect_last(self) -> None:
        agent = self.agent()
        client = self.client()
        cnode = make_node(client.id, 4)
        client.conn.handle(CoordinateRequest(update_self=cnode, add_tunnel=AGENT, disconnect=True))
        self.assertEqual(
            agent.updates(),
            [
                (client.id, "NODE", "add tunnel", cnode),
                (client.id, "DISCONNECTED", "graceful disconnect", None),
            ],
        )


class LostTests(Base):
    def test_lost_agent_keeps_node_at_clients(self) -> None:
        agent, client, anode, _ = self.tunnelled()
        agent.conn.lost()
        self.assertEqual(client.updates(), [(AGENT, "LOST", "lost", anode)])
        self.assertEqual(agent.closes, 0)  # the transport is already gone
        self.assertEqual(agent.conn.close_reason, "lost")
        self.assertEqual(self.coord.status(AGENT), "lost")
        self.assertEqual(self.coord.node(AGENT), anode)
        self.assertTrue(self.coord.tunnel_between(client.id, AGENT))

    def test_lost_is_not_disconnected(self) -> None:
        agent, client, anode, cnode = self.tunnelled()
        client.conn.lost()
        self.assertEqual(agent.updates(), [(client.id, "LOST", "lost", cnode)])
        self.assertEqual(self.coord.status(client.id), "lost")
        self.assertTrue(self.coord.tunnel_between(client.id, AGENT))
        # The agent keeps moving; its updates do not reach a LOST client but are kept.
        anode2 = make_node(AGENT, 6)
        agent.conn.handle(CoordinateRequest(update_self=anode2))
        self.assertEqual(client.take(), [])

    def test_reconnect_of_lost_peer_resumes(self) -> None:
        agent, client, anode, cnode = self.tunnelled()
        client.conn.lost()
        agent.take()
        anode2 = make_node(AGENT, 6)
        agent.conn.handle(CoordinateRequest(update_self=anode2))

        back = Peer(self.coord, client.id, ClientAuth(AGENT, USER), "client")
        self.assertEqual(self.coord.status(client.id), "connected")
        self.assertEqual(back.updates(), [(AGENT, "NODE", "resume", anode2)])
        self.assertEqual(agent.updates(), [(client.id, "NODE", "resume", cnode)])
        self.assertEqual(self.coord.overwrites, 0)
        # Tunnels resumed: updates flow both ways again without a new add_tunnel.
        anode3 = make_node(AGENT, 9)
        agent.conn.handle(CoordinateRequest(update_self=anode3))
        self.assertEqual(back.updates(), [(AGENT, "NODE", "node update", anode3)])
        cnode2 = make_node(client.id, 10)
        back.conn.handle(CoordinateRequest(update_self=cnode2))
        self.assertEqual(agent.updates(), [(client.id, "NODE", "node update", cnode2)])

    def test_lost_agent_reconnects(self) -> None:
        agent, client, anode, cnode = self.tunnelled()
        agent.conn.lost()
        client.take()
        again = self.agent()
        self.assertEqual(again.updates(), [(client.id, "NODE", "resume", cnode)])
        self.assertEqual(client.updates(), [(AGENT, "NODE", "resume", anode)])

    def test_reconnecting_peer_hears_lost_tunnel_peer(self) -> None:
        agent, client, anode, cnode = self.tunnelled()
        agent.conn.lost()
        client.conn.lost()
        back = Peer(self.coord, client.id, ClientAuth(AGENT, USER))
        self.assertEqual(
            back.updates(), [(AGENT, "NODE", "resume", anode), (AGENT, "LOST", "lost", anode)]
        )

    def test_new_client_of_lost_agent_gets_node_then_lost(self) -> None:
        agent, _client, anode, _ = self.tunnelled()
        agent.conn.lost()
        late = self.client()
        late.conn.handle(CoordinateRequest(add_tunnel=AGENT))
        self.assertEqual(
            late.updates(), [(AGENT, "NODE", "add tunnel", anode), (AGENT, "LOST", "lost", anode)]
        )

    def test_lost_peer_forgotten_after_grace_period(self) -> None:
        agent, client, _, cnode = self.tunnelled()
        client.conn.lost()
        agent.take()
        self.clock.advance(self.coord.lost_timeout - 1)
        self.assertEqual(self.coord.status(client.id), "lost")
        self.assertEqual(agent.take(), [])
        self.clock.advance(1)
        self.assertIsNone(self.coord.status(client.id))
        self.assertIsNone(self.coord.node(client.id))
        self.assertIsNone(self.coord.peer_for_node_key(cnode.key))
        self.assertFalse(self.coord.tunnel_between(client.id, AGENT))
        self.assertEqual(agent.updates(), [(client.id, "DISCONNECTED", "lost timeout", None)])
        self.assertEqual(self.coord.counters["forgotten"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reconnect_cancels_forgetting(self) -> None:
        _agent, client, _, _ = self.tunnelled()
        client.conn.lost()
        self.clock.advance(60)
        Peer(self.coord, client.id, ClientAuth(AGENT, USER))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(self.coord.lost_timeout * 2)
        self.assertEqual(self.coord.status(client.id), "connected")

    def test_last_seen(self) -> None:
        agent, _client, _, _ = self.tunnelled()
        self.assertEqual(self.coord.last_seen(AGENT), 1000)
        self.clock.advance(5)
        agent.conn.handle(CoordinateRequest())
        self.assertEqual(self.coord.last_seen(AGENT), 1005)
        self.clock.advance(5)
        agent.conn.touch()
        self.assertEqual(self.coord.last_seen(AGENT), 1010)
        self.clock.advance(5)
        agent.conn.lost()
        self.clock.advance(100)
        self.assertEqual(self.coord.last_seen(AGENT), 1015)
        self.assertIsNone(self.coord.last_seen(uuid4()))

    def test_close_marks_everyone_lost(self) -> None:
        agent, client, anode, _ = self.tunnelled()
        self.coord.close()
        self.assertEqual(self.coord.status(AGENT), "lost")
        self.assertEqual(self.coord.status(client.id), "lost")
        self.assertEqual((agent.closes, client.closes), (1, 1))
        self.assertEqual(agent.conn.close_reason, "coordinator closed")
        self.assertEqual(self.coord.node(AGENT), anode)
        self.assertEqual(agent.take() + client.take(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        agent.conn.lost()  # the adapters' connectionLost after close: harmless
        self.assertRaises(RuntimeError, self.agent)


class OverwriteTests(Base):
    def test_same_id_overwrites_old_connection(self) -> None:
        agent, client, anode, cnode = self.tunnelled()
        second = self.agent()
        self.assertEqual(agent.closes, 1)
        self.assertFalse(agent.conn.active)
        self.assertEqual(agent.conn.close_reason, "overwritten")
        self.assertTrue(second.conn.active)
        self.assertIsNone(second.conn.close_reason)
        self.assertEqual(self.coord.overwrites, 1)
        self.assertEqual(self.coord.debug()["counters"]["overwrites"], 1)
        self.assertEqual(second.updates(), [(client.id, "NODE", "resume", cnode)])
        self.assertEqual(client.take(), [])  # it never saw the agent go away
        # The old connection is dead: its requests and its connectionLost change nothing.
        agent.conn.handle(CoordinateRequest(update_self=make_node(AGENT, 5)))
        agent.conn.lost()
        self.assertEqual(client.take(), [])
        self.assertEqual(self.coord.status(AGENT), "connected")
        self.assertEqual(self.coord.node(AGENT), anode)
        self.assertEqual(self.coord.counters["stale_requests"], 1)
        # The new one works and owns the tunnels.
        anode2 = make_node(AGENT, 6)
        second.conn.handle(CoordinateRequest(update_self=anode2))
        self.assertEqual(client.updates(), [(AGENT, "NODE", "node update", anode2)])

    def test_overwrite_with_different_auth_replaces_peer(self) -> None:
        agent = self.agent()
        pid = uuid4()
        first = Peer(self.coord, pid, ClientAuth(AGENT, USER))
        first.conn.handle(CoordinateRequest(update_self=make_node(pid), add_tunnel=AGENT))
        agent.take()
        Peer(self.coord, pid, ClientAuth(OTHER_AGENT, USER))
        self.assertEqual(first.closes, 1)
        self.assertEqual(first.conn.close_reason, "replaced")
        self.assertEqual(agent.updates(), [(pid, "DISCONNECTED", "replaced", None)])
        self.assertFalse(self.coord.tunnel_between(pid, AGENT))
        self.assertIsNone(self.coord.node(pid))
        self.assertEqual(self.coord.auth_of(pid), ClientAuth(OTHER_AGENT, USER))
        self.assertEqual(self.coord.overwrites, 1)

    def test_connect_checks_auth_fits_id(self) -> None:
        self.assertRaises(ValueError, Peer, self.coord, uuid4(), AgentAuth(AGENT))
        self.assertRaises(ValueError, Peer, self.coord, AGENT, ClientAuth(AGENT, USER))
        self.assertRaises(TypeError, Peer, self.coord, AGENT, object())


class ReadyForHandshakeTests(Base):
    def test_relayed_to_source(self) -> None:
        agent, client, _, _ = self.tunnelled()
        client2 = self.client()
        client2.conn.handle(CoordinateRequest(add_tunnel=AGENT))
        client2.take()
        agent.take()
        agent.conn.handle(CoordinateRequest(ready_for_handshake=(client.id, client2.id)))
        self.assertEqual(
            client.updates(), [(AGENT, "READY_FOR_HANDSHAKE", "ready for handshake", None)]
        )
        self.assertEqual(
            client2.updates(), [(AGENT, "READY_FOR_HANDSHAKE", "ready for handshake", None)]
        )
        self.assertEqual(agent.take(), [])

    def test_refused_without_tunnel(self) -> None:
        agent, client, _, _ = self.tunnelled()
        stranger = self.client()
        agent.conn.handle(CoordinateRequest(ready_for_handshake=(stranger.id, client.id)))
        self.assertEqual(stranger.take(), [])
        self.assertEqual([u[1] for u in client.updates()], ["READY_FOR_HANDSHAKE"])
        [error] = agent.errors()
        self.assertIn("no tunnel", error)
        self.assertEqual(self.coord.counters["late_handshakes"], 1)
        self.assertEqual(self.coord.refusals, 0)

    def test_late_handshakes_never_close_the_agent(self) -> None:
        agent, _client, _, _ = self.tunnelled()
        for _ in range(self.coord.max_refusals * 2):
            agent.conn.handle(CoordinateRequest(ready_for_handshake=(uuid4(),)))
        self.assertTrue(agent.conn.active)
        self.assertEqual(agent.closes, 0)
        self.assertEqual(len(agent.errors()), self.coord.max_refusals * 2)

    def test_refused_from_client(self) -> None:
        agent, client, _, _ = self.tunnelled()
        client.conn.handle(CoordinateRequest(ready_for_handshake=(AGENT,)))
        self.assertEqual(agent.take(), [])
        [error] = client.errors()
        self.assertIn("clients may not", error)
        self.assertEqual(self.coord.refusals, 1)


class AuthorizationTests(Base):
    def test_agent_cannot_add_tunnel(self) -> None:
        agent = self.agent()
        client = self.client()
        agent.conn.handle(CoordinateRequest(add_tunnel=client.id))
        [error] = agent.errors()
        self.assertIn("agents cannot add tunnels", error)
        self.assertFalse(self.coord.tunnel_between(AGENT, client.id))
        self.assertEqual(client.take(), [])
        self.assertEqual(self.coord.refusals, 1)
        self.assertTrue(agent.conn.active)  # one refusal does not cost the connection

    def test_client_cannot_tunnel_to_another_agent(self) -> None:
        other = self.agent(OTHER_AGENT)
        other.conn.handle(CoordinateRequest(update_self=make_node(OTHER_AGENT)))
        client = self.client(AGENT)
        client.conn.handle(
            CoordinateRequest(update_self=make_node(client.id), add_tunnel=OTHER_AGENT)
        )
        [error] = client.errors()
        self.assertIn("may only tunnel to", error)
        self.assertFalse(self.coord.tunnel_between(client.id, OTHER_AGENT))
        self.assertEqual(other.take(), [])
        # The update_self part of the same request was fine and was applied.
        self.assertIsNotNone(self.coord.node(client.id))

    def test_agent_with_foreign_address_refused(self) -> None:
        agent, client, anode, _ = self.tunnelled()
        bad = make_node(AGENT, 3, addresses=[prefix_from_uuid(OTHER_AGENT)])
        agent.conn.handle(CoordinateRequest(update_self=bad))
        [error] = agent.errors()
        self.assertIn("is not this agent's address", error)
        self.assertEqual(client.take(), [])
        self.assertEqual(self.coord.node(AGENT), anode)

    def test_agent_allowed_ips_checked_too(self) -> None:
        agent = self.agent()
        own = prefix_from_uuid(AGENT)
        node = Node(
            id=1, as_of=datetime.now(UTC), key=bytes(32), disco=bytes(32),
            addresses=[own], allowed_ips=[own, prefix_from_uuid(OTHER_AGENT)],
        )  # fmt: skip
        agent.conn.handle(CoordinateRequest(update_self=node))
        self.assertEqual(len(agent.errors()), 1)
        self.assertIsNone(self.coord.node(AGENT))

    def test_agent_may_use_both_prefixes(self) -> None:
        agent = self.agent()
        both = [prefix_from_uuid(AGENT), prefix_from_uuid(AGENT, CODER_SERVICE_PREFIX)]
        node = make_node(AGENT, addresses=both)
        agent.conn.handle(CoordinateRequest(update_self=node))
        self.assertEqual(agent.errors(), [])
        self.assertEqual(self.coord.node(AGENT), node)

    def test_client_address_rules(self) -> None:
        client = self.client()
        outside = make_node(client.id, addresses=["fd00::1/128"])
        coder_prefix = make_node(
            client.id, addresses=[prefix_from_uuid(client.id, CODER_SERVICE_PREFIX)]
        )
        agents = make_node(client.id, addresses=[prefix_from_uuid(AGENT)])
        for node in (outside, coder_prefix, agents):
            client.conn.handle(CoordinateRequest(update_self=node))
            self.assertEqual(len(client.errors()), 1)
        self.assertIsNone(self.coord.node(client.id))
        random_inside = make_node(client.id, addresses=["fd7a:115c:a1e0:1234::5/128"])
        client.conn.handle(CoordinateRequest(update_self=random_inside))
        self.assertEqual(client.errors(), [])

    def test_node_key_of_another_peer_refused(self) -> None:
        agent, client, anode, _ = self.tunnelled()
        thief = self.client(user_id=uuid4())
        thief.conn.handle(CoordinateRequest(update_self=make_node(thief.id, key=anode.key)))
        [error] = thief.errors()
        self.assertIn("node key", error)
        self.assertEqual(self.coord.peer_for_node_key(anode.key), AGENT)

    def test_same_identity_may_take_over_key(self) -> None:
        # A client that reconnects under a new peer id with its old keys, while the old id is LOST.
        _agent, client, _, cnode = self.tunnelled()
        client.conn.lost()
        again = self.client()
        again.conn.handle(CoordinateRequest(update_self=make_node(again.id, key=cnode.key)))
        self.assertEqual(again.errors(), [])
        self.assertEqual(self.coord.peer_for_node_key(cnode.key), again.id)

    def test_repeated_abuse_closes_connection(self) -> None:
        agent, client, _, _ = self.tunnelled()
        for _ in range(self.coord.max_refusals - 1):
            client.conn.handle(CoordinateRequest(ready_for_handshake=(AGENT,)))
        self.assertTrue(client.conn.active)
        self.assertEqual(client.closes, 0)
        client.conn.handle(CoordinateRequest(ready_for_handshake=(AGENT,)))
        self.assertFalse(client.conn.active)
        self.assertEqual(client.closes, 1)
        self.assertEqual(client.conn.close_reason, "too many refused requests")
        self.assertIsNone(self.coord.status(client.id))
        self.assertEqual(
            agent.updates(), [(client.id, "DISCONNECTED", "too many refused requests", None)]
        )
        self.assertEqual(self.coord.counters["kicked"], 1)
        self.assertEqual(self.coord.refusals, self.coord.max_refusals)

    def test_refusals_spread_out_are_tolerated(self) -> None:
        agent = self.agent()
        for _ in range(self.coord.max_refusals * 3):
            agent.conn.handle(CoordinateRequest(add_tunnel=uuid4()))
            self.clock.advance(self.coord.refusal_window / (self.coord.max_refusals - 1))
        self.assertTrue(agent.conn.active)
        self.assertEqual(self.coord.refusals, self.coord.max_refusals * 3)
        self.assertEqual(agent.conn.refusals, self.coord.max_refusals * 3)

    def test_malformed_text_answered_and_counted(self) -> None:
        agent = self.agent()
        agent.conn.handle_text(b'{"add_tunnel": {"id": "not-a-uuid"}}')
        [error] = agent.errors()
        self.assertIn("malformed request", error)
        self.assertEqual(self.coord.counters["malformed"], 1)
        node = make_node(AGENT)
        agent.conn.handle_text(CoordinateRequest(update_self=node).to_text())
        self.assertEqual(self.coord.node(AGENT), node)


class DebugTests(Base):
    def test_debug_is_json_and_complete(self) -> None:
        agent, client, anode, cnode = self.tunnelled()
        agent.conn.handle(CoordinateRequest(add_tunnel=client.id))  # one refusal
        client.conn.lost()
        self.agent()  # one overwrite
        info = json.loads(json.dumps(self.coord.debug()))
        peers = {p["id"]: p for p in info["peers"]}
        self.assertEqual(set(peers), {str(AGENT), str(client.id)})
        a, c = peers[str(AGENT)], peers[str(client.id)]
        self.assertEqual((a["kind"], a["status"], a["name"]), ("agent", "connected", "agent"))
        self.assertEqual((c["kind"], c["status"], c["user_id"]), ("client", "lost", str(USER)))
        self.assertEqual(c["agent_id"], str(AGENT))
        self.assertEqual(a["node"], anode.to_json())
        self.assertEqual(c["node"], cnode.to_json())
        self.assertEqual(c["last_seen"], 1000)
        self.assertEqual(info["tunnels"], [{"src": str(client.id), "dst": str(AGENT)}])
        self.assertEqual(info["counters"]["overwrites"], 1)
        self.assertEqual(info["counters"]["refusals"], 1)
        self.assertEqual(info["counters"]["lost"], 1)

    def test_queries_for_unknown_peer(self) -> None:
        nobody = uuid4()
        self.assertIsNone(self.coord.status(nobody))
        self.assertIsNone(self.coord.node(nobody))
        self.assertIsNone(self.coord.auth_of(nobody))
        self.assertFalse(self.coord.tunnel_between(nobody, AGENT))
        self.assertEqual(self.coord.debug()["peers"], [])


class RobustnessTests(Base):
    def test_failing_send_does_not_stop_fan_out(self) -> None:
        agent = self.agent()
        got: list[CoordinateResponse] = []

        def broken(_response: CoordinateResponse) -> None:
            raise OSError("socket gone")

        bad = self.coord.connect(uuid4(), "bad", ClientAuth(AGENT, USER), broken, lambda: None)
        bad.handle(CoordinateRequest(add_tunnel=AGENT))
        self.coord.connect(uuid4(), "good", ClientAuth(AGENT, USER), got.append, lambda: None
                           ).handle(CoordinateRequest(add_tunnel=AGENT))  # fmt: skip
        agent.conn.handle(CoordinateRequest(update_self=make_node(AGENT)))
        self.assertEqual(len(got), 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_reentrant_callbacks(self) -> None:
        """A send callback that reports the connection lost is processed after the current event."""
        agent, client, anode, cnode = self.tunnelled()
        order: list[str] = []

        def send(response: CoordinateResponse) -> None:
            order.append(",".join(str(u.kind) for u in response.peer_updates))
            if len(order) == 1:
                conn.lost()

        conn = self.coord.connect(uuid4(), "c2", ClientAuth(AGENT, USER), send, lambda: None)
        conn.handle(CoordinateRequest(update_self=make_node(conn.peer_id, 3), add_tunnel=AGENT))
        self.assertEqual(order, ["NODE"])
        self.assertEqual(self.coord.status(conn.peer_id), "lost")
        self.assertEqual([u[1] for u in agent.updates()], ["NODE", "LOST"])

    def test_responses_encode_and_parse(self) -> None:
        agent, client, anode, _ = self.tunnelled()
        agent.conn.lost()
        [response] = client.take()
        again = parse_response(response.to_text())
        self.assertEqual(again, response)
        self.assertEqual(again.peer_updates[0], PeerUpdate(AGENT, "LOST", "lost", anode))


class PeerIdTests(Base):
    def test_client_may_not_take_an_agent_id(self) -> None:
        self.agent()
        self.assertRaises(PeerIdConflict, Peer, self.coord, AGENT, ClientAuth(OTHER_AGENT, USER))

    def test_check_peer_id(self) -> None:
        check = self.coord.check_peer_id
        self.assertIsNone(check(AGENT, AgentAuth(AGENT)))
        self.assertIn("its agent id", check(OTHER_AGENT, AgentAuth(AGENT)))
        self.assertIsNone(check(uuid4(), ClientAuth(AGENT, USER)))
        self.assertIn("belongs to an agent", check(AGENT, ClientAuth(AGENT, USER)))
        self.assertIsNone(check(AGENT, ClientAuth(OTHER_AGENT, USER)))  # nobody knows AGENT yet
        self.agent()
        self.assertIn("belongs to an agent", check(AGENT, ClientAuth(OTHER_AGENT, USER)))

    def test_client_may_not_take_a_tunnel_target_id(self) -> None:
        client = self.client(OTHER_AGENT)
        client.conn.handle(CoordinateRequest(add_tunnel=OTHER_AGENT))
        # OTHER_AGENT is not connected, but somebody is waiting for it.
        self.assertRaises(PeerIdConflict, Peer, self.coord, OTHER_AGENT, ClientAuth(AGENT, USER))

    def test_tunnel_to_a_client_refused(self) -> None:
        squatter = Peer(self.coord, OTHER_AGENT, ClientAuth(AGENT, USER))
        squatter.conn.handle(CoordinateRequest(update_self=make_node(OTHER_AGENT)))
        victim = self.client(OTHER_AGENT)
        victim.conn.handle(CoordinateRequest(add_tunnel=OTHER_AGENT))
        [error] = victim.errors()
        self.assertIn("is not an agent", error)
        self.assertEqual(victim.take(), [])

    def test_agent_replaces_a_client_squatting_its_id(self) -> None:
        squatter = Peer(self.coord, OTHER_AGENT, ClientAuth(AGENT, USER))
        agent = self.agent(OTHER_AGENT)
        self.assertEqual(squatter.closes, 1)
        self.assertEqual(self.coord.auth_of(OTHER_AGENT), AgentAuth(OTHER_AGENT))
        self.assertTrue(agent.conn.active)
