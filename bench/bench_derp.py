"""DERP relay throughput on loopback: packets/s and Mbit/s for 1 and 100 client pairs.

The relay runs in its own process (``--serve``: a twisted.web Site with the DERP resources and an
Autobahn websocket sink for the baseline); the receiving clients run in a second process and the
sending clients in a third, so the relay, not one client reactor, is what is measured. Each sender pushes
packets to its partner as fast as its connection accepts them; throughput is what the receivers
get (the relay head-drops what a slow receiver cannot take, so received < sent is expected under
overload). Baseline: Autobahn websocket, 64 KiB binary messages, one connection, same machine.

Usage: python bench/bench_derp.py [--quick] [--seconds S] [--runs N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def serve() -> None:
    from autobahn.twisted.resource import WebSocketResource
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from coderstack.derp.policy import AllowAllPolicy
    from coderstack.derp.server import make_derp_resources, make_relay
    from coderstack.wire import derp as w

    policy = AllowAllPolicy()
    relay = make_relay(w.generate_private_key(), policy, reactor, write_timeout=0)
    root = Resource()
    for path, res in make_derp_resources(relay, policy).items():
        root.putChild(path.lstrip("/").encode(), res)

    class Sink(WebSocketServerProtocol):
        total = 0
        first = 0.0

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            if isBinary:
                if not self.total:
                    self.first = time.perf_counter()
                self.total += len(payload)
            else:
                elapsed = time.perf_counter() - self.first
                self.sendMessage(f"{self.total} {elapsed}".encode())

    f = WebSocketServerFactory()
    f.protocol = Sink
    f.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0)
    root.putChild(b"sink", WebSocketResource(f))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1", backlog=1024)
    print(port.getHost().port, flush=True)
    reactor.run()


def run_derp(port: int, pairs: int, size: int, seconds: float, websocket: bool) -> tuple[float, float]:
    """One run: receivers in one fresh process, senders in another; returns (packets/s, Mbit/s)."""
    from coderstack.wire import derp as w

    rx_keys = [w.generate_private_key() for _ in range(pairs)]
    tx_keys = [w.generate_private_key() for _ in range(pairs)]
    common = [str(port), str(size), str(seconds), "1" if websocket else "0"]
    rx = subprocess.Popen(
        [sys.executable, __file__, "--rx", *common, ",".join(k.hex() for k in rx_keys)],
        stdout=subprocess.PIPE, text=True,
    )
    assert rx.stdout is not None
    if rx.stdout.readline().strip() != "ready":
        raise RuntimeError("receiver process failed")
    dsts = ",".join(w.public_key(k).hex() for k in rx_keys)
    tx = subprocess.Popen(
        [sys.executable, __file__, "--tx", *common, ",".join(k.hex() for k in tx_keys), dsts],
        stdout=subprocess.DEVNULL,
    )
    try:
        out = rx.stdout.readline().split()
        rx.wait()
    finally:
        tx.terminate()
        tx.wait()
    return float(out[0]), float(out[1])


def _region(port: int):
    from coderstack.derpmap import DERPNode, DERPRegion

    node = DERPNode("999b", 999, "127.0.0.1", stun_port=-1, derp_port=port, force_http=True)
    return DERPRegion(999, "coder", "bench", (node,))


def rx_main(port: int, size: int, seconds: float, websocket: bool, keys: list[bytes]) -> None:
    from twisted.internet import defer, reactor, task

    from coderstack.derp.client import DERPClient, DERPClientHandler

    counts = {"rx": 0, "bytes": 0, "seen": 0}
    measuring = {"on": False}

    class Rx(DERPClientHandler):
        def packet_received(self, src: bytes, data: bytes) -> None:
            counts["seen"] += 1
            if measuring["on"]:
                counts["rx"] += 1
                counts["bytes"] += len(data)

    clients = [DERPClient(reactor, _region(port), k, Rx(), token="bench", force_websockets=websocket)
               for k in keys]

    async def go() -> None:
        for c in clients:
            c.start()
        while not all(c.connected for c in clients):
            await task.deferLater(reactor, 0.01, lambda: None)
        print("ready", flush=True)
        while not counts["seen"]:
            await task.deferLater(reactor, 0.005, lambda: None)
        await task.deferLater(reactor, min(0.5, seconds / 4), lambda: None)  # warm-up
        measuring["on"] = True
        t0 = time.perf_counter()
        await task.deferLater(reactor, seconds, lambda: None)
        measuring["on"] = False
        elapsed = time.perf_counter() - t0
        print(counts["rx"] / elapsed, counts["bytes"] * 8 / elapsed / 1e6, flush=True)
        await defer.gatherResults([c.stop() for c in clients])

    d = defer.ensureDeferred(go())
    d.addErrback(lambda f: (f.printTraceback(), None))
    d.addBoth(lambda _: reactor.stop())
    reactor.run()


def tx_main(port: int, size: int, seconds: float, websocket: bool, keys: list[bytes],
            dsts: list[bytes]) -> None:
    """Senders push as fast as their connections accept, until the parent stops them."""
    from twisted.internet import reactor

    from coderstack.derp.client import DERPClient, DERPClientHandler

    payload = os.urandom(size)

    class Tx(DERPClientHandler):
        def __init__(self, dst: bytes) -> None:
            self.dst = dst
            self.client: DERPClient | None = None

        def connected(self, server_key: bytes, node: object, ws: bool) -> None:
            self.pump()

        def writable(self, ok: bool) -> None:
            if ok:
                reactor.callLater(0, self.pump)

        def pump(self) -> None:
            c = self.client
            if c is None or not c.connected:
                return
            n = 0
            while c.writable and n < 64:
                c.send(self.dst, payload)
                n += 1
            if c.writable:
                reactor.callLater(0, self.pump)

    for k, dst in zip(keys, dsts, strict=True):
        tx = Tx(dst)
        tx.client = DERPClient(reactor, _region(port), k, tx, token="bench", force_websockets=websocket)
        tx.client.start()
    reactor.run()


def run_ws_baseline(port: int, seconds: float, size: int = 65536) -> float:
    out = subprocess.run([sys.executable, __file__, "--ws-client", str(port), str(seconds), str(size)],
                         check=True, capture_output=True, text=True).stdout.split()
    return float(out[0])


def ws_client_main(port: int, seconds: float, size: int) -> None:
    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.interfaces import IPushProducer
    from zope.interface import implementer

    payload = os.urandom(size)

    @implementer(IPushProducer)
    class P(WebSocketClientProtocol):
        paused = False
        done = False

        def onOpen(self) -> None:
            self.transport.registerProducer(self, True)
            self.t_end = time.perf_counter() + seconds
            self.pump()

        def pump(self) -> None:
            n = 0
            while not self.paused and not self.done and n < 32:
                self.sendMessage(payload, isBinary=True)
                n += 1
            if time.perf_counter() >= self.t_end and not self.done:
                self.done = True
                self.sendMessage(b"stats")
            elif not self.paused and not self.done:
                reactor.callLater(0, self.pump)

        def pauseProducing(self) -> None:
            self.paused = True

        def resumeProducing(self) -> None:
            self.paused = False
            if not self.done:
                reactor.callLater(0, self.pump)

        def stopProducing(self) -> None:
            pass

        def onMessage(self, msg: bytes, isBinary: bool) -> None:
            total, elapsed = msg.split()
            print(int(total) * 8 / float(elapsed) / 1e6)
            self.transport.unregisterProducer()
            self.sendClose()
            reactor.callLater(0.1, reactor.stop)

    f = WebSocketClientFactory(f"ws://127.0.0.1:{port}/sink")
    f.protocol = P
    f.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0)
    TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(f)
    reactor.run()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve()
        return
    if len(sys.argv) > 1 and sys.argv[1] in ("--rx", "--tx"):
        port, size, seconds, ws = sys.argv[2:6]
        keys = [bytes.fromhex(k) for k in sys.argv[6].split(",")]
        if sys.argv[1] == "--rx":
            rx_main(int(port), int(size), float(seconds), ws == "1", keys)
        else:
            dsts = [bytes.fromhex(k) for k in sys.argv[7].split(",")]
            tx_main(int(port), int(size), float(seconds), ws == "1", keys, dsts)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--ws-client":
        ws_client_main(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the default: 2 s per run, 3 runs")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        cases = [
            ("DERP upgrade, 1 pair, 1400 B", 1, 1400, False),
            ("DERP upgrade, 100 pairs, 1400 B", 100, 1400, False),
            ("DERP upgrade, 1 pair, 64 KiB", 1, 65536, False),
            ("DERP websocket, 1 pair, 1400 B", 1, 1400, True),
            ("DERP websocket, 100 pairs, 1400 B", 100, 1400, True),
        ]
        rows = []
        for name, pairs, size, ws in cases:
            results = [run_derp(port, pairs, size, args.seconds, ws) for _ in range(args.runs)]
            pps = statistics.median(r[0] for r in results)
            mbps = statistics.median(r[1] for r in results)
            rows.append((name, f"{pps:,.0f}", f"{mbps:,.0f}"))
        base = statistics.median(run_ws_baseline(port, args.seconds) for _ in range(args.runs))
        rows.append(("Autobahn websocket baseline, 64 KiB messages (no relay)", "-", f"{base:,.0f}"))
    finally:
        server.terminate()
        server.wait()

    print(f"DERP relay benchmark, {datetime.date.today()} — {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; medians of {args.runs} runs of {args.seconds:g} s; "
          "relay, receivers and senders in three processes, loopback")
    print()
    print("| case | packets/s received | Mbit/s received |")
    print("|---|---:|---:|")
    for name, pps, mbps in rows:
        print(f"| {name} | {pps} | {mbps} |")


if __name__ == "__main__":
    main()
