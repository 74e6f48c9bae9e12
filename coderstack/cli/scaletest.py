"""``coderstack scaletest``: load-test a deployment (see :mod:`coderstack.scaletest`).

    coderstack scaletest create-workspaces 100          # workspaces + agent tokens -> the run file
    coderstack scaletest agents --duration 10m          # their agents, simulated, in this process
    coderstack scaletest traffic --duration 30s         # a client per agent, 40 KB/s each
    coderstack scaletest cleanup                        # delete every scale-test workspace

The run file (``--run-file``, default ``scaletest.json`` in the CLI's config dir, owner-only)
carries the agent tokens from ``create-workspaces`` to ``agents``. ``agents`` and ``traffic``
print a summary (table, or ``--output json``): connections held, errors by kind, connect
time, node-update fan-out p50/p95/p99, echo latency, and — for an owner — the server's RSS,
CPU, descriptors and relay packets/s from its ``/metrics``. Either exits 1 if anything failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.python import usage

from coderstack.cli.command import Command, CommandGroup
from coderstack.cli.context import Context
from coderstack.cli.output import table
from coderstack.cli.pingfmt import parse_go_duration
from coderstack.sdk import SDKError
from coderstack.twistedtypes import sleep

RUN_FILE = "scaletest.json"
T = TypeVar("T")


def _positive_int(opts: usage.Options, name: str, *, allow_zero: bool = False) -> None:
    try:
        value = int(opts[name])
    except (TypeError, ValueError):
        raise usage.UsageError(f"--{name} must be a whole number, not {opts[name]!r}") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise usage.UsageError(f"--{name} must be {'0 or more' if allow_zero else 'more than 0'}")
    opts[name] = value


def _duration(opts: usage.Options, name: str, *, allow_zero: bool = False) -> None:
    try:
        value = parse_go_duration(opts[name])
    except ValueError as err:
        raise usage.UsageError(f"invalid --{name}: {err}") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise usage.UsageError(f"--{name} must be more than 0")
    opts[name] = value


def _shard(opts: usage.Options) -> None:
    """``--shard I/K``: this process runs the I-th of K equal slices (I from 0), so one scale test
    can be spread over several processes, cores or machines."""
    text = opts["shard"]
    try:
        index, _, count = text.partition("/")
        i, k = int(index), int(count)
    except (TypeError, ValueError):
        raise usage.UsageError(f"--shard must look like I/K (e.g. 0/4), not {text!r}") from None
    if not 0 <= i < k:
        raise usage.UsageError(f"--shard {text}: I must be 0 or more and less than K")
    opts["shard"] = (i, k)


def shard_of(items: Sequence[T], index: int, count: int) -> list[T]:
    """The ``index``-th of ``count`` interleaved slices: every ``count``-th item from ``index``."""
    return list(items[index::count])


def _output(opts: usage.Options) -> None:
    if opts["output"] not in ("table", "json"):
        raise usage.UsageError(f"invalid value for --output: {opts['output']!r} (table or json)")


class _RunFileOption(Command):
    optParameters = [["run-file", "f", None, f"The run file (default: {RUN_FILE} in the config dir)."]]


class CreateWorkspacesOptions(_RunFileOption):
    synopsis = "coderstack scaletest create-workspaces <count> [--concurrency 8] [--run-file F]"
    optParameters = [["concurrency", "c", "8", "Workspaces created at once."]]

    def parseArgs(self, count: str) -> None:  # type: ignore[override]  # usage.Options passes the positional arguments to it, one parameter each
        self["count"] = count

    def postOptions(self) -> None:
        try:
            self["count"] = int(self["count"])
        except ValueError:
            raise usage.UsageError(f"the count must be a whole number, not {self['count']!r}") from None
        if not 0 < self["count"] <= 100_000:
            raise usage.UsageError("the count must be between 1 and 100000")
        _positive_int(self, "concurrency")


class AgentsOptions(_RunFileOption):
    synopsis = "coderstack scaletest agents [--count N] [--duration 10m] [--announce-every 5s] [-o json]"
    optFlags = [["socket-per-agent", None, "Give each agent a UDP socket of its own (default: one "
                                           "socket for all the process's agents)."]]
    optParameters = [
        ["count", "n", "0", "How many of the run file's agents to run (0: all)."],
        ["duration", "d", "10m", "How long the agents stay connected once all are."],
        ["announce-every", None, "0", "Send each agent's node again this often (a node change for "
                                      "the clients to time); 0: only when it really changes."],
        ["rate", None, "50", "Agents started per second."],
        ["connect-timeout", None, "2m", "How long all agents may take to connect."],
        ["shard", None, "0/1", "Run only the I-th of K slices of the agents (I/K, I from 0)."],
        ["output", "o", "table", "Output format: table or json."],
    ]

    def postOptions(self) -> None:
        _output(self)
        _shard(self)
        _positive_int(self, "count", allow_zero=True)
        _positive_int(self, "rate")
        _duration(self, "duration")
        _duration(self, "announce-every", allow_zero=True)
        _duration(self, "connect-timeout")


class TrafficOptions(_RunFileOption):
    synopsis = ("coderstack scaletest traffic [--connections N] [--duration 30s] [--bytes-per-tick 4096] "
                "[--tick-interval 100ms] [--relay] [-o json]")
    optFlags = [["relay", None, "Relayed connections only (no direct paths)."],
                ["socket-per-connection", None, "Give each connection a UDP socket of its own (default: "
                                                "one socket for all the process's connections)."]]
    optParameters = [
        ["connections", "n", "0", "Client connections, spread over the run file's agents (0: one per agent)."],
        ["duration", "d", "30s", "How long each connection moves bytes."],
        ["bytes-per-tick", None, "4096", "Bytes each connection writes per tick."],
        ["tick-interval", None, "100ms", "How often each connection writes."],
        ["rate", None, "20", "Connections opened per second."],
        ["connect-timeout", None, "60s", "How long one connection may take to come up."],
        ["shard", None, "0/1", "Open only the I-th of K slices of the connections (I/K, I from 0); "
                               "with the agents' same --shard, and K dividing the agent count, each slice "
                               "dials only its own agents."],
        ["output", "o", "table", "Output format: table or json."],
    ]

    def postOptions(self) -> None:
        _output(self)
        _shard(self)
        _positive_int(self, "connections", allow_zero=True)
        _positive_int(self, "bytes-per-tick")
        _positive_int(self, "rate")
        _duration(self, "duration")
        _duration(self, "tick-interval")
        _duration(self, "connect-timeout")


class CleanupOptions(_RunFileOption):
    synopsis = "coderstack scaletest cleanup [--prefix scaletest-xxxxxx]"
    optParameters = [["prefix", "p", None, "Only this run's workspaces (default: every scale test's)."]]


class ScaletestOptions(CommandGroup):
    synopsis = "coderstack scaletest <create-workspaces|agents|traffic|cleanup>"
    subCommands = [
        ["create-workspaces", None, CreateWorkspacesOptions, "Create N workspaces and save their agent tokens."],
        ["agents", None, AgentsOptions, "Run the run file's agents, simulated, in this process."],
        ["traffic", None, TrafficOptions, "Open tunnels to the agents and move bytes through them."],
        ["cleanup", None, CleanupOptions, "Delete the scale tests' workspaces."],
    ]


def _run_file_path(opts: usage.Options, ctx: Context) -> str:
    return opts["run-file"] or os.path.join(ctx.config.path, RUN_FILE)


async def _create(reactor: Any, opts: CreateWorkspacesOptions, ctx: Context) -> int:
    from coderstack.scaletest import runfile, workspaces

    path = _run_file_path(opts, ctx)
    count = opts["count"]

    def progress(done: int) -> None:
        if done % 100 == 0 or done == count:
            ctx.err(f"created {done} of {count}")

    run, errors = await workspaces.create_workspaces(ctx.api, count, concurrency=opts["concurrency"],
                                                     progress=progress)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    runfile.write(path, run)
    for line in errors[:20]:
        ctx.err(f"error: {line}")
    ctx.out(f"{len(run.agents)} workspaces {run.prefix}-0..{count - 1} created; agent tokens in {path}")
    return 1 if errors else 0


async def _cleanup(reactor: Any, opts: CleanupOptions, ctx: Context) -> int:
    from coderstack.scaletest import workspaces

    deleted, errors = await workspaces.cleanup(ctx.api, opts["prefix"])
    for line in errors[:20]:
        ctx.err(f"error: {line}")
    ctx.out(f"{len(deleted)} scale-test workspaces deleted.")
    path = _run_file_path(opts, ctx)
    if not errors and opts["prefix"] is None and os.path.exists(path):
        os.remove(path)
    return 1 if errors else 0


async def _metrics(ctx: Context) -> tuple[dict[str, float], dict[float, float]] | None:
    """The server's /metrics (its series, and the coordinator's fan-out buckets), or None where we
    may not read them (not an owner)."""
    from coderstack.scaletest.stats import parse_buckets, parse_metrics

    try:
        resp = await ctx.api.request("GET", "/metrics", ok=(200,), text=True)
    except SDKError as err:
        if err.status not in (401, 403, 404):  # not an owner: no figures, and no failure either
            ctx.err(f"the server's /metrics did not answer: {err}")
        return None
    return parse_metrics(resp), parse_buckets(resp)


async def _server_figures(ctx: Context, before: tuple[dict[str, float], dict[float, float]] | None,
                          seconds: float) -> dict[str, Any]:
    from coderstack.scaletest.stats import server_figures

    if before is None:
        return {}
    after = await _metrics(ctx)
    if after is None:
        return {}
    return server_figures(before[0], after[0], seconds, buckets=(before[1], after[1]))


def _report(ctx: Context, opts: usage.Options, summary: Any) -> int:
    if opts["output"] == "json":
        ctx.out(json.dumps(summary.to_json(), indent=2))
    else:
        ctx.out(table(["", ""], summary.rows()))
    return 1 if summary.failed else 0


def _fire(d: defer.Deferred[None]) -> None:
    if not d.called:
        d.callback(None)


@contextlib.contextmanager
def _interrupted(reactor: Any) -> Iterator[defer.Deferred[None]]:
    """A Deferred that SIGINT or SIGTERM fires (instead of stopping the process) while in the
    block, so a long ``agents`` run can be ended with its summary."""
    stop: defer.Deferred[None] = defer.Deferred()

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(_fire, stop)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _shared_socket(reactor: Any) -> Any:
    from coderstack.tailnet.sharedudp import SharedUDP

    shared = SharedUDP(reactor)
    shared.listen(0)
    return shared


async def _wait_for(reactor: Any, check: Any, timeout: float) -> bool:
    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() >= deadline:
            return False
        await sleep(reactor, 0.2)
    return True


async def _agents(reactor: Any, opts: AgentsOptions, ctx: Context) -> int:
    from coderstack.fdlimit import raise_open_files_limit
    from coderstack.heap import HeapKeeper
    from coderstack.scaletest import runfile, simagent
    from coderstack.scaletest.lag import LagMonitor
    from coderstack.scaletest.stats import Summary

    raise_open_files_limit()
    run = runfile.read(_run_file_path(opts, ctx))
    entries = shard_of(run.agents[: opts["count"]] if opts["count"] else run.agents, *opts["shard"])
    summary = Summary("agents", len(entries))
    fanout = simagent.FanoutClock(reactor, summary.fanout)
    started = reactor.seconds()
    shared = None if opts["socket-per-agent"] else _shared_socket(reactor)
    heap = HeapKeeper(reactor)  # once all are up: the generator's own pauses stay short
    agents = await simagent.start_agents(reactor, ctx.server_url(), [e.token for e in entries],
                                         errors=summary.errors, fanout=fanout, connect=summary.connect,
                                         trust_root=ctx.api.trust_root, rate=opts["rate"], shared_udp=shared)
    try:
        everyone = await _wait_for(reactor, lambda: all(a.connected for a in agents), opts["connect-timeout"])
        held = sum(a.connected for a in agents)
        heap.start()
        ctx.err(f"{held} of {len(agents)} agents connected in {reactor.seconds() - started:.1f}s"
                + ("" if everyone else " (gave up waiting for the rest)"))
        if opts["announce-every"]:
            rng = random.Random()
            for a in agents:
                a.announce_every(opts["announce-every"], rng)
        before = await _metrics(ctx)
        measured, cpu = reactor.seconds(), time.process_time()
        fanout.since = measured
        lag = LagMonitor(reactor, summary.lag)
        lag.start()
        with _interrupted(reactor) as stop:
            ctx.err(f"holding them for {opts['duration']:.0f}s (Ctrl-C or SIGTERM ends it early, with the summary)")
            timer = reactor.callLater(opts["duration"], _fire, stop)
            await stop
            if timer.active():
                timer.cancel()
        lag.stop()
        summary.seconds = reactor.seconds() - measured
        summary.cpu_seconds = time.process_time() - cpu
        summary.connected = sum(a.connected for a in agents)
        summary.server = await _server_figures(ctx, before, summary.seconds)
    finally:
        heap.stop()
        await simagent.close_all(agents)
        if shared is not None:
            summary.socket_drops.update(shared.drops)
            await shared.close()
    return _report(ctx, opts, summary)


async def _traffic(reactor: Any, opts: TrafficOptions, ctx: Context) -> int:
    from uuid import UUID

    from coderstack.fdlimit import raise_open_files_limit
    from coderstack.heap import HeapKeeper
    from coderstack.scaletest import runfile, simagent, traffic
    from coderstack.scaletest.lag import LagMonitor
    from coderstack.scaletest.stats import Summary

    raise_open_files_limit()
    run = runfile.read(_run_file_path(opts, ctx))
    if not run.agents:
        raise usage.UsageError("the run file has no agents")
    mine = shard_of(range(opts["connections"] or len(run.agents)), *opts["shard"])
    summary = Summary("traffic", len(mine))
    fanout = simagent.FanoutClock(reactor, summary.fanout)
    heap = HeapKeeper(reactor)  # once all are up: the generator's own pauses stay short
    relay = opts["relay"] or ctx.disable_direct
    shared = None if opts["socket-per-connection"] else _shared_socket(reactor)
    conns = [traffic.Connection(reactor, ctx.api, UUID(run.agents[i % len(run.agents)].agent_id), summary,
                                fanout, relay=relay, shared_udp=shared)
             for i in mine]
    opening = []
    try:
        for c in conns:
            opening.append(defer.Deferred.fromCoroutine(c.open(opts["connect-timeout"])))
            await sleep(reactor, 1.0 / opts["rate"])
        opened = [ok for _, ok in await defer.DeferredList(opening)]
        up = [c for c, ok in zip(conns, opened, strict=True) if ok]
        heap.start()
        ctx.err(f"{len(up)} of {len(conns)} connections up; moving {opts['bytes-per-tick']} bytes every "
                f"{opts['tick-interval'] * 1000:.0f} ms for {opts['duration']:.0f}s")
        before = await _metrics(ctx)
        measured, cpu = reactor.seconds(), time.process_time()
        fanout.since = measured
        lag = LagMonitor(reactor, summary.lag)
        lag.start()
        await defer.DeferredList([defer.Deferred.fromCoroutine(
            c.run(opts["duration"], opts["bytes-per-tick"], opts["tick-interval"])) for c in up])
        lag.stop()
        summary.seconds = reactor.seconds() - measured
        summary.cpu_seconds = time.process_time() - cpu
        summary.server = await _server_figures(ctx, before, summary.seconds)
    finally:
        heap.stop()
        await defer.DeferredList([defer.Deferred.fromCoroutine(c.close()) for c in conns], consumeErrors=True)
        if shared is not None:
            summary.socket_drops.update(shared.drops)
            await shared.close()
    return _report(ctx, opts, summary)


async def run(reactor: Any, opts: ScaletestOptions, ctx: Context) -> int:
    from coderstack.scaletest.runfile import RunFileError

    handlers: dict[str, Callable[[Any, Any, Context], Awaitable[int]]] = {
        "create-workspaces": _create, "agents": _agents, "traffic": _traffic, "cleanup": _cleanup}
    try:
        return await handlers[str(opts.subCommand)](reactor, opts.subOptions, ctx)
    except RunFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


Options = ScaletestOptions
