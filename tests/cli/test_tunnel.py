"""The CLI's wrapper around a real tunnel (``coderstack.cli.tunnel.TunnelConnection``)."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from coderstack.cli.tunnel import TunnelConnection


class _Conn:
    def __init__(self, clock: task.Clock, netcheck_enabled: bool = True) -> None:
        self.reactor = clock
        self.last_report = None
        self.netcheck_enabled = netcheck_enabled


def _tunnel(conn: _Conn) -> TunnelConnection:
    tc = TunnelConnection.__new__(TunnelConnection)  # only .conn is used by await_netinfo
    tc.conn = conn
    return tc


class AwaitNetinfoTests(unittest.TestCase):
    def test_waits_for_the_first_report(self) -> None:
        clock = task.Clock()
        conn = _Conn(clock)
        d = defer.ensureDeferred(_tunnel(conn).await_netinfo(5.5))
        clock.pump([0.05] * 60)  # 3 s: the STUN probes of a blocked-UDP netcheck are still out
        self.assertNoResult(d)
        conn.last_report = object()
        clock.advance(0.05)
        self.successResultOf(d)

    def test_gives_up_after_the_timeout(self) -> None:
        clock = task.Clock()
        d = defer.ensureDeferred(_tunnel(_Conn(clock)).await_netinfo(1.0))
        clock.pump([0.05] * 19)
        self.assertNoResult(d)
        clock.pump([0.05] * 2)
        self.successResultOf(d)

    def test_no_wait_when_netcheck_is_off_or_done(self) -> None:
        clock = task.Clock()
        self.successResultOf(defer.ensureDeferred(_tunnel(_Conn(clock, netcheck_enabled=False)).await_netinfo(5)))
        conn = _Conn(clock)
        conn.last_report = object()
        self.successResultOf(defer.ensureDeferred(_tunnel(conn).await_netinfo(5)))
