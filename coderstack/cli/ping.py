"""``coderstack ping WORKSPACE``: Coder's current ping.

Pings (disco, over whatever path the tunnel uses) until interrupted or ``-n N``; per-pong lines go
to stdout (stderr with ``--output json``); diagnostics, the closing p2p/DERP verdict and the
seeds' quality warnings go to stderr; the summary table (or JSON) to stdout at the end.
"""

from __future__ import annotations

import json
import signal
import time
from datetime import UTC, datetime
from typing import Any

from twisted.internet import defer, task
from twisted.python import usage
from twisted.web.client import Agent, readBody

from coderstack.cli import pingfmt, tunnel
from coderstack.cli.command import Command
from coderstack.cli.context import Context
from coderstack.derpmap import DERPMap

TROUBLESHOOTING_URL = "https://coder.com/docs/admin/networking/troubleshooting"
AGENT_API_PORT = 4


def _duration(value: str) -> float:
    """Go-style durations as the flags take them: ``1s``, ``500ms``, ``2m``, or plain seconds."""
    v = value.strip()
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if v.endswith(suffix) and v[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(v[: -len(suffix)]) * scale
    if v.replace(".", "", 1).isdigit():
        return float(v)
    raise ValueError(f"{value!r} is not a duration (like 1s or 500ms)")


class Options(Command):
    synopsis = "coderstack ping <workspace> [-n N] [--wait 1s] [-t 5s] [--time] [--utc] [-o table|json]"
    optParameters = [
        ["num", "n", None, "Number of pings (default: until interrupted)."],
        ["wait", None, "1s", "Time between pings."],
        ["timeout", "t", "5s", "Time to wait for each pong."],
        ["output", "o", "table", "Output format: table or json."],
    ]
    optFlags = [
        ["time", None, "Prefix each line with the time (RFC 3339)."],
        ["utc", None, "With --time, use UTC."],
        ["verbose", "v", "Show every diagnostic, also when the connection is direct."],
    ]

    def parseArgs(self, workspace: str) -> None:
        self["workspace"] = workspace

    def postOptions(self) -> None:
        for flag in ("wait", "timeout"):
            try:
                self[flag] = _duration(self[flag])
            except ValueError as err:
                raise usage.UsageError(f"invalid value for --{flag}: {err}") from None
        if self["num"] is not None:
            if not self["num"].isdigit() or int(self["num"]) < 1:
                raise usage.UsageError(f"invalid value for --num: {self['num']!r} (a positive number)")
            self["num"] = int(self["num"])
        if self["output"] not in ("table", "json"):
            raise usage.UsageError(f"invalid value for --output: {self['output']!r} (table or json)")


async def agent_netcheck(reactor: Any, ws: tunnel.Workspace) -> dict[str, Any] | None:
    """The agent's own netcheck, from its HTTP API on tunnel port 4 (None when unavailable)."""

    class _Endpoints:
        def endpointForURI(self, uri: Any) -> Any:  # noqa: N802 - twisted API
            return ws.endpoint(AGENT_API_PORT, timeout=5)

    agent = Agent.usingEndpointFactory(reactor, _Endpoints())
    try:
        resp = await agent.request(b"GET", b"http://agent/api/v0/netcheck")
        body = await readBody(resp)
        return json.loads(body) if resp.code == 200 else None
    except Exception:  # noqa: BLE001 - diagnostics are best effort
        return None


async def run(reactor: Any, opts: Options, ctx: Context) -> int:
    json_out = opts["output"] == "json"
    pong_out = ctx.err if json_out else ctx.out
    ctx.err(" Collecting diagnostics...")
    started = time.monotonic()
    ws = await tunnel.connect(reactor, ctx, opts["workspace"], quiet=True)
    name = ws.name
    conn = ws.conn
    summary = pingfmt.PingSummary(name)
    pongs: list[dict[str, Any]] = []
    stopping = {"now": False}
    current: dict[str, defer.Deferred[Any] | None] = {"d": None}

    def interrupt(*_: Any) -> None:
        def stop() -> None:
            stopping["now"] = True
            if current["d"] is not None and not current["d"].called:
                current["d"].cancel()

        reactor.callFromThread(stop)

    previous = signal.signal(signal.SIGINT, interrupt)
    p2p_seen = False
    last_path = ""
    try:
        seq = 0
        while not stopping["now"] and (opts["num"] is None or seq < opts["num"]):
            seq += 1
            stamp = ""
            if opts["time"]:
                now = datetime.now(UTC) if opts["utc"] else datetime.now().astimezone()
                stamp = now.isoformat(timespec="seconds")
            d = current["d"] = conn.ping(conn.agent_key)
            d.addTimeout(opts["timeout"], reactor)
            when = datetime.now(UTC).isoformat()
            try:
                latency, path = await d
            except defer.TimeoutError:
                summary.add(None)
                pong_out(pingfmt.timeout_line(name))
                pongs.append(pingfmt.pong_json(seq, when, error="timed out"))
            except defer.CancelledError:
                break
            except Exception as err:  # noqa: BLE001 - one line, keep pinging
                summary.add(None)
                if "no matching peer" not in str(err):
                    pong_out(pingfmt.failed_line(name, str(err)))
                pongs.append(pingfmt.pong_json(seq, when, error=str(err)))
            else:
                summary.add(latency)
                last_path = path
                p2p = path.startswith("p2p ")
                if p2p and not p2p_seen:
                    p2p_seen = True
                    pong_out(pingfmt.p2p_established_line(time.monotonic() - started))
                endpoint = path[4:] if p2p else ""
                region = path[5:-1] if path.startswith("DERP(") else ""
                pong_out(pingfmt.pong_line(name, latency, p2p, endpoint, region, stamp))
                pongs.append(pingfmt.pong_json(seq, when, latency, p2p, region))
            if not stopping["now"] and (opts["num"] is None or seq < opts["num"]):
                wait = current["d"] = task.deferLater(reactor, opts["wait"], lambda: None)
                try:
                    await wait
                except defer.CancelledError:
                    break
        p2p = last_path.startswith("p2p ")
        ctx.stderr.write(await diagnostics(reactor, ctx, ws, p2p, last_path, opts["verbose"]))
        ctx.stderr.write(pingfmt.closing_lines(p2p, last_path[4:] if p2p else "", TROUBLESHOOTING_URL))
        for warning in pingfmt.quality_warnings(summary):
            ctx.err(warning)
        if json_out:
            ctx.stdout.write(pingfmt.ping_json(name, pongs, summary))
        else:
            ctx.stdout.write(summary.table())
        ctx.stdout.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
        await ws.close()
    return 0 if summary.successful else 1


async def diagnostics(reactor: Any, ctx: Context, ws: tunnel.Workspace, p2p: bool, path: str,
                      verbose: bool) -> str:
    conn = ws.conn
    status = conn.status()
    peer = status["peers"].get(conn.agent_key.hex(), {}) if conn.agent_key else {}
    names = {rid: conn.derp_map.region(rid).region_name for rid in conn.derp_map.regions} if conn.derp_map else {}
    agent_node = getattr(conn, "agent_node", None)
    peer_info = {
        "preferred_derp": status["home_region"],
        "derp_region_names": names,
        "sent_node": conn.node() is not None,
        "received_node": (
            {"derp": f"127.3.3.40:{agent_node.preferred_derp}", "endpoints": list(agent_node.endpoints)}
            if agent_node is not None else None
        ),
        "last_handshake": peer.get("last_handshake"),
    }
    out = ""
    if verbose or not p2p:
        out += pingfmt.peer_diagnostics(peer_info, conn.reactor.seconds())
    from coderstack.tailnet.netcheck import gather_interfaces, interfaces_report

    derp_map: DERPMap | None = conn.derp_map
    has_stun = bool(derp_map) and any(r.stun_nodes for r in derp_map.regions.values())
    report = conn.last_report
    out += pingfmt.conn_diagnostics(
        troubleshooting_url=TROUBLESHOOTING_URL,
        ping_p2p=p2p,
        verbose=verbose,
        disable_direct=ctx.disable_direct,
        deployment_blocks_direct=conn.block_endpoints and not ctx.disable_direct,
        derp_map_has_stun=has_stun,
        local_netinfo=report.to_json() if report is not None else None,
        local_interfaces=interfaces_report(gather_interfaces()),
        agent_netcheck=await agent_netcheck(reactor, ws) if (verbose or not p2p) else None,
    )
    return out
