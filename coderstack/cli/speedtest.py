"""``coderstack speedtest WS [-t 5s] [--direction up|down] [-d] [-o table|json]`` (Coder's flags).

Dials the agent, reports the path (``29ms via <relay>`` / ``via direct``; with ``--direct``
it first waits, pinging every second, until the path is direct), then runs Tailscale's
speedtest protocol against the agent's port 3 and prints :mod:`coderstack.cli.speedtestfmt`'s
table (stdout) or JSON. Written against the :mod:`coderstack.cli.dialing` hook.

With ``CODERSTACK_TCP_STATS=1`` in the environment it also prints, on stderr, this side's
TCP loss-recovery counters (the sender's, for an upload) once the test is over.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import task
from twisted.python import usage

from coderstack.agent.speedtest import DIRECTIONS, MAX_DURATION, run_speedtest
from coderstack.cli import speedtestfmt, tunnel
from coderstack.cli.command import Command
from coderstack.cli.dialing import Connect
from coderstack.cli.pingfmt import parse_go_duration
from coderstack.wire.ports import SPEEDTEST_PORT


class Options(Command):
    synopsis = "coderstack speedtest <workspace> [-t 5s] [--direction up|down] [--direct] [-o table|json]"
    longdesc = "Measure throughput to a workspace over its tunnel (Tailscale's speedtest)."
    optFlags = [["direct", "d", "Wait for a direct (p2p) connection first."]]
    optParameters = [
        ["time", "t", "5s", "How long the test runs."],
        ["direction", None, "down", "down (the workspace sends) or up (we send)."],
        ["output", "o", "table", "table or json."],
    ]

    def parseArgs(self, workspace: str) -> None:  # type: ignore[override]  # usage.Options passes the positional arguments to it, one parameter each
        self["workspace"] = workspace

    def postOptions(self) -> None:
        try:
            self["seconds"] = parse_go_duration(self["time"])
        except ValueError as err:
            raise usage.UsageError(f"invalid --time: {err}") from None
        if not 0 < self["seconds"] <= MAX_DURATION:
            raise usage.UsageError(f"--time must be more than 0 and at most {int(MAX_DURATION)}s")
        if self["direction"] not in ("up", "down"):
            raise usage.UsageError("--direction must be up or down")
        if self["output"] not in ("table", "json"):
            raise usage.UsageError("--output must be table or json")


def _via(conn: Any, result: Any) -> str:
    if result.p2p:
        return "direct"
    return result.derp_name or conn.derp_region_names().get(result.derp_region, "DERP")


async def run_with(reactor: Any, options: Options, ctx: Any, connect: Connect) -> int:
    if options["direct"] and ctx.disable_direct:
        raise usage.UsageError("--direct (-d) is incompatible with --disable-direct-connections")
    conn = await connect(reactor, ctx, options["workspace"])
    try:
        result = await conn.ping()
        while options["direct"] and not result.p2p:
            ctx.err(speedtestfmt.waiting_line(result.latency, _via(conn, result)))
            await task.deferLater(reactor, 1.0, lambda: None)
            result = await conn.ping()
        ctx.err(speedtestfmt.path_line(result.latency, _via(conn, result)))
        ctx.err(speedtestfmt.starting_line(options["seconds"], options["direction"]))
        measured = await run_speedtest(conn.endpoint(SPEEDTEST_PORT), DIRECTIONS[options["direction"]],
                                       options["seconds"], reactor)
        stats = getattr(conn, "tcp_stats", None)
        if os.environ.get("CODERSTACK_TCP_STATS") == "1" and stats is not None:
            ctx.err("tcp: " + ", ".join(f"{k} {v}" for k, v in sorted(stats().items())))
    finally:
        conn.close()
    text = speedtestfmt.to_json(measured) if options["output"] == "json" else speedtestfmt.table(measured)
    ctx.stdout.write(text)
    ctx.stdout.flush()
    return 0


run = tunnel.command(run_with)
