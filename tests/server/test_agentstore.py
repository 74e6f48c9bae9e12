"""The agent lifecycle tables (migration 3), on SQLite and on a real PostgreSQL cluster."""

from __future__ import annotations

import uuid
from datetime import timedelta

from twisted.internet import reactor
from twisted.trial import unittest

from coderstack.server import auth
from coderstack.server.agentspec import agent_spec
from coderstack.server.agentstore import (
    MAX_LOGS_BYTES,
    AgentStateStore,
    LogsOverflow,
    MetadataValue,
    UnknownApp,
)
from coderstack.server.database import database_url
from coderstack.server.records import AgentRecord, now
from coderstack.server.store import Store
from coderstack.server.tfstate import Agent as BuiltAgent
from coderstack.server.tfstate import App, Healthcheck, MetadataItem, Script
from tests.support import postgres
from tests.support.tempdirs import made_dir


def built_agent(agent_id: uuid.UUID) -> BuiltAgent:
    return BuiltAgent(
        id=str(agent_id), name="main", token="t", os="linux", arch="amd64", dir="/w",
        env={"A": "1"}, startup_script="echo hi", startup_script_behavior="blocking",
        metadata=(MetadataItem(key="cpu", script="coder stat cpu", interval=10, timeout=1),),
        apps=(
            App(id=str(uuid.uuid4()), slug="web", agent_id=str(agent_id), url="http://localhost:1",
                healthcheck=Healthcheck("http://localhost:1/h", 5, 6)),
            App(id=str(uuid.uuid4()), slug="term", agent_id=str(agent_id), command="bash"),
        ),
        scripts=(Script(id=str(uuid.uuid4()), display_name="cron job", script="date",
                        cron="0 * * * * *"),),
    )


class AgentStoreTests:
    def make_url(self) -> str:
        raise NotImplementedError

    async def setup(self, fresh_start: bool = True):
        s = Store(self.make_url(), reactor)
        self.addCleanup(s.stop)
        await s.migrate()
        u = await s.create_user("alice", "a@example.com", "hash")
        t = await s.push_template("local", u.id, {"main.tf": b""})
        ws = await s.create_templated_workspace(u.id, "dev", t.id)
        agent_id = uuid.uuid4()
        built = built_agent(agent_id)
        rec = AgentRecord(id=agent_id, name="main", token_hash=auth.hash_agent_token("x" * 36),
                          os="linux", arch="amd64", directory="/w", access_url="http://a",
                          spec=agent_spec(built))
        items = [{"resource": "terraform_data.box", "items": [{"key": "k", "value": "v"}]}]
        await s.sync_agents(ws.id, [rec], fresh_start=fresh_start, resource_items=items)
        return s, AgentStateStore(s), ws, rec, built

    async def test_spec_lifecycle_and_sources(self) -> None:
        s, st, ws, rec, built = await self.setup()
        state = await st.state(rec.id)
        self.assertEqual(state.lifecycle_state, "created")
        self.assertEqual(state.spec["environment_variables"], {"A": "1"})
        self.assertEqual([sc["display_name"] for sc in state.spec["scripts"]],
                         ["Startup Script", "cron job"])
        self.assertTrue(state.spec["scripts"][0]["start_blocks_login"])
        self.assertEqual([a["health"] for a in state.spec["apps"]], ["initializing", "disabled"])
        self.assertEqual({x["display_name"] for x in state.log_sources},
                         {"Startup Script", "cron job"})
        t0 = now()
        await st.report_lifecycle(rec.id, "starting", t0)
        await st.report_lifecycle(rec.id, "starting", t0 + timedelta(seconds=5))
        await st.report_lifecycle(rec.id, "start_error", t0 + timedelta(seconds=6))
        await st.report_lifecycle(rec.id, "ready", t0 + timedelta(seconds=9))
        state = await st.state(rec.id)
        self.assertEqual(state.lifecycle_state, "ready")
        self.assertEqual(state.started_at, t0)  # the first starting
        self.assertEqual(state.ready_at, t0 + timedelta(seconds=6))  # the first end of a start
        agent, _ws = await s.agent(rec.id)
        self.assertEqual((agent.lifecycle_state, agent.started_at), ("ready", t0))
        with self.assertRaises(ValueError):
            await st.report_lifecycle(rec.id, "sleeping", t0)
        self.assertEqual(await st.resource_metadata(ws.id),
                         [{"resource": "terraform_data.box", "items": [{"key": "k", "value": "v"}]}])

    async def test_logs_bounded_per_agent(self) -> None:
        _s, st, _ws, rec, built = await self.setup()
        source = uuid.UUID(built.scripts[0].id)
        t = now()
        await st.append_logs(rec.id, source, [(t, "one", "info"), (t, "two", "error")])
        got = await st.logs(rec.id)
        self.assertEqual([(x.output, x.level, x.source_id) for x in got],
                         [("one", "info", source), ("two", "error", source)])
        self.assertEqual([x.output for x in await st.logs(rec.id, after=got[0].id)], ["two"])
        with self.assertRaises(LookupError):
            await st.append_logs(rec.id, uuid.uuid4(), [(t, "x", "info")])
        # Up to the bound exactly, then a batch that passes it stores nothing.
        rest = MAX_LOGS_BYTES - len("onetwo")
        await st.append_logs(rec.id, source, [(t, "a" * rest, "info")])
        with self.assertRaises(LogsOverflow):
            await st.append_logs(rec.id, source, [(t, "b", "info")])
        state = await st.state(rec.id)
        self.assertEqual((state.logs_length, state.logs_overflowed), (MAX_LOGS_BYTES, True))
        self.assertEqual(len(await st.logs(rec.id)), 3)
        # The agent's own source, registered twice (idempotent), is still refused: overflowed.
        own = uuid.uuid4()
        await st.register_log_source(rec.id, own, "Agent", "")
        await st.register_log_source(rec.id, own, "Agent", "")
        with self.assertRaises(LogsOverflow):
            await st.append_logs(rec.id, own, [(t, "b", "info")])

    async def test_metadata_and_app_health(self) -> None:
        _s, st, _ws, rec, built = await self.setup()
        t = now()
        stored = await st.set_metadata(rec.id, [
            MetadataValue("cpu", "12%", "", t), MetadataValue("nope", "x", "", t)])
        self.assertEqual(stored, 1)
        await st.set_metadata(rec.id, [MetadataValue("cpu", "", "timeout", t)])
        defs, latest = await st.metadata(rec.id)
        self.assertEqual([d["key"] for d in defs], ["cpu"])
        self.assertEqual(list(latest), ["cpu"])
        self.assertEqual((latest["cpu"].value, latest["cpu"].error), ("", "timeout"))
        web, term = (uuid.UUID(a.id) for a in built.apps)
        await st.set_app_health(rec.id, {web: "healthy"})
        with self.assertRaises(UnknownApp):
            await st.set_app_health(rec.id, {term: "healthy"})
        state = await st.state(rec.id)
        self.assertEqual([a["health"] for a in state.spec["apps"]], ["healthy", "disabled"])

    async def test_a_new_start_build_forgets_the_last_run(self) -> None:
        s, st, ws, rec, built = await self.setup()
        t = now()
        await st.report_lifecycle(rec.id, "ready", t)
        await st.append_logs(rec.id, uuid.UUID(built.scripts[0].id), [(t, "x", "info")])
        await s.sync_agents(ws.id, [rec], fresh_start=False)
        self.assertEqual((await st.state(rec.id)).lifecycle_state, "ready")
        await s.sync_agents(ws.id, [rec], fresh_start=True)
        state = await st.state(rec.id)
        self.assertEqual((state.lifecycle_state, state.logs_length), ("created", 0))
        self.assertEqual(await st.logs(rec.id), [])
        # The workspace's deletion takes every row with it.
        self.assertTrue(await s.delete_workspace(ws.id))
        self.assertEqual(await st.resource_metadata(ws.id), [])


class SQLiteAgentStoreTests(AgentStoreTests, unittest.TestCase):
    def make_url(self) -> str:
        return database_url(made_dir(self), None)


class PostgresAgentStoreTests(AgentStoreTests, unittest.TestCase):
    def setUp(self) -> None:
        postgres.require()
        self.cluster = postgres.cluster()

    def make_url(self) -> str:
        return database_url(None, self.cluster.new_database())
