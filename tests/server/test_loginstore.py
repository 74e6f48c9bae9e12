"""Login failure counts shared through the database: two limiters, as two replicas would run them,
on one database (SQLite file and real PostgreSQL) see each other's failures and logins."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from treq.testing import StubTreq
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from coderstack.server.api import API
from coderstack.server.appstore import AppStore
from coderstack.server.database import database_url
from coderstack.server.deployment import Deployment
from coderstack.server.derpsetup import build_derp_map
from coderstack.server.loginlimit import LoginAttempt, LoginLimiter, Policy, Refused
from coderstack.server.loginstore import (
    LOGIN_KEY_NAME,
    PRUNE_EVERY,
    TRUST_REFRESH,
    LoginFailureTable,
    begin_login,
    end_login,
)
from coderstack.server.schema import login_failures
from coderstack.server.store import Store
from tests.support import postgres
from tests.support.api import ACCESS_URL, DEFAULT_CFG
from tests.support.tempdirs import made_dir

SOURCE = Policy(free=3, base=1.0, cap=8.0, forget=100.0)
ACCOUNT = Policy(free=2, base=2.0, cap=60.0, forget=100.0)


class Replica:
    """One replica's share of the login limits: its own connection pool and its own limiter."""

    def __init__(self, store: Store, table: LoginFailureTable, limiter: LoginLimiter) -> None:
        self.store, self.table, self.limiter = store, table, limiter

    async def begin(self, login: str, source: str) -> LoginAttempt | Refused:
        return await begin_login(self.limiter, self.table, login, source)

    async def fail(self, login: str, source: str) -> None:
        attempt = await self.begin(login, source)
        assert isinstance(attempt, LoginAttempt), attempt
        await end_login(self.limiter, self.table, attempt, False)

    async def succeed(self, login: str, source: str) -> None:
        attempt = await self.begin(login, source)
        assert isinstance(attempt, LoginAttempt), attempt
        await end_login(self.limiter, self.table, attempt, True)

    def rows(self) -> defer.Deferred[list[Any]]:
        return self.store.transact(lambda c: list(c.execute(sa.select(login_failures))))


class SharedCountsTests:
    """Mixin: ``make_url()`` names a fresh database; ``replicas()`` opens it twice."""

    def make_url(self) -> str:
        raise NotImplementedError

    async def replicas(self, n: int = 2, **limiter: Any) -> list[Replica]:
        self.clock = task.Clock()
        self.clock.advance(1_000_000.0)
        url = self.make_url()
        out = []
        for _ in range(n):
            store = Store(url, reactor)
            self.addCleanup(store.stop)  # type: ignore[attr-defined]
            await store.migrate()
            secret = await AppStore(store).deployment_secret(LOGIN_KEY_NAME)
            out.append(Replica(store, LoginFailureTable(store, secret),
                               LoginLimiter(self.clock, SOURCE, ACCOUNT, **limiter)))
        return out

    async def test_failures_on_one_replica_refuse_on_the_other(self) -> None:
        a, b = await self.replicas()
        for i in range(3):  # the source's free failures, spread over both replicas
            await (a if i % 2 else b).fail(f"user{i}", "10.0.0.1")
        await a.fail("user3", "10.0.0.1")
        refused = await b.begin("user4", "10.0.0.1")
        self.assertEqual(refused, Refused(1.0, "source"))  # type: ignore[attr-defined]
        self.clock.advance(1.0)
        await b.fail("user4", "10.0.0.1")
        refused = await a.begin("user5", "10.0.0.1")
        self.assertEqual(refused, Refused(2.0, "source"))  # type: ignore[attr-defined]
        # Another source is not limited.
        self.assertIsInstance(await a.begin("user5", "10.0.0.2"), LoginAttempt)  # type: ignore[attr-defined]

    async def test_account_limit_spans_sources_and_replicas(self) -> None:
        a, b = await self.replicas()
        for i in range(3):
            await (a, b)[i % 2].fail("Victim", f"10.0.1.{i}")
        refused = await b.begin("victim", "10.0.2.1")
        self.assertEqual(refused, Refused(2.0, "account"))  # type: ignore[attr-defined]

    async def test_a_login_on_one_replica_trusts_its_source_on_the_other(self) -> None:
        a, b = await self.replicas()
        await a.fail("owner", "10.0.0.9")
        await a.succeed("owner", "10.0.0.9")
        for i in range(2):  # guesses against the account from elsewhere: with the first, 3 of 2 free
            await b.fail("owner", f"10.0.3.{i}")
        self.assertEqual((await a.begin("owner", "10.0.3.9")).reason, "account")  # type: ignore[union-attr]
        self.assertIsInstance(await b.begin("owner", "10.0.0.9"), LoginAttempt)  # type: ignore[attr-defined]

    async def test_success_resets_the_source_everywhere(self) -> None:
        a, b = await self.replicas()
        for i in range(3):
            await a.fail(f"user{i}", "10.0.0.1")
        await b.succeed("someone", "10.0.0.1")
        for i in range(3):  # three more free failures, not a delay
            await b.fail(f"user{i}", "10.0.0.1")
        self.assertIsInstance(await a.begin("user9", "10.0.0.1"), LoginAttempt)  # type: ignore[attr-defined]

    async def test_an_ordinary_login_writes_nothing(self) -> None:
        a, b = await self.replicas()
        await a.succeed("owner", "10.0.0.9")  # first login from here: trusted from now
        first = self.clock.seconds()
        self.clock.advance(60.0)
        await b.succeed("owner", "10.0.0.9")  # no failures to reset, trust fresh: no write
        self.assertEqual([r.last_at for r in await a.rows()], [first])  # type: ignore[attr-defined]
        self.clock.advance(TRUST_REFRESH)
        await b.succeed("owner", "10.0.0.9")  # trust renewed
        self.assertEqual([r.last_at for r in await a.rows()], [self.clock.seconds()])  # type: ignore[attr-defined]

    async def test_concurrent_failures_on_both_replicas_all_count(self) -> None:
        a, b = await self.replicas(max_in_flight=100)
        await defer.gatherResults([defer.Deferred.fromCoroutine(r.fail("victim", f"10.9.0.{i}"))
                                   for i in range(10) for r in (a, b)])
        rows = {r.scope: r.failures for r in await a.rows()}
        self.assertEqual(rows["account"], 20)  # type: ignore[attr-defined]

    async def test_forgotten_counts_start_over(self) -> None:
        a, b = await self.replicas()
        for i in range(4):
            await a.fail(f"user{i}", "10.0.0.1")
        self.clock.advance(SOURCE.forget)
        self.assertIsInstance(await b.begin("user0", "10.0.0.1"), LoginAttempt)  # type: ignore[attr-defined]
        await b.fail("user0", "10.0.0.1")
        source_rows = [r for r in await a.rows() if r.scope == "source"]
        self.assertEqual([r.failures for r in source_rows], [1])  # type: ignore[attr-defined]

    async def test_the_table_holds_no_names_or_addresses_and_forgotten_rows_go(self) -> None:
        a, _ = await self.replicas()
        await a.fail("alice@example.com", "10.0.0.1")
        await a.succeed("bob@example.com", "10.0.0.2")
        dump = repr(await a.rows())
        for clear in ("alice", "bob", "10.0.0"):
            self.assertNotIn(clear, dump)  # type: ignore[attr-defined]
        self.clock.advance(max(PRUNE_EVERY, SOURCE.forget, ACCOUNT.forget))
        await a.fail("carol", "10.0.0.3")  # this failure's transaction sweeps the stale ones
        scopes = sorted(r.scope for r in await a.rows())
        self.assertEqual(scopes, ["account", "source", "trust"])  # type: ignore[attr-defined]

    async def test_login_api_on_another_replica_answers_429_with_retry_after(self) -> None:
        """The JSON login of two deployments on one database, as two replicas serve it."""
        url = self.make_url()
        clock = task.Clock()
        clock.advance(1_000_000.0)
        apis = []
        for _ in range(2):
            store = Store(url, reactor)
            self.addCleanup(store.stop)  # type: ignore[attr-defined]
            await store.migrate()
            d = Deployment(reactor, store, ACCESS_URL, await build_derp_map(dict(DEFAULT_CFG), reactor))
            self.addCleanup(d.coordinator.close)  # type: ignore[attr-defined]
            d.logins = LoginLimiter(clock)
            d.login_table = LoginFailureTable(store, await AppStore(store).deployment_secret(LOGIN_KEY_NAME))
            apis.append(API(d))

        async def login(api: API, email: str) -> tuple[int, Any]:
            stub = StubTreq(api.app.resource())
            pump = task.LoopingCall(stub.flush)
            pump.start(0.001)
            try:
                resp = await stub.post(ACCESS_URL + "/api/v2/users/login",
                                       data=json.dumps({"email": email, "password": "wrong password"}).encode())
                await stub.content(resp)
            finally:
                pump.stop()
            return resp.code, resp.headers.getRawHeaders("Retry-After")

        codes = [(await login(apis[i % 2], f"ghost{i}@example.com"))[0] for i in range(11)]
        self.assertEqual(codes, [401] * 11)  # type: ignore[attr-defined]
        code, retry_after = await login(apis[1], "ghost@example.com")
        self.assertEqual(code, 429)  # type: ignore[attr-defined]
        self.assertEqual(retry_after, ["1"])  # type: ignore[attr-defined]
        clock.advance(1.0)
        self.assertEqual((await login(apis[0], "ghost@example.com"))[0], 401)  # type: ignore[attr-defined]


class SQLiteSharedCountsTests(SharedCountsTests, unittest.TestCase):
    """The same queries on SQLite (two connections to one file), which the server itself does
    not use for this (see service.py), so that both dialects' upserts are checked."""

    def make_url(self) -> str:
        return database_url(made_dir(self), None)


class PostgresSharedCountsTests(SharedCountsTests, unittest.TestCase):
    def setUp(self) -> None:
        postgres.require()
        self.cluster = postgres.cluster()

    def make_url(self) -> str:
        return database_url(None, self.cluster.new_database())
