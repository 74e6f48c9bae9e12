"""A laptop roams mid-session: peer A leaves NAT A's LAN for NAT C's (new LAN address, new public
address, the old one gone) while a direct session with B carries data both ways. With the link
monitor (coderstack/tailnet/linkmon.py) A notices within a poll, reconnects its DERP connection
(the old one is bound to a vanished address), re-STUNs, announces its new endpoints and re-probes:
the session goes direct again through NAT C, the same WireGuard session throughout.

Needs root (network namespaces, names prefixed ``cslm``); everything is removed by PID/name in
cleanups, also on failure.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.logger import Logger
from twisted.trial import unittest

from tests.netlab.magicsock_lab import LAB_WAIT, NAT_IPS, MagicsockLab, available
from tests.support.waiting import wait_until

POLL = "1"  # seconds between link polls in the peers (linkmon's default is 3)
_log = Logger()


def p2p_via(status: dict, ip: str) -> bool:
    return status.get("path", "").startswith(f"p2p {ip}:")


def stun_endpoint(node: dict, ip: str) -> bool:
    return any(e.startswith(ip + ":") for e in node.get("endpoints", []))


class RoamingTests(unittest.TestCase):
    timeout = 90

    async def session(self, monitor: bool) -> tuple[MagicsockLab, Any, Any]:
        """A and B direct through NATs A and B, sending 50 packets/s each way."""
        why = available()
        if why:
            raise unittest.SkipTest(why)
        lab = MagicsockLab("easy", prefix="cslm")
        self.addCleanup(lab.cleanup)
        lab.add_uplink("a")
        self.addCleanup(lab.stop)
        env = {"CODERSTACK_LINK_MONITOR": "1" if monitor else "0", "CODERSTACK_LINK_MONITOR_INTERVAL": POLL}
        a, b = await lab.start(peer_env=env)
        await wait_until(lambda: a.nodes and stun_endpoint(a.nodes[-1], NAT_IPS["a"])
                         and b.nodes and stun_endpoint(b.nodes[-1], NAT_IPS["b"]), "both STUN mappings", timeout=LAB_WAIT, interval=0.05)
        a.send({"send": 50})
        b.send({"send": 50})
        await wait_until(lambda: p2p_via(a.status, NAT_IPS["b"]) and p2p_via(b.status, NAT_IPS["a"])
                         and a.status.get("last_handshake") is not None,
                         lambda: f"direct both ways, and a handshake; A: {a.status}, B: {b.status}",
                         timeout=LAB_WAIT, interval=0.05)
        return lab, a, b

    async def roam(self, monitor: bool) -> tuple[float, Any, Any]:
        lab, a, b = await self.session(monitor)
        handshake = a.status["last_handshake"]
        lab.move_to_uplink("a")
        moved = reactor.seconds()
        a_got, b_got = a.status["received"], b.status["received"]
        # Direct again, both ways, through A's new NAT, and data flows again in both directions.
        await wait_until(lambda: p2p_via(a.status, NAT_IPS["b"]) and p2p_via(b.status, NAT_IPS["c"])
                         and a.status["received"] >= a_got + 50 and b.status["received"] >= b_got + 50, "direct again through A's new NAT, data both ways", timeout=LAB_WAIT, interval=0.05)
        took = reactor.seconds() - moved
        self.assertTrue(stun_endpoint(a.nodes[-1], NAT_IPS["c"]), a.nodes[-1])
        if monitor:
            # Healed well inside WireGuard's 15 s "no reply, handshake again" rule: same session.
            # Without the monitor A's relay connection hangs on the vanished address too, so
            # nothing comes back for 13-19 s and a new handshake is WireGuard doing its job.
            self.assertEqual(a.status["last_handshake"], handshake)
        return took, a, b

    async def test_roam_to_another_nat_recovers_direct(self) -> None:
        took, a, b = await self.roam(monitor=True)
        self.assertGreaterEqual(a.status["link_changes"], 1, a.status)
        self.assertGreaterEqual(a.status["derp_reconnects"], 1, a.status)  # its old source address vanished
        await wait_until(lambda: a.status["derp_connected"] == [1], "A's relay connection", timeout=LAB_WAIT, interval=0.05)
        _log.info("roamed with the link monitor: direct again after {took:.1f} s", took=took)
        print(f"\nlinkmon netlab: direct again {took:.1f} s after the move (monitor on)")

    async def test_roam_without_monitor_heals_at_the_next_restun(self) -> None:
        # Without the monitor only the periodic re-STUN (every 23 s) finds the new mapping.
        took, a, b = await self.roam(monitor=False)
        self.assertIsNone(a.status["link_changes"])
        print(f"\nlinkmon netlab: direct again {took:.1f} s after the move (monitor off)")

    async def test_renumbered_lan_address_recovers_direct(self) -> None:
        lab, a, b = await self.session(monitor=True)
        handshake = a.status["last_handshake"]
        a_got, b_got = a.status["received"], b.status["received"]
        derp_before = a.status["derp_reconnects"]
        lab.renumber("a")
        moved = reactor.seconds()
        # A's NAT maps the new inside address to a new port: B must learn it.
        old_mapping = b.status["path"]
        await wait_until(lambda: a.status["derp_reconnects"] > derp_before
                         and p2p_via(b.status, NAT_IPS["a"]) and b.status["path"] != old_mapping
                         and a.status["received"] >= a_got + 50 and b.status["received"] >= b_got + 50, "B to learn A's new mapping, data both ways", timeout=LAB_WAIT, interval=0.05)
        took = reactor.seconds() - moved
        self.assertEqual(a.status["last_handshake"], handshake)
        print(f"\nlinkmon netlab: renumbered, direct again {took:.1f} s later (monitor on)")
