"""One tailnet peer with a netstack for the path-MTU lab, driven over stdin/stdout JSON lines::

    python -m tests.netlab.pmtu_peer --derp-map JSON

stdout: {"node": NODE} on every change; {"status": {...}} every 0.25 s (path, path_mtu, drops);
        {"received": [bytes, sha256]} when a connection to our sink closes;
        {"sent": [bytes, sha256]} when our transfer finished writing; {"error": "..."};
        {"ping": [latency, path]} when a ping is answered; after each stdin line is handled, a
        status line and {"done": N} (N: lines handled so far).
stdin:  {"peer": NODE}                  add/update the peer
        {"serve": PORT}                 a hashing sink on our tunnel address
        {"send": [PORT, NBYTES]}        connect to the peer's PORT and send NBYTES
        {"ping": true}                  one disco ping (starts discovery)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

from twisted.internet import protocol, reactor, stdio, task
from twisted.protocols.basic import LineReceiver

from coderstack.derpmap import DERPMap
from coderstack.tailnet.conn import Conn
from coderstack.tailnet.stack import attach_netstack, client_endpoint, server_endpoint
from coderstack.wire.coordination import Node
from tests.interop import pmtu_pair


def out(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Sink(protocol.Protocol):
    def connectionMade(self) -> None:
        self.hash, self.count = hashlib.sha256(), 0

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)
        self.count += len(data)

    def connectionLost(self, reason=None) -> None:
        out({"received": [self.count, self.hash.hexdigest()]})


class Source(pmtu_pair.Source):
    """The interop pair's pull producer; reports what it sent on stdout."""

    def __init__(self, total: int) -> None:
        super().__init__(total, hashlib.shake_256(b"netlab pmtu").digest(128 << 10))

    def finished(self) -> None:
        out({"sent": [self.sent, self.hash.hexdigest()]})


class Peer(LineReceiver):
    delimiter = b"\n"

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.peer: Node | None = None
        self.handled = 0
        conn.on_node_change(lambda node: out({"node": node.to_json()}))
        task.LoopingCall(self.status).start(0.25, now=False)

    def lineReceived(self, line: bytes) -> None:
        msg = json.loads(line)
        ns = self.conn.netstack  # type: ignore[attr-defined]
        if "peer" in msg:
            self.peer = Node.from_json(msg["peer"])
            self.conn.update_peer(self.peer)
        if "serve" in msg:
            server_endpoint(ns, msg["serve"]).listen(protocol.Factory.forProtocol(Sink))
        if "send" in msg and self.peer is not None:
            port, total = msg["send"]
            dst = self.peer.addresses[0].network_address
            d = client_endpoint(ns, dst, port).connect(protocol.Factory.forProtocol(lambda: Source(total)))
            d.addErrback(lambda f: out({"error": f.getErrorMessage()}))
        if msg.get("ping") and self.peer is not None:
            self.conn.ping(self.peer.key).addCallbacks(
                lambda r: out({"ping": [r.latency, r.describe()]}),
                lambda f: out({"ping_error": f.getErrorMessage()}))
        self.status()
        self.handled += 1
        out({"done": self.handled})

    def status(self) -> None:
        full = self.conn.status()
        st: dict = {"drops": full["drops"], "pmtu": full["pmtu"], "disco": full["disco"],
                    "netstack": dict(self.conn.netstack.stats)}  # type: ignore[attr-defined]
        if self.peer is not None:
            st["path"] = self.conn.path(self.peer.key)[0]
            st["path_mtu"] = self.conn.path_mtu(self.peer.key)
        out({"status": st})

    def connectionLost(self, reason=None) -> None:
        if reactor.running:
            reactor.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--derp-map", required=True)
    args = p.parse_args()
    conn = Conn(reactor, derp_token="netlab", netcheck=False)
    conn.start(0)
    conn.set_derp_map(DERPMap.loads(args.derp_map))
    conn.netstack = attach_netstack(conn, reactor)  # type: ignore[attr-defined]
    stdio.StandardIO(Peer(conn))
    reactor.run()


if __name__ == "__main__":
    main()
