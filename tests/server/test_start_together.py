"""Replicas starting together on one empty PostgreSQL database: the migrations take turns (an
advisory lock) and every replica gets the same DERP mesh key."""

from __future__ import annotations

import threading
from typing import Any

import sqlalchemy as sa
from twisted.internet import defer
from twisted.trial import unittest

from coderstack.server import schema
from coderstack.server.appstore import AppStore
from coderstack.server.database import database_url
from coderstack.server.meshkey import derp_mesh_key
from coderstack.server.schema import MIGRATIONS
from coderstack.server.store import Store
from tests.support import postgres


class StartTogetherTests(unittest.TestCase):
    def setUp(self) -> None:
        postgres.require()

    async def store(self, url: str | None = None) -> Store:
        store: Store = await postgres.migrated_store(self, url)
        return store

    def test_replicas_migrating_one_empty_database_at_once_all_succeed(self) -> None:
        url = database_url(None, postgres.cluster().new_database())
        n = 6
        engines = [sa.create_engine(url) for _ in range(n)]
        barrier = threading.Barrier(n)
        results: list[Any] = [None] * n

        def run(i: int) -> None:
            barrier.wait()
            try:
                results[i] = schema.migrate(engines[i])
            except Exception as err:  # reported below
                results[i] = err

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        try:
            self.assertEqual(results, [MIGRATIONS[-1][0]] * n)
            with engines[0].connect() as conn:
                versions = [r.version for r in conn.execute(
                    sa.select(schema.schema_migrations.c.version).order_by("version"))]
            self.assertEqual(versions, [v for v, _ in MIGRATIONS])
        finally:
            for e in engines:
                e.dispose()

    async def test_replicas_starting_together_agree_on_one_mesh_key(self) -> None:
        url = postgres.cluster().new_database()
        stores = [await self.store(url) for _ in range(4)]
        keys = await defer.gatherResults([defer.Deferred.fromCoroutine(derp_mesh_key(AppStore(s)))
                                          for s in stores for _ in range(3)])
        self.assertEqual(len(set(keys)), 1)
        (key,) = set(keys)
        self.assertEqual(len(key), 32)
        self.assertEqual(await derp_mesh_key(AppStore(stores[0])), key)
        self.assertNotEqual(await derp_mesh_key(AppStore(await self.store())), key)
