"""``--browser-only``: every CLI tunnel is refused with a message that names the mode, at the
connection info, the coordinator and the relay; the agent still connects, and apps and the web
terminal through the server (the server's own tunnel) keep working."""

from __future__ import annotations

import json
import uuid

import treq
from autobahn.twisted.websocket import connectWS
from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web import resource, server

from tests.integration.test_web_terminal import TerminalFactory
from tests.integration.tunnel_support import ssh_config, user_env, workspace
from tests.support.processes import free_port
from tests.support.waiting import wait_until

NAMED = "Browser-only connections are enabled"


class BrowserOnlyTests(unittest.TestCase):
    timeout = 180

    async def test_cli_tunnels_refused_with_the_reason(self) -> None:
        d, alice, _agent = await workspace(self, "--browser-only", "true")
        for argv in (("ping", "box", "-n", "1"), ("ssh", "box", "--", "true"),
                     ("speedtest", "box", "-t", "1s"), ("port-forward", "box", "--tcp", f"127.0.0.1:{free_port()}:22"),
                     ("ssh", "--stdio", "box")):
            code, out, err = await alice.run(*argv)
            self.assertNotEqual(code, 0, f"{argv}: {out}")
            self.assertIn(NAMED, err, (argv, err))
            self.assertIn("--browser-only", err, argv)
        # OpenSSH through config-ssh's ProxyCommand says the same.
        cfg = await ssh_config(d, alice)
        code, _out, err = await alice.run_program(
            "ssh", "-F", cfg, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "coder.box", "true",
            **user_env(d, alice))
        self.assertNotEqual(code, 0)
        self.assertIn(NAMED, err)

    async def test_relay_and_coordinator_refuse_users_not_agents(self) -> None:
        d, alice, _agent = await workspace(self, "--browser-only", "true")
        ws = await alice.show("box")
        agent_id = ws["agents"][0]["id"]
        self.assertEqual(ws["agents"][0]["status"], "connected")  # agents are not refused
        token = alice.session_token()
        headers = {"Coder-Session-Token": token}
        resp = await treq.get(f"{d.url}/api/v2/workspaceagents/{agent_id}/coordinate", headers=headers,
                              persistent=False)
        body = json.loads(await resp.content())
        self.assertEqual(resp.code, 403)
        self.assertIn(NAMED, body["message"])
        resp = await treq.get(f"{d.url}/derp", headers={**headers, "Upgrade": "DERP", "Connection": "Upgrade"},
                              persistent=False)
        body = json.loads(await resp.content())
        self.assertEqual(resp.code, 403)
        self.assertIn(NAMED, body["message"])

    async def test_apps_keep_working(self) -> None:
        page = resource.Resource()
        page.putChild(b"", _Static(b"hello from the workspace"))
        listening = reactor.listenTCP(0, server.Site(page), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        app_port = listening.getHost().port
        d, alice, _agent = await workspace(self, "--browser-only", "true",
                                           "--wildcard-access-url", "*.apps.localhost")
        ws = await alice.show("box")
        host = f"{app_port}--{ws['agents'][0]['name']}--box--alice.apps.localhost"
        resp = await treq.get(f"{d.url}/", headers={"Host": host, "Coder-Session-Token": alice.session_token()},
                              persistent=False)
        self.assertEqual((resp.code, await resp.content()), (200, b"hello from the workspace"))


    async def test_the_web_terminal_keeps_working(self) -> None:
        d, alice, _agent = await workspace(self, "--browser-only", "true")
        agent_id = (await alice.show("box"))["agents"][0]["id"]
        url = (d.url.replace("http://", "ws://") + f"/api/v2/workspaceagents/{agent_id}/pty"
               f"?reconnect={uuid.uuid4()}&width=80&height=24&command=/bin/sh")
        f = TerminalFactory(url, headers={"Coder-Session-Token": alice.session_token()})
        connectWS(f)
        self.addCleanup(lambda: f.proto.dropConnection() if f.proto and f.proto.state != f.proto.STATE_CLOSED else None)
        t = await f.opened
        t.type(data="echo browser-$((6*7))\r")
        await wait_until(lambda: b"browser-42" in f.output, "the terminal's output", timeout=30)


class _Static(resource.Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request: object) -> bytes:
        return self.body
