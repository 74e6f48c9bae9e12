"""``coderstack.tailnet.linkmon``: which interface changes count, the wake-up detector, the poller
on a task.Clock with injected snapshots, and what a Conn does on a change."""

from __future__ import annotations

import ipaddress
import socket

from twisted.internet import defer, task
from twisted.trial import unittest

from coderstack.netinfo import Interface
from coderstack.tailnet import linkmon
from coderstack.tailnet.conn import Conn
from coderstack.tailnet.linkmon import LinkChange, LinkMonitor, LinkState, WakeDetector, link_state
from tests.tailnet.fakenet import FakeDERPClient, Network
from tests.tailnet.test_conn import Pair


def ifaces(*specs: tuple[str, tuple[str, ...]], up: bool = True) -> list[Interface]:
    return [Interface(name, 1500, addrs, up) for name, addrs in specs]


LO = ("lo", ("127.0.0.1/8", "::1/128"))
ETH = ("eth0", ("192.0.2.10/24", "fe80::1/64"))


class SnapshotTests(unittest.TestCase):
    def test_what_counts(self) -> None:
        state = link_state(ifaces(
            LO, ETH,
            ("veth1", ("fe80::2/64",)),  # a veth that just came up: link-local only
            ("wg1", ("fd7a:115c:a1e0::5/128",)),  # our overlay on some tunnel
            ("tailscale0", ("100.64.0.7/32",)),
            ("eth1", ("2001:db8::7/64",)),
        ) + ifaces(("eth2", ("198.51.100.3/24",)), up=False), "192.0.2.10", None)
        self.assertEqual(state.addresses, frozenset({("eth0", "192.0.2.10"), ("eth1", "2001:db8::7")}))
        self.assertEqual(state.default_v4, "192.0.2.10")
        self.assertIsNone(state.default_v6)

    def test_loopback_default_source_is_no_route(self) -> None:
        self.assertIsNone(link_state([], "127.0.0.1", "::1").default_v4)

    def test_stale_connections(self) -> None:
        old = LinkState(frozenset({("eth0", "192.0.2.10"), ("eth1", "198.51.100.3")}), "192.0.2.10")
        renumbered = LinkChange(old, LinkState(frozenset({("eth0", "192.0.2.11"), ("eth1", "198.51.100.3")}),
                                               "192.0.2.11"))
        self.assertTrue(renumbered.stale("192.0.2.10"))  # vanished
        self.assertFalse(renumbered.stale("192.0.2.11"))
        self.assertTrue(renumbered.stale("198.51.100.3"))  # the default route moved off it
        self.assertFalse(renumbered.stale("127.0.0.1"))  # loopback survives anything
        self.assertFalse(renumbered.stale("2001:db8::1"))  # v6 default route did not change
        self.assertTrue(renumbered.stale(None))  # not connected: dial now
        added = LinkChange(old, LinkState(old.addresses | {("eth2", "203.0.113.9")}, "192.0.2.10"))
        self.assertFalse(added.stale("192.0.2.10"))
        self.assertTrue(LinkChange(old, old, woke=True).stale("127.0.0.1"))
        self.assertIn("-192.0.2.10 on eth0", renumbered.describe())
        self.assertIn("default route v4 source 192.0.2.10 -> 192.0.2.11", renumbered.describe())

    def test_default_route_source_sends_nothing(self) -> None:
        # A route lookup only: on a host without a default route it is None, otherwise an address.
        src = linkmon.default_route_source(socket.AF_INET)
        if src is not None:
            ipaddress.ip_address(src)

    def test_reads_this_host(self) -> None:
        state = linkmon.read_link_state()
        for name, ip in state.addresses:
            self.assertNotEqual(name, "lo")
            self.assertTrue(linkmon.interesting_ip(ip), ip)

    def test_env_switch(self) -> None:
        self.assertTrue(linkmon.enabled_from_env({}))
        self.assertTrue(linkmon.enabled_from_env({"CODERSTACK_LINK_MONITOR": "1"}))
        for off in ("0", "false", "off", " No "):
            self.assertFalse(linkmon.enabled_from_env({"CODERSTACK_LINK_MONITOR": off}), off)


class WakeTests(unittest.TestCase):
    def test_wall_clock_ahead_of_monotonic(self) -> None:
        w = WakeDetector(threshold=10)
        self.assertFalse(w.observe(1000.0, 5.0))
        self.assertFalse(w.observe(1003.0, 8.0))  # a normal poll
        self.assertFalse(w.observe(1030.0, 35.0))  # a late poll (busy reactor): both advanced
        self.assertTrue(w.observe(1633.0, 38.0))  # 600 s of wall time, 3 s awake
        self.assertFalse(w.observe(1636.0, 41.0))

    def test_clock_stepped_back_is_no_wake(self) -> None:
        w = WakeDetector(threshold=10)
        w.observe(1000.0, 5.0)
        self.assertFalse(w.observe(900.0, 8.0))


class Host:
    """An injected snapshot source and monotonic clock."""

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.interfaces = ifaces(LO, ETH)
        self.default_v4: str | None = "192.0.2.10"
        self.asleep = 0.0  # wall seconds that passed while "suspended"
        self.reads = 0

    def read(self) -> LinkState:
        self.reads += 1
        return link_state(self.interfaces, self.default_v4, None)

    def monotonic(self) -> float:
        return self.clock.seconds() - self.asleep


class MonitorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.host = Host(self.clock)
        self.changes: list[LinkChange] = []
        self.mon = LinkMonitor(self.clock, self.changes.append, read_state=self.host.read,
                               monotonic=self.host.monotonic, interval=3.0, wake_threshold=10.0)
        self.mon.start()
        self.addCleanup(self.mon.stop)

    def test_no_change_no_callback(self) -> None:
        self.clock.pump([3.0] * 10)
        self.assertEqual(self.changes, [])
        self.assertEqual(self.host.reads, 11)

    def test_address_added_then_removed(self) -> None:
        self.host.interfaces = ifaces(LO, ETH, ("eth1", ("198.51.100.3/24",)))
        self.clock.pump([3.0] * 3)
        self.assertEqual(len(self.changes), 1)
        self.assertEqual(self.changes[0].new.ips() - self.changes[0].old.ips(), {"198.51.100.3"})
        self.assertFalse(self.changes[0].woke)
        self.host.interfaces = ifaces(LO, ETH)
        self.clock.pump([3.0] * 3)
        self.assertEqual(len(self.changes), 2)
        self.assertEqual(self.changes[1].vanished(), {"198.51.100.3"})

    def test_renumbered(self) -> None:
        self.host.interfaces = ifaces(LO, ("eth0", ("192.0.2.77/24",)))
        self.host.default_v4 = "192.0.2.77"
        self.clock.pump([3.0] * 3)
        self.assertEqual(len(self.changes), 1)
        self.assertEqual(self.changes[0].vanished(), {"192.0.2.10"})

    def test_default_route_source_changed(self) -> None:
        self.host.interfaces = ifaces(LO, ETH, ("wlan0", ("198.51.100.3/24",)))
        self.clock.pump([3.0])
        self.assertEqual(len(self.changes), 1)
        self.host.default_v4 = "198.51.100.3"  # the default route moved to wlan0
        self.clock.pump([3.0] * 3)
        self.assertEqual(len(self.changes), 2)
        self.assertEqual(self.changes[1].old.addresses, self.changes[1].new.addresses)
        self.assertEqual(self.changes[1].new.default_v4, "198.51.100.3")

    def test_interface_without_addresses_flapping(self) -> None:
        for i in range(6):
            extra = ifaces((f"csvx{i}", ("fe80::9/64",))) if i % 2 == 0 else []
            down = ifaces((f"csvy{i}", ("203.0.113.4/24",)), up=False)  # down: not counted
            self.host.interfaces = ifaces(LO, ETH) + extra + down
            self.clock.advance(3.0)
        self.assertEqual(self.changes, [])

    def test_time_jump_is_a_wake_up(self) -> None:
        self.clock.advance(3.0)
        self.host.asleep = 600.0
        self.clock.advance(603.0)  # one late poll: 603 s of wall time, 3 s of monotonic
        self.assertEqual(len(self.changes), 1)
        self.assertTrue(self.changes[0].woke)
        self.assertIn("woke from sleep", self.changes[0].describe())
        self.clock.pump([3.0] * 3)
        self.assertEqual(len(self.changes), 1)

    def test_failed_read_is_counted_and_polling_goes_on(self) -> None:
        def broken() -> LinkState:
            raise OSError("no /sys")

        self.mon.read_state = broken
        self.clock.advance(3.0)
        self.assertEqual(self.mon.errors, 1)
        self.mon.read_state = self.host.read
        self.host.interfaces = ifaces(LO)
        self.clock.advance(3.0)
        self.assertEqual(len(self.changes), 1)

    def test_stop(self) -> None:
        self.mon.stop()
        self.host.interfaces = ifaces(LO)
        self.clock.pump([3.0] * 3)
        self.assertEqual(self.changes, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RecordingDERPClient(FakeDERPClient):
    def __init__(self, net: Network, key: bytes, handler: object, local: str | None) -> None:
        super().__init__(net, key, handler)
        self.local = local
        self.reconnects = 0

    def local_address(self) -> str | None:
        return self.local

    def reconnect(self, why: str = "") -> None:
        self.reconnects += 1

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class ConnWiringTests(unittest.TestCase):
    """monitor_conn on a Conn: new endpoints announced, peers re-probed, stale DERP reconnected."""

    def setUp(self) -> None:
        self.pair = Pair(self)
        self.clients: list[RecordingDERPClient] = []
        self.local = "192.0.2.1"
        a = self.pair.a

        def factory(region: object, handler: object) -> RecordingDERPClient:
            c = RecordingDERPClient(self.pair.net, a.keys.node_public, handler, self.local)
            self.pair.net.derp_clients[a.keys.node_public] = c
            self.clients.append(c)
            return c

        # Start A's DERP afresh with clients that know their local address.
        a.sock.derp.clear()
        a.sock.derp_client_factory = factory
        a.sock.home_region = 0
        a.sock.set_home(a.preferred_derp)
        self.a_ips = ["192.0.2.1"]
        a.interface_addresses = lambda: [ipaddress.ip_address(ip) for ip in self.a_ips]
        self.host = Host(self.pair.clock)
        self.host.interfaces = ifaces(LO, ("eth0", ("192.0.2.1/24",)))
        self.host.default_v4 = "192.0.2.1"
        self.mon = linkmon.monitor_conn(self.pair.clock, a, env={}, read_state=self.host.read,
                                        monotonic=self.host.monotonic)
        self.addCleanup(self.mon.stop)

    def go_direct(self) -> None:
        p = self.pair
        p.send()
        p.run(0.3)
        self.assertTrue(p.a.path(p.b.keys.node_public)[0].startswith("p2p "))

    def test_renumber_announces_reprobes_and_reconnects_derp(self) -> None:
        p = self.pair
        self.go_direct()
        self.assertIs(p.a.link_monitor, self.mon)
        (client,) = self.clients
        nodes_before = len(p.nodes["a"])
        # DHCP hands out another address.
        self.a_ips = ["192.0.2.9"]
        self.host.interfaces = ifaces(LO, ("eth0", ("192.0.2.9/24",)))
        self.host.default_v4 = "192.0.2.9"
        pings = p.a.sock.disco_stats["ping out udp"]
        self.mon.poll()
        self.assertEqual(self.mon.changes, 1)
        self.assertEqual(client.reconnects, 1)  # its source address is gone
        self.assertGreater(len(p.nodes["a"]), nodes_before)
        self.assertEqual(p.nodes["a"][-1].endpoints, ("192.0.2.9:41641",))
        # The best address was forgotten: the next packet re-probes every candidate at once.
        ep = p.a.sock.peers[p.b.keys.node_public]
        self.assertIsNone(ep.best)
        self.assertTrue(p.a.path(p.b.keys.node_public)[0].startswith("DERP("))
        p.send()
        self.assertGreater(p.a.sock.disco_stats["ping out udp"], pings)
        p.run(0.3)
        self.assertTrue(p.a.path(p.b.keys.node_public)[0].startswith("p2p "))
        self.mon.poll()
        self.assertEqual(self.mon.changes, 1)  # once per change

    def test_added_address_keeps_derp(self) -> None:
        (client,) = self.clients
        self.host.interfaces = ifaces(LO, ("eth0", ("192.0.2.1/24",)), ("eth1", ("198.51.100.9/24",)))
        self.pair.run(3.5, step=0.05)
        self.assertEqual(self.mon.changes, 1)
        self.assertEqual(client.reconnects, 0)

    def test_wake_reconnects_every_derp(self) -> None:
        (client,) = self.clients
        self.local = "127.0.0.1"
        client.local = "127.0.0.1"
        self.pair.clock.advance(3.0)
        self.host.asleep = 300.0
        self.pair.clock.advance(303.0)
        self.assertEqual(self.mon.changes, 1)
        self.assertEqual(client.reconnects, 1)

    def test_close_stops_the_monitor(self) -> None:
        self.successResultOf(defer.ensureDeferred(self.pair.a.close()))
        reads = self.host.reads
        self.pair.clock.advance(10.0)
        self.assertEqual(self.host.reads, reads)

    def test_disabled_by_environment(self) -> None:
        conn = Conn(self.pair.clock, netcheck=False)
        self.assertIsNone(linkmon.monitor_conn(self.pair.clock, conn, env={"CODERSTACK_LINK_MONITOR": "0"}))
        self.assertIsNone(conn.link_monitor)
