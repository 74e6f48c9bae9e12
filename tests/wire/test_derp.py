"""DERP frame codec: round trips, Tailscale's byte layouts, login boxes, garbage and chunking."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.wire import derp as d

keys = st.binary(min_size=32, max_size=32)
packets = st.binary(max_size=2000)

frames = st.one_of(
    st.builds(d.ServerKey, keys),
    st.builds(d.SendPacket, keys, packets),
    st.builds(d.RecvPacket, keys, packets),
    st.just(d.KeepAlive()),
    st.builds(d.NotePreferred, st.booleans()),
    st.builds(d.PeerGone, keys, st.sampled_from([0, 1])),
    st.builds(
        d.PeerPresent, keys, st.sampled_from(["192.0.2.7", "2001:db8::1", "::"]),
        st.integers(0, 65535), st.integers(0, 255), st.sampled_from(["", "derper", "héllo"]),
    ),
    st.builds(d.ForwardPacket, keys, keys, packets),
    st.just(d.WatchConns()),
    st.builds(d.ClosePeer, keys),
    st.builds(d.Ping, st.binary(min_size=8, max_size=8)),
    st.builds(d.Pong, st.binary(min_size=8, max_size=8)),
    st.builds(d.Health, st.text(max_size=50)),
    st.builds(d.Restarting, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(d.UnknownFrame, st.sampled_from([0x0B, 0x0F, 0x20, 0xFF]), st.binary(max_size=50)),
)


class LayoutTests(unittest.TestCase):
    def test_magic(self) -> None:
        self.assertEqual(d.MAGIC, bytes.fromhex("44455250f09f9491"))
        self.assertEqual(d.DISCO_MAGIC, bytes.fromhex("5453f09f92ac"))

    def test_header_and_send_packet(self) -> None:
        dst = bytes(range(32))
        b = d.encode(d.SendPacket(dst, b"hi"))
        self.assertEqual(b[:5], b"\x04\x00\x00\x00\x22")
        self.assertEqual(b[5:37], dst)
        self.assertEqual(b[37:], b"hi")
        self.assertEqual(b, d.encode_send_packet(dst, b"hi"))
        self.assertEqual(d.recv_packet_header(dst, 2) + b"hi", d.encode(d.RecvPacket(dst, b"hi")))

    def test_peer_present_is_51_bytes_and_tolerant(self) -> None:
        k = b"k" * 32
        b = d.encode(d.PeerPresent(k, "192.0.2.7", 4242, d.PEER_PRESENT_REGULAR))
        # key 32 + IP 16 + port 2 + flags 1 (the reference note says 41, but its own fields add to 51)
        self.assertEqual(len(b) - 5, 51)
        self.assertEqual(b[5 + 32 : 5 + 48], b"\0" * 10 + b"\xff\xff" + bytes([192, 0, 2, 7]))
        self.assertEqual(d.decode(d.PEER_PRESENT, k), d.PeerPresent(k))
        # Newer servers append an app name (length byte + UTF-8).
        newer = d.decode(d.PEER_PRESENT, b[5:] + b"\x06derper")
        self.assertEqual(newer, d.PeerPresent(k, "192.0.2.7", 4242, 1, "derper"))
        self.assertEqual(d.decode(d.PEER_PRESENT, b[5:] + b"\x00"), d.PeerPresent(k, "192.0.2.7", 4242, 1))
        no_flags = d.decode(d.PEER_PRESENT, b[5:-1])
        self.assertEqual(no_flags, d.PeerPresent(k, "192.0.2.7", 4242, 0))

    def test_peer_gone_old_server_has_no_reason(self) -> None:
        self.assertEqual(d.decode(d.PEER_GONE, b"x" * 32), d.PeerGone(b"x" * 32, 0))
        self.assertEqual(d.decode(d.PEER_GONE, b"x" * 32 + b"\x01").reason, d.PEER_GONE_NOT_HERE)

    def test_ping_accepts_up_to_1000_bytes(self) -> None:
        self.assertEqual(d.decode(d.PING, b"12345678" + b"z" * 992), d.Ping(b"12345678"))
        self.assertRaises(d.DERPProtocolError, d.decode, d.PING, b"1234567")
        self.assertRaises(d.DERPProtocolError, d.decode, d.PING, b"1" * 1001)

    def test_note_preferred_length_is_fatal(self) -> None:
        self.assertRaises(d.DERPProtocolError, d.decode, d.NOTE_PREFERRED, b"\x01\x01")

    def test_restarting(self) -> None:
        b = d.encode(d.Restarting(1500, 60000))
        self.assertEqual(b[5:], struct.pack(">II", 1500, 60000))

    def test_server_key_extra_bytes_ignored(self) -> None:
        k = b"s" * 32
        self.assertEqual(d.decode(d.SERVER_KEY, d.MAGIC + k + b"reserved"), d.ServerKey(k))
        self.assertRaises(d.DERPProtocolError, d.decode, d.SERVER_KEY, b"DERPxxxx" + k)

    def test_oversized_packet_refused(self) -> None:
        self.assertRaises(d.DERPProtocolError, d.encode, d.SendPacket(b"k" * 32, b"x" * 65537))
        self.assertRaises(d.DERPProtocolError, d.decode, d.SEND_PACKET, b"k" * 32 + b"x" * 65537)
        d.decode(d.SEND_PACKET, b"k" * 32 + b"x" * 65536)

    def test_disco_detection(self) -> None:
        self.assertTrue(d.looks_like_disco(d.DISCO_MAGIC + b"k" * 32 + b"n" * 24))
        self.assertFalse(d.looks_like_disco(d.DISCO_MAGIC + b"k" * 32))
        self.assertFalse(d.looks_like_disco(b"\x04\0\0\0" + b"x" * 100))

    @given(frames)
    def test_round_trip(self, frame: d.Frame) -> None:
        b = d.encode(frame)
        (ftype, length) = struct.unpack(">BI", b[:5])
        self.assertEqual(length, len(b) - 5)
        self.assertEqual(d.decode(ftype, b[5:]), frame)


class LoginTests(unittest.TestCase):
    def test_client_info_round_trip(self) -> None:
        cpriv, spriv = d.generate_private_key(), d.generate_private_key()
        cpub, spub = d.public_key(cpriv), d.public_key(spriv)
        info = d.ClientInfo(mesh_key="ab" * 32, app_name="coderstack")
        frame_bytes = d.seal_client_info(cpriv, cpub, spub, info)
        ((ftype, payload),) = d.FrameReader().feed(frame_bytes)
        frame = d.decode(ftype, payload)
        self.assertEqual(frame.key, cpub)
        self.assertEqual(d.open_client_info(frame, spriv), info)
        # Someone else's server key cannot open it.
        self.assertRaises(d.DERPProtocolError, d.open_client_info, frame, d.generate_private_key())

    def test_client_info_json_shape(self) -> None:
        self.assertEqual(d.ClientInfo().to_json(), {"version": 2, "CanAckPings": True})

    def test_box_layout_is_nonce_tag_ciphertext(self) -> None:
        cpriv, spriv = d.generate_private_key(), d.generate_private_key()
        nonce = b"n" * 24
        b = d.seal_client_info(cpriv, d.public_key(cpriv), d.public_key(spriv), d.ClientInfo(), nonce)
        body = b[5 + 32 :]
        self.assertEqual(body[:24], nonce)
        self.assertEqual(len(body), 24 + 16 + len(b'{"version":2,"CanAckPings":true}'))

    def test_server_info_round_trip(self) -> None:
        cpriv, spriv = d.generate_private_key(), d.generate_private_key()
        b = d.seal_server_info(spriv, d.public_key(cpriv), d.ServerInfo(token_bucket_bytes_burst=9))
        ((ftype, payload),) = d.FrameReader().feed(b)
        info = d.open_server_info(d.decode(ftype, payload), cpriv, d.public_key(spriv))
        self.assertEqual(info, d.ServerInfo(2, 0, 9))

    @given(st.binary(max_size=300))
    def test_open_garbage(self, blob: bytes) -> None:
        frame = d.ClientInfoFrame(b"k" * 32, blob)
        try:
            d.open_client_info(frame, b"p" * 32)
        except d.DERPProtocolError:
            pass


class ReaderTests(unittest.TestCase):
    @given(st.lists(frames, max_size=12), st.data())
    @settings(max_examples=150)
    def test_random_chunking(self, fs: list, data: st.DataObject) -> None:
        stream = b"".join(d.encode(f) for f in fs)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
        reader = d.FrameReader()
        got = []
        prev = 0
        for c in [*cuts, len(stream)]:
            got.extend(reader.feed(stream[prev:c]))
            prev = c
        self.assertEqual([d.decode(t, p) for t, p in got], fs)
        self.assertEqual(reader.buffered, 0)

    def test_oversized_frame_header(self) -> None:
        reader = d.FrameReader(max_frame_size=100)
        self.assertRaises(d.DERPProtocolError, reader.feed, struct.pack(">BI", 4, 101))

    @given(st.binary(max_size=400))
    def test_garbage_only_raises_codec_error(self, blob: bytes) -> None:
        reader = d.FrameReader(max_frame_size=300)
        try:
            for ftype, payload in reader.feed(blob):
                d.decode(ftype, payload)
        except d.DERPProtocolError:
            pass

    @given(st.integers(0, 255), st.binary(max_size=200))
    def test_decode_any_type_garbage(self, ftype: int, payload: bytes) -> None:
        try:
            frame = d.decode(ftype, payload)
        except d.DERPProtocolError:
            return
        # Whatever parsed must encode again without surprises.
        try:
            d.encode(frame)
        except d.DERPProtocolError:
            pass
