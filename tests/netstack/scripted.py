"""A hand-driven TCP peer for state-machine tests: craft segments, read what the stack sends."""

from __future__ import annotations

import random

from coderstack.netstack import ipv6
from coderstack.netstack.stack import Stack, to_address
from coderstack.netstack.tcp import TCPConfig
from coderstack.netstack.tcpsegment import ACK, Options, Segment

US = to_address("fd00::1")
THEM = to_address("fd00::2")


class Handler:
    def __init__(self) -> None:
        self.conn = None
        self.made = False
        self.data = bytearray()
        self.eof = False
        self.lost: list = []
        self.writable_calls = 0
        self.close_on_eof = False

    def connection_made(self, conn) -> None:
        self.made = True
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> None:
        self.eof = True

    def connection_lost(self, reason) -> None:
        self.lost.append(reason)

    def writable(self) -> None:
        self.writable_calls += 1


class Peer:
    def __init__(self, config: TCPConfig | None = None) -> None:
        self.out: list[bytes] = []
        self.stack = Stack(US, self.out.append, config=config or TCPConfig(), isn_secret=b"k" * 32, rng=random.Random(1))
        self.now = 0.0
        self.sport = 40000
        self.dport = 80
        self.seq = 999  # the scripted peer's ISN; its data starts at 1000
        self.ts = 1

    def send(self, flags: int, seq: int | None = None, ack: int = 0, window: int = 65535, data: bytes = b"",
             options: Options | None = None, sport: int | None = None) -> None:
        seg = Segment(sport or self.sport, self.dport, self.seq if seq is None else seq, ack, flags, window,
                      options or Options(), data)
        self.stack.receive(seg.encode(THEM, US), self.now)

    def take(self) -> list[Segment]:
        segs = []
        for pkt in self.out:
            src, dst, nh, off, end, _hop = ipv6.parse(pkt)
            if nh == ipv6.PROTO_TCP:
                segs.append(Segment.decode(src, dst, pkt[off:end]))
        self.out.clear()
        return segs

    def advance(self, dt: float) -> None:
        target = self.now + dt
        while True:
            d = self.stack.next_deadline()
            if d is None or d > target:
                break
            self.now = max(self.now, d)
            self.stack.tick(self.now)
        self.now = target

    def step(self) -> float:
        """Advance exactly to the next deadline and run it; returns the new time."""
        self.now = max(self.now, self.stack.next_deadline())
        self.stack.tick(self.now)
        return self.now

    def passive_open(self, options: Options | None = None, window: int = 65535):
        """Handshake as a client against a listener on port 80; returns (handler, conn, syn_ack)."""
        handler = Handler()
        self.stack.listen(80, lambda conn: handler)
        self.send(0x02, options=options or Options(mss=1220, wscale=7, sack_permitted=True, ts=(self.ts, 0)), window=window)
        (synack,) = self.take()
        self.seq += 1
        self.send(ACK, ack=synack.seq + 1, window=window,
                  options=Options(ts=(self.ts, synack.options.ts[0])) if synack.options.ts else None)
        conn = handler.conn
        return handler, conn, synack
