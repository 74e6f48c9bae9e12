"""SIGTERM against a real server process: websockets are closed with 1001 "going away", DERP
clients get a Restarting frame, and the process exits."""

from __future__ import annotations

import signal

from twisted.internet import reactor
from twisted.trial import unittest

from tests.hostile.live import RawPeer
from tests.support.processes import Deployment
from tests.support.waiting import wait_until

# twistd ends a clean SIGTERM shutdown by re-raising the signal, so either status is "stopped".
STOPPED = (0, -signal.SIGTERM)


class ShutdownTests(unittest.TestCase):
    timeout = 120

    async def test_sigterm_says_going_away(self) -> None:
        d = Deployment(self)
        server = await d.start_server()
        alice = d.user("alice")
        await alice.login_first("alice")
        token = await alice.create("box")
        agent = d.start_agent(token)
        ws = await alice.wait_status("box", "connected", watch=[agent])
        peer = RawPeer(self, d.url, alice.session_token(), ws["agents"][0]["id"], backoff=30.0)
        await peer.open()

        started = reactor.seconds()
        server.signal(signal.SIGTERM)
        self.assertIn(await server.wait(), STOPPED, server.log())
        took = reactor.seconds() - started
        print(f"\nSIGTERM to exit: {took * 1000:.0f} ms (wall clock, polled every 50 ms)")

        self.assertEqual(await peer.coord.closed, (1001, "going away"))
        await wait_until(lambda: not any(inbox.up for _, inbox in peer.derps), "DERP connections to end")
        # Both transports were told when to come back (the client's use of the hint is checked
        # against an in-process server in tests/server/test_revocation.py).
        self.assertEqual([inbox.restarts for _, inbox in peer.derps], [[(1.0, 60.0)]] * 2)
        # The agent outlives its server and comes back with the next one.
        self.assertTrue(agent.running(), agent.log())
        await d.start_server()
        await alice.wait_status("box", "connected", watch=[agent])
