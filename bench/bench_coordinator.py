"""Coordinator fan-out and connect cost (the sans-IO core, no sockets).

Run: ``python bench/bench_coordinator.py`` (quick: N = 100 and 1000 clients) or ``--full``
(also N = 10000). Prints a Markdown table of medians.

Measured, for one agent with N clients that each have a tunnel to it:

* connect + update_self + add_tunnel of the N clients, per client (the rate a server reaches when
  a crowd reconnects after a restart);
* one agent ``update_self`` reaching all N clients:
  - core only (each client's ``send`` just keeps the response),
  - core plus the websocket payload per client (``response.to_text().encode()``, the cached
    encoding the adapter uses, so the shared response is serialized once),
  - for comparison, json.dumps per recipient, as an adapter ignoring the cached text would;
* a reconnect of the agent (overwrite), which sends it the N clients' nodes in one response;
* the codec alone: parsing a typical request, encoding a one-node response.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from uuid import UUID, uuid4

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from twisted.internet.task import Clock

from coderstack.coordinator.core import AgentAuth, ClientAuth, Coordinator
from coderstack.wire.coordination import (
    CoordinateRequest,
    CoordinateResponse,
    Node,
    PeerUpdate,
    PeerUpdateKind,
    parse_request,
    prefix_from_uuid,
)

AGENT = UUID("aaaaaaaa-aaaa-aaaa-aaaa-123456789abc")
USER = uuid4()


def node_for(peer_id: UUID, n: int) -> Node:
    addr = prefix_from_uuid(peer_id)
    return Node(
        id=n,
        as_of=datetime(2026, 11, 22, tzinfo=UTC),
        key=os.urandom(32),
        disco=os.urandom(32),
        preferred_derp=999,
        derp_latency={"999-v4": 0.012, "999-v6": 0.015},
        addresses=[addr],
        allowed_ips=[addr],
        endpoints=["192.0.2.10:41641", "[2001:db8::10]:41641", "10.0.0.5:41641"],
    )


def build(n: int, send_factory) -> tuple[Coordinator, object, float]:
    """A coordinator with one agent and n tunnelled clients; returns (coord, agent conn, secs)."""
    coord = Coordinator(Clock())
    agent = coord.connect(AGENT, "agent", AgentAuth(AGENT), send_factory(), lambda: None)
    agent.handle(CoordinateRequest(update_self=node_for(AGENT, 1)))
    clients = [uuid4() for _ in range(n)]
    requests = [CoordinateRequest(update_self=node_for(c, 2), add_tunnel=AGENT) for c in clients]
    auth = ClientAuth(AGENT, USER)
    start = time.perf_counter()
    for cid, request in zip(clients, requests, strict=True):
        conn = coord.connect(cid, "client", auth, send_factory(), lambda: None)
        conn.handle(request)
    return coord, agent, time.perf_counter() - start


def keep():
    out: list[CoordinateResponse] = []

    def send(response: CoordinateResponse) -> None:
        out.append(response)
        if len(out) > 4:
            del out[:-1]

    return send


def encode_cached():
    def send(response: CoordinateResponse) -> None:
        response.to_text().encode("utf-8")

    return send


def encode_each():
    def send(response: CoordinateResponse) -> None:
        json.dumps(response.to_json(), separators=(",", ":")).encode("utf-8")

    return send


def median_of(runs: int, fn) -> float:
    return statistics.median(fn() for _ in range(runs))


def fan_out(n: int, send_factory, runs: int) -> float:
    _coord, agent, _ = build(n, send_factory)
    counter = iter(range(10, 10**9))

    def once() -> float:
        request = CoordinateRequest(update_self=node_for(AGENT, next(counter)))
        start = time.perf_counter()
        agent.handle(request)
        return time.perf_counter() - start

    return median_of(runs, once)


def reconnect(n: int, runs: int) -> float:
    coord, _agent, _ = build(n, encode_cached)

    def once() -> float:
        start = time.perf_counter()
        coord.connect(AGENT, "agent", AgentAuth(AGENT), encode_cached(), lambda: None)
        return time.perf_counter() - start

    return median_of(runs, once)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="N = 100, 1000 (the default)")
    group.add_argument("--full", action="store_true", help="also N = 10000")
    parser.add_argument("--runs", type=int, default=7, help="runs per median (default 7)")
    args = parser.parse_args()
    sizes = [100, 1000] + ([10000] if args.full else [])
    runs = args.runs

    print("# Coordinator core: fan-out and connect cost")
    print()
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {platform.machine()} · nproc {os.cpu_count()} · "
        f"Python {platform.python_version()} · medians of {runs} runs"
    )
    print()
    print(
        "| clients N | connect+update_self+add_tunnel per client | agent update_self → N "
        "(core only) | → N (+ cached JSON per ws message) | → N (json.dumps per recipient instead) "
        "| agent reconnect (N nodes in one response) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        connect = median_of(max(3, runs // 2), lambda n=n: build(n, keep)[2]) / n
        core = fan_out(n, keep, runs)
        cached = fan_out(n, encode_cached, runs)
        each = fan_out(n, encode_each, runs)
        again = reconnect(n, runs)
        print(
            f"| {n} | {connect * 1e6:.1f} µs ({1 / connect:,.0f}/s) | {core * 1e3:.2f} ms "
            f"({core / n * 1e6:.2f} µs/client) | {cached * 1e3:.2f} ms | {each * 1e3:.2f} ms "
            f"| {again * 1e3:.2f} ms |"
        )
    parse, encode = codec(max(3, runs // 2))
    print()
    print("| codec, per message | µs |")
    print("|---|---:|")
    print(
        f"| parse_request (update_self + add_tunnel, {len(sample_text())} bytes) | {parse * 1e6:.1f} |"
    )
    print(f"| encode a one-NODE response (uncached node) | {encode * 1e6:.1f} |")


def sample_text() -> str:
    return CoordinateRequest(update_self=node_for(AGENT, 1), add_tunnel=uuid4()).to_text()


def codec(runs: int) -> tuple[float, float]:
    """Per message: parse_request of a typical update_self, and to_text of a NODE response."""
    text = CoordinateRequest(update_self=node_for(AGENT, 1), add_tunnel=uuid4()).to_text()
    n = 2000

    def parse() -> float:
        start = time.perf_counter()
        for _ in range(n):
            parse_request(text)
        return (time.perf_counter() - start) / n

    def encode() -> float:
        nodes = [node_for(AGENT, i) for i in range(n)]  # fresh nodes: no cached JSON
        start = time.perf_counter()
        for node in nodes:
            CoordinateResponse(
                (PeerUpdate(AGENT, PeerUpdateKind.NODE, "node update", node),)
            ).to_text()
        return (time.perf_counter() - start) / n

    return median_of(runs, parse), median_of(runs, encode)


if __name__ == "__main__":
    main()
