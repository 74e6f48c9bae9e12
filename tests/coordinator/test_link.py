"""``coderstack.coordinator.client.CoordinationLink``: a coordination websocket reopened after a
server restart with the project's Backoff, its handler told of every open."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.internet.error import ConnectingCancelledError
from twisted.trial import unittest

from coderstack.backoff import Backoff
from coderstack.coordinator.client import CoordinationLink
from coderstack.wire.coordination import CoordinateRequest


class FakeSocket:
    """One opened websocket (``CoordinationSocket``)."""

    def __init__(self) -> None:
        self.sent: list[CoordinateRequest] = []
        self.left = False
        self.closed: defer.Deferred[tuple[int | None, str]] = defer.Deferred()

    def send(self, request: CoordinateRequest) -> None:
        self.sent.append(request)

    def leave(self) -> None:
        self.left = True


class FakeServer:
    """A ``LinkHandler``: each open is one websocket, or a refusal while "down"."""

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.times: list[float] = []  # when each open was attempted
        self.sockets: list[FakeSocket] = []
        self.down: Exception | None = None
        self.attempts = 0
        self.told: list[bool] = []
        self.failures: list[str] = []
        self.give_up_on: type[Exception] | None = None
        self.link: CoordinationLink | None = None

    async def open_socket(self) -> FakeSocket:
        self.attempts += 1
        self.times.append(self.clock.seconds())
        if self.down is not None:
            raise self.down
        socket = FakeSocket()
        self.sockets.append(socket)
        return socket

    async def socket_opened(self, reopened: bool) -> None:
        self.told.append(reopened)
        assert self.link is not None
        self.link.send(CoordinateRequest(disconnect=False, ready_for_handshake=()))

    def open_failed(self, err: Exception) -> bool:
        self.failures.append(str(err))
        return self.give_up_on is None or not isinstance(err, self.give_up_on)


def no_jitter(first: float = 0.5, cap: float = 5.0, failures: int = 0) -> Backoff:
    return Backoff(first=first, cap=cap, rng=lambda: 0.0, failures=failures)


class LinkTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.server = FakeServer(self.clock)

    def link(self, backoff: Backoff | None = None) -> CoordinationLink:
        link = CoordinationLink(self.clock, self.server, backoff or no_jitter())
        self.server.link = link
        return link

    def attempt_times(self, until: float) -> list[float]:
        """Run the clock's timers up to ``until``; when the opens meanwhile were attempted."""
        seen = len(self.server.times)
        while (calls := self.clock.getDelayedCalls()) and min(c.getTime() for c in calls) <= until:
            self.clock.advance(min(c.getTime() for c in calls) - self.clock.seconds())
        self.clock.advance(max(0.0, until - self.clock.seconds()))
        return [round(t, 6) for t in self.server.times[seen:]]

    def test_first_open_goes_to_the_caller(self) -> None:
        self.server.down = ConnectionError("Connection refused")
        link = self.link()
        self.failureResultOf(defer.ensureDeferred(link.open()), ConnectionError)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no retry: the caller decides

    def test_reopens_with_backoff_and_resets_after_an_open(self) -> None:
        link = self.link()
        self.successResultOf(defer.ensureDeferred(link.open()))
        self.assertEqual(self.server.told, [False])
        first = self.server.sockets[0]
        self.server.down = ConnectionError("Connection refused")
        first.closed.callback((1006, "server went away"))
        # 0.5 s after the close, then 1, 2, 4 (doubling) while the server is down, capped at 5.
        self.assertEqual(self.attempt_times(13.0), [0.5, 1.5, 3.5, 7.5, 12.5])
        self.assertEqual(self.server.failures, ["Connection refused"] * 5)
        self.server.down = None
        self.attempt_times(17.5)
        self.assertEqual(len(self.server.sockets), 2)
        second = self.server.sockets[1]
        self.assertIs(link.socket, second)
        self.assertEqual(self.server.told, [False, True])
        self.assertEqual(link.opens, 2)
        # Requests go to the websocket that is open.
        link.send(CoordinateRequest(remove_tunnel=None))
        self.assertEqual(len(second.sent), 2)
        self.assertEqual(len(first.sent), 1)
        # The open reset the backoff: the next close waits 0.5 s again.
        second.closed.callback((1006, "again"))
        start = self.clock.seconds()
        times = self.attempt_times(start + 1.0)
        self.assertEqual([round(t - start, 2) for t in times], [0.5])

    def test_start_keeps_trying_from_the_first_open(self) -> None:
        self.server.down = ConnectionError("refused")
        link = self.link(no_jitter(cap=10.0, failures=1))
        link.start()
        self.assertEqual(self.server.attempts, 1)  # at once
        self.assertEqual(self.attempt_times(3.0), [1.0, 3.0])
        self.server.down = None
        self.attempt_times(7.0)
        self.assertEqual(self.server.told, [False])
        self.assertIs(link.socket, self.server.sockets[0])

    def test_handler_may_give_up_for_good(self) -> None:
        self.server.down = PermissionError("not ours")
        self.server.give_up_on = PermissionError
        link = self.link()
        link.start()
        self.assertEqual(self.server.failures, ["not ours"])
        self.clock.advance(60)
        self.assertEqual(self.server.attempts, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_jitter_only_shortens(self) -> None:
        link = self.link(Backoff(first=0.5, cap=5.0, rng=lambda: 1.0))
        self.successResultOf(defer.ensureDeferred(link.open()))
        self.server.sockets[0].closed.callback((1006, ""))
        self.assertEqual(self.attempt_times(0.5), [0.35])

    def test_close_leaves_gracefully_and_stops_reopening(self) -> None:
        link = self.link()
        self.successResultOf(defer.ensureDeferred(link.open()))
        first = self.server.sockets[0]
        self.successResultOf(defer.ensureDeferred(link.close()))
        self.assertTrue(first.left)
        self.assertIsNone(link.socket)
        first.closed.callback((1000, ""))  # the socket's own Deferred was left alone
        self.clock.advance(60)
        self.assertEqual(self.server.attempts, 1)

    def test_close_while_waiting_to_reopen(self) -> None:
        link = self.link()
        self.successResultOf(defer.ensureDeferred(link.open()))
        self.server.sockets[0].closed.callback((1006, ""))
        self.successResultOf(defer.ensureDeferred(link.close()))
        self.clock.advance(60)
        self.assertEqual(self.server.attempts, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopped_while_opening(self) -> None:
        server = SlowServer(self.clock)
        link = CoordinationLink(self.clock, server, no_jitter())
        server.link = link
        link.start()
        link.stop()
        server.gate.callback(None)
        self.assertEqual(server.sockets, [])  # the open was cancelled with the loop
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopped_while_connecting(self) -> None:
        # A TCP connect that is cancelled fails with its own error, not CancelledError.
        server = ConnectingServer(self.clock)
        link = CoordinationLink(self.clock, server, no_jitter())
        server.link = link
        link.start()
        link.stop()
        self.assertEqual(server.failures, [])  # an ending, not a failure
        self.assertEqual(self.clock.getDelayedCalls(), [])  # and no retry scheduled

    def test_an_error_after_opening_keeps_the_socket(self) -> None:
        server = FailingAfterOpen(self.clock)
        link = CoordinationLink(self.clock, server, no_jitter())
        self.successResultOf(defer.ensureDeferred(link.open()))
        self.assertIs(link.socket, server.sockets[0])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SlowServer(FakeServer):
    def __init__(self, clock: task.Clock) -> None:
        super().__init__(clock)
        self.gate: defer.Deferred[None] = defer.Deferred()

    async def open_socket(self) -> FakeSocket:
        await self.gate
        return await super().open_socket()


class ConnectingServer(FakeServer):
    """Its open is a connect in flight, which fails as Twisted's does when cancelled."""

    async def open_socket(self) -> FakeSocket:
        def cancelled(d: defer.Deferred[None]) -> None:
            d.errback(ConnectingCancelledError(None))

        await defer.Deferred(cancelled)
        return await super().open_socket()


class FailingAfterOpen(FakeServer):
    async def socket_opened(self, reopened: bool) -> None:
        raise RuntimeError("the server is still starting")
