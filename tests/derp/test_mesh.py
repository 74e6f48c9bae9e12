"""Two relay servers meshed with a shared key: a packet crosses from one to the other."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest

from coderstack.derp.mesh import Mesh
from coderstack.wire import derp as w
from tests.support.relaypolicy import StaticPolicy
from tests.support.waiting import wait_until

from .helpers import RelayServer, start_client

MESH_KEY = "ab" * 32


class MeshTests(unittest.TestCase):
    def test_packet_crosses_replicas(self) -> defer.Deferred:
        policy = StaticPolicy()
        ka, kb, km = (w.generate_private_key() for _ in range(3))
        policy.add_principal("tok-a", "a", w.public_key(ka))
        policy.add_principal("tok-b", "b", w.public_key(kb))
        policy.add_principal("tok-m", "m", w.public_key(km))
        policy.allow(w.public_key(ka), w.public_key(kb))
        s1 = RelayServer(self, policy, mesh_key=MESH_KEY)
        s2 = RelayServer(self, policy, mesh_key=MESH_KEY)
        m1 = Mesh(reactor, s1.relay, MESH_KEY)
        m2 = Mesh(reactor, s2.relay, MESH_KEY)
        self.addCleanup(m1.stop)
        self.addCleanup(m2.stop)
        m1.set_addresses([s2.url, s1.url])  # its own URL too: it notices and stops that one
        m2.set_addresses([s1.url])

        async def go() -> None:
            a, ra = start_client(self, s1, "tok-a", priv=ka)
            b, rb = start_client(self, s2, "tok-b", priv=kb)
            m, rm = start_client(self, s1, "tok-m", priv=km)
            await wait_until(lambda: a.connected and b.connected and m.connected, "the three logins")
            await wait_until(lambda: b.public_key in m1.peers[s2.url].keys, "s1's mesh link to learn of b")
            await wait_until(lambda: a.public_key in m2.peers[s1.url].keys, "s2's mesh link to learn of a")
            a.send(b.public_key, b"across")
            await wait_until(lambda: rb.packets, "the packet across the mesh")
            self.assertEqual(rb.packets, [(a.public_key, b"across")])
            b.send(a.public_key, b"and back")
            await wait_until(lambda: ra.packets, "the packet back")
            self.assertEqual(ra.packets, [(b.public_key, b"and back")])
            self.assertEqual(s2.relay.packets_forwarded_in, 1)
            # The policy still applies where a packet enters the region.
            m.send(b.public_key, b"not allowed")
            await wait_until(lambda: s1.relay.drops["unauthorized"] == 1, "the unauthorized drop")
            self.assertEqual(s2.relay.packets_forwarded_in, 1)
            # b leaves: s1 stops forwarding to it.
            await b.stop()
            await wait_until(lambda: b.public_key not in m1.peers[s2.url].keys, "s1's mesh link to forget b")

        return defer.ensureDeferred(go())

    def test_wrong_mesh_key_refused(self) -> defer.Deferred:
        policy = StaticPolicy()
        s1 = RelayServer(self, policy, mesh_key=MESH_KEY)
        s2 = RelayServer(self, policy, mesh_key=MESH_KEY)
        m = Mesh(reactor, s1.relay, "cd" * 32)
        self.addCleanup(m.stop)
        m.set_addresses([s2.url])

        async def go() -> None:
            await wait_until(lambda: s2.relay.accepts >= 1 and not m.peers[s2.url].client.connected
                             and m.peers[s2.url].client.last_error, "s2 to refuse the mesh link")
            self.assertEqual(s2.relay.clients, 0)

        return defer.ensureDeferred(go())
