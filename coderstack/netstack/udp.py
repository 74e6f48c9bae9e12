"""UDP over IPv6 (RFC 768, RFC 8200 §8.1: the checksum is mandatory over IPv6).

Header, 8 bytes: ``source port (16) | destination port (16) | length (16) | checksum (16)``;
the length counts header and data.  A computed checksum of zero is sent as 0xFFFF; a received
zero checksum is invalid over IPv6.
"""

from __future__ import annotations

import struct

from . import checksum, ipv6

__all__ = ["HEADER", "Malformed", "build", "parse"]

HEADER = struct.Struct("!HHHH")


class Malformed(ValueError):
    pass


def build(src: bytes, dst: bytes, sport: int, dport: int, data: bytes, hop_limit: int = 64) -> bytes:
    length = 8 + len(data)
    total = checksum.pseudo_header_sum(src, dst, ipv6.PROTO_UDP, length)
    total += sport + dport + length + checksum.sum_bytes(data)
    return ipv6.build(src, dst, ipv6.PROTO_UDP, HEADER.pack(sport, dport, length, checksum.finish(total)) + data, hop_limit)


def parse(src: bytes, dst: bytes, msg: bytes) -> tuple[int, int, bytes]:
    """``(sport, dport, data)``; raises Malformed (bad length or checksum)."""
    if len(msg) < 8:
        raise Malformed("short")
    sport, dport, length, ck = HEADER.unpack_from(msg, 0)
    if length < 8 or length > len(msg) or ck == 0:
        raise Malformed("bad length or zero checksum")
    if length != len(msg):
        msg = msg[:length]
    if not checksum.verify(src, dst, ipv6.PROTO_UDP, msg):
        raise Malformed("checksum")
    return sport, dport, msg[8:]
