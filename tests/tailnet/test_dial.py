"""``coderstack.tailnet.dial.CoordinationLink``: the CLI's coordination websocket is reopened after
a server restart, and the new coordinator is told our node and tunnel again."""

from __future__ import annotations

from uuid import uuid4

from twisted.internet import defer, task
from twisted.trial import unittest

from coderstack.tailnet.dial import RECONNECT_FIRST, CoordinationLink
from coderstack.wire.coordination import CoordinateRequest


class _Proto:
    def __init__(self) -> None:
        self.sent: list[CoordinateRequest] = []
        self.closed = False

    def send_request(self, request: CoordinateRequest) -> None:
        self.sent.append(request)

    def sendClose(self) -> None:
        self.closed = True


class _Factory:
    def __init__(self) -> None:
        self.proto = _Proto()
        self.closed: defer.Deferred[tuple[int | None, str]] = defer.Deferred()


class _Server:
    """open_coordination's stand-in: each call is one websocket, or a refusal while "down"."""

    def __init__(self) -> None:
        self.factories: list[_Factory] = []
        self.down = False
        self.attempts = 0

    async def open(self) -> _Factory:
        self.attempts += 1
        if self.down:
            raise ConnectionError("Connection refused")
        f = _Factory()
        self.factories.append(f)
        return f


class CoordinationLinkTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.server = _Server()
        self.tunnel = uuid4()
        self.link = CoordinationLink(self.clock, self.server.open,
                                     lambda: CoordinateRequest(add_tunnel=self.tunnel), rng=lambda: 1.0)
        self.successResultOf(defer.ensureDeferred(self.link.open()))

    def test_reopens_after_a_restart_and_registers_again(self) -> None:
        first = self.server.factories[0]
        self.server.down = True
        first.closed.callback((1006, "server went away"))
        self.clock.advance(RECONNECT_FIRST)
        self.assertEqual(self.server.attempts, 2)  # refused: the server is still down
        self.clock.advance(RECONNECT_FIRST)
        self.assertEqual(self.server.attempts, 2)  # backing off (doubled)
        self.clock.advance(RECONNECT_FIRST)
        self.assertEqual(self.server.attempts, 3)
        self.server.down = False
        self.clock.advance(4 * RECONNECT_FIRST)
        self.assertEqual(len(self.server.factories), 2)
        second = self.server.factories[1]
        self.assertIs(self.link.factory, second)
        self.assertEqual(second.proto.sent, [CoordinateRequest(add_tunnel=self.tunnel)])
        self.assertEqual(self.link.reopened, 1)
        # Later requests go to the new websocket.
        self.link.send(CoordinateRequest(remove_tunnel=self.tunnel))
        self.assertEqual(second.proto.sent[-1], CoordinateRequest(remove_tunnel=self.tunnel))
        self.assertEqual(first.proto.sent, [])

    def test_close_leaves_gracefully_and_stops_reopening(self) -> None:
        first = self.server.factories[0]
        self.successResultOf(defer.ensureDeferred(self.link.close()))
        self.assertEqual(first.proto.sent, [CoordinateRequest(disconnect=True)])
        self.assertTrue(first.proto.closed)
        first.closed.callback((1000, ""))
        self.clock.advance(60)
        self.assertEqual(self.server.attempts, 1)

    def test_close_while_waiting_to_reopen(self) -> None:
        self.server.factories[0].closed.callback((1006, ""))
        self.successResultOf(defer.ensureDeferred(self.link.close()))
        self.clock.advance(60)
        self.assertEqual(self.server.attempts, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
