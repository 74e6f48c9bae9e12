"""The agent without a server: its keys, the node it advertises, and its reconnect schedule.

The reconnect loop runs on a ``MemoryReactorClock`` (with a stand-in UDP port), with the session
replaced by a script of outcomes, so the waits between attempts are read off the fake clock.
"""

from __future__ import annotations

import os
import stat
import uuid
from typing import Any

from nacl.public import PrivateKey
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from coderstack.agent.datadir import DataDirInUse
from coderstack.agent.service import AgentService, home_region
from coderstack.derpmap import DERPMap
from coderstack.keys import NodeKeys, load_node_keys
from coderstack.sdk import SDKError
from tests.coordinator.test_link import FakeSocket
from tests.support.tempdirs import made_dir

AGENT_ID = uuid.UUID("6f1e2d3c-4b5a-4978-8a9b-0c1d2e3f4a5b")

DERP_MAP = {
    "Regions": {
        "1": {"RegionID": 1, "RegionCode": "far", "RegionName": "Far",
              "Nodes": [{"Name": "1a", "RegionID": 1, "HostName": "derp1.example.com"}]},
        "999": {"RegionID": 999, "RegionCode": "coder", "RegionName": "Coder Embedded Relay",
                "EmbeddedRelay": True,
                "Nodes": [{"Name": "999b", "RegionID": 999, "HostName": "127.0.0.1", "DERPPort": 3000,
                           "STUNPort": -1, "ForceHTTP": True}]},
    }
}


def manifest(**extra: Any) -> dict[str, Any]:
    return {"agent_id": str(AGENT_ID), "agent_name": "main", "owner_name": "alice",
            "workspace_name": "ws1", "derp_map": DERP_MAP, **extra}


class _UDPPort:
    def __init__(self, port: int) -> None:
        self.port = port
        self.listening = True

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "0.0.0.0", self.port)

    def stopListening(self) -> None:
        self.listening = False


class FakeReactor(MemoryReactorClock):
    """MemoryReactorClock plus just enough listenUDP for the agent's tunnel socket."""

    def __init__(self) -> None:
        super().__init__()
        self.udp: list[tuple[int, Any]] = []

    def listenUDP(self, port: int, protocol: Any, *args: Any, **kwargs: Any) -> _UDPPort:
        self.udp.append((port, protocol))
        return _UDPPort(port or 41641)


class KeysTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.join(made_dir(self), "agent")

    def test_keys_are_made_once_and_persist(self) -> None:
        first = load_node_keys(self.dir)
        second = load_node_keys(self.dir)
        self.assertEqual(first, second)
        self.assertNotEqual(first.node_private, first.disco_private)
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)
        for name in ("wireguard.key", "disco.key"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dir, name)).st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(self.dir)), ["disco.key", "wireguard.key"])  # no .tmp left
        # Another data dir is another node.
        other = load_node_keys(self.dir + "-other")
        self.assertNotEqual(other.node_private, first.node_private)

    def test_public_keys_are_x25519(self) -> None:
        keys = NodeKeys.generate()
        self.assertEqual(keys.node_public, bytes(PrivateKey(keys.node_private).public_key))
        self.assertEqual(keys.disco_public, bytes(PrivateKey(keys.disco_private).public_key))
        self.assertEqual(len(keys.node_public), 32)

    def test_a_damaged_key_file_is_an_error_not_a_new_identity(self) -> None:
        load_node_keys(self.dir)
        path = os.path.join(self.dir, "wireguard.key")
        for damaged in ("abcd\n", "not hex at all\n"):
            with open(path, "w") as f:
                f.write(damaged)
            with self.assertRaises(ValueError):
                load_node_keys(self.dir)
            with open(path) as f:
                self.assertEqual(f.read(), damaged)

    def test_agent_service_keeps_its_keys_across_restarts(self) -> None:
        ids = []
        agent_id = uuid.uuid4()
        for _ in range(2):
            svc = AgentService(FakeReactor(), "http://127.0.0.1:3000", "token", self.dir)
            svc.open_socket = _idle  # type: ignore[method-assign, assignment]
            svc.startService()
            self.assertIsNone(svc.keys)  # chosen by the manifest's agent id
            keys = svc.load_keys(agent_id)
            ids.append((keys, keys.node_public))
            svc.stopService()
        self.assertEqual(ids[0], ids[1])

    def test_agents_never_share_keys(self) -> None:
        """Two agents of one user on the default (per-agent) dir get their own keys and dirs;
        one given another agent's explicit dir refuses it instead of taking its keys."""
        base = os.path.join(self.dir, "base")
        a, b = uuid.uuid4(), uuid.uuid4()
        svc_a = AgentService(FakeReactor(), "http://x", "t", base, per_agent_data_dir=True)
        svc_b = AgentService(FakeReactor(), "http://x", "t", base, per_agent_data_dir=True)
        ka, kb = svc_a.load_keys(a), svc_b.load_keys(b)
        self.assertNotEqual(ka.node_public, kb.node_public)
        self.assertEqual(svc_a.key_dir(), os.path.join(base, str(a)))
        for path in (base, svc_a.key_dir(), svc_b.key_dir()):
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o700, path)
        explicit = AgentService(FakeReactor(), "http://x", "t", svc_a.key_dir())
        with self.assertRaises(DataDirInUse) as caught:
            explicit.load_keys(b)
        self.assertIn(str(a), str(caught.exception))
        self.assertIsNone(explicit.keys)
        # The agent it belongs to may use it by name.
        same = AgentService(FakeReactor(), "http://x", "t", svc_a.key_dir())
        self.assertEqual(same.load_keys(a).node_public, ka.node_public)

    def test_ssh_host_key_comes_from_the_agents_own_dir(self) -> None:
        from coderstack.agent.ssh import HOST_KEY_NAME, ssh_factory

        svc = AgentService(FakeReactor(), "http://x", "t", self.dir, per_agent_data_dir=True)
        factory = ssh_factory(svc.key_dir)
        agent_id = uuid.uuid4()
        svc.load_keys(agent_id)
        factory.startFactory()
        self.assertTrue(os.path.exists(os.path.join(self.dir, str(agent_id), HOST_KEY_NAME)))
        self.assertEqual(set(factory.publicKeys), {b"ssh-ed25519"})


async def _idle() -> None:
    await Deferred()


class NodeTests(unittest.SynchronousTestCase):
    # The node itself is built by the tunnel (tests/tailnet/test_conn.py) and accepted by the
    # coordinator end to end in tests/agent/test_service.py.
    def test_home_region(self) -> None:
        self.assertEqual(home_region(DERPMap.from_json(DERP_MAP)), 999)
        def region(n: int) -> dict[str, Any]:
            return {"RegionID": n, "RegionCode": f"r{n}", "RegionName": f"R{n}",
                    "Nodes": [{"Name": f"{n}a", "RegionID": n, "HostName": f"derp{n}.example.com"}]}

        only_far = {"Regions": {"7": region(7), "3": region(3)}}
        self.assertEqual(home_region(DERPMap.from_json(only_far)), 3)
        self.assertEqual(home_region(DERPMap.from_json({"Regions": {}})), 0)


class ReconnectTests(unittest.TestCase):
    def start(self, outcomes: list[Any], reconnect_max: float = 10.0, top: bool = True) -> tuple[AgentService, FakeReactor, list[float]]:
        """Run the agent loop; each session attempt takes the next outcome (True: a session that
        opened and then closed; an exception: raised). ``top``: no jitter (else the most)."""
        reactor = FakeReactor()
        svc = AgentService(reactor, "http://127.0.0.1:3000", "token", made_dir(self),
                           reconnect_max=reconnect_max, rng=lambda: 0.0 if top else 1.0)
        attempts: list[float] = []
        script = list(outcomes)

        async def session() -> FakeSocket:
            attempts.append(reactor.seconds())
            outcome = script.pop(0) if script else SDKError("still down")
            if isinstance(outcome, BaseException):
                raise outcome
            socket = FakeSocket()
            socket.closed.callback((1006, "gone"))  # opened, then closed
            return socket

        svc.open_socket = session  # type: ignore[method-assign, assignment]
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())
        return svc, reactor, attempts

    def advance_until(self, reactor: FakeReactor, attempts: list[float], count: int) -> None:
        while len(attempts) < count:
            self.assertTrue(reactor.getDelayedCalls(), "the agent stopped retrying")
            reactor.advance(min(c.getTime() for c in reactor.getDelayedCalls()) - reactor.seconds())

    @staticmethod
    def gaps(attempts: list[float]) -> list[float]:
        return [round(b - a, 6) for a, b in zip(attempts, attempts[1:], strict=False)]

    def test_exponential_backoff_capped(self) -> None:
        _svc, reactor, attempts = self.start([], reconnect_max=10)
        self.assertEqual(attempts, [0.0])  # the first attempt is immediate
        self.advance_until(reactor, attempts, 8)
        self.assertEqual(self.gaps(attempts), [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0])

    def test_cap_is_the_option(self) -> None:
        _svc, reactor, attempts = self.start([], reconnect_max=3)
        self.advance_until(reactor, attempts, 5)
        self.assertEqual(self.gaps(attempts), [1.0, 2.0, 3.0, 3.0])

    def test_jitter_shortens_waits_by_at_most_30_percent(self) -> None:
        _svc, reactor, attempts = self.start([], top=False)
        self.advance_until(reactor, attempts, 4)
        self.assertEqual(self.gaps(attempts), [0.7, 1.4, 2.8])

    def test_backoff_resets_after_a_session_that_opened(self) -> None:
        down = ConnectionError("refused")
        _svc, reactor, attempts = self.start([SDKError("down"), down, True, SDKError("down"), Exception("bug")])
        self.advance_until(reactor, attempts, 6)
        # 1 s, 2 s after failures; a quick (<= 0.5 s) retry after the opened session; then from 1 s again.
        self.assertEqual(self.gaps(attempts), [1.0, 2.0, 0.5, 1.0, 2.0])
        self.assertEqual(_svc.sessions, 1)
        # An unexpected error is logged with its traceback (and retried like the others).
        self.assertEqual([str(f.value) for f in self.flushLoggedErrors(Exception)], ["bug"])

    def test_a_data_dir_of_another_agent_stops_for_good(self) -> None:
        _svc, reactor, attempts = self.start([SDKError("down"), DataDirInUse("it is agent b's")])
        self.advance_until(reactor, attempts, 2)
        reactor.advance(100)
        self.assertEqual(len(attempts), 2)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_stop_ends_the_loop(self) -> None:
        svc, reactor, attempts = self.start([])
        self.advance_until(reactor, attempts, 2)
        d = svc.stopService()
        self.assertIsInstance(d, Deferred)
        self.successResultOf(d)
        reactor.advance(100)
        self.assertEqual(len(attempts), 2)
        self.assertEqual(reactor.getDelayedCalls(), [])

