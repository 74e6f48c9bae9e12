"""The client's sans-IO session: frames in, events and bytes out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.derp.session import ClientSession
from coderstack.wire import derp as w


class Events:
    """A SessionHandler that records everything."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.logins = 0
        self.infos: list[w.ServerInfo] = []
        self.packets: list[tuple[bytes, bytes]] = []
        self.gone: list[tuple[bytes, int]] = []
        self.present: list[tuple[bytes, str, int, int]] = []
        self.pongs: list[bytes] = []
        self.health_msgs: list[str] = []
        self.restarts: list[tuple[float, float]] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def logged_in(self) -> None:
        self.logins += 1

    def server_info(self, info: w.ServerInfo) -> None:
        self.infos.append(info)

    def packet_received(self, src: bytes, data: bytes) -> None:
        self.packets.append((src, data))

    def peer_gone(self, key: bytes, reason: int) -> None:
        self.gone.append((key, reason))

    def peer_present(self, key: bytes, ip: str, port: int, flags: int) -> None:
        self.present.append((key, ip, port, flags))

    def pong(self, data: bytes) -> None:
        self.pongs.append(data)

    def health(self, problem: str) -> None:
        self.health_msgs.append(problem)

    def restarting(self, reconnect_in: float, try_for: float) -> None:
        self.restarts.append((reconnect_in, try_for))


class SessionTests(unittest.TestCase):
    def setUp(self) -> None:
        self.server_priv = w.generate_private_key()
        self.priv = w.generate_private_key()
        self.events = Events()
        self.out = self.events.out
        self.s = ClientSession(self.priv, self.events)

    def login(self) -> None:
        self.s.data_received(w.encode(w.ServerKey(w.public_key(self.server_priv))))
        self.assertEqual(self.events.logins, 1)
        self.assertTrue(self.s.logged_in)
        ((t, p),) = w.FrameReader().feed(self.out.pop())
        info = w.open_client_info(w.decode(t, p), self.server_priv)
        self.assertEqual(info.to_json(), {"version": 2, "CanAckPings": True})
        self.s.data_received(w.seal_server_info(self.server_priv, self.s.public_key, w.ServerInfo()))
        self.assertEqual(self.s.server_info, w.ServerInfo())
        self.assertEqual(self.events.infos, [w.ServerInfo()])

    def test_events(self) -> None:
        self.login()
        k = b"k" * 32
        stream = b"".join([
            w.encode(w.RecvPacket(k, b"data")),
            w.encode(w.PeerGone(k, w.PEER_GONE_NOT_HERE)),
            w.encode(w.Health("relay overloaded")),
            w.encode(w.Restarting(1500, 30000)),
            w.encode(w.PeerPresent(k, "192.0.2.9", 41641, 1)),
            w.encode(w.Pong(b"87654321")),
            w.encode(w.KeepAlive()),
            w.raw_frame(0x0C, b"unknown"),
            w.encode(w.ServerKey(b"z" * 32)),  # a late greeting is ignored
        ])
        for i in range(0, len(stream), 7):  # arbitrary chunking
            self.s.data_received(stream[i : i + 7])
        self.assertEqual(self.events.packets, [(k, b"data")])
        self.assertEqual(self.events.gone, [(k, 1)])
        self.assertEqual(self.events.health_msgs, ["relay overloaded"])
        self.assertEqual(self.events.restarts, [(1.5, 30.0)])
        self.assertEqual(self.events.present, [(k, "192.0.2.9", 41641, 1)])
        self.assertEqual(self.events.pongs, [b"87654321"])
        self.assertEqual(self.events.logins, 1)
        self.assertEqual(self.out, [])

    def test_mesh_key_travels_in_client_info(self) -> None:
        s = ClientSession(self.priv, self.events, mesh_key="ab" * 32)
        s.data_received(w.encode(w.ServerKey(w.public_key(self.server_priv))))
        ((t, p),) = w.FrameReader().feed(self.out.pop())
        self.assertEqual(w.open_client_info(w.decode(t, p), self.server_priv).mesh_key, "ab" * 32)

    def test_answers_server_ping(self) -> None:
        self.login()
        self.s.data_received(w.encode(w.Ping(b"12345678")))
        self.assertEqual(self.out, [w.encode(w.Pong(b"12345678"))])

    def test_must_start_with_server_key(self) -> None:
        self.assertRaises(w.DERPProtocolError, self.s.data_received, w.encode(w.KeepAlive()))

    @given(st.binary(max_size=300))
    @settings(max_examples=200, deadline=None)
    def test_garbage_raises_only_codec_error(self, blob: bytes) -> None:
        s = ClientSession(self.priv, Events())
        s.data_received(w.encode(w.ServerKey(b"s" * 32)))
        try:
            s.data_received(blob)
        except w.DERPProtocolError:
            pass
