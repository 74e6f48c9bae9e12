"""The embedded STUN server: a sans-IO responder and a thin ``DatagramProtocol`` over it.

Unlike Tailscale's (which answers only its own client), this one answers any RFC 8489/5389 Binding
request, and classic RFC 3489 ones (MAPPED-ADDRESS), so ``stun``, ``turnutils_stunclient``,
browsers and Tailscale clients all work. Per RFC 5780, a CHANGE-REQUEST asking for another
address or port gets 420 (we have no alternate address); from a classic RFC 3489 client it gets
silence instead, which such clients understand.

Abuse: every datagram first takes a token from its source IP's bucket, so a forged-source flood
is reflected at no more than ``rate`` packets per second per victim, and our responses are at most
~3x a minimal request. Nothing here raises on bad input; it is counted.

On the wire (UDP, one STUN message per datagram; the codec and its layout are
:mod:`coderstack.wire.stun`):

- in: a Binding request (type 0x0001), with or without the magic cookie (classic RFC 3489);
- out, success (0x0101): XOR-MAPPED-ADDRESS = the request's source ip:port, SOFTWARE, FINGERPRINT;
  to a classic request MAPPED-ADDRESS alone;
- out, error (0x0111): ERROR-CODE 400 for any method but Binding, 420 + UNKNOWN-ATTRIBUTES for
  comprehension-required attributes we do not know (and a CHANGE-REQUEST we cannot honour);
- anything else (responses, indications, non-STUN bytes): no answer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from coderstack.stun.ratelimit import TokenBuckets
from coderstack.twistedtypes import Clock, ListeningPort, UDPReactor, datagram_transport
from coderstack.wire import stun

# Per source IP. Generous enough for a big office or CGNAT behind one address (clients re-STUN
# every 20-26 s; a netcheck sends a few probes per region), and at ~60 bytes per answer it caps
# what a forged-source flood can reflect at one victim to ~6 KB/s.
DEFAULT_RATE = 100.0
DEFAULT_BURST = 200.0


@dataclass
class Counters:
    answered: int = 0  # success responses sent
    errors_sent: int = 0  # error responses sent (400, 420)
    dropped_malformed: int = 0  # not STUN, or broken STUN
    rate_limited: int = 0
    ignored: int = 0  # well-formed but not a request (responses, indications)
    send_failed: int = 0


class STUNResponder:
    """Bytes and time in, the answer out (or None to stay silent)."""

    def __init__(
        self,
        *,
        rate: float = DEFAULT_RATE,
        burst: float = DEFAULT_BURST,
        max_sources: int = 65536,
        software: bytes | None = b"coderstack",
    ) -> None:
        self.limiter = TokenBuckets(rate, burst, max_sources)
        self.software = software
        self.counters = Counters()

    def handle(self, datagram: bytes, source: tuple[str, int], now: float) -> bytes | None:
        c = self.counters
        host, port = source[0], source[1]
        if not self.limiter.allow(host, now):
            c.rate_limited += 1
            return None
        try:
            msg = stun.decode(datagram)
        except stun.STUNError:
            c.dropped_malformed += 1
            return None
        if msg.cls != stun.CLASS_REQUEST:
            c.ignored += 1
            return None
        try:
            if msg.method != stun.METHOD_BINDING:
                c.errors_sent += 1
                return stun.binding_error(msg, 400, "Only Binding is served here",
                                          software=self.software)
            unknown = msg.unknown_required()
            change = msg.get(stun.ATTR_CHANGE_REQUEST)
            if change is not None and (len(change) != 4 or struct.unpack("!I", change)[0] & 0x6):
                # We have no alternate address, so change-IP/port cannot be honoured.
                if msg.classic:
                    # RFC 3489 clients read any answer as "the change worked" (and misjudge
                    # the NAT); silence is what they expect from a server that cannot.
                    c.ignored += 1
                    return None
                unknown.append(stun.ATTR_CHANGE_REQUEST)  # RFC 5780: 420
            if unknown:
                c.errors_sent += 1
                return stun.binding_error(msg, 420, unknown=unknown, software=self.software)
            # RFC 3489 clients parse SOFTWARE as SERVER and reject lengths not a multiple of 4.
            software = None if msg.classic else self.software
            reply = stun.binding_success(msg, (host, port), software=software)
        except stun.STUNError:
            # e.g. a source address we cannot encode; never raise out of the server.
            c.dropped_malformed += 1
            return None
        c.answered += 1
        return reply


class STUNServerProtocol(DatagramProtocol):
    log = Logger()

    def __init__(self, responder: STUNResponder, clock: Clock) -> None:
        self.responder = responder
        self.clock = clock

    @property
    def counters(self) -> Counters:
        return self.responder.counters

    def datagramReceived(self, datagram: bytes, addr: tuple[Any, ...]) -> None:
        source = (addr[0], addr[1])  # an IPv6 source also carries flow info and scope id
        reply = self.responder.handle(datagram, source, self.clock.seconds())
        if reply is None:
            return
        try:
            datagram_transport(self).write(reply, source)
        except OSError:
            # EAGAIN from a full socket buffer is raised by Twisted's UDP write; drop the answer.
            self.responder.counters.send_failed += 1


def listen_stun(
    reactor: UDPReactor,
    host: str = "",
    port: int = 3478,
    *,
    responder: STUNResponder | None = None,
    clock: Clock | None = None,
) -> ListeningPort:
    """Start answering STUN on UDP ``host:port`` (host "" = all IPv4 interfaces, "::" = all).

    The returned port's ``.protocol.counters`` has the counters; ``stopListening()`` ends it.
    """
    proto = STUNServerProtocol(responder or STUNResponder(), clock or reactor)
    # The udp.Port that listenUDP returns provides IListeningPort as well.
    return cast(ListeningPort, reactor.listenUDP(port, proto, interface=host))

