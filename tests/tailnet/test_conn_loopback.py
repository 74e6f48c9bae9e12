"""Two Conns with real UDP sockets on 127.0.0.1 and a real DERP relay (allow-all policy)."""

from __future__ import annotations

import ipaddress

from twisted.internet import defer, reactor
from twisted.trial import unittest

from coderstack.derp.policy import AllowAllPolicy
from coderstack.derpmap import DERPMap
from coderstack.tailnet.conn import Conn
from tests.derp.helpers import RelayServer
from tests.support.waiting import wait_until
from tests.tailnet.test_conn import ipv6_packet


class LoopbackTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.server = RelayServer(self, AllowAllPolicy())
        self.derp_map = DERPMap(regions={999: self.server.region()})

    def conn(self, block: bool = False) -> Conn:
        c = Conn(reactor, derp_token="tok", netcheck=False, block_endpoints=block,
                 interface_addresses=lambda: [ipaddress.ip_address("127.0.0.1")])
        c.start(0, "127.0.0.1")
        c.set_derp_map(self.derp_map)
        self.addCleanup(lambda: defer.ensureDeferred(c.close()))
        return c

    async def pair(self, block: bool = False) -> tuple[Conn, Conn, list[bytes]]:
        a, b = self.conn(block), self.conn()
        nodes: dict[str, object] = {}
        a.on_node_change(lambda n: nodes.__setitem__("a", n))
        b.on_node_change(lambda n: nodes.__setitem__("b", n))
        a.update_peer(nodes["b"])
        b.update_peer(nodes["a"])
        got: list[bytes] = []
        b.on_packet(lambda k, p: got.append(p))
        await wait_until(lambda: 999 in a.sock.derp_connected and 999 in b.sock.derp_connected, "both DERP logins")
        return a, b, got

    async def test_derp_then_direct(self) -> None:
        a, b, got = await self.pair()
        bkey = b.keys.node_public
        a.send_packet(None, ipv6_packet(a.address, b.address, b"first"))
        await wait_until(lambda: len(got) == 1, "the first packet")
        self.assertEqual(got[0][40:], b"first")
        self.assertGreater(self.server.relay.packets_received, 0)  # before any pong: via DERP too
        await wait_until(lambda: a.path(bkey)[0].startswith("p2p"), "a direct path from a")
        port = b.sock.local_port
        self.assertEqual(a.path(bkey), (f"p2p 127.0.0.1:{port}", ""))
        await wait_until(lambda: b.path(a.keys.node_public)[0].startswith("p2p"), "a direct path from b")
        relayed = self.server.relay.packets_received
        for i in range(20):
            a.send_packet(None, ipv6_packet(a.address, b.address, b"n%d" % i))
        await wait_until(lambda: len(got) == 21, "the twenty packets")
        self.assertEqual(self.server.relay.packets_received, relayed)  # none went via DERP
        result = await a.ping(bkey)
        self.assertEqual((result.kind, result.endpoint), ("p2p", f"127.0.0.1:{port}"))
        self.assertLess(result.latency, 1.0)

    async def test_block_endpoints_stays_on_derp(self) -> None:
        a, b, got = await self.pair(block=True)
        bkey = b.keys.node_public
        for i in range(5):
            a.send_packet(None, ipv6_packet(a.address, b.address, b"n%d" % i))
        await wait_until(lambda: len(got) == 5, "the five packets")
        result = await a.ping(bkey)
        self.assertEqual((result.kind, result.derp_name), ("derp", "Coder Embedded Relay"))
        self.assertEqual(a.path(bkey), ("DERP(Coder Embedded Relay)", "direct connections disabled"))
        # b was never told a direct address and never learned one.
        self.assertEqual(b.path(a.keys.node_public)[1], "no endpoints")
