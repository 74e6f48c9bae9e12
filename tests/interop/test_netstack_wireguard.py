"""Linux TCP through wireguard-go's TUN in a namespace <-> our netstack behind our WireGuard.

The same tests as test_netstack_linux (100 MiB byte-exact each way, kernel client -> our server
and our client -> kernel server; again with 1% random loss, and with 1% of the packets
reordered; ``iperf3 -c`` to our iperf3 sink), but the packets between the kernel and our stack
cross a real WireGuard tunnel: wireguard-go on the kernel's side, our Device + WireGuardUDP on
ours (see netstack_wg_lab).  Loss drops outer UDP datagrams on the namespace's veth.  Needs root, wireguard-go, wg and iptables (CI has them).
"""

from __future__ import annotations

import os
import shutil

from twisted.internet import defer
from twisted.python import log
from twisted.trial import unittest

from tests.interop import test_netstack_linux as linux

from .netstack_wg_lab import WireGuardLab


class WireGuardPeerMixin(linux.LinuxPeerMixin):
    reorder = 0.0

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root for network namespaces and TUN (CI runs as root)")
        for tool in ("wireguard-go", "wg", "ip", "iptables"):
            if shutil.which(tool) is None:
                raise unittest.SkipTest(f"{tool} not installed (CI installs it)")
        self.lab = WireGuardLab(self, mtu=self.mtu, reorder=self.reorder)
        if self.loss:
            self.lab.add_loss(self.loss)

    @defer.inlineCallbacks
    def kernel_to_us(self, size=linux.SIZE, seed=1):
        mbps = yield super().kernel_to_us(size, seed)
        log.msg(f"{self.id()}: kernel -> us {mbps:.0f} Mbit/s, {self.lab.stats()}")
        return mbps

    @defer.inlineCallbacks
    def us_to_kernel(self, size=linux.SIZE, seed=2):
        mbps = yield super().us_to_kernel(size, seed)
        log.msg(f"{self.id()}: us -> kernel {mbps:.0f} Mbit/s, {self.lab.stats()}")
        return mbps

    def assertTunnelClean(self):
        """Nothing the tunnel received was rejected by our WireGuard."""
        self.assertEqual(dict(self.lab.device.drops), {})


class CleanTunnelTests(WireGuardPeerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_kernel_client_to_our_server(self):
        yield self.kernel_to_us()
        self.assertTunnelClean()
        self.assertEqual(self.lab.wg.handshakes, 1)

    @defer.inlineCallbacks
    def test_our_client_to_kernel_server(self):
        yield self.us_to_kernel()
        self.assertTunnelClean()
        self.assertEqual(self.lab.wg.handshakes, 1)


class LossyTunnelTests(WireGuardPeerMixin, unittest.TestCase):
    loss = 0.01

    @defer.inlineCallbacks
    def test_kernel_client_to_our_server(self):
        yield self.kernel_to_us()
        self.assertGreater(self.lab.dropped(), 0)
        self.assertGreater(self.lab.netstack.stats["tcp_out_of_order"], 0)

    @defer.inlineCallbacks
    def test_our_client_to_kernel_server(self):
        yield self.us_to_kernel()
        self.assertGreater(self.lab.dropped(), 0)
        self.assertGreater(self.lab.netstack.stats["tcp_retransmits"], 0)


class ReorderingTunnelTests(WireGuardPeerMixin, unittest.TestCase):
    """1% of the inner packets each way held back behind the next three (or 2 ms)."""

    reorder = 0.01

    @defer.inlineCallbacks
    def test_kernel_client_to_our_server(self):
        yield self.kernel_to_us()
        self.assertGreater(self.lab.reordering.reordered, 0)
        self.assertGreater(self.lab.netstack.stats["tcp_out_of_order"], 0)

    @defer.inlineCallbacks
    def test_our_client_to_kernel_server(self):
        yield self.us_to_kernel()
        self.assertGreater(self.lab.reordering.reordered, 0)


class Iperf3TunnelTests(WireGuardPeerMixin, unittest.TestCase):
    """``iperf3 -c`` in wireguard-go's namespace, through the tunnel, to our iperf3 sink."""

    test_iperf3_client_to_our_sink = linux.Iperf3Tests.test_iperf3_client_to_our_sink
