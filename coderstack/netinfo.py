"""This host's network interfaces (Linux): names, MTU, up/down and addresses.

One walk serves every reader: netcheck's interfaces report (MTU warnings) and its choice of
whether IPv6 probes are worth sending, the link monitor's snapshots, and the endpoints a node
advertises before STUN has mapped any (what makes two hosts on one LAN connect directly).

Sources, all small blocking reads: ``/sys/class/net/<name>/{mtu,flags}``; the IPv4 address and
netmask by ``SIOCGIFADDR``/``SIOCGIFNETMASK`` (the interface's primary address); IPv6 from
``/proc/net/if_inet6``, one line per address::

    fd000000000000000000000000000001 05 40 00 80     eth0
    address (32 hex digits)          index prefix-length (hex) scope flags  name
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SYS_CLASS_NET = "/sys/class/net"
IF_INET6 = "/proc/net/if_inet6"

_SIOCGIFADDR = 0x8915
_SIOCGIFNETMASK = 0x891B
_IFF_UP = 0x1


@dataclass(frozen=True)
class Interface:
    name: str
    mtu: int
    addresses: tuple[str, ...]  # CIDR strings, e.g. "192.0.2.5/24"
    up: bool = True


def gather_interfaces(sys_class_net: str = SYS_CLASS_NET, if_inet6: str = IF_INET6) -> list[Interface]:
    """Every interface whose MTU and flags can be read, sorted by name."""
    v6: dict[str, list[str]] = {}
    for name, cidr in _ipv6_addresses(if_inet6):
        v6.setdefault(name, []).append(cidr)
    try:
        names = sorted(os.listdir(sys_class_net))
    except OSError:
        names = [n for _, n in socket.if_nameindex()]
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                with open(os.path.join(sys_class_net, name, "mtu")) as f:
                    mtu = int(f.read().strip())
                with open(os.path.join(sys_class_net, name, "flags")) as f:
                    up = bool(int(f.read().strip(), 16) & _IFF_UP)
            except (OSError, ValueError):
                continue
            addrs = []
            v4 = _ipv4_of(s, name)
            if v4:
                addrs.append(v4)
            addrs.extend(v6.get(name, []))
            out.append(Interface(name, mtu, tuple(addrs), up))
    return out


def interface_addresses(if_inet6: str = IF_INET6) -> list[IPAddress]:
    """The host's own addresses as endpoint candidates: IPv4 in interface-index order, then IPv6;
    loopback, unspecified and IPv6 link-local left out (no peer can reach those)."""
    out: list[IPAddress] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            cidr = _ipv4_of(s, name)
            if cidr is None:
                continue
            addr = ipaddress.ip_interface(cidr).ip
            if not addr.is_loopback and not addr.is_unspecified:
                out.append(addr)
    for _name, cidr in _ipv6_addresses(if_inet6):
        addr6 = ipaddress.ip_interface(cidr).ip
        if not (addr6.is_loopback or addr6.is_link_local):
            out.append(addr6)
    return out


def have_global_v6() -> bool:
    """Is there a global-unicast IPv6 address on an up interface (worth sending v6 probes)?"""
    for iface in gather_interfaces():
        if not iface.up:
            continue
        for a in iface.addresses:
            ip = ipaddress.ip_interface(a).ip
            if ip.version == 6 and ip.is_global:
                return True
    return False


def os_has_ipv6() -> bool:
    """Can we bind a UDP socket to [::1]? (Tailscale's OSHasIPv6.)"""
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError:
        return False
    try:
        s.bind(("::1", 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _ipv6_addresses(if_inet6: str) -> list[tuple[str, str]]:
    """``(interface name, "addr/prefix")`` per line of ``/proc/net/if_inet6``, in file order."""
    out = []
    try:
        with open(if_inet6) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6:
                    addr = ipaddress.IPv6Address(bytes.fromhex(parts[0]))
                    out.append((parts[5], f"{addr}/{int(parts[2], 16)}"))
    except OSError:
        pass
    return out


def _ipv4_of(s: socket.socket, name: str) -> str | None:
    """``"addr/prefix"`` of the interface's primary IPv4 address, or None when it has none."""
    req = struct.pack("256s", name.encode()[:15])
    try:
        addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24])
        mask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFNETMASK, req)[20:24])
    except OSError:
        return None
    prefix = ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen
    return f"{addr}/{prefix}"
