"""The agent's tunnel end to end on loopback: API + DERP relay + coordinator on one port, a real
AgentService, and a client from ``dial_agent``; data flows and ``ping`` reports the path."""

from __future__ import annotations

import ipaddress
import os

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site

from coderstack.agent.service import AgentService
from coderstack.derp.policy import AllowAllPolicy
from coderstack.derp.server import make_derp_resources, make_relay
from coderstack.sdk import Client
from coderstack.tailnet.dial import AgentTunnel, dial_agent
from coderstack.wire import derp as w
from tests.support.api import Caller, make_deployment
from tests.support.tempdirs import made_dir
from tests.support.waiting import wait_until
from tests.tailnet.test_conn import ipv6_packet


def autobahn_timers() -> list[object]:
    """The reactor's pending calls that belong to Autobahn's (txaio's) batched timers."""
    return [c for c in reactor.getDelayedCalls()
            if type(getattr(c.func, "__self__", None)).__module__.startswith("txaio")]


class _Root(Resource):
    """``/derp`` and friends to the relay, everything else to the Klein app."""

    def __init__(self, app_resource: Resource, derp: dict[str, Resource]) -> None:
        super().__init__()
        self.app_resource = app_resource
        for path, res in derp.items():
            self.putChild(path.lstrip("/").encode(), res)

    def getChild(self, name: bytes, request):
        request.prepath.pop()
        request.postpath.insert(0, name)
        return self.app_resource


class AgentTunnelTests(unittest.TestCase):
    timeout = 60

    async def start(self, **cfg) -> tuple[str, str, str, str]:
        # Runs last: the websockets' ends (after the close handshakes the cleanups start) cancel
        # the timers Autobahn keeps for them; wait for that instead of leaving them to the janitor.
        self.addCleanup(wait_until, lambda: not autobahn_timers(), "the websockets to end")
        d, api = await make_deployment(self, **cfg)
        caller = Caller(api)
        token = await caller.owner()
        _, ws = await caller.call("POST", "/api/v2/users/me/workspaces", {"name": "dev"}, token=token)
        relay = make_relay(w.generate_private_key(), AllowAllPolicy(), reactor)
        site = Site(_Root(api.app.resource(), make_derp_resources(relay, AllowAllPolicy())))
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}"
        return url, token, ws["agent_token"], ws["agents"][0]["id"]

    async def agent(self, url: str, agent_token: str) -> AgentService:
        data = made_dir(self)
        svc = AgentService(reactor, url, agent_token, data)
        svc.startService()
        self.addCleanup(svc.stopService)
        await wait_until(lambda: svc.conn is not None and svc.coordination is not None, "the agent's tunnel and coordination")
        return svc

    async def dial(self, url: str, token: str, agent_id: str, **kw) -> AgentTunnel:
        client = Client(reactor, url, token)
        self.addCleanup(client.close)
        tunnel = await dial_agent(reactor, client, agent_id, **kw)
        self.addCleanup(lambda: defer.ensureDeferred(tunnel.close()))
        return tunnel

    async def test_client_reaches_agent_and_goes_direct(self) -> None:
        url, token, agent_token, agent_id = await self.start()
        svc = await self.agent(url, agent_token)
        tunnel = await self.dial(url, token, agent_id)
        conn = tunnel.conn
        self.assertEqual(tunnel.address, svc.conn.address)
        got: list[bytes] = []
        svc.conn.on_packet(lambda key, pkt: got.append(pkt))
        replies: list[bytes] = []
        conn.on_packet(lambda key, pkt: replies.append(pkt))
        # The agent echoes (a stand-in for its netstack).
        svc.conn.on_packet(lambda key, pkt: svc.conn.send_packet(None, ipv6_packet(
            ipaddress.IPv6Address(pkt[24:40]), ipaddress.IPv6Address(pkt[8:24]), pkt[40:])))
        conn.send_packet(None, ipv6_packet(conn.address, tunnel.address, b"hello agent"))
        await wait_until(lambda: replies, "the echoed packet")
        self.assertEqual(got[0][40:], b"hello agent")
        self.assertEqual(replies[0][40:], b"hello agent")
        await wait_until(lambda: conn.path(tunnel.key)[0].startswith("p2p"), "a direct path to the agent")
        result = await tunnel.ping()
        self.assertTrue(result.p2p, result)
        status = svc.conn.status()
        self.assertEqual(status["home_region_name"], "Coder Embedded Relay")
        self.assertIn(conn.keys.node_public.hex(), status["peers"])

    async def test_disable_direct_stays_relayed(self) -> None:
        url, token, agent_token, agent_id = await self.start()
        svc = await self.agent(url, agent_token)
        tunnel = await self.dial(url, token, agent_id, disable_direct=True)
        conn = tunnel.conn
        got: list[bytes] = []
        svc.conn.on_packet(lambda key, pkt: got.append(pkt))
        for i in range(3):
            conn.send_packet(None, ipv6_packet(conn.address, tunnel.address, b"n%d" % i))
        await wait_until(lambda: len(got) == 3, "the three packets")
        result = await tunnel.ping()
        self.assertEqual((result.kind, result.derp_name), ("derp", "Coder Embedded Relay"))
        self.assertEqual(conn.status()["endpoints"], [])

    async def test_coordinator_reconnect_keeps_the_tunnel(self) -> None:
        url, token, agent_token, agent_id = await self.start()
        svc = await self.agent(url, agent_token)
        tunnel = await self.dial(url, token, agent_id)
        conn = tunnel.conn
        got: list[bytes] = []
        svc.conn.on_packet(lambda key, pkt: got.append(pkt))
        conn.send_packet(None, ipv6_packet(conn.address, tunnel.address, b"before"))
        await wait_until(lambda: got, "the packet before")
        handshake = svc.conn.last_handshake[conn.keys.node_public]
        # The agent's coordination websocket dies (a server restart looks the same to it).
        svc.coordination.proto.transport.abortConnection()
        await wait_until(lambda: svc.sessions == 2 and svc.coordination is not None, "the agent's second session")
        conn.send_packet(None, ipv6_packet(conn.address, tunnel.address, b"after"))
        await wait_until(lambda: len(got) == 2, "the packet after")
        self.assertEqual(got[1][40:], b"after")
        self.assertEqual(svc.conn.last_handshake[conn.keys.node_public], handshake)


class _Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class _Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.buf += data


class AgentNetstackTests(unittest.TestCase):
    """TCP over the tunnel: the agent's netstack serves, the client's netstack dials."""

    timeout = 60
    start = AgentTunnelTests.start
    agent = AgentTunnelTests.agent
    dial = AgentTunnelTests.dial

    async def test_tcp_through_the_tunnel_byte_exact(self) -> None:
        url, token, agent_token, agent_id = await self.start()
        svc = await self.agent(url, agent_token)
        svc.serve(9000, protocol.Factory.forProtocol(_Echo))
        tunnel = await self.dial(url, token, agent_id)
        proto = await tunnel.endpoint(9000).connect(protocol.Factory.forProtocol(_Collect))
        self.addCleanup(proto.transport.abortConnection)
        payload = os.urandom(1 << 20)
        proto.transport.write(payload)
        await wait_until(lambda: len(proto.buf) >= len(payload), "the echoed MiB")
        self.assertEqual(bytes(proto.buf), payload)
        self.assertEqual(proto.transport.getPeer().host, str(svc.conn.address))

    async def test_tcp_over_relay_only(self) -> None:
        url, token, agent_token, agent_id = await self.start()
        svc = await self.agent(url, agent_token)
        svc.serve(9000, protocol.Factory.forProtocol(_Echo))
        tunnel = await self.dial(url, token, agent_id, disable_direct=True)
        proto = await tunnel.endpoint(9000).connect(protocol.Factory.forProtocol(_Collect))
        self.addCleanup(proto.transport.abortConnection)
        payload = os.urandom(256 * 1024)
        proto.transport.write(payload)
        await wait_until(lambda: len(proto.buf) >= len(payload), "the echoed 256 KiB")
        self.assertEqual(bytes(proto.buf), payload)
        self.assertEqual(tunnel.conn.path(tunnel.key)[0], "DERP(Coder Embedded Relay)")
