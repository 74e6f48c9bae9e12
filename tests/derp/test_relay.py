"""The relay core with a task.Clock and in-memory sinks: queues, drops, PeerGone, keepalive."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from coderstack.derp.relay import Relay
from coderstack.wire import derp as w
from tests.support.relaypolicy import StaticPolicy

DISCO = w.DISCO_MAGIC + b"d" * 32 + b"n" * 24 + b"payload"


class Sink:
    def __init__(self) -> None:
        self.reader = w.FrameReader()
        self.frames: list[w.Frame] = []
        self.writes = 0
        self.closed: str | None = None
        self.conn = None

    def write_frames(self, frames: list[bytes]) -> None:
        self.writes += 1
        for t, p in self.reader.feed(b"".join(frames)):
            self.frames.append(w.decode(t, p))

    def close(self, reason: str) -> None:
        self.closed = reason

    def take(self, kind: type | None = None) -> list:
        out = [f for f in self.frames if kind is None or isinstance(f, kind)]
        self.frames = [f for f in self.frames if not (kind is None or isinstance(f, kind))]
        return out


class Client:
    def __init__(self, relay: Relay, principal: object = "p", priv: bytes | None = None,
                 mesh_key: str = "") -> None:
        self.priv = priv or w.generate_private_key()
        self.key = w.public_key(self.priv)
        self.sink = Sink()
        self.conn = relay.accept(self.sink, principal, ("192.0.2.1", 5000))
        self.conn.start()
        (sk,) = self.sink.take(w.ServerKey)
        self.conn.data_received(
            w.seal_client_info(self.priv, self.key, sk.key, w.ClientInfo(mesh_key=mesh_key))
        )
        self.sink.take(w.ServerInfoFrame)

    def send(self, dst: bytes, data: bytes) -> None:
        self.conn.data_received(w.encode(w.SendPacket(dst, data)))


class RelayTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.policy = StaticPolicy()
        self.relay = Relay(w.generate_private_key(), self.clock, self.policy.allows,
                           rng=random.Random(1), mesh_key="m" * 64)

    def pair(self) -> tuple[Client, Client]:
        a = Client(self.relay, "alice")
        b = Client(self.relay, "bob")
        self.policy.owned.setdefault("alice", set()).add(a.key)
        self.policy.owned.setdefault("bob", set()).add(b.key)
        self.policy.allow(a.key, b.key)
        return a, b

    def test_login_greeting_and_server_info(self) -> None:
        sink = Sink()
        conn = self.relay.accept(sink, "p")
        conn.start()
        (sk,) = sink.take()
        self.assertEqual(sk, w.ServerKey(self.relay.public_key))
        priv = w.generate_private_key()
        conn.data_received(w.seal_client_info(priv, w.public_key(priv), sk.key, w.ClientInfo()))
        (si,) = sink.take()
        info = w.open_server_info(si, priv, self.relay.public_key)
        self.assertEqual(info.version, 2)
        self.assertTrue(self.relay.is_connected(w.public_key(priv)))

    def test_bad_client_info_box_closes(self) -> None:
        sink = Sink()
        conn = self.relay.accept(sink, "p")
        conn.start()
        conn.data_received(w.encode(w.ClientInfoFrame(b"k" * 32, b"x" * 60)))
        self.assertIn("bad frame", sink.closed)
        self.assertEqual(self.relay.clients, 0)

    def test_first_frame_must_be_client_info(self) -> None:
        sink = Sink()
        conn = self.relay.accept(sink, "p")
        conn.start()
        conn.data_received(w.encode(w.SendPacket(b"k" * 32, b"x")))
        self.assertIn("expected ClientInfo", sink.closed)

    def test_handshake_timeout(self) -> None:
        sink = Sink()
        self.relay.accept(sink, "p").start()
        self.clock.advance(9.9)
        self.assertIsNone(sink.closed)
        self.clock.advance(0.2)
        self.assertEqual(sink.closed, "handshake timeout")

    def test_relays_with_source_key(self) -> None:
        a, b = self.pair()
        a.send(b.key, b"hello")
        self.assertEqual(b.sink.take(), [w.RecvPacket(a.key, b"hello")])
        b.send(a.key, b"back")
        self.assertEqual(a.sink.take(), [w.RecvPacket(b.key, b"back")])
        self.assertEqual(self.relay.packets_sent, 2)
        self.assertEqual(self.relay.bytes_received, 9)

    def test_writer_batches_one_read_into_one_write(self) -> None:
        a, b = self.pair()
        before = b.sink.writes
        a.conn.data_received(b"".join(w.encode(w.SendPacket(b.key, bytes([i]))) for i in range(20)))
        self.assertEqual(b.sink.writes, before + 1)
        self.assertEqual([f.data for f in b.sink.take()], [bytes([i]) for i in range(20)])

    def test_many_packets_in_one_read_are_not_dropped_when_writable(self) -> None:
        a, b = self.pair()
        a.conn.data_received(b"".join(w.encode(w.SendPacket(b.key, b"x")) for _ in range(100)))
        self.assertEqual(len(b.sink.take(w.RecvPacket)), 100)
        self.assertEqual(self.relay.drops["queue_head"], 0)

    def test_unauthorized_dropped_and_counted(self) -> None:
        a, b = self.pair()
        c = Client(self.relay, "carol")
        self.policy.owned["carol"] = {c.key}
        c.send(a.key, b"sneaky")
        a.send(c.key, b"nope")
        self.assertEqual(a.sink.take(), [])
        self.assertEqual(c.sink.take(), [])
        self.assertEqual(self.relay.drops["unauthorized"], 2)
        # A principal sending from a key it does not own is refused too.
        self.policy.allow(c.key, b.key)
        self.policy.owned["carol"] = set()
        self.relay.policy_changed()
        c.send(b.key, b"x")
        self.assertEqual(b.sink.take(), [])
        self.assertEqual(self.relay.drops["unauthorized"], 3)

    def test_revocation_takes_effect_after_cache(self) -> None:
        a, b = self.pair()
        a.send(b.key, b"1")
        self.policy.pairs.clear()
        a.send(b.key, b"2")  # cached for authz_cache_seconds
        self.clock.advance(1.5)
        a.send(b.key, b"3")
        self.assertEqual([f.data for f in b.sink.take(w.RecvPacket)], [b"1", b"2"])

    def test_head_drop_when_receiver_stalled(self) -> None:
        a, b = self.pair()
        b.conn.set_writable(False)
        for i in range(40):
            a.send(b.key, i.to_bytes(2, "big"))
        self.assertEqual(b.conn.queued(), (32, 0))
        self.assertEqual(self.relay.drops["queue_head"], 8)
        self.assertEqual(self.relay.dropped_bytes["queue_head"], 16)
        b.conn.set_writable(True)
        got = [int.from_bytes(f.data, "big") for f in b.sink.take(w.RecvPacket)]
        self.assertEqual(got, list(range(8, 40)))  # the oldest went first

    def test_disco_has_its_own_queue(self) -> None:
        a, b = self.pair()
        b.conn.set_writable(False)
        for _ in range(40):
            a.send(b.key, b"wireguard")
        a.send(b.key, DISCO)
        self.assertEqual(b.conn.queued(), (32, 1))
        b.conn.set_writable(True)
        frames = b.sink.take(w.RecvPacket)
        self.assertEqual(frames[0].data, DISCO)  # disco is written before data
        self.assertEqual(len(frames), 33)

    def test_stalled_receiver_disconnected_after_write_timeout(self) -> None:
        a, b = self.pair()
        b.conn.set_writable(False)
        a.send(b.key, b"x")
        self.clock.advance(2.1)
        self.assertEqual(b.sink.closed, "write timeout")
        self.assertEqual(self.relay.drops["gone_disconnected"], 1)
        self.assertEqual(self.relay.dropped_bytes["gone_disconnected"], 1)
        self.assertFalse(self.relay.is_connected(b.key))

    def test_peer_gone_not_here_for_disco_only_rate_limited(self) -> None:
        a, _ = self.pair()
        nobody = b"n" * 32
        self.policy.allow(a.key, nobody)
        a.send(nobody, b"wireguard")
        self.assertEqual(a.sink.take(), [])
        for _ in range(5):
            a.send(nobody, DISCO)
        gone = a.sink.take(w.PeerGone)
        self.assertEqual(gone, [w.PeerGone(nobody, w.PEER_GONE_NOT_HERE)] * 3)  # burst 3
        self.clock.advance(1.0)
        a.send(nobody, DISCO)
        a.send(nobody, DISCO)
        self.assertEqual(len(a.sink.take(w.PeerGone)), 1)  # 1 per second
        self.assertEqual(self.relay.drops["unknown_dest"], 8)

    def test_peer_gone_disconnected_to_receivers(self) -> None:
        a, b = self.pair()
        a.send(b.key, b"x")
        b.sink.take()
        a.conn.connection_lost()
        self.assertEqual(b.sink.take(), [w.PeerGone(a.key, w.PEER_GONE_DISCONNECTED)])
        # b never sent to a, so nobody hears about b leaving.
        b.conn.connection_lost()
        self.assertEqual(self.relay.clients, 0)

    def test_duplicate_keys_last_writer_active(self) -> None:
        a, b = self.pair()
        b2 = Client(self.relay, "bob", priv=b.priv)
        self.assertEqual(self.relay.duplicate_conns, 1)
        a.send(b.key, b"1")  # newest connection receives first
        self.assertEqual(b2.sink.take(w.RecvPacket), [w.RecvPacket(a.key, b"1")])
        b.send(a.key, b"i am here")  # the old one writes: it becomes active
        a.send(b.key, b"2")
        self.assertEqual(b.sink.take(w.RecvPacket), [w.RecvPacket(a.key, b"2")])
        self.assertEqual(b2.sink.take(w.RecvPacket), [])
        b.conn.connection_lost()  # active left: the remaining one takes over, no PeerGone
        a.send(b.key, b"3")
        self.assertEqual(b2.sink.take(w.RecvPacket), [w.RecvPacket(a.key, b"3")])
        self.assertEqual(a.sink.take(w.PeerGone), [])

    def test_keepalive_every_60s_with_jitter(self) -> None:
        a, _ = self.pair()
        a.sink.take()
        self.clock.advance(59.9)
        self.assertEqual(a.sink.take(), [])
        self.clock.advance(5.2)
        self.assertEqual(a.sink.take(), [w.KeepAlive()])
        self.clock.advance(65.1)
        self.assertEqual(a.sink.take(), [w.KeepAlive()])

    def test_ping_pong_one_pending(self) -> None:
        a, _ = self.pair()
        a.conn.set_writable(False)
        a.conn.data_received(w.encode(w.Ping(b"12345678")) + w.encode(w.Ping(b"abcdefgh")))
        a.conn.set_writable(True)
        self.assertEqual(a.sink.take(), [w.Pong(b"12345678")])
        self.assertEqual(self.relay.drops["ping_slot_full"], 1)
        a.conn.data_received(w.raw_frame(w.PING, b"ABCDEFGH" + b"x" * 100))
        self.assertEqual(a.sink.take(), [w.Pong(b"ABCDEFGH")])

    def test_unknown_frames_skipped(self) -> None:
        a, b = self.pair()
        a.conn.data_received(w.raw_frame(0x0B, b"future") + w.encode(w.SendPacket(b.key, b"ok")))
        self.assertEqual(b.sink.take(), [w.RecvPacket(a.key, b"ok")])
        self.assertEqual(self.relay.unknown_frames, 1)
        self.assertIsNone(a.sink.closed)

    def test_note_preferred(self) -> None:
        a, _ = self.pair()
        a.conn.data_received(w.encode(w.NotePreferred(True)))
        self.assertEqual(self.relay.home_clients, 1)
        a.conn.data_received(w.encode(w.NotePreferred(True)))  # said twice, counted once
        self.assertEqual(self.relay.home_clients, 1)
        a.conn.data_received(w.raw_frame(w.NOTE_PREFERRED, b"\x01\x01"))
        self.assertIsNotNone(a.sink.closed)
        # A home client that leaves (here closed for a bad frame) is no longer counted.
        self.assertEqual(self.relay.home_clients, 0)

    def test_mesh_frames_need_mesh_key(self) -> None:
        a, _ = self.pair()
        a.conn.data_received(w.encode(w.WatchConns()))
        self.assertIn("mesh", a.sink.closed)

    def test_mesh_watch_and_forward(self) -> None:
        a, b = self.pair()
        m = Client(self.relay, None, mesh_key="m" * 64)
        self.assertTrue(m.conn.is_mesh)
        m.conn.data_received(w.encode(w.WatchConns()))
        present = {f.key for f in m.sink.take(w.PeerPresent)}
        self.assertEqual(present, {a.key, b.key, m.key})
        c = Client(self.relay, "carol")
        self.assertEqual(m.sink.take(w.PeerPresent)[0].key, c.key)
        c.conn.connection_lost()
        self.assertEqual(m.sink.take(w.PeerGone), [w.PeerGone(c.key, 0)])
        remote = b"r" * 32
        m.conn.data_received(w.encode(w.ForwardPacket(remote, a.key, b"via mesh")))
        self.assertEqual(a.sink.take(w.RecvPacket), [w.RecvPacket(remote, b"via mesh")])
        m.conn.data_received(w.encode(w.ClosePeer(a.key)))
        self.assertFalse(self.relay.is_connected(a.key))

    def test_mesh_required_login_refused_without_key(self) -> None:
        sink = Sink()
        conn = self.relay.accept(sink, None, require_mesh=True)
        conn.start()
        (sk,) = sink.take()
        priv = w.generate_private_key()
        conn.data_received(w.seal_client_info(priv, w.public_key(priv), sk.key, w.ClientInfo()))
        self.assertIn("mesh", sink.closed)
        self.assertEqual(self.relay.clients, 0)

    def test_packet_forwarder_for_remote_key(self) -> None:
        a, _ = self.pair()
        remote = b"r" * 32
        self.policy.allow(a.key, remote)
        got = []

        def fwd(s: bytes, d: bytes, p: bytes) -> None:
            got.append((s, d, p))

        self.relay.add_packet_forwarder(remote, fwd)
        a.send(remote, b"x")
        self.assertEqual(got, [(a.key, remote, b"x")])
        self.assertEqual((self.relay.packets_forwarded_out, self.relay.bytes_forwarded_out), (1, 1))
        self.relay.remove_packet_forwarder(remote, fwd)
        a.send(remote, b"yy")
        self.assertEqual(self.relay.drops["unknown_dest"], 1)
        self.assertEqual(self.relay.dropped_bytes["unknown_dest"], 2)

    def test_garbage_closes_only_that_connection(self) -> None:
        a, b = self.pair()
        a.conn.data_received(b"\x04\xff\xff\xff\xff")
        self.assertIsNotNone(a.sink.closed)
        self.assertEqual(self.relay.bad_frames, 1)
        self.assertTrue(self.relay.is_connected(b.key))


class RelayFuzzTests(unittest.TestCase):
    @given(st.lists(st.binary(max_size=300), max_size=8), st.booleans())
    @settings(max_examples=200, deadline=None)
    def test_garbage_never_raises(self, chunks: list[bytes], login: bool) -> None:
        relay = Relay(w.generate_private_key(), Clock(), lambda p, s, d: True)
        if login:
            c = Client(relay)
            conn, sink = c.conn, c.sink
        else:
            sink = Sink()
            conn = relay.accept(sink, "p")
            conn.start()
        for chunk in chunks:
            conn.data_received(chunk)  # must not raise; bad input closes the connection
        if sink.closed is None:
            self.assertFalse(conn.closed)

    @given(st.lists(st.tuples(st.sampled_from(sorted({
        w.SEND_PACKET, w.PING, w.PONG, w.NOTE_PREFERRED, w.KEEP_ALIVE, w.PEER_GONE,
        w.CLIENT_INFO, w.WATCH_CONNS, w.FORWARD_PACKET, w.CLOSE_PEER, 0x0B, 0x99})),
        st.binary(max_size=80)), max_size=10))
    @settings(max_examples=200, deadline=None)
    def test_well_framed_garbage_never_raises(self, frames: list[tuple[int, bytes]]) -> None:
        relay = Relay(w.generate_private_key(), Clock(), lambda p, s, d: True)
        c = Client(relay)
        c.conn.data_received(b"".join(w.raw_frame(t, p) for t, p in frames))


class AnnounceTests(unittest.TestCase):
    def test_restart_and_health_reach_every_client(self) -> None:
        relay = Relay(w.generate_private_key(), Clock(), lambda p, s, d: True)
        a, b = Client(relay), Client(relay)
        relay.announce_restart(1.5, 60)
        relay.set_health("disk full")
        for c in (a, b):
            self.assertEqual(c.sink.take(), [w.Restarting(1500, 60000), w.Health("disk full")])


class MetricsTests(unittest.TestCase):
    def test_prometheus_text(self) -> None:
        import re

        from coderstack.derp.server import metrics_text

        relay = Relay(w.generate_private_key(), Clock(), lambda p, s, d: d != b"x" * 32)
        a, b = Client(relay), Client(relay)
        a.send(b.key, b"12345")
        a.send(b"x" * 32, b"no")
        text = metrics_text(relay)
        sample = re.compile(r'^[a-z_]+(\{[a-z_]+="[a-z_]+"\})? -?[0-9.e+]+$')
        for line in text.splitlines():
            self.assertTrue(line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line)
        self.assertIn("coderstack_derp_clients_connected 2\n", text)
        self.assertIn("coderstack_derp_packets_relayed_total 1\n", text)
        self.assertIn("coderstack_derp_bytes_relayed_total 5\n", text)
        self.assertIn('coderstack_derp_packets_dropped_total{reason="unauthorized"} 1\n', text)
        self.assertIn('coderstack_derp_bytes_dropped_total{reason="unauthorized"} 2\n', text)
        # Reasons that have not happened are there at zero; write_error counts no bytes.
        self.assertIn('coderstack_derp_bytes_dropped_total{reason="queue_head"} 0\n', text)
        self.assertIn('coderstack_derp_packets_dropped_total{reason="write_error"} 0\n', text)
        self.assertNotIn('coderstack_derp_bytes_dropped_total{reason="write_error"}', text)

    def test_mesh_and_drop_bytes(self) -> None:
        from coderstack.derp.server import metrics_text

        relay = Relay(w.generate_private_key(), Clock(), lambda p, s, d: True, mesh_key="m" * 64)
        a, b = Client(relay), Client(relay)
        mesh = Client(relay, mesh_key="m" * 64)
        remote, nobody = b"r" * 32, b"n" * 32
        relay.add_packet_forwarder(remote, lambda s, d, p: None)
        a.send(remote, b"out")
        mesh.conn.data_received(w.encode(w.ForwardPacket(remote, b.key, b"in!!")))
        mesh.conn.data_received(w.encode(w.ForwardPacket(remote, nobody, b"lost!")))
        b.conn.set_writable(False)
        for _ in range(34):
            a.send(b.key, b"123")  # 32 fit in the queue: 2 head drops
        b.conn.connection_lost()  # 32 still queued, 3 bytes each
        b.conn.enqueue_packet(a.key, b"late")  # to a receiver that has left
        text = metrics_text(relay)
        for line in (
            'coderstack_derp_packets_forwarded_total{direction="out"} 1',
            'coderstack_derp_bytes_forwarded_total{direction="out"} 3',
            'coderstack_derp_packets_forwarded_total{direction="in"} 2',
            'coderstack_derp_bytes_forwarded_total{direction="in"} 9',
            'coderstack_derp_packets_dropped_total{reason="unknown_dest_on_fwd"} 1',
            'coderstack_derp_bytes_dropped_total{reason="unknown_dest_on_fwd"} 5',
            'coderstack_derp_packets_dropped_total{reason="queue_head"} 2',
            'coderstack_derp_bytes_dropped_total{reason="queue_head"} 6',
            "coderstack_derp_bytes_relayed_total 4",  # the forwarded packet, before the stall
            'coderstack_derp_packets_dropped_total{reason="gone_disconnected"} 32',
            'coderstack_derp_bytes_dropped_total{reason="gone_disconnected"} 96',
            'coderstack_derp_packets_dropped_total{reason="queue_tail"} 1',
            'coderstack_derp_bytes_dropped_total{reason="queue_tail"} 4',
            "coderstack_derp_clients_connected 2",
        ):
            self.assertIn(line + "\n", text)
