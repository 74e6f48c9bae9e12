"""Codecs: checksum, IPv6 walking, TCP options, UDP, ICMPv6; scoreboard and reassembly; fuzzing."""

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.netstack import checksum, icmpv6, ipv6, tcpsegment, udp
from coderstack.netstack.reassembly import Reassembly
from coderstack.netstack.sack import Scoreboard
from coderstack.netstack.stack import Stack, to_address
from coderstack.netstack.tcpsegment import ACK, SYN, Options, Segment

A = to_address("fd00::1")
B = to_address("fd00::2")


def naive_checksum(src, dst, nh, msg):
    data = src + dst + struct.pack("!IxxxB", len(msg), nh) + msg
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


class ChecksumTests(unittest.TestCase):
    @given(st.binary(max_size=3000))
    def test_matches_rfc1071_loop(self, data):
        msg = b"\x00\x01\x00\x00" + data
        fast = checksum.finish(checksum.pseudo_header_sum(A, B, 17, len(msg)) + checksum.sum_bytes(msg))
        self.assertEqual(fast, (~naive_checksum(A, B, 17, msg) & 0xFFFF) or 0xFFFF)

    @given(st.binary(max_size=2000), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
    def test_built_segments_verify(self, data, seq, ack):
        pkt = Segment(1, 2, seq, ack, ACK, 100, Options(ts=(5, 6)), data).encode(A, B)
        self.assertTrue(checksum.verify(A, B, 6, pkt[40:]))
        self.assertEqual(naive_checksum(A, B, 6, pkt[40:]), 0xFFFF)


class IPv6Tests(unittest.TestCase):
    def test_extension_headers_skipped(self):
        payload = b"\x3c\x00" + b"\0" * 6 + b"\x3a\x01" + b"\0" * 14 + b"ICMP"  # hop-by-hop, dst opts
        pkt = ipv6.HEADER.pack(0x60000000, len(payload), 0, 64, A, B) + payload
        src, dst, nh, off, end, hop = ipv6.parse(pkt)
        self.assertEqual((src, dst, nh, off, end), (A, B, 58, 64, len(pkt)))

    def test_fragment_refused_and_counted(self):
        frag = b"\x11\x00\x00\x01\x00\x00\x00\x07" + b"data"
        pkt = ipv6.HEADER.pack(0x60000000, len(frag), 44, 64, B, A) + frag
        self.assertRaises(ipv6.Refused, ipv6.parse, pkt)
        stack = Stack(A, lambda p: None)
        stack.receive(pkt, 0.0)
        self.assertEqual(stack.stats["ip_refused"], 1)

    def test_truncated(self):
        pkt = ipv6.build(A, B, 17, b"x" * 20)[:-5]
        self.assertRaises(ipv6.Malformed, ipv6.parse, pkt)

    def test_not_for_us(self):
        stack = Stack(A, lambda p: None)
        stack.receive(udp.build(B, B, 1, 2, b"x"), 0.0)
        self.assertEqual(stack.stats["ip_not_for_us"], 1)


class TCPOptionTests(unittest.TestCase):
    @given(
        st.one_of(st.none(), st.integers(0, 0xFFFF)),
        st.one_of(st.none(), st.integers(0, 14)),
        st.booleans(),
        st.one_of(st.none(), st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))),
        st.lists(st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)), max_size=3),
    )
    def test_round_trip(self, mss, ws, sackp, ts, sack):
        if ts is not None and len(sack) > 3:
            sack = sack[:3]
        opts = tcpsegment.build_options(mss, ws, sackp, ts, sack)
        self.assertEqual(len(opts) % 4, 0)
        got = tcpsegment.parse_options(opts, 0, len(opts))
        self.assertEqual((got.mss, got.wscale, got.sack_permitted, got.ts, got.sack), (mss, ws, sackp, ts, sack))

    @given(st.binary(max_size=60))
    def test_garbage_options(self, data):
        try:
            tcpsegment.parse_options(data, 0, len(data))
        except tcpsegment.Malformed:
            pass

    def test_bad_checksum_dropped_and_counted(self):
        stack = Stack(A, lambda p: None)
        pkt = bytearray(Segment(1, 80, 0, 0, SYN, 100).encode(B, A))
        pkt[-1] ^= 1
        stack.receive(bytes(pkt), 0.0)
        self.assertEqual(stack.stats["tcp_bad_checksum"], 1)

    def test_an_authenticated_stack_skips_the_check(self):
        # A stack fed only by WireGuard: the SYN's checksum is not looked at, so the listener
        # answers it (a SYN-ACK goes out) instead of the segment being dropped.
        sent = []
        stack = Stack(A, sent.append, verify_tcp_checksum=False)
        stack.listen(80, lambda conn: None)
        pkt = bytearray(Segment(1, 80, 0, 0, SYN, 100).encode(B, A))
        pkt[40 + 16] ^= 0xFF  # the checksum field itself
        stack.receive(bytes(pkt), 0.0)
        self.assertEqual(stack.stats["tcp_bad_checksum"], 0)
        self.assertEqual(len(sent), 1)
        answer = Segment.decode(A, B, sent[0][40:])
        self.assertEqual(answer.flags & (SYN | ACK), SYN | ACK)


class UDPAndICMPTests(unittest.TestCase):
    def test_udp_round_trip_and_unreachable(self):
        out = []
        stack = Stack(A, out.append)
        got = []

        class H:
            def datagram_received(self, data, addr):
                got.append((data, addr))

        sock = stack.udp_bind(53, H())
        stack.receive(udp.build(B, A, 1234, 53, b"query"), 0.0)
        self.assertEqual(got, [(b"query", (B, 1234))])
        sock.sendto(b"answer", B, 1234)
        self.assertEqual(udp.parse(A, B, out[-1][40:]), (53, 1234, b"answer"))
        stack.receive(udp.build(B, A, 1234, 54, b"nobody"), 0.0)
        self.assertEqual(out[-1][40], icmpv6.DEST_UNREACHABLE)
        self.assertEqual(stack.stats["udp_no_socket"], 1)

    def test_udp_zero_checksum_refused(self):
        stack = Stack(A, lambda p: None)
        stack.udp_bind(53, None)
        pkt = ipv6.build(B, A, 17, struct.pack("!HHHH", 1, 53, 9, 0) + b"x")
        stack.receive(pkt, 0.0)
        self.assertEqual(stack.stats["udp_malformed"], 1)

    def test_echo(self):
        out = []
        stack = Stack(A, out.append)
        stack.receive(icmpv6.build_echo(B, A, icmpv6.ECHO_REQUEST, 7, 9, b"ping"), 0.0)
        (reply,) = out
        self.assertTrue(checksum.verify(A, B, 58, reply[40:]))
        self.assertEqual(icmpv6.parse_echo(reply[40:]), (icmpv6.ECHO_REPLY, 7, 9, b"ping"))

    def test_packet_too_big_lowers_mss(self):
        from .scripted import Peer

        p = Peer(config=None)
        p.stack.config.mtu = 9000
        h, conn, synack = p.passive_open(options=Options(mss=8940))
        p.take()
        self.assertEqual(conn.mss, 8940)
        conn.write(bytes(20000))
        conn.flush(p.now)
        (first, *_rest) = [pkt for pkt in p.out]
        p.out.clear()
        p.stack.receive(icmpv6.build_error(B, A, icmpv6.PACKET_TOO_BIG, 0, 1400, first), p.now)
        self.assertEqual(conn.mtu, 1400)
        self.assertEqual(conn.mss, 1340)
        segs = p.take()
        self.assertTrue(segs)
        self.assertTrue(all(len(s.data) <= 1340 for s in segs))
        self.assertEqual(segs[0].seq, synack.seq + 1)


class ScoreboardTests(unittest.TestCase):
    def test_merge_and_advance(self):
        sb = Scoreboard()
        self.assertEqual(sb.add(100, 200), 100)
        self.assertEqual(sb.add(300, 400), 100)
        self.assertEqual(sb.add(150, 350), 100)  # fills the gap, merging both
        self.assertEqual(sb.ranges, [[100, 400]])
        self.assertEqual(sb.add(100, 400), 0)
        sb.add(500, 600)
        self.assertEqual(sb.next_hole(0, 700), (0, 100))
        self.assertEqual(sb.next_hole(100, 700), (400, 500))
        self.assertEqual(sb.sacked_between(350, 550), 100)
        sb.advance(150)
        self.assertEqual(sb.ranges, [[150, 400], [500, 600]])
        self.assertEqual(sb.sacked, 350)
        self.assertEqual(sb.lost_edge(0, 300), 150)
        self.assertEqual(sb.lost_edge(0, 100), 500)

    @given(st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 200)), max_size=30), st.integers(0, 1200))
    def test_model(self, blocks, una):
        sb = Scoreboard()
        held = set()
        for s, n in blocks:
            added = sb.add(s, s + n)
            new = set(range(s, s + n)) - held
            self.assertEqual(added, len(new))
            held |= new
        sb.advance(una)
        held = {x for x in held if x >= una}
        self.assertEqual(sb.sacked, len(held))
        self.assertEqual({x for s, e in sb.ranges for x in range(s, e)}, held)


class ReassemblyTests(unittest.TestCase):
    @given(st.randoms(use_true_random=False), st.integers(1, 40))
    @settings(max_examples=50)
    def test_any_arrival_order(self, rnd, pieces):
        data = bytes(random.Random(pieces).randbytes(pieces * 37))
        cuts = sorted(rnd.sample(range(1, len(data)), min(pieces - 1, len(data) - 1))) if pieces > 1 else []
        bounds = list(zip([0, *cuts], [*cuts, len(data)], strict=True))
        segs = [(s, data[s:e]) for s, e in bounds]
        segs += rnd.sample(segs, len(segs) // 3)  # duplicates
        rnd.shuffle(segs)
        r = Reassembly()
        nxt, out = 0, []
        for s, d in segs:
            if s + len(d) <= nxt:
                continue
            if s <= nxt:
                d = d[nxt - s :]
                out.append(d)
                nxt += len(d)
                nxt, more = r.pop(nxt)
                out += more
            else:
                r.add(s, d)
                blocks = r.blocks(3)
                self.assertLessEqual(len(blocks), 3)
                # every block is a maximal run of what is held, the newest arrival's block first
                held = sorted((x, x + len(y)) for x, y in r.segments)
                runs = []
                for x, y in held:
                    if runs and runs[-1][1] == x:
                        runs[-1][1] = y
                    else:
                        runs.append([x, y])
                runs = [tuple(b) for b in runs]
                self.assertEqual(list(zip(r.starts, r.ends, strict=True)), runs)  # the blocks kept beside
                self.assertTrue(set(blocks) <= set(runs))
                self.assertEqual(len(blocks), min(3, len(runs)))
                self.assertTrue(blocks[0][0] <= s < blocks[0][1] or s + len(d) <= nxt)
                self.assertTrue(all(x[1] <= y[0] for x, y in zip(held, held[1:], strict=False)))
        self.assertEqual(b"".join(out), data)
        self.assertEqual(r.size, 0)


class ReassemblyLimitTests(unittest.TestCase):
    def test_queue_is_capped(self):
        r = Reassembly(limit=3)
        self.assertTrue(r.add(10, b"a"))
        self.assertTrue(r.add(20, b"b"))
        self.assertTrue(r.add(30, b"c"))
        self.assertFalse(r.add(40, b"d"))
        self.assertEqual(r.size, 3)


class FuzzTests(unittest.TestCase):
    """Garbage and mutated packets are dropped and counted; nothing raises."""

    def make(self):
        from .scripted import Peer

        p = Peer()
        h, conn, synack = p.passive_open()
        conn.write(b"x" * 5000)
        conn.flush(p.now)
        self.templates = list(p.out)
        p.out.clear()
        return p, synack

    @given(st.binary(max_size=200))
    def test_garbage(self, data):
        stack = Stack(A, lambda p: None)
        stack.receive(data, 0.0)
        stack.receive(ipv6.HEADER.pack(0x60000000, len(data), 6, 64, B, A) + data, 0.0)
        stack.receive(ipv6.HEADER.pack(0x60000000, len(data), 17, 64, B, A) + data, 0.0)
        stack.receive(ipv6.HEADER.pack(0x60000000, len(data), 58, 64, B, A) + data, 0.0)
        stack.receive(ipv6.HEADER.pack(0x60000000, len(data), 0, 64, B, A) + data, 0.0)

    @given(
        st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 255), st.integers(0, 0xFFFF),
        st.binary(max_size=40), st.binary(max_size=100), st.integers(0, 10),
    )
    @settings(max_examples=300)
    def test_mutated_segments_with_valid_checksums(self, seq, ack, flags, window, opts, data, hdrlen):
        p, synack = self.make()
        iss = synack.seq
        opts = opts[: 40 - 0]
        opts += b"\x00" * (-len(opts) % 4)
        for s in (seq, 1000, 1000 + (seq % 70000)):
            for a in (ack, iss + 1 + (ack % 6000)):
                seg = struct.pack("!HHIIBBHHH", 40000, 80, s, a, ((20 + len(opts)) // 4) << 4, flags, window, 0, 0)
                msg = seg + opts + data
                total = checksum.pseudo_header_sum(B, A, 6, len(msg)) + checksum.sum_bytes(msg)
                msg = msg[:16] + struct.pack("!H", checksum.finish(total)) + msg[18:]
                p.stack.receive(ipv6.build(B, A, 6, msg), p.now)
                p.advance(0.05 * hdrlen)

    @given(st.data())
    @settings(max_examples=200)
    def test_bit_flips_of_real_packets(self, data):
        p, synack = self.make()
        for pkt in self.templates:
            # turn our own output around so it is addressed to the stack
            pkt = bytearray(pkt[:8] + pkt[24:40] + pkt[8:24] + pkt[40:])
            i = data.draw(st.integers(0, len(pkt) - 1))
            pkt[i] ^= data.draw(st.integers(1, 255))
            p.stack.receive(bytes(pkt), p.now)
        p.advance(5)

    @given(st.binary(max_size=300))
    def test_segment_decode_only_raises_malformed(self, data):
        try:
            Segment.decode(A, B, data, verify=False)
        except tcpsegment.Malformed:
            pass
