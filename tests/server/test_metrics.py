"""``GET /metrics`` as a whole, on an in-memory deployment: valid Prometheus text, the process's
own metrics, and what the coordinator measures (peers by kind, tunnels, fan-out, update counts)."""

from __future__ import annotations

import re
import uuid

from twisted.trial import unittest

from coderstack.coordinator.core import AgentAuth, ClientAuth
from coderstack.wire.coordination import CoordinateRequest
from tests.coordinator.test_core import make_node
from tests.support.api import Caller, make_deployment

# name{label="value",...} value — the shape every sample line must have.
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_]+="[^"]*"(,[a-zA-Z_]+="[^"]*")*\})? '
                    r"(-?[0-9.e+-]+|\+Inf|NaN)$")


def samples(text: str) -> dict[str, float]:
    """{name{labels}: value}, checking each line's syntax and that no metric is typed twice."""
    out: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            assert name not in typed, f"{name} typed twice"
            typed.add(name)
        elif not line.startswith("# HELP "):
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            key, _, value = line.rpartition(" ")
            assert key not in out, f"{key} twice"
            out[key] = float(value)
    return out


class MetricsTests(unittest.TestCase):
    async def test_process_and_coordinator_metrics(self) -> None:
        d, api = await make_deployment(self)
        agent_id = uuid.uuid4()
        agent = d.coordinator.connect(agent_id, "agent", AgentAuth(agent_id), lambda r: None,
                                      lambda: None)
        for _ in range(2):
            client = d.coordinator.connect(uuid.uuid4(), "client", ClientAuth(agent_id, uuid.uuid4()),
                                           lambda r: None, lambda: None)
            client.handle(CoordinateRequest(add_tunnel=agent_id))
        client.lost()
        agent.handle_text(CoordinateRequest(update_self=make_node(agent_id)).to_text())

        caller = Caller(api)
        code, body = await caller.call("GET", "/metrics", token=await caller.owner())
        self.assertEqual(code, 200)
        got = samples(body.decode())
        for name in ("process_resident_memory_bytes", "process_virtual_memory_bytes",
                     "process_cpu_seconds_total", "process_open_fds", "process_max_fds",
                     "process_start_time_seconds"):
            self.assertGreater(got[name], 0, name)
        self.assertEqual(got['coderstack_coordinator_peers_by_kind{kind="agent",status="connected"}'], 1)
        self.assertEqual(got['coderstack_coordinator_peers_by_kind{kind="client",status="connected"}'], 1)
        self.assertEqual(got['coderstack_coordinator_peers_by_kind{kind="client",status="lost"}'], 1)
        self.assertEqual(got['coderstack_coordinator_peers_by_kind{kind="server",status="connected"}'], 0)
        self.assertEqual(got['coderstack_coordinator_peers{status="connected"}'], 2)
        self.assertEqual(got['coderstack_coordinator_peers{status="lost"}'], 1)
        self.assertEqual(got["coderstack_coordinator_tunnels"], 2)
        self.assertEqual(got["coderstack_coordinator_node_updates_received_total"], 1)
        # LOST to the agent, then the agent's node to the connected client.
        self.assertEqual(got["coderstack_coordinator_peer_updates_sent_total"], 2)
        # One fan-out (to the connected client), timed on the reactor's clock.
        self.assertEqual(got["coderstack_coordinator_fanout_seconds_count"], 1)
        self.assertEqual(got['coderstack_coordinator_fanout_seconds_bucket{le="+Inf"}'], 1)
        self.assertGreaterEqual(got["coderstack_coordinator_fanout_seconds_sum"], 0)
        self.assertLess(got["coderstack_coordinator_fanout_seconds_sum"], 1)
