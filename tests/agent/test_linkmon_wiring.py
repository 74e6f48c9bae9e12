"""The agent's tunnel runs a link monitor (coderstack/tailnet/linkmon.py) unless turned off."""

from __future__ import annotations

import os
import uuid

from twisted.internet.defer import Deferred
from twisted.trial import unittest

from coderstack.agent.service import AgentService
from coderstack.tailnet.linkmon import LinkMonitor, LinkState
from tests.agent.test_agent import DERP_MAP, FakeReactor
from tests.support.tempdirs import made_dir


async def _idle() -> None:
    await Deferred()


class AgentLinkMonitorTests(unittest.TestCase):
    def tunnel(self, **kw: object) -> AgentService:
        svc = AgentService(FakeReactor(), "http://127.0.0.1:3000", "token",
                           made_dir(self), **kw)  # type: ignore[arg-type]
        svc.open_socket = _idle  # type: ignore[method-assign, assignment]
        svc.startService()
        self.addCleanup(svc.stopService)
        agent_id = uuid.uuid4()
        svc.load_keys(agent_id)  # what the first manifest does
        svc._tunnel(agent_id, {"derp_map": DERP_MAP})
        return svc

    def test_on_by_default_and_polls_on_the_reactor(self) -> None:
        self.patch(os, "environ", {})
        svc = self.tunnel()
        assert svc.conn is not None
        mon = svc.conn.link_monitor
        self.assertIsInstance(mon, LinkMonitor)
        self.assertIs(mon.clock, svc.reactor)
        states = [LinkState(frozenset({("cslm0", "198.51.100.77")})), LinkState(), LinkState()]
        mon.read_state = lambda: states.pop(0)
        seen: list[int] = []
        svc.conn.network_changed = lambda derp_stale=None: seen.append(1)  # type: ignore[method-assign]
        for _ in range(3):
            svc.reactor.advance(mon.interval)
        self.assertEqual(mon.changes, 2)  # the host's first snapshot -> ours -> none
        self.assertEqual(len(seen), 2)

    def test_off_by_option_or_environment(self) -> None:
        svc = self.tunnel(link_monitor=False)
        assert svc.conn is not None
        self.assertIsNone(svc.conn.link_monitor)
        self.patch(os, "environ", {"CODERSTACK_LINK_MONITOR": "0"})
        svc = self.tunnel()
        assert svc.conn is not None
        self.assertIsNone(svc.conn.link_monitor)
