"""DERP v2 frames (Tailscale's relay protocol), sans-IO.

After the HTTP upgrade (or inside websocket binary messages, treated as one byte stream) both
sides exchange frames::

    type u8 | length u32 BE | payload (length bytes)

Frame types and payloads (keys are 32-byte Curve25519 public keys):

    0x01 ServerKey      S->C  magic "DERP🔑" (8 B) + server key [+ reserved bytes]
    0x02 ClientInfo     C->S  client key + 24 B nonce + NaCl box(JSON), sealed to the server key
    0x03 ServerInfo     S->C  24 B nonce + NaCl box(JSON), sealed to the client key
    0x04 SendPacket     C->S  destination key + packet (packet <= 64 KiB)
    0x05 RecvPacket     S->C  source key + packet
    0x06 KeepAlive      S->C  empty
    0x07 NotePreferred  C->S  one byte: 1 = this is my home relay, 0 = not
    0x08 PeerGone       S->C  key + reason (0 Disconnected, 1 NotHere; old servers: no reason)
    0x09 PeerPresent    S->C  key + 16 B IP (v4-mapped) + port u16 + flags u8 (51 bytes);
                              newer servers append app-name length u8 + app name; shorter
                              (old servers: key only) and longer frames are accepted
    0x0a ForwardPacket  mesh  source key + destination key + packet
    0x10 WatchConns     mesh  empty
    0x11 ClosePeer      mesh  key
    0x12 Ping           both  8 bytes (a receiver accepts up to 1000 and keeps the first 8)
    0x13 Pong           both  the 8 bytes of the ping
    0x14 Health         S->C  UTF-8 problem text; empty clears it
    0x15 Restarting     S->C  reconnect_in_ms u32 + try_for_ms u32

Unknown types are skipped by length. The ClientInfo JSON is ``{"version":2,"CanAckPings":true}``
plus optional ``meshKey`` (hex), ``IsProber``, ``AppName``; ServerInfo JSON is ``{"version":2}``
with optional token-bucket fields. Boxes are crypto_box (Curve25519/XSalsa20/Poly1305), written
``nonce || tag || ciphertext`` exactly as PyNaCl's ``Box.encrypt`` returns them.

Everything here raises only :class:`DERPProtocolError` on bad input.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey
from nacl.utils import random as nacl_random

MAGIC = "DERP🔑".encode()  # 8 bytes: 44 45 52 50 f0 9f 94 91
PROTOCOL_VERSION = 2
KEY_LEN = 32
NONCE_LEN = 24
HEADER_LEN = 5
MAX_PACKET_SIZE = 64 << 10
MAX_INFO_LEN = 1 << 20
# Largest frame either side reads: a ClientInfo may be up to 256 KiB, a packet frame 64 KiB plus
# two keys; the client side also accepts up to 1 MiB (Tailscale's limit).
MAX_FRAME_SIZE = 1 << 20
MAX_CLIENT_INFO_LEN = 256 << 10
MIN_CLIENT_INFO_LEN = KEY_LEN + NONCE_LEN

SERVER_KEY = 0x01
CLIENT_INFO = 0x02
SERVER_INFO = 0x03
SEND_PACKET = 0x04
RECV_PACKET = 0x05
KEEP_ALIVE = 0x06
NOTE_PREFERRED = 0x07
PEER_GONE = 0x08
PEER_PRESENT = 0x09
FORWARD_PACKET = 0x0A
WATCH_CONNS = 0x10
CLOSE_PEER = 0x11
PING = 0x12
PONG = 0x13
HEALTH = 0x14
RESTARTING = 0x15

PEER_GONE_DISCONNECTED = 0x00
PEER_GONE_NOT_HERE = 0x01
# Client-side only: the mesh watch connection broke. Never on the wire.
PEER_GONE_MESH_CONN_BROKE = 0xF0

PEER_PRESENT_REGULAR = 0x01
PEER_PRESENT_MESH_PEER = 0x02
PEER_PRESENT_PROBER = 0x04
PEER_PRESENT_NOT_IDEAL = 0x08

# Disco packets carried in SendPacket go to the relay's separate disco queue. The relay
# recognises them the way Tailscale does: magic, sender disco key and nonce present.
DISCO_MAGIC = "TS💬".encode()  # 54 53 f0 9f 92 ac
DISCO_HEADER_LEN = len(DISCO_MAGIC) + KEY_LEN + NONCE_LEN  # 62

_HDR = struct.Struct(">BI")


class DERPProtocolError(ValueError):
    """Bytes that are not valid DERP; the message says what was wrong."""


def looks_like_disco(packet: bytes) -> bool:
    return len(packet) >= DISCO_HEADER_LEN and packet.startswith(DISCO_MAGIC)


# --- frame objects -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerKey:
    key: bytes


@dataclass(frozen=True)
class ClientInfoFrame:
    """The still-sealed ClientInfo: the claimed client key and the box (nonce||tag||ct)."""

    key: bytes
    sealed: bytes


@dataclass(frozen=True)
class ServerInfoFrame:
    sealed: bytes


@dataclass(frozen=True)
class SendPacket:
    dst: bytes
    data: bytes


@dataclass(frozen=True)
class RecvPacket:
    src: bytes
    data: bytes


@dataclass(frozen=True)
class KeepAlive:
    pass


@dataclass(frozen=True)
class NotePreferred:
    preferred: bool


@dataclass(frozen=True)
class PeerGone:
    key: bytes
    reason: int = PEER_GONE_DISCONNECTED


@dataclass(frozen=True)
class PeerPresent:
    key: bytes
    ip: str = ""  # "" when the frame was too short to carry it
    port: int = 0
    flags: int = 0
    app_name: str = ""


@dataclass(frozen=True)
class ForwardPacket:
    src: bytes
    dst: bytes
    data: bytes


@dataclass(frozen=True)
class WatchConns:
    pass


@dataclass(frozen=True)
class ClosePeer:
    key: bytes


@dataclass(frozen=True)
class Ping:
    data: bytes


@dataclass(frozen=True)
class Pong:
    data: bytes


@dataclass(frozen=True)
class Health:
    problem: str


@dataclass(frozen=True)
class Restarting:
    reconnect_in_ms: int
    try_for_ms: int


@dataclass(frozen=True)
class UnknownFrame:
    type: int
    payload: bytes


Frame = (
    ServerKey | ClientInfoFrame | ServerInfoFrame | SendPacket | RecvPacket | KeepAlive
    | NotePreferred | PeerGone | PeerPresent | ForwardPacket | WatchConns | ClosePeer | Ping
    | Pong | Health | Restarting | UnknownFrame
)


# --- encoding ----------------------------------------------------------------------------------


def raw_frame(ftype: int, payload: bytes = b"") -> bytes:
    return _HDR.pack(ftype, len(payload)) + payload


def _key(k: bytes, what: str = "key") -> bytes:
    if len(k) != KEY_LEN:
        raise DERPProtocolError(f"{what} must be {KEY_LEN} bytes, got {len(k)}")
    return bytes(k)


def _packet(p: bytes) -> bytes:
    if len(p) > MAX_PACKET_SIZE:
        raise DERPProtocolError(f"packet of {len(p)} bytes exceeds {MAX_PACKET_SIZE}")
    return p


def _ip16(ip: str) -> bytes:
    if not ip:
        return bytes(16)
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise DERPProtocolError(f"not an IP address: {ip!r}") from None
    if addr.version == 4:
        return b"\0" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def encode(frame: Frame) -> bytes:
    """One frame's bytes, header included."""
    match frame:
        case SendPacket(dst, data):
            return raw_frame(SEND_PACKET, _key(dst, "destination key") + _packet(data))
        case RecvPacket(src, data):
            return raw_frame(RECV_PACKET, _key(src, "source key") + _packet(data))
        case ServerKey(key):
            return raw_frame(SERVER_KEY, MAGIC + _key(key))
        case ClientInfoFrame(key, sealed):
            return raw_frame(CLIENT_INFO, _key(key) + sealed)
        case ServerInfoFrame(sealed):
            return raw_frame(SERVER_INFO, sealed)
        case KeepAlive():
            return raw_frame(KEEP_ALIVE)
        case NotePreferred(preferred):
            return raw_frame(NOTE_PREFERRED, b"\x01" if preferred else b"\x00")
        case PeerGone(key, reason):
            if not 0 <= reason <= 255:
                raise DERPProtocolError(f"PeerGone reason {reason} is not a byte")
            return raw_frame(PEER_GONE, _key(key) + bytes([reason]))
        case PeerPresent(key, ip, port, flags, app_name):
            if not 0 <= port <= 0xFFFF or not 0 <= flags <= 0xFF:
                raise DERPProtocolError("PeerPresent port or flags out of range")
            body = _key(key) + _ip16(ip) + struct.pack(">HB", port, flags)
            if app_name:
                name = app_name.encode()
                if len(name) > 255:
                    raise DERPProtocolError("PeerPresent app name longer than 255 bytes")
                body += bytes([len(name)]) + name
            return raw_frame(PEER_PRESENT, body)
        case ForwardPacket(src, dst, data):
            return raw_frame(FORWARD_PACKET, _key(src) + _key(dst) + _packet(data))
        case WatchConns():
            return raw_frame(WATCH_CONNS)
        case ClosePeer(key):
            return raw_frame(CLOSE_PEER, _key(key))
        case Ping(data):
            if len(data) != 8:
                raise DERPProtocolError("Ping data must be 8 bytes")
            return raw_frame(PING, data)
        case Pong(data):
            if len(data) != 8:
                raise DERPProtocolError("Pong data must be 8 bytes")
            return raw_frame(PONG, data)
        case Health(problem):
            return raw_frame(HEALTH, problem.encode())
        case Restarting(reconnect_in_ms, try_for_ms):
            if not (0 <= reconnect_in_ms < 2**32 and 0 <= try_for_ms < 2**32):
                raise DERPProtocolError("Restarting durations must fit in u32 milliseconds")
            return raw_frame(RESTARTING, struct.pack(">II", reconnect_in_ms, try_for_ms))
        case UnknownFrame(ftype, payload):
            return raw_frame(ftype, payload)
    raise DERPProtocolError(f"cannot encode {frame!r}")


def encode_send_packet(dst: bytes, data: bytes) -> bytes:
    """Hot path: a SendPacket frame without building an object (caller guarantees key length)."""
    return _HDR.pack(SEND_PACKET, KEY_LEN + len(data)) + dst + data


def recv_packet_header(src: bytes, length: int) -> bytes:
    """Hot path: header + source key of a RecvPacket carrying ``length`` packet bytes."""
    return _HDR.pack(RECV_PACKET, KEY_LEN + length) + src


# --- decoding ----------------------------------------------------------------------------------


def decode(ftype: int, payload: bytes) -> Frame:
    """Parse one frame's payload. Unknown types become :class:`UnknownFrame`."""
    n = len(payload)
    if ftype == SEND_PACKET or ftype == RECV_PACKET:
        if n < KEY_LEN:
            raise DERPProtocolError(f"frame {ftype:#x}: {n} bytes is shorter than a key")
        if n - KEY_LEN > MAX_PACKET_SIZE:
            raise DERPProtocolError(f"frame {ftype:#x}: packet exceeds {MAX_PACKET_SIZE} bytes")
        key, data = bytes(payload[:KEY_LEN]), bytes(payload[KEY_LEN:])
        return SendPacket(key, data) if ftype == SEND_PACKET else RecvPacket(key, data)
    if ftype == SERVER_KEY:
        if n < len(MAGIC) + KEY_LEN:
            raise DERPProtocolError("ServerKey frame too short")
        if payload[: len(MAGIC)] != MAGIC:
            raise DERPProtocolError("ServerKey frame has the wrong magic")
        return ServerKey(bytes(payload[len(MAGIC) : len(MAGIC) + KEY_LEN]))
    if ftype == CLIENT_INFO:
        if n < MIN_CLIENT_INFO_LEN:
            raise DERPProtocolError("ClientInfo frame too short")
        if n > MAX_CLIENT_INFO_LEN:
            raise DERPProtocolError("ClientInfo frame too long")
        return ClientInfoFrame(bytes(payload[:KEY_LEN]), bytes(payload[KEY_LEN:]))
    if ftype == SERVER_INFO:
        if n < NONCE_LEN:
            raise DERPProtocolError("ServerInfo frame too short")
        return ServerInfoFrame(bytes(payload))
    if ftype == KEEP_ALIVE:
        return KeepAlive()
    if ftype == NOTE_PREFERRED:
        if n != 1:
            raise DERPProtocolError(f"NotePreferred must be 1 byte, got {n}")
        return NotePreferred(payload[0] != 0)
    if ftype == PEER_GONE:
        if n < KEY_LEN:
            raise DERPProtocolError("PeerGone frame too short")
        reason = payload[KEY_LEN] if n > KEY_LEN else PEER_GONE_DISCONNECTED
        return PeerGone(bytes(payload[:KEY_LEN]), reason)
    if ftype == PEER_PRESENT:
        if n < KEY_LEN:
            raise DERPProtocolError("PeerPresent frame too short")
        ip, port, flags = "", 0, 0
        if n >= KEY_LEN + 18:
            addr = ipaddress.IPv6Address(bytes(payload[KEY_LEN : KEY_LEN + 16]))
            ip = str(addr.ipv4_mapped or addr)
            port = struct.unpack_from(">H", payload, KEY_LEN + 16)[0]
        if n >= KEY_LEN + 19:
            flags = payload[KEY_LEN + 18]
        app_name = ""
        if n >= KEY_LEN + 20:
            name_len = payload[KEY_LEN + 19]
            app_name = bytes(payload[KEY_LEN + 20 : KEY_LEN + 20 + name_len]).decode("utf-8", "replace")
        return PeerPresent(bytes(payload[:KEY_LEN]), ip, port, flags, app_name)
    if ftype == FORWARD_PACKET:
        if n < 2 * KEY_LEN:
            raise DERPProtocolError("ForwardPacket frame too short")
        if n - 2 * KEY_LEN > MAX_PACKET_SIZE:
            raise DERPProtocolError("ForwardPacket packet too long")
        return ForwardPacket(
            bytes(payload[:KEY_LEN]), bytes(payload[KEY_LEN : 2 * KEY_LEN]), bytes(payload[2 * KEY_LEN :])
        )
    if ftype == WATCH_CONNS:
        if n:
            raise DERPProtocolError("WatchConns must be empty")
        return WatchConns()
    if ftype == CLOSE_PEER:
        if n != KEY_LEN:
            raise DERPProtocolError("ClosePeer must carry exactly one key")
        return ClosePeer(bytes(payload))
    if ftype == PING or ftype == PONG:
        if n < 8 or n > 1000:
            raise DERPProtocolError(f"frame {ftype:#x}: ping data must be 8 bytes")
        data = bytes(payload[:8])
        return Ping(data) if ftype == PING else Pong(data)
    if ftype == HEALTH:
        try:
            return Health(bytes(payload).decode())
        except UnicodeDecodeError:
            raise DERPProtocolError("Health text is not UTF-8") from None
    if ftype == RESTARTING:
        if n < 8:
            raise DERPProtocolError("Restarting frame too short")
        a, b = struct.unpack_from(">II", payload)
        return Restarting(a, b)
    return UnknownFrame(ftype, bytes(payload))


class FrameReader:
    """Incremental frame splitter: feed arbitrary chunks, get ``(type, payload)`` pairs.

    A frame longer than ``max_frame_size`` raises :class:`DERPProtocolError`; after that the
    stream is unusable (the caller closes the connection).
    """

    __slots__ = ("_buf", "max_frame_size")

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._buf = bytearray()
        self.max_frame_size = max_frame_size

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        unpack = _HDR.unpack_from
        limit = self.max_frame_size
        while end - pos >= HEADER_LEN:
            ftype, length = unpack(buf, pos)
            if length > limit:
                raise DERPProtocolError(f"frame of {length} bytes exceeds the {limit}-byte limit")
            stop = pos + HEADER_LEN + length
            if stop > end:
                break
            out.append((ftype, bytes(buf[pos + HEADER_LEN : stop])))
            pos = stop
        if pos:
            del buf[:pos]
        return out


# --- the NaCl-boxed login ----------------------------------------------------------------------


def _seal(priv: bytes, peer_pub: bytes, obj: dict[str, Any], nonce: bytes | None) -> bytes:
    box = Box(PrivateKey(priv), PublicKey(peer_pub))
    text = json.dumps(obj, separators=(",", ":")).encode()
    return bytes(box.encrypt(text, nonce if nonce is not None else nacl_random(NONCE_LEN)))


def _open(priv: bytes, peer_pub: bytes, sealed: bytes, what: str) -> dict[str, Any]:
    if len(sealed) < NONCE_LEN + 16:
        raise DERPProtocolError(f"{what}: box too short")
    try:
        box = Box(PrivateKey(priv), PublicKey(peer_pub))
        text = box.decrypt(sealed[NONCE_LEN:], sealed[:NONCE_LEN])
    except (CryptoError, ValueError, TypeError):
        raise DERPProtocolError(f"{what}: cannot open the box") from None
    if len(text) > MAX_INFO_LEN:
        raise DERPProtocolError(f"{what}: too long")
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise DERPProtocolError(f"{what}: not JSON") from None
    if not isinstance(obj, dict):
        raise DERPProtocolError(f"{what}: not a JSON object")
    return obj


@dataclass(frozen=True)
class ClientInfo:
    version: int = PROTOCOL_VERSION
    can_ack_pings: bool = True
    mesh_key: str = ""
    is_prober: bool = False
    app_name: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.mesh_key:
            out["meshKey"] = self.mesh_key
        if self.version:
            out["version"] = self.version
        out["CanAckPings"] = self.can_ack_pings
        if self.is_prober:
            out["IsProber"] = True
        if self.app_name:
            out["AppName"] = self.app_name
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ClientInfo:
        def get(name: str, typ: type, default: Any) -> Any:
            v = obj.get(name, default)
            if v is None:
                return default
            if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
                raise DERPProtocolError(f"ClientInfo: {name} has the wrong type")
            return v

        return cls(
            version=get("version", int, 0),
            can_ack_pings=get("CanAckPings", bool, False),
            mesh_key=get("meshKey", str, ""),
            is_prober=get("IsProber", bool, False),
            app_name=get("AppName", str, ""),
        )


@dataclass(frozen=True)
class ServerInfo:
    version: int = PROTOCOL_VERSION
    token_bucket_bytes_per_second: int = 0
    token_bucket_bytes_burst: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version}
        if self.token_bucket_bytes_per_second:
            out["TokenBucketBytesPerSecond"] = self.token_bucket_bytes_per_second
        if self.token_bucket_bytes_burst:
            out["TokenBucketBytesBurst"] = self.token_bucket_bytes_burst
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ServerInfo:
        vals = []
        for name in ("version", "TokenBucketBytesPerSecond", "TokenBucketBytesBurst"):
            v = obj.get(name) or 0
            if not isinstance(v, int) or isinstance(v, bool):
                raise DERPProtocolError(f"ServerInfo: {name} must be an integer")
            vals.append(v)
        return cls(*vals)


def seal_client_info(
    client_priv: bytes, client_pub: bytes, server_pub: bytes, info: ClientInfo,
    nonce: bytes | None = None,
) -> bytes:
    """The whole ClientInfo frame."""
    sealed = _seal(client_priv, server_pub, info.to_json(), nonce)
    return encode(ClientInfoFrame(_key(client_pub), sealed))


def open_client_info(frame: ClientInfoFrame, server_priv: bytes) -> ClientInfo:
    return ClientInfo.from_json(_open(server_priv, frame.key, frame.sealed, "ClientInfo"))


def seal_server_info(
    server_priv: bytes, client_pub: bytes, info: ServerInfo, nonce: bytes | None = None
) -> bytes:
    """The whole ServerInfo frame."""
    return encode(ServerInfoFrame(_seal(server_priv, client_pub, info.to_json(), nonce)))


def open_server_info(frame: ServerInfoFrame, client_priv: bytes, server_pub: bytes) -> ServerInfo:
    return ServerInfo.from_json(_open(client_priv, server_pub, frame.sealed, "ServerInfo"))


def generate_private_key() -> bytes:
    return bytes(PrivateKey.generate())


def public_key(private_key: bytes) -> bytes:
    return bytes(PrivateKey(private_key).public_key)
