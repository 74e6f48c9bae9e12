"""Hostile payloads and files on a real server: a 5,000-file template push, malformed bodies,
the database's file modes, two agents of one Unix user."""

from __future__ import annotations

import base64
import json
import os
import time

from twisted.internet.defer import Deferred
from twisted.trial import unittest

from tests.hostile.attack import (
    RSS_BOUND_KIB,
    LivePing,
    get_json,
    healthz_ok,
    http_client,
    ping_ok,
    rss_kib,
    workspace,
)
from tests.interop.tfsupport import SKIP_NO_TERRAFORM
from tests.server.test_api_hardening import hostile_bodies
from tests.support.processes import TWISTD, Process, sleep


class FileAndPayloadTests(unittest.TestCase):
    timeout = 300

    async def test_a_5000_file_template_push_is_refused_and_pings_go_on(self) -> None:
        if SKIP_NO_TERRAFORM:  # the server turns templates off without terraform
            raise unittest.SkipTest(SKIP_NO_TERRAFORM)
        d, alice, _agent = await workspace(self)
        pid = d.server.pid
        token = alice.session_token()
        client = http_client()
        live = LivePing(self, alice, count=10, wait="300ms")
        await live.first_pong
        gaps: list[float] = []
        pushing = True

        async def watch_healthz() -> None:
            while pushing:
                started = time.monotonic()
                await healthz_ok(self, d)
                gaps.append(time.monotonic() - started)
                await sleep(0.05)

        watcher = Deferred.fromCoroutine(watch_healthz())
        files = {f"f{i:04d}.tf": base64.b64encode(os.urandom(1000)).decode() for i in range(5000)}
        headers = {"Coder-Session-Token": token, "Content-Type": "application/json"}
        try:
            code, body, _ = await get_json(client, d.url + "/api/v2/templates", method="POST",
                                           data=json.dumps({"name": "huge", "files": files}).encode(),
                                           headers=headers)
            self.assertEqual(code, 413, body)
            self.assertEqual(body["message"], "A template may have at most 500 files.")
            big = {"main.tf": base64.b64encode(b"#" * (5 * 1024 * 1024)).decode()}
            code, body, _ = await get_json(client, d.url + "/api/v2/templates", method="POST",
                                           data=json.dumps({"name": "big", "files": big}).encode(),
                                           headers=headers)
            self.assertEqual(code, 413, body)
            self.assertIn("at most 4194304 bytes", body["message"])
        finally:
            pushing = False
            await watcher
        # The reactor kept answering while the pushes were unpacked (on a thread).
        self.assertLess(max(gaps), 2.0, gaps)
        await live.assert_all_pongs(self)
        self.assertLess(rss_kib(pid), RSS_BOUND_KIB)

    async def test_malformed_bodies_are_4xx_json_on_the_real_server(self) -> None:
        d, alice, _agent = await workspace(self)
        token = alice.session_token()
        client = http_client()
        code, ws, _ = await get_json(client, d.url + "/api/v2/users/me/workspace/box",
                                     headers={"Coder-Session-Token": token})
        self.assertEqual(code, 200, ws)
        routes = ["/api/v2/users/first", "/api/v2/users/login", "/api/v2/users",
                  "/api/v2/users/me/workspaces", "/api/v2/templates", f"/api/v2/workspaces/{ws['id']}/builds"]
        for path in routes:
            for body in hostile_bodies():
                code, got, _ = await get_json(client, d.url + path, method="POST", data=body,
                                              headers={"Coder-Session-Token": token})
                self.assertLess(code, 500, (path, body[:60], got))
                if code >= 400:
                    self.assertEqual(set(got), {"message", "detail"}, (path, body[:60]))
        self.assertNotIn("unhandled error", d.server.log())
        await healthz_ok(self, d)

    async def test_database_files_are_private_whatever_the_directory(self) -> None:
        d, alice, _agent = await workspace(self)
        await d.stop_server()
        os.chmod(d.data_dir, 0o755)  # as if someone opened it up
        for name in os.listdir(d.data_dir):
            if name.startswith("coderstack.db"):
                os.chmod(os.path.join(d.data_dir, name), 0o644)
        await d.start_server()
        await alice.wait_status("box", "connected")
        self.assertEqual(os.stat(d.data_dir).st_mode & 0o777, 0o700)
        names = sorted(n for n in os.listdir(d.data_dir) if n.startswith("coderstack.db"))
        self.assertEqual(names, ["coderstack.db", "coderstack.db-shm", "coderstack.db-wal"])
        for name in names:
            self.assertEqual(os.stat(os.path.join(d.data_dir, name)).st_mode & 0o777, 0o600, name)

    async def test_two_agents_of_one_unix_user_never_share_keys(self) -> None:
        d, alice, _first = await workspace(self)
        tokens = [await alice.create("box2"), await alice.create("box3")]
        home = os.path.join(d.dir, "shared-home")
        os.makedirs(home)
        agents = []
        for i, token in enumerate(tokens):
            # No --data-dir: both take the default under the same $HOME.
            argv = [TWISTD, "-n", "--pidfile=", "coderstack-agent"]
            env = d.env(home, CODER_AGENT_URL=d.url, CODER_AGENT_TOKEN=token)
            agents.append(Process(self, f"shared-agent{i}", argv, env, home))
        for name in ("box2", "box3"):
            await alice.wait_status(name, "connected", watch=agents)
        await ping_ok(self, alice, "box2")
        await ping_ok(self, alice, "box3")
        base = os.path.join(home, ".local", "share", "coderstack", "agent")
        dirs = sorted(os.listdir(base))
        self.assertEqual(len(dirs), 2, dirs)
        keys = set()
        for sub in dirs:
            path = os.path.join(base, sub)
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o700)
            with open(os.path.join(path, "wireguard.key")) as f:
                keys.add(f.read())
        self.assertEqual(len(keys), 2)
