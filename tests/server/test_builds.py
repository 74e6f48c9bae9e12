"""builds.py pieces that need no terraform run: the agents' twistd and a server without terraform."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

import coderstack
from coderstack.server.builds import Builder, agent_twistd, make_builder
from tests.support.api import make_deployment


class AgentTwistdTests(unittest.TestCase):
    def test_source_checkout_passes_pythonpath(self) -> None:
        twistd, env = agent_twistd()
        self.assertEqual(twistd, os.path.join(os.path.dirname(sys.executable), "twistd"))
        # The tests run from a checkout (not site-packages): the agent must import this one.
        self.assertEqual(env, {"PYTHONPATH": str(Path(coderstack.__file__).resolve().parent.parent)})

    def test_binary_dir_option(self) -> None:
        twistd, _ = agent_twistd("/opt/coderstack/bin")
        self.assertEqual(twistd, "/opt/coderstack/bin/twistd")


class MakeBuilderTests(unittest.TestCase):
    async def test_no_terraform_means_no_builder(self) -> None:
        d, _api = await make_deployment(self)
        data = self.mktemp()
        os.makedirs(data)
        got = await make_builder(reactor, d.store, d, {"data-dir": data,
                                                       "terraform-path": "/nonexistent/terraform"})
        self.assertIsNone(got)

    async def test_api_without_builder_says_templates_are_unavailable(self) -> None:
        from tests.support.api import Caller

        _d, api = await make_deployment(self)
        c = Caller(api)
        owner = await c.owner()
        code, got = await c.call("POST", "/api/v2/templates", {"name": "x", "files": {}}, token=owner)
        self.assertEqual((code, got["message"]), (503, "Templates are not available on this server."))
        code, got = await c.call("POST", "/api/v2/users/me/workspaces",
                                 {"name": "dev", "template_name": "x"}, token=owner)
        self.assertEqual(code, 503)


class _HangingRunner:
    """A runner whose builds run until cancelled (as terraform does until SIGINT)."""

    def __init__(self) -> None:
        self.interrupted = 0

    def build(self, template, work_dir, transition, access_url, workspace, log=None, parameters=None):
        log("Initializing the backend...")

        def interrupt(d):
            self.interrupted += 1

        return Deferred(interrupt)


class StopTests(unittest.TestCase):
    async def test_stop_interrupts_running_builds_and_records_them_failed(self) -> None:
        d, _api = await make_deployment(self)
        store = d.store
        user = await store.create_user("alice", "a@example.com", "h", roles=("owner",))
        t = await store.push_template("local", user.id, {"main.tf": b""})
        ws = await store.create_templated_workspace(user.id, "dev", t.id)
        runner = _HangingRunner()
        builder = Builder(store, runner, self.mktemp(), lambda: d.access_url)  # type: ignore[arg-type]
        build = await builder.start(ws, "start", user)
        self.assertEqual(list(builder.running), [build.id])
        await builder.stop()
        self.assertEqual((runner.interrupted, builder.running), (1, {}))
        stored, log = await store.build(build.id)
        self.assertEqual(stored.status, "failed")
        self.assertIn("server stopped during the build", stored.error)
        self.assertIn("Initializing the backend...", log)
        self.assertEqual(builder.live_log(build.id).build.status, "failed")
