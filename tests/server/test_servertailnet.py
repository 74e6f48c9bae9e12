"""The server's own tailnet (coderstack/server/servertailnet.py) and what it stands on: the
in-memory DERP transport pair, the coordinator's server peer, the relay's server principal.

The end-to-end tests run a real server in-process (makeService on 127.0.0.1:0), whose
ServerTailnet the service made and started, and a real AgentService, and reach a TCP echo
server on the agent's loopback through the tunnel.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from coderstack.agent.forward import LocalPortForwarder
from coderstack.agent.service import AgentService
from coderstack.coordinator.core import AgentAuth, ClientAuth, Coordinator, ServerAuth
from coderstack.derp.client import DERPClient, DERPClientHandler
from coderstack.derp.memory import MemoryTransport, connect_pair, relay_connector
from coderstack.derp.relay import Relay
from coderstack.derp.server import DERPStreamProtocol
from coderstack.derpmap import DERPMap
from coderstack.netstack.stack import ANY_PORT
from coderstack.sdk import Client
from coderstack.server.limits import UserLimits
from coderstack.server.livesessions import LiveSessions
from coderstack.server.relaypolicy import (
    CoordinatorRelayPolicy,
    Principal,
    RelayAdmission,
    server_principal,
)
from coderstack.server.servertailnet import AgentUnreachable, CoreCoordination, ServerTailnet
from coderstack.tailnet.client import Tunnel
from coderstack.wire import derp as w
from coderstack.wire.coordination import CoordinateRequest, CoordinateResponse, Node
from tests.support.inprocess import start_server
from tests.support.tempdirs import made_dir
from tests.support.waiting import wait_until

# -- the in-memory transport pair ------------------------------------------------------------------


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.chunks: list[bytes] = []
        self.lost: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.chunks.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        assert reason is not None
        self.lost.append(reason)


class Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class MemoryTransportTests(unittest.TestCase):
    def pair(self, high_water: int = 1024) -> tuple[task.Clock, Recorder, Recorder, MemoryTransport, MemoryTransport]:
        clock = task.Clock()
        a, b = Recorder(), Recorder()
        ta, tb = connect_pair(clock, a, b, high_water=high_water)
        return clock, a, b, ta, tb

    def test_bytes_both_ways_on_a_later_turn_in_order(self) -> None:
        clock, a, b, ta, tb = self.pair()
        ta.write(b"one ")
        ta.writeSequence([b"two ", b"three"])
        tb.write(b"back")
        self.assertEqual((bytes(a.data), bytes(b.data)), (b"", b""))  # never inside the write
        clock.advance(0)
        self.assertEqual(bytes(b.data), b"one two three")
        self.assertEqual(b.chunks, [b"one two three"])  # one delivery per turn
        self.assertEqual(bytes(a.data), b"back")
        self.assertEqual((ta.getPeer(), tb.getHost()), (tb.getHost(), ta.getPeer()))

    def test_lose_connection_delivers_then_closes_both_ends(self) -> None:
        clock, a, b, ta, tb = self.pair()
        ta.write(b"last words")
        ta.loseConnection()
        ta.write(b"ignored")
        self.assertEqual((a.lost, b.lost), ([], []))
        clock.advance(0)
        self.assertEqual(bytes(b.data), b"last words")
        self.assertEqual(len(a.lost), 1)
        self.assertEqual(len(b.lost), 1)
        a.lost[0].trap(ConnectionDone)
        b.lost[0].trap(ConnectionDone)
        tb.write(b"after")  # the other end is closed too
        clock.advance(0)
        self.assertEqual(bytes(a.data), b"")

    def test_lose_connection_from_the_other_side(self) -> None:
        clock, a, b, ta, tb = self.pair()
        tb.loseConnection()
        clock.advance(0)
        self.assertEqual((len(a.lost), len(b.lost)), (1, 1))
        self.assertTrue(ta.disconnected and tb.disconnected)

    def test_abort_drops_what_is_queued(self) -> None:
        clock, a, b, ta, tb = self.pair()
        ta.write(b"never")
        ta.abortConnection()
        clock.advance(0)
        self.assertEqual(bytes(b.data), b"")
        a.lost[0].trap(ConnectionAborted)
        b.lost[0].trap(ConnectionLost)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_writer_producer_paused_past_high_water_and_resumed_when_delivered(self) -> None:
        clock, a, b, ta, tb = self.pair(high_water=10)
        producer = Producer()
        ta.registerProducer(producer, True)
        ta.write(b"12345")
        self.assertEqual(producer.events, [])
        ta.write(b"678901")
        self.assertEqual(producer.events, ["pause"])
        ta.write(b"more")
        self.assertEqual(producer.events, ["pause"])
        clock.advance(0)
        self.assertEqual(producer.events, ["pause", "resume"])
        self.assertEqual(bytes(b.data), b"12345678901more")
        ta.abortConnection()
        self.assertEqual(producer.events, ["pause", "resume", "stop"])

    def test_receiver_pause_holds_delivery(self) -> None:
        clock, a, b, ta, tb = self.pair(high_water=4)
        producer = Producer()
        ta.registerProducer(producer, True)
        tb.pauseProducing()  # b's protocol wants nothing for now
        ta.write(b"held back")
        clock.advance(0)
        self.assertEqual(bytes(b.data), b"")
        self.assertEqual(producer.events, ["pause"])  # the writer stays paused meanwhile
        tb.resumeProducing()
        clock.advance(0)
        self.assertEqual(bytes(b.data), b"held back")
        self.assertEqual(producer.events, ["pause", "resume"])


# -- the coordinator's server peer -----------------------------------------------------------------


def node_for(key_byte: int, address: str) -> Node:
    return Node.from_json({
        "id": key_byte, "as_of": "2026-01-01T00:00:00+00:00", "key": "nodekey:" + (bytes([key_byte]) * 32).hex(),
        "disco": "discokey:" + (bytes([key_byte]) * 32).hex(), "preferred_derp": 999, "derp_latency": {},
        "derp_forced_websockets": {}, "addresses": [f"{address}/128"], "allowed_ips": [f"{address}/128"],
        "endpoints": [],
    })


class Inbox:
    def __init__(self) -> None:
        self.responses: list[CoordinateResponse] = []
        self.closed = 0

    def send(self, response: CoordinateResponse) -> None:
        self.responses.append(response)

    def close(self) -> None:
        self.closed += 1

    def errors(self) -> list[str]:
        return [r.error for r in self.responses if r.error]

    def kinds(self, peer: uuid.UUID) -> list[str]:
        return [str(u.kind) for r in self.responses for u in r.peer_updates if u.id == peer]


class CoordinatorServerAuthTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.coord = Coordinator(self.clock)
        self.agents = [uuid.uuid4(), uuid.uuid4()]
        self.agent_inboxes = []
        for i, agent_id in enumerate(self.agents):
            inbox = Inbox()
            conn = self.coord.connect(agent_id, f"agent{i}", AgentAuth(agent_id), inbox.send, inbox.close)
            from coderstack.wire.coordination import address_from_uuid
            conn.handle(CoordinateRequest(update_self=node_for(10 + i, str(address_from_uuid(agent_id)))))
            self.agent_inboxes.append(inbox)

    def test_server_peer_may_tunnel_to_any_agent(self) -> None:
        server_id = uuid.uuid4()
        inbox = Inbox()
        conn = self.coord.connect(server_id, "server tailnet", ServerAuth(), inbox.send, inbox.close)
        conn.handle(CoordinateRequest(update_self=node_for(1, "fd7a:115c:a1e0::1234")))
        for agent_id, agent_inbox in zip(self.agents, self.agent_inboxes, strict=True):
            conn.handle(CoordinateRequest(add_tunnel=agent_id))
            self.assertIn("NODE", inbox.kinds(agent_id))
            self.assertIn("NODE", agent_inbox.kinds(server_id))  # the agent hears of us
            self.assertTrue(self.coord.tunnel_between(server_id, agent_id))
        self.assertEqual(inbox.errors(), [])
        peer = next(p for p in self.coord.debug()["peers"] if p["id"] == str(server_id))
        self.assertEqual((peer["kind"], peer["agent_id"]), ("server", None))

    def test_server_peer_limits(self) -> None:
        server_id = uuid.uuid4()
        inbox = Inbox()
        conn = self.coord.connect(server_id, "server tailnet", ServerAuth(), inbox.send, inbox.close)
        from coderstack.wire.coordination import address_from_uuid
        conn.handle(CoordinateRequest(update_self=node_for(2, str(address_from_uuid(self.agents[0])))))
        conn.handle(CoordinateRequest(update_self=node_for(3, "fd60:627a:a42b::1")))
        conn.handle(CoordinateRequest(ready_for_handshake=(self.agents[0],)))
        conn.handle(CoordinateRequest(add_tunnel=server_id))
        errors = inbox.errors()
        self.assertEqual(len(errors), 4, errors)
        self.assertIn("is the agent's address", errors[0])
        self.assertIn("is not inside", errors[1])
        self.assertIn("ready_for_handshake refused", errors[2])
        self.assertIn("tunnel to itself", errors[3])
        # An agent's id is not the server's to take.
        self.assertIsNotNone(self.coord.check_peer_id(self.agents[0], ServerAuth()))

    def test_a_user_client_still_reaches_only_its_agent(self) -> None:
        user, peer = uuid.uuid4(), uuid.uuid4()
        inbox = Inbox()
        conn = self.coord.connect(peer, "alice/client", ClientAuth(self.agents[0], user), inbox.send, inbox.close)
        conn.handle(CoordinateRequest(add_tunnel=self.agents[1]))
        self.assertIn("may only tunnel to", inbox.errors()[0])
        self.assertFalse(self.coord.tunnel_between(peer, self.agents[1]))

    def test_core_coordination_delivers_later_and_leaves_gracefully(self) -> None:
        got: list[CoordinateResponse] = []
        server_id = uuid.uuid4()
        link = CoreCoordination(self.clock, self.coord, server_id, got.append)
        link.send(CoordinateRequest(update_self=node_for(4, "fd7a:115c:a1e0::99"), add_tunnel=self.agents[0]))
        self.assertEqual(got, [])  # not inside send()
        self.clock.advance(0)
        self.assertTrue(any(u.id == self.agents[0] and str(u.kind) == "NODE" for r in got for u in r.peer_updates))
        defer.ensureDeferred(link.close())
        self.assertIsNone(self.coord.status(server_id))
        self.assertIn("DISCONNECTED", self.agent_inboxes[0].kinds(server_id))


# -- the relay's server principal -------------------------------------------------------------------


class FakeCoordinator:
    def __init__(self, auths: dict[uuid.UUID, Any], keys: dict[bytes, uuid.UUID], tunnels: set[frozenset]) -> None:
        self.auths, self.keys, self.tunnels = auths, keys, tunnels

    def auth_of(self, peer_id: uuid.UUID) -> Any:
        return self.auths.get(peer_id)

    def peer_for_node_key(self, key: bytes) -> uuid.UUID | None:
        return self.keys.get(key)

    def tunnel_between(self, a: uuid.UUID, b: uuid.UUID) -> bool:
        return frozenset((a, b)) in self.tunnels


class RelayServerPrincipalTests(unittest.TestCase):
    def test_admitted_in_browser_only_mode_unlike_users(self) -> None:
        admission = RelayAdmission(LiveSessions(task.Clock()), UserLimits(), browser_only=True)
        ticket = admission.admit(server_principal(uuid.uuid4()))
        self.assertTrue(hasattr(ticket, "release"), ticket)
        refused = admission.admit(Principal("user", uuid.uuid4()))
        self.assertEqual(getattr(refused, "status", None), 403)
        self.assertTrue(hasattr(admission.admit(Principal("agent", uuid.uuid4())), "release"))

    def test_server_principal_sends_only_from_its_own_peer_to_its_tunnels(self) -> None:
        server, agent, other_agent, user_peer = (uuid.uuid4() for _ in range(4))
        coord = FakeCoordinator(
            {server: ServerAuth(), agent: AgentAuth(agent), other_agent: AgentAuth(other_agent),
             user_peer: ClientAuth(agent, uuid.uuid4())},
            {b"S" * 32: server, b"A" * 32: agent, b"O" * 32: other_agent, b"U" * 32: user_peer},
            {frozenset((server, agent)), frozenset((user_peer, agent))},
        )
        policy = CoordinatorRelayPolicy(None, coord)
        me = server_principal(server)
        self.assertTrue(policy.allows(me, b"S" * 32, b"A" * 32))
        self.assertFalse(policy.allows(me, b"S" * 32, b"O" * 32))  # no tunnel there
        self.assertFalse(policy.allows(me, b"U" * 32, b"A" * 32))  # not its peer
        self.assertFalse(policy.allows(server_principal(user_peer), b"U" * 32, b"A" * 32))  # not a server peer
        self.assertTrue(policy.allows(Principal("agent", agent), b"A" * 32, b"S" * 32))  # agents answer


class _DERPInbox(DERPClientHandler):
    def __init__(self) -> None:
        self.packets: list[tuple[bytes, bytes]] = []
        self.up = 0

    def packet_received(self, src: bytes, data: bytes) -> None:
        self.packets.append((src, data))

    def connected(self, server_key: bytes, node: Any, websocket: bool) -> None:
        self.up += 1


class InMemoryDERPTests(unittest.TestCase):
    """Two DERP clients on one relay through the in-memory connector: login and packets."""

    def test_two_clients_relay_packets_in_memory(self) -> None:
        clock = task.Clock()
        relay = Relay(w.generate_private_key(), clock, lambda principal, src, dst: principal == "ok")
        region = DERPMap.from_json({"Regions": {"999": {
            "RegionID": 999, "RegionCode": "coder", "RegionName": "Embedded", "EmbeddedRelay": True,
            "Nodes": [{"Name": "999a", "RegionID": 999, "HostName": "127.0.0.1", "DERPPort": 1}]}}}).regions[999]
        keys = [w.generate_private_key() for _ in range(2)]
        inboxes = [_DERPInbox(), _DERPInbox()]
        clients = [DERPClient(clock, region, k, i, connector=relay_connector(clock, relay, "ok"))
                   for k, i in zip(keys, inboxes, strict=True)]
        for c in clients:
            c.start()
        for _ in range(5):
            clock.advance(0)
        self.assertEqual([i.up for i in inboxes], [1, 1])
        self.assertEqual(relay.clients, 2)
        conn = relay.active_conn(w.public_key(keys[0]))
        assert conn is not None
        self.assertIsInstance(conn.sink, DERPStreamProtocol)
        self.assertIsInstance(conn.sink.transport, MemoryTransport)
        clients[0].send(w.public_key(keys[1]), b"over memory")
        for _ in range(3):
            clock.advance(0)
        self.assertEqual(inboxes[1].packets, [(w.public_key(keys[0]), b"over memory")])
        stopped = [c.stop() for c in clients]
        for _ in range(3):
            clock.advance(0)
        self.assertTrue(all(d.called for d in stopped))
        self.assertEqual(relay.clients, 0)

    def test_dialed_again_after_the_relay_drops_it(self) -> None:
        clock = task.Clock()
        relay = Relay(w.generate_private_key(), clock, lambda *a: True)
        region = DERPMap.from_json({"Regions": {"1": {"RegionID": 1, "RegionCode": "x", "Nodes": [
            {"Name": "1a", "RegionID": 1, "HostName": "127.0.0.1"}]}}}).regions[1]
        key, inbox = w.generate_private_key(), _DERPInbox()
        client = DERPClient(clock, region, key, inbox, connector=relay_connector(clock, relay, "p"))
        client.start()
        for _ in range(3):
            clock.advance(0)
        self.assertEqual((inbox.up, relay.clients), (1, 1))
        relay.close_peer(w.public_key(key))
        for _ in range(3):
            clock.advance(0)
        self.assertEqual(relay.clients, 0)
        self.assertFalse(client.connected)
        clock.advance(client.backoff.cap)  # the retry, after the client's backoff
        for _ in range(3):
            clock.advance(0)
        self.assertEqual((inbox.up, relay.clients, relay.accepts), (2, 1, 2))
        d = client.stop()
        for _ in range(3):
            clock.advance(0)
        self.assertTrue(d.called)

    def test_refused_admission_fails_the_attempt(self) -> None:
        clock = task.Clock()
        relay = Relay(w.generate_private_key(), clock, lambda *a: True)
        admission = RelayAdmission(LiveSessions(clock), UserLimits(), browser_only=True)
        connect = relay_connector(clock, relay, Principal("user", uuid.uuid4()), admission)
        region = DERPMap.from_json({"Regions": {"1": {"RegionID": 1, "RegionCode": "x", "Nodes": [
            {"Name": "1a", "RegionID": 1, "HostName": "127.0.0.1"}]}}}).regions[1]
        failure = self.failureResultOf(connect(region.derp_nodes[0], _DERPInbox()))  # type: ignore[arg-type]
        self.assertIn("403", failure.getErrorMessage())
        self.assertEqual(relay.accepts, 0)


# -- end to end ------------------------------------------------------------------------------------


class _Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class _Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.buf += data


class ServerTailnetEndToEndTests(unittest.TestCase):
    timeout = 120

    async def setup(self, *argv: str) -> tuple[Any, str, str, uuid.UUID]:
        svc, url = await start_server(self, "--stun-address", "disable", *argv)
        self.svc = svc
        anon = self.client(url)
        await anon.post("/api/v2/users/first", {"username": "alice", "email": "a@example.com",
                                                "password": "alice password"})
        token = (await anon.post("/api/v2/users/login", {"email": "a@example.com",
                                                          "password": "alice password"}))["session_token"]
        alice = self.client(url, token)
        ws = await alice.post("/api/v2/users/me/workspaces", {"name": "dev"})
        self.alice = alice
        return svc, url, ws["agent_token"], uuid.UUID(ws["agents"][0]["id"])

    def client(self, url: str, token: str | None = None) -> Client:
        c = Client(reactor, url, token)
        self.addCleanup(c.close)
        return c

    async def agent(self, url: str, agent_token: str) -> AgentService:
        svc = AgentService(reactor, url, agent_token, made_dir(self), link_monitor=False)
        svc.serve(ANY_PORT, LocalPortForwarder(reactor))  # every other port to the agent's loopback
        svc.startService()
        # Cleanups run last-in first-out: the agent stops, then the server sees its websocket
        # close (and records it) before the server itself stops.
        sockets = self.svc.deployment._agent_sockets
        self.addCleanup(wait_until, lambda: not sockets, "the server to see the agent's websocket close")
        self.addCleanup(svc.stopService)
        await wait_until(lambda: svc.conn is not None and svc.coordination is not None,
                         "the agent's tunnel and coordination")
        return svc

    def echo_server(self) -> int:
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(_Echo), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def exchange(self, endpoint: Any, payload: bytes) -> bytes:
        proto = await endpoint.connect(protocol.Factory.forProtocol(_Collect))
        self.addCleanup(proto.transport.abortConnection)
        proto.transport.write(payload)
        await wait_until(lambda: len(proto.buf) >= len(payload), "the echo")
        proto.transport.loseConnection()
        return bytes(proto.buf)

    async def test_direct_on_loopback_and_tunnels_reused(self) -> None:
        svc, url, agent_token, agent_id = await self.setup()
        tailnet: ServerTailnet = svc.deployment.tailnet
        self.assertIsInstance(tailnet, ServerTailnet)
        await self.agent(url, agent_token)
        port = self.echo_server()
        first, second = await defer.gatherResults([
            defer.ensureDeferred(tailnet.connect(agent_id, port)),
            defer.ensureDeferred(tailnet.connect(agent_id, port))])
        payload = os.urandom(200_000)
        self.assertEqual(await self.exchange(first, payload), payload)
        self.assertEqual(await self.exchange(second, b"again"), b"again")
        third = await tailnet.connect(agent_id, port)
        self.assertEqual(await self.exchange(third, b"third"), b"third")
        # One tunnel for the three connects (two of them at once).
        self.assertEqual(list(tailnet.paths()), [agent_id])
        self.assertEqual(list(tailnet.client.tunnels), [agent_id])
        self.assertEqual(svc.deployment.coordinator.tunnel_peers(tailnet.peer_id), [agent_id])
        await wait_until(lambda: tailnet.paths()[agent_id]["path"] == "p2p", "a direct path")
        await wait_until(lambda: tailnet.paths()[agent_id]["latency_ms"] is not None, "a latency")
        p = tailnet.paths()[agent_id]
        self.assertEqual(p["agent_id"], str(agent_id))
        self.assertRegex(p["endpoint"], r"^[0-9.]+:[0-9]+$")
        self.assertIsNone(p["derp_region"])
        # The DERP connection to the embedded relay is the in-memory one, as the server principal.
        relay = svc.deployment.relay
        conn = relay.active_conn(tailnet.keys.node_public)
        assert conn is not None
        self.assertIsInstance(conn.sink.transport, MemoryTransport)
        self.assertEqual(conn.principal, server_principal(tailnet.peer_id))

    async def test_block_direct_goes_via_derp_in_memory(self) -> None:
        svc, url, agent_token, agent_id = await self.setup("--block-direct-connections")
        tailnet: ServerTailnet = svc.deployment.tailnet
        await self.agent(url, agent_token)
        port = self.echo_server()
        endpoint = await tailnet.connect(agent_id, port)
        payload = os.urandom(100_000)
        self.assertEqual(await self.exchange(endpoint, payload), payload)
        await wait_until(lambda: tailnet.paths()[agent_id]["latency_ms"] is not None, "a latency")
        p = tailnet.paths()[agent_id]
        self.assertEqual((p["path"], p["derp_region"], p["endpoint"]), ("derp", 999, None))
        self.assertEqual(tailnet.client.conn.status()["endpoints"], [])
        relay = svc.deployment.relay
        ours = relay.active_conn(tailnet.keys.node_public)
        assert ours is not None
        self.assertIsInstance(ours.sink.transport, MemoryTransport)
        # Every other connection on the relay came over TCP: the agent's, and only the agent's.
        others = [c for k, cs in relay._conns.items() for c in cs if k != tailnet.keys.node_public]
        self.assertEqual(len(others), 1)
        self.assertNotIsInstance(others[0].sink.transport, MemoryTransport)
        self.assertGreater(relay.bytes_sent, len(payload))
        # netcheck measured the embedded region (no STUN here: over HTTP) without leaving memory.
        conn = tailnet.client.conn
        await wait_until(lambda: conn.last_report is not None, "the first netcheck report")
        self.assertIn(999, conn.last_report.region_latency)
        self.assertEqual(conn.preferred_derp, 999)
        self.assertGreater(tailnet.netcheck_http.answered, 0)
        self.assertEqual(tailnet.netcheck_http.sent, 0)
        # ... and the metrics say so.
        text = svc.deployment.metrics_text()
        self.assertIn("coderstack_server_tailnet_tunnels 1\n", text)
        self.assertIn(f'coderstack_server_tailnet_latency_seconds{{agent_id="{agent_id}",path="derp"}}', text)

    async def test_browser_only_still_reaches_agents(self) -> None:
        svc, url, agent_token, agent_id = await self.setup("--browser-only", "true")
        await self.agent(url, agent_token)
        endpoint = await svc.deployment.tailnet.connect(agent_id, self.echo_server())
        self.assertEqual(await self.exchange(endpoint, b"apps work"), b"apps work")

    async def test_agent_restart_gets_a_fresh_tunnel(self) -> None:
        svc, url, agent_token, agent_id = await self.setup()
        tailnet: ServerTailnet = svc.deployment.tailnet
        port = self.echo_server()
        agent = await self.agent(url, agent_token)
        endpoint = await tailnet.connect(agent_id, port)
        self.assertEqual(await self.exchange(endpoint, b"before"), b"before")
        await agent.stopService()  # a graceful leave: the server tailnet hears DISCONNECTED
        await wait_until(lambda: tailnet.client.tunnels[agent_id].key is None, "the agent's departure")
        tailnet.dial_timeout = 0.3
        with self.assertRaises(AgentUnreachable):
            await tailnet.connect(agent_id, port)
        tailnet.dial_timeout = 20
        await self.agent(url, agent_token)  # back, with new keys
        endpoint = await tailnet.connect(agent_id, port)
        self.assertEqual(await self.exchange(endpoint, b"after"), b"after")

    async def test_unreachable_agent(self) -> None:
        svc, url, agent_token, agent_id = await self.setup()
        tailnet: ServerTailnet = svc.deployment.tailnet
        tailnet.dial_timeout = 0.3
        with self.assertRaises(AgentUnreachable) as caught:
            await tailnet.connect(agent_id, 80)
        self.assertIn("not connected", str(caught.exception))
        self.assertEqual(tailnet.paths(), {})  # a failed dial leaves no tunnel behind
        self.assertEqual(svc.deployment.coordinator.tunnel_peers(tailnet.peer_id), [])

    async def test_debug_route(self) -> None:
        svc, url, agent_token, agent_id = await self.setup()
        await self.agent(url, agent_token)
        await svc.deployment.tailnet.connect(agent_id, self.echo_server())
        import treq

        async def get(token: str | None) -> tuple[int, Any]:
            headers = {"Coder-Session-Token": token} if token else {}
            resp = await treq.get(f"{url}/api/v2/debug/tailnet", headers=headers, persistent=False)
            return resp.code, json.loads(await resp.content())

        code, body = await get(self.alice.token)
        self.assertEqual(code, 200)
        self.assertEqual([a["agent_id"] for a in body["agents"]], [str(agent_id)])
        self.assertIn(body["agents"][0]["path"], ("p2p", "derp"))
        await self.alice.post("/api/v2/users", {"username": "bob", "email": "b@example.com",
                                                "password": "bobs password"})
        anon = self.client(url)
        bob = (await anon.post("/api/v2/users/login", {"email": "b@example.com",
                                                       "password": "bobs password"}))["session_token"]
        code, body = await get(bob)
        self.assertEqual(code, 403)
        self.assertIn("message", body)
        code, body = await get(None)
        self.assertEqual(code, 401)
        self.assertIn("message", body)


# -- idle removal on a controllable clock -----------------------------------------------------------


class _FakeClient:
    """The TailnetClient parts ServerTailnet uses, with tunnels that are ready at once."""

    def __init__(self) -> None:
        self.tunnels: dict[uuid.UUID, Tunnel] = {}
        self.removed: list[uuid.UUID] = []
        self.pings = 0
        self.conn = type("C", (), {"device": type("D", (), {"peers": {}})(), "sock": type("S", (), {"peers": {}})(),
                                   "preferred_derp": 999})()

    def add_tunnel(self, agent_id: uuid.UUID) -> Tunnel:
        t = self.tunnels[agent_id] = Tunnel(agent_id, key=b"k" * 32)
        return t

    def remove_tunnel(self, agent_id: uuid.UUID) -> None:
        self.tunnels.pop(agent_id, None)
        self.removed.append(agent_id)

    async def reachable(self, tunnel: Tunnel, *, timeout: float, grace: float) -> None:
        return None

    def ping(self, tunnel: Tunnel) -> defer.Deferred[Any]:
        self.pings += 1
        return defer.Deferred()

    def endpoint(self, tunnel: Tunnel, port: int, timeout: float = 30) -> Any:
        from coderstack.netstack.endpoints import NetstackClientEndpoint
        return NetstackClientEndpoint(None, "fd7a:115c:a1e0::1", port, timeout=timeout)  # type: ignore[arg-type]


class _SlowClient(_FakeClient):
    """Dials that wait for the test: ``reachable`` returns one Deferred per call."""

    def __init__(self) -> None:
        super().__init__()
        self.dials: list[defer.Deferred[None]] = []

    def reachable(self, tunnel: Tunnel, *, timeout: float, grace: float) -> defer.Deferred[None]:  # type: ignore[override]
        d: defer.Deferred[None] = defer.Deferred()
        self.dials.append(d)
        return d


class DialTests(unittest.TestCase):
    def tailnet(self) -> tuple[task.Clock, ServerTailnet, _SlowClient]:
        clock = task.Clock()
        coordinator = Coordinator(clock)
        tn = ServerTailnet(clock, type("D", (), {"coordinator": coordinator})(), dial_timeout=5)
        fake = _SlowClient()
        tn.client = fake  # type: ignore[assignment]
        return clock, tn, fake

    def test_concurrent_callers_share_one_dial(self) -> None:
        clock, tn, fake = self.tailnet()
        a = uuid.uuid4()
        first = defer.ensureDeferred(tn.connect(a, 80))
        second = defer.ensureDeferred(tn.connect(a, 81))
        self.assertEqual(len(fake.dials), 1)
        self.assertNoResult(first)
        fake.dials[0].callback(None)
        self.assertEqual(self.successResultOf(first).port, 80)
        self.assertEqual(self.successResultOf(second).port, 81)
        self.successResultOf(defer.ensureDeferred(tn.connect(a, 82)))
        self.assertEqual(len(fake.dials), 1)  # reused, no new dial
        self.assertEqual(list(fake.tunnels), [a])

    def test_a_failed_dial_fails_every_caller_and_leaves_no_tunnel(self) -> None:
        from coderstack.tailnet.client import DialError
        clock, tn, fake = self.tailnet()
        a = uuid.uuid4()
        callers = [defer.ensureDeferred(tn.connect(a, 80)) for _ in range(2)]
        fake.dials[0].errback(DialError("timed out"))
        for d in callers:
            failure = self.failureResultOf(d, AgentUnreachable)
            self.assertIn("not connected to the server", failure.getErrorMessage())
        self.assertEqual((fake.removed, tn.paths()), ([a], {}))
        again = defer.ensureDeferred(tn.connect(a, 80))  # the next request dials afresh
        self.assertEqual(len(fake.dials), 2)
        fake.dials[1].callback(None)
        self.successResultOf(again)

    def test_a_caller_that_goes_away_does_not_disturb_the_others(self) -> None:
        clock, tn, fake = self.tailnet()
        a = uuid.uuid4()
        gone = defer.ensureDeferred(tn.connect(a, 80))
        staying = defer.ensureDeferred(tn.connect(a, 80))
        gone.cancel()
        self.failureResultOf(gone, defer.CancelledError)
        fake.dials[0].callback(None)
        self.successResultOf(staying)

    def test_an_agent_that_left_is_dialed_again(self) -> None:
        clock, tn, fake = self.tailnet()
        a = uuid.uuid4()
        first = defer.ensureDeferred(tn.connect(a, 80))
        fake.dials[0].callback(None)
        self.successResultOf(first)
        fake.tunnels[a].key = None  # DISCONNECTED
        again = defer.ensureDeferred(tn.connect(a, 80))
        self.assertEqual((fake.removed, len(fake.dials)), ([a], 2))
        fake.dials[1].callback(None)
        self.successResultOf(again)


class IdleTests(unittest.TestCase):
    def tailnet(self) -> tuple[task.Clock, ServerTailnet, _FakeClient]:
        clock = task.Clock()
        tn = ServerTailnet(clock, object(), idle_timeout=300.0)
        fake = _FakeClient()
        tn.client = fake  # type: ignore[assignment]
        return clock, tn, fake

    def test_idle_tunnels_removed_on_one_timer(self) -> None:
        clock, tn, fake = self.tailnet()
        a, b = uuid.uuid4(), uuid.uuid4()
        self.successResultOf(defer.ensureDeferred(tn.connect(a, 80)))
        clock.advance(100)
        self.successResultOf(defer.ensureDeferred(tn.connect(b, 80)))
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(199)
        self.successResultOf(defer.ensureDeferred(tn.connect(a, 81)))  # a used again at t=299
        clock.advance(1)  # t=300: a is not idle any more
        self.assertEqual(fake.removed, [])
        clock.advance(100)  # t=400: b idle for 300 s
        self.assertEqual(fake.removed, [b])
        self.assertEqual(list(tn.paths()), [a])
        clock.advance(199)
        self.assertEqual(fake.removed, [b, a])
        self.assertEqual(clock.getDelayedCalls(), [])  # nothing left, no timer

    def test_traffic_keeps_a_tunnel(self) -> None:
        clock, tn, fake = self.tailnet()
        a = uuid.uuid4()
        self.successResultOf(defer.ensureDeferred(tn.connect(a, 80)))
        peer = type("P", (), {"rx_bytes": 0, "tx_bytes": 0})()
        fake.conn.device.peers[b"k" * 32] = peer
        peer.rx_bytes = 100  # a long connection carries data, without new connects
        clock.advance(300)
        self.assertEqual(fake.removed, [])
        clock.advance(300)  # nothing moved since
        self.assertEqual(fake.removed, [a])

    def test_close_cancels_the_timer(self) -> None:
        clock, tn, fake = self.tailnet()
        self.successResultOf(defer.ensureDeferred(tn.connect(uuid.uuid4(), 80)))
        fake.close = lambda: defer.succeed(None)  # type: ignore[attr-defined]

        async def close() -> None:
            return None

        fake.close = close  # type: ignore[attr-defined]
        self.successResultOf(defer.ensureDeferred(tn.close()))
        self.assertEqual(clock.getDelayedCalls(), [])
        self.failureResultOf(defer.ensureDeferred(tn.connect(uuid.uuid4(), 80)), AgentUnreachable)

    def test_latency_ping_at_most_every_30_s(self) -> None:
        clock, tn, fake = self.tailnet()
        a = uuid.uuid4()
        self.successResultOf(defer.ensureDeferred(tn.connect(a, 80)))
        self.assertEqual(fake.pings, 1)  # when it became reachable
        tn._tunnels[a].pinging = False
        clock.advance(10)
        self.successResultOf(defer.ensureDeferred(tn.connect(a, 80)))
        self.assertEqual(fake.pings, 1)
        clock.advance(21)
        self.successResultOf(defer.ensureDeferred(tn.connect(a, 80)))
        self.assertEqual(fake.pings, 2)


class _Registering:
    """The TailnetClient parts coordination uses."""

    def __init__(self) -> None:
        self.responses: list[CoordinateResponse] = []
        self.coordination: Any = None
        self.registered = 0

    def handle_response(self, response: CoordinateResponse) -> None:
        self.responses.append(response)

    def coordinate(self, coordination: Any) -> None:
        self.coordination = coordination

    def register(self) -> None:
        self.registered += 1


class RejoinTests(unittest.TestCase):
    def test_joins_again_after_being_kicked_not_after_shutdown(self) -> None:
        clock = task.Clock()
        coord = Coordinator(clock, max_refusals=3)
        deployment = type("D", (), {"coordinator": coord})()
        tn = ServerTailnet(clock, deployment)
        fake = _Registering()
        tn.client = fake  # type: ignore[assignment]
        tn._join()
        self.assertEqual((coord.status(tn.peer_id), fake.registered), ("connected", 1))
        for _ in range(3):  # a server peer may not send this: refused, then kicked
            fake.coordination.send(CoordinateRequest(ready_for_handshake=(uuid.uuid4(),)))
        self.assertIsNone(coord.status(tn.peer_id))
        clock.advance(1.0)
        self.assertEqual((coord.status(tn.peer_id), fake.registered, tn.rejoins), ("connected", 2, 1))
        coord.close()  # shutdown: no rejoin
        clock.advance(5)
        self.assertEqual(tn.rejoins, 1)
        self.assertEqual(clock.getDelayedCalls(), [])
