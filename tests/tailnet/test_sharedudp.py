"""One UDP socket shared by many Conns: the router's rules on their own, fuzzed, and five real
Conns on 127.0.0.1 (three sharing one socket, two another) going direct to each other."""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.trial import unittest

from coderstack.derp.policy import AllowAllPolicy
from coderstack.derpmap import DERPMap
from coderstack.tailnet.conn import Conn
from coderstack.tailnet.sharedudp import INDICES_PER_MEMBER, Router, SharedUDP
from coderstack.wire import disco, stun
from coderstack.wire.wireguard import mac1_key
from tests.derp.helpers import RelayServer
from tests.support.waiting import wait_until
from tests.tailnet.test_conn import ipv6_packet


class FakeMember:
    def __init__(self, node_public: bytes, discos: tuple[bytes, ...] = (), opens: bool = True) -> None:
        self.node_public = node_public
        self.discos = set(discos)
        self.opens = opens
        self.got: list[bytes] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.got.append(datagram)

    def knows_disco(self, key: bytes) -> bool:
        return key in self.discos

    def opens_disco(self, datagram: bytes) -> bool:
        return self.opens


def transport(receiver: bytes) -> bytes:
    return struct.pack("<I", 4) + receiver + bytes(24)


def initiation(sender: bytes, receiver_public: bytes) -> bytes:
    body = struct.pack("<I", 1) + sender + bytes(108)
    mac1 = hashlib.blake2s(body, key=mac1_key(receiver_public), digest_size=16).digest()
    return body + mac1 + bytes(16)


def disco_from(sender_disco: bytes) -> bytes:
    return disco.MAGIC + sender_disco + bytes(24) + bytes(40)


class RouterTests(unittest.TestCase):
    def test_indices_learned_from_what_members_send(self) -> None:
        r = Router()
        a, b = FakeMember(b"a" * 32), FakeMember(b"b" * 32)
        r.join(a)
        r.join(b)
        r.sent(a, initiation(b"\x01\x00\x00\x00", b"x" * 32))
        r.sent(b, initiation(b"\x02\x00\x00\x00", b"x" * 32))
        self.assertIs(r.route(transport(b"\x01\x00\x00\x00")), a)
        self.assertIs(r.route(transport(b"\x02\x00\x00\x00")), b)
        response = struct.pack("<I", 2) + b"\x09\x00\x00\x00" + b"\x02\x00\x00\x00" + bytes(80)
        self.assertIs(r.route(response), b)  # a response names our index second
        self.assertIsNone(r.route(transport(b"\x03\x00\x00\x00")))
        self.assertEqual(r.drops["index-unknown"], 1)

    def test_an_initiation_goes_to_the_member_its_mac1_names(self) -> None:
        r = Router()
        members = [FakeMember(bytes([i]) * 32) for i in range(5)]
        for m in members:
            r.join(m)
        self.assertIs(r.route(initiation(b"\x07" * 4, bytes([3]) * 32)), members[3])
        self.assertIsNone(r.route(initiation(b"\x07" * 4, b"z" * 32)))
        self.assertEqual(r.drops["initiation-unclaimed"], 1)

    def test_disco_by_sender_and_by_box_where_several_know_it(self) -> None:
        r = Router()
        peer = b"p" * 32
        only = FakeMember(b"a" * 32, (peer,))
        r.join(only)
        r.join(FakeMember(b"b" * 32))
        self.assertIs(r.route(disco_from(peer)), only)
        other = FakeMember(b"c" * 32, (peer,), opens=False)
        r.join(other)
        self.assertIs(r.route(disco_from(peer)), only)  # both know the peer; only one opens it
        only.opens, other.opens = False, True
        self.assertIs(r.route(disco_from(peer)), other)  # the remembered one no longer opens it
        self.assertIsNone(r.route(disco_from(b"q" * 32)))
        self.assertEqual(r.drops["disco-unclaimed"], 1)

    def test_stun_answers_go_to_the_asker_once(self) -> None:
        r = Router()
        a = FakeMember(b"a" * 32)
        r.join(a)
        request = stun.encode(stun.Message(stun.METHOD_BINDING, stun.CLASS_REQUEST, b"t" * 12))
        r.sent(a, request)
        answer = stun.encode(stun.Message(stun.METHOD_BINDING, stun.CLASS_SUCCESS, b"t" * 12))  # same ID
        self.assertIs(r.route(answer), a)
        self.assertIsNone(r.route(answer))
        self.assertEqual(r.drops["stun-unmatched"], 1)

    def test_a_collision_and_a_member_leaving(self) -> None:
        r = Router()
        a, b = FakeMember(b"a" * 32), FakeMember(b"b" * 32)
        r.join(a)
        r.join(b)
        r.sent(a, initiation(b"\x05" * 4, b"x" * 32))
        r.sent(b, initiation(b"\x05" * 4, b"x" * 32))
        self.assertEqual(r.drops["index-collision"], 1)
        self.assertIs(r.route(transport(b"\x05" * 4)), b)  # the newer owner
        r.leave(b)
        self.assertIsNone(r.route(transport(b"\x05" * 4)))
        self.assertIsNone(r.route(initiation(b"\x01" * 4, b"b" * 32)))

    def test_indices_are_bounded(self) -> None:
        r = Router()
        a = FakeMember(b"a" * 32)
        r.join(a)
        for i in range(INDICES_PER_MEMBER * 3):
            r.sent(a, initiation(struct.pack("<I", i), b"x" * 32))
        self.assertIsNone(r.route(transport(struct.pack("<I", 0))))  # forgotten
        self.assertIs(r.route(transport(struct.pack("<I", INDICES_PER_MEMBER * 3 - 1))), a)

    @given(st.binary(max_size=200))
    def test_any_bytes_route_or_count(self, data: bytes) -> None:
        r = Router()
        a = FakeMember(b"a" * 32, (data[6:38],))
        r.join(a)
        r.sent(a, data)
        before = sum(r.drops.values())
        got = r.route(data)
        self.assertTrue(got is a or sum(r.drops.values()) == before + 1)


class SharedSocketTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = RelayServer(self, AllowAllPolicy())
        self.derp_map = DERPMap(regions={999: self.server.region()})

    def shared(self) -> SharedUDP:
        s = SharedUDP(reactor)
        s.listen(0, "127.0.0.1")
        self.addCleanup(s.close)
        return s

    def conn(self, shared: SharedUDP) -> Conn:
        c = Conn(reactor, derp_token="tok", netcheck=False,
                 interface_addresses=lambda: [ipaddress.ip_address("127.0.0.1")])
        c.start(0, "127.0.0.1", shared=shared)
        c.set_derp_map(self.derp_map)
        self.addCleanup(lambda: defer.ensureDeferred(c.close()))
        return c

    async def test_conns_sharing_sockets_go_direct_to_each_other(self) -> None:
        agents_socket, clients_socket = self.shared(), self.shared()
        agents = [self.conn(agents_socket) for _ in range(3)]
        clients = [self.conn(clients_socket) for _ in range(2)]
        nodes: dict[int, Any] = {}
        got: dict[int, list[bytes]] = {}
        for c in agents + clients:
            c.on_node_change(lambda n, c=c: nodes.__setitem__(id(c), n))
            got[id(c)] = []
            c.on_packet(lambda k, p, c=c: got[id(c)].append(p))
        await wait_until(lambda: all(999 in c.sock.derp_connected for c in agents + clients), "DERP logins")
        await wait_until(lambda: len(nodes) == 5, "every node")
        for a, c in itertools.product(agents, clients):  # every client peers with every agent
            a.update_peer(nodes[id(c)])
            c.update_peer(nodes[id(a)])
        for a, c in itertools.product(agents, clients):
            c.send_packet(None, ipv6_packet(c.address, a.address, b"to agent"))
        await wait_until(lambda: all(len(got[id(a)]) >= 2 for a in agents), "the first packets")
        for a, c in itertools.product(agents, clients):
            await wait_until(lambda a=a, c=c: c.path(a.keys.node_public)[0].startswith("p2p"),
                             "a direct path from each client to each agent")
        self.assertEqual({a.sock.local_port for a in agents}, {agents_socket.port.getHost().port})
        relayed = self.server.relay.packets_received
        for a, c in itertools.product(agents, clients):
            for i in range(5):
                c.send_packet(None, ipv6_packet(c.address, a.address, b"n%d" % i))
                a.send_packet(None, ipv6_packet(a.address, c.address, b"back%d" % i))
        await wait_until(lambda: all(len(got[id(a)]) >= 12 for a in agents)
                         and all(len(got[id(c)]) >= 15 for c in clients), "every packet, both ways")
        self.assertEqual(self.server.relay.packets_received, relayed)  # none went via DERP
        for a, c in itertools.product(agents, clients):
            result = await c.ping(a.keys.node_public)
            self.assertEqual((result.kind, result.endpoint), ("p2p", f"127.0.0.1:{agents_socket.port.getHost().port}"))
        for s in (agents_socket, clients_socket):
            self.assertEqual({k: v for k, v in s.drops.items() if k.endswith("unclaimed")}, {}, s.drops)
