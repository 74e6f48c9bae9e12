"""TCP segment codec (RFC 9293 §3.1) with the options we use.

Header, 20 bytes plus options, big-endian::

    0   source port (16) | destination port (16)
    4   sequence number (32)
    8   acknowledgment number (32)
    12  data offset (4, in 32-bit words) | reserved (4) | flags (8: CWR ECE URG ACK PSH RST SYN FIN)
    14  window (16)
    16  checksum (16) | urgent pointer (16)
    20  options (data offset * 4 - 20 bytes), then data

Options (kind, length, value): 0 end of list; 1 no-op; 2 MSS (4: 16-bit MSS, SYN only);
3 window scale (3: shift count, SYN only, RFC 7323); 4 SACK permitted (2, SYN only, RFC 2018);
5 SACK (2 + 8n: n pairs of left/right edges, RFC 2018); 8 timestamps (10: TSval, TSecr, RFC 7323).
Unknown options are skipped by their length.

The whole packet (IPv6 header + TCP header) is packed in one ``struct`` call; the checksum is
computed arithmetically from the fields (see checksum.py for why that is exact).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from . import checksum, ipv6

__all__ = [
    "ACK",
    "FIN",
    "PACKET",
    "PSH",
    "RST",
    "SYN",
    "Malformed",
    "Options",
    "Segment",
    "build_options",
    "parse_options",
]

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20

# IPv6 header followed by the fixed TCP header: one pack for a whole packet's headers.
PACKET = struct.Struct("!IHBB16s16sHHIIHHHH")
TCP_HEADER = struct.Struct("!HHIIBBHHH")
_TS_FAST = b"\x01\x01\x08\x0a"
_TS = struct.Struct("!II")
_M = 0xFFFFFFFF


class Malformed(ValueError):
    pass


@dataclass
class Options:
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    ts: tuple[int, int] | None = None
    sack: list[tuple[int, int]] = field(default_factory=list)


def parse_options(buf: bytes, start: int, end: int) -> Options:
    """Parse the options area ``buf[start:end]``; raises Malformed on a bad length."""
    opts = Options()
    i = start
    while i < end:
        kind = buf[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end:
            raise Malformed("option length missing")
        length = buf[i + 1]
        if length < 2 or i + length > end:
            raise Malformed("bad option length")
        if kind == 2 and length == 4:
            opts.mss = buf[i + 2] << 8 | buf[i + 3]
        elif kind == 3 and length == 3:
            opts.wscale = buf[i + 2]
        elif kind == 4 and length == 2:
            opts.sack_permitted = True
        elif kind == 8 and length == 10:
            opts.ts = _TS.unpack_from(buf, i + 2)
        elif kind == 5 and (length - 2) % 8 == 0:
            for j in range(i + 2, i + length, 8):
                opts.sack.append(_TS.unpack_from(buf, j))
        i += length
    return opts


def build_options(
    mss: int | None = None,
    wscale: int | None = None,
    sack_permitted: bool = False,
    ts: tuple[int, int] | None = None,
    sack: list[tuple[int, int]] | tuple = (),
) -> bytes:
    """Options padded to a multiple of 4 bytes, laid out as Linux does (NOPs for alignment)."""
    out = b""
    if mss is not None:
        out += struct.pack("!BBH", 2, 4, mss)
    if sack_permitted and ts is not None:
        out += b"\x04\x02\x08\x0a" + _TS.pack(*ts)
    else:
        if ts is not None:
            out += _TS_FAST + _TS.pack(*ts)
        if sack_permitted:
            out += b"\x01\x01\x04\x02"
    if wscale is not None:
        out += b"\x01\x03\x03" + bytes((wscale,))
    if sack:
        out += b"\x01\x01" + bytes((5, 2 + 8 * len(sack))) + b"".join(_TS.pack(a & _M, b & _M) for a, b in sack)
    if len(out) % 4:
        out += b"\x00" * (4 - len(out) % 4)
    return out


@dataclass
class Segment:
    """A decoded segment, for tests, tools and the fuzzers (the data path does not build these)."""

    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: Options = field(default_factory=Options)
    data: bytes = b""
    urgent: int = 0

    @classmethod
    def decode(cls, src: bytes, dst: bytes, msg: bytes, verify: bool = True) -> Segment:
        if len(msg) < 20:
            raise Malformed("short")
        sport, dport, seq, ack, off, flags, window, _ck, urg = TCP_HEADER.unpack_from(msg, 0)
        doff = (off >> 4) * 4
        if doff < 20 or doff > len(msg):
            raise Malformed("bad data offset")
        if verify and not checksum.verify(src, dst, ipv6.PROTO_TCP, msg):
            raise Malformed("checksum")
        return cls(sport, dport, seq, ack, flags, window, parse_options(msg, 20, doff), bytes(msg[doff:]), urg)

    def encode(self, src: bytes, dst: bytes, hop_limit: int = 64) -> bytes:
        """A whole IPv6 packet carrying this segment."""
        o = self.options
        opts = build_options(o.mss, o.wscale, o.sack_permitted, o.ts, o.sack)
        return build_packet(src, dst, self.sport, self.dport, self.seq, self.ack, self.flags, self.window, opts, self.data, hop_limit)


def build_packet(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    opts: bytes,
    data: bytes,
    hop_limit: int = 64,
) -> bytes:
    seq &= _M
    ack &= _M
    tcp_len = 20 + len(opts) + len(data)
    offflags = ((20 + len(opts)) << 10) | flags
    total = int.from_bytes(src + dst, "big") + 6 + tcp_len + sport + dport + seq + ack + offflags + window
    if opts:
        total += int.from_bytes(opts, "big")
    if data:
        total += checksum.sum_bytes(data)
    hdr = PACKET.pack(
        0x60000000, tcp_len, 6, hop_limit, src, dst, sport, dport, seq, ack, offflags, window, 0xFFFF - total % 0xFFFF, 0
    )
    return hdr + opts + data if data else hdr + opts
