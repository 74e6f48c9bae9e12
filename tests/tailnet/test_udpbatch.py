"""Batched UDP: how writes group into GSO runs and how a GRO read splits (pure, with
hypothesis), and the batched port on real loopback sockets — to a plain receiver and to a
batched one, and going on one datagram at a time when the kernel refuses segmentation."""

from __future__ import annotations

import errno
import sys

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial import unittest

from coderstack.tailnet import batchport, udpbatch
from tests.support.waiting import wait_until

ADDRESSES = [("127.0.0.1", 1), ("127.0.0.1", 2), ("10.0.0.1", 1)]

writes_strategy = st.lists(
    st.tuples(st.binary(min_size=0, max_size=3000), st.sampled_from(ADDRESSES)), max_size=200)


class RunTests(unittest.TestCase):
    @given(writes_strategy)
    def test_runs_keep_every_write_in_order_and_fit_one_send(self, writes: list) -> None:
        got = udpbatch.runs(writes)
        self.assertEqual([(d, r.address) for r in got for d in r.datagrams], writes)
        for r in got:
            self.assertLessEqual(len(r.datagrams), udpbatch.MAX_SEGMENTS)
            if len(r.datagrams) > 1:
                self.assertLessEqual(sum(map(len, r.datagrams)), udpbatch.MAX_PAYLOAD)
                self.assertTrue(all(len(d) == r.size for d in r.datagrams[:-1]), r)
                self.assertTrue(0 < len(r.datagrams[-1]) <= r.size, r)
                # What GSO sends is what GRO gives back.
                self.assertEqual(udpbatch.split(b"".join(r.datagrams), r.size), r.datagrams)

    def test_a_tcp_window_is_few_runs(self) -> None:
        a = ADDRESSES[0]
        writes = [(b"x" * 1452, a)] * 100 + [(b"y" * 300, a), (b"z" * 1452, a)]
        self.assertEqual([(len(r.datagrams), r.size) for r in udpbatch.runs(writes)],
                         [(44, 1452), (44, 1452), (13, 1452), (1, 1452)])

    @given(st.binary(max_size=5000), st.integers(min_value=1, max_value=2000))
    def test_split_covers_the_read(self, data: bytes, size: int) -> None:
        pieces = udpbatch.split(data, size)
        self.assertEqual(b"".join(pieces), data)
        self.assertTrue(all(len(p) == size for p in pieces[:-1]))

    def test_gro_size_from_the_control_message(self) -> None:
        native = (1452).to_bytes(4, sys.byteorder)  # the kernel writes an int in host order
        self.assertEqual(udpbatch.gro_size([(udpbatch.SOL_UDP, udpbatch.UDP_GRO, native)]), 1452)
        self.assertIsNone(udpbatch.gro_size([]))
        self.assertIsNone(udpbatch.gro_size([(0, 1, b"\x01\x00\x00\x00")]))
        self.assertIsNone(udpbatch.gro_size([(udpbatch.SOL_UDP, udpbatch.UDP_GRO, b"\x00")]))

    @given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300), st.binary(max_size=8)), max_size=4))
    def test_gro_size_never_raises(self, ancillary: list) -> None:
        udpbatch.gro_size(ancillary)


class _Collect(DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def datagramReceived(self, datagram: bytes, addr: object) -> None:
        self.got.append(datagram)


class BatchPortTests(unittest.TestCase):
    if not batchport.supported(reactor, {batchport.ENV: "1"}):
        skip = "batched UDP needs Linux and a posix reactor"

    def listen(self, protocol: DatagramProtocol, batched: bool = True) -> object:
        port = (batchport.listen(reactor, 0, protocol, interface="127.0.0.1") if batched
                else reactor.listenUDP(0, protocol, interface="127.0.0.1"))
        self.addCleanup(port.stopListening)
        return port

    def datagrams(self) -> list[bytes]:
        return [bytes([i]) * 1200 for i in range(20)] + [b"short"]

    async def test_to_a_plain_receiver_each_datagram_arrives_alone(self) -> None:
        sink = _Collect()
        dest = ("127.0.0.1", self.listen(sink, batched=False).getHost().port)
        sender = self.listen(DatagramProtocol())
        sent = self.datagrams()
        self.assertEqual(sender.write_many([(d, dest) for d in sent]), [""] * len(sent))
        await wait_until(lambda: len(sink.got) == len(sent), "every datagram", timeout=10)
        self.assertEqual(sink.got, sent)
        self.assertEqual((sender.counters["gso_sends"], sender.counters["gso_datagrams"]), (1, len(sent)))

    async def test_a_batched_receiver_splits_what_arrived_together(self) -> None:
        sink = _Collect()
        receiver = self.listen(sink)
        dest = ("127.0.0.1", receiver.getHost().port)
        sender = self.listen(DatagramProtocol())
        sent = self.datagrams()
        sender.write_many([(d, dest) for d in sent])
        await wait_until(lambda: len(sink.got) == len(sent), "every datagram", timeout=10)
        self.assertEqual(sink.got, sent)
        if receiver.gro:  # loopback hands the GSO burst over whole
            self.assertGreaterEqual(receiver.counters["gro_datagrams"], 2)

    async def test_a_refused_segmentation_falls_back_to_one_by_one(self) -> None:
        sink = _Collect()
        dest = ("127.0.0.1", self.listen(sink, batched=False).getHost().port)
        sender = self.listen(DatagramProtocol())

        def refuse(*args: object) -> int:
            raise OSError(errno.EIO, "no checksum offload")

        sender._sendmsg = refuse  # type: ignore[method-assign]
        sent = self.datagrams()
        self.assertEqual(sender.write_many([(d, dest) for d in sent]), [""] * len(sent))
        self.assertFalse(sender.gso)
        self.assertEqual(sender.counters["gso_off"], 1)
        await wait_until(lambda: len(sink.got) == len(sent), "every datagram", timeout=10)
        self.assertEqual(sink.got, sent)
        # Later bursts do not try again.
        sender.write_many([(d, dest) for d in sent])
        self.assertEqual(sender.counters["gso_off"], 1)

    async def test_a_truncated_read_is_dropped_and_counted(self) -> None:
        sink = _Collect()
        receiver = batchport.listen(reactor, 0, sink, interface="127.0.0.1", max_packet_size=1000)
        self.addCleanup(receiver.stopListening)
        dest = ("127.0.0.1", receiver.getHost().port)
        sender = self.listen(DatagramProtocol())
        sender.write_many([(b"x" * 2000, dest)])
        sender.write_many([(b"fits", dest)])
        await wait_until(lambda: sink.got == [b"fits"], "the datagram that fits", timeout=10)
        self.assertEqual(receiver.counters["truncated_reads"], 1)

    def test_on_by_default_and_the_environment_turns_it_off(self) -> None:
        self.assertTrue(batchport.supported(reactor, {}))
        self.assertTrue(batchport.supported(reactor, {batchport.ENV: "1"}))
        for off in ("0", "off", "false", "no", " No "):
            self.assertFalse(batchport.supported(reactor, {batchport.ENV: off}))
        self.assertFalse(batchport.supported(object(), {}))  # not a posix reactor

    def test_too_big_and_host_names_are_per_datagram(self) -> None:
        sender = self.listen(DatagramProtocol())
        sink = _Collect()
        dest = ("127.0.0.1", self.listen(sink, batched=False).getHost().port)
        huge = [(b"x" * 70000, dest)]  # more than a UDP datagram holds
        self.assertEqual(sender.write_many(huge), ["udp-emsgsize"])
        # A name is never looked up (that would block): it is not sent batched.
        self.assertFalse(sender._literal(("localhost", 1)))
        self.assertTrue(sender._literal(dest))
