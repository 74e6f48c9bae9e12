"""Shared ports, templates' caps on them and the deployment secret, on SQLite and PostgreSQL."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial import unittest

from coderstack.server.appstore import AppStore, PortShare
from coderstack.server.database import database_url
from coderstack.server.store import Store
from tests.support import postgres
from tests.support.tempdirs import made_dir


class AppStoreTests:
    def make_url(self) -> str:
        raise NotImplementedError

    async def stores(self) -> tuple[Store, AppStore]:
        s = Store(self.make_url(), reactor)
        self.addCleanup(s.stop)  # type: ignore[attr-defined]
        await s.migrate()
        return s, AppStore(s)

    async def test_port_shares_round_trip(self) -> None:
        s, apps = await self.stores()
        bob = await s.create_user("bob", "b@example.com", "h")
        ws = await s.create_workspace(bob.id, "box", b"\0" * 32)
        self.assertIsNone(await apps.port_share(ws.id, "main", 8080))
        await apps.upsert_port_share(PortShare(ws.id, "main", 8080, "authenticated", "http"))
        await apps.upsert_port_share(PortShare(ws.id, "main", 8080, "public", "https"))  # changes it
        await apps.upsert_port_share(PortShare(ws.id, "main", 3000, "owner", "http"))
        got = await apps.port_share(ws.id, "main", 8080)
        self.assertEqual(got, PortShare(ws.id, "main", 8080, "public", "https"))
        self.assertEqual([x.port for x in await apps.port_shares(ws.id)], [3000, 8080])
        self.assertTrue(await apps.delete_port_share(ws.id, "main", 3000))
        self.assertFalse(await apps.delete_port_share(ws.id, "main", 3000))
        await s.delete_workspace(ws.id)
        self.assertEqual(await apps.port_shares(ws.id), [])

    async def test_template_cap_narrows_existing_shares(self) -> None:
        s, apps = await self.stores()
        alice = await s.create_user("alice", "a@example.com", "h", roles=("owner",))
        template = await s.push_template("t", alice.id, {"main.tf": b""})
        ws = await s.create_templated_workspace(alice.id, "box", template.id)
        self.assertEqual(await apps.max_port_share_level(template.id), "public")
        self.assertEqual(await apps.max_port_share_level(None), "public")
        await apps.upsert_port_share(PortShare(ws.id, "main", 8080, "public", "http"))
        await apps.upsert_port_share(PortShare(ws.id, "main", 8081, "owner", "http"))
        await apps.set_max_port_share_level(template.id, "authenticated")
        self.assertEqual(await apps.max_port_share_level(template.id), "authenticated")
        levels = {x.port: x.share_level for x in await apps.port_shares(ws.id)}
        self.assertEqual(levels, {8080: "authenticated", 8081: "owner"})

    async def test_deployment_secret_is_made_once(self) -> None:
        _s, apps = await self.stores()
        first = await apps.deployment_secret("k")
        self.assertEqual(len(first), 32)
        self.assertEqual(await apps.deployment_secret("k"), first)
        self.assertNotEqual(await apps.deployment_secret("other"), first)


class SQLiteAppStoreTests(AppStoreTests, unittest.TestCase):
    def make_url(self) -> str:
        return database_url(made_dir(self), None)


class PostgresAppStoreTests(AppStoreTests, unittest.TestCase):
    def setUp(self) -> None:
        postgres.require()
        self.cluster = postgres.cluster()

    def make_url(self) -> str:
        return database_url(None, self.cluster.new_database())
