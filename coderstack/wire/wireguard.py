"""WireGuard (Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s), sans-IO: bytes and time in, events out.

Wire format. Integers are little-endian; the message type is a u32, i.e. one type byte followed
by three zero bytes. "sender"/"receiver" are the 32-bit session indices each side picks for itself.

  1 handshake initiation, 148 bytes
      type=1 (4) | sender (4) | ephemeral (32) | AEAD(static) (32+16) | AEAD(TAI64N) (12+16)
      | mac1 (16) | mac2 (16)
  2 handshake response, 92 bytes
      type=2 (4) | sender (4) | receiver (4) | ephemeral (32) | AEAD(empty) (0+16)
      | mac1 (16) | mac2 (16)
  3 cookie reply, 64 bytes
      type=3 (4) | receiver (4) | nonce (24) | XAEAD(cookie) (16+16)
  4 transport data, 32 + n bytes
      type=4 (4) | receiver (4) | counter (8) | ChaCha20-Poly1305(IP packet zero-padded to a
      multiple of 16, capped at the MTU) (n+16).  n = 0 is a keepalive.

mac1 = BLAKE2s-128 keyed with HASH("mac1----" ‖ receiver's static public key) over the message up
to mac1; mac2 = BLAKE2s-128 keyed with the last cookie (< 120 s old) over the message up to mac2,
else zeros. A responder "under load" insists on a valid mac2 and otherwise answers with a cookie
reply: XChaCha20-Poly1305 keyed with HASH("cookie--" ‖ its public key), aad = the rejected mac1.
TAI64N is 8 bytes big-endian 2**62 + 10 + unix seconds, then 4 bytes big-endian nanoseconds.

Model. A :class:`Device` holds our static key and the peers, keyed by their 32-byte static public
key. Nothing here knows addresses: outputs name the *peer*, so the layer above (magicsock) decides
per datagram whether it goes out directly over UDP or through a DERP relay, and the session
survives a path change. Only a cookie reply goes back to the opaque ``source`` it answers.

    device.receive(datagram, now, source) -> list of events
    device.send(peer_key, ip_packet, now)  -> list of events
    device.next_deadline() / device.tick(now) -> list of events   (all timers)

Events: :class:`Transmit` (datagram for a peer), :class:`Reply` (datagram back to a source),
:class:`Packet` (decrypted IP packet from a peer), :class:`HandshakeComplete`,
:class:`AuthenticatedSource`, :class:`HandshakeFailed`, :class:`Dropped` (also counted in
``Device.drops``).

Cryptokey routing (AllowedIPs) belongs to the caller: choose ``peer_key`` for ``send`` from the
destination address, and check that a ``Packet``'s source address belongs to its ``peer_key``.

``now`` is seconds as a float from the caller's IReactorTime; it also feeds the TAI64N timestamp,
so give wall-clock seconds (``reactor.seconds()``) in production. Nothing here raises on bad
input: malformed or unauthenticated datagrams become ``Dropped`` events.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import math
import os
import random
import struct
from collections import Counter, deque
from collections.abc import Callable
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError

from coderstack.wire.replay import REJECT_AFTER_MESSAGES, ReplayWindow

__all__ = [
    "AuthenticatedSource",
    "Device",
    "Dropped",
    "HandshakeComplete",
    "HandshakeFailed",
    "Keypair",
    "Packet",
    "Peer",
    "Reply",
    "Transmit",
    "generate_private_key",
    "is_wireguard",
    "public_key",
    "tai64n",
]

# --- protocol constants ------------------------------------------------------------------------

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE_REPLY = 3
MSG_TRANSPORT = 4

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
TRANSPORT_MIN_SIZE = 32  # header + tag: a keepalive
PADDING_MULTIPLE = 16

REKEY_AFTER_MESSAGES = 1 << 60
# REJECT_AFTER_MESSAGES comes from replay.py (2**64 - 2**13 - 1).
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER = 0.334  # up to 334 ms added to REKEY_TIMEOUT
KEEPALIVE_TIMEOUT = 10.0
COOKIE_REFRESH_TIME = 120.0
INITIATION_MIN_INTERVAL = 0.020  # at most one initiation per peer per 20 ms is consumed
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)  # 18 retries, then give up
# An initiator re-handshakes on receive when its keypair is this old, so a new one is in place
# before the old is rejected at REJECT_AFTER_TIME.
REKEY_ON_RECEIVE_AGE = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT  # 165 s
ZERO_KEYS_AFTER = REJECT_AFTER_TIME * 3  # 540 s without a new session
STAGED_PACKETS = 128  # packets queued per peer while no session exists
LOAD_WINDOW = 1.0  # "under load" is latched this long
# Under load, handshake messages with a valid mac2 are still limited per source: a token bucket
# of 20 per second, 5 at once (wireguard-go's numbers).
SOURCE_RATE = 20.0
SOURCE_BURST = 5.0

_ZERO12 = bytes(12)
_ZERO16 = bytes(16)
_ZERO32 = bytes(32)
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_TAI64_BASE = 0x400000000000000A

_TRANSPORT_HDR = struct.Struct("<IIQ")  # type, receiver, counter
_U32 = struct.Struct("<I")
_U32X2 = struct.Struct("<II")
_U32X3 = struct.Struct("<III")
_TAI = struct.Struct(">QI")
_U16BE = struct.Struct(">H")

_new_tuple = tuple.__new__  # build NamedTuple events without their Python-level __new__

# --- primitives --------------------------------------------------------------------------------


def _hash(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "blake2s")


def _kdf1(key: bytes, data: bytes) -> bytes:
    return _hmac(_hmac(key, data), b"\x01")


def _kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    t0 = _hmac(key, data)
    t1 = _hmac(t0, b"\x01")
    return t1, _hmac(t0, t1 + b"\x02")


def _kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    t0 = _hmac(key, data)
    t1 = _hmac(t0, b"\x01")
    t2 = _hmac(t0, t1 + b"\x02")
    return t1, t2, _hmac(t0, t2 + b"\x03")


def _mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


class _Reject(Exception):
    """A handshake message failed a check; the argument is the drop reason."""


def _dh(private: bytes, public: bytes) -> bytes:
    try:
        shared = crypto_scalarmult(private, public)
    except RuntimeError:  # libsodium refuses low-order points (all-zero output)
        raise _Reject("dh-zero") from None
    if shared == _ZERO32:
        raise _Reject("dh-zero")
    return shared


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_ZERO12, plaintext, aad)


def _open(key: bytes, ciphertext: bytes, aad: bytes, reason: str) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(_ZERO12, ciphertext, aad)
    except InvalidTag:
        raise _Reject(reason) from None


C0 = _hash(CONSTRUCTION)
H0 = _hash(C0, IDENTIFIER)


def _clamp(k: bytes) -> bytes:
    b = bytearray(k)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def generate_private_key(urandom: Callable[[int], bytes] = os.urandom) -> bytes:
    """A new clamped X25519 private key (32 bytes)."""
    return _clamp(urandom(32))


def public_key(private_key: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key."""
    return crypto_scalarmult_base(private_key)


def is_wireguard(datagram: bytes) -> bool:
    """Cheap demultiplexing test for a socket shared with STUN and disco: a WireGuard message
    starts with a type byte 1..4 and three zero bytes (STUN starts 0x00/0x01 then a type byte
    that is never zero for the messages we use, disco with the "TS" magic)."""
    return len(datagram) >= 32 and 1 <= datagram[0] <= 4 and datagram[1:4] == b"\x00\x00\x00"


def mac1_key(static_public: bytes) -> bytes:
    """The key that the receiver with ``static_public`` checks an initiation's mac1 with."""
    return _hash(LABEL_MAC1, static_public)


def initiation_is_for(key: bytes, datagram: bytes) -> bool:
    """Whether ``datagram`` is an initiation whose mac1 was made for the receiver of this
    :func:`mac1_key`: how a socket shared by many devices finds an initiation's device without a
    Diffie-Hellman each."""
    mac1_at = INITIATION_SIZE - 32
    return (len(datagram) == INITIATION_SIZE and datagram[0] == MSG_INITIATION
            and hmac.compare_digest(_mac(key, bytes(datagram[:mac1_at])), bytes(datagram[mac1_at : mac1_at + 16])))


def tai64n(now: float) -> bytes:
    """TAI64N label for unix time ``now``; nanoseconds rounded down to 2**24 ns like wireguard-go
    (so the timestamp does not leak fine-grained timing)."""
    seconds = math.floor(now)
    nanos = int((now - seconds) * 1e9) & ~0xFFFFFF
    return _TAI.pack(_TAI64_BASE + seconds, nanos)


def _tai64n_after(previous: bytes) -> bytes:
    seconds, nanos = _TAI.unpack(previous)
    nanos += 1
    if nanos >= 1_000_000_000:
        seconds, nanos = seconds + 1, 0
    return _TAI.pack(seconds, nanos)


# --- events ------------------------------------------------------------------------------------


class Transmit(NamedTuple):
    """Send ``datagram`` to the peer whose static public key is ``peer_key`` (any path)."""

    peer_key: bytes
    datagram: bytes


class Reply(NamedTuple):
    """Send ``datagram`` back to ``source`` (the address a datagram came from): cookie replies."""

    source: object
    datagram: bytes


class Packet(NamedTuple):
    """A decrypted, authenticated IP packet (padding removed) from ``peer_key``, via ``source``."""

    peer_key: bytes
    data: bytes
    source: object


class HandshakeComplete(NamedTuple):
    """A new session with ``peer_key`` is in use. ``initiator``: we sent the initiation."""

    peer_key: bytes
    initiator: bool
    source: object


class AuthenticatedSource(NamedTuple):
    """An authenticated handshake message from ``peer_key`` arrived from ``source``: a place the
    peer can be reached now (WireGuard's endpoint roaming). Data packets carry it in Packet."""

    peer_key: bytes
    source: object


class HandshakeFailed(NamedTuple):
    """No response after all retries (REKEY_ATTEMPT_TIME); queued packets were discarded."""

    peer_key: bytes


class Dropped(NamedTuple):
    """A datagram or packet was discarded; ``reason`` is also counted in ``Device.drops``."""

    reason: str
    peer_key: bytes | None


Event = (
    Transmit | Reply | Packet | HandshakeComplete | AuthenticatedSource | HandshakeFailed | Dropped
)

# --- sessions ----------------------------------------------------------------------------------

# ChaCha20Poly1305.encrypt / .decrypt: (nonce, data, associated data) -> data.
AEADCall = Callable[[bytes, bytes, bytes | None], bytes]


class Keypair:
    """One direction-pair of transport keys from one handshake."""

    __slots__ = (
        "peer",
        "seal",
        "open",
        "send_counter",
        "replay",
        "created",
        "reject_at",
        "initiator",
        "local_index",
        "remote_index",
    )

    def __init__(
        self,
        peer: Peer,
        send_key: bytes,
        recv_key: bytes,
        now: float,
        initiator: bool,
        local_index: int,
        remote_index: int,
    ) -> None:
        self.peer = peer
        # Bound methods of cached AEAD objects: one attribute load per packet.
        self.seal: AEADCall | None = ChaCha20Poly1305(send_key).encrypt
        self.open: AEADCall | None = ChaCha20Poly1305(recv_key).decrypt
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.created = now
        self.reject_at = now + REJECT_AFTER_TIME
        self.initiator = initiator
        self.local_index = local_index
        self.remote_index = remote_index

    def zero(self) -> None:
        """Forget the keys (Python cannot wipe memory; dropping the AEAD objects is the best
        we can do) and make the keypair unusable for either direction."""
        self.seal = None
        self.open = None
        self.send_counter = REJECT_AFTER_MESSAGES
        self.reject_at = -math.inf


# Handshake states of a peer.
HS_ZEROED = 0
HS_INITIATION_CREATED = 1
HS_INITIATION_CONSUMED = 2
HS_RESPONSE_CREATED = 3
HS_RESPONSE_CONSUMED = 4


class Peer:
    """A remote node, identified by its static public key. Created by :meth:`Device.add_peer`."""

    def __init__(
        self,
        device: Device,
        public_key: bytes,
        preshared_key: bytes | None,
        persistent_keepalive: float,
    ) -> None:
        self.public_key = public_key
        self.preshared_key = preshared_key if preshared_key is not None else _ZERO32
        self.persistent_keepalive = persistent_keepalive
        self.mac1_key = _hash(LABEL_MAC1, public_key)
        self.cookie_key = _hash(LABEL_COOKIE, public_key)
        self.initial_hash = _hash(H0, public_key)
        self.static_static = _dh(device.private_key, public_key)  # precomputed once
        # Handshake state.
        self.hs_state = HS_ZEROED
        self.hs_hash = b""
        self.hs_chaining_key = b""
        self.hs_ephemeral_private = b""
        self.hs_remote_ephemeral = b""
        self.hs_local_index: int | None = None
        self.hs_remote_index = 0
        self.last_timestamp = _ZERO12  # newest TAI64N consumed from this peer
        self.last_sent_timestamp = _ZERO12
        self.last_initiation_consumed = -math.inf
        # No initiation before this: REKEY_TIMEOUT after we last sent a handshake message, plus
        # jitter, so two peers whose initiations crossed do not try again in step.
        self.initiation_allowed_at = -math.inf
        # Cookie (we are the initiator of a message the peer answered with a cookie reply).
        self.cookie: bytes | None = None
        self.cookie_time = -math.inf
        self.last_mac1: bytes | None = None
        # Sessions: previous (still accepted while the peer switches), current, next (responder
        # side: confirmed by the first transport packet from the initiator).
        self.previous: Keypair | None = None
        self.current: Keypair | None = None
        self.next: Keypair | None = None
        self.staged: deque[bytes] = deque()
        # Timers: absolute deadlines or None.
        self.retransmit_at: float | None = None
        self.new_handshake_at: float | None = None
        self.keepalive_at: float | None = None
        self.persistent_at: float | None = None
        self.zero_at: float | None = None
        self.need_another_keepalive = False
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        # Statistics, like `wg show`.
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_handshake: float | None = None
        self.scheduled_at = math.inf  # the time of this peer's live entry in Device._heap

    def keypairs(self) -> list[Keypair]:
        return [kp for kp in (self.previous, self.current, self.next) if kp is not None]

    def deadline(self) -> float:
        """The earliest moment any timer of this peer wants :meth:`Device.tick`."""
        soonest = math.inf
        for t in (
            self.retransmit_at,
            self.new_handshake_at,
            self.keepalive_at,
            self.persistent_at,
            self.zero_at,
        ):
            if t is not None and t < soonest:
                soonest = t
        for kp in (self.previous, self.current, self.next):
            if kp is not None and kp.reject_at < soonest:
                soonest = kp.reject_at
        return soonest


# --- the device --------------------------------------------------------------------------------


class Device:
    """Our WireGuard interface: static key, peers by public key, all session state, no I/O.

    ``rng`` supplies timer jitter (a seeded ``random.Random`` makes tests exact); ``urandom``
    supplies key material, indices and nonces. ``handshake_load_threshold`` is how many handshake
    messages per second put the device "under load" (mac2 required, cookie replies sent); 0 means
    always under load. ``mtu`` caps padding, as the TUN MTU does in wireguard-go.
    """

    def __init__(
        self,
        private_key: bytes,
        *,
        mtu: int = 1280,
        rng: random.Random | None = None,
        urandom: Callable[[int], bytes] = os.urandom,
        handshake_load_threshold: int = 128,
    ) -> None:
        if len(private_key) != 32:
            raise ValueError("a WireGuard private key is 32 bytes")
        self.private_key = _clamp(private_key)
        self.public_key = public_key(self.private_key)
        self.mtu = mtu
        self._rng = rng if rng is not None else random.Random()
        self._urandom = urandom
        self._initial_hash = _hash(H0, self.public_key)
        self._mac1_key = _hash(LABEL_MAC1, self.public_key)
        self._cookie_key = _hash(LABEL_COOKIE, self.public_key)
        self._cookie_secret = b""
        self._cookie_secret_time = -math.inf
        self.handshake_load_threshold = handshake_load_threshold
        self._load_window_start = -math.inf
        self._load_count = 0
        self._under_load_until = -math.inf
        self._buckets: dict[object, list[float]] = {}  # source -> [tokens, last refill]
        self.peers: dict[bytes, Peer] = {}
        self._handshakes: dict[int, Peer] = {}  # our index -> peer with a handshake in flight
        self._keypairs: dict[int, Keypair] = {}  # our index -> keypair (the hot-path lookup)
        # Timers: a heap of (when, seq, peer). A peer has at most one live entry, the one whose
        # time equals peer.scheduled_at; others are stale and skipped when popped. Entries are
        # pushed only when a timer moves *earlier* than the live one, so traffic rarely pushes.
        self._heap: list[tuple[float, int, Peer]] = []
        self._seq = itertools.count()
        self._prune_at = math.inf
        self.drops: Counter[str] = Counter()

    # -- configuration --

    def add_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | None = None,
        persistent_keepalive: float = 0.0,
    ) -> Peer:
        """Add (or return the existing) peer with this 32-byte static public key."""
        if len(public_key) != 32 or (preshared_key is not None and len(preshared_key) != 32):
            raise ValueError("public and preshared keys are 32 bytes")
        peer = self.peers.get(public_key)
        if peer is not None:
            return peer
        try:
            peer = Peer(self, public_key, preshared_key, persistent_keepalive)
        except _Reject:
            raise ValueError("peer public key is a low-order point") from None
        self.peers[public_key] = peer
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        """Forget a peer and zero all its keys."""
        peer = self.peers.pop(public_key, None)
        if peer is not None:
            self._zero_peer(peer)

    # -- input --

    def receive(self, datagram: bytes, now: float, source: object = None) -> list[Event]:
        """Process one UDP/DERP payload. ``source`` is an opaque token for where it came from:
        echoed in events, and (as bytes, or its repr) bound into cookies under load."""
        try:
            msg_type, receiver, counter = _TRANSPORT_HDR.unpack_from(datagram)
        except struct.error:
            return self._drop("short", None)
        if msg_type != MSG_TRANSPORT:
            return self._receive_handshake(msg_type, datagram, now, source)
        # Hot path: transport data.
        kp = self._keypairs.get(receiver)
        if kp is None:
            return self._drop("unknown-index", None)
        opener = kp.open
        if now >= kp.reject_at or opener is None:  # a zeroed keypair has both
            return self._drop("expired-keypair", kp.peer.public_key)
        try:
            plain = opener(_NONCE_PREFIX + datagram[8:16], datagram[16:], None)
        except InvalidTag:
            return self._drop("bad-tag", kp.peer.public_key)
        except ValueError:  # shorter than a tag
            return self._drop("short", kp.peer.public_key)
        if not kp.replay.accept(counter):
            return self._drop("replay", kp.peer.public_key)
        peer = kp.peer
        peer.rx_bytes += len(datagram)
        out: list[Event] = []
        if kp is not peer.current:
            if kp is peer.next:
                self._rotate_to_next(peer, kp, now, source, out)
        current = peer.current
        if (
            current is not None
            and current.initiator
            and not peer.sent_last_minute_handshake
            and now - current.created > REKEY_ON_RECEIVE_AGE
        ):
            peer.sent_last_minute_handshake = True
            self._initiate(peer, now, False, out)
        if peer.persistent_keepalive:
            self._arm_persistent(peer, now)
        peer.new_handshake_at = None  # we heard back
        if not plain:
            return out  # keepalive
        if peer.keepalive_at is None:
            t = peer.keepalive_at = now + KEEPALIVE_TIMEOUT
            if t < peer.scheduled_at:
                self._arm(peer, t)
        else:
            peer.need_another_keepalive = True
        # Strip padding using the IP header's own length.
        version = plain[0] >> 4
        if version == 6 and len(plain) >= 40:
            length = 40 + _U16BE.unpack_from(plain, 4)[0]
        elif version == 4 and len(plain) >= 20:
            length = _U16BE.unpack_from(plain, 2)[0]
        else:
            self.drops["not-ip"] += 1
            out.append(_new_tuple(Dropped, ("not-ip", peer.public_key)))
            return out
        if length > len(plain):
            self.drops["truncated-ip"] += 1
            out.append(_new_tuple(Dropped, ("truncated-ip", peer.public_key)))
            return out
        if length != len(plain):
            plain = plain[:length]
        out.append(_new_tuple(Packet, (peer.public_key, plain, source)))
        return out

    def send(self, peer_key: bytes, packet: bytes, now: float) -> list[Event]:
        """Encrypt one IP packet for a peer. With no usable session the packet is queued (up to
        128 per peer) and a handshake starts; the queue is flushed when it completes."""
        peer = self.peers.get(peer_key)
        if peer is None:
            return self._drop("unknown-peer", peer_key)
        kp = peer.current
        if (
            peer.staged
            or kp is None
            or now >= kp.reject_at
            or kp.send_counter >= REJECT_AFTER_MESSAGES
            or kp.seal is None
        ):
            out: list[Event] = []
            self._stage(peer, packet, out)
            self._send_staged(peer, now, out)
            return out
        counter = kp.send_counter
        kp.send_counter = counter + 1
        n = len(packet)
        if n:
            pad = -n % PADDING_MULTIPLE
            if pad:
                if n <= self.mtu < n + pad:
                    pad = self.mtu - n
                packet += bytes(pad)
        header = _TRANSPORT_HDR.pack(MSG_TRANSPORT, kp.remote_index, counter)
        datagram = header + kp.seal(_NONCE_PREFIX + header[8:], packet, None)
        peer.tx_bytes += len(datagram)
        out = [_new_tuple(Transmit, (peer_key, datagram))]
        if n and peer.new_handshake_at is None:
            t = peer.new_handshake_at = (
                now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._rng.random() * REKEY_TIMEOUT_JITTER
            )
            if t < peer.scheduled_at:
                self._arm(peer, t)
        peer.keepalive_at = None
        if peer.persistent_keepalive:
            self._arm_persistent(peer, now)
        if kp.initiator and (
            counter >= REKEY_AFTER_MESSAGES or now - kp.created >= REKEY_AFTER_TIME
        ):
            self._initiate(peer, now, False, out)
        return out

    def send_many(self, peer_key: bytes, packets: list[bytes], now: float) -> list[Event]:
        """Encrypt several IP packets for one peer, in order: like ``send`` for each, with the
        per-call work (lookups, checks, timers) done once. For bursts such as a TCP window."""
        peer = self.peers.get(peer_key)
        if peer is None:
            return self._drop("unknown-peer", peer_key)
        out: list[Event] = []
        kp = peer.current
        if (
            kp is None
            or now >= kp.reject_at
            or kp.send_counter + len(packets) > REJECT_AFTER_MESSAGES
            or kp.seal is None
        ):
            for packet in packets:
                self._stage(peer, packet, out)
            self._send_staged(peer, now, out)
            return out
        if peer.staged:  # queued earlier: they go first
            self._send_staged(peer, now, out)
            if peer.staged:  # the keypair ran out meanwhile
                for packet in packets:
                    self._stage(peer, packet, out)
                return out
        seal = kp.seal
        pack = _TRANSPORT_HDR.pack
        remote = kp.remote_index
        mtu = self.mtu
        counter = kp.send_counter
        total = 0
        data = False
        append = out.append
        for packet in packets:
            n = len(packet)
            if n:
                data = True
                pad = -n % PADDING_MULTIPLE
                if pad:
                    if n <= mtu < n + pad:
                        pad = mtu - n
                    packet += bytes(pad)
            header = pack(MSG_TRANSPORT, remote, counter)
            datagram = header + seal(_NONCE_PREFIX + header[8:], packet, None)
            counter += 1
            total += len(datagram)
            append(_new_tuple(Transmit, (peer_key, datagram)))
        kp.send_counter = counter
        peer.tx_bytes += total
        if data and peer.new_handshake_at is None:
            t = peer.new_handshake_at = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
            if t < peer.scheduled_at:
                self._arm(peer, t)
        peer.keepalive_at = None
        if peer.persistent_keepalive:
            self._arm_persistent(peer, now)
        if kp.initiator and (
            counter > REKEY_AFTER_MESSAGES or now - kp.created >= REKEY_AFTER_TIME
        ):
            self._initiate(peer, now, False, out)
        return out

    def initiate(self, peer_key: bytes, now: float) -> list[Event]:
        """Start a handshake now (subject to the 5 s rate limit), e.g. to force a rekey."""
        peer = self.peers.get(peer_key)
        if peer is None:
            return self._drop("unknown-peer", peer_key)
        out: list[Event] = []
        self._initiate(peer, now, False, out)
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`tick` should next run (absolute, same clock as ``now``), or None.
        It may be early (a timer was cancelled since); never late."""
        t = self._heap[0][0] if self._heap else math.inf
        if self._prune_at < t:
            t = self._prune_at
        return None if t == math.inf else t

    def tick(self, now: float) -> list[Event]:
        """Run every timer that is due: retransmits, keepalives, rekeys, expiry, zeroing.
        Costs O(log n) per peer with a due (or cancelled) timer, not O(peers)."""
        out: list[Event] = []
        heap = self._heap
        due = []
        while heap and heap[0][0] <= now:
            t, _, peer = heapq.heappop(heap)
            if t != peer.scheduled_at:
                continue  # superseded by an earlier entry
            peer.scheduled_at = math.inf
            if self.peers.get(peer.public_key) is peer:
                due.append(peer)
        for peer in due:
            self._tick_peer(peer, now, out)
            t = peer.deadline()
            if t < peer.scheduled_at:
                self._arm(peer, t)
        if now >= self._prune_at:
            # Buckets idle for a second are full again: forget them.
            for source in [s for s, b in self._buckets.items() if now - b[1] >= 1.0]:
                del self._buckets[source]
            self._prune_at = now + 1.0 if self._buckets else math.inf
        return out

    # -- timers --

    def _arm(self, peer: Peer, t: float) -> None:
        if t < peer.scheduled_at and t != math.inf:
            peer.scheduled_at = t
            heapq.heappush(self._heap, (t, next(self._seq), peer))

    def _arm_persistent(self, peer: Peer, now: float) -> None:
        t = peer.persistent_at = now + peer.persistent_keepalive
        if t < peer.scheduled_at:
            self._arm(peer, t)

    def _jitter(self) -> float:
        return self._rng.random() * REKEY_TIMEOUT_JITTER

    def _tick_peer(self, peer: Peer, now: float, out: list[Event]) -> None:
        if peer.zero_at is not None and now >= peer.zero_at:
            peer.zero_at = None
            self._zero_peer(peer)
        for name in ("previous", "current", "next"):
            kp = getattr(peer, name)
            if kp is not None and now >= kp.reject_at:
                setattr(peer, name, None)
                self._forget_keypair(kp)
        if peer.retransmit_at is not None and now >= peer.retransmit_at:
            peer.retransmit_at = None
            if peer.handshake_attempts > MAX_TIMER_HANDSHAKES:
                peer.keepalive_at = None
                dropped = len(peer.staged)
                peer.staged.clear()
                if dropped:
                    self.drops["handshake-failed"] += dropped
                if peer.zero_at is None:
                    peer.zero_at = now + ZERO_KEYS_AFTER
                out.append(HandshakeFailed(peer.public_key))
            else:
                peer.handshake_attempts += 1
                self._initiate(peer, now, True, out)
                if peer.retransmit_at is None:
                    # Rate-limited because we answered the peer's own initiation meanwhile
                    # (both sides initiated at once). wireguard-go would stop retrying here;
                    # try again once the limit allows, so neither side waits forever.
                    peer.retransmit_at = peer.initiation_allowed_at
                    self._arm(peer, peer.retransmit_at)
        if peer.new_handshake_at is not None and now >= peer.new_handshake_at:
            # We sent data and heard nothing back for 15 s: the session may be dead.
            peer.new_handshake_at = None
            self._initiate(peer, now, False, out)
        if peer.keepalive_at is not None and now >= peer.keepalive_at:
            peer.keepalive_at = None
            self._keepalive(peer, now, out)
            if peer.need_another_keepalive:
                peer.need_another_keepalive = False
                peer.keepalive_at = now + KEEPALIVE_TIMEOUT
        if peer.persistent_at is not None and now >= peer.persistent_at:
            peer.persistent_at = None
            self._keepalive(peer, now, out)

    # -- sending internals --

    def _stage(self, peer: Peer, packet: bytes, out: list[Event]) -> None:
        if len(peer.staged) >= STAGED_PACKETS:
            peer.staged.popleft()
            self.drops["staged-overflow"] += 1
            out.append(Dropped("staged-overflow", peer.public_key))
        peer.staged.append(packet)

    def _keepalive(self, peer: Peer, now: float, out: list[Event]) -> None:
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now, out)

    def _send_staged(self, peer: Peer, now: float, out: list[Event]) -> None:
        kp = peer.current
        if kp is None or now >= kp.reject_at or kp.send_counter >= REJECT_AFTER_MESSAGES:
            self._initiate(peer, now, False, out)
            return
        staged = peer.staged
        sent_data = False
        while staged:
            if kp.send_counter >= REJECT_AFTER_MESSAGES:
                self._initiate(peer, now, False, out)
                return
            packet = staged.popleft()
            sent_data = sent_data or bool(packet)
            out.append(Transmit(peer.public_key, self._encrypt(kp, packet)))
        if sent_data and peer.new_handshake_at is None:
            peer.new_handshake_at = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
            self._arm(peer, peer.new_handshake_at)
        peer.keepalive_at = None
        if peer.persistent_keepalive:
            self._arm_persistent(peer, now)
        if kp.initiator and (
            kp.send_counter > REKEY_AFTER_MESSAGES or now - kp.created >= REKEY_AFTER_TIME
        ):
            self._initiate(peer, now, False, out)

    def _encrypt(self, kp: Keypair, packet: bytes) -> bytes:
        seal = kp.seal
        if seal is None:  # callers check reject_at first, which zeroing sets to -inf
            raise ValueError("the keypair has been zeroed")
        counter = kp.send_counter
        kp.send_counter = counter + 1
        n = len(packet)
        pad = -n % PADDING_MULTIPLE
        if pad:
            if n <= self.mtu < n + pad:
                pad = self.mtu - n
            packet += bytes(pad)
        header = _TRANSPORT_HDR.pack(MSG_TRANSPORT, kp.remote_index, counter)
        datagram = header + seal(_NONCE_PREFIX + header[8:], packet, None)
        kp.peer.tx_bytes += len(datagram)
        return datagram

    def _initiate(self, peer: Peer, now: float, retry: bool, out: list[Event]) -> None:
        if not retry:
            peer.handshake_attempts = 0
        if now < peer.initiation_allowed_at:
            return  # at most one initiation per REKEY_TIMEOUT
        datagram = self._create_initiation(peer, now)
        if peer.persistent_keepalive:
            self._arm_persistent(peer, now)
        peer.keepalive_at = None
        out.append(Transmit(peer.public_key, datagram))
        peer.retransmit_at = peer.initiation_allowed_at = now + REKEY_TIMEOUT + self._jitter()
        self._arm(peer, peer.retransmit_at)

    # -- handshake --

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._urandom(4), "little")
            if index not in self._handshakes and index not in self._keypairs:
                return index

    def _set_handshake_index(self, peer: Peer) -> int:
        old = peer.hs_local_index
        if old is not None and self._handshakes.get(old) is peer:
            del self._handshakes[old]
        index = self._new_index()
        self._handshakes[index] = peer
        peer.hs_local_index = index
        return index

    def _add_macs(self, peer: Peer, body: bytes, now: float) -> bytes:
        mac1 = _mac(peer.mac1_key, body)
        peer.last_mac1 = mac1
        if peer.cookie is not None and now - peer.cookie_time < COOKIE_REFRESH_TIME:
            mac2 = _mac(peer.cookie, body + mac1)
        else:
            mac2 = _ZERO16
        return body + mac1 + mac2

    def _create_initiation(self, peer: Peer, now: float) -> bytes:
        timestamp = tai64n(now)
        if timestamp <= peer.last_sent_timestamp:  # keep strictly increasing on a slow clock
            timestamp = _tai64n_after(peer.last_sent_timestamp)
        peer.last_sent_timestamp = timestamp
        ephemeral_private = generate_private_key(self._urandom)
        ephemeral = public_key(ephemeral_private)
        h = _hash(peer.initial_hash, ephemeral)
        ck = _kdf1(C0, ephemeral)
        ck, key = _kdf2(ck, _dh(ephemeral_private, peer.public_key))
        enc_static = _seal(key, self.public_key, h)
        h = _hash(h, enc_static)
        ck, key = _kdf2(ck, peer.static_static)
        enc_timestamp = _seal(key, timestamp, h)
        h = _hash(h, enc_timestamp)
        index = self._set_handshake_index(peer)
        peer.hs_state = HS_INITIATION_CREATED
        peer.hs_hash = h
        peer.hs_chaining_key = ck
        peer.hs_ephemeral_private = ephemeral_private
        body = _U32X2.pack(MSG_INITIATION, index) + ephemeral + enc_static + enc_timestamp
        return self._add_macs(peer, body, now)

    def _consume_initiation(self, msg: bytes, now: float) -> Peer:
        sender = _U32.unpack_from(msg, 4)[0]
        ephemeral = msg[8:40]
        h = _hash(self._initial_hash, ephemeral)
        ck = _kdf1(C0, ephemeral)
        ck, key = _kdf2(ck, _dh(self.private_key, ephemeral))
        enc_static = msg[40:88]
        static = _open(key, enc_static, h, "bad-initiation")
        h = _hash(h, enc_static)
        peer = self.peers.get(static)
        if peer is None:
            raise _Reject("unknown-peer")
        ck, key = _kdf2(ck, peer.static_static)
        enc_timestamp = msg[88:116]
        timestamp = _open(key, enc_timestamp, h, "bad-initiation")
        h = _hash(h, enc_timestamp)
        if timestamp <= peer.last_timestamp:
            raise _Reject("initiation-replay")
        if now - peer.last_initiation_consumed < INITIATION_MIN_INTERVAL:
            raise _Reject("initiation-flood")
        peer.last_timestamp = timestamp
        peer.last_initiation_consumed = now
        peer.hs_state = HS_INITIATION_CONSUMED
        peer.hs_hash = h
        peer.hs_chaining_key = ck
        peer.hs_remote_ephemeral = ephemeral
        peer.hs_remote_index = sender
        return peer

    def _create_response(self, peer: Peer, now: float) -> bytes:
        ephemeral_private = generate_private_key(self._urandom)
        ephemeral = public_key(ephemeral_private)
        h = _hash(peer.hs_hash, ephemeral)
        ck = _kdf1(peer.hs_chaining_key, ephemeral)
        ck = _kdf1(ck, _dh(ephemeral_private, peer.hs_remote_ephemeral))
        ck = _kdf1(ck, _dh(ephemeral_private, peer.public_key))
        ck, tau, key = _kdf3(ck, peer.preshared_key)
        h = _hash(h, tau)
        enc_empty = _seal(key, b"", h)
        h = _hash(h, enc_empty)
        index = self._set_handshake_index(peer)
        peer.hs_state = HS_RESPONSE_CREATED
        peer.hs_hash = h
        peer.hs_chaining_key = ck
        body = _U32X3.pack(MSG_RESPONSE, index, peer.hs_remote_index) + ephemeral + enc_empty
        return self._add_macs(peer, body, now)

    def _consume_response(self, msg: bytes) -> Peer:
        _, sender, receiver = _U32X3.unpack_from(msg)
        peer = self._handshakes.get(receiver)
        if peer is None or peer.hs_state != HS_INITIATION_CREATED:
            raise _Reject("unexpected-response")
        ephemeral = msg[12:44]
        h = _hash(peer.hs_hash, ephemeral)
        ck = _kdf1(peer.hs_chaining_key, ephemeral)
        ck = _kdf1(ck, _dh(peer.hs_ephemeral_private, ephemeral))
        ck = _kdf1(ck, _dh(self.private_key, ephemeral))
        ck, tau, key = _kdf3(ck, peer.preshared_key)
        h = _hash(h, tau)
        enc_empty = msg[44:60]
        _open(key, enc_empty, h, "bad-response")
        h = _hash(h, enc_empty)
        peer.hs_state = HS_RESPONSE_CONSUMED
        peer.hs_hash = h
        peer.hs_chaining_key = ck
        peer.hs_remote_index = sender
        return peer

    def _begin_session(self, peer: Peer, now: float) -> Keypair:
        """Derive transport keys from the finished handshake and slot the keypair in."""
        initiator = peer.hs_state == HS_RESPONSE_CONSUMED
        first, second = _kdf2(peer.hs_chaining_key, b"")
        send_key, recv_key = (first, second) if initiator else (second, first)
        index = peer.hs_local_index
        assert index is not None
        kp = Keypair(peer, send_key, recv_key, now, initiator, index, peer.hs_remote_index)
        # The handshake is spent: forget its secrets; its index now names the keypair.
        self._handshakes.pop(index, None)
        self._keypairs[index] = kp
        peer.hs_local_index = None
        peer.hs_state = HS_ZEROED
        peer.hs_hash = peer.hs_chaining_key = b""
        peer.hs_ephemeral_private = peer.hs_remote_ephemeral = b""
        if initiator:
            # Use it at once. A not-yet-confirmed `next` becomes `previous` so packets the peer
            # already sent with it are still accepted; the old current goes.
            if peer.next is not None:
                self._forget_keypair(peer.previous)
                self._forget_keypair(peer.current)
                peer.previous, peer.next = peer.next, None
            else:
                self._forget_keypair(peer.previous)
                peer.previous = peer.current
            peer.current = kp
        else:
            # The responder keeps sending with `current` until the initiator proves it has the
            # new keys by sending on them (see _rotate_to_next).
            self._forget_keypair(peer.next)
            self._forget_keypair(peer.previous)
            peer.previous = None
            peer.next = kp
        peer.zero_at = now + ZERO_KEYS_AFTER
        self._arm(peer, kp.reject_at)
        return kp

    def _rotate_to_next(
        self, peer: Peer, kp: Keypair, now: float, source: object, out: list[Event]
    ) -> None:
        self._forget_keypair(peer.previous)
        peer.previous = peer.current
        peer.current = kp
        peer.next = None
        self._handshake_complete(peer, now)
        out.append(HandshakeComplete(peer.public_key, False, source))
        if peer.staged:
            self._send_staged(peer, now, out)

    def _handshake_complete(self, peer: Peer, now: float) -> None:
        peer.retransmit_at = None
        peer.handshake_attempts = 0
        peer.sent_last_minute_handshake = False
        peer.last_handshake = now

    def _forget_keypair(self, kp: Keypair | None) -> None:
        if kp is None:
            return
        if self._keypairs.get(kp.local_index) is kp:
            del self._keypairs[kp.local_index]
        kp.zero()

    def _zero_peer(self, peer: Peer) -> None:
        if peer.staged:
            self.drops["zeroed"] += len(peer.staged)
            peer.staged.clear()
        for kp in (peer.previous, peer.current, peer.next):
            self._forget_keypair(kp)
        peer.previous = peer.current = peer.next = None
        if peer.hs_local_index is not None and self._handshakes.get(peer.hs_local_index) is peer:
            del self._handshakes[peer.hs_local_index]
        peer.hs_local_index = None
        peer.hs_state = HS_ZEROED
        peer.hs_hash = peer.hs_chaining_key = b""
        peer.hs_ephemeral_private = peer.hs_remote_ephemeral = b""

    # -- receiving handshake messages --

    def _drop(self, reason: str, peer_key: bytes | None) -> list[Event]:
        self.drops[reason] += 1
        return [Dropped(reason, peer_key)]

    def _source_bytes(self, source: object) -> bytes:
        return source if isinstance(source, bytes) else repr(source).encode()

    def _allow_source(self, source: object, now: float) -> bool:
        try:
            bucket = self._buckets.get(source)
        except TypeError:  # unhashable source token
            source = self._source_bytes(source)
            bucket = self._buckets.get(source)
        if bucket is None:
            self._buckets[source] = [SOURCE_BURST - 1.0, now]
            if now + 1.0 < self._prune_at:  # so tick() can forget it
                self._prune_at = now + 1.0
            return True
        tokens = min(SOURCE_BURST, bucket[0] + (now - bucket[1]) * SOURCE_RATE)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        return False

    def _under_load(self, now: float) -> bool:
        if now - self._load_window_start >= LOAD_WINDOW:
            self._load_window_start = now
            self._load_count = 0
        self._load_count += 1
        if self._load_count > self.handshake_load_threshold:
            self._under_load_until = now + LOAD_WINDOW
        return now < self._under_load_until

    def _cookie(self, source: object, now: float, fresh: bool) -> bytes | None:
        if now - self._cookie_secret_time >= COOKIE_REFRESH_TIME:
            if not fresh:
                return None
            self._cookie_secret = self._urandom(32)
            self._cookie_secret_time = now
        return _mac(self._cookie_secret, self._source_bytes(source))

    def _receive_handshake(
        self, msg_type: int, msg: bytes, now: float, source: object
    ) -> list[Event]:
        size = len(msg)
        if msg_type == MSG_COOKIE_REPLY:
            if size != COOKIE_REPLY_SIZE:
                return self._drop("bad-size", None)
            return self._consume_cookie_reply(msg, now)
        if msg_type == MSG_INITIATION:
            if size != INITIATION_SIZE:
                return self._drop("bad-size", None)
        elif msg_type == MSG_RESPONSE:
            if size != RESPONSE_SIZE:
                return self._drop("bad-size", None)
        else:
            return self._drop("unknown-type", None)
        mac1_at = size - 32
        under_load = self._under_load(now)
        if not hmac.compare_digest(
            _mac(self._mac1_key, msg[:mac1_at]), msg[mac1_at : mac1_at + 16]
        ):
            return self._drop("bad-mac1", None)
        if under_load:
            cookie = self._cookie(source, now, fresh=False)
            if cookie is None or not hmac.compare_digest(
                _mac(cookie, msg[: mac1_at + 16]), msg[mac1_at + 16 :]
            ):
                refused = self._drop("cookie-required", None)
                refused.append(Reply(source, self._cookie_reply(msg, mac1_at, source, now)))
                return refused
            if not self._allow_source(source, now):
                return self._drop("rate-limited", None)
        out: list[Event] = []
        try:
            if msg_type == MSG_INITIATION:
                peer = self._consume_initiation(msg, now)
                out.append(AuthenticatedSource(peer.public_key, source))
                self._answer_initiation(peer, now, out)
            else:
                peer = self._consume_response(msg)
                out.append(AuthenticatedSource(peer.public_key, source))
                self._finish_initiation(peer, now, source, out)
        except _Reject as e:
            return self._drop(e.args[0], None)
        return out

    def _answer_initiation(self, peer: Peer, now: float, out: list[Event]) -> None:
        if peer.persistent_keepalive:
            self._arm_persistent(peer, now)
        peer.new_handshake_at = None
        # Data queued meanwhile must not start our next initiation exactly REKEY_TIMEOUT after
        # this answer: if ours crossed theirs, the two would cross again at the same offset
        # every round (the timer's jitter never gets a say while packets keep arriving).
        peer.initiation_allowed_at = now + REKEY_TIMEOUT + self._jitter()
        datagram = self._create_response(peer, now)
        self._begin_session(peer, now)
        peer.keepalive_at = None
        out.append(Transmit(peer.public_key, datagram))

    def _finish_initiation(self, peer: Peer, now: float, source: object, out: list[Event]) -> None:
        if peer.persistent_keepalive:
            self._arm_persistent(peer, now)
        peer.new_handshake_at = None
        self._begin_session(peer, now)
        self._handshake_complete(peer, now)
        out.append(HandshakeComplete(peer.public_key, True, source))
        # Confirm the session to the responder at once: data if any is queued, else a keepalive.
        self._keepalive(peer, now, out)

    def _cookie_reply(self, msg: bytes, mac1_at: int, source: object, now: float) -> bytes:
        cookie = self._cookie(source, now, fresh=True)
        assert cookie is not None
        nonce = self._urandom(24)
        sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(
            cookie, msg[mac1_at : mac1_at + 16], nonce, self._cookie_key
        )
        return _U32.pack(MSG_COOKIE_REPLY) + msg[4:8] + nonce + sealed

    def _consume_cookie_reply(self, msg: bytes, now: float) -> list[Event]:
        receiver = _U32.unpack_from(msg, 4)[0]
        peer = self._handshakes.get(receiver)
        if peer is None:
            kp = self._keypairs.get(receiver)
            peer = kp.peer if kp is not None else None
        if peer is None:
            return self._drop("unknown-index", None)
        if peer.last_mac1 is None:
            return self._drop("unexpected-cookie", peer.public_key)
        try:
            cookie = crypto_aead_xchacha20poly1305_ietf_decrypt(
                msg[32:64], peer.last_mac1, msg[8:32], peer.cookie_key
            )
        except CryptoError:
            return self._drop("bad-cookie", peer.public_key)
        peer.cookie = cookie
        peer.cookie_time = now
        peer.last_mac1 = None
        return []
