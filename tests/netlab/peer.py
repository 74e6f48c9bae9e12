"""One tailnet peer for the NAT lab, driven over stdin/stdout with JSON lines::

    python -m tests.netlab.peer --derp-map JSON [--block-endpoints] [--derp-force-websockets]

The Conn runs the link monitor unless CODERSTACK_LINK_MONITOR=0 (polling every
CODERSTACK_LINK_MONITOR_INTERVAL seconds, default linkmon's).

stdout: {"node": NODE} whenever our node changes; {"status": {...}} every 0.25 s (path and
reason to the peer, packets sent/received, handshakes, the longest time between two new packets
received and when it ended); {"ping": [latency, path]} or {"ping_error": "..."}; after each
stdin line is handled, a status line and {"done": N} (N: lines handled so far).
stdin:  {"peer": NODE}              add/update the (single) peer
        {"send": RATE}              start sending numbered packets, RATE per second
        {"stop": true}              stop sending
        {"ping": true}              one disco ping over the current path
        {"gap_reset": true}         start measuring the longest gap between packets afresh
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import struct
import sys

from twisted.internet import reactor, stdio, task
from twisted.protocols.basic import LineReceiver

from coderstack.derpmap import DERPMap
from coderstack.tailnet import linkmon
from coderstack.tailnet.conn import Conn
from coderstack.wire.coordination import Node


def ipv6_packet(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, payload: bytes) -> bytes:
    return struct.pack(">IHBB", 6 << 28, len(payload), 59, 64) + src.packed + dst.packed + payload


def out(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Peer(LineReceiver):
    delimiter = b"\n"

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.peer: Node | None = None
        self.sent = 0
        self.received: set[int] = set()
        self.sender: task.LoopingCall | None = None
        self.handshakes = 0
        self.last_rx: float | None = None
        self.longest_gap = (0.0, 0.0)  # (seconds without a new packet, when that ended)
        self.handled = 0
        conn.on_packet(self.packet)
        conn.on_node_change(lambda node: out({"node": node.to_json()}))
        task.LoopingCall(self.status).start(0.25, now=False)

    def packet(self, key: bytes, data: bytes) -> None:
        payload = data[40:]
        if payload.startswith(b"seq "):
            seq = int(payload[4:])
            if seq in self.received:
                return
            self.received.add(seq)
            now = reactor.seconds()
            if self.last_rx is not None and now - self.last_rx > self.longest_gap[0]:
                self.longest_gap = (now - self.last_rx, now)
            self.last_rx = now

    def lineReceived(self, line: bytes) -> None:
        msg = json.loads(line)
        if "peer" in msg:
            self.peer = Node.from_json(msg["peer"])
            self.conn.update_peer(self.peer)
        if "send" in msg:
            if self.sender is not None and self.sender.running:
                self.sender.stop()
            self.sender = task.LoopingCall(self.send_one)
            self.sender.start(1.0 / msg["send"])
        if msg.get("stop") and self.sender is not None and self.sender.running:
            self.sender.stop()
        if msg.get("gap_reset"):
            self.longest_gap = (0.0, 0.0)
        if msg.get("ping") and self.peer is not None:
            d = self.conn.ping(self.peer.key)
            d.addCallbacks(lambda r: out({"ping": [r.latency, r.describe()]}),
                           lambda f: out({"ping_error": f.getErrorMessage()}))
        self.status()
        self.handled += 1
        out({"done": self.handled})

    def send_one(self) -> None:
        assert self.peer is not None
        dst = self.peer.addresses[0].network_address
        self.conn.send_packet(self.peer.key, ipv6_packet(self.conn.address, dst, b"seq %d" % self.sent))
        self.sent += 1

    def status(self) -> None:
        full = self.conn.status()
        st: dict = {"t": reactor.seconds(), "sent": self.sent, "received": len(self.received),
                    "max_received": max(self.received, default=-1), "longest_gap": self.longest_gap,
                    "endpoints": full["endpoints"], "home": self.conn.preferred_derp,
                    "derp_connected": full["derp_connected"], "drops": full["drops"],
                    "derp_websocket": full["derp_websocket"],
                    "link_changes": self.conn.link_monitor.changes if self.conn.link_monitor else None,
                    "derp_reconnects": sum(getattr(c, "reconnects", 0) for c in self.conn.sock.derp.values()),
                    "wg_drops": dict(self.conn.device.drops), "disco": full["disco"],
                    "peer": next(iter(full["peers"].values()), None)}
        if self.peer is not None:
            path, reason = self.conn.path(self.peer.key)
            st.update(path=path, reason=reason,
                      last_handshake=self.conn.last_handshake.get(self.peer.key))
        out({"status": st})

    def connectionLost(self, reason=None) -> None:
        if reactor.running:
            reactor.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--derp-map", required=True)
    p.add_argument("--block-endpoints", action="store_true")
    p.add_argument("--derp-force-websockets", action="store_true")
    args = p.parse_args()
    conn = Conn(reactor, derp_token="netlab", block_endpoints=args.block_endpoints,
                force_websockets=args.derp_force_websockets)
    conn.start(0)
    conn.set_derp_map(DERPMap.loads(args.derp_map))
    interval = os.environ.get("CODERSTACK_LINK_MONITOR_INTERVAL")
    linkmon.monitor_conn(reactor, conn, **({"interval": float(interval)} if interval else {}))
    stdio.StandardIO(Peer(conn))
    reactor.run()


if __name__ == "__main__":
    main()
