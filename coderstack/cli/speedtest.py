"""``coderstack speedtest WORKSPACE``: throughput over the tunnel to the agent's speedtest port (3).

Tailscale speedtest semantics (``coderstack/agent/speedtest.py``); output as Coder's
(``coderstack/cli/speedtestfmt.py``). ``--direct`` waits for a p2p path first.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.python import usage

from coderstack.agent.speedtest import DIRECTIONS, MAX_DURATION, run_speedtest
from coderstack.cli import speedtestfmt, tunnel
from coderstack.cli.command import Command
from coderstack.cli.context import Context
from coderstack.cli.ping import _duration
from coderstack.sdk import SDKError

SPEEDTEST_PORT = 3


class Options(Command):
    synopsis = "coderstack speedtest <workspace> [-t 5s] [--direction down|up] [--direct] [-o table|json]"
    optParameters = [
        ["time", "t", "5s", "How long the test runs."],
        ["direction", None, "down", "down (workspace to you) or up."],
        ["output", "o", "table", "Output format: table or json."],
    ]
    optFlags = [["direct", "d", "Wait for a direct (p2p) connection before testing."]]

    def parseArgs(self, workspace: str) -> None:
        self["workspace"] = workspace

    def postOptions(self) -> None:
        try:
            self["time"] = _duration(self["time"])
        except ValueError as err:
            raise usage.UsageError(f"invalid value for --time: {err}") from None
        if not 0 < self["time"] <= MAX_DURATION:
            raise usage.UsageError(f"invalid value for --time: between 0 and {MAX_DURATION:g}s")
        if self["direction"] not in ("down", "up"):
            raise usage.UsageError(f"invalid value for --direction: {self['direction']!r} (down or up)")
        if self["output"] not in ("table", "json"):
            raise usage.UsageError(f"invalid value for --output: {self['output']!r} (table or json)")


async def run(reactor: Any, opts: Options, ctx: Context) -> int:
    if opts["direct"] and ctx.disable_direct:
        raise usage.UsageError("--direct cannot be used with --disable-direct-connections")
    ws = await tunnel.connect(reactor, ctx, opts["workspace"])
    try:
        conn = ws.conn
        while True:
            latency, path = await conn.ping(conn.agent_key)
            via = "direct" if path.startswith("p2p ") else path[5:-1]
            if not opts["direct"] or path.startswith("p2p "):
                break
            if conn.block_endpoints:
                raise SDKError("direct connections are disabled by the deployment; drop --direct")
            ctx.err(speedtestfmt.waiting_line(latency, via))
            await task.deferLater(reactor, 1.0, lambda: None)
        ctx.err(speedtestfmt.path_line(latency, via))
        ctx.err(speedtestfmt.starting_line(opts["time"], opts["direction"]))
        result = await run_speedtest(ws.endpoint(SPEEDTEST_PORT), DIRECTIONS[opts["direction"]],
                                     opts["time"], clock=reactor)
    finally:
        await ws.close()
    if opts["output"] == "json":
        ctx.stdout.write(speedtestfmt.to_json(result))
    else:
        ctx.stdout.write(speedtestfmt.table(result))
    ctx.stdout.flush()
    return 0
