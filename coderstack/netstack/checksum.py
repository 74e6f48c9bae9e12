"""The Internet checksum (RFC 1071) as used by TCP, UDP and ICMPv6 over IPv6 (RFC 8200 §8.1).

The one's-complement sum of 16-bit big-endian words equals the value of the whole byte string,
read as one big integer, modulo 0xFFFF (because 2**16 == 1 mod 0xFFFF), as long as every piece
being added starts on a 16-bit boundary.  ``int.from_bytes`` and one ``%`` therefore replace a
Python loop over words.  An odd-length piece is padded with one zero byte (``<< 8``).

The IPv6 pseudo-header is: source address (16), destination address (16), upper-layer packet
length (32 bits), three zero bytes, next header (8 bits).
"""

from __future__ import annotations

__all__ = ["pseudo_header_sum", "finish", "sum_bytes", "verify"]


def sum_bytes(data: bytes | bytearray | memoryview) -> int:
    """The (unreduced) contribution of ``data`` starting on an even offset."""
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    return value


def pseudo_header_sum(src: bytes, dst: bytes, next_header: int, length: int) -> int:
    return int.from_bytes(src, "big") + int.from_bytes(dst, "big") + next_header + length


def finish(total: int) -> int:
    """Turn an unreduced sum into the value for the checksum field (never 0: UDP needs that)."""
    return 0xFFFF - (total % 0xFFFF)


def verify(src: bytes, dst: bytes, next_header: int, segment: bytes | memoryview) -> bool:
    """True if ``segment`` (checksum field included) sums to zero with its pseudo-header."""
    return (pseudo_header_sum(src, dst, next_header, len(segment)) + sum_bytes(segment)) % 0xFFFF == 0
