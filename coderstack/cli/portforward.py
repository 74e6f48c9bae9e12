"""``coderstack port-forward``: forward local TCP/UDP ports to a workspace over its tunnel.

The spec grammar and the forwarding are :mod:`coderstack.forward`; this is the command: options
(``--tcp``/``-p``, ``--udp``, or ``CODER_PORT_FORWARD_TCP``/``_UDP``), dialing the workspace,
and running until interrupted. With the tunnel daemon on, each TCP connection goes through the
daemon's tunnel and the daemon is held open meanwhile (:mod:`coderstack.cli.heldconn`); without
it, or once it is gone, through a tunnel dialed here.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.internet import defer

from coderstack.cli import tunnel
from coderstack.cli.command import Command
from coderstack.cli.context import Context
from coderstack.cli.dialing import Connect
from coderstack.forward.datagram import UDPDial
from coderstack.forward.forwarder import Forwarder, ListenError
from coderstack.forward.spec import SpecError, parse_forwards


class Options(Command):
    synopsis = "coderstack port-forward <workspace> --tcp SPEC [--udp SPEC]..."
    longdesc = "Forward ports from the workspace to this machine (Coder's spec grammar, see the docs)."

    def __init__(self) -> None:
        super().__init__()
        self["tcp"] = []
        self["udp"] = []

    def opt_tcp(self, spec: str) -> None:
        """Forward TCP port(s) from the workspace [env CODER_PORT_FORWARD_TCP] (repeatable)."""
        self["tcp"].append(spec)

    opt_p = opt_tcp

    def opt_udp(self, spec: str) -> None:
        """Forward UDP port(s) from the workspace, with TCP-like per-source flows [env CODER_PORT_FORWARD_UDP]."""
        self["udp"].append(spec)

    def parseArgs(self, workspace: str) -> None:  # type: ignore[override]  # usage.Options passes the positional arguments to it, one parameter each
        self["workspace"] = workspace


def _interrupted(reactor: Any) -> tuple[defer.Deferred[None], Callable[[], None]]:
    d: defer.Deferred[None] = defer.Deferred()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        if not d.called:
            reactor.callFromThread(d.callback, None)
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return d, restore


async def run_with(reactor: Any, options: Options, ctx: Context, connect: Connect,
                   stopped: defer.Deferred[None] | None = None) -> int:
    """Forward until ``stopped`` fires (default: SIGINT/SIGTERM)."""
    tcp = options["tcp"] or [s for s in ctx.environ.get("CODER_PORT_FORWARD_TCP", "").split(",") if s]
    udp = options["udp"] or [s for s in ctx.environ.get("CODER_PORT_FORWARD_UDP", "").split(",") if s]
    try:
        specs = parse_forwards(tcp, udp)
    except SpecError as err:
        ctx.err(f"error: parse port-forward specs: {err}")
        return 2
    if not specs:
        ctx.err("error: no port-forwards requested")
        return 2
    conn = await connect(reactor, ctx, options["workspace"])
    udp_dial: UDPDial | None = getattr(conn, "udp_dial", None)
    forwarder = Forwarder(reactor, conn.endpoint, udp_dial, ctx.err)
    restore: Callable[[], None] = lambda: None  # noqa: E731
    try:
        try:
            forwarder.start(specs)
        except (ListenError, SpecError) as err:
            ctx.err(f"error: {err}")
            return 1
        if stopped is None:
            stopped, restore = _interrupted(reactor)
        ctx.err("Ready!")
        await stopped
        ctx.err("\nReceived signal, closing all listeners and active connections")
    finally:
        restore()
        await forwarder.stop()
        conn.close()
    return 0


run = tunnel.command(run_with, hold=True)
