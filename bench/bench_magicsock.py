"""Ping RTT through magicsock on loopback: direct (p2p) and relayed (DERP), beside plain UDP.

Run: ``python bench/bench_magicsock.py`` (quick, the default; ``--quick`` accepted) or
``--full`` (more samples). Everything runs in one process on one reactor, so every round trip
includes both ends' processing, as the plain Twisted UDP echo beside it does. Rows:

* Twisted UDP echo: two DatagramProtocols on 127.0.0.1 (the reference figure, two processes,
  is 110 µs);
* disco ping, direct: ``Conn.ping`` once the path is ``p2p`` (NaCl box both ways);
* WireGuard echo, direct: an IPv6 packet through WireGuard to the peer, echoed back;
* the same two over DERP (``block_endpoints``), through a real relay on 127.0.0.1.

Medians over several runs of the median of each run's samples.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import platform
import statistics
import struct
import sys
import time
from datetime import UTC, datetime

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import DatagramProtocol
from twisted.web.resource import Resource
from twisted.web.server import Site

from coderstack.derp.policy import AllowAllPolicy
from coderstack.derp.server import make_derp_resources, make_relay
from coderstack.derpmap import DERPMap, DERPNode, DERPRegion
from coderstack.tailnet.conn import Conn
from coderstack.wire import derp as w


def ipv6_packet(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, payload: bytes) -> bytes:
    return struct.pack(">IHBB", 6 << 28, len(payload), 59, 64) + src.packed + dst.packed + payload


async def wait_for(pred) -> None:
    while not pred():
        await task.deferLater(reactor, 0.005, lambda: None)


class _Echo(DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)


class _Pinger(DatagramProtocol):
    waiting: defer.Deferred | None = None

    def datagramReceived(self, data, addr):
        d, self.waiting = self.waiting, None
        if d is not None:
            d.callback(time.perf_counter())


async def udp_echo(samples: int) -> list[float]:
    echo = reactor.listenUDP(0, _Echo(), interface="127.0.0.1")
    pinger = _Pinger()
    port = reactor.listenUDP(0, pinger, interface="127.0.0.1")
    dest = ("127.0.0.1", echo.getHost().port)
    out = []
    try:
        for _ in range(samples):
            pinger.waiting = defer.Deferred()
            t0 = time.perf_counter()
            pinger.transport.write(b"x" * 64, dest)
            t1 = await pinger.waiting
            out.append(t1 - t0)
    finally:
        await echo.stopListening()
        await port.stopListening()
    return out


async def pair(derp_map: DERPMap, block: bool) -> tuple[Conn, Conn]:
    conns = []
    for blocked in (block, False):
        c = Conn(reactor, derp_token="bench", netcheck=False, block_endpoints=blocked,
                 interface_addresses=lambda: [ipaddress.ip_address("127.0.0.1")])
        c.start(0, "127.0.0.1")
        c.set_derp_map(derp_map)
        conns.append(c)
    a, b = conns
    a.update_peer(b.node())
    b.update_peer(a.node())
    await wait_for(lambda: 999 in a.sock.derp_connected and 999 in b.sock.derp_connected)
    # b echoes every packet back (a stand-in for its netstack).
    b.on_packet(lambda key, p: b.send_packet(key, ipv6_packet(b.address, a.address, p[40:])))
    return a, b


async def measure(a: Conn, b: Conn, samples: int) -> tuple[list[float], list[float], str]:
    bkey = b.keys.node_public
    got: list[defer.Deferred] = []
    a.on_packet(lambda key, p: got and got.pop().callback(time.perf_counter()))
    # Warm up (handshake, path discovery).
    for _ in range(20):
        d = defer.Deferred()
        got.append(d)
        a.send_packet(bkey, ipv6_packet(a.address, b.address, b"warm"))
        await d
        await task.deferLater(reactor, 0.01, lambda: None)
    path = a.path(bkey)[0]
    pings, echoes = [], []
    for _ in range(samples):
        t0 = time.perf_counter()
        await a.ping(bkey)
        pings.append(time.perf_counter() - t0)
        d = defer.Deferred()
        got.append(d)
        t0 = time.perf_counter()
        a.send_packet(bkey, ipv6_packet(a.address, b.address, b"e" * 64))
        echoes.append(await d - t0)
    return pings, echoes, path


async def main(full: bool) -> None:
    runs, samples = (5, 500) if full else (3, 150)
    relay = make_relay(w.generate_private_key(), AllowAllPolicy(), reactor)
    root = Resource()
    for path, res in make_derp_resources(relay, AllowAllPolicy()).items():
        root.putChild(path.lstrip("/").encode(), res)
    site = Site(root)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    node = DERPNode(name="999b", region_id=999, host_name="127.0.0.1", stun_port=-1,
                    derp_port=port.getHost().port, force_http=True)
    derp_map = DERPMap(regions={999: DERPRegion(999, "coder", "Coder Embedded Relay", (node,),
                                                embedded_relay=True)})
    rows: dict[str, list[float]] = {}
    paths: dict[str, str] = {}
    for _ in range(runs):
        rows.setdefault("Twisted UDP echo (baseline)", []).append(statistics.median(await udp_echo(samples)))
        for label, block in (("direct", False), ("DERP", True)):
            a, b = await pair(derp_map, block)
            pings, echoes, path = await measure(a, b, samples)
            paths[label] = path
            rows.setdefault(f"disco ping, {label}", []).append(statistics.median(pings))
            rows.setdefault(f"WireGuard echo, {label}", []).append(statistics.median(echoes))
            await a.close()
            await b.close()
    await port.stopListening()
    print(f"# magicsock ping RTT on loopback — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"\n{runs} runs x {samples} samples; paths: direct = `{paths['direct']}`, "
          f"relayed = `{paths['DERP']}`\n")
    base = statistics.median(rows["Twisted UDP echo (baseline)"])
    print("| round trip | median RTT | × UDP echo |")
    print("|---|---|---|")
    for name, values in rows.items():
        med = statistics.median(values)
        print(f"| {name} | {med * 1e6:.0f} µs | {med / base:.1f} |")
    print("\nReference: Twisted UDP ping-pong between two processes, 110 µs "
          "(reference/baselines-and-real-peers.md).")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the default")
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    task.react(lambda _r: defer.ensureDeferred(main(args.full)))
