"""This host's interface addresses, for the endpoints a node advertises (Linux).

Until the tunnel finds STUN-mapped endpoints, a node's candidates are its own addresses: that is
what makes two hosts on one LAN connect directly. Loopback and IPv6 link-local are left out.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

SIOCGIFADDR = 0x8915


def interface_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            addr = ipaddress.IPv4Address(packed[20:24])
            if not addr.is_loopback and not addr.is_unspecified:
                out.append(addr)
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                addr6 = ipaddress.IPv6Address(int(line.split()[0], 16))
                if not (addr6.is_loopback or addr6.is_link_local):
                    out.append(addr6)
    except OSError:
        pass
    return out


def endpoint_text(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"
