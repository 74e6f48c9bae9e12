"""A credential revoked on one replica closes its connections on the others (real PostgreSQL)."""

from __future__ import annotations

from uuid import uuid4

from twisted.internet import reactor
from twisted.trial import unittest

from coderstack.server import livesessions
from coderstack.server.database import Database, database_url
from coderstack.server.livesessions import Credential, LiveSessions
from coderstack.server.pubsub import Listener
from coderstack.server.revocations import REVOKE_CHANNEL, Revocations, SharedRevocations
from tests.support import postgres
from tests.support.waiting import wait_until


class Conn:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def revoked(self, reason: str) -> None:
        self.reasons.append(reason)

    def going_away(self) -> None:
        pass


class LocalRevocationTests(unittest.SynchronousTestCase):
    def test_closes_this_processes_connections(self) -> None:
        live = LiveSessions(reactor)
        conn = Conn()
        live.attach(Credential(b"h" * 32), conn)
        self.assertEqual(Revocations(live).token(b"h" * 32, livesessions.REASON_LOGGED_OUT), 1)
        self.assertEqual(conn.reasons, [livesessions.REASON_LOGGED_OUT])


class SharedRevocationTests(unittest.TestCase):
    def setUp(self) -> None:
        postgres.require()
        self.url = database_url(None, postgres.cluster().new_database())

    async def replicas(self) -> list[SharedRevocations]:
        made = []
        for _ in range(2):
            db = Database(self.url, reactor)
            self.addCleanup(db.stop)
            listener = Listener(reactor, self.url)
            r = SharedRevocations(db, LiveSessions(reactor), uuid4(), listener)
            self.addCleanup(listener.join, 5)
            self.addCleanup(listener.stop)
            listener.start()
            made.append(r)
        for r in made:
            await wait_until(lambda r=r: r.listening_now, "the replica listening")
        return made

    async def test_every_kind_reaches_the_other_replica(self) -> None:
        a, b = await self.replicas()
        user, agent = uuid4(), uuid4()
        token_conn, user_conn, agent_conn, mine = Conn(), Conn(), Conn(), Conn()
        b.live.attach(Credential(b"t" * 32), token_conn)
        b.live.attach(Credential(b"u" * 32, user_id=user), user_conn)
        b.live.attach(Credential(b"a" * 32, agent_id=agent), agent_conn)
        a.live.attach(Credential(b"t" * 32), mine)

        a.token(b"t" * 32, livesessions.REASON_LOGGED_OUT)
        await wait_until(lambda: token_conn.reasons, "B closing the token's connection")
        self.assertEqual(token_conn.reasons[:1], [livesessions.REASON_LOGGED_OUT])
        self.assertEqual(mine.reasons, [livesessions.REASON_LOGGED_OUT])  # here, once
        a.user(user, livesessions.REASON_USER_SUSPENDED)
        a.agent(agent, livesessions.REASON_AGENT_REVOKED)
        await wait_until(lambda: user_conn.reasons and agent_conn.reasons, "B closing the user's and agent's")
        self.assertEqual(user_conn.reasons, [livesessions.REASON_USER_SUSPENDED])
        self.assertEqual(agent_conn.reasons, [livesessions.REASON_AGENT_REVOKED])

    def test_a_bad_payload_is_counted_and_dropped(self) -> None:
        r = SharedRevocations(Database(self.url, reactor), LiveSessions(reactor), uuid4(), Listener(reactor, self.url))
        r.notified(REVOKE_CHANNEL, "x,token,nothex,why")
        r.notified(REVOKE_CHANNEL, "x,teapot,1,why")
        r.notified(REVOKE_CHANNEL, "short")
        self.assertEqual(r.counters["bad"], 3)
        r.db.stop()
