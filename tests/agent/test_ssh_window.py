"""The agent's SSH channels offer a 2 MiB window, as OpenSSH and Go's x/crypto/ssh do: a channel
carries at most one window per round trip, and conch's 128 KiB default held ``ssh -L`` through
the relay to a third of the relayed port-forward's throughput (bench/bench_user.py)."""

from __future__ import annotations

from twisted.conch.ssh import connection, forwarding
from twisted.trial import unittest

from coderstack.agent.ssh import CHANNEL_WINDOW, AgentSSHConnection, AgentUser


class ChannelWindowTests(unittest.TestCase):
    def setUp(self) -> None:
        self.user = AgentUser(env={"PATH": "/bin"})

    def test_session_channels(self) -> None:
        chan = self.user.lookupChannel(b"session", 1 << 20, 32768, b"")
        self.assertEqual((chan.localWindowSize, chan.localWindowLeft), (CHANNEL_WINDOW, CHANNEL_WINDOW))
        self.assertEqual(CHANNEL_WINDOW, 2 << 20)
        self.assertEqual(chan.remoteWindowLeft, 1 << 20)  # the client's own window is kept

    def test_direct_tcpip_channels(self) -> None:
        data = forwarding.packOpen_direct_tcpip(("127.0.0.1", 8080), ("127.0.0.1", 40000))
        chan = self.user.lookupChannel(b"direct-tcpip", 1 << 20, 32768, data)
        self.assertEqual(chan.localWindowSize, CHANNEL_WINDOW)
        self.assertEqual(chan.hostport, ("127.0.0.1", 8080))


class _Transport:
    """What SSHConnection sends: (message number, payload) in order."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def sendPacket(self, kind: int, payload: bytes) -> None:
        self.sent.append(kind)


class HeldEOFTests(unittest.TestCase):
    """The command's output closes while some of it still waits for window: the EOF waits too
    (the client drops data that arrives after EOF)."""

    def test_eof_follows_the_queued_output(self) -> None:
        conn = AgentSSHConnection()
        conn.transport = _Transport()  # type: ignore[assignment]  # only sendPacket is used
        chan = AgentUser(env={"PATH": "/bin"}).lookupChannel(b"session", 10, 32768, b"")
        chan.conn = conn
        conn.channels[1] = chan
        conn.channelsToRemoteChannel[chan] = 7
        conn.localToRemoteChannel[1] = 7
        chan.write(b"x" * 25)  # 10 go now, 15 wait for the window
        conn.sendEOF(chan)  # as conch does when the command's stdout closes
        chan.loseConnection()  # ... and when it exits
        sent = conn.transport.sent
        self.assertEqual(sent, [connection.MSG_CHANNEL_DATA])
        chan.addWindowBytes(100)  # the client reads: the rest, then EOF, then close
        self.assertEqual(sent[1:], [connection.MSG_CHANNEL_DATA, connection.MSG_CHANNEL_EOF,
                                    connection.MSG_CHANNEL_CLOSE])

    def test_nothing_queued_sends_eof_at_once(self) -> None:
        conn = AgentSSHConnection()
        conn.transport = _Transport()  # type: ignore[assignment]  # only sendPacket is used
        chan = AgentUser(env={"PATH": "/bin"}).lookupChannel(b"session", 100, 32768, b"")
        chan.conn = conn
        conn.channelsToRemoteChannel[chan] = 7
        chan.write(b"x" * 25)
        conn.sendEOF(chan)
        self.assertEqual(conn.transport.sent, [connection.MSG_CHANNEL_DATA, connection.MSG_CHANNEL_EOF])
