"""Disco: the path-discovery messages peers exchange over UDP and DERP, sans-IO.

Byte-compatible with Tailscale's disco. A packet is::

    magic          6 B   "TS💬" = 54 53 f0 9f 92 ac
    sender disco  32 B   the sender's disco public key (X25519, not the WireGuard key)
    nonce         24 B   random
    box            …     NaCl box (XSalsa20-Poly1305, 16 B tag first) of the payload, keyed with
                         crypto_box_beforenm(recipient disco public, sender disco private)

    payload = type u8 | version u8 (0) | body          (trailing bytes are ignored)

    0x01 Ping         TxID 12 B | sender node key 32 B (optional) | zero padding (MTU probes)
    0x02 Pong         TxID 12 B | source IP 16 B (IPv4 as ::ffff:a.b.c.d) | source port u16 BE
    0x03 CallMeMaybe  N x (IP 16 B | port u16 BE): the sender's endpoints; N >= 1

A Pong tells the pinger the ip:port its ping was seen from. Over DERP the same bytes travel in a
DERP SendPacket to the peer's node key. Anything malformed raises :class:`DiscoError` and nothing
else; unknown message types do too (the caller counts and drops them).
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from nacl.bindings import crypto_box_afternm, crypto_box_beforenm, crypto_box_open_afternm
from nacl.exceptions import CryptoError

__all__ = [
    "CallMeMaybe",
    "DiscoError",
    "HEADER_LEN",
    "MAGIC",
    "Ping",
    "Pong",
    "decode_payload",
    "encode_payload",
    "looks_like_disco",
    "open_packet",
    "seal",
    "sender_key",
    "shared_key",
]

MAGIC = "TS💬".encode()
KEY_LEN = 32
NONCE_LEN = 24
HEADER_LEN = len(MAGIC) + KEY_LEN + NONCE_LEN  # 62
TAG_LEN = 16
TXID_LEN = 12
ENDPOINT_LEN = 18

TYPE_PING = 0x01
TYPE_PONG = 0x02
TYPE_CALL_ME_MAYBE = 0x03
VERSION = 0

Addr = tuple[str, int]


class DiscoError(ValueError):
    """A disco packet or payload that cannot be used."""


@dataclass(frozen=True)
class Ping:
    tx_id: bytes
    node_key: bytes | None = None
    padding: int = 0


@dataclass(frozen=True)
class Pong:
    tx_id: bytes
    src: Addr  # where the ping was seen from


@dataclass(frozen=True)
class CallMeMaybe:
    endpoints: tuple[Addr, ...]


Message = Ping | Pong | CallMeMaybe


def shared_key(my_private: bytes, peer_public: bytes) -> bytes:
    """The precomputed box key for one pair of disco keys (symmetric)."""
    try:
        return crypto_box_beforenm(peer_public, my_private)
    except (CryptoError, ValueError, TypeError) as e:
        raise DiscoError(f"cannot derive a disco key: {e}") from None


def looks_like_disco(datagram: bytes) -> bool:
    """The magic and room for the header (the first-bytes test the UDP demultiplexer uses)."""
    return len(datagram) >= HEADER_LEN and datagram[:6] == MAGIC


def _ip16(ip: str) -> bytes:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise DiscoError(f"bad IP address {ip!r}") from None
    if addr.version == 4:
        return b"\0" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def _ip_text(raw: bytes) -> str:
    addr = ipaddress.IPv6Address(raw)
    mapped = addr.ipv4_mapped
    return str(mapped) if mapped is not None else str(addr)


def _endpoint(addr: Addr) -> bytes:
    ip, port = addr
    if not 0 <= port <= 0xFFFF:
        raise DiscoError(f"port {port} out of range")
    return _ip16(ip) + struct.pack(">H", port)


def encode_payload(msg: Message) -> bytes:
    """type | version | body for one message."""
    if isinstance(msg, Ping):
        if len(msg.tx_id) != TXID_LEN:
            raise DiscoError("a TxID is 12 bytes")
        key = b""
        if msg.node_key is None and msg.padding:
            raise DiscoError("padding follows the node key; a padded Ping needs one")
        if msg.node_key is not None:
            if len(msg.node_key) != KEY_LEN:
                raise DiscoError("a node key is 32 bytes")
            key = msg.node_key
        return bytes((TYPE_PING, VERSION)) + msg.tx_id + key + b"\0" * max(0, msg.padding)
    if isinstance(msg, Pong):
        if len(msg.tx_id) != TXID_LEN:
            raise DiscoError("a TxID is 12 bytes")
        return bytes((TYPE_PONG, VERSION)) + msg.tx_id + _endpoint(msg.src)
    if isinstance(msg, CallMeMaybe):
        if not msg.endpoints:
            raise DiscoError("a CallMeMaybe lists at least one endpoint")
        return bytes((TYPE_CALL_ME_MAYBE, VERSION)) + b"".join(_endpoint(e) for e in msg.endpoints)
    raise DiscoError(f"not a disco message: {type(msg).__name__}")


def decode_payload(payload: bytes) -> Message:
    if len(payload) < 2:
        raise DiscoError("payload too short")
    mtype, body = payload[0], payload[2:]
    if mtype == TYPE_PING:
        if len(body) < TXID_LEN:
            raise DiscoError("Ping too short")
        node_key = body[TXID_LEN : TXID_LEN + KEY_LEN] if len(body) >= TXID_LEN + KEY_LEN else None
        padding = max(0, len(body) - TXID_LEN - KEY_LEN) if node_key is not None else 0
        return Ping(bytes(body[:TXID_LEN]), node_key and bytes(node_key), padding)
    if mtype == TYPE_PONG:
        if len(body) < TXID_LEN + ENDPOINT_LEN:
            raise DiscoError("Pong too short")
        raw = body[TXID_LEN : TXID_LEN + 16]
        (port,) = struct.unpack_from(">H", body, TXID_LEN + 16)
        return Pong(bytes(body[:TXID_LEN]), (_ip_text(raw), port))
    if mtype == TYPE_CALL_ME_MAYBE:
        if payload[1] != VERSION or not body or len(body) % ENDPOINT_LEN:
            raise DiscoError("CallMeMaybe must be version 0 and N x 18 bytes, N >= 1")
        eps = []
        for off in range(0, len(body), ENDPOINT_LEN):
            (port,) = struct.unpack_from(">H", body, off + 16)
            eps.append((_ip_text(body[off : off + 16]), port))
        return CallMeMaybe(tuple(eps))
    raise DiscoError(f"unknown disco message type {mtype:#x}")


def seal(msg: Message, sender_public: bytes, key: bytes,
         urandom: Callable[[int], bytes] = os.urandom) -> bytes:
    """A whole disco packet from ``sender_public`` with the precomputed ``key``."""
    nonce = urandom(NONCE_LEN)
    return MAGIC + sender_public + nonce + crypto_box_afternm(encode_payload(msg), nonce, key)


def sender_key(datagram: bytes) -> bytes:
    """The sender's disco public key from a packet's header (unauthenticated until opened)."""
    if not looks_like_disco(datagram):
        raise DiscoError("not a disco packet")
    return bytes(datagram[6 : 6 + KEY_LEN])


def open_packet(datagram: bytes, key: bytes) -> Message:
    """Authenticate and decode a packet with the precomputed key for its sender."""
    if not looks_like_disco(datagram) or len(datagram) < HEADER_LEN + TAG_LEN:
        raise DiscoError("not a disco packet")
    nonce = bytes(datagram[6 + KEY_LEN : HEADER_LEN])
    try:
        payload = crypto_box_open_afternm(bytes(datagram[HEADER_LEN:]), nonce, key)
    except (CryptoError, ValueError, TypeError):
        raise DiscoError("disco box does not open") from None
    return decode_payload(payload)
