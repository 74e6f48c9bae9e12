"""Path-MTU probing: the ladder of padded pings, pongs proving sizes, lapses and fallbacks
(Endpoint, sans-IO), and through two Conns on a task.Clock over an in-memory network whose links
drop or refuse datagrams above a size."""

from __future__ import annotations

import ipaddress

from twisted.internet import task
from twisted.internet.error import MessageLengthError
from twisted.trial import unittest

from coderstack.netstack import icmpv6
from coderstack.netstack.stack import Stack
from coderstack.tailnet import endpoint as e
from coderstack.tailnet import pmtu
from coderstack.tailnet.conn import Conn
from coderstack.tailnet.stack import _Glue
from coderstack.wire import disco
from tests.tailnet.fakenet import FakeTransport, Network
from tests.tailnet.test_conn import DERP_MAP, ipv6_packet
from tests.tailnet.test_endpoint import counter_urandom

A = ("192.0.2.1", 41641)
B = ("198.51.100.7", 5000)
KEY = b"n" * 32
PONG_SRC = ("203.0.113.9", 1)


def make(**kw) -> e.Endpoint:
    kw.setdefault("pmtu_enabled", True)
    return e.Endpoint(b"k" * 32, b"d" * 32, derp_region=999, urandom=counter_urandom(),
                      own_node_key=KEY, **kw)


def all_pings(actions) -> list[tuple[e.Addr | None, disco.Ping]]:
    return [(a.dest, a.message) for a in actions
            if isinstance(a, e.DiscoOut) and isinstance(a.message, disco.Ping)]


def size_of(ping: disco.Ping) -> int:
    """The inner MTU a probe stands for (0 for a plain ping)."""
    return ping.padding + pmtu.PING_SIZE - pmtu.WIREGUARD_OVERHEAD if ping.padding else 0


def answer(ep: e.Endpoint, actions, now: float, fits: int = 1 << 20) -> list[int]:
    """Pong every ping whose datagram is at most ``fits`` bytes; the sizes that came through."""
    ok = []
    for dest, ping in all_pings(actions):
        if pmtu.PING_SIZE + ping.padding <= fits:
            ep.handle_pong(disco.Pong(ping.tx_id, PONG_SRC), dest, now)
            ok.append(size_of(ping))
    return ok


class EndpointPMTUTests(unittest.TestCase):
    def test_discovery_sends_the_ladder_with_each_ping(self) -> None:
        ep = make()
        ep.set_node_endpoints([A, B], 0.0)
        actions = ep.send_plan(0.0)[2]
        sent = all_pings(actions)
        for addr in (A, B):
            sizes = sorted(size_of(p) for d, p in sent if d == addr)
            self.assertEqual(sizes, [0, 1440, 8928, 65472])
        for _d, p in sent:
            self.assertEqual(p.node_key, KEY)
            self.assertEqual(len(disco.encode_payload(p)) + disco.HEADER_LEN + 16,
                             pmtu.wire_size(size_of(p)) if p.padding else pmtu.PING_SIZE)
        self.assertEqual(ep.path_mtu(0.0), 1280)  # nothing proven yet (DERP)

    def test_pong_for_the_largest_probe_that_fits_sets_the_mtu(self) -> None:
        ep = make()
        ep.set_node_endpoints([A], 0.0)
        ok = answer(ep, ep.send_plan(0.0)[2], 0.01, fits=9000)  # a jumbo-frame LAN
        self.assertEqual(sorted(ok), [0, 1440, 8928])
        self.assertTrue(ep.trusted(0.02))
        self.assertEqual(ep.path_mtu(0.02), 8928)
        self.assertEqual(ep.udp_mtu(A, 0.02), 8928)
        self.assertEqual(ep.udp_mtu(B, 0.02), 1280)

    def test_probe_latency_does_not_count_as_path_latency(self) -> None:
        ep = make()
        ep.set_node_endpoints([A], 0.0)
        sent = all_pings(ep.send_plan(0.0)[2])
        plain = next(p for _d, p in sent if not p.padding)
        big = next(p for _d, p in sent if size_of(p) == 65472)
        ep.handle_pong(disco.Pong(plain.tx_id, PONG_SRC), A, 0.002)
        ep.handle_pong(disco.Pong(big.tx_id, PONG_SRC), A, 0.050)
        self.assertEqual(ep.best.latency, 0.002)
        self.assertEqual(ep.path_mtu(0.06), 65472)

    def test_trust_lapse_means_derp_mtu(self) -> None:
        ep = make()
        ep.set_node_endpoints([A], 0.0)
        answer(ep, ep.send_plan(0.0)[2], 0.01)
        self.assertEqual(ep.path_mtu(1.0), 65472)
        self.assertEqual(ep.path_mtu(6.52), 1280)  # no heartbeat answered: DERP's 1280
        self.assertEqual(make(derp_mtu=65472).path_mtu(0.0), 65472)

    def test_heartbeats_keep_the_size_proven_and_it_lapses_when_it_stops_working(self) -> None:
        ep = make()
        ep.set_node_endpoints([A], 0.0)
        answer(ep, ep.send_plan(0.0)[2], 0.001)
        t, fits, seen, fell_back = 0.0, 1 << 20, [], None
        while t < 60:
            t += 0.5
            actions = ep.send_plan(t)[2] + ep.tick(t)  # keep the session active
            seen.extend(size_of(p) for _d, p in all_pings(actions))
            answer(ep, actions, t + 0.001, fits)
            if t == 20.0:
                fits = 1500 - 28  # the route changed: only Ethernet-sized datagrams pass now
                lapse_from = t
            if t < 20:
                self.assertEqual(ep.path_mtu(t + 0.01), 65472, t)
            elif fell_back is None and ep.path_mtu(t + 0.01) == 1440:
                fell_back = t
            self.assertTrue(ep.trusted(t + 0.01), t)  # plain heartbeats keep the path trusted
        self.assertIn(65472, seen)  # the heartbeat probe at the size in use
        # Within 6.5 s + a heartbeat, the MTU fell back and the ladder found 1440.
        self.assertEqual(ep.path_mtu(t), 1440)
        self.assertLessEqual(fell_back - lapse_from, pmtu_lapse_bound())

    def test_larger_rungs_are_retried_every_30_s(self) -> None:
        ep = make()
        ep.set_node_endpoints([A], 0.0)
        answer(ep, ep.send_plan(0.0)[2], 0.001, fits=1472)
        self.assertEqual(ep.path_mtu(0.01), 1440)
        t, retried = 0.0, []
        while t < 65:
            t += 0.5
            actions = ep.send_plan(t)[2] + ep.tick(t)
            big = [size_of(p) for _d, p in all_pings(actions) if size_of(p) > 1440]
            if big:
                retried.append((t, sorted(big)))
            answer(ep, actions, t + 0.001, fits=1472 if t < 40 else 1 << 20)
        self.assertEqual([r[1] for r in retried][:1], [[8928, 65472]])
        self.assertGreaterEqual(retried[0][0], e.MTU_REPROBE_INTERVAL)
        self.assertEqual(ep.path_mtu(t), 65472)  # the 60 s retry found the larger path

    def test_emsgsize_forgets_the_proven_size(self) -> None:
        ep = make()
        ep.set_node_endpoints([A], 0.0)
        answer(ep, ep.send_plan(0.0)[2], 0.001)
        self.assertEqual(ep.path_mtu(0.01), 65472)
        ep.udp_too_big(A, pmtu.wire_size(65472), 0.02)
        self.assertEqual(ep.path_mtu(0.02), 1280)  # only 1280 until a probe proves more again
        probes = [size_of(p) for _d, p in all_pings(ep.tick(0.5)) if p.padding]
        self.assertEqual(sorted(probes), [1440, 8928, 65472])

    def test_off_sends_no_probes_and_stays_at_1280(self) -> None:
        ep = make(pmtu_enabled=False)
        ep.set_node_endpoints([A], 0.0)
        actions = ep.send_plan(0.0)[2]
        self.assertEqual([p.padding for _d, p in all_pings(actions)], [0])
        answer(ep, actions, 0.01)
        self.assertEqual(ep.path_mtu(0.02), 1280)
        self.assertEqual([p.padding for _d, p in all_pings(ep.tick(3.0))], [0])  # a plain heartbeat

    def test_network_change_forgets_sizes(self) -> None:
        ep = make()
        ep.set_node_endpoints([A], 0.0)
        answer(ep, ep.send_plan(0.0)[2], 0.01)
        ep.network_changed()
        self.assertEqual(ep.path_mtu(0.02), 1280)
        self.assertEqual(ep.candidates[A].mtu, 1280)


def pmtu_lapse_bound() -> float:
    return e.MTU_TRUST + e.HEARTBEAT_INTERVAL + 1.0


# -- two Conns on a task.Clock --------------------------------------------------------------------


class SizedTransport(FakeTransport):
    """UDP with a link MTU: larger datagrams are refused (``refuse``: EMSGSIZE, as a local
    interface with don't-fragment set) or silently lost (a smaller hop further along)."""

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        limit = self.net.link_mtu - 28
        if len(data) > limit:
            self.net.oversize += 1
            if self.net.refuse:
                raise MessageLengthError("message too long")
            return
        super().write(data, addr)


class SizedNetwork(Network):
    def __init__(self, clock: task.Clock, link_mtu: int, refuse: bool) -> None:
        super().__init__(clock)
        self.link_mtu, self.refuse, self.oversize = link_mtu, refuse, 0

    def attach(self, conn, ip, port) -> None:
        super().attach(conn, ip, port)
        conn.sock.transport = SizedTransport(self, (ip, port))


class ConnPair:
    def __init__(self, link_mtu: int = 1500, refuse: bool = False, pmtu_on: bool = True, **kw) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.net = SizedNetwork(self.clock, link_mtu, refuse)
        self.a = self._conn("192.0.2.1", 41641, pmtu_on, **kw)
        self.b = self._conn("198.51.100.1", 41642, pmtu_on, **kw)
        self.mtus: list[tuple[list[bytes], int]] = []
        self.a.on_path_mtu(lambda addrs, mtu: self.mtus.append((addrs, mtu)))
        na, nb = [], []
        self.a.on_node_change(na.append)
        self.b.on_node_change(nb.append)
        self.a.update_peer(nb[-1])
        self.b.update_peer(na[-1])
        self.got: list[bytes] = []
        self.b.on_packet(lambda k, p: self.got.append(p))

    def _conn(self, ip: str, port: int, pmtu_on: bool, **kw) -> Conn:
        conn = Conn(self.clock, netcheck=False, pmtu=pmtu_on,
                    interface_addresses=lambda: [ipaddress.ip_address(ip)], **kw)
        conn.sock.derp_client_factory = self.net.derp_factory(conn.keys.node_public)
        self.net.attach(conn, ip, port)
        conn.set_derp_map(DERP_MAP)
        return conn

    def run(self, seconds: float, step: float = 0.002) -> None:
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(step)


class ConnPMTUTests(unittest.TestCase):
    def test_ethernet_path_gets_1440_and_callbacks_carry_the_peer_addresses(self) -> None:
        p = ConnPair(link_mtu=1500)
        bkey = p.b.keys.node_public
        p.a.ping(bkey)
        p.run(0.2)
        self.assertEqual(p.a.path(bkey)[0], "p2p 198.51.100.1:41642")
        self.assertEqual(p.a.path_mtu(bkey), 1440)
        self.assertEqual(p.mtus, [([p.b.address.packed], 1440)])
        self.assertGreater(p.net.oversize, 0)  # the 8928 and 65472 probes were lost on the way
        self.assertEqual(p.a.status()["peers"][bkey.hex()]["path_mtu"], 1440)
        # A full 1440-byte packet gets through (WireGuard pads it to no more than the probe).
        p.a.send_packet(None, ipv6_packet(p.a.address, p.b.address, bytes(1440 - 40)))
        p.run(0.05)
        self.assertEqual([len(x) for x in p.got], [1440])

    def test_emsgsize_is_counted_never_raised(self) -> None:
        p = ConnPair(link_mtu=9000, refuse=True)
        bkey = p.b.keys.node_public
        p.a.ping(bkey)
        p.run(0.2)
        self.assertEqual(p.a.path_mtu(bkey), 8928)
        self.assertGreater(p.a.sock.drops["udp-emsgsize"], 0)
        self.assertEqual(p.a.status()["drops"]["udp-emsgsize"], p.a.sock.drops["udp-emsgsize"])

    def test_emsgsize_on_data_lowers_the_mtu(self) -> None:
        p = ConnPair(link_mtu=65535, refuse=True)
        bkey = p.b.keys.node_public
        p.a.ping(bkey)
        p.run(0.2)
        self.assertEqual(p.a.path_mtu(bkey), 65472)
        p.a.send_packet(None, ipv6_packet(p.a.address, p.b.address, b"handshake first"))
        p.run(0.1)
        p.net.link_mtu = 9000  # the route changed under us; the kernel now refuses more
        before = p.a.sock.drops["udp-emsgsize"]
        p.a.send_packet(None, ipv6_packet(p.a.address, p.b.address, bytes(20000)))
        self.assertEqual(p.a.sock.drops["udp-emsgsize"], before + 1)
        self.assertEqual(p.mtus[-1][1], 1280)  # until the ladder proves 8928 again
        p.run(1.0)
        self.assertEqual(p.a.path_mtu(bkey), 8928)

    def test_direct_to_derp_takes_the_relay_mtu(self) -> None:
        p = ConnPair(link_mtu=65535, derp_mtu=1280)
        bkey = p.b.keys.node_public
        p.a.ping(bkey)
        p.run(0.2)
        self.assertEqual(p.a.path_mtu(bkey), 65472)
        p.net.blocked = True  # UDP dies; keep sending so heartbeats go on and then lapse
        for _ in range(20):
            p.a.send_packet(None, ipv6_packet(p.a.address, p.b.address, b"x"))
            p.run(0.5)
        self.assertTrue(p.a.path(bkey)[0].startswith("DERP"))
        self.assertEqual(p.a.path_mtu(bkey), 1280)
        self.assertEqual(p.mtus[-1], ([p.b.address.packed], 1280))

    def test_relayed_mtu_is_64k_by_default(self) -> None:
        p = ConnPair(link_mtu=65535, block_endpoints=True)
        bkey = p.b.keys.node_public
        p.a.send_packet(None, ipv6_packet(p.a.address, p.b.address, bytes(30000)))
        p.run(0.2)
        self.assertEqual(p.a.path_mtu(bkey), 65472)
        self.assertEqual([len(x) for x in p.got], [30040])
        self.assertEqual(p.net.derp_delivered > 0, True)

    def test_off(self) -> None:
        p = ConnPair(link_mtu=65535, pmtu_on=False)
        bkey = p.b.keys.node_public
        p.a.ping(bkey)
        p.run(1.0)
        self.assertEqual(p.a.path_mtu(bkey), 1280)
        self.assertEqual(p.mtus, [])
        self.assertEqual(p.net.oversize, 0)
        self.assertEqual(p.a.receive_mtu, 1280)

    def test_peer_removed_resets_its_mtu(self) -> None:
        p = ConnPair(link_mtu=65535)
        bkey = p.b.keys.node_public
        p.a.ping(bkey)
        p.run(0.2)
        p.a.remove_peer(bkey)
        self.assertEqual(p.mtus[-1], ([p.b.address.packed], 1280))


class GlueTests(unittest.TestCase):
    """The netstack glue: a packet still larger than its peer's MTU becomes a packet-too-big."""

    def test_oversize_packet_turns_into_packet_too_big(self) -> None:
        clock = task.Clock()

        class FakeConn:
            sent: list[bytes] = []

            def send_packets(self, batch):
                self.sent.extend(batch)

        conn = FakeConn()
        glue = _Glue(conn, clock)
        me, peer = ipaddress.IPv6Address("fd00::1").packed, ipaddress.IPv6Address("fd00::2").packed
        got = []

        class NS:
            def packets_received(self, batch):
                got.extend(batch)

            def set_path_mtu(self, host, mtu):
                got.append((host, mtu))

        glue.netstack = NS()
        glue.path_mtu_changed([peer], 8928)
        self.assertEqual(got, [("fd00::2", 8928)])
        from coderstack.netstack.tcpsegment import ACK, build_packet

        small = build_packet(me, peer, 1, 2, 100, 0, ACK, 100, b"", bytes(1000))
        big = build_packet(me, peer, 1, 2, 1100, 0, ACK, 100, b"", bytes(8000))
        glue.send(small)
        glue.send(big)
        glue.path_mtu_changed([peer], 1280)  # the path shrank before the batch left
        clock.advance(0)
        self.assertEqual(conn.sent, [small])
        clock.advance(0)
        ptb = got[-1]
        self.assertEqual(ptb[6], 58)
        msg = ptb[40:]
        self.assertEqual((msg[0], int.from_bytes(msg[4:8], "big")), (icmpv6.PACKET_TOO_BIG, 1280))
        self.assertEqual((ptb[8:24], ptb[24:40]), (peer, me))
        # The stack accepts it as a packet-too-big for one of its connections (checksum good).
        stack = Stack("fd00::1", lambda pkt: None)
        stack.receive(ptb, 0.0)
        self.assertEqual(stack.stats["icmp_packet_too_big"], 1)
        self.assertEqual(glue.too_big, 1)


class SwitchTests(unittest.TestCase):
    def test_env_turns_probing_off_for_a_conn(self) -> None:
        self.patch(pmtu.os, "environ", {"CODERSTACK_PMTUD": "0"})
        conn = Conn(task.Clock(), netcheck=False)
        self.assertFalse(conn.pmtu)
        self.assertFalse(conn.sock.pmtu_enabled)
        self.assertEqual((conn.receive_mtu, conn.device.mtu), (1280, 1280))
        self.patch(pmtu.os, "environ", {})
        conn = Conn(task.Clock(), netcheck=False)
        self.assertTrue(conn.pmtu)
        self.assertEqual((conn.receive_mtu, conn.device.mtu), (65472, 65472))

    def test_netstack_announces_what_the_conn_can_receive(self) -> None:
        from coderstack.tailnet.stack import attach_netstack

        for on, receive in ((True, 65472), (False, 1280)):
            p = ConnPair(pmtu_on=on)
            ns = attach_netstack(p.a, p.clock)
            self.assertEqual(ns.stack.config.mtu, 1280)
            self.assertEqual(ns.stack.config.receive_mtu, receive)

    def test_netstack_hears_mtu_changes(self) -> None:
        from coderstack.tailnet.stack import attach_netstack

        p = ConnPair(link_mtu=9000)
        ns = attach_netstack(p.a, p.clock)
        bkey = p.b.keys.node_public
        p.a.ping(bkey)
        p.run(0.2)
        self.assertEqual(ns.stack.path_mtu, {p.b.address.packed: 8928})
        p.a.remove_peer(bkey)
        self.assertEqual(ns.stack.path_mtu, {})
