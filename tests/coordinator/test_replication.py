"""Coordinators of several replicas, each mirroring the others' rows, in memory.

A :class:`Bus` stands for the shared database: each coordinator's :class:`Replication` writes
its rows there, and every other replica's :class:`Mirror` is handed the rows that changed, as
the PostgreSQL adapter does after a notification.
"""

from __future__ import annotations

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
from coderstack.coordinator.mirror import Mirror
from coderstack.coordinator.replication import Binding, best_binding
from coderstack.wire.coordination import CoordinateRequest
from tests.coordinator.test_core import AGENT, USER, Peer, make_node
from tests.coordinator.test_core_limits import LimitedPeer

OTHER_USER = UUID("99999999-2222-3333-4444-555555555555")


class Bus:
    """The shared tables: bindings by (peer, replica), tunnels by (src, dst) -> replicas."""

    def __init__(self) -> None:
        self.bindings: dict[UUID, dict[UUID, Binding]] = {}
        self.tunnels: dict[tuple[UUID, UUID], set[UUID]] = {}
        self.mirrors: dict[UUID, Mirror] = {}
        self.readies: list[tuple[UUID, UUID]] = []

    def join(self, coordinator: Coordinator) -> UUID:
        replica = uuid4()
        self.mirrors[replica] = Mirror(coordinator, replica)
        coordinator.replication = _Replica(self, replica)
        return replica

    def peer_changed(self, peer_id: UUID) -> None:
        rows = list(self.bindings.get(peer_id, {}).items())
        for mirror in self.mirrors.values():
            mirror.peer_rows(peer_id, rows)

    def tunnel_changed(self, src: UUID, dst: UUID) -> None:
        for mirror in self.mirrors.values():
            mirror.tunnel_rows(src, dst, self.tunnels.get((src, dst), ()))

    def ready(self, agent_id: UUID, client_id: UUID) -> None:
        for mirror in self.mirrors.values():
            mirror.coordinator.remote_ready(agent_id, client_id)

    def alive(self, *replicas: UUID) -> None:
        for mirror in self.mirrors.values():
            mirror.replicas_alive(replicas)


class _Replica:
    def __init__(self, bus: Bus, replica: UUID) -> None:
        self.bus, self.replica = bus, replica

    def peer_bound(self, binding: Binding) -> None:
        self.bus.bindings.setdefault(binding.peer_id, {})[self.replica] = binding
        self.bus.peer_changed(binding.peer_id)

    def peer_unbound(self, peer_id: UUID) -> None:
        held = self.bus.bindings.get(peer_id, {})
        held.pop(self.replica, None)
        if not held:
            self.bus.bindings.pop(peer_id, None)
        self.bus.peer_changed(peer_id)

    def tunnel_added(self, src: UUID, dst: UUID) -> None:
        self.bus.tunnels.setdefault((src, dst), set()).add(self.replica)
        self.bus.tunnel_changed(src, dst)

    def tunnel_removed(self, src: UUID, dst: UUID) -> None:
        self.bus.tunnels.get((src, dst), set()).discard(self.replica)
        self.bus.tunnel_changed(src, dst)

    def ready_for_handshake(self, agent_id: UUID, client_id: UUID) -> None:
        self.bus.readies.append((agent_id, client_id))
        self.bus.ready(agent_id, client_id)


class Replicas(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.bus = Bus()
        self.a, self.b = Coordinator(self.clock), Coordinator(self.clock)
        self.ra, self.rb = self.bus.join(self.a), self.bus.join(self.b)

    def agent_on(self, coord: Coordinator, agent_id: UUID = AGENT) -> Peer:
        return Peer(coord, agent_id, AgentAuth(agent_id), "agent")

    def client_on(self, coord: Coordinator, agent_id: UUID = AGENT, user_id: UUID = USER,
                  peer_id: UUID | None = None) -> Peer:
        return Peer(coord, peer_id or uuid4(), ClientAuth(agent_id, user_id), "client")

    def across(self) -> tuple[Peer, Peer]:
        """An agent on B with a node, a client on A with a node and a tunnel to it; drained."""
        agent = self.agent_on(self.b)
        agent.conn.handle(CoordinateRequest(update_self=make_node(AGENT, 1)))
        client = self.client_on(self.a)
        client.conn.handle(CoordinateRequest(update_self=make_node(client.id, 2), add_tunnel=AGENT))
        agent.take()
        client.take()
        return agent, client


class AcrossReplicasTests(Replicas):
    def test_a_client_and_an_agent_on_different_replicas_exchange_nodes(self) -> None:
        agent = self.agent_on(self.b)
        anode = make_node(AGENT, 1)
        agent.conn.handle(CoordinateRequest(update_self=anode))
        client = self.client_on(self.a)
        cnode = make_node(client.id, 2)
        client.conn.handle(CoordinateRequest(update_self=cnode, add_tunnel=AGENT))
        self.assertEqual(client.updates(), [(AGENT, "NODE", "add tunnel", anode)])
        self.assertEqual(agent.updates(), [(client.id, "NODE", "add tunnel", cnode)])

    def test_node_updates_cross_both_ways(self) -> None:
        agent, client = self.across()
        anode = make_node(AGENT, 3)
        agent.conn.handle(CoordinateRequest(update_self=anode))
        self.assertEqual(client.updates(), [(AGENT, "NODE", "node update", anode)])
        cnode = make_node(client.id, 4)
        client.conn.handle(CoordinateRequest(update_self=cnode))
        self.assertEqual(agent.updates(), [(client.id, "NODE", "node update", cnode)])

    def test_ready_for_handshake_reaches_a_client_on_another_replica(self) -> None:
        agent, client = self.across()
        agent.conn.handle(CoordinateRequest(ready_for_handshake=(client.id,)))
        self.assertEqual(agent.errors(), [])
        self.assertEqual(client.updates(), [(AGENT, "READY_FOR_HANDSHAKE", "ready for handshake", None)])
        self.assertEqual(self.bus.readies, [(AGENT, client.id)])

    def test_both_replicas_know_the_keys_and_the_tunnel_for_the_closed_relay(self) -> None:
        agent, client = self.across()
        for coord in (self.a, self.b):
            self.assertEqual(coord.peer_for_node_key(make_node(AGENT, 1).key), AGENT)
            self.assertEqual(coord.peer_for_node_key(make_node(client.id, 2).key), client.id)
            self.assertTrue(coord.tunnel_between(client.id, AGENT))
            self.assertEqual(coord.auth_of(client.id), ClientAuth(AGENT, USER))
            self.assertEqual(coord.status(AGENT), "connected")

    def test_remove_tunnel_disconnects_across(self) -> None:
        agent, client = self.across()
        client.conn.handle(CoordinateRequest(remove_tunnel=AGENT))
        self.assertEqual(agent.updates(), [(client.id, "DISCONNECTED", "remove tunnel", None)])
        self.assertFalse(self.b.tunnel_between(client.id, AGENT))

    def test_graceful_disconnect_of_the_agent(self) -> None:
        agent, client = self.across()
        agent.conn.disconnect()
        self.assertEqual(client.updates(), [(AGENT, "DISCONNECTED", "graceful disconnect", None)])
        self.assertIsNone(self.a.status(AGENT))

    def test_agent_lost_then_back_on_the_clients_replica(self) -> None:
        agent, client = self.across()
        agent.conn.lost()
        self.assertEqual(client.updates(), [(AGENT, "LOST", "lost", make_node(AGENT, 1))])
        self.clock.advance(1)
        again = self.agent_on(self.a)
        # Back, on another replica, with its node not sent yet: the client still has the old one.
        self.assertEqual(client.updates(), [])
        anode = make_node(AGENT, 5)
        again.conn.handle(CoordinateRequest(update_self=anode))
        self.assertEqual(client.updates(), [(AGENT, "NODE", "node update", anode)])
        # The agent learns the client's node through the tunnel held on its new replica.
        self.assertEqual(again.updates(), [(client.id, "NODE", "add tunnel", make_node(client.id, 2))])

    def test_an_agent_on_two_replicas_at_once_never_leaves_the_client_without_a_node(self) -> None:
        """The same agent reconnects to A while its old connection on B is still open; then
        B's connection drops. The client must end with the new node, never LOST or gone."""
        agent, client = self.across()
        self.clock.advance(1)
        again = self.agent_on(self.a)
        anode = make_node(AGENT, 6)
        again.conn.handle(CoordinateRequest(update_self=anode))
        self.assertEqual(client.updates(), [(AGENT, "NODE", "node update", anode)])
        self.clock.advance(1)
        agent.conn.lost()  # the old connection on B goes
        self.assertEqual(client.updates(), [])
        self.clock.advance(self.b.lost_timeout + 1)  # and B forgets it
        self.assertEqual(client.updates(), [])
        self.assertEqual(self.a.node(AGENT), anode)
        self.assertEqual(self.b.node(AGENT), anode)
        self.assertEqual(self.b.status(AGENT), "connected")

    def test_the_older_connection_updating_late_does_not_win(self) -> None:
        agent, client = self.across()
        self.clock.advance(1)
        again = self.agent_on(self.a)
        new = make_node(AGENT, 7)
        again.conn.handle(CoordinateRequest(update_self=new))
        client.take()
        # B's view: A's binding is newer and has a node; B's own (older) still ranks lower.
        self.assertEqual(self.b.node(AGENT), new)

    def test_a_dead_replicas_peers_become_lost_not_gone(self) -> None:
        agent, client = self.across()
        self.bus.alive(self.ra)  # B stops heartbeating
        self.assertEqual(client.updates(), [(AGENT, "LOST", "lost", make_node(AGENT, 1))])
        self.assertEqual(self.a.status(AGENT), "lost")
        self.assertTrue(self.a.tunnel_between(client.id, AGENT))
        # The agent reconnects through the load balancer to A: NODE beats LOST.
        self.clock.advance(1)
        again = self.agent_on(self.a)
        anode = make_node(AGENT, 8)
        again.conn.handle(CoordinateRequest(update_self=anode))
        self.assertEqual(client.updates(), [(AGENT, "NODE", "node update", anode)])

    def test_a_dead_replicas_rows_deleted_disconnect(self) -> None:
        agent, client = self.across()
        self.bus.alive(self.ra)
        client.take()
        # Cleanup deletes the dead replica's rows after the LOST timeout.
        self.bus.bindings.pop(AGENT)
        self.bus.peer_changed(AGENT)
        self.assertEqual(client.updates(), [(AGENT, "DISCONNECTED", "lost timeout", None)])

    def test_resync_restores_what_notifications_missed(self) -> None:
        agent, client = self.across()
        mirror = self.bus.mirrors[self.ra]
        mirror.resync([], [])  # as if A had read an empty database
        self.assertEqual(client.updates(), [(AGENT, "DISCONNECTED", "graceful disconnect", None)])
        peers = [(r, b) for bs in self.bus.bindings.values() for r, b in bs.items()]
        tunnels = [(r, s, d) for (s, d), rs in self.bus.tunnels.items() for r in rs]
        mirror.resync(peers, tunnels)
        self.assertEqual(client.updates(), [(AGENT, "NODE", "node update", make_node(AGENT, 1))])

    def test_authorization_holds_across_replicas(self) -> None:
        agent, client = self.across()
        other = self.client_on(self.b, user_id=OTHER_USER)
        other.take()
        # A client may not take a remote agent's peer id, nor tunnel to a remote client.
        self.assertIsNotNone(self.a.check_peer_id(AGENT, ClientAuth(AGENT, OTHER_USER)))
        mine = self.client_on(self.a, agent_id=client.id)
        mine.conn.handle(CoordinateRequest(add_tunnel=client.id))
        self.assertIn("not an agent", mine.errors()[0])
        # A node key held by a peer on another replica cannot be claimed by someone else.
        thief = self.client_on(self.a, user_id=OTHER_USER)
        thief.conn.handle(CoordinateRequest(update_self=make_node(thief.id, 2, key=make_node(client.id, 2).key)))
        self.assertIn("belongs to another peer", thief.errors()[0])

    def test_drop_connections_makes_every_peer_lost_here(self) -> None:
        agent, client = self.across()
        self.b.drop_connections("replica unhealthy")
        self.assertEqual(agent.closes, 1)
        self.assertEqual(agent.conn.close_reason, "replica unhealthy")
        self.assertEqual(client.updates(), [(AGENT, "LOST", "lost", make_node(AGENT, 1))])


class BestBindingTests(SynchronousTestCase):
    def test_connected_beats_lost_then_a_node_then_newer(self) -> None:
        p = uuid4()
        auth = AgentAuth(p)
        lost_new = Binding(p, auth, make_node(p, 1), True, 10.0)
        ok_old = Binding(p, auth, make_node(p, 2), False, 1.0)
        ok_no_node = Binding(p, auth, None, False, 20.0)
        ok_new = Binding(p, auth, make_node(p, 3), False, 5.0)
        self.assertIs(best_binding([lost_new, ok_old]), ok_old)
        self.assertIs(best_binding([ok_no_node, ok_old]), ok_old)
        self.assertIs(best_binding([ok_old, ok_new, lost_new]), ok_new)
        self.assertIsNone(best_binding([]))


class LimitsAcrossReplicasTests(Replicas):
    """The per-user cap on connected client peers counts the user's peers on every replica."""

    LIMITS = PeerLimits(connected=2, lost=5)

    def limited_client(self, coord: Coordinator, peer_id: UUID | None = None) -> Peer:
        return LimitedPeer(coord, peer_id or uuid4(), ClientAuth(AGENT, USER), self.LIMITS)

    def test_peers_on_another_replica_count(self) -> None:
        self.limited_client(self.a)
        self.limited_client(self.b)
        problem = self.a.limit_problem(uuid4(), ClientAuth(AGENT, USER), self.LIMITS)
        self.assertEqual(problem, "too many coordinator peers for this user: 2 connected, the limit is 2")
        self.assertRaises(PeerLimitExceeded, self.limited_client, self.b)
        # Another user is not affected.
        self.assertIsNone(self.b.limit_problem(uuid4(), ClientAuth(AGENT, OTHER_USER), self.LIMITS))

    def test_a_peer_lost_or_gone_elsewhere_frees_its_place(self) -> None:
        self.limited_client(self.a)
        other = self.limited_client(self.b)
        other.conn.lost()
        self.assertIsNone(self.a.limit_problem(uuid4(), ClientAuth(AGENT, USER), self.LIMITS))
        self.limited_client(self.a)
        self.assertIsNotNone(self.b.limit_problem(uuid4(), ClientAuth(AGENT, USER), self.LIMITS))
        self.clock.advance(self.b.lost_timeout + 1)
        self.assertNotIn(USER, self.a._remote_by_user)

    def test_the_same_peer_on_two_replicas_counts_once(self) -> None:
        """A client reconnecting to another replica while its old connection lingers is one peer."""
        first = self.limited_client(self.a)
        self.limited_client(self.b, first.id)
        self.assertIsNone(self.b.limit_problem(uuid4(), ClientAuth(AGENT, USER), self.LIMITS))
