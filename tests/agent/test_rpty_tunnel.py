"""The web terminal end to end: a real AgentService with its standard ports, a client dialing it
through the tunnel (``dial_agent``), port 2 spoken as the server speaks it."""

from __future__ import annotations

import os
import signal
import uuid

from twisted.internet import defer, reactor
from twisted.internet.endpoints import connectProtocol
from twisted.trial import unittest
from twisted.web.server import Site

from coderstack.agent.service import AgentService, serve_standard_ports
from coderstack.derp.policy import AllowAllPolicy
from coderstack.derp.server import make_derp_resources, make_relay
from coderstack.sdk import Client
from coderstack.tailnet.dial import dial_agent
from coderstack.wire import derp as w
from coderstack.wire.ports import RECONNECTING_PTY_PORT
from coderstack.wire.rpty import encode_init, encode_request
from tests.agent.test_rpty import Terminal
from tests.agent.test_service import _Root, autobahn_timers
from tests.support.api import Caller, make_deployment
from tests.support.tempdirs import made_dir
from tests.support.waiting import wait_until


class WebTerminalThroughTheTunnelTests(unittest.TestCase):
    timeout = 120

    async def test_echo_then_reconnect_replays_and_agent_stop_ends_it(self) -> None:
        self.addCleanup(wait_until, lambda: not autobahn_timers(), "the websockets to end")
        _d, api = await make_deployment(self)
        caller = Caller(api)
        token = await caller.owner()
        _, ws = await caller.call("POST", "/api/v2/users/me/workspaces", {"name": "dev"}, token=token)
        relay = make_relay(w.generate_private_key(), AllowAllPolicy(), reactor)
        port = reactor.listenTCP(0, Site(_Root(api.app.resource(), make_derp_resources(relay, AllowAllPolicy()))),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}"

        svc = AgentService(reactor, url, ws["agent_token"], made_dir(self), link_monitor=False)
        serve_standard_ports(svc, reactor, svc.key_dir)
        rpty = svc.reconnecting_pty
        assert rpty is not None
        # The login shell of the agent's user, but not its profile: a user's bash profile may be
        # slow to start (and is not what is under test).
        rpty.shell = "/bin/sh"
        pids: list[int] = []
        rpty.on_session = lambda session: pids.append(session.pid)

        def kill_all() -> None:
            for pid in pids:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self.addCleanup(kill_all)
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        await wait_until(lambda: svc.conn is not None and svc.coordination is not None,
                         "the agent's tunnel and coordination")

        client = Client(reactor, url, token)
        self.addCleanup(client.close)
        tunnel = await dial_agent(reactor, client, ws["agents"][0]["id"])
        self.addCleanup(lambda: defer.ensureDeferred(tunnel.close()))

        async def open_terminal(session_id: uuid.UUID) -> Terminal:
            term = Terminal()
            await connectProtocol(tunnel.endpoint(RECONNECTING_PTY_PORT), term)
            self.addCleanup(lambda: term.transport.abortConnection() if not term.closed else None)
            term.transport.write(encode_init(session_id, 24, 80, ""))
            return term

        sid = uuid.uuid4()
        first = await open_terminal(sid)
        first.transport.write(encode_request("echo hi-$((6*7))\r"))
        await first.expect(b"hi-42")
        session = rpty.sessions[sid]
        first.transport.loseConnection()
        await first.lost
        await wait_until(lambda: not session.connections, "the agent to see the first connection close")

        second = await open_terminal(sid)
        await second.expect(b"hi-42")  # the scrollback
        self.assertIs(rpty.sessions[sid], session)
        second.transport.write(encode_request("echo again-$((2*3))\r", height=30, width=100))
        await second.expect(b"again-6")
        self.assertEqual(session.size, (30, 100))

        # The agent stops: the shell is hung up and its connection closed (the tunnel goes down
        # right after, so the client may only learn of that from its own timeout).
        attached = list(session.connections)
        self.assertEqual(len(attached), 1)
        await svc.stopService()
        self.assertTrue(session.is_ended)
        self.assertTrue(attached[0].closed)
        self.assertEqual(rpty.sessions, {})
        self.assertRaises(ProcessLookupError, os.kill, session.pid, 0)
