"""``coderstack ping WS`` (Coder's current behaviour): until interrupted or ``-n N``.

Order of output, as Coder: one silent ping decides whether diagnostics are worth showing;
peer and connection diagnostics go to stderr; one line per pong to stdout (stderr with
``-o json``); the closing p2p/DERP verdict to stderr; then the summary table (stdout) or the
JSON document. Our addition: warnings on stderr when the average RTT is over 400 ms or more
than 0.5% of pings were lost (Coder's documented minimums). The agent's netcheck comes
from its HTTP API (port 4) over the tunnel. Written against :mod:`coderstack.cli.dialing`.
"""

from __future__ import annotations

import signal
from datetime import UTC, datetime
from typing import Any

from twisted.internet import defer, task
from twisted.python import usage

from coderstack.cli import pingfmt, tunnel
from coderstack.cli.agenthttp import AgentHTTPError, get_json
from coderstack.cli.command import Command
from coderstack.cli.dialing import Connect
from coderstack.derpmap import DERPMap, DERPMapError
from coderstack.netinfo import gather_interfaces
from coderstack.tailnet.netcheck.health import interfaces_report
from coderstack.tailnet.netcheck.plan import REPORT_TIMEOUT
from coderstack.wire.ports import AGENT_API_PORT

# How long the diagnostics wait for this side's first netcheck report: a report run's own limit.
NETCHECK_WAIT = REPORT_TIMEOUT + 0.5
DOCS = "https://coder.com/docs/admin/networking/troubleshooting"


class Options(Command):
    synopsis = "coderstack ping <workspace> [-n N] [--wait 1s] [-t 5s] [--time|--utc] [-o table|json]"
    longdesc = "Ping a workspace over its tunnel; shows whether the path is direct (p2p) or relayed."
    optFlags = [
        ["time", None, "Show the time of each pong in local time."],
        ["utc", None, "Show the time of each pong in UTC (implies --time)."],
    ]
    optParameters = [
        ["wait", None, "1s", "How long to wait between pings."],
        ["timeout", "t", "5s", "How long to wait for each pong."],
        ["num", "n", "0", "Number of pings (default: until interrupted)."],
        ["output", "o", "table", "table or json."],
    ]

    def parseArgs(self, workspace: str) -> None:  # type: ignore[override]  # usage.Options passes the positional arguments to it, one parameter each
        self["workspace"] = workspace

    def postOptions(self) -> None:
        try:
            self["wait_s"] = parse_nonneg(self["wait"])
            self["timeout_s"] = parse_nonneg(self["timeout"])
        except ValueError as err:
            raise usage.UsageError(str(err)) from None
        if not self["num"].isdigit():
            raise usage.UsageError("--num must be a whole number")
        self["n"] = int(self["num"])
        if self["output"] not in ("table", "json"):
            raise usage.UsageError("--output must be table or json")


def parse_nonneg(text: str) -> float:
    value = pingfmt.parse_go_duration(text)
    if value < 0:
        raise ValueError(f'time: negative duration "{text}"')
    return value


async def _ping(reactor: Any, conn: Any, timeout: float) -> Any:
    d = defer.Deferred.fromCoroutine(conn.ping())
    if timeout > 0:
        d.addTimeout(timeout, reactor)
    return await d


def _is_timeout(err: BaseException) -> bool:
    return isinstance(err, TimeoutError | defer.TimeoutError | defer.CancelledError)


async def _diagnostics(reactor: Any, ctx: Any, conn: Any, p2p: bool) -> str:
    """Write the diagnostics; returns why a relayed connection is relayed, if they tell."""
    try:
        info = await ctx.api.connection_info()
    except Exception as err:
        ctx.err(f"Failed to retrieve connection info from server: {err}")
        info = {}
    try:
        derp_map = DERPMap.from_json(info["derp_map"]) if info.get("derp_map") else None
        has_stun = derp_map is None or any(r.stun_nodes for r in derp_map.regions.values())
    except (DERPMapError, AttributeError, TypeError):
        has_stun = True
    agent = None
    try:
        agent = await get_json(conn.endpoint(AGENT_API_PORT), "/api/v0/netcheck")
    except AgentHTTPError as err:
        if err.status == 404:
            ctx.err("Could not generate full connection report as the workspace agent is outdated")
        else:
            ctx.err(f"Failed to retrieve connection report from agent: {err}")
    except Exception as err:  # a diagnostic must not end the ping
        ctx.err(f"Failed to retrieve connection report from agent: {err}")
    if ctx.verbose or not p2p:
        # Right after dialing, a netcheck with UDP blocked is still waiting for its STUN probes;
        # the diagnostics would then say nothing about why the path is relayed.
        await conn.await_netinfo(NETCHECK_WAIT)
    ctx.stderr.write(pingfmt.peer_diagnostics(conn.peer_diagnostics(), reactor.seconds()))
    local = conn.netinfo()
    ctx.stderr.write(pingfmt.conn_diagnostics(
        troubleshooting_url=DOCS, ping_p2p=p2p, verbose=ctx.verbose, disable_direct=ctx.disable_direct,
        deployment_blocks_direct=bool(info.get("disable_direct_connections")), derp_map_has_stun=has_stun,
        local_netinfo=local, local_interfaces=interfaces_report(gather_interfaces()),
        agent_netcheck=agent))
    ctx.stderr.flush()
    agent_netinfo = agent.get("netinfo") if isinstance(agent, dict) else None
    return pingfmt.hard_nat_reason(local, agent_netinfo if isinstance(agent_netinfo, dict) else None)


async def run_with(reactor: Any, options: Options, ctx: Any, connect: Connect) -> int:
    ws = options["workspace"]
    json_mode = options["output"] == "json"
    say = ctx.err if json_mode else ctx.out
    conn = await connect(reactor, ctx, ws)
    stop = {"now": False}
    previous = _install_interrupt(stop)
    try:
        try:
            first = await _ping(reactor, conn, options["timeout_s"])
            did_p2p = first.p2p
        except Exception:  # the silent ping only picks the diagnostics
            did_p2p = False
        relayed_why = await _diagnostics(reactor, ctx, conn, did_p2p)
        summary = pingfmt.PingSummary(ws)
        pongs: list[dict[str, Any]] = []
        names = conn.derp_region_names()
        start = reactor.seconds()
        n, p2p, last = 0, False, None
        while not stop["now"]:
            if n > 0:
                await task.deferLater(reactor, options["wait_s"], lambda: None)
                if stop["now"]:
                    break
            n += 1
            stamp = _stamp(options)
            try:
                last = await _ping(reactor, conn, options["timeout_s"])
            except Exception as err:
                summary.add(None)
                error = "timed out" if _is_timeout(err) else str(err)
                say(pingfmt.timeout_line(ws) if _is_timeout(err) else pingfmt.failed_line(ws, error))
                pongs.append(pingfmt.pong_json(n, stamp, error=error))
                if n == options["n"]:
                    break
                continue
            summary.add(last.latency)
            p2p = last.p2p
            if p2p and not did_p2p:
                say(pingfmt.p2p_established_line(reactor.seconds() - start))
            did_p2p = did_p2p or p2p
            region = "" if p2p else (last.derp_name or names.get(last.derp_region, "unknown"))
            shown = stamp if (options["time"] or options["utc"]) else ""
            say(pingfmt.pong_line(ws, last.latency, p2p, last.endpoint, region or "unknown", shown))
            pongs.append(pingfmt.pong_json(n, stamp, last.latency, p2p, region))
            if n == options["n"]:
                break
    finally:
        _restore_interrupt(previous)
        conn.close()
    ctx.stderr.write(pingfmt.closing_lines(p2p, last.endpoint if last else "", DOCS, relayed_why))
    for warning in pingfmt.quality_warnings(summary):
        ctx.err(warning)
    ctx.stdout.write(pingfmt.ping_json(ws, pongs, summary) if json_mode else summary.table())
    ctx.stdout.flush()
    return 0


def _stamp(options: Any) -> str:
    now = datetime.now(UTC) if options["utc"] else datetime.now().astimezone()
    text = now.isoformat(timespec="seconds")
    return text.replace("+00:00", "Z") if options["utc"] else text


def _install_interrupt(stop: dict[str, bool]) -> Any:
    """Ctrl-C ends the loop (then the verdict and summary print), as in Coder."""
    def handler(signum: int, frame: Any) -> None:
        stop["now"] = True
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (tests)
        return None


def _restore_interrupt(previous: Any) -> None:
    if previous is not None:
        try:
            signal.signal(signal.SIGINT, previous)
        except ValueError:
            pass


run = tunnel.command(run_with, via_daemon=True)
