"""Our netstack behind our WireGuard, facing Linux TCP behind wireguard-go, for interop tests.

    namespace:  kernel TCP (fd00::1) <-> TUN <-> wireguard-go  (UDP 10.a.b.2:51820)
                                                    |  veth (outer UDP; loss rules here)
    this process:        Netstack (fd00::2) <-> TunnelLink <-> WireGuardUDP (10.a.b.1:port)

``TunnelLink`` is the glue between a ``Netstack`` and a ``WireGuardUDP``: the stack's outbound
packets are collected while it runs and handed to ``WireGuardUDP.send_many`` in one batch, and
the decrypted packets of one UDP read burst reach ``Netstack.packets_received`` together.

``WireGuardLab`` looks like ``netstack_lab.Lab`` to the tests in ``test_netstack_linux`` (same
addresses, ``netstack``, ``kernel_addr``, ``spawn``, ``spawn_argv``, ``dropped``), so they run
unchanged over the tunnel.  Loss is added in the namespace's INPUT and OUTPUT chains on the
*outer* UDP datagrams: a drop there loses an encrypted WireGuard packet, which no TCP sees as a
local send error (the kernel's TCP is inside the tunnel, its packets reach the TUN intact).
Everything made here is removed in the test's cleanups, by name and by PID.
"""

from __future__ import annotations

import os
import socket
import sys

from twisted.internet import reactor

from coderstack.netstack.endpoints import Netstack
from coderstack.wire.wireguard import Device, generate_private_key
from tests.support.wgudp import WireGuardUDP

from .netstack_lab import KERNEL_ADDR, STACK_ADDR, LineProcess, ReorderingLink
from .test_wireguard_go import WG_PORT, Namespace


class TunnelLink:
    """Joins a Netstack and a WireGuardUDP, batching packets.

    Inbound (``batch_in``): ``received(packet)`` queues, and the queue reaches
    ``netstack.packets_received`` at the end of the reactor turn, so one pass covers all the
    segments of a UDP read burst.  Outbound (``batch_out``): "always" queues every packet the
    stack emits for one ``wg.send_many`` at the end of the turn (one call for a whole TCP
    window); "input" batches only what the stack answers while handling an inbound batch and
    sends the rest at once; "never" sends each packet as it comes.  A send that fails (socket
    buffer full, ...) loses its packets, as a link would; TCP recovers.  Counted in
    ``send_errors``.
    """

    def __init__(self, clock, batch_in: bool = True, batch_out: str = "always") -> None:
        self.clock = clock
        self.netstack: Netstack | None = None
        self.wg: WireGuardUDP | None = None
        self.batch_in = batch_in
        self.batch_out = batch_out
        self.send_errors = 0
        self._out: list[bytes] = []
        self._in: list[bytes] = []
        self._call = None
        self._in_flush = False

    def send(self, packet: bytes) -> None:
        if self.batch_out == "always" or (self._in_flush and self.batch_out == "input"):
            self._out.append(packet)
            if self._call is None and not self._in_flush:
                self._call = self.clock.callLater(0, self.flush)
            return
        try:
            self.wg.send(packet)
        except Exception:
            self.send_errors += 1

    def received(self, packet: bytes) -> None:
        if not self.batch_in:
            self.netstack.packet_received(packet)
            return
        self._in.append(packet)
        if self._call is None:
            self._call = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        self._call = None
        # Inbound first: the stack's answers join this turn's outbound batch.
        self._in_flush = True
        try:
            while self._in:
                batch, self._in = self._in, []
                self.netstack.packets_received(batch)
        finally:
            self._in_flush = False
        if self._out:
            batch, self._out = self._out, []
            try:
                self.wg.send_many(batch)
            except Exception:
                self.send_errors += 1

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class _Inbound:
    """What TunnelLink needs of a Netstack, sending the packets elsewhere first."""

    def __init__(self, to_stack) -> None:
        self.packets_received = to_stack
        self.packet_received = lambda packet: to_stack([packet])


def big_buffers(port, size: int = 16 << 20) -> None:
    """Large socket buffers, so a TCP window's burst of datagrams is not dropped by the host."""
    sock = port.getHandle()
    for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # SO_*BUFFORCE as root
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)


class _FixedNamespace(Namespace):
    """wireguard-go's namespace with the tunnel addresses the netstack tests expect."""

    mtu = 1280

    def _start(self) -> None:
        self.our_ip, self.their_ip = STACK_ADDR, KERNEL_ADDR
        suffix = self.name[len("cswg"):]
        self.name, self.host_if = f"cswt{suffix}", f"cswth{suffix}"
        self.ns_if, self.tun = f"cswtn{suffix}", f"cswtt{suffix}"
        super()._start()
        # The kernel's MSS follows the TUN MTU; one packet per GSO unit keeps TCP's view of
        # loss per segment.
        self.run("ip", "link", "set", self.tun, "mtu", str(self.mtu))


class WireGuardLab:
    """Build the lab for ``case`` (cleanups registered on it).  ``mtu`` is the tunnel MTU."""

    routed = False

    def __init__(self, case, mtu: int = 1280, reorder: float = 0.0, **netstack_kwargs) -> None:
        ns_cls = type("_NS", (_FixedNamespace,), {"mtu": mtu})
        self.ns = ns_cls(case)
        self.case = case
        self.kernel_addr = KERNEL_ADDR
        self.peer_ns = self.ns.name
        self.device = Device(generate_private_key(), mtu=mtu)
        self.device.add_peer(self.ns.public_key)
        self.link = TunnelLink(reactor)
        self.wg = WireGuardUDP(self.device, self.ns.public_key, (self.ns.ns_addr, WG_PORT), reactor,
                               self.link.received)
        self.port = reactor.listenUDP(0, self.wg, interface=self.ns.host_addr, maxPacketSize=1 << 16)
        big_buffers(self.port)
        case.addCleanup(self.port.stopListening)
        self.netstack = Netstack(STACK_ADDR, self.link.send, reactor, mtu=mtu, **netstack_kwargs)
        self.link.netstack, self.link.wg = self.netstack, self.wg
        self.reordering = None
        if reorder:
            # Inner packets held back on our side of the tunnel, both ways (before encryption
            # and after decryption, so WireGuard's replay window is not what reorders them).
            self.reordering = ReorderingLink(self.link.send, self.netstack.packets_received,
                                             probability=reorder)
            self.netstack.send_packet = self.reordering.to_kernel
            self.link.netstack = _Inbound(self.reordering.to_stack)
            case.addCleanup(self.reordering.stop)
        case.addCleanup(self.link.stop)
        case.addCleanup(self.netstack.stop)
        self.ns.configure(self.device.public_key, (self.ns.host_addr, self.port.getHost().port))

    def add_loss(self, probability: float) -> None:
        """Drop outer WireGuard datagrams at random, both directions, on the namespace's veth."""
        for chain, opt in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self.ns.run("iptables", "-A", chain, opt, self.ns.ns_if, "-p", "udp", "-m", "statistic",
                        "--mode", "random", "--probability", str(probability), "-j", "DROP")

    def dropped(self) -> int:
        out = self.ns.run("iptables", "-L", "-v", "-n", "-x")
        return sum(int(line.split()[0]) for line in out.splitlines() if "statistic" in line)

    def stats(self) -> str:
        """A one-line summary for the test log."""
        st = self.netstack.stats
        counters = self.ns.run("nstat", "-az", "UdpRcvbufErrors", "TcpExtTCPLostRetransmit").split()
        return (f"outer drops {self.dropped()}, namespace {' '.join(counters[-6:])}, "
                f"retransmits {st['tcp_retransmits']}, "
                f"out-of-order {st['tcp_out_of_order']}, wg drops {dict(self.device.drops)}")

    def spawn(self, script: str, *args: str, cleanup=None) -> LineProcess:
        """Run a Python script in the namespace (behind wireguard-go)."""
        return self.spawn_argv([sys.executable, "-c", script, *args], cleanup=cleanup)

    def spawn_argv(self, argv: list[str], cleanup=None) -> LineProcess:
        """Run a program in the namespace; killed by PID at cleanup."""
        proto = LineProcess()
        argv = ["ip", "netns", "exec", self.ns.name, *argv]
        transport = reactor.spawnProcess(proto, argv[0], argv, env=os.environ.copy())
        (cleanup or self.case.addCleanup)(lambda: proto.kill(transport))
        return proto
