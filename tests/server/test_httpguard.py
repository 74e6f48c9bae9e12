"""The HTTP guards on a task.Clock and StringTransports: the request-head deadline, per-source
and total connection caps, the open-file budget."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.resource import Resource

from coderstack.fdlimit import connection_budget
from coderstack.server.admission import Admission
from coderstack.server.httpguard import AdmissionFactory, GuardedSite


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"OK"

    def render_PUT(self, request):
        return b"OK"


def addr(host: str, port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


class HeadDeadlineTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.site = GuardedSite(Hello(), reactor=self.clock)
        self.site.head_timeout = 10.0

    def connect(self):
        channel = self.site.buildProtocol(addr("192.0.2.1"))
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_a_dripped_head_is_cut_off_at_the_deadline(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\n")
        for i in range(9):  # one header line a second: the idle timer alone would never fire
            self.clock.advance(1.0)
            channel.dataReceived(b"X-Drip-%d: 1\r\n" % i)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1.0)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "), transport.value())
        body = json.loads(transport.value().split(b"\r\n\r\n", 1)[1])
        self.assertEqual(set(body), {"message", "detail"})
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(Failure(ConnectionError()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_each_request_on_a_kept_alive_connection_gets_its_own_deadline(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        transport.clear()
        self.clock.advance(30.0)  # idle between requests: only the idle timeout applies
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(9.0)
        channel.dataReceived(b"Host: x\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        self.clock.advance(9.0)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(60.0)  # the site's idle timeout still ends a quiet connection
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(Failure(ConnectionError()))

    def test_the_connection_address_and_tls_are_looked_up_once(self) -> None:
        channel, transport = self.connect()
        asked: list[str] = []
        host = transport.getHost

        def get_host() -> Any:
            asked.append("host")
            return host()

        transport.getHost = get_host  # type: ignore[method-assign]
        first = channel.getHost()
        self.assertIs(channel.getHost(), first)
        self.assertEqual(asked, ["host"])
        self.assertEqual((channel.isSecure(), channel.isSecure()), (False, False))
        channel.connectionLost(Failure(ConnectionError()))

    def test_a_slow_body_is_not_a_slow_head(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n")
        for _ in range(19):  # the body drips for 19 s, past the head deadline
            self.clock.advance(1.0)
            channel.dataReceived(b"x")
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"x")
        self.assertNotIn(b"408", transport.value())
        channel.connectionLost(Failure(ConnectionError()))

    def test_a_connection_that_never_speaks_ends_at_the_idle_timeout(self) -> None:
        channel, transport = self.connect()
        self.clock.advance(59.0)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1.0)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        channel.connectionLost(Failure(ConnectionError()))


class AdmissionTests(unittest.SynchronousTestCase):
    def test_per_source_and_total_caps(self) -> None:
        a = Admission(per_source=2, max_open=3)
        self.assertEqual([a.admit("10.0.0.1") for _ in range(2)], [None, None])
        self.assertIn("2 connections per source", a.admit("10.0.0.1"))
        self.assertIsNone(a.admit("10.0.0.2"))
        self.assertIn("limit of 3 open connections", a.admit("10.0.0.3"))
        a.release("10.0.0.1")
        self.assertIsNone(a.admit("10.0.0.3"))
        a.release("10.0.0.9")  # never admitted: ignored
        self.assertEqual((a.open, a.refused), (3, {"source": 1, "total": 1}))
        for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
            a.release(host)
        self.assertEqual((a.open, a.sources()), (0, 0))

    def test_zero_means_no_per_source_cap(self) -> None:
        a = Admission(per_source=0, max_open=1000)
        self.assertEqual({a.admit("10.0.0.1") for _ in range(500)}, {None})

    def test_spare_slots_past_the_mark_are_for_new_sources_only(self) -> None:
        a = Admission(per_source=10, max_open=4, spare=2)
        for host in ("10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"):
            self.assertIsNone(a.admit(host))
        self.assertIsNotNone(a.admit("10.0.0.1"))  # holds some: refused at the mark
        self.assertIsNone(a.admit("192.0.2.9"))  # a new source (a health check) still gets in
        self.assertIsNotNone(a.admit("192.0.2.9"))
        self.assertIsNone(a.admit("192.0.2.10"))
        self.assertIsNotNone(a.admit("192.0.2.11"))  # spares used up: the hard ceiling
        self.assertEqual(a.open, 6)

    def test_budget_keeps_a_reserve_below_the_fd_limit(self) -> None:
        self.assertEqual(connection_budget(1024), (1024 - 102, 51))
        self.assertEqual(connection_budget(400), (400 - 64, 32))
        self.assertEqual(connection_budget(20), (16, 0))
        self.assertEqual(connection_budget(1 << 20)[0], (1 << 20) - (1 << 20) // 10)


class AdmissionFactoryTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.admission = Admission(per_source=2, max_open=100)
        self.factory = AdmissionFactory(GuardedSite(Hello(), reactor=self.clock), self.admission)

    def connect(self, host: str):
        p = self.factory.buildProtocol(addr(host))
        t = StringTransport()
        p.makeConnection(t)
        return p, t

    def test_a_source_over_its_cap_is_answered_503_and_closed(self) -> None:
        (p1, _), (p2, _) = self.connect("10.0.0.1"), self.connect("10.0.0.1")
        p3, t3 = self.connect("10.0.0.1")
        self.assertTrue(t3.value().startswith(b"HTTP/1.1 503 "), t3.value())
        self.assertIn(b"Retry-After: 1", t3.value())
        self.assertTrue(t3.disconnecting)
        # Another source still gets a full answer.
        p4, t4 = self.connect("10.0.0.2")
        p4.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", t4.value())
        # A closed connection frees its slot.
        p1.connectionLost(Failure(ConnectionError()))
        self.assertEqual(self.admission.connections_from("10.0.0.1"), 1)
        p5, t5 = self.connect("10.0.0.1")
        self.assertEqual(t5.value(), b"")
        for p in (p2, p4, p5):
            p.connectionLost(Failure(ConnectionError()))
        self.assertEqual(self.admission.open, 0)

    def test_a_tls_listener_just_closes_a_refused_connection(self) -> None:
        factory = AdmissionFactory(GuardedSite(Hello(), reactor=self.clock), Admission(1, 100),
                                   answer_refusals=False)
        first = factory.buildProtocol(addr("10.0.0.1"))
        first.makeConnection(StringTransport())
        refused = factory.buildProtocol(addr("10.0.0.1"))
        t = StringTransport()
        refused.makeConnection(t)
        self.assertEqual((t.value(), t.disconnecting), (b"", True))
