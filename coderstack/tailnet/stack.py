"""The userspace TCP/IP stack on a tunnel: a Conn's packets in and out of a Netstack.

The Conn carries whole IPv6 packets (WireGuard inside, UDP or DERP outside); the netstack turns
them into Twisted stream endpoints on the node's tunnel address. Neither side needs root or a
TUN device: the agent serves SSH and friends on its /128, the CLI dials them.
"""

from __future__ import annotations

from ipaddress import IPv6Address
from typing import Any

from coderstack.netstack.endpoints import Netstack, NetstackClientEndpoint, NetstackServerEndpoint


def attach_netstack(conn: Any, reactor: Any, mtu: int = 1280) -> Netstack:
    """A Netstack on the Conn's addresses, fed by and sending through the Conn."""
    ns = Netstack(list(conn.addresses), lambda packet: conn.send_packet(None, packet), reactor, mtu=mtu)
    conn.on_packet(lambda _src_key, packet: ns.packet_received(packet))
    conn.add_close_hook(ns.stop)
    return ns


def client_endpoint(ns: Netstack, address: IPv6Address | str, port: int, timeout: float = 30) -> NetstackClientEndpoint:
    return NetstackClientEndpoint(ns, str(address), port, timeout=timeout)


def server_endpoint(ns: Netstack, port: int, backlog: int = 128) -> NetstackServerEndpoint:
    return NetstackServerEndpoint(ns, port, backlog=backlog)
