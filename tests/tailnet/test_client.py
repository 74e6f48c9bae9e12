"""``coderstack.tailnet.client.TailnetClient`` on a ``task.Clock``: peer updates applied to a real
Conn (its DERP clients are fakes, no socket), tunnels becoming reachable, registration on every
(re)opened coordination websocket with the Backoff's delays, and nothing set on the Conn."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from twisted.internet import defer, task
from twisted.trial import unittest

from coderstack.backoff import Backoff
from coderstack.coordinator.client import CoordinationLink
from coderstack.keys import NodeKeys
from coderstack.tailnet.client import DialError, TailnetClient
from coderstack.tailnet.conn import Conn
from coderstack.wire.coordination import (
    CoordinateRequest,
    CoordinateResponse,
    Node,
    PeerUpdate,
    PeerUpdateKind,
    address_from_uuid,
)
from tests.coordinator.test_link import FakeSocket
from tests.tailnet.test_conn import DERP_MAP


class _DERP:
    """A DERP client that keeps what it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes]] = []

    def start(self) -> None:
        pass

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def note_preferred(self, preferred: bool) -> None:
        pass

    def send(self, key: bytes, datagram: bytes) -> bool:
        self.sent.append((key, datagram))
        return True


class _Coordination:
    """Stands in for a link: what the client sent, and whether it was closed."""

    def __init__(self) -> None:
        self.sent: list[CoordinateRequest] = []
        self.closed = False

    def send(self, request: CoordinateRequest) -> None:
        self.sent.append(request)

    async def close(self) -> None:
        self.closed = True


def peer_node(peer_id: UUID, keys: NodeKeys | None = None) -> Node:
    keys = keys or NodeKeys.generate()
    prefix = ipaddress.IPv6Network((address_from_uuid(peer_id), 128))
    return Node(id=1, as_of=datetime(2026, 1, 1, tzinfo=UTC), key=keys.node_public, disco=keys.disco_public,
                preferred_derp=999, addresses=(prefix,), allowed_ips=(prefix,), endpoints=("198.51.100.9:41641",))


def update(peer_id: UUID, kind: str, node: Node | None = None) -> CoordinateResponse:
    return CoordinateResponse(peer_updates=(PeerUpdate(peer_id, PeerUpdateKind(kind), "test", node),))


class ClientTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.derp = _DERP()
        self.conn = Conn(self.clock, netcheck=False, derp_client_factory=lambda region, handler: self.derp)
        self.before = set(vars(self.conn))

    def client(self, **kw: Any) -> tuple[TailnetClient, _Coordination]:
        client = TailnetClient(self.clock, self.conn, link_monitor=False, **kw)
        coordination = _Coordination()
        client.coordinate(coordination)
        self.addCleanup(lambda: defer.ensureDeferred(client.close()))
        return client, coordination

    def test_our_node_goes_out_whenever_it_changes(self) -> None:
        _client, coordination = self.client()
        self.assertEqual(coordination.sent, [])  # no home region yet: no node
        self.conn.set_derp_map(DERP_MAP)
        node = self.conn.node()
        self.assertEqual(coordination.sent, [CoordinateRequest(update_self=node)])

    def test_tunnel_node_configures_the_peer_and_starts_the_handshake(self) -> None:
        client, coordination = self.client()
        self.conn.set_derp_map(DERP_MAP)
        agent = uuid4()
        tunnel = client.add_tunnel(agent)
        self.assertEqual(coordination.sent[-1], CoordinateRequest(add_tunnel=agent))
        self.assertIsNone(tunnel.key)
        node = peer_node(agent)
        client.handle_response(update(agent, "NODE", node))
        self.assertEqual((tunnel.node, tunnel.key, tunnel.address), (node, node.key, address_from_uuid(agent)))
        self.assertIn(node.key, self.conn.device.peers)
        self.assertEqual(self.conn.peer_addresses[node.key], {address_from_uuid(agent).packed})
        self.assertTrue(any(key == node.key for key, _ in self.derp.sent))  # the handshake went out
        # We dialed it: no READY_FOR_HANDSHAKE from our side.
        self.assertFalse(any(r.ready_for_handshake for r in coordination.sent))
        # New keys (the agent restarted with a new identity) replace the old peer.
        node2 = peer_node(agent)
        client.handle_response(update(agent, "NODE", node2))
        self.assertNotIn(node.key, self.conn.device.peers)
        self.assertEqual(tunnel.key, node2.key)
        # DISCONNECTED removes it; the tunnel keeps the last node to show.
        client.handle_response(update(agent, "DISCONNECTED"))
        self.assertNotIn(node2.key, self.conn.device.peers)
        self.assertEqual((tunnel.key, tunnel.node), (None, node2))
        self.failureResultOf(client.ping(tunnel), KeyError)

    def test_peers_that_are_not_ours_are_ignored(self) -> None:
        client, coordination = self.client()
        stranger = uuid4()
        client.handle_response(update(stranger, "NODE", peer_node(stranger)))
        self.assertEqual(client.peers, {})
        self.assertEqual(self.conn.peer_addresses, {})
        self.assertEqual(coordination.sent, [])

    def test_dialers_are_acked_once_lost_kept_disconnected_removed(self) -> None:
        client, coordination = self.client(accept_incoming=True)
        a, b = uuid4(), uuid4()
        na, nb = peer_node(a), peer_node(b)
        client.handle_response(CoordinateResponse(peer_updates=(
            PeerUpdate(a, PeerUpdateKind.NODE, node=na), PeerUpdate(b, PeerUpdateKind.NODE, node=nb))))
        self.assertEqual(coordination.sent, [CoordinateRequest(ready_for_handshake=(a, b))])
        self.assertEqual(set(self.conn.peer_addresses), {na.key, nb.key})
        client.handle_response(update(a, "NODE", na))  # an update of a known peer: no second ack
        self.assertEqual(len(coordination.sent), 1)
        client.handle_response(update(a, "LOST"))
        self.assertTrue(client.peers[a].lost)
        self.assertIn(na.key, self.conn.device.peers)  # an established tunnel survives
        client.handle_response(update(a, "NODE", na))  # back
        self.assertFalse(client.peers[a].lost)
        client.handle_response(update(b, "DISCONNECTED"))
        self.assertNotIn(b, client.peers)
        self.assertNotIn(nb.key, self.conn.device.peers)

    def test_reachable_on_ready_for_handshake(self) -> None:
        client, _ = self.client()
        agent = uuid4()
        tunnel = client.add_tunnel(agent)
        d = defer.ensureDeferred(client.reachable(tunnel, timeout=20, grace=2))
        client.handle_response(update(agent, "READY_FOR_HANDSHAKE"))  # before its node: not yet
        self.assertNoResult(d)
        client.handle_response(update(agent, "NODE", peer_node(agent)))
        self.clock.advance(1)
        self.assertNoResult(d)
        client.handle_response(update(agent, "READY_FOR_HANDSHAKE"))
        self.successResultOf(d)
        # The wait's timers are gone with it (what is left are the Conn's own).
        waits = [c for c in self.clock.getDelayedCalls() if type(getattr(c.func, "__self__", None)).__name__ == "_Reachable"]
        self.assertEqual(waits, [])

    def test_reachable_after_the_grace_for_a_quiet_agent(self) -> None:
        client, _ = self.client()
        agent = uuid4()
        tunnel = client.add_tunnel(agent)
        client.handle_response(update(agent, "NODE", peer_node(agent)))
        self.clock.advance(1.5)
        d = defer.ensureDeferred(client.reachable(tunnel, timeout=20, grace=2))
        self.clock.advance(0.4)
        self.assertNoResult(d)
        self.clock.advance(0.1)  # 2 s after its node came
        self.successResultOf(d)

    def test_unreachable_after_the_timeout(self) -> None:
        client, _ = self.client()
        tunnel = client.add_tunnel(uuid4())
        d = defer.ensureDeferred(client.reachable(tunnel, timeout=20, grace=2))
        self.clock.advance(20)
        self.assertIn("did not become reachable within 20s", str(self.failureResultOf(d, DialError).value))

    def test_one_client_many_tunnels(self) -> None:
        client, coordination = self.client()
        self.conn.set_derp_map(DERP_MAP)
        agents = [uuid4(), uuid4(), uuid4()]
        tunnels = [client.add_tunnel(a) for a in agents]
        for agent in agents:
            client.handle_response(update(agent, "NODE", peer_node(agent)))
        self.assertEqual([t.address for t in tunnels], [address_from_uuid(a) for a in agents])
        self.assertEqual(len(self.conn.device.peers), 3)
        coordination.sent.clear()
        client.register()  # what a new websocket hears: our node and every tunnel
        self.assertEqual(coordination.sent, [
            CoordinateRequest(update_self=self.conn.node(), add_tunnel=agents[0]),
            CoordinateRequest(add_tunnel=agents[1]), CoordinateRequest(add_tunnel=agents[2])])
        client.remove_tunnel(agents[1])
        self.assertEqual(coordination.sent[-1], CoordinateRequest(remove_tunnel=agents[1]))
        self.assertEqual(len(self.conn.device.peers), 2)

    def test_nothing_is_set_on_the_conn(self) -> None:
        client, _ = self.client()
        self.conn.set_derp_map(DERP_MAP)
        agent = uuid4()
        tunnel = client.add_tunnel(agent)
        client.handle_response(update(agent, "NODE", peer_node(agent)))
        self.assertEqual(set(vars(self.conn)), self.before)
        for name in ("agent_id", "agent_key", "agent_address", "agent_node", "netstack", "coordination"):
            self.assertFalse(hasattr(self.conn, name), name)
        self.assertIsNotNone(client.netstack)
        self.assertEqual(tunnel.agent_id, agent)

    def test_close_leaves_then_closes_the_conn(self) -> None:
        client, coordination = self.client()
        self.successResultOf(defer.ensureDeferred(client.close()))
        self.assertTrue(coordination.closed)
        self.assertTrue(self.conn._closed)


class _Server:
    """A link handler whose websockets are fakes; each open tells the client to register."""

    def __init__(self, client: TailnetClient) -> None:
        self.client = client
        self.sockets: list[FakeSocket] = []
        self.down = False

    async def open_socket(self) -> FakeSocket:
        if self.down:
            raise ConnectionError("refused")
        self.sockets.append(FakeSocket())
        return self.sockets[-1]

    async def socket_opened(self, reopened: bool) -> None:
        self.client.register()

    def open_failed(self, err: Exception) -> bool:
        return True


class ReconnectTests(unittest.TestCase):
    def test_a_reopened_websocket_hears_our_node_and_tunnel_again_after_the_backoff(self) -> None:
        clock = task.Clock()
        conn = Conn(clock, netcheck=False, derp_client_factory=lambda region, handler: _DERP())
        client = TailnetClient(clock, conn, link_monitor=False)
        self.addCleanup(lambda: defer.ensureDeferred(client.close()))
        conn.set_derp_map(DERP_MAP)
        agent = uuid4()
        client.add_tunnel(agent)
        server = _Server(client)
        link = CoordinationLink(clock, server, Backoff(first=0.5, cap=5.0, rng=lambda: 0.0))
        client.coordinate(link)
        self.successResultOf(defer.ensureDeferred(link.open()))
        registration = CoordinateRequest(update_self=conn.node(), add_tunnel=agent)
        self.assertEqual(server.sockets[0].sent, [registration])
        server.down = True
        server.sockets[0].closed.callback((1006, "restart"))
        clock.advance(0.5)
        clock.advance(1.0)  # refused twice: 0.5 s, then 1 s
        server.down = False
        clock.advance(1.9)
        self.assertEqual(len(server.sockets), 1)
        clock.advance(0.1)  # 2 s after the second refusal
        self.assertEqual(len(server.sockets), 2)
        self.assertEqual(server.sockets[1].sent, [CoordinateRequest(update_self=conn.node(), add_tunnel=agent)])
        self.successResultOf(defer.ensureDeferred(client.close()))
        self.assertTrue(server.sockets[1].left)
        self.assertEqual(clock.getDelayedCalls(), [])
