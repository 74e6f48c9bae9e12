"""One DERP client connection's frame logic, sans-IO: bytes in, events and bytes out.

The login, once the transport is open (the server speaks first)::

    S->C  ServerKey   magic + the server's public key
    C->S  ClientInfo  our public key + NaCl box({"version":2,"CanAckPings":true[,"meshKey":..]})
                      sealed to the server key; from here on the client may send
    S->C  ServerInfo  NaCl box({"version":2,...}) sealed to our key: the login is complete

Then the server sends RecvPacket, KeepAlive, PeerGone, PeerPresent (mesh watchers), Ping (the
session answers Pong at once), Pong (to our Ping), Health and Restarting (delays in ms). Frame
layouts are in :mod:`coderstack.wire.derp`. A second ServerKey is ignored; unknown and
server-bound frame types are skipped. Anything before ServerKey, and any malformed frame,
raises :class:`coderstack.wire.derp.DERPProtocolError`: the caller drops the connection.
"""

from __future__ import annotations

from typing import Protocol

from coderstack.wire import derp as w


class SessionHandler(Protocol):
    """Everything a :class:`ClientSession` reports, including the bytes it has to send."""

    def write(self, data: bytes) -> None:
        """Bytes for the server, in order."""

    def logged_in(self) -> None:
        """ClientInfo is on its way: the client may send from now on."""

    def server_info(self, info: w.ServerInfo) -> None:
        """The server accepted the login."""

    def packet_received(self, src: bytes, data: bytes) -> None:
        """A packet from node key ``src``."""

    def peer_gone(self, key: bytes, reason: int) -> None:
        """``key`` left the relay (reason 0) or was never here (1)."""

    def peer_present(self, key: bytes, ip: str, port: int, flags: int) -> None:
        """``key`` is connected to the server (mesh watchers only)."""

    def pong(self, data: bytes) -> None:
        """The answer to our Ping carrying ``data``."""

    def health(self, problem: str) -> None:
        """The server reports a problem ("" clears it)."""

    def restarting(self, reconnect_in: float, try_for: float) -> None:
        """The server is restarting: dial again after ``reconnect_in`` s, for ``try_for`` s."""


class ClientSession:
    """DERP client frame logic for one connection."""

    def __init__(self, private_key: bytes, handler: SessionHandler, mesh_key: str = "") -> None:
        self.private_key = private_key
        self.public_key = w.public_key(private_key)
        self.handler = handler
        self.mesh_key = mesh_key
        self.server_key: bytes | None = None
        self.server_info: w.ServerInfo | None = None
        self.logged_in = False  # ClientInfo sent: packets may flow
        self._reader = w.FrameReader(w.MAX_FRAME_SIZE)

    def data_received(self, data: bytes) -> None:
        """Raises :class:`w.DERPProtocolError` on a broken stream (the caller disconnects)."""
        handler = self.handler
        for ftype, payload in self._reader.feed(data):
            if ftype == w.RECV_PACKET and self.logged_in:
                # The packet path: no frame object.
                if len(payload) < w.KEY_LEN:
                    raise w.DERPProtocolError("RecvPacket too short")
                handler.packet_received(payload[: w.KEY_LEN], payload[w.KEY_LEN :])
                continue
            self._frame(w.decode(ftype, payload))

    def _frame(self, frame: w.Frame) -> None:
        h = self.handler
        match frame:
            case w.ServerKey(key):
                if self.server_key is not None:
                    return  # a late greeting is ignored
                self.server_key = key
                info = w.ClientInfo(mesh_key=self.mesh_key)
                h.write(w.seal_client_info(self.private_key, self.public_key, key, info))
                self.logged_in = True
                h.logged_in()
            case _ if self.server_key is None:
                raise w.DERPProtocolError("the server did not start with ServerKey")
            case w.ServerInfoFrame():
                self.server_info = w.open_server_info(frame, self.private_key, self.server_key)
                h.server_info(self.server_info)
            case w.RecvPacket(src, data):
                h.packet_received(src, data)
            case w.KeepAlive():
                pass
            case w.PeerGone(key, reason):
                h.peer_gone(key, reason)
            case w.PeerPresent(key, ip, port, flags):
                h.peer_present(key, ip, port, flags)
            case w.Ping(data):
                h.write(w.encode(w.Pong(data)))
            case w.Pong(data):
                h.pong(data)
            case w.Health(problem):
                h.health(problem)
            case w.Restarting(a, b):
                h.restarting(a / 1000.0, b / 1000.0)
            case _:
                pass  # unknown or server-bound frames are ignored
