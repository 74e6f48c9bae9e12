"""Two replicas' coordinators sharing peers through a real PostgreSQL (LISTEN/NOTIFY)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID, uuid4

import psycopg
from twisted.internet import reactor
from twisted.trial import unittest

from coderstack.coordinator.core import AgentAuth, ClientAuth, Coordinator
from coderstack.server.database import Database, database_url
from coderstack.server.pgcoord import PGCoordination
from coderstack.server.pubsub import Listener, libpq_url
from coderstack.wire.coordination import CoordinateRequest, Node
from tests.coordinator.test_core import AGENT, USER, Peer, make_node
from tests.support import postgres
from tests.support.waiting import wait_until


class Replica:
    def __init__(self, url: str) -> None:
        self.id = uuid4()
        self.db = Database(url, reactor)
        self.coordinator = Coordinator(reactor)
        self.listener = Listener(reactor, url)
        self.pg = PGCoordination(reactor, self.db, self.coordinator, self.id, self.listener)

    def start(self) -> None:
        self.pg.start()
        self.listener.start()

    def stop(self) -> None:
        self.pg.stop()
        self.listener.stop()
        self.coordinator.close()
        self.listener.join(5)
        self.db.stop()


def last_node(peer: Peer, about: UUID) -> Node | None:
    """The node ``peer`` was last told of for ``about`` (None if last told it is gone)."""
    node = None
    for r in peer.responses:
        for u in r.peer_updates:
            if u.id == about:
                node = u.node if str(u.kind) in ("NODE", "LOST") else None
    return node


def kinds(peer: Peer, about: UUID) -> list[str]:
    return [str(u.kind) for r in peer.responses for u in r.peer_updates if u.id == about]


class Base(unittest.TestCase):
    def pg_cluster(self) -> postgres.PostgresCluster:
        postgres.require()
        return postgres.cluster()

    def setUp(self) -> None:
        self.url = database_url(None, self.pg_cluster().new_database())

    async def start(self, n: int = 2) -> list[Replica]:
        first = Database(self.url, reactor)
        self.addCleanup(first.stop)
        await first.migrate()
        made = [Replica(self.url) for _ in range(n)]
        for r in made:
            self.addCleanup(r.stop)
            r.start()
        for r in made:
            await wait_until(lambda r=r: r.pg.listening_now, "the replica listening")
        return made

    async def across(self) -> tuple[Replica, Replica, Peer, Peer]:
        """A client on A with a tunnel to an agent on B, both with nodes they have exchanged."""
        a, b = await self.start()
        agent = Peer(b.coordinator, AGENT, AgentAuth(AGENT), "agent")
        agent.conn.handle(CoordinateRequest(update_self=make_node(AGENT, 1)))
        await wait_until(lambda: a.coordinator.node(AGENT) is not None, "A seeing the agent on B")
        client = Peer(a.coordinator, uuid4(), ClientAuth(AGENT, USER), "client")
        client.conn.handle(CoordinateRequest(update_self=make_node(client.id, 2), add_tunnel=AGENT))
        await wait_until(lambda: last_node(agent, client.id) == make_node(client.id, 2),
                         "the agent on B getting the client's node")
        self.assertEqual(last_node(client, AGENT), make_node(AGENT, 1))
        return a, b, agent, client

    async def until(self, pred: Callable[[], Any], what: str) -> None:
        await wait_until(pred, what, timeout=20)


class PGCoordinationTests(Base):
    async def test_nodes_and_ready_cross_replicas(self) -> None:
        a, b, agent, client = await self.across()
        agent.conn.handle(CoordinateRequest(update_self=make_node(AGENT, 3)))
        await self.until(lambda: last_node(client, AGENT) == make_node(AGENT, 3), "the node update on A")
        agent.conn.handle(CoordinateRequest(ready_for_handshake=(client.id,)))
        await self.until(lambda: "READY_FOR_HANDSHAKE" in kinds(client, AGENT), "READY on A")
        for r in (a, b):  # the closed relay's questions, on either replica
            self.assertTrue(r.coordinator.tunnel_between(client.id, AGENT))
            self.assertEqual(r.coordinator.peer_for_node_key(make_node(client.id, 2).key), client.id)
        # What /metrics shows of it: A wrote the client, read the agent; each knows one remote peer.
        text = "\n".join(a.pg.metrics_lines()) + "\n"
        self.assertRegex(text, r'transactions_total\{kind="write",outcome="ok"\} [1-9]')
        self.assertRegex(text, r'transactions_total\{kind="read",outcome="ok"\} [1-9]')
        self.assertRegex(text, r"\ncoderstack_pgcoord_notifications_total [1-9]")
        self.assertIn("\ncoderstack_pgcoord_listening 1\n", text)
        self.assertIn("\ncoderstack_coordinator_remote_peers 1\n", text)

    async def test_lost_then_back_on_another_replica(self) -> None:
        a, b, agent, client = await self.across()
        agent.conn.lost()
        await self.until(lambda: kinds(client, AGENT)[-1:] == ["LOST"], "LOST on A")
        again = Peer(a.coordinator, AGENT, AgentAuth(AGENT), "agent")
        again.conn.handle(CoordinateRequest(update_self=make_node(AGENT, 4)))
        await self.until(lambda: kinds(client, AGENT)[-1:] == ["NODE"], "NODE after LOST")
        self.assertEqual(last_node(client, AGENT), make_node(AGENT, 4))
        await self.until(lambda: b.coordinator.node(AGENT) == make_node(AGENT, 4), "B seeing the agent on A")
        self.assertEqual(b.coordinator.status(AGENT), "connected")

    async def test_an_agent_on_two_replicas_at_once(self) -> None:
        """The agent reconnects to A before B's connection drops; the client must never be
        left with LOST or nothing (Coder's "no matching peer")."""
        a, b, agent, client = await self.across()
        again = Peer(a.coordinator, AGENT, AgentAuth(AGENT), "agent")
        again.conn.handle(CoordinateRequest(update_self=make_node(AGENT, 5)))
        await self.until(lambda: b.coordinator.node(AGENT) == make_node(AGENT, 5), "B seeing the newer binding")
        agent.conn.lost()
        marker = Peer(b.coordinator, uuid4(), ClientAuth(AGENT, USER), "marker")
        marker.conn.handle(CoordinateRequest(add_tunnel=AGENT))
        # Once A has heard of B's later change (the marker's tunnel), it has heard of the LOST.
        await self.until(lambda: a.coordinator.tunnel_between(marker.id, AGENT), "A hearing of B's changes")
        self.assertEqual(kinds(client, AGENT)[-1], "NODE")
        self.assertEqual(last_node(client, AGENT), make_node(AGENT, 5))
        self.assertEqual(a.coordinator.status(AGENT), "connected")

    async def test_resync_after_the_notification_connection_drops(self) -> None:
        a, b, agent, client = await self.across()
        resyncs = a.pg.counters["resyncs"]
        with psycopg.connect(libpq_url(self.url), autocommit=True) as conn:
            # Drop A's LISTEN connection, then change the agent while A cannot hear it.
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE query LIKE 'LISTEN%%' AND pid <> pg_backend_pid()")
        await self.until(lambda: a.pg.counters["resyncs"] > resyncs, "A resyncing")
        agent.conn.handle(CoordinateRequest(update_self=make_node(AGENT, 6)))
        await self.until(lambda: last_node(client, AGENT) == make_node(AGENT, 6), "the update after the resync")


class PGRestartTests(Base):
    """PostgreSQL stopping under two replicas: a change made meanwhile arrives once it is back."""

    def pg_cluster(self) -> postgres.PostgresCluster:
        super().pg_cluster()
        self.cluster = postgres.PostgresCluster()  # its own: the others keep theirs running
        self.addCleanup(self.cluster.stop)
        return self.cluster

    async def test_stop_and_start(self) -> None:
        a, b, agent, client = await self.across()
        self.cluster.stop_server()
        failures = b.pg.counters["write_failures"]
        agent.conn.handle(CoordinateRequest(update_self=make_node(AGENT, 7)))
        await self.until(lambda: b.pg.counters["write_failures"] > failures, "B's write failing")
        self.cluster.start_server()
        await wait_until(lambda: last_node(client, AGENT) == make_node(AGENT, 7),
                         "the update after PostgreSQL came back", timeout=30)
        self.assertEqual(kinds(client, AGENT).count("LOST"), 0)
