"""Path-MTU probing between two real Conns on 127.0.0.1 (loopback MTU 65536): the tunnel MTU
rises above 1280 and TCP over the netstacks carries 10 MiB byte-exact; with probing off it stays
at 1280; a path that falls back to DERP drops to 1280 and the same TCP connection survives."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest

from coderstack.derp.policy import AllowAllPolicy
from coderstack.derpmap import DERPMap
from coderstack.tailnet import pmtu
from tests.derp.helpers import RelayServer
from tests.interop.pmtu_pair import Sink, Source, introduce, make_conn, transfer
from tests.support.waiting import wait_until


class LoopbackPMTUTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = RelayServer(self, AllowAllPolicy())
        self.derp_map = DERPMap(regions={999: self.server.region()})

    def conn(self, **kw):
        c = make_conn(reactor, self.derp_map, **kw)
        self.addCleanup(lambda: defer.ensureDeferred(c.close()))
        return c

    async def pair(self, **kw):
        a, b = self.conn(**kw), self.conn(**kw)
        introduce(a, b)
        await wait_until(lambda: 999 in a.sock.derp_connected and 999 in b.sock.derp_connected, "both DERP logins")
        return a, b

    async def test_mtu_rises_and_10mib_is_exact(self) -> None:
        a, b = await self.pair(pmtu=True)
        self.assertTrue(a.sock.dont_fragment)
        bkey, akey = b.keys.node_public, a.keys.node_public
        await a.ping(bkey)  # starts discovery, as dialing does
        await wait_until(lambda: a.path_mtu(bkey) == pmtu.MAX_MTU, "the path MTU to reach the maximum")
        self.assertTrue(a.path(bkey)[0].startswith("p2p"))
        self.assertEqual(a.netstack.stack.path_mtu[b.address.packed], pmtu.MAX_MTU)
        total = 10 << 20
        count, sent, got = await transfer(reactor, a, b, total)
        self.assertEqual((count, got), (total, sent))
        # The data went in large packets: far fewer than 10 MiB / 1220 segments crossed.
        self.assertLess(a.device.peers[bkey].tx_bytes, total * 1.01)
        self.assertGreater(b.status()["peers"][akey.hex()]["rx_bytes"], total)
        self.assertEqual(a.status()["peers"][bkey.hex()]["path_mtu"], pmtu.MAX_MTU)

    async def test_off_stays_at_1280(self) -> None:
        a, b = await self.pair(pmtu=False)
        self.assertFalse(a.sock.dont_fragment)
        bkey = b.keys.node_public
        await a.ping(bkey)
        await wait_until(lambda: a.path(bkey)[0].startswith("p2p"), "a direct path")
        # Probes would have gone with the discovery pings: a ping sent now over the direct path
        # is answered after them.
        await a.ping(bkey)
        self.assertEqual(a.path_mtu(bkey), 1280)
        sizes: list[int] = []
        b.on_packet(lambda k, p: sizes.append(len(p)))
        count, sent, got = await transfer(reactor, a, b, 1 << 20)
        self.assertEqual((count, got), (1 << 20, sent))
        self.assertEqual(max(sizes), 1280)  # full segments, and no larger
        self.assertEqual(a.netstack.stack.path_mtu, {})

    async def test_fallback_to_derp_lowers_mtu_and_tcp_survives(self) -> None:
        """Mid-transfer, UDP between the two stops (as if a NAT mapping died): trust lapses, the
        path becomes DERP at 1280, the netstack re-segments, and the bytes still arrive exactly.
        (The relay's MTU is set to 1280 here so the fall-back is also a shrink; by default DERP
        carries 64 KiB, see the next test.)"""
        a, b = await self.pair(pmtu=True, derp_mtu=1280)
        bkey, akey = b.keys.node_public, a.keys.node_public
        await a.ping(bkey)
        await b.ping(akey)
        await wait_until(lambda: a.path_mtu(bkey) == pmtu.MAX_MTU and b.path_mtu(akey) == pmtu.MAX_MTU, "both path MTUs at the maximum")
        sink = Sink()
        from twisted.internet import protocol

        from coderstack.tailnet.stack import client_endpoint, server_endpoint

        port = await server_endpoint(b.netstack, 5002).listen(protocol.Factory.forProtocol(lambda: sink))
        self.addCleanup(port.stopListening)
        total = 24 << 20
        source = Source(total, bytes(range(256)) * 1024)
        await client_endpoint(a.netstack, b.address, 5002).connect(protocol.Factory.forProtocol(lambda: source))
        await wait_until(lambda: sink.count > 2 << 20, "2 MiB at the sink")
        # Cut direct UDP both ways: each side's socket now drops the other's datagrams.
        for me, other in ((a, b), (b, a)):
            other_port = other.sock.local_port
            orig = me.sock.datagramReceived

            def drop(datagram, addr, orig=orig, other_port=other_port):
                if addr[1] != other_port:
                    orig(datagram, addr)

            me.sock.datagramReceived = drop
        await wait_until(lambda: a.path_mtu(bkey) == 1280, "the path MTU to fall back to 1280")
        self.assertTrue(a.path(bkey)[0].startswith("DERP("))
        self.assertEqual(a.netstack.stack.path_mtu.get(b.address.packed), None)
        count, digest = await sink.done
        self.assertEqual((count, digest), (total, source.hash.hexdigest()))
        self.assertGreater(self.server.relay.packets_received, 0)

    async def test_relayed_by_default_at_64k(self) -> None:
        """With direct paths blocked the tunnel goes through DERP at the relay's 64 KiB MTU (no
        probing needed over TCP), and 10 MiB arrive exactly."""
        a, b = await self.pair(pmtu=True, block=True)
        bkey = b.keys.node_public
        sizes: list[int] = []
        b.on_packet(lambda k, p: sizes.append(len(p)))
        count, sent, got = await transfer(reactor, a, b, 10 << 20)
        self.assertEqual((count, got), (10 << 20, sent))
        self.assertEqual(a.path_mtu(bkey), pmtu.MAX_MTU)
        self.assertTrue(a.path(bkey)[0].startswith("DERP("))
        self.assertGreater(max(sizes), 1280)
        self.assertLessEqual(max(sizes), pmtu.MAX_MTU)
