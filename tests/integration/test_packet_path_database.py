"""No database work on the packet path: a relayed speedtest through a real server (in this
process, so its database calls can be watched) and a real agent moves thousands of packets
through the embedded DERP relay, and no database call made meanwhile came from the relay, the
closed-relay policy it asks per packet, the coordinator or any tunnel code — only a DERP
connection's token check at its upgrade, and the API's own (the agent's reports, the CLI's
lookups), none of which grows with the packets."""

from __future__ import annotations

import json
import os
import traceback
from typing import Any

from twisted.trial import unittest

from tests.support.inprocess import CLI, start_server
from tests.support.processes import TWISTD, Process, base_env
from tests.support.tempdirs import made_dir
from tests.support.waiting import wait_until

#: Modules whose frames must never be on the stack of a database call: the relay's forwarding
#: (and the closed-relay policy it asks per packet), the coordinator, the tunnel code.
PACKET_PATH = ("coderstack/derp/relay.py", "coderstack/coordinator/", "coderstack/tailnet/",
               "coderstack/netstack/", "coderstack/wire/")
#: A DERP connection's upgrade checks its token once (derp/server.py -> relaypolicy.py).
UPGRADE = "coderstack/derp/server.py"


class PacketPathDatabaseTests(unittest.TestCase):
    timeout = 120

    async def test_a_relayed_transfer_makes_no_database_call(self) -> None:
        svc, url = await start_server(self, "--block-direct-connections", "true")
        store = svc.store
        assert store is not None and svc.deployment is not None
        cli = CLI(self)
        code, _out, err = await cli("login", url, "--first-user-username", "alice", "--first-user-email",
                                    "alice@example.com", "--first-user-password", "alice password")
        self.assertEqual(code, 0, err)
        code, out, err = await cli("create", "box")
        self.assertEqual(code, 0, err)
        token = next(w.split("=", 1)[1] for w in out.split() if w.startswith("CODER_AGENT_TOKEN="))
        home = made_dir(self)
        agent = Process(self, "agent", [TWISTD, "-n", "--pidfile=", "coderstack-agent", "--data-dir",
                                        os.path.join(home, "data")],
                        base_env(home, CODER_AGENT_URL=url, CODER_AGENT_TOKEN=token), home)

        async def connected() -> bool:
            agent.check_running()
            code, out, _ = await cli("show", "box", "--output", "json")
            return code == 0 and json.loads(out)["agents"][0]["status"] == "connected"

        await wait_until(connected, "the agent to connect", timeout=60, interval=0.2)

        calls: list[list[str]] = []
        run = store._run

        def watched(fn: Any, *args: Any) -> Any:
            calls.append([f.filename for f in traceback.extract_stack()])
            return run(fn, *args)

        store._run = watched  # type: ignore[method-assign]
        relay = svc.deployment.relay
        before = relay.packets_sent
        code, out, err = await cli("speedtest", "box", "-t", "2s", "--direction", "up", "-o", "json")
        self.assertEqual(code, 0, err)
        store._run = run  # type: ignore[method-assign]
        relayed = relay.packets_sent - before
        self.assertGreater(relayed, 2000, out)  # it went through the relay, many packets of it
        def ours(stack: list[str]) -> list[str]:
            return [f for f in stack if "coderstack/" in f]

        on_path = [ours(stack) for stack in calls if any(p in f for f in stack for p in PACKET_PATH)]
        self.assertEqual(on_path, [], "database calls from the packet path")
        upgrades = [ours(stack) for stack in calls if any(UPGRADE in f for f in stack)]
        self.assertLessEqual(len(upgrades), 2, upgrades)  # the CLI's DERP connection, once
        # What there was (the CLI's lookups, the agent's reports) is nowhere near per packet.
        self.assertLess(len(calls), relayed / 100, len(calls))
