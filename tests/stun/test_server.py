"""The STUN responder (pure), its DatagramProtocol, address options, and a loopback socket."""

from __future__ import annotations

import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from coderstack.stun.address import (
    STUNAddressError,
    parse_host_port,
    parse_stun_listen_address,
    parse_stun_listen_addresses,
    parse_stun_server_list,
)
from coderstack.stun.ratelimit import TokenBuckets
from coderstack.stun.server import STUNResponder, STUNServerProtocol, listen_stun
from coderstack.wire import stun

SRC = ("192.0.2.10", 40000)


class ResponderTests(unittest.TestCase):
    def test_answers_generic_request_without_software_or_fingerprint(self) -> None:
        # What turnutils_stunclient sends: a bare 20-byte header.
        tid = b"\x01" * 12
        data = struct.pack("!HHI", 0x0001, 0, stun.MAGIC_COOKIE) + tid
        r = STUNResponder()
        resp = stun.parse_response(r.handle(data, SRC, 0.0))
        self.assertEqual(resp.transaction_id, tid)
        self.assertEqual(resp.mapped, SRC)
        self.assertEqual(r.counters.answered, 1)

    def test_answers_tailscale_style_request(self) -> None:
        tid, data = stun.binding_request(software=b"tailnode")
        reply = STUNResponder().handle(data, ("2001:db8::5", 7), 0.0)
        msg = stun.decode(reply)
        self.assertTrue(msg.fingerprint)
        self.assertEqual(stun.mapped_address(msg), ("2001:db8::5", 7))

    def test_rfc5769_sample_request_is_answered(self) -> None:
        from tests.wire.test_stun import SAMPLE_REQUEST, TXID

        resp = stun.parse_response(STUNResponder().handle(SAMPLE_REQUEST, SRC, 0.0))
        self.assertEqual(resp.transaction_id, TXID)
        self.assertEqual(resp.mapped, SRC)

    def test_unknown_comprehension_required_gets_420(self) -> None:
        req = stun.Message(stun.METHOD_BINDING, stun.CLASS_REQUEST, b"\x02" * 12,
                           ((0x7001, b"x"), (0x8FFF, b"optional-is-fine"), (0x0042, b"")))
        r = STUNResponder()
        resp = stun.parse_response(r.handle(stun.encode(req), SRC, 0.0))
        self.assertEqual(resp.error[0], 420)
        self.assertEqual(resp.unknown_attributes, (0x7001, 0x0042))
        self.assertEqual((r.counters.errors_sent, r.counters.answered), (1, 0))

    def test_classic_rfc3489_request(self) -> None:
        tid = b"\x33" * 16
        no_change = struct.pack("!HHI", 3, 4, 0)
        data = struct.pack("!HH", 1, len(no_change)) + tid + no_change
        msg = stun.decode(STUNResponder().handle(data, SRC, 0.0))
        self.assertTrue(msg.classic)
        self.assertEqual(msg.transaction_id, tid)
        self.assertEqual(stun.mapped_address(msg), SRC)
        self.assertIsNone(msg.get(stun.ATTR_SOFTWARE))

    def test_change_request_we_cannot_honour(self) -> None:
        change_ip = struct.pack("!HHI", 3, 4, 4)
        # RFC 5389+ client: 420 (RFC 5780).
        req = stun.Message(stun.METHOD_BINDING, stun.CLASS_REQUEST, b"\x45" * 12,
                           ((stun.ATTR_CHANGE_REQUEST, change_ip[4:]),))
        msg = stun.decode(STUNResponder().handle(stun.encode(req), SRC, 0.0))
        self.assertEqual(msg.cls, stun.CLASS_ERROR)
        self.assertEqual(stun.decode_error_code(msg.get(stun.ATTR_ERROR_CODE))[0], 420)
        self.assertEqual(stun.decode_unknown_attributes(msg.get(stun.ATTR_UNKNOWN_ATTRIBUTES)),
                         [stun.ATTR_CHANGE_REQUEST])
        # Classic RFC 3489 client: silence.
        data = struct.pack("!HH", 1, len(change_ip)) + b"\x44" * 16 + change_ip
        r = STUNResponder()
        self.assertIsNone(r.handle(data, SRC, 0.0))
        self.assertEqual(r.counters.ignored, 1)

    def test_other_methods_get_400(self) -> None:
        req = stun.Message(0x003, stun.CLASS_REQUEST, b"\x05" * 12)  # TURN Allocate
        msg = stun.decode(STUNResponder().handle(stun.encode(req), SRC, 0.0))
        self.assertEqual((msg.method, msg.cls), (0x003, stun.CLASS_ERROR))

    def test_responses_and_indications_are_ignored(self) -> None:
        r = STUNResponder()
        for cls in (stun.CLASS_SUCCESS, stun.CLASS_INDICATION, stun.CLASS_ERROR):
            m = stun.Message(stun.METHOD_BINDING, cls, b"\x06" * 12)
            self.assertIsNone(r.handle(stun.encode(m), SRC, 0.0))
        self.assertEqual(r.counters.ignored, 3)

    def test_malformed_dropped_and_counted(self) -> None:
        r = STUNResponder()
        for junk in (b"", b"\x01\x00\x00\x00" + b"\x00" * 144, b"\xff" * 20):
            self.assertIsNone(r.handle(junk, SRC, 0.0))
        self.assertEqual(r.counters.dropped_malformed, 3)

    def test_rate_limit_per_source(self) -> None:
        r = STUNResponder(rate=10, burst=5)
        _, data = stun.binding_request()
        answers = [r.handle(data, SRC, 0.0) for _ in range(8)]
        self.assertEqual(sum(a is not None for a in answers), 5)
        self.assertEqual(r.counters.rate_limited, 3)
        # Another source is not affected.
        self.assertIsNotNone(r.handle(data, ("192.0.2.11", 1), 0.0))
        # After 0.25 s at 10/s, two more tokens.
        later = [r.handle(data, SRC, 0.25) for _ in range(3)]
        self.assertEqual(sum(a is not None for a in later), 2)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=120))
    def test_garbage_never_raises(self, data: bytes) -> None:
        STUNResponder().handle(data, SRC, 0.0)


class TokenBucketTests(unittest.TestCase):
    def test_table_is_bounded(self) -> None:
        tb = TokenBuckets(rate=1, burst=1, max_sources=3)
        for i in range(10):
            tb.allow(f"10.0.0.{i}", 0.0)
        self.assertEqual(len(tb), 3)

    def test_refill_caps_at_burst(self) -> None:
        tb = TokenBuckets(rate=100, burst=2)
        self.assertTrue(tb.allow("a", 0))
        self.assertTrue(tb.allow("a", 0))
        self.assertFalse(tb.allow("a", 0))
        self.assertTrue(tb.allow("a", 1000))
        self.assertTrue(tb.allow("a", 1000))
        self.assertFalse(tb.allow("a", 1000))


class FakeUDPTransport:
    def __init__(self, fail: bool = False) -> None:
        self.written: list[tuple[bytes, tuple]] = []
        self.fail = fail

    def write(self, data: bytes, addr) -> None:
        if self.fail:
            raise BlockingIOError(11, "EAGAIN")
        self.written.append((data, addr))


class ProtocolTests(unittest.TestCase):
    def test_uses_injected_clock_for_rate_limit(self) -> None:
        clock = task.Clock()
        proto = STUNServerProtocol(STUNResponder(rate=1, burst=1), clock)
        proto.transport = FakeUDPTransport()
        _, data = stun.binding_request()
        proto.datagramReceived(data, SRC)
        proto.datagramReceived(data, SRC)
        self.assertEqual(len(proto.transport.written), 1)
        clock.advance(1.0)
        proto.datagramReceived(data, SRC)
        self.assertEqual(len(proto.transport.written), 2)
        self.assertEqual(proto.transport.written[0][1], SRC)
        self.assertEqual(proto.counters.rate_limited, 1)

    def test_send_failure_is_counted_not_raised(self) -> None:
        proto = STUNServerProtocol(STUNResponder(), task.Clock())
        proto.transport = FakeUDPTransport(fail=True)
        proto.datagramReceived(stun.binding_request()[1], ("2001:db8::1", 9, 0, 0))
        self.assertEqual(proto.counters.send_failed, 1)


class LoopbackTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_real_socket_round_trip(self):
        port = listen_stun(reactor, "127.0.0.1", 0)
        self.addCleanup(port.stopListening)
        server_port = port.getHost().port

        def blocking_query() -> tuple[bytes, tuple]:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.bind(("127.0.0.1", 0))
                s.settimeout(5)
                _, data = stun.binding_request(b"\x0a" * 12)
                s.sendto(data, ("127.0.0.1", server_port))
                reply, _ = s.recvfrom(2048)
                return reply, s.getsockname()
            finally:
                s.close()

        reply, local = yield threads.deferToThread(blocking_query)
        resp = stun.parse_response(reply)
        self.assertEqual(resp.mapped, local)
        self.assertEqual(port.protocol.counters.answered, 1)


class AddressOptionTests(unittest.TestCase):
    def test_host_port_forms(self) -> None:
        self.assertEqual(parse_host_port("stun.l.google.com:19302"), ("stun.l.google.com", 19302))
        self.assertEqual(parse_host_port("[2001:db8::1]:3478"), ("2001:db8::1", 3478))
        self.assertEqual(parse_host_port("192.0.2.1:1"), ("192.0.2.1", 1))

    def test_bad_values(self) -> None:
        for bad in ("", "host", "host:", "host:x", "host:70000", "host:0", "2001:db8::1:3478",
                    "[2001:db8::1]3478", "[192.0.2.1]:3478", "bad host:1", "-x.example:1"):
            with self.assertRaises(STUNAddressError, msg=bad):
                parse_host_port(bad)

    def test_listen_address(self) -> None:
        self.assertEqual(parse_stun_listen_address("", "127.0.0.1:3000"), ("127.0.0.1", 3478))
        self.assertEqual(parse_stun_listen_address(None, "[::1]:3000"), ("::1", 3478))
        self.assertEqual(parse_stun_listen_address(":0", "127.0.0.1:3000"), ("127.0.0.1", 0))
        self.assertEqual(parse_stun_listen_address("0.0.0.0:3479", "127.0.0.1:3000"),
                         ("0.0.0.0", 3479))
        self.assertIsNone(parse_stun_listen_address("disable", "127.0.0.1:3000"))
        self.assertIsNone(parse_stun_listen_address("DISABLE", "127.0.0.1:3000"))
        with self.assertRaises(STUNAddressError) as cm:
            parse_stun_listen_address("stun.example.com:3478", "127.0.0.1:3000")
        self.assertIn("IP address", str(cm.exception))

    def test_listen_addresses_default_to_two_ports(self) -> None:
        # Two ports of one server let netcheck compare mappings (hard NAT) with no other server.
        self.assertEqual(parse_stun_listen_addresses(None, "127.0.0.1:3000"),
                         [("127.0.0.1", 3478), ("127.0.0.1", 3479)])
        self.assertEqual(parse_stun_listen_addresses("", "[::1]:3000"), [("::1", 3478), ("::1", 3479)])
        self.assertEqual(parse_stun_listen_addresses(":5000", "127.0.0.1:3000"), [("127.0.0.1", 5000)])
        self.assertEqual(parse_stun_listen_addresses("0.0.0.0:3478, :4000", "127.0.0.1:3000"),
                         [("0.0.0.0", 3478), ("127.0.0.1", 4000)])
        self.assertEqual(parse_stun_listen_addresses(":0,:0", "127.0.0.1:3000"),
                         [("127.0.0.1", 0), ("127.0.0.1", 0)])
        self.assertEqual(parse_stun_listen_addresses("disable", "127.0.0.1:3000"), [])
        for bad in (":1,,:2", "disable,:1", ":1,:1", ":1,stun.example.com:2", ":1,:x"):
            with self.assertRaises(STUNAddressError, msg=bad):
                parse_stun_listen_addresses(bad, "127.0.0.1:3000")

    def test_server_list(self) -> None:
        self.assertEqual(parse_stun_server_list("disable"), [])
        self.assertEqual(parse_stun_server_list(""), [])
        self.assertEqual(
            parse_stun_server_list("stun.l.google.com:19302, [2001:db8::2]:3478"),
            [("stun.l.google.com", 19302), ("2001:db8::2", 3478)],
        )
        for bad in ("a:1,,b:2", "disable,a:1", "a:1,b"):
            with self.assertRaises(STUNAddressError, msg=bad):
                parse_stun_server_list(bad)
