"""The agent's SSH channels offer a 2 MiB window, as OpenSSH and Go's x/crypto/ssh do: a channel
carries at most one window per round trip, and conch's 128 KiB default held ``ssh -L`` through
the relay to a third of the relayed port-forward's throughput (bench/bench_user.py)."""

from __future__ import annotations

from twisted.conch.ssh import forwarding
from twisted.trial import unittest

from coderstack.agent.ssh import CHANNEL_WINDOW, AgentUser


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
