"""One UDP socket for many tunnel endpoints in one process (a load generator's simulated agents
or clients), each endpoint a :class:`~coderstack.tailnet.magicsock.MagicSock` of its own.

A real agent owns its socket; a process simulating a thousand of them would need a thousand
sockets, a thousand reads per burst and a thousand ports on the firewall. Here every member
writes through one socket and every datagram read from it is handed to the member it is for.
What the wire says about its receiver, per kind (the formats are in :mod:`coderstack.wire`):

* WireGuard transport data (4), handshake response (2) and cookie reply (3) carry the
  *receiver's* session index — at bytes 4..8, and 8..12 in a response. A device picks its indices
  itself and announces them as the *sender* index of the initiations and responses it sends, so
  the router learns ``index -> member`` from what each member writes.
* A handshake initiation (1) names no index of ours, but its mac1 is keyed by the receiver's
  static public key: the member whose key makes the mac1 match is the receiver (a keyed BLAKE2s
  per candidate, no Diffie-Hellman).
* A disco packet names its *sender's* disco key: the member that has that peer is the receiver;
  where several members have it (one peer talking to several of them), the one whose key opens
  the box is. The member found last for a sender is tried first (its box opened once more here).
* A STUN response carries the transaction ID of the request a member wrote.

Anything else, and anything no member claims, is dropped and counted (:attr:`SharedUDP.drops`).
Indices are random 32-bit numbers, so two members may pick the same one; the newer takes it over,
the collision is counted, and the older member's session recovers by its next handshake.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any, Protocol

from twisted.internet import defer, protocol

from coderstack.wire import disco
from coderstack.wire.stun import is_stun
from coderstack.wire.wireguard import (
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    initiation_is_for,
    is_wireguard,
    mac1_key,
)

#: Session indices remembered per member (WireGuard keeps at most three keypairs per peer, and
#: a member here has few peers), beyond which the oldest are forgotten.
INDICES_PER_MEMBER = 16
#: STUN requests awaiting an answer, in all.
PENDING_STUN = 4096


class Member(Protocol):
    """What the router needs of a tunnel endpoint (a MagicSock)."""

    node_public: bytes

    def datagramReceived(self, datagram: bytes, addr: Any) -> None: ...

    def knows_disco(self, key: bytes) -> bool: ...

    def opens_disco(self, datagram: bytes) -> bool: ...


class Router:
    """The sans-IO part: learns from what members write, names the member a read is for."""

    def __init__(self) -> None:
        self.members: list[Member] = []
        self._mac1: dict[int, bytes] = {}  # id(member) -> its mac1 key
        self._indices: OrderedDict[bytes, Member] = OrderedDict()  # 4-byte index -> member
        self._stun: OrderedDict[bytes, Member] = OrderedDict()  # transaction ID -> member
        self._disco: dict[bytes, Member] = {}  # a sender's disco key -> the member it last reached
        self.drops: Counter[str] = Counter()

    def join(self, member: Member) -> None:
        self.members.append(member)
        self._mac1[id(member)] = mac1_key(member.node_public)

    def leave(self, member: Member) -> None:
        self.members = [m for m in self.members if m is not member]
        self._mac1.pop(id(member), None)
        for table in (self._indices, self._stun, self._disco):
            for key in [k for k, m in table.items() if m is member]:
                del table[key]

    def sent(self, member: Member, datagram: bytes) -> None:
        """``member`` wrote ``datagram``: remember what answers to it will name."""
        kind = datagram[0] if datagram else 0
        if kind in (MSG_INITIATION, MSG_RESPONSE) and is_wireguard(datagram):
            index = bytes(datagram[4:8])
            owner = self._indices.pop(index, None)
            if owner is not None and owner is not member:
                self.drops["index-collision"] += 1
            self._indices[index] = member
            while len(self._indices) > INDICES_PER_MEMBER * max(1, len(self.members)):
                self._indices.popitem(last=False)
        elif is_stun(datagram):
            self._stun[bytes(datagram[8:20])] = member
            while len(self._stun) > PENDING_STUN:
                self._stun.popitem(last=False)

    def route(self, datagram: bytes) -> Member | None:
        """The member ``datagram`` is for, or None (counted in :attr:`drops`)."""
        if disco.looks_like_disco(datagram):
            return self._route_disco(datagram)
        if is_wireguard(datagram):
            kind = datagram[0]
            if kind == MSG_INITIATION:
                for m in self.members:
                    if initiation_is_for(self._mac1[id(m)], datagram):
                        return m
                self.drops["initiation-unclaimed"] += 1
                return None
            at = 8 if kind == MSG_RESPONSE else 4
            if kind in (MSG_RESPONSE, MSG_COOKIE_REPLY, MSG_TRANSPORT):
                member = self._indices.get(bytes(datagram[at : at + 4]))
                if member is not None:
                    return member
            self.drops["index-unknown"] += 1
            return None
        if is_stun(datagram):
            member = self._stun.pop(bytes(datagram[8:20]), None)
            if member is None:
                self.drops["stun-unmatched"] += 1
            return member
        self.drops["unknown"] += 1
        return None

    def _route_disco(self, datagram: bytes) -> Member | None:
        try:
            sender = disco.sender_key(datagram)
        except disco.DiscoError:
            self.drops["disco-malformed"] += 1
            return None
        last = self._disco.get(sender)
        if last is not None and last.knows_disco(sender) and last.opens_disco(datagram):
            return last  # one more box opened beats asking every member
        candidates = [m for m in self.members if m.knows_disco(sender)]
        if len(candidates) > 1:
            candidates = [m for m in candidates if m.opens_disco(datagram)]
        if not candidates:
            self.drops["disco-unclaimed"] += 1
            return None
        self._disco[sender] = candidates[0]
        return candidates[0]


class SharedUDP(protocol.DatagramProtocol):
    """The socket: ``listen()`` it once, then each MagicSock ``listen``s with ``shared=`` it and
    gets a :class:`MemberPort` as its port and transport."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.router = Router()
        self.port: Any = None

    @property
    def drops(self) -> Counter[str]:
        return self.router.drops

    def listen(self, port: int = 0, interface: str = "") -> Any:
        self.port = self.reactor.listenUDP(port, self, interface=interface, maxPacketSize=1 << 16)
        return self.port

    def join(self, member: Member) -> MemberPort:
        if self.port is None:
            raise RuntimeError("the shared socket is not listening")
        self.router.join(member)
        return MemberPort(self, member)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        member = self.router.route(datagram)
        if member is not None:
            member.datagramReceived(datagram, addr)

    def close(self) -> defer.Deferred[Any]:
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)


class MemberPort:
    """One member's view of the shared socket: Twisted's UDP transport and port, as far as a
    MagicSock uses them."""

    def __init__(self, shared: SharedUDP, member: Member) -> None:
        self.shared = shared
        self.member = member
        self.socket = shared.port.socket  # for the socket options a MagicSock sets (idempotent)

    def write(self, datagram: bytes, addr: Any) -> None:
        self.shared.router.sent(self.member, datagram)
        self.shared.port.write(datagram, addr)

    def getHost(self) -> Any:
        return self.shared.port.getHost()

    def stopListening(self) -> None:
        self.shared.router.leave(self.member)
