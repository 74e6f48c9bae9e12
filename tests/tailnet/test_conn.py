"""Two Conns over an in-memory network and a fake DERP relay, on a task.Clock."""

from __future__ import annotations

import ipaddress
import struct

from twisted.internet import task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from coderstack.derpmap import DERPMap
from coderstack.tailnet.conn import Conn
from coderstack.tailnet.endpoint import PingResult
from tests.tailnet.fakenet import Network

DERP_MAP = DERPMap.from_json({"Regions": {"999": {
    "RegionID": 999, "RegionCode": "coder", "RegionName": "Coder Embedded Relay", "EmbeddedRelay": True,
    "Nodes": [{"Name": "999b", "RegionID": 999, "HostName": "127.0.0.1", "DERPPort": 1, "STUNPort": -1,
               "ForceHTTP": True}]}}})


def ipv6_packet(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, payload: bytes) -> bytes:
    # version 6, next header 59 (no next header), hop limit 64
    return struct.pack(">IHBB", 6 << 28, len(payload), 59, 64) + src.packed + dst.packed + payload


class Pair:
    def __init__(self, testcase: unittest.TestCase, block: bool = False, a_ip: str = "192.0.2.1",
                 b_ip: str = "198.51.100.1") -> None:
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)  # wall-clock-like seconds for TAI64N
        self.net = Network(self.clock)
        self.a = self._conn(a_ip, 41641, block)
        self.b = self._conn(b_ip, 41642, False)
        self.received: dict[str, list[bytes]] = {"a": [], "b": []}
        self.a.on_packet(lambda k, p: self.received["a"].append(p))
        self.b.on_packet(lambda k, p: self.received["b"].append(p))
        self.nodes = {"a": [], "b": []}
        self.a.on_node_change(self.nodes["a"].append)
        self.b.on_node_change(self.nodes["b"].append)
        self.a.update_peer(self.nodes["b"][-1])
        self.b.update_peer(self.nodes["a"][-1])

    def _conn(self, ip: str, port: int, block: bool) -> Conn:
        conn = Conn(self.clock, netcheck=False, block_endpoints=block,
                    interface_addresses=lambda: [ipaddress.ip_address(ip)])
        conn.sock.derp_client_factory = self.net.derp_factory(conn.keys.node_public)
        self.net.attach(conn, ip, port)
        conn.set_derp_map(DERP_MAP)
        return conn

    def send(self, n: int = 1) -> None:
        for i in range(n):
            self.a.send_packet(None, ipv6_packet(self.a.address, self.b.address, b"ping %d" % i))

    def run(self, seconds: float, step: float = 0.001) -> None:
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(step)


class ConnTests(unittest.TestCase):
    def test_node_announces_endpoints_and_home(self) -> None:
        p = Pair(self)
        node = p.nodes["a"][-1]
        self.assertEqual(node.preferred_derp, 999)
        self.assertEqual(node.endpoints, ("192.0.2.1:41641",))
        self.assertEqual(node.addresses[0].network_address, p.a.address)
        self.assertEqual(node.disco, p.a.keys.disco_public)

    def test_derp_first_then_direct(self) -> None:
        p = Pair(self)
        p.send()
        p.run(0.05)
        self.assertEqual(len(p.received["b"]), 1)
        self.assertGreater(p.net.derp_delivered, 0)
        p.run(0.2)
        self.assertEqual(p.a.path(p.b.keys.node_public), ("p2p 198.51.100.1:41642", ""))
        derp_before = p.net.derp_delivered
        p.send(10)
        p.run(0.05)
        self.assertEqual(len(p.received["b"]), 11)
        self.assertEqual(p.net.derp_delivered, derp_before)  # all direct now
        d = p.a.ping(p.b.keys.node_public)
        p.run(0.05)
        result = self.successResultOf(d)
        self.assertEqual(result, PingResult.direct(result.latency, "198.51.100.1:41642"))
        self.assertTrue(0.004 <= result.latency < 0.008, result.latency)  # 2 x 2 ms, in 1 ms clock steps
        st = p.a.status()
        peer = st["peers"][p.b.keys.node_public.hex()]
        self.assertEqual(peer["path"], "p2p 198.51.100.1:41642")
        self.assertIsNotNone(peer["last_handshake"])
        self.assertEqual(st["home_region_name"], "Coder Embedded Relay")

    def test_falls_back_to_derp_and_returns(self) -> None:
        p = Pair(self)
        p.send()
        p.run(0.3)
        self.assertTrue(p.a.path(p.b.keys.node_public)[0].startswith("p2p"))
        handshakes = dict(p.a.last_handshake)
        p.net.blocked = True
        for _ in range(10):  # keep traffic flowing while UDP is dead
            p.send()
            p.run(1.0)
        path, reason = p.a.path(p.b.keys.node_public)
        self.assertEqual(path, "DERP(Coder Embedded Relay)")
        self.assertEqual(reason, "direct 198.51.100.1:41642 stopped answering")
        got = len(p.received["b"])
        p.send()
        p.run(0.05)
        self.assertEqual(len(p.received["b"]), got + 1)  # still flows, via DERP
        p.net.blocked = False
        for _ in range(8):
            p.send()
            p.run(1.0)
        self.assertTrue(p.a.path(p.b.keys.node_public)[0].startswith("p2p"))
        self.assertEqual(p.a.last_handshake, handshakes)  # the same WireGuard session throughout
        self.assertEqual(len(p.received["b"]), got + 9)

    def test_path_changes_are_logged_both_ways(self) -> None:
        events: list[str] = []
        p = Pair(self)
        peer = str(p.b.address)

        def observe(event) -> None:
            text = formatEvent(event)
            if event.get("log_level") == LogLevel.info and text.startswith(f"path to {peer} "):
                events.append(text)  # A's view of its path to B

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

        def flow(seconds: float) -> None:
            for _ in range(int(seconds / 0.02)):
                p.send()
                p.run(0.02)

        flow(1.0)
        self.assertEqual(events, [f"path to {peer} now direct via 198.51.100.1:41642"])
        p.net.blocked = True
        blocked = p.clock.seconds()
        flow(3.0)
        self.assertEqual(events[1:], [f"path to {peer} now DERP(Coder Embedded Relay) "
                                      "(direct 198.51.100.1:41642 stopped answering)"])
        self.assertLess(p.a.sock.peers[p.b.keys.node_public].trust_until - blocked, 2.0)  # task.Clock time
        p.net.blocked = False
        flow(5.0)
        self.assertEqual(events[2:], [f"path to {peer} now direct via 198.51.100.1:41642"])

    def test_block_endpoints_stays_on_derp(self) -> None:
        p = Pair(self, block=True)
        self.assertEqual(p.nodes["a"][-1].endpoints, ())
        p.send()
        p.run(2.0)
        p.send(3)
        p.run(2.0)
        self.assertEqual(len(p.received["b"]), 4)
        self.assertEqual(p.a.path(p.b.keys.node_public),
                         ("DERP(Coder Embedded Relay)", "direct connections disabled"))
        self.assertEqual(p.net.udp_delivered, 0)
        d = p.a.ping(p.b.keys.node_public)
        p.run(0.05)
        result = self.successResultOf(d)
        self.assertEqual(result, PingResult.relayed(result.latency, 999, "Coder Embedded Relay"))
        self.assertFalse(result.p2p)

    def test_packet_with_foreign_source_is_dropped(self) -> None:
        p = Pair(self)
        bogus = ipaddress.IPv6Address("fd7a:115c:a1e0::dead")
        p.a.send_packet(p.b.keys.node_public, ipv6_packet(bogus, p.b.address, b"x"))
        p.run(0.1)
        self.assertEqual(p.received["b"], [])
        self.assertEqual(p.b.drops["source-not-allowed"], 1)


class DemuxTests(unittest.TestCase):
    def test_unknown_and_stray_datagrams_are_counted(self) -> None:
        p = Pair(self)
        sock = p.a.sock
        sock.datagramReceived(b"hello", ("192.0.2.9", 1))
        sock.datagramReceived(b"TS\xf0\x9f\x92\xac" + b"\0" * 100, ("192.0.2.9", 1))
        stun_resp = bytes.fromhex("0101000c2112a442") + b"\0" * 12 + bytes.fromhex("00200008000104d2a1244202")
        sock.datagramReceived(stun_resp, ("192.0.2.9", 3478))
        self.assertEqual(sock.drops["udp-unknown"], 1)
        self.assertEqual(sock.drops["disco-unknown-sender"], 1)
        self.assertEqual(sock.drops["stun-unmatched"], 1)
        sock.derp_received(999, b"x" * 32, b"junk")
        self.assertEqual(sock.drops["derp-unknown"], 1)

    def test_call_me_maybe_over_udp_is_refused(self) -> None:
        from coderstack.wire import disco

        p = Pair(self)
        key = disco.shared_key(p.b.keys.disco_private, p.a.keys.disco_public)
        pkt = disco.seal(disco.CallMeMaybe((("203.0.113.5", 9),)), p.b.keys.disco_public, key)
        p.a.sock.datagramReceived(pkt, ("198.51.100.1", 41642))
        self.assertEqual(p.a.sock.drops["disco-cmm-over-udp"], 1)
        ep = p.a.sock.peers[p.b.keys.node_public]
        self.assertNotIn(("203.0.113.5", 9), ep.candidates)
        p.a.sock.derp_received(999, p.b.keys.node_public, pkt)
        self.assertIn(("203.0.113.5", 9), ep.candidates)
        # Via DERP from another node key than the disco key's owner: refused.
        p.a.sock.derp_received(999, b"\1" * 32, pkt)
        self.assertEqual(p.a.sock.drops["disco-derp-key-mismatch"], 1)


class DERPRegionTests(unittest.TestCase):
    def test_peer_home_region_dialled_on_demand_and_closed_when_idle(self) -> None:
        two = DERPMap.from_json({"Regions": {
            "1": {"RegionID": 1, "RegionCode": "one", "RegionName": "One",
                  "Nodes": [{"Name": "1a", "RegionID": 1, "HostName": "192.0.2.1"}]},
            "2": {"RegionID": 2, "RegionCode": "two", "RegionName": "Two",
                  "Nodes": [{"Name": "2a", "RegionID": 2, "HostName": "192.0.2.2"}]}}})
        clock = task.Clock()
        net = Network(clock)
        made: list[tuple[int, object]] = []

        def factory(region, handler):
            client = net.derp_factory(b"\1" * 32)(region, handler)
            client.stopped = False

            def stop() -> None:
                client.stopped = True

            client.stop = stop
            made.append((region.region_id, client))
            return client

        conn = Conn(clock, netcheck=False, interface_addresses=lambda: [ipaddress.ip_address("192.0.2.9")],
                    derp_client_factory=factory)
        net.attach(conn, "192.0.2.9", 1)
        conn.set_derp_map(two)
        self.assertEqual([r for r, _ in made], [1])  # home: the lowest region with a relay
        peer = Conn(clock, netcheck=False, interface_addresses=lambda: [])
        peer.sock.derp_client_factory = net.derp_factory(peer.keys.node_public)
        peer.set_derp_map(two)
        peer.preferred_derp = 2
        conn.update_peer(peer.node())
        self.assertEqual(conn.path(peer.keys.node_public), ("DERP(Two)", "no endpoints"))
        conn.send_packet(None, ipv6_packet(conn.address, peer.address, b"x"))
        self.assertEqual([r for r, _ in made], [1, 2])  # the peer's home, on demand
        clock.advance(30)
        self.assertFalse(made[1][1].stopped)  # in use (WireGuard retries the handshake)
        conn.remove_peer(peer.keys.node_public)
        for _ in range(70):
            clock.advance(1)
        self.assertTrue(made[1][1].stopped)  # idle non-home region closed
        self.assertFalse(made[0][1].stopped)  # home stays
        self.assertEqual(sorted(conn.sock.derp), [1])
