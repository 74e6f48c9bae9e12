"""One LISTEN connection shared by several subscribers, on a real PostgreSQL."""

from __future__ import annotations

import sqlalchemy as sa
from twisted.internet import reactor
from twisted.trial import unittest

from coderstack.server.database import Database, database_url
from coderstack.server.pubsub import Listener, notify, notify_many
from tests.support import postgres
from tests.support.waiting import wait_until


class Recorder:
    def __init__(self) -> None:
        self.got: list[tuple[str, str]] = []
        self.listened = 0

    def listening(self) -> None:
        self.listened += 1

    def unlistened(self, error: str) -> None:
        pass

    def notified(self, channel: str, payload: str) -> None:
        self.got.append((channel, payload))


class ListenerTests(unittest.TestCase):
    def setUp(self) -> None:
        postgres.require()
        self.url = database_url(None, postgres.cluster().new_database())

    async def test_each_subscriber_gets_its_channels_over_one_connection(self) -> None:
        db = Database(self.url, reactor)
        self.addCleanup(db.stop)
        listener = Listener(reactor, self.url)
        a, b = Recorder(), Recorder()
        listener.subscribe(("chan_a", "chan_both"), a)
        listener.subscribe(("chan_b", "chan_both"), b)
        self.addCleanup(listener.join, 5)
        self.addCleanup(listener.stop)
        listener.start()
        await wait_until(lambda: a.listened and b.listened, "both subscribers listening")
        self.assertEqual((a.listened, b.listened), (1, 1))

        def backends(conn: sa.Connection) -> int:
            return conn.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND query LIKE 'LISTEN %'")).scalar_one()  # a LISTEN connection's last query

        self.assertEqual(await db.transact(backends), 1)

        def send(conn: sa.Connection) -> None:
            for ch in ("chan_a", "chan_b", "chan_both"):
                notify(conn, ch, f"to {ch}")
            notify_many(conn, "chan_a", [f"many {i}" for i in range(5)])

        await db.transact(send)
        await wait_until(lambda: len(a.got) == 7 and len(b.got) == 2, "the notifications")
        self.assertEqual(a.got, [("chan_a", "to chan_a"), ("chan_both", "to chan_both")]
                         + [("chan_a", f"many {i}") for i in range(5)])  # in order
        self.assertEqual(b.got, [("chan_b", "to chan_b"), ("chan_both", "to chan_both")])

    def test_subscribing_after_the_start_is_refused(self) -> None:
        listener = Listener(reactor, self.url)
        listener.subscribe(("one",), Recorder())
        self.addCleanup(listener.join, 5)
        self.addCleanup(listener.stop)
        listener.start()
        self.assertRaises(RuntimeError, listener.subscribe, ("two",), Recorder())
        self.assertRaises(ValueError, Listener(reactor, self.url).subscribe, ("bad name;",), Recorder())
