"""A netstack's UDP catch-all: datagrams to ports nobody bound reach one handler with their
destination, and it answers from that port (the agent's UDP forwarder sits on it)."""

from twisted.internet import error, protocol, task
from twisted.trial import unittest

from coderstack.netstack.endpoints import Netstack
from coderstack.netstack.testing import NetstackPair

B = "fd7a:115c:a1e0::b"


class Recorder:
    def __init__(self):
        self.got = []

    def datagram_received(self, data, src, dst):
        self.got.append((data, src, dst))


class Collect(protocol.DatagramProtocol):
    def __init__(self):
        self.got = []

    def datagramReceived(self, data, addr):
        self.got.append((data, addr))


class CatchAllTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.pair = NetstackPair(self.clock, lambda addr, send: Netstack(addr, send, self.clock))
        self.a, self.b = self.pair.a, self.pair.b
        self.client = Collect()
        self.port = self.a.listen_udp(0, self.client)
        self.me = (self.a.address, self.port.getHost().port)

    def test_unbound_ports_reach_the_handler_which_answers_from_them(self):
        rec = Recorder()
        catch_all = self.b.listen_udp_any(rec)
        self.port.write(b"one", (B, 5000))
        self.port.write(b"two", (B, 61000))
        self.pair.pump(until=lambda: len(rec.got) == 2)
        self.assertEqual(rec.got, [(b"one", self.me, (B, 5000)), (b"two", self.me, (B, 61000))])
        catch_all.write(b"answer", (B, 5000), self.me)
        self.pair.pump(until=lambda: self.client.got)
        self.assertEqual(self.client.got, [(b"answer", (B, 5000))])
        self.assertEqual(self.b.stats["udp_catch_all"], 2)

    def test_a_bound_socket_wins(self):
        rec = Recorder()
        self.b.listen_udp_any(rec)
        bound = Collect()
        self.b.listen_udp(5353, bound)
        self.port.write(b"x", (B, 5353))
        self.pair.pump(until=lambda: bound.got)
        self.assertEqual(rec.got, [])

    def test_answers_only_from_our_addresses_and_within_the_mtu(self):
        catch_all = self.b.listen_udp_any(Recorder())
        self.assertRaises(ValueError, catch_all.write, b"x", ("fd7a:115c:a1e0::99", 5000), self.me)
        catch_all.write(b"x" * 1232, (B, 5000), self.me)
        self.assertRaises(error.MessageLengthError, catch_all.write, b"x" * 1233, (B, 5000), self.me)

    def test_stopped_catch_all_leaves_port_unreachable(self):
        rec = Recorder()
        catch_all = self.b.listen_udp_any(rec)
        catch_all.stopListening()
        self.port.write(b"x", (B, 5000))
        self.pair.pump(until=lambda: self.b.stats["udp_no_socket"])
        self.assertEqual(rec.got, [])
