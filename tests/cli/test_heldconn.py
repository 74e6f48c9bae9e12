"""port-forward's connection over the tunnel daemon (coderstack.cli.heldconn), with a fake
daemon: DIAL while the daemon is there, a tunnel of its own once it is gone and for UDP.

End to end (real daemon, agent and port-forward) in tests.integration.test_warm_forward.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from coderstack.cli import heldconn, warm
from coderstack.sdk import SDKError


class FakeDaemon:
    """A ``DaemonConnection``'s ``request``: HOLD connects a protocol to a fake transport; DIAL
    answers from ``dial_answer`` (a stream name, or an exception to raise)."""

    fp, name, disable_direct = "f" * 64, "box", False

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.dial_answer: Any = "daemon stream"
        self.hold: protocol.Protocol | None = None

    async def request(self, line: str, factory: Any = None) -> Any:
        self.lines.append(line)
        if line.startswith("HOLD "):
            self.hold = factory.buildProtocol(None)
            self.hold.makeConnection(StringTransport())
            return self.hold
        if isinstance(self.dial_answer, Exception):
            raise self.dial_answer
        return self.dial_answer


class _Endpoint:
    def __init__(self, port: int) -> None:
        self.port = port

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        return defer.succeed(f"own stream to {self.port}")


class OwnTunnel:
    udp_dial_calls: list[int]

    def __init__(self) -> None:
        self.udp_dial_calls = []

    def endpoint(self, port: int) -> _Endpoint:
        return _Endpoint(port)

    def udp_dial(self, port: int, on_datagram: Any) -> defer.Deferred[Any]:
        self.udp_dial_calls.append(port)
        return defer.succeed(f"flow to {port}")


class HeldConnectionTests(unittest.TestCase):
    def setUp(self) -> None:
        self.daemon = FakeDaemon()
        self.own = OwnTunnel()
        self.dials: list[defer.Deferred[Any]] = []
        self.said: list[str] = []

    async def dial_here(self) -> Any:
        d: defer.Deferred[Any] = defer.Deferred()
        self.dials.append(d)
        return await d

    def held(self) -> heldconn.HeldConnection:
        d = defer.Deferred.fromCoroutine(heldconn.hold(self.daemon, self.dial_here, self.said.append))  # type: ignore[arg-type]  # a fake DaemonConnection
        return self.successResultOf(d)

    def connect(self, held: heldconn.HeldConnection, port: int) -> defer.Deferred[Any]:
        return held.endpoint(port).connect(protocol.Factory())

    def test_tcp_goes_through_the_daemon_held_meanwhile(self) -> None:
        held = self.held()
        self.assertEqual(self.successResultOf(self.connect(held, 8080)), "daemon stream")
        self.assertEqual(self.daemon.lines, [f"HOLD {'f' * 64}", f"STREAM {'f' * 64} box 8080"])
        self.assertEqual(self.dials, [])
        assert self.daemon.hold is not None
        hold_transport = self.daemon.hold.transport
        held.close()
        self.assertTrue(hold_transport.disconnecting)
        self.daemon.hold.connectionLost(None)  # our own close: no "went away"
        self.assertEqual((self.said, held.daemon_gone), ([], False))

    def test_a_failed_dial_is_the_daemons_text(self) -> None:
        held = self.held()
        self.daemon.dial_answer = warm.Failed("the agent of workspace 'box' is disconnected; start it, then try again")
        failure = self.failureResultOf(self.connect(held, 80), error.ConnectError)
        self.assertEqual(failure.getErrorMessage(),
                         "the agent of workspace 'box' is disconnected; start it, then try again")
        self.assertEqual(self.dials, [])  # no falling back: the in-process dial would fail the same

    def test_once_the_daemon_is_gone_one_tunnel_of_its_own(self) -> None:
        held = self.held()
        self.daemon.dial_answer = warm.Unavailable("the daemon: Connection refused")
        first, second = self.connect(held, 80), self.connect(held, 81)
        self.assertEqual(len(self.dials), 1)  # one dial, however many wait for it
        self.dials[0].callback(self.own)
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)),
                         ("own stream to 80", "own stream to 81"))
        self.assertEqual(self.successResultOf(self.connect(held, 82)), "own stream to 82")
        self.assertEqual(sum(line.startswith("STREAM") for line in self.daemon.lines), 1)
        self.assertEqual(self.said, ["coderstack: the tunnel daemon went away (the daemon: Connection refused); "
                                     "dialing here"])

    def test_the_hold_ending_means_the_daemon_is_gone(self) -> None:
        held = self.held()
        assert self.daemon.hold is not None
        self.daemon.hold.connectionLost(None)
        self.assertTrue(held.daemon_gone)
        d = self.connect(held, 80)
        self.dials[0].callback(self.own)
        self.assertEqual(self.successResultOf(d), "own stream to 80")
        self.assertEqual(sum(line.startswith("STREAM") for line in self.daemon.lines), 0)
        self.assertEqual(len(self.said), 1)

    def test_a_failed_own_dial_fails_that_connection_and_the_next_tries_again(self) -> None:
        held = self.held()
        assert self.daemon.hold is not None
        self.daemon.hold.connectionLost(None)
        d = self.connect(held, 80)
        self.dials[0].errback(SDKError("the agent of workspace 'box' is disconnected; start it, then try again"))
        self.assertIn("is disconnected", self.failureResultOf(d, error.ConnectError).getErrorMessage())
        d = self.connect(held, 80)
        self.assertEqual(len(self.dials), 2)
        self.dials[1].callback(self.own)
        self.assertEqual(self.successResultOf(d), "own stream to 80")

    def test_udp_rides_the_own_tunnel_while_tcp_stays_with_the_daemon(self) -> None:
        held = self.held()
        flow = held.udp_dial(53, lambda data: None)
        self.dials[0].callback(self.own)
        self.assertEqual(self.successResultOf(flow), "flow to 53")
        self.assertEqual(self.successResultOf(self.connect(held, 80)), "daemon stream")
        self.assertEqual(self.successResultOf(held.udp_dial(54, lambda data: None)), "flow to 54")
        self.assertEqual((len(self.dials), self.own.udp_dial_calls), (1, [53, 54]))
