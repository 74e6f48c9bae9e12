"""STUN messages (RFC 8489, with RFC 5389 and classic RFC 3489 requests understood): sans-IO codec.

Wire format (all integers big-endian)::

     0                   1                   2                   3
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |0 0|     STUN Message Type     |         Message Length        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                   Magic Cookie 0x2112A442                     |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                Transaction ID (96 bits)                       |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    | attributes: type (16) | length (16) | value, padded to 4 bytes |

- The 14-bit type interleaves a 12-bit method (Binding = 1) with a 2-bit class:
  0x0001 request, 0x0011 indication, 0x0101 success response, 0x0111 error response.
- The length excludes the 20-byte header and is a multiple of 4.
- Attribute types 0x0000-0x7FFF are comprehension-required, 0x8000-0xFFFF optional.
- XOR-MAPPED-ADDRESS (0x0020; some servers wrongly use 0x8020) = ``0, family (1 v4 / 2 v6),
  port ^ 0x2112, address ^ cookie`` (v6: ^ cookie || transaction id). MAPPED-ADDRESS (0x0001)
  is the same without the XOR.
- FINGERPRINT (0x8028) is last: CRC-32 (zlib) of everything before it, with the header length
  already counting it, XOR 0x5354554E.
- ERROR-CODE (0x0009) = ``0 0 class(hundreds) number(0-99) reason-utf8``; with 420 the server
  lists the types it did not understand in UNKNOWN-ATTRIBUTES (0x000A, 16-bit each).
- A classic RFC 3489 request has no cookie: the 16 bytes after the length are all transaction
  id, and the answer carries MAPPED-ADDRESS only. :attr:`Message.classic` marks such messages.

Everything here is pure: bytes in, values out. Bad input raises :class:`STUNError` only.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import zlib
from dataclasses import dataclass, field

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_LEN = 20
FINGERPRINT_XOR = 0x5354554E

# Methods and classes.
METHOD_BINDING = 0x001
CLASS_REQUEST = 0b00
CLASS_INDICATION = 0b01
CLASS_SUCCESS = 0b10
CLASS_ERROR = 0b11

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

# Attribute types.
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_RESPONSE_ADDRESS = 0x0002  # RFC 3489, withdrawn
ATTR_CHANGE_REQUEST = 0x0003  # RFC 5780
ATTR_SOURCE_ADDRESS = 0x0004  # RFC 3489
ATTR_CHANGED_ADDRESS = 0x0005  # RFC 3489
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_ERROR_CODE = 0x0009
ATTR_UNKNOWN_ATTRIBUTES = 0x000A
ATTR_REALM = 0x0014
ATTR_NONCE = 0x0015
ATTR_MESSAGE_INTEGRITY_SHA256 = 0x001C
ATTR_PASSWORD_ALGORITHM = 0x001D
ATTR_USERHASH = 0x001E
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_PRIORITY = 0x0024  # ICE
ATTR_USE_CANDIDATE = 0x0025  # ICE
ATTR_PADDING = 0x0026  # RFC 5780
ATTR_RESPONSE_PORT = 0x0027  # RFC 5780
ATTR_XOR_MAPPED_ADDRESS_ALT = 0x8020  # non-standard, seen in the wild
ATTR_SOFTWARE = 0x8022
ATTR_ALTERNATE_SERVER = 0x8023
ATTR_FINGERPRINT = 0x8028
ATTR_ICE_CONTROLLED = 0x8029
ATTR_ICE_CONTROLLING = 0x802A
ATTR_RESPONSE_ORIGIN = 0x802B
ATTR_OTHER_ADDRESS = 0x802C

#: Comprehension-required attributes this codec (and so our server) understands. Authentication
#: attributes are understood in the sense that a server without credentials ignores them.
KNOWN_REQUIRED = frozenset(
    {
        ATTR_MAPPED_ADDRESS,
        ATTR_CHANGE_REQUEST,
        ATTR_SOURCE_ADDRESS,
        ATTR_CHANGED_ADDRESS,
        ATTR_USERNAME,
        ATTR_MESSAGE_INTEGRITY,
        ATTR_ERROR_CODE,
        ATTR_UNKNOWN_ATTRIBUTES,
        ATTR_REALM,
        ATTR_NONCE,
        ATTR_MESSAGE_INTEGRITY_SHA256,
        ATTR_PASSWORD_ALGORITHM,
        ATTR_USERHASH,
        ATTR_XOR_MAPPED_ADDRESS,
        ATTR_PRIORITY,
        ATTR_USE_CANDIDATE,
        ATTR_PADDING,
    }
)

REASONS = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthenticated",
    420: "Unknown Attribute",
    438: "Stale Nonce",
    500: "Server Error",
}

_FAMILY_V4 = 0x01
_FAMILY_V6 = 0x02
_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"

Address = tuple[str, int]


class STUNError(ValueError):
    """A datagram that is not a well-formed STUN message (the codec's only exception)."""


@dataclass(frozen=True)
class Message:
    """One STUN message. ``transaction_id`` is 12 bytes (16 for a classic RFC 3489 message)."""

    method: int
    cls: int
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes], ...] = ()
    #: True when the message carries no magic cookie (RFC 3489).
    classic: bool = False
    #: True when a valid FINGERPRINT was present (decode) or is to be added (encode).
    fingerprint: bool = field(default=False, compare=False)

    @property
    def msg_type(self) -> int:
        return compose_type(self.method, self.cls)

    def get(self, attr_type: int) -> bytes | None:
        """The value of the first attribute of that type, or None."""
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return None

    def unknown_required(self) -> list[int]:
        """Comprehension-required attribute types this codec does not understand (RFC order)."""
        seen: list[int] = []
        for t, _ in self.attributes:
            if t < 0x8000 and t not in KNOWN_REQUIRED and t not in seen:
                seen.append(t)
        return seen


def compose_type(method: int, cls: int) -> int:
    """Interleave the method bits M11..M0 and class bits C1 C0 (RFC 8489 section 5)."""
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0b01) << 4)
        | ((cls & 0b10) << 7)
    )


def split_type(msg_type: int) -> tuple[int, int]:
    method = (msg_type & 0x000F) | ((msg_type & 0x00E0) >> 1) | ((msg_type & 0x3E00) >> 2)
    cls = ((msg_type >> 4) & 0b01) | ((msg_type >> 7) & 0b10)
    return method, cls


def new_transaction_id() -> bytes:
    return os.urandom(12)


def is_stun(datagram: bytes) -> bool:
    """Cheap test for demultiplexing a shared socket: a header with the RFC 5389 cookie.

    WireGuard messages start with a type byte 1-4 and three zero bytes, disco with "TS💬";
    neither has the cookie at offset 4.
    """
    return (
        len(datagram) >= HEADER_LEN
        and datagram[0] & 0xC0 == 0
        and datagram[4:8] == _COOKIE_BYTES
    )


def fingerprint_of(data: bytes) -> int:
    return (zlib.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


# --- decoding -------------------------------------------------------------------------------


def decode(datagram: bytes) -> Message:
    """Parse one STUN message; the datagram must be exactly one message."""
    n = len(datagram)
    if n < HEADER_LEN:
        raise STUNError(f"too short for a STUN header ({n} bytes)")
    msg_type, length = struct.unpack_from("!HH", datagram, 0)
    if msg_type & 0xC000:
        raise STUNError("the two top bits of a STUN message are not zero")
    if length % 4:
        raise STUNError(f"message length {length} is not a multiple of 4")
    if HEADER_LEN + length != n:
        raise STUNError(f"message length {length} does not match the datagram ({n} bytes)")
    classic = datagram[4:8] != _COOKIE_BYTES
    txid = bytes(datagram[4:20] if classic else datagram[8:20])
    attrs: list[tuple[int, bytes]] = []
    pos = HEADER_LEN
    has_fp = False
    while pos < n:
        if has_fp:
            raise STUNError("an attribute follows FINGERPRINT")
        if n - pos < 4:
            raise STUNError("truncated attribute header")
        atype, alen = struct.unpack_from("!HH", datagram, pos)
        start = pos + 4
        end = start + alen
        if end > n:
            raise STUNError(f"attribute 0x{atype:04x} runs past the end of the message")
        value = bytes(datagram[start:end])
        if atype == ATTR_FINGERPRINT:
            if alen != 4:
                raise STUNError("FINGERPRINT is not 4 bytes")
            (got,) = struct.unpack("!I", value)
            if got != fingerprint_of(datagram[:pos]):
                raise STUNError("FINGERPRINT does not match")
            has_fp = True
        else:
            attrs.append((atype, value))
        pos = start + alen + (-alen % 4)
    if pos != n:
        raise STUNError("attribute padding runs past the end of the message")
    method, cls = split_type(msg_type)
    return Message(method, cls, txid, tuple(attrs), classic=classic, fingerprint=has_fp)


def _unpack_address(value: bytes, xor_with: bytes | None) -> Address:
    if len(value) < 4 or value[0] != 0:
        raise STUNError("malformed address attribute")
    family = value[1]
    (port,) = struct.unpack_from("!H", value, 2)
    raw = value[4:]
    if family == _FAMILY_V4:
        if len(raw) != 4:
            raise STUNError("IPv4 address attribute is not 8 bytes")
    elif family == _FAMILY_V6:
        if len(raw) != 16:
            raise STUNError("IPv6 address attribute is not 20 bytes")
    else:
        raise STUNError(f"unknown address family {family}")
    if xor_with is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, xor_with, strict=False))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), port


def decode_xor_address(value: bytes, transaction_id: bytes) -> Address:
    """Decode an XOR-MAPPED-ADDRESS value (12-byte transaction id)."""
    return _unpack_address(value, _COOKIE_BYTES + transaction_id[-12:])


def decode_address(value: bytes) -> Address:
    """Decode a MAPPED-ADDRESS (or SOURCE-/CHANGED-ADDRESS) value."""
    return _unpack_address(value, None)


def mapped_address(msg: Message) -> Address | None:
    """The reflexive address in a response: XOR-MAPPED-ADDRESS (0x0020, then 0x8020), else
    MAPPED-ADDRESS. None when the message has none."""
    if not msg.classic:
        for atype in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT):
            v = msg.get(atype)
            if v is not None:
                return decode_xor_address(v, msg.transaction_id)
    v = msg.get(ATTR_MAPPED_ADDRESS)
    if v is not None:
        return decode_address(v)
    return None


def decode_error_code(value: bytes) -> tuple[int, str]:
    if len(value) < 4:
        raise STUNError("ERROR-CODE shorter than 4 bytes")
    klass = value[2] & 0x07
    number = value[3]
    if not 3 <= klass <= 6 or number > 99:
        raise STUNError("ERROR-CODE out of range")
    reason = value[4:].decode("utf-8", errors="replace")
    return klass * 100 + number, reason


def decode_unknown_attributes(value: bytes) -> list[int]:
    if len(value) % 2:
        raise STUNError("UNKNOWN-ATTRIBUTES has an odd length")
    return list(struct.unpack(f"!{len(value) // 2}H", value))


# --- encoding -------------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """Serialize; adds FINGERPRINT last when ``msg.fingerprint`` is set (not for classic)."""
    body = bytearray()
    for atype, value in msg.attributes:
        if len(value) > 0xFFFF:
            raise STUNError("attribute value too long")
        body += struct.pack("!HH", atype, len(value))
        body += value
        body += b"\x00" * (-len(value) % 4)
    if msg.classic:
        if len(msg.transaction_id) != 16:
            raise STUNError("a classic STUN transaction id is 16 bytes")
        tid = msg.transaction_id
    else:
        if len(msg.transaction_id) != 12:
            raise STUNError("a STUN transaction id is 12 bytes")
        tid = _COOKIE_BYTES + msg.transaction_id
    add_fp = msg.fingerprint and not msg.classic
    length = len(body) + (8 if add_fp else 0)
    if length > 0xFFFF:
        raise STUNError("message too long")
    out = bytearray(struct.pack("!HH", msg.msg_type, length))
    out += tid
    out += body
    if add_fp:
        out += struct.pack("!HHI", ATTR_FINGERPRINT, 4, fingerprint_of(bytes(out)))
    return bytes(out)


def _pack_address(addr: Address, xor_with: bytes | None) -> bytes:
    host, port = addr
    if not 0 <= port <= 0xFFFF:
        raise STUNError(f"port {port} out of range")
    # inet_pton is the fast path (this runs once per answered request).
    try:
        raw = socket.inet_pton(socket.AF_INET, host)
        family = _FAMILY_V4
    except OSError:
        try:
            raw = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        except OSError:
            raise STUNError(f"not an IP address: {host!r}") from None
        if raw[:12] == _V4_MAPPED_PREFIX:
            raw, family = raw[12:], _FAMILY_V4
        else:
            family = _FAMILY_V6
    if xor_with is not None:
        port ^= MAGIC_COOKIE >> 16
        n = len(raw)
        raw = (int.from_bytes(raw, "big") ^ int.from_bytes(xor_with[:n], "big")).to_bytes(n, "big")
    return struct.pack("!BBH", 0, family, port) + raw


def encode_xor_address(addr: Address, transaction_id: bytes) -> bytes:
    return _pack_address(addr, _COOKIE_BYTES + transaction_id[-12:])


def encode_address(addr: Address) -> bytes:
    return _pack_address(addr, None)


def encode_error_code(code: int, reason: str | None = None) -> bytes:
    if not 300 <= code <= 699:
        raise STUNError(f"error code {code} out of range")
    text = (reason if reason is not None else REASONS.get(code, "")).encode("utf-8")[:763]
    return struct.pack("!HBB", 0, code // 100, code % 100) + text


def encode_unknown_attributes(types: list[int]) -> bytes:
    return struct.pack(f"!{len(types)}H", *types)


# --- Binding transactions -------------------------------------------------------------------


def binding_request(
    transaction_id: bytes | None = None,
    *,
    software: bytes | None = b"coderstack",
    fingerprint: bool = True,
) -> tuple[bytes, bytes]:
    """A Binding request; returns ``(transaction_id, datagram)``."""
    tid = transaction_id if transaction_id is not None else new_transaction_id()
    attrs: tuple[tuple[int, bytes], ...] = ((ATTR_SOFTWARE, software),) if software else ()
    msg = Message(METHOD_BINDING, CLASS_REQUEST, tid, attrs, fingerprint=fingerprint)
    return tid, encode(msg)


def binding_success(
    request: Message,
    source: Address,
    *,
    software: bytes | None = b"coderstack",
) -> bytes:
    """The success response to ``request`` for a client seen at ``source``."""
    if request.classic:
        attrs: list[tuple[int, bytes]] = [(ATTR_MAPPED_ADDRESS, encode_address(source))]
    else:
        attrs = [(ATTR_XOR_MAPPED_ADDRESS, encode_xor_address(source, request.transaction_id))]
    if software:
        attrs.append((ATTR_SOFTWARE, software))
    msg = Message(
        request.method,
        CLASS_SUCCESS,
        request.transaction_id,
        tuple(attrs),
        classic=request.classic,
        fingerprint=request.fingerprint or not request.classic,
    )
    return encode(msg)


def binding_error(
    request: Message,
    code: int,
    reason: str | None = None,
    *,
    unknown: list[int] | None = None,
    software: bytes | None = b"coderstack",
) -> bytes:
    """An error response (e.g. 420 with the UNKNOWN-ATTRIBUTES list) to ``request``."""
    attrs: list[tuple[int, bytes]] = [(ATTR_ERROR_CODE, encode_error_code(code, reason))]
    if unknown:
        attrs.append((ATTR_UNKNOWN_ATTRIBUTES, encode_unknown_attributes(unknown)))
    if software:
        attrs.append((ATTR_SOFTWARE, software))
    msg = Message(
        request.method,
        CLASS_ERROR,
        request.transaction_id,
        tuple(attrs),
        classic=request.classic,
        fingerprint=not request.classic,
    )
    return encode(msg)


@dataclass(frozen=True)
class BindingResponse:
    """What a client needs from an answer: the transaction, and the address or the error."""

    transaction_id: bytes
    mapped: Address | None = None
    error: tuple[int, str] | None = None
    unknown_attributes: tuple[int, ...] = ()
    software: str = ""


def parse_response(datagram: bytes) -> BindingResponse:
    """Parse a Binding success or error response; raises STUNError for anything else."""
    msg = decode(datagram)
    if msg.method != METHOD_BINDING:
        raise STUNError(f"not a Binding message (method 0x{msg.method:03x})")
    sw = msg.get(ATTR_SOFTWARE)
    software = sw.decode("utf-8", errors="replace") if sw else ""
    if msg.cls == CLASS_SUCCESS:
        mapped = mapped_address(msg)
        if mapped is None:
            raise STUNError("Binding success response without a mapped address")
        return BindingResponse(msg.transaction_id, mapped=mapped, software=software)
    if msg.cls == CLASS_ERROR:
        ec = msg.get(ATTR_ERROR_CODE)
        if ec is None:
            raise STUNError("error response without ERROR-CODE")
        ua = msg.get(ATTR_UNKNOWN_ATTRIBUTES)
        unknown = tuple(decode_unknown_attributes(ua)) if ua is not None else ()
        return BindingResponse(
            msg.transaction_id, error=decode_error_code(ec), unknown_attributes=unknown,
            software=software,
        )
    raise STUNError("not a response")
