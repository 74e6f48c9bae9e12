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


class _Ctx:
    verbose = False

    def __init__(self, environ: dict[str, str]) -> None:
        self.environ = environ
        self.lines: list[str] = []

    def err(self, line: str = "") -> None:
        self.lines.append(line)


class _Own:
    closed = False

    def close(self) -> defer.Deferred[None]:
        self.closed = True
        return defer.succeed(None)


class HoldCommandTests(unittest.TestCase):
    """``tunnel.command(run_with, hold=True)`` (port-forward): the daemon held when it can be,
    a tunnel dialed here (and closed at the end) when it cannot."""

    def run_command(self, hold_answer: object, environ: dict[str, str]) -> tuple[list[object], _Own, _Ctx]:
        from coderstack.cli import heldconn, tunnel, warm

        own = _Own()
        got: list[object] = []

        async def connect_via_daemon(reactor: object, ctx: object, name: str) -> object:
            return "daemon connection" if warm.enabled(ctx.environ) else None  # type: ignore[attr-defined]  # _Ctx

        async def hold(daemon: object, dial_here: object, say: object) -> object:
            if isinstance(hold_answer, Exception):
                raise hold_answer
            return hold_answer

        async def connect_agent(reactor: object, ctx: object, name: str) -> _Own:
            return own

        self.patch(tunnel, "connect_via_daemon", connect_via_daemon)
        self.patch(heldconn, "hold", hold)
        self.patch(tunnel, "connect_agent", connect_agent)

        async def run_with(reactor: object, options: object, ctx: object, connect: object) -> int:
            got.append(await connect(reactor, ctx, "box"))  # type: ignore[operator]  # the hook
            return 0

        ctx = _Ctx(environ)
        d = defer.ensureDeferred(tunnel.command(run_with, hold=True)(None, None, ctx))  # type: ignore[arg-type]  # _Ctx
        self.assertEqual(self.successResultOf(d), 0)
        return got, own, ctx

    def test_the_daemon_held(self) -> None:
        got, own, ctx = self.run_command("held connection", {})
        self.assertEqual(got, ["held connection"])
        self.assertFalse(own.closed)

    def test_a_daemon_refusing_hold_means_a_tunnel_here(self) -> None:
        from coderstack.cli import warm

        got, own, ctx = self.run_command(warm.Unavailable("the daemon refused: bad request"),
                                         {"CODERSTACK_TUNNEL_DAEMON_DEBUG": "1"})
        self.assertEqual(got, [own])
        self.assertTrue(own.closed)
        self.assertEqual(ctx.lines, ["coderstack: not using the tunnel daemon (the daemon refused: bad request); "
                                     "dialing here"])

    def test_the_daemon_turned_off(self) -> None:
        got, own, ctx = self.run_command("held connection", {"CODERSTACK_TUNNEL_DAEMON": "0"})
        self.assertEqual((got, own.closed, ctx.lines), ([own], True, []))
