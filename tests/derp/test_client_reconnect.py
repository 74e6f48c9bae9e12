"""``DERPClient.reconnect``: after a network change the connection is dropped without a goodbye
and dialled again at once (no backoff), also while an attempt is under way; and the delays of
the retries that do back off."""

from __future__ import annotations

import random

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from coderstack.derp.client import DERPClient, DERPClientHandler
from coderstack.derp.policy import AllowAllPolicy
from coderstack.derpmap import DERPNode, DERPRegion
from coderstack.wire import derp as w
from tests.support.waiting import wait_until

from .helpers import RelayServer, start_client


class ReconnectTests(unittest.TestCase):
    timeout = 15
    def _reconnects_and_still_relays(self, websocket: bool) -> defer.Deferred:
        server = RelayServer(self, AllowAllPolicy())

        async def go() -> None:
            # A backoff long enough that only an immediate redial can pass this test in time.
            a, ra = start_client(self, server, force_websockets=websocket, min_backoff=600, max_backoff=600)
            b, rb = start_client(self, server)
            await wait_until(lambda: a.connected and b.connected, "both logins")
            self.assertEqual(a.local_address(), "127.0.0.1")
            a.reconnect()
            self.assertFalse(a.connected)
            self.assertIsNone(a.local_address())
            self.assertEqual(len(ra.disconnects), 1)
            self.assertIsNone(a._retry)  # dialling now, not waiting out a backoff
            await wait_until(lambda: a.connected, "the login again")
            self.assertEqual((a.connects, a.reconnects, len(ra.connects)), (2, 1, 2))
            self.assertEqual(ra.connects[-1][2], websocket)
            b.send(a.public_key, b"after")
            await wait_until(lambda: ra.packets, "the packet after the reconnect")
            self.assertEqual(ra.packets, [(b.public_key, b"after")])
            self.assertEqual(len(ra.disconnects), 1)  # the old connection's end was not reported twice

        return defer.ensureDeferred(go())

    def test_reconnect_upgrade(self) -> defer.Deferred:
        return self._reconnects_and_still_relays(False)

    def test_reconnect_websocket(self) -> defer.Deferred:
        return self._reconnects_and_still_relays(True)

    def test_reconnect_cancels_the_attempt_under_way(self) -> defer.Deferred:
        accepted: list[Protocol] = []

        class Silent(Protocol):
            def connectionMade(self) -> None:
                accepted.append(self)

        port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        node = DERPNode("1a", 1, "127.0.0.1", derp_port=port.getHost().port, force_http=True, stun_port=-1)
        region = DERPRegion(1, "x", "x", (node,))
        server = RelayServer(self, AllowAllPolicy())

        async def go() -> None:
            a, ra = start_client(self, server, region=region)
            await wait_until(lambda: len(accepted) == 1, "the first connection")  # stuck waiting for the upgrade answer
            a.reconnect()
            await wait_until(lambda: len(accepted) == 2, "the second connection")
            await wait_until(lambda: accepted[0].transport.disconnected, "the first connection to be dropped")
            self.assertFalse(accepted[1].transport.disconnected)
            self.assertEqual(ra.connects, [])
            self.assertNotIn("cancelled", a.last_error)

        return defer.ensureDeferred(go())

    def test_reconnect_after_stop_does_nothing(self) -> defer.Deferred:
        server = RelayServer(self, AllowAllPolicy())

        async def go() -> None:
            a, ra = start_client(self, server)
            await wait_until(lambda: a.connected, "the login")
            await a.stop()
            a.reconnect()
            self.assertEqual(a.reconnects, 0)
            self.assertFalse(a.connected)
            self.assertIsNone(a._retry)

        return defer.ensureDeferred(go())


class _Ignore(DERPClientHandler):
    pass


class _Highest(random.Random):
    def random(self) -> float:
        return 1.0  # the most jitter: each delay halved


class RetryDelayTests(unittest.TestCase):
    """The retry delays come from Backoff: 0.5 s doubling to 10 s, jitter shortening by up to half."""

    def _delays(self, client: DERPClient, clock: Clock, n: int) -> list[float]:
        out = []
        for _ in range(n):
            client._schedule_retry()
            assert client._retry is not None
            out.append(client._retry.getTime() - clock.seconds())
            client._retry.cancel()
            client._retry = None
        return out

    def test_doubling_to_the_cap_with_injected_rng(self) -> None:
        clock = Clock()
        node = DERPNode("1a", 1, "127.0.0.1", derp_port=1, force_http=True, stun_port=-1)
        client = DERPClient(clock, DERPRegion(1, "x", "x", (node,)), w.generate_private_key(),
                            _Ignore(), rng=_Highest())
        client._running = True  # as after start(), without dialing
        self.assertEqual(self._delays(client, clock, 7), [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0])
        client._restart_hint = 3.0  # the server's Restarting frame asked for 3 s
        self.assertEqual(self._delays(client, clock, 1), [3.0])
        client.backoff.reset()  # a login
        self.assertEqual(self._delays(client, clock, 1), [0.25])
