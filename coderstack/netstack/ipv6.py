"""IPv6 packets (RFC 8200): the fixed header and walking past extension headers.

Fixed header, 40 bytes, big-endian::

    0   version (4 bits) = 6 | traffic class (8) | flow label (20)
    4   payload length (16)  | next header (8)   | hop limit (8)
    8   source address (16 bytes)
    24  destination address (16 bytes)
    40  extension headers, then the upper-layer header (TCP 6, UDP 17, ICMPv6 58)

Extension headers skipped: hop-by-hop options (0), routing (43), destination options (60) — each
``next header (8) | length in 8-octet units not counting the first (8) | ...`` — and the
authentication header (51, length in 4-octet units minus 2).  A fragment header (44) makes the
packet refused: the tunnel never fragments and reassembly is an attack surface we do not need.
ESP (50) and "no next header" (59) are dropped.
"""

from __future__ import annotations

import struct

__all__ = [
    "HEADER",
    "HEADER_LEN",
    "PROTO_ICMPV6",
    "PROTO_TCP",
    "PROTO_UDP",
    "Malformed",
    "Refused",
    "build",
    "parse",
]

HEADER = struct.Struct("!IHBB16s16s")
HEADER_LEN = 40
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
FRAGMENT = 44
_SKIP_8 = frozenset((0, 43, 60))
_AH = 51
MAX_PAYLOAD = 0xFFFF
DEFAULT_HOP_LIMIT = 64


class Malformed(ValueError):
    """The packet is not a well-formed IPv6 packet."""


class Refused(ValueError):
    """Well-formed but deliberately not handled (fragments, ESP, no next header)."""


def build(src: bytes, dst: bytes, next_header: int, payload: bytes, hop_limit: int = DEFAULT_HOP_LIMIT) -> bytes:
    return HEADER.pack(0x60000000, len(payload), next_header, hop_limit, src, dst) + payload


def parse(packet: bytes) -> tuple[bytes, bytes, int, int, int, int]:
    """Return ``(src, dst, next_header, offset, end, hop_limit)`` of the upper-layer payload.

    ``packet[offset:end]`` is the upper-layer message.  Raises Malformed or Refused.
    """
    n = len(packet)
    if n < HEADER_LEN or packet[0] >> 4 != 6:
        raise Malformed("short or not version 6")
    plen, nh, hop = struct.unpack_from("!HBB", packet, 4)
    end = HEADER_LEN + plen
    if end > n:
        raise Malformed("truncated")
    off = HEADER_LEN
    while True:
        if nh in _SKIP_8 or nh == _AH:
            if off + 8 > end:
                raise Malformed("truncated extension header")
            if nh == _AH:
                length = (packet[off + 1] + 2) * 4
            else:
                length = (packet[off + 1] + 1) * 8
            nh = packet[off]
            off += length
            if off > end:
                raise Malformed("extension header overruns packet")
            continue
        if nh == FRAGMENT:
            raise Refused("fragment")
        if nh in (PROTO_TCP, PROTO_UDP, PROTO_ICMPV6):
            return packet[8:24], packet[24:40], nh, off, end, hop
        raise Refused(f"next header {nh}")
