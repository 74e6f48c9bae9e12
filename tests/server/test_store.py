"""Store round trips, on SQLite and on a real PostgreSQL cluster."""

from __future__ import annotations

import os
import uuid
from datetime import timedelta

from twisted.internet import reactor
from twisted.trial import unittest

from coderstack.server import auth, schema
from coderstack.server.database import database_url
from coderstack.server.records import AgentRecord, now
from coderstack.server.schema import MIGRATIONS
from coderstack.server.store import Conflict, Store
from tests.support import postgres
from tests.support.tempdirs import made_dir


class StoreTests:
    """Mixin: ``make_url()`` gives a fresh, empty database."""

    def make_url(self) -> str:
        raise NotImplementedError

    async def store(self) -> Store:
        s = Store(self.make_url(), reactor)
        self.addCleanup(s.stop)
        version = await s.migrate()
        self.assertEqual(version, MIGRATIONS[-1][0])
        return s

    async def test_migrate_is_idempotent(self) -> None:
        s = await self.store()
        self.assertEqual(await s.migrate(), MIGRATIONS[-1][0])
        self.assertEqual(await s.count_users(), 0)

    async def test_user_round_trip_and_conflicts(self) -> None:
        s = await self.store()
        u = await s.create_user("alice", "a@example.com", "hash", roles=("owner",), only_if_first=True)
        self.assertTrue(u.is_owner)
        got = await s.user_by_id(u.id)
        self.assertEqual(got, u)
        found = await s.user_by_login("a@example.com")
        self.assertEqual((found[0].username, found[1]), ("alice", "hash"))
        self.assertEqual((await s.user_by_login("alice"))[0].id, u.id)
        with self.assertRaises(Conflict):
            await s.create_user("bob", "b@example.com", "h", only_if_first=True)
        with self.assertRaises(Conflict):
            await s.create_user("alice", "other@example.com", "h")
        with self.assertRaises(Conflict):
            await s.create_user("carol", "a@example.com", "h")
        bob = await s.create_user("bob", "b@example.com", "h")
        self.assertFalse(bob.is_owner)
        self.assertEqual([x.username for x in await s.list_users()], ["alice", "bob"])

    async def test_api_keys_are_stored_hashed(self) -> None:
        s = await self.store()
        u = await s.create_user("alice", "a@example.com", "hash")
        token, key_id, hashed = auth.new_session_token()
        await s.insert_api_key(key_id, u.id, hashed, now() + timedelta(days=1))
        got = await s.api_key(key_id)
        self.assertEqual(got[0], hashed)
        self.assertEqual(got[2].id, u.id)
        self.assertGreater(got[1], now())
        self.assertNotIn(token.split("-")[1].encode(), got[0])
        await s.delete_api_key(key_id)
        self.assertIsNone(await s.api_key(key_id))

    async def test_workspace_with_agent(self) -> None:
        s = await self.store()
        u = await s.create_user("alice", "a@example.com", "hash")
        token, token_hash = auth.new_agent_token()
        ws = await s.create_workspace(u.id, "dev", token_hash)
        self.assertEqual((ws.name, ws.owner_name, len(ws.agents)), ("dev", "alice", 1))
        agent = ws.agents[0]
        with self.assertRaises(Conflict):
            await s.create_workspace(u.id, "dev", auth.new_agent_token()[1])
        found = await s.agent_by_token_hash(auth.hash_agent_token(token))
        self.assertEqual(found[0].id, agent.id)
        self.assertEqual(found[1].id, ws.id)
        self.assertIsNone(await s.agent_by_token_hash(auth.hash_agent_token(str(uuid.uuid4()))))
        self.assertEqual((await s.workspace_by_name(u.id, "dev")).id, ws.id)
        self.assertEqual([w.id for w in await s.list_workspaces(u.id)], [ws.id])

        await s.note_agent_connected(agent.id)
        a1 = (await s.agent(agent.id))[0]
        self.assertIsNotNone(a1.first_connected_at)
        self.assertIsNone(a1.disconnected_at)
        await s.note_agent_disconnected(agent.id)
        a2 = (await s.agent(agent.id))[0]
        self.assertEqual(a2.first_connected_at, a1.first_connected_at)
        self.assertIsNotNone(a2.disconnected_at)

        new_token, new_hash = auth.new_agent_token()
        self.assertTrue(await s.set_agent_token(agent.id, new_hash))
        self.assertIsNone(await s.agent_by_token_hash(auth.hash_agent_token(token)))
        self.assertIsNotNone(await s.agent_by_token_hash(auth.hash_agent_token(new_token)))

        self.assertTrue(await s.delete_workspace(ws.id))
        self.assertIsNone(await s.workspace(ws.id))
        self.assertIsNone(await s.agent(agent.id))
        self.assertFalse(await s.delete_workspace(ws.id))

    async def test_upgrade_from_schema_1_keeps_data(self) -> None:
        s = Store(self.make_url(), reactor)
        self.addCleanup(s.stop)
        self.patch(schema, "MIGRATIONS", MIGRATIONS[:1])
        self.assertEqual(await s.migrate(), 1)
        u = await s.create_user("alice", "a@example.com", "hash")
        self.patch(schema, "MIGRATIONS", MIGRATIONS)
        self.assertEqual(await s.migrate(), MIGRATIONS[-1][0])
        self.assertEqual((await s.user_by_id(u.id)).username, "alice")
        t = await s.push_template("local", u.id, {"main.tf": b""})
        self.assertEqual(t.active_version.number, 1)

    async def test_template_versions(self) -> None:
        s = await self.store()
        u = await s.create_user("alice", "a@example.com", "hash")
        first = await s.push_template("docker", u.id, {"main.tf": b"# v1\n"})
        second = await s.push_template("docker", u.id, {"main.tf": b"# v2\n", "x.tf.json": b"{}"})
        self.assertEqual(first.id, second.id)
        self.assertEqual((first.active_version.number, second.active_version.number), (1, 2))
        v1 = await s.template_version_files(first.active_version.id)
        self.assertEqual(v1.files, {"main.tf": b"# v1\n"})
        v2 = await s.template_version_files(second.active_version.id)
        self.assertEqual(v2.files, {"main.tf": b"# v2\n", "x.tf.json": b"{}"})
        self.assertEqual((await s.template_by_name("docker")).active_version.number, 2)
        self.assertIsNone(await s.template_by_name("nope"))
        self.assertEqual([t.name for t in await s.list_templates()], ["docker"])

    async def test_builds_and_agents_from_state(self) -> None:
        s = await self.store()
        u = await s.create_user("alice", "a@example.com", "hash")
        t = await s.push_template("local", u.id, {"main.tf": b""})
        ws = await s.create_templated_workspace(u.id, "dev", t.id)
        self.assertEqual((ws.agents, ws.template_name, ws.latest_build), ((), "local", None))
        with self.assertRaises(Conflict):
            await s.create_templated_workspace(u.id, "dev", t.id)
        b1 = await s.start_build(ws.id, "start", t.active_version.id, u.id)
        self.assertEqual((b1.number, b1.status), (1, "running"))
        with self.assertRaises(Conflict):
            await s.start_build(ws.id, "stop", t.active_version.id, u.id)

        token = str(uuid.uuid4())
        rec = AgentRecord(id=uuid.uuid4(), name="main", token_hash=auth.hash_agent_token(token),
                          os="linux", arch="arm64", directory="/w", access_url="http://b:1")
        self.assertEqual(await s.sync_agents(ws.id, [rec]), [])
        await s.finish_build(b1.id, "succeeded", log="line 1\nline 2")
        agent, found_ws = await s.agent_by_token_hash(auth.hash_agent_token(token))
        self.assertEqual((agent.id, agent.arch, agent.directory, agent.access_url),
                         (rec.id, "arm64", "/w", "http://b:1"))
        self.assertEqual((found_ws.latest_build.id, found_ws.latest_build.status), (b1.id, "succeeded"))
        build, log = await s.build(b1.id)
        self.assertEqual((build.completed_at is not None, log), (True, "line 1\nline 2"))

        # A new token for the same agent is reported (its connection must go).
        b2 = await s.start_build(ws.id, "start", t.active_version.id, u.id)
        self.assertEqual(b2.number, 2)
        token2 = str(uuid.uuid4())
        moved = AgentRecord(**{**rec.__dict__, "token_hash": auth.hash_agent_token(token2),
                               "access_url": "http://c:2"})
        self.assertEqual(await s.sync_agents(ws.id, [moved]), [rec.id])
        self.assertIsNone(await s.agent_by_token_hash(auth.hash_agent_token(token)))
        self.assertEqual((await s.agent(rec.id))[0].access_url, "http://c:2")
        self.assertEqual(await s.fail_unfinished_builds("restarted"), 1)
        self.assertEqual((await s.build(b2.id))[0].error, "restarted")

        self.assertEqual(await s.sync_agents(ws.id, []), [rec.id])
        self.assertEqual((await s.workspace(ws.id)).agents, ())
        self.assertTrue(await s.delete_workspace(ws.id))
        self.assertIsNone(await s.build(b1.id))


class SQLiteStoreTests(StoreTests, unittest.TestCase):
    def make_url(self) -> str:
        d = made_dir(self)
        return database_url(d, None)


class PostgresStoreTests(StoreTests, unittest.TestCase):
    def setUp(self) -> None:
        postgres.require()
        self.cluster = postgres.cluster()

    def make_url(self) -> str:
        return database_url(None, self.cluster.new_database())


class DatabaseURLTests(unittest.SynchronousTestCase):
    def test_postgres_scheme_gets_psycopg_driver(self) -> None:
        self.assertTrue(database_url(None, "postgresql://u@h/db").startswith("postgresql+psycopg://"))
        self.assertTrue(database_url(None, "postgres://u:p@h:5/db").startswith("postgresql+psycopg://u:p@h:5/db"))

    def test_sqlite_in_data_dir(self) -> None:
        self.assertEqual(database_url("/d", None), "sqlite:////d/coderstack.db")


class SQLiteFileModeTests(unittest.TestCase):
    """The database, its WAL and its shared-memory file are 0600 whatever the directory allows."""

    async def test_files_are_private_in_an_open_directory(self) -> None:
        data = self.mktemp()
        os.makedirs(data)
        os.chmod(data, 0o777)
        old = os.umask(0o000)  # the most permissive umask a server could start with
        try:
            s = Store(database_url(data, None), reactor)
            self.addCleanup(s.stop)
            await s.migrate()
            await s.create_user("alice", "a@example.com", "hash")
        finally:
            os.umask(old)
        names = sorted(n for n in os.listdir(data) if n.startswith("coderstack.db"))
        self.assertEqual(names, ["coderstack.db", "coderstack.db-shm", "coderstack.db-wal"])
        for name in names:
            self.assertEqual(os.stat(os.path.join(data, name)).st_mode & 0o777, 0o600, name)

    async def test_an_existing_world_readable_database_is_made_private(self) -> None:
        data = self.mktemp()
        os.makedirs(data)
        path = os.path.join(data, "coderstack.db")
        s = Store(database_url(data, None), reactor)
        await s.migrate()
        s.stop()
        for name in (path, path + "-wal", path + "-shm"):
            if os.path.exists(name):
                os.chmod(name, 0o644)
        s = Store(database_url(data, None), reactor)
        self.addCleanup(s.stop)
        self.assertEqual(await s.count_users(), 0)
        for name in (path, path + "-wal", path + "-shm"):
            if os.path.exists(name):
                self.assertEqual(os.stat(name).st_mode & 0o777, 0o600, name)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
