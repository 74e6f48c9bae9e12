"""A real AgentService against a fake of the server's agent endpoints, with a manifest that has
scripts (one writing a file, one failing, one hanging past its timeout, a cron one, a shutdown
one), metadata, and an app whose health check hits a real local HTTP server that the test stops
and starts again."""

from __future__ import annotations

import os
import re
import uuid

from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web import resource, server

from coderstack.agent.logs import agent_source_id
from coderstack.agent.service import AgentService
from tests.agent.fake_server import TOKEN, FakeAgentAPI, listen
from tests.support.waiting import wait_until

AGENT_ID = "6f1e2d3c-4b5a-4978-8a9b-0c1d2e3f4a5b"
APP_ID = str(uuid.uuid4())
SOURCES = {name: str(uuid.uuid4()) for name in ("startup", "fail", "hang", "cron", "shutdown")}


class _Healthz(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"ok"


def script(name: str, text: str, **kw) -> dict:
    return {"log_source_id": SOURCES[name], "display_name": name.title(), "script": text, "cron": "",
            "run_on_start": False, "run_on_stop": False, "start_blocks_login": False,
            "timeout_seconds": 0, "log_path": "", **kw}


class WorkspaceAgentTests(unittest.TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.project = os.path.join(self.dir, "project")
        os.makedirs(self.project)

    def start_app(self, port: int = 0):
        p = reactor.listenTCP(port, server.Site(_Healthz()), interface="127.0.0.1")
        self.addCleanup(lambda: p.connected and p.stopListening())
        return p

    def manifest(self, app_port: int) -> dict:
        out = self.dir
        return {
            "agent_id": AGENT_ID, "agent_name": "main", "owner_name": "alice", "workspace_name": "ws1",
            "workspace_id": str(uuid.uuid4()), "derp_map": {"Regions": {}},
            "directory": self.project, "motd_path": "",
            "environment_variables": {"MY_VAR": "from-template"},
            "scripts": [
                script("startup", 'echo "hello from startup"\n'
                                  f'echo "$CODER_WORKSPACE_NAME $MY_VAR $(pwd) token=${{CODER_AGENT_TOKEN:-none}}" '
                                  f'> {out}/started\n', run_on_start=True, log_path=f"{out}/startup.log"),
                script("fail", "echo about to fail\necho on stderr >&2\nexit 3\n", run_on_start=True),
                script("hang", "echo hanging\nsleep 30\n", run_on_start=True, timeout_seconds=1),
                script("cron", f"echo tick >> {out}/ticks\n", cron="* * * * * *"),
                script("shutdown", f"echo bye > {out}/stopped\n", run_on_stop=True),
            ],
            "apps": [{"id": APP_ID, "slug": "web", "url": f"http://127.0.0.1:{app_port}/",
                      "healthcheck": {"url": f"http://127.0.0.1:{app_port}/healthz", "interval": 1,
                                      "threshold": 2},
                      "health": "initializing"}],
            "metadata": [
                {"key": "owner", "display_name": "Owner", "script": 'echo "  $CODER_WORKSPACE_OWNER_NAME  "',
                 "interval": 1, "timeout": 5},
                {"key": "bad", "display_name": "Bad", "script": "echo oops; exit 1", "interval": 1, "timeout": 5},
                {"key": "cpu", "display_name": "CPU", "script": "coder stat cpu", "interval": 1, "timeout": 10},
            ],
        }

    async def test_the_workspace_comes_alive_and_shuts_down(self) -> None:
        app = self.start_app()
        app_port = app.getHost().port
        api = FakeAgentAPI(self.manifest(app_port))
        url = listen(self, api)
        svc = AgentService(reactor, url, TOKEN, os.path.join(self.dir, "agent"), reconnect_max=1)
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())

        # Start: every start script ran; the hanging one's timeout decides the outcome.
        await wait_until(lambda: len(api.states()) >= 2, "the start outcome")
        self.assertEqual(api.states(), ["starting", "start_timeout"])
        with open(os.path.join(self.dir, "started")) as f:
            self.assertEqual(f.read().strip(), f"ws1 from-template {self.project} token=none")
        with open(os.path.join(self.dir, "startup.log")) as f:
            self.assertEqual(f.read(), "hello from startup\n")
        await wait_until(lambda: "hello from startup" in api.lines(SOURCES["startup"]), "startup output")
        await wait_until(lambda: {"about to fail", "on stderr"} <= set(api.lines(SOURCES["fail"])), "fail output")
        agent_source = agent_source_id(AGENT_ID)
        await wait_until(lambda: any("exit status 3" in line for line in api.lines(agent_source)),
                         "the agent's message about the failure")
        await wait_until(lambda: '"Hang" script timed out after 1s' in api.lines(agent_source),
                         "the agent's message about the timeout")
        agent_lines = api.lines(agent_source)
        self.assertIn('"Fail" script exit status 3', agent_lines)
        self.assertIn("  about to fail", agent_lines)
        self.assertEqual(api.log_sources, [{"id": agent_source, "display_name": "Agent", "icon": ""}])

        # Cron runs every second.
        ticks = os.path.join(self.dir, "ticks")
        await wait_until(lambda: os.path.exists(ticks) and len(open(ticks).readlines()) >= 2, "two cron runs")

        # Metadata: values stripped, errors reported, `coder` on PATH.
        await wait_until(lambda: {"owner", "bad", "cpu"} <= set(api.metadata()), "all metadata keys")
        md = api.metadata()
        self.assertEqual((md["owner"]["value"], md["owner"]["error"]), ("alice", ""))
        self.assertEqual((md["bad"]["value"], md["bad"]["error"]), ("oops", "exit status 1"))
        self.assertEqual(md["cpu"]["error"], "")
        self.assertRegex(md["cpu"]["value"], r"^[0-9.]+/[0-9.]+ cores \(\d+%\)$")
        self.assertRegex(md["owner"]["collected_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

        # App health: healthy, unhealthy once the app is gone, healthy when it is back.
        self.assertEqual(api.app_health_posts[0], {APP_ID: "initializing"})
        await wait_until(lambda: api.health().get(APP_ID) == "healthy", "the app healthy")
        await app.stopListening()
        await wait_until(lambda: api.health().get(APP_ID) == "unhealthy", "the app unhealthy", timeout=30)
        self.start_app(app_port)
        await wait_until(lambda: api.health().get(APP_ID) == "healthy", "the app healthy again", timeout=30)
        flips = [h[APP_ID] for h in api.app_health_posts]
        self.assertEqual(flips, ["initializing", "healthy", "unhealthy", "healthy"])

        # A graceful stop runs the shutdown script and reports before the agent is gone.
        await svc.stopService()
        self.assertEqual(api.states(), ["starting", "start_timeout", "shutting_down", "off"])
        with open(os.path.join(self.dir, "stopped")) as f:
            self.assertEqual(f.read(), "bye\n")
        self.assertEqual(api.bad_tokens, 0)
        manifest_file = os.path.join(self.dir, "agent", "manifest.json")
        self.assertEqual(os.stat(manifest_file).st_mode & 0o777, 0o600)
        changed = [r["changed_at"] for r in api.lifecycle]
        self.assertEqual(changed, sorted(changed))
        self.assertTrue(all(re.match(r"^\d{4}-\d\d-\d\dT.*Z$", c) for c in changed))


class UnreachableAndOverflowTests(unittest.TestCase):
    timeout = 60

    async def test_reports_wait_for_the_server_and_logs_stop_at_the_limit(self) -> None:
        out = os.path.abspath(self.mktemp())
        os.makedirs(out)
        noisy = script("startup", "for i in $(seq 1 300); do echo line $i; done\n", run_on_start=True)
        api = FakeAgentAPI({"agent_id": AGENT_ID, "agent_name": "main", "owner_name": "alice",
                            "workspace_name": "ws1", "derp_map": {"Regions": {}}, "scripts": [noisy],
                            "apps": [], "metadata": []}, logs_limit=200)
        api.down = True
        url = listen(self, api)
        svc = AgentService(reactor, url, TOKEN, os.path.join(out, "agent"), reconnect_max=1)
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())
        await wait_until(lambda: svc.workspace is not None and svc.workspace.lifecycle.state == "ready",
                         "the start scripts to finish")
        self.assertEqual(api.lifecycle, [])
        api.down = False
        await wait_until(lambda: api.states() == ["starting", "ready"], "the reports once the server is back")
        await wait_until(lambda: api.logs_overflowed, "the log limit")
        requests = api.log_requests
        await svc.stopService()
        self.assertEqual(api.states(), ["starting", "ready", "shutting_down", "off"])
        # After the 413 the agent sent no more logs.
        self.assertEqual(api.log_requests, requests)
        self.assertTrue(svc.workspace.logs.overflowed)
        self.assertLessEqual(api.logs_length, 200)
