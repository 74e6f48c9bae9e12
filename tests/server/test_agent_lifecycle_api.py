"""The lifecycle API in memory: the manifest from a build, what agents report, what users read."""

from __future__ import annotations

import json
import uuid

import treq
from twisted.internet import task
from twisted.trial import unittest

from coderstack.server import auth
from coderstack.server.agentspec import agent_spec
from coderstack.server.agentstore import MAX_LOGS_BYTES
from coderstack.server.records import AgentRecord
from tests.server.test_agentstore import built_agent
from tests.support.api import ACCESS_URL, Caller, make_deployment
from tests.support.waiting import wait_until

T = "2026-12-01T23:59:59.123456Z"


class LifecycleAPITests(unittest.TestCase):
    async def setUp(self):
        self.d, self.api = await make_deployment(self)
        self.c = Caller(self.api)
        self.owner = await self.c.owner()
        store = self.d.store
        alice = (await store.user_by_login("alice"))[0]
        template = await store.push_template("t", alice.id, {"main.tf": b""})
        self.ws = await store.create_templated_workspace(alice.id, "dev", template.id)
        self.agent_id = uuid.uuid4()
        self.built = built_agent(self.agent_id)
        self.token, token_hash = auth.new_agent_token()
        rec = AgentRecord(id=self.agent_id, name="main", token_hash=token_hash, os="linux",
                          arch="amd64", directory="/w", access_url=ACCESS_URL,
                          spec=agent_spec(self.built))
        items = [{"resource": "terraform_data.box", "resource_type": "terraform_data",
                  "hide": False, "icon": "", "daily_cost": 2, "items": [
                      {"key": "region", "value": "here", "sensitive": False, "is_null": False},
                      {"key": "password", "value": "hunter2", "sensitive": True,
                       "is_null": False}]}]
        await store.sync_agents(self.ws.id, [rec], fresh_start=True, resource_items=items)
        # A second user, who must not see alice's agent.
        await self.c.call("POST", "/api/v2/users", {"username": "bob", "email": "bob@example.com",
                                                    "password": "bobs password"}, token=self.owner)
        _, got = await self.c.call("POST", "/api/v2/users/login",
                                   {"email": "bob@example.com", "password": "bobs password"})
        self.bob = got["session_token"]

    def agent(self, method, path, body=None, **kw):
        return self.c.call(method, "/api/v2/workspaceagents/me/" + path, body, token=self.token, **kw)

    def user(self, path, token=None):
        return self.c.call("GET", f"/api/v2/workspaceagents/{self.agent_id}{path}",
                           token=token or self.owner)

    async def test_manifest_carries_the_build(self):
        code, m = await self.agent("GET", "manifest")
        self.assertEqual(code, 200)
        self.assertEqual((m["directory"], m["motd_path"]), ("/w", ""))
        self.assertEqual(m["environment_variables"], {"A": "1"})
        self.assertEqual([s["display_name"] for s in m["scripts"]], ["Startup Script", "cron job"])
        start = m["scripts"][0]
        self.assertEqual((start["run_on_start"], start["start_blocks_login"], start["cron"]),
                         (True, True, ""))
        self.assertEqual(m["scripts"][1]["cron"], "0 * * * * *")
        web, term = m["apps"]
        self.assertEqual((web["slug"], web["health"], web["healthcheck"]["threshold"]),
                         ("web", "initializing", 6))
        self.assertEqual((term["health"], term["healthcheck"]), ("disabled", None))
        self.assertEqual(m["metadata"], [{"key": "cpu", "display_name": "cpu",
                                          "script": "coder stat cpu", "interval": 10,
                                          "timeout": 1, "order": 0}])
        code, _ = await self.c.call("GET", "/api/v2/workspaceagents/me/manifest", token=self.owner)
        self.assertEqual(code, 401)

    async def test_lifecycle_reported_and_shown(self):
        self.assertEqual((await self.agent("POST", "report-lifecycle",
                                           {"state": "starting", "changed_at": T}))[0], 204)
        self.assertEqual((await self.agent("POST", "report-lifecycle", {"state": "ready"}))[0], 204)
        code, got = await self.user("")
        self.assertEqual(code, 200)
        self.assertEqual((got["lifecycle_state"], got["started_at"]), ("ready", T))
        self.assertIsNotNone(got["ready_at"])
        self.assertEqual(got["startup_script_behavior"], "blocking")
        self.assertEqual(got["connection_timeout_seconds"], 120)
        self.assertEqual({s["display_name"] for s in got["log_sources"]},
                         {"Startup Script", "cron job"})
        self.assertEqual([a["health"] for a in got["apps"]], ["initializing", "disabled"])
        self.assertTrue(got["display_apps"]["web_terminal"])
        # The workspace list shows it too.
        _, wss = await self.c.call("GET", "/api/v2/workspaces", token=self.owner)
        self.assertEqual(wss["workspaces"][0]["agents"][0]["lifecycle_state"], "ready")
        for bad in ({"state": "asleep"}, {"state": 5}, {"state": "ready", "changed_at": "noon"},
                    {"state": "ready", "changed_at": "2026-12-01T10:00:00"}):
            code, body = await self.agent("POST", "report-lifecycle", bad)
            self.assertEqual((code, set(body)), (400, {"message", "detail"}), bad)

    async def test_logs_round_trip_and_limit(self):
        source = self.built.scripts[0].id
        lines = [{"created_at": T, "output": "hello", "level": "info"},
                 {"created_at": T, "output": "oops", "level": "error"}]
        code, body = await self.agent("PATCH", "logs", {"log_source_id": source, "logs": lines})
        self.assertEqual((code, body), (200, {}))
        code, raw = await self.user("/logs")
        self.assertEqual(code, 200)
        got = [json.loads(x) for x in raw.splitlines()] if isinstance(raw, bytes) else [raw]
        self.assertEqual([(x["output"], x["level"], x["source_id"], x["created_at"]) for x in got],
                         [("hello", "info", source, T), ("oops", "error", source, T)])
        code, raw = await self.user(f"/logs?after={got[0]['id']}")
        self.assertEqual(raw["output"], "oops")  # one line parses as one JSON value
        # Bad batches are 400 and store nothing.
        for bad in ({"log_source_id": source, "logs": [{"created_at": T, "output": "x",
                                                        "level": "loud"}]},
                    {"log_source_id": "nope", "logs": []},
                    {"log_source_id": str(uuid.uuid4()), "logs": lines},
                    {"log_source_id": source, "logs": [{"output": "no time"}]},
                    {"log_source_id": source, "logs": [lines[0]] * 1001}):
            code, body = await self.agent("PATCH", "logs", bad)
            self.assertEqual((code, set(body)), (400, {"message", "detail"}))
        # The agent's own source.
        own = str(uuid.uuid4())
        code, _ = await self.agent("POST", "log-source", {"id": own, "display_name": "Agent"})
        self.assertEqual(code, 201)
        self.assertEqual((await self.agent("POST", "log-source", {"id": own,
                                                                  "display_name": "Agent"}))[0], 201)
        # 1 MiB in total per agent: the batch that passes it is refused whole.
        chunk = "x" * (1000 * 1000)
        code, _ = await self.agent("PATCH", "logs", {"log_source_id": own, "logs": [
            {"created_at": T, "output": chunk, "level": "info"}]})
        self.assertEqual(code, 200)
        code, body = await self.agent("PATCH", "logs", {"log_source_id": own, "logs": [
            {"created_at": T, "output": "y" * (MAX_LOGS_BYTES - 1000 * 1000), "level": "info"}]})
        self.assertEqual((code, body["message"]), (413, "logs limit exceeded"))
        code, got = await self.user("")
        self.assertTrue(got["logs_overflowed"])
        self.assertEqual(got["logs_length"], len("hellooops") + len(chunk))

    async def test_metadata_and_health(self):
        code, _ = await self.agent("POST", "metadata", {"metadata": [
            {"key": "cpu", "value": "12%", "error": "", "collected_at": T},
            {"key": "unknown", "value": "x", "error": "", "collected_at": T}]})
        self.assertEqual(code, 204)
        code, got = await self.user("/metadata")
        self.assertEqual(code, 200)
        (item,) = got
        self.assertEqual(item["description"]["script"], "coder stat cpu")
        self.assertEqual((item["result"]["value"], item["result"]["collected_at"]), ("12%", T))
        self.assertGreaterEqual(item["result"]["age"], 0)
        code, body = await self.agent("POST", "metadata", {"metadata": [
            {"key": "cpu", "value": "v" * (64 * 1024 + 1), "error": "", "collected_at": T}]})
        self.assertEqual(code, 400)
        web, term = (a.id for a in self.built.apps)
        code, body = await self.agent("POST", "app-health", {"healths": {web: "healthy"}})
        self.assertEqual((code, body), (200, {}))
        _, got = await self.user("")
        self.assertEqual(got["apps"][0]["health"], "healthy")
        for bad in ({"healths": {web: "fine"}}, {"healths": {term: "healthy"}},
                    {"healths": {"x": "healthy"}}, {"healths": []}):
            code, body = await self.agent("POST", "app-health", bad)
            self.assertEqual((code, set(body)), (400, {"message", "detail"}), bad)

    async def test_members_see_only_their_agents(self):
        for path in ("", "/logs", "/metadata", "/watch-metadata"):
            code, body = await self.user(path, token=self.bob)
            self.assertEqual((code, body["message"]), (404, "Agent not found."), path)
            code, _ = await self.c.call("GET", f"/api/v2/workspaceagents/{self.agent_id}{path}")
            self.assertEqual(code, 401, path)
        code, _ = await self.c.call("GET", f"/api/v2/workspaces/{self.ws.id}/resources",
                                    token=self.bob)
        self.assertEqual(code, 404)
        code, _ = await self.user("/logs?after=x")
        self.assertEqual(code, 400)

    async def test_resource_metadata_hides_sensitive_values(self):
        code, got = await self.c.call("GET", f"/api/v2/workspaces/{self.ws.id}/resources",
                                      token=self.owner)
        self.assertEqual(code, 200)
        (res,) = got["resources"]
        self.assertEqual((res["name"], res["type"], res["daily_cost"]),
                         ("terraform_data.box", "terraform_data", 2))
        self.assertEqual([(m["key"], m["value"], m["sensitive"]) for m in res["metadata"]],
                         [("region", "here", False), ("password", "", True)])
        self.assertNotIn("hunter2", json.dumps(got))

    async def stream(self, path: str):
        """Open a streaming GET; returns (chunks received so far, a function that closes it)."""
        pump = task.LoopingCall(self.c.stub.flush)
        pump.start(0.001)
        self.addCleanup(lambda: pump.running and pump.stop())
        resp = await self.c.stub.request(
            "GET", ACCESS_URL + f"/api/v2/workspaceagents/{self.agent_id}{path}",
            headers={"Coder-Session-Token": self.owner})
        self.assertEqual(resp.code, 200)
        chunks: list[bytes] = []
        done = treq.collect(resp, chunks.append)
        done.addErrback(lambda _: None)

        def close() -> None:  # the client goes away: drop its in-memory connections
            for p in list(self.c.stub._agent._pumps):
                p.clientIO.loseConnection()
            self.c.stub.flush()

        return chunks, close

    async def test_follow_logs_streams_new_lines(self):
        source = self.built.scripts[0].id
        await self.agent("PATCH", "logs", {"log_source_id": source, "logs": [
            {"created_at": T, "output": "before", "level": "info"}]})
        chunks, close = await self.stream("/logs?follow=true")
        await wait_until(lambda: b"before" in b"".join(chunks), "the first line")
        await self.agent("PATCH", "logs", {"log_source_id": source, "logs": [
            {"created_at": T, "output": "after", "level": "info"}]})
        await wait_until(lambda: b"after" in b"".join(chunks), "the followed line")
        outputs = [json.loads(x)["output"] for x in b"".join(chunks).splitlines()]
        self.assertEqual(outputs, ["before", "after"])
        close()
        await wait_until(lambda: self.api.agent_events.listening(self.agent_id) == 0,
                         "the follower to go")

    async def test_watch_metadata_sends_changes(self):
        chunks, close = await self.stream("/watch-metadata")
        await wait_until(lambda: b"event: data" in b"".join(chunks), "the first event")
        await self.agent("POST", "metadata", {"metadata": [
            {"key": "cpu", "value": "42%", "error": "", "collected_at": T}]})
        await wait_until(lambda: b"42%" in b"".join(chunks), "the changed value")
        events = [e for e in b"".join(chunks).split(b"\n\n") if e.startswith(b"event: data")]
        self.assertEqual(len(events), 2)
        last = json.loads(events[-1].split(b"data: ", 1)[1])
        self.assertEqual(last[0]["result"]["value"], "42%")
        close()
        await wait_until(lambda: self.api.agent_events.listening(self.agent_id) == 0,
                         "the watcher to go")
