"""ICMPv6 (RFC 4443) messages the stack speaks.

Every message: ``type (8) | code (8) | checksum (16) | body``, the checksum covering the IPv6
pseudo-header (next header 58).

- Echo request (128) / echo reply (129): ``identifier (16) | sequence (16) | data``.
- Packet too big (2, code 0): ``MTU (32) | as much of the invoking packet as fits in 1280``.
- Destination unreachable (1; code 4 = port unreachable, 1 = administratively prohibited):
  ``unused (32) | invoking packet``.
"""

from __future__ import annotations

import struct

from . import checksum, ipv6

__all__ = [
    "DEST_UNREACHABLE",
    "ECHO_REPLY",
    "ECHO_REQUEST",
    "PACKET_TOO_BIG",
    "build",
    "build_echo",
    "build_error",
    "parse_echo",
]

DEST_UNREACHABLE = 1
PACKET_TOO_BIG = 2
ECHO_REQUEST = 128
ECHO_REPLY = 129
CODE_PORT_UNREACHABLE = 4
MIN_MTU = 1280
_HDR = struct.Struct("!BBH")
_ECHO = struct.Struct("!BBHHH")


def build(src: bytes, dst: bytes, type_: int, code: int, body: bytes) -> bytes:
    """A whole IPv6 packet carrying one ICMPv6 message."""
    length = 4 + len(body)
    total = checksum.pseudo_header_sum(src, dst, ipv6.PROTO_ICMPV6, length)
    total += (type_ << 8 | code) + checksum.sum_bytes(body)
    msg = _HDR.pack(type_, code, checksum.finish(total)) + body
    return ipv6.build(src, dst, ipv6.PROTO_ICMPV6, msg, 255 if type_ < 128 else 64)


def build_echo(src: bytes, dst: bytes, type_: int, ident: int, seq: int, data: bytes) -> bytes:
    return build(src, dst, type_, 0, struct.pack("!HH", ident, seq) + data)


def build_error(src: bytes, dst: bytes, type_: int, code: int, word: int, invoking: bytes) -> bytes:
    """An error message quoting as much of ``invoking`` as keeps the packet within 1280 bytes."""
    room = MIN_MTU - ipv6.HEADER_LEN - 8
    return build(src, dst, type_, code, struct.pack("!I", word) + invoking[:room])


def parse_echo(msg: bytes) -> tuple[int, int, int, bytes]:
    """``(type, identifier, sequence, data)`` of an echo message (len(msg) >= 8 checked by caller)."""
    type_, _code, _ck, ident, seq = _ECHO.unpack_from(msg, 0)
    return type_, ident, seq, msg[8:]
