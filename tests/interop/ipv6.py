"""Just enough IPv6 (UDP and ICMPv6 echo) to talk to a kernel through a WireGuard tunnel in tests.

IPv6 header (RFC 8200), 40 bytes: version/class/flow (4) | payload length (2) | next header (1)
| hop limit (1) | source (16) | destination (16). UDP (RFC 768) and ICMPv6 (RFC 4443) checksums
cover a pseudo-header: source | destination | upper-layer length (4) | 3 zero bytes | next header.
The real netstack lives elsewhere; this is a test helper only.
"""

from __future__ import annotations

import ipaddress
import struct

UDP = 17
ICMPV6 = 58
ECHO_REQUEST = 128
ECHO_REPLY = 129


def checksum(data: bytes) -> int:
    """Internet checksum (RFC 1071): ones' complement of the ones' complement sum of u16s."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo(src: bytes, dst: bytes, length: int, next_header: int) -> bytes:
    return src + dst + struct.pack("!I3xB", length, next_header)


def ipv6(src: str, dst: str, next_header: int, payload: bytes, hop_limit: int = 64) -> bytes:
    return (
        struct.pack("!IHBB", 6 << 28, len(payload), next_header, hop_limit)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + payload
    )


def udp6(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    length = 8 + len(data)
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    header = struct.pack("!HHHH", sport, dport, length, 0)
    csum = checksum(_pseudo(s, d, length, UDP) + header + data) or 0xFFFF
    return ipv6(src, dst, UDP, struct.pack("!HHHH", sport, dport, length, csum) + data)


def echo_request(src: str, dst: str, ident: int, seq: int, data: bytes) -> bytes:
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    body = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq) + data
    csum = checksum(_pseudo(s, d, len(body), ICMPV6) + body)
    return ipv6(src, dst, ICMPV6, body[:2] + struct.pack("!H", csum) + body[4:])


def parse(packet: bytes) -> tuple[int, str, str, bytes]:
    """(next header, source, destination, payload) of an IPv6 packet; ValueError if not one."""
    if len(packet) < 40 or packet[0] >> 4 != 6:
        raise ValueError("not IPv6")
    (length,) = struct.unpack_from("!H", packet, 4)
    if 40 + length > len(packet):
        raise ValueError("truncated")
    src = str(ipaddress.IPv6Address(packet[8:24]))
    dst = str(ipaddress.IPv6Address(packet[24:40]))
    return packet[6], src, dst, packet[40 : 40 + length]


def verify(packet: bytes) -> bool:
    """True if the UDP or ICMPv6 checksum of an IPv6 packet is right."""
    next_header, _, _, payload = parse(packet)
    return checksum(_pseudo(packet[8:24], packet[24:40], len(payload), next_header) + payload) == 0


def parse_udp(payload: bytes) -> tuple[int, int, bytes]:
    sport, dport, length, _ = struct.unpack_from("!HHHH", payload)
    return sport, dport, payload[8:length]


def parse_echo(payload: bytes) -> tuple[int, int, int, bytes]:
    """(type, identifier, sequence, data) of an ICMPv6 echo message."""
    kind, _, _, ident, seq = struct.unpack_from("!BBHHH", payload)
    return kind, ident, seq, payload[8:]
