"""The userspace TCP/IP stack on a tunnel: a Conn's packets in and out of a Netstack.

The Conn carries whole IPv6 packets (WireGuard inside, UDP or DERP outside); the netstack turns
them into Twisted stream endpoints on the node's tunnel address. Neither side needs root or a
TUN device: the agent serves SSH and friends on its /128, the CLI dials them.
"""

from __future__ import annotations

from ipaddress import IPv6Address
from typing import Any

from coderstack.netstack.endpoints import Netstack, NetstackClientEndpoint, NetstackServerEndpoint


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
            self.conn.send_packets(batch)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._in, self._out = [], []
        if self.netstack is not None:
            self.netstack.stop()


def attach_netstack(conn: Any, reactor: Any, mtu: int = 1280) -> Netstack:
    """A Netstack on the Conn's addresses, fed by and sending through the Conn in batches."""
    glue = _Glue(conn, reactor)
    ns = Netstack(list(conn.addresses), glue.send, reactor, mtu=mtu)
    glue.netstack = ns
    conn.on_packet(glue.received)
    conn.add_close_hook(glue.stop)
    return ns


def client_endpoint(ns: Netstack, address: IPv6Address | str, port: int, timeout: float = 30) -> NetstackClientEndpoint:
    return NetstackClientEndpoint(ns, str(address), port, timeout=timeout)


def server_endpoint(ns: Netstack, port: int, backlog: int = 128) -> NetstackServerEndpoint:
    return NetstackServerEndpoint(ns, port, backlog=backlog)
