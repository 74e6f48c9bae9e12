"""Node updates across replicas: the PostgreSQL coordinator against one replica's memory.

Run: ``python bench/bench_pgcoord.py`` (needs PostgreSQL's initdb/pg_ctl on PATH; as root it
runs the cluster as the ``postgres`` user). For 1, 2 and 3 replicas (each a Coordinator plus
its :class:`~coderstack.server.pgcoord.PGCoordination`, all in this one process and reactor, on
one throwaway cluster), ``--agents`` agents are spread round-robin over the replicas and each
gets one client on the next replica (so with 2 or 3 replicas every tunnel crosses replicas).
It measures:

* tunnel set-up: a client's connect + update_self + add_tunnel until its agent has the client's
  node, and the database transactions that took (writes on every replica, reads on every
  replica), per tunnel;
* node-update latency: one agent's update_self until its client has the new node, p50/p99 over
  ``--samples`` updates one after another — for the client on another replica ("cross") and,
  in the same update, a second client on the agent's own replica ("same"; at 1 replica both
  are the in-memory path);
* fan-out: one more agent with ``--fanout`` clients spread round-robin over the replicas; its
  update_self until the last of them has the new node, p50/p99 over ``--fanout-samples``.

All replicas share one Python process here, so the figures include their combined CPU; real
replicas are separate processes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Any
from uuid import UUID, uuid4

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from twisted.internet import defer, task

from coderstack.coordinator.core import AgentAuth, ClientAuth, Coordinator
from coderstack.server.database import Database, database_url
from coderstack.server.pgcoord import PGCoordination
from coderstack.server.pubsub import Listener
from coderstack.wire.coordination import CoordinateRequest, CoordinateResponse
from tests.coordinator.test_core import make_node
from tests.support import postgres

USER = UUID("11111111-2222-3333-4444-555555555555")


class Watcher:
    """A peer's send(): fires the waiter for (peer id, node id) when that node arrives."""

    def __init__(self) -> None:
        self.waiting: dict[tuple[UUID, int], defer.Deferred[float]] = {}

    def expect(self, about: UUID, node_id: int) -> defer.Deferred[float]:
        d: defer.Deferred[float] = defer.Deferred()
        self.waiting[about, node_id] = d
        return d

    def send(self, response: CoordinateResponse) -> None:
        now = time.perf_counter()
        for u in response.peer_updates:
            if u.node is not None:
                d = self.waiting.pop((u.id, u.node.id), None)
                if d is not None:
                    d.callback(now)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def one(reactor: Any, cluster: postgres.PostgresCluster, n: int, agents: int, samples: int,
              fanout: int, fanout_samples: int) -> dict[str, Any]:
    url = database_url(None, cluster.new_database())
    first = Database(url, reactor)
    await first.migrate()
    first.stop()
    reps = []
    listeners: list[Listener] = []
    for _ in range(n):
        db = Database(url, reactor)
        coord = Coordinator(reactor)
        pg = None
        if n > 1:
            listener = Listener(reactor, url)
            pg = PGCoordination(reactor, db, coord, uuid4(), listener)
            pg.start()
            listener.start()
            listeners.append(listener)
        reps.append((db, coord, pg))
    while any(pg is not None and not pg.listening_now for _, _, pg in reps):
        await task.deferLater(reactor, 0.05, lambda: None)
    ids = [uuid4() for _ in range(agents)]
    agent_w = {a: Watcher() for a in ids}
    agent_conn = {}
    for i, a in enumerate(ids):
        coord = reps[i % n][1]
        conn = coord.connect(a, "agent", AgentAuth(a), agent_w[a].send, lambda: None)
        conn.handle(CoordinateRequest(update_self=make_node(a, 1)))
        agent_conn[a] = conn
    # Every replica holding a client must know the agents first (as it would in a warm deployment).
    while any(reps[(i + 1) % n][1].node(a) is None for i, a in enumerate(ids)):
        await task.deferLater(reactor, 0.05, lambda: None)

    def transactions() -> int:
        return sum(pg.counters["writes"] + pg.counters["reads"] for _, _, pg in reps if pg is not None)

    before = transactions()
    setups = []
    client_w = {}
    for i, a in enumerate(ids):
        coord = reps[(i + 1) % n][1]
        cid = uuid4()
        w = client_w[a] = Watcher()
        arrived = agent_w[a].expect(cid, 2)
        t0 = time.perf_counter()
        conn = coord.connect(cid, "client", ClientAuth(a, USER), w.send, lambda: None)
        conn.handle(CoordinateRequest(update_self=make_node(cid, 2), add_tunnel=a))
        setups.append(await arrived - t0)
    per_tunnel = (transactions() - before) / agents
    # A second client per sampled agent, on the agent's own replica.
    sampled = ids[:min(agents, samples)]
    same_w = {}
    for i, a in enumerate(sampled):
        coord = reps[i % n][1]
        cid = uuid4()
        w = same_w[a] = Watcher()
        arrived = agent_w[a].expect(cid, 2)
        conn = coord.connect(cid, "client", ClientAuth(a, USER), w.send, lambda: None)
        conn.handle(CoordinateRequest(update_self=make_node(cid, 2), add_tunnel=a))
        await arrived
    cross, same = [], []
    for k in range(samples):
        a = sampled[k % len(sampled)]
        node_id = 10 + k
        there, here = client_w[a].expect(a, node_id), same_w[a].expect(a, node_id)
        t0 = time.perf_counter()
        agent_conn[a].handle(CoordinateRequest(update_self=make_node(a, node_id)))
        same.append(await here - t0)
        cross.append(await there - t0)
    # Fan-out: one agent on replica 0, ``fanout`` clients over every replica.
    hot = uuid4()
    hot_w = Watcher()
    hot_conn = reps[0][1].connect(hot, "agent", AgentAuth(hot), hot_w.send, lambda: None)
    hot_conn.handle(CoordinateRequest(update_self=make_node(hot, 1)))
    while any(coord.node(hot) is None for _, coord, _ in reps):
        await task.deferLater(reactor, 0.05, lambda: None)
    fans = []
    for j in range(fanout):
        cid = uuid4()
        w = Watcher()
        arrived = hot_w.expect(cid, 2)
        conn = reps[j % n][1].connect(cid, "client", ClientAuth(hot, USER), w.send, lambda: None)
        conn.handle(CoordinateRequest(update_self=make_node(cid, 2), add_tunnel=hot))
        await arrived
        fans.append(w)
    spread = []
    for k in range(fanout_samples):
        node_id = 10 + k
        waits = [w.expect(hot, node_id) for w in fans]
        t0 = time.perf_counter()
        hot_conn.handle(CoordinateRequest(update_self=make_node(hot, node_id)))
        spread.append(max([await d for d in waits]) - t0)
    for _db, coord, pg in reps:
        if pg is not None:
            pg.stop()
        coord.close()
    for listener in listeners:
        listener.stop()
        listener.join(5)
    for db, _, _ in reps:
        db.stop()
    return {"replicas": n, "agents": agents, "setup_p50": statistics.median(setups),
            "setup_p99": pct(setups, 99), "tx_per_tunnel": per_tunnel,
            "cross_p50": statistics.median(cross), "cross_p99": pct(cross, 99),
            "same_p50": statistics.median(same), "same_p99": pct(same, 99),
            "fanout_p50": statistics.median(spread), "fanout_p99": pct(spread, 99)}


def ms(x: float) -> str:
    return f"{x * 1000:.2f} ms"


async def main(reactor: Any) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=500)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--fanout", type=int, default=100, help="clients of the fan-out agent")
    ap.add_argument("--fanout-samples", type=int, default=50)
    args = ap.parse_args()
    why = postgres.available()
    if why:
        raise SystemExit(f"PostgreSQL cannot run here: {why}")
    cluster = postgres.PostgresCluster()
    try:
        rows = [await one(reactor, cluster, n, args.agents, args.samples, args.fanout, args.fanout_samples)
                for n in (1, 2, 3)]
    finally:
        cluster.stop()
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}; {args.agents} agents, {args.samples} updates, "
          f"fan-out to {args.fanout} clients x {args.fanout_samples}")
    print("| replicas | tunnel set-up p50 / p99 | DB transactions per tunnel | node update, same replica "
          "p50 / p99 | node update, across replicas p50 / p99 | fan-out to all clients p50 / p99 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['replicas']} | {ms(r['setup_p50'])} / {ms(r['setup_p99'])} | {r['tx_per_tunnel']:.1f} | "
              f"{ms(r['same_p50'])} / {ms(r['same_p99'])} | {ms(r['cross_p50'])} / {ms(r['cross_p99'])} | "
              f"{ms(r['fanout_p50'])} / {ms(r['fanout_p99'])} |")

if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
