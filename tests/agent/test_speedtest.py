"""Speedtest protocol (Tailscale net/speedtest v2): codec, interval meter, and both directions over loopback."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from coderstack.agent import speedtest as st_mod
from coderstack.agent.speedtest import (
    BLOCK_SIZE,
    DOWNLOAD,
    UPLOAD,
    IntervalMeter,
    SpeedtestError,
    SpeedtestServerFactory,
    encode_config,
    parse_config,
    run_speedtest,
)


class CodecTests(unittest.TestCase):
    def test_config_round_trip_and_wire_shape(self):
        line = encode_config(UPLOAD, 5.0)
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(json.loads(line), {"version": 2, "time": 5_000_000_000, "direction": 1})
        self.assertEqual(parse_config(line), st_mod.Config(2, 5.0, UPLOAD))

    def test_bad_configs(self):
        for line, why in [
            (b"nope", "invalid config"),
            (b'{"version": 1, "time": 1000000000, "direction": 0}', "version mismatch! Server is version 2, client is version 1"),
            (b'{"version": 2, "time": 0, "direction": 0}', "invalid config: time"),
            (b'{"version": 2, "time": 1000000000000, "direction": 0}', "invalid config: time"),
            (b'{"version": 2, "time": 1000000000, "direction": 7}', "invalid config: direction"),
            (b"[2]", "invalid config: not an object"),
        ]:
            with self.assertRaises(SpeedtestError) as cm:
                parse_config(line)
            self.assertIn(why, str(cm.exception))

    @given(st.binary(max_size=200))
    def test_garbage_only_raises_speedtest_error(self, data):
        try:
            parse_config(data)
        except SpeedtestError:
            pass

    def test_server_answers_error_and_closes(self):
        proto = SpeedtestServerFactory(Clock()).buildProtocol(None)
        tr = StringTransport()
        proto.makeConnection(tr)
        proto.dataReceived(b'{"version": 9, "time": 1000000000, "direction": 0}\n')
        self.assertEqual(json.loads(tr.value())["error"], "version mismatch! Server is version 2, client is version 9")
        self.assertTrue(tr.disconnecting)
        self.assertEqual(proto.errors, 1)

    def test_server_rejects_endless_line(self):
        proto = SpeedtestServerFactory(Clock()).buildProtocol(None)
        tr = StringTransport()
        proto.makeConnection(tr)
        proto.dataReceived(b"x" * 5000)
        self.assertIn(b"too long", tr.value())
        self.assertTrue(tr.disconnecting)

    def test_server_upload_gives_up_after_duration_plus_grace(self):
        clock = Clock()
        proto = SpeedtestServerFactory(clock).buildProtocol(None)
        tr = StringTransport()
        tr.abortConnection = lambda: setattr(tr, "aborted", True)
        proto.makeConnection(tr)
        proto.dataReceived(encode_config(UPLOAD, 2.0))
        self.assertEqual(tr.value(), b"{}\n")
        clock.advance(6.9)
        self.assertFalse(getattr(tr, "aborted", False))
        clock.advance(0.2)
        self.assertTrue(tr.aborted)


class MeterTests(unittest.TestCase):
    def test_intervals_close_after_one_second_and_total(self):
        m = IntervalMeter(64.0)
        m.add(10, 64.5)
        m.add(10, 65.0)    # 1 s since start: closes [0, 1]
        m.add(5, 65.75)
        m.add(5, 66.25)    # closes [1, 2.25]
        m.add(3, 66.5)
        r = m.finish()     # unfinished 0.25 s interval kept
        self.assertEqual(r.intervals, [(0.0, 1.0, 20), (1.0, 2.25, 10), (2.25, 2.5, 3)])
        self.assertEqual(r.total, (0.0, 2.5, 33))
        for a, b in zip(r.intervals, r.intervals[1:], strict=False):
            self.assertAlmostEqual(a[1], b[0])

    def test_tiny_tail_dropped_but_counted_in_total(self):
        m = IntervalMeter(0.0)
        m.add(100, 1.0)
        m.add(7, 1.005)
        r = m.finish()
        self.assertEqual(r.intervals, [(0.0, 1.0, 100)])
        self.assertEqual(r.total, (0.0, 1.005, 107))

    def test_too_short_test_has_no_total(self):
        m = IntervalMeter(0.0)
        m.add(1, 0.001)
        self.assertIsNone(m.finish().total)


class LoopbackTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        factory = SpeedtestServerFactory()
        self.servers: list[st_mod.SpeedtestServerProtocol] = []
        self.closed: list[defer.Deferred] = []
        closed = self.closed
        build = factory.buildProtocol

        def tracked(addr):
            proto = build(addr)
            self.servers.append(proto)
            lost, d = proto.connectionLost, defer.Deferred()
            closed.append(d)

            def connection_lost(reason=None):
                lost(reason)
                d.callback(None)
            proto.connectionLost = connection_lost
            return proto
        factory.buildProtocol = tracked
        # The client may finish before the server has seen the close: wait for the server side.
        self.addCleanup(lambda: defer.gatherResults(closed))
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)

    @defer.inlineCallbacks
    def check(self, result, duration):
        """The result's shape, and its byte count against the server's own (not a speed)."""
        self.assertGreaterEqual(len(result.intervals), 1)
        start, end, total = result.total
        self.assertEqual(start, 0.0)
        self.assertGreater(end, duration - 0.2)  # the receiver starts after the sender
        self.assertEqual(total, sum(b for _, _, b in result.intervals))
        self.assertAlmostEqual(result.intervals[-1][1], end)
        self.assertGreaterEqual(result.intervals[0][1] - result.intervals[0][0], 1.0)
        for a, b in zip(result.intervals, result.intervals[1:], strict=False):
            self.assertAlmostEqual(a[1], b[0])
        # Whichever way the bytes went, both ends counted the same number: whole blocks.
        yield self.closed[0]
        server = self.servers[0].meter
        self.assertEqual(total, server.total_bytes + server.interval_bytes)
        self.assertGreaterEqual(total, BLOCK_SIZE)  # the sender writes at least one block
        self.assertEqual(total % BLOCK_SIZE, 0)

    @defer.inlineCallbacks
    def test_download(self):
        result = yield defer.ensureDeferred(run_speedtest(self.endpoint, DOWNLOAD, 1.2))
        yield self.check(result, 1.2)

    @defer.inlineCallbacks
    def test_upload(self):
        result = yield defer.ensureDeferred(run_speedtest(self.endpoint, UPLOAD, 1.2))
        yield self.check(result, 1.2)

    @defer.inlineCallbacks
    def test_refused_config_is_an_error(self):
        with self.assertRaises(SpeedtestError) as cm:
            yield defer.ensureDeferred(run_speedtest(self.endpoint, DOWNLOAD, 1000.0))
        self.assertEqual(str(cm.exception), "invalid config: time")
