"""The userspace TCP/IP stack on a tunnel: a Conn's packets in and out of a Netstack.

The Conn carries whole IPv6 packets (WireGuard inside, UDP or DERP outside); the netstack turns
them into Twisted stream endpoints on the node's tunnel address. Neither side needs root or a
TUN device: the agent serves SSH and friends on its /128, the CLI dials them.

Path MTU: the Conn's per-peer MTU (proven by magicsock's probes) goes to
``Netstack.set_path_mtu`` for each of the peer's addresses, so TCP segments grow to what the
path carries and shrink back when it changes; the MSS we announce is the Conn's
``receive_mtu``. A packet still larger than its peer's MTU when it leaves (emitted just before
the MTU dropped) is not sent: the stack gets an ICMPv6 packet-too-big for it, as from a router,
and re-sends in smaller segments at once instead of waiting for a retransmission timeout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from ipaddress import IPv6Address
from typing import Any

from coderstack.netstack import icmpv6
from coderstack.netstack.endpoints import Netstack, NetstackClientEndpoint, NetstackServerEndpoint
from coderstack.netstack.tcp import TCPConfig
from coderstack.tailnet.pmtu import BASE_MTU


class _Glue:
    """Moves packets between a Conn and its Netstack a reactor turn's worth at a time.

    Inbound packets of one UDP read burst reach ``packets_received`` together (delayed ACKs are
    coalesced per batch); everything the stack emits in a turn goes to WireGuard's ``send_many``
    in one call. Batching was worth about 20% of TCP throughput over our WireGuard at MTU 1280
    (BENCHMARKS.md); it adds no delay beyond the end of the current reactor turn.
    """

    def __init__(self, conn: Any, reactor: Any) -> None:
        self.conn = conn
        self.reactor = reactor
        self.netstack: Netstack | None = None
        self._in: list[bytes] = []
        self._out: list[bytes] = []
        self._call: Any = None
        self._in_flush = False
        self.mtus: dict[bytes, int] = {}  # packed peer address -> inner MTU, where not 1280
        self.too_big = 0

    def path_mtu_changed(self, addresses: list[bytes], mtu: int) -> None:
        for packed in addresses:
            if mtu == BASE_MTU:
                self.mtus.pop(packed, None)
            else:
                self.mtus[packed] = mtu
            if self.netstack is not None:
                self.netstack.set_path_mtu(str(IPv6Address(packed)), None if mtu == BASE_MTU else mtu)

    def send(self, packet: bytes) -> None:
        self._out.append(packet)
        if self._call is None and not self._in_flush:
            self._call = self.reactor.callLater(0, self.flush)

    def received(self, _src_key: bytes, packet: bytes) -> None:
        self._in.append(packet)
        if self._call is None:
            self._call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self._call = None
        # Inbound first, so what the stack answers joins this turn's outbound batch.
        self._in_flush = True
        try:
            while self._in and self.netstack is not None:
                batch, self._in = self._in, []
                self.netstack.packets_received(batch)
        finally:
            self._in_flush = False
        if self._out:
            batch, self._out = self._out, []
            if self.mtus or any(len(p) > BASE_MTU for p in batch):
                batch = self._fit(batch)
            if batch:
                self.conn.send_packets(batch)
            if self._in and self._call is None:
                self._call = self.reactor.callLater(0, self.flush)  # packet-too-big for the stack

    def _fit(self, batch: list[bytes]) -> list[bytes]:
        mtus, out = self.mtus, []
        for p in batch:
            n = len(p)
            if n > BASE_MTU and n > mtus.get(bytes(p[24:40]), BASE_MTU):
                self.too_big += 1
                if p[6] == 6:  # TCP (whose segments the stack sizes): tell it, as a router would
                    mtu = mtus.get(bytes(p[24:40]), BASE_MTU)
                    self._in.append(icmpv6.build_error(p[24:40], p[8:24], icmpv6.PACKET_TOO_BIG, 0, mtu, p))
                continue
            out.append(p)
        return out

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._in, self._out = [], []
        if self.netstack is not None:
            self.netstack.stop()


BDP_FLOOR_ENV = "CODERSTACK_TCP_BDP_FLOOR"  # "0", "false", "off" or "no": loss-based control alone


def bdp_floor_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """The tunnel's TCP keeps its window at the measured bandwidth-delay product through rare
    losses (netstack/bdpfloor.py) unless ``CODERSTACK_TCP_BDP_FLOOR`` says off."""
    value = (os.environ if environ is None else environ).get(BDP_FLOOR_ENV, "").strip().lower()
    return value not in ("0", "false", "off", "no")


def attach_netstack(conn: Any, reactor: Any, mtu: int = BASE_MTU) -> Netstack:
    """A Netstack on the Conn's addresses, fed by and sending through the Conn in batches.

    ``mtu`` is the default path MTU (1280); a peer's probed path MTU raises it for that peer.
    """
    glue = _Glue(conn, reactor)
    receive_mtu = max(mtu, getattr(conn, "receive_mtu", mtu))
    # Every packet this stack receives came out of WireGuard, whose ChaCha20-Poly1305 tag
    # authenticated all of its bytes (or from the glue itself: packet-too-big, ICMPv6, which
    # keeps its check). A TCP checksum can only catch corruption, which the tag already
    # rejects, and verifying it was about a tenth of the receive path's CPU per packet.
    ns = Netstack(list(conn.addresses), glue.send, reactor,
                  config=TCPConfig(mtu=mtu, receive_mtu=receive_mtu, bdp_floor=bdp_floor_from_env()),
                  verify_tcp_checksum=False)
    glue.netstack = ns
    conn.on_packet(glue.received)
    if hasattr(conn, "on_path_mtu"):
        conn.on_path_mtu(glue.path_mtu_changed)
    conn.add_close_hook(glue.stop)
    return ns


def client_endpoint(ns: Netstack, address: IPv6Address | str, port: int, timeout: float = 30) -> NetstackClientEndpoint:
    return NetstackClientEndpoint(ns, str(address), port, timeout=timeout)


def server_endpoint(ns: Netstack, port: int, backlog: int = 128) -> NetstackServerEndpoint:
    return NetstackServerEndpoint(ns, port, backlog=backlog)
