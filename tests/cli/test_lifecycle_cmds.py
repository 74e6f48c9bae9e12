"""``list``/``show`` lifecycle parts, ``logs`` and ``ssh --wait``, against an in-process server.

The workspace's agent is described to the store as a build would (its spec), and the test
speaks the agent's side of the API with the agent token.
"""

from __future__ import annotations

import io
import json
import uuid
from datetime import UTC, datetime, timedelta

from twisted.internet import defer, reactor
from twisted.trial import unittest

from coderstack.cli import agentwait
from coderstack.cli.main import run as cli_run
from coderstack.provider.agent import DISPLAY_APPS_DEFAULTS
from coderstack.sdk import Client
from coderstack.server import auth
from coderstack.server.agentspec import agent_spec
from coderstack.server.records import AgentRecord
from coderstack.server.tfstate import Agent, App, Healthcheck, MetadataItem, Script
from tests.support.inprocess import CLI, start_server
from tests.support.waiting import wait_until

OWNER = ("--first-user-username", "alice", "--first-user-email", "alice@example.com",
         "--first-user-password", "correct horse battery")


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LifecycleCommandTests(unittest.TestCase):
    async def setUp(self) -> None:
        self.server, self.url = await start_server(self)
        self.cli = CLI(self)
        code, _, err = await self.cli("login", self.url, *OWNER)
        self.assertEqual(code, 0, err)
        self.patch(agentwait, "POLL_SECONDS", 0.05)

    async def make_workspace(self, blocking: bool = True) -> None:
        store = self.server.deployment.store
        alice = (await store.user_by_login("alice"))[0]
        template = await store.push_template("t", alice.id, {"main.tf": b""})
        ws = await store.create_templated_workspace(alice.id, "dev", template.id)
        self.agent_id = uuid.uuid4()
        aid = str(self.agent_id)
        self.built = Agent(
            id=aid, name="main", token="t", os="linux", arch="amd64",
            startup_script="echo hi", startup_script_behavior="blocking" if blocking else "non-blocking",
            troubleshooting_url="https://docs.example.com/trouble",
            display_apps=dict(DISPLAY_APPS_DEFAULTS),
            metadata=(MetadataItem(key="cpu", script="coder stat cpu", interval=10,
                                   display_name="CPU Usage"),
                      MetadataItem(key="disk", script="coder stat disk", interval=60,
                                   display_name="Disk")),
            apps=(App(id=str(uuid.uuid4()), slug="code", agent_id=aid,
                      display_name="code-server", url="http://localhost:13337/?folder=/w",
                      healthcheck=Healthcheck("http://localhost:13337/healthz", 5, 6)),),
            scripts=(Script(id=str(uuid.uuid4()), display_name="Backup", script="b",
                            cron="0 */5 * * * *"),),
        )
        self.token, token_hash = auth.new_agent_token()
        rec = AgentRecord(id=self.agent_id, name="main", token_hash=token_hash, os="linux",
                          arch="amd64", directory="", access_url=self.url,
                          spec=agent_spec(self.built))
        items = [{"resource": "terraform_data.box", "resource_type": "terraform_data",
                  "hide": False, "icon": "", "daily_cost": 3, "items": [
                      {"key": "region", "value": "local", "sensitive": False, "is_null": False},
                      {"key": "password", "value": "hunter2", "sensitive": True,
                       "is_null": False}]}]
        await store.sync_agents(ws.id, [rec], fresh_start=True, resource_items=items)
        self.agent = Client(reactor, self.url, self.token)
        self.addCleanup(self.agent.close)

    async def report(self, state: str) -> None:
        await self.agent.request("POST", "/api/v2/workspaceagents/me/report-lifecycle",
                                 {"state": state, "changed_at": rfc3339(datetime.now(UTC))},
                                 ok=(204,))

    async def log(self, *lines: str, source: str | None = None) -> None:
        from coderstack.server.agentspec import STARTUP_SCRIPT, script_source_id

        sid = source or script_source_id(str(self.agent_id), STARTUP_SCRIPT)
        t = rfc3339(datetime.now(UTC))
        await self.agent.request("PATCH", "/api/v2/workspaceagents/me/logs", {
            "log_source_id": sid,
            "logs": [{"created_at": t, "output": x, "level": "info"} for x in lines]})

    async def test_list_and_show_tell_what_the_workspace_page_would(self) -> None:
        await self.make_workspace()
        await self.report("starting")
        await self.log("installing code-server", "done")
        await self.report("ready")
        old = rfc3339(datetime.now(UTC) - timedelta(minutes=2))
        await self.agent.request("POST", "/api/v2/workspaceagents/me/metadata", {"metadata": [
            {"key": "cpu", "value": "12%", "error": "", "collected_at": old},
            {"key": "disk", "value": "", "error": "df: not found", "collected_at": old}]},
            ok=(204,))
        await self.agent.request("POST", "/api/v2/workspaceagents/me/app-health",
                                 {"healths": {self.built.apps[0].id: "unhealthy"}})
        code, out, err = await self.cli("list")
        self.assertEqual(code, 0, err)
        header, row = out.splitlines()
        self.assertEqual(header.split()[3:5], ["LIFECYCLE", "HEALTHY"])
        self.assertEqual(row.split()[3:5], ["ready", "false"])  # not connected, app unhealthy
        code, out, err = await self.cli("show", "dev")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"lifecycle +ready \(start took \d+\.\ds\)")
        self.assertIn("troubleshooting https://docs.example.com/trouble", out)
        self.assertRegex(out, r"CPU Usage +12% +2m ago")
        self.assertRegex(out, r"Disk +error: df: not found +2m ago")
        # The app as a browser opens it: through the server, a path app of the workspace.
        self.assertRegex(out, r"code-server +http://127\.0\.0\.1:\d+/@alice/dev\.main/apps/code/ +unhealthy")
        self.assertIn("Startup Script (on start, blocks login)", out)
        self.assertIn("Backup (cron 0 */5 * * * *)", out)
        self.assertIn("[Startup Script] installing code-server", out)
        self.assertIn("resource terraform_data.box  (daily cost 3)", out)
        self.assertRegex(out, r"region +local")
        self.assertRegex(out, r"password +\(sensitive\)")
        self.assertNotIn("hunter2", out)

    async def test_logs_text_json_and_follow(self) -> None:
        await self.make_workspace()
        await self.log("one", "two")
        code, out, err = await self.cli("logs", "dev")
        self.assertEqual(code, 0, err)
        self.assertEqual([line.split(" ", 1)[1] for line in out.splitlines()],
                         ["[Startup Script] one", "[Startup Script] two"])
        code, out, err = await self.cli("logs", "dev", "--output", "json")
        got = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([(x["output"], x["source_name"]) for x in got],
                         [("one", "Startup Script"), ("two", "Startup Script")])
        code, out, err = await self.cli("logs", "dev", "--output", "xml")
        self.assertEqual(code, 2)
        self.assertIn("--output", err)
        # --follow prints what comes later, until interrupted.
        stdout = io.StringIO()
        following = defer.ensureDeferred(cli_run(
            reactor, ["logs", "dev", "--follow"], environ=self.cli.environ, stdout=stdout,
            stderr=io.StringIO(), stdin=io.StringIO()))
        await wait_until(lambda: "two" in stdout.getvalue(), "the old lines")
        await self.log("three")
        await wait_until(lambda: "three" in stdout.getvalue(), "the followed line")
        following.cancel()
        await following.addErrback(lambda _: None)

    async def ssh(self, *flags: str) -> tuple[defer.Deferred, io.StringIO]:
        stderr = io.StringIO()
        d = defer.ensureDeferred(cli_run(
            reactor, ["ssh", "dev", *flags, "--", "true"], environ=self.cli.environ,
            stdout=io.StringIO(), stderr=stderr, stdin=io.StringIO()))
        return d, stderr

    async def test_ssh_wait_yes_prints_logs_until_ready(self) -> None:
        await self.make_workspace(blocking=False)
        await self.report("starting")
        await self.log("step 1")
        d, stderr = await self.ssh("--wait=yes")
        await wait_until(lambda: "step 1" in stderr.getvalue(), "the waiting output")
        self.assertFalse(d.called)  # still starting: still waiting
        await self.log("step 2")
        await self.report("ready")
        code = await d
        err = stderr.getvalue()
        self.assertIn("Waiting for the startup scripts of workspace 'dev'", err)
        self.assertLess(err.index("step 1"), err.index("step 2"))
        self.assertNotIn("Warning", err)
        # Then it connects: this agent never did, which is the one-line error after the wait.
        self.assertEqual(code, 1)
        self.assertIn("is connecting", err.splitlines()[-1])

    async def test_ssh_wait_auto_waits_only_for_scripts_that_block_login(self) -> None:
        await self.make_workspace(blocking=False)
        await self.report("starting")
        d, stderr = await self.ssh()
        self.assertEqual(await d, 1)
        self.assertNotIn("Waiting", stderr.getvalue())
        d, stderr = await self.ssh("--wait=no")
        self.assertEqual(await d, 1)
        self.assertNotIn("Waiting", stderr.getvalue())

    async def test_ssh_wait_auto_on_a_blocking_script_that_fails(self) -> None:
        await self.make_workspace(blocking=True)
        await self.report("starting")
        d, stderr = await self.ssh()
        await wait_until(lambda: "Waiting" in stderr.getvalue(), "the wait")
        await self.log("exit status 3")
        await self.report("start_error")
        await d
        err = stderr.getvalue()
        self.assertIn("exit status 3", err)
        self.assertIn("Warning: a startup script of the workspace failed", err)
        self.assertIn("coderstack logs dev", err)
        self.assertIn("Troubleshooting: https://docs.example.com/trouble", err)
        # After the warning it still goes on to connect.
        self.assertIn("is connecting", err.splitlines()[-1])

    async def test_bad_wait_is_a_usage_error(self) -> None:
        code, out, err = await self.cli("ssh", "dev", "--wait=maybe")
        self.assertEqual(code, 2)
        self.assertIn("--wait", err)
        code, out, err = await self.cli("ssh", "dev", CODER_SSH_WAIT="later")
        self.assertEqual(code, 2)
        self.assertIn("--wait (from CODER_SSH_WAIT)", err)
