"""Speedtest on the agent's tunnel port 3: Tailscale's ``net/speedtest`` protocol (version 2).

Wire format (a TCP stream; the same as Tailscale's, so either side interoperates):

1. client -> server: one JSON object and ``\\n``:
   ``{"version": 2, "time": <test duration in nanoseconds>, "direction": 0|1}``
   where direction 0 is *download* (server sends, client receives) and 1 is *upload*;
   the direction is always named from the client's point of view.
2. server -> client: ``{}\\n`` to start, or ``{"error": "..."}\\n`` and close (bad JSON, a
   version other than 2, a duration outside (0, 300 s]).
3. The sending side writes 2 MiB blocks until the duration has passed (checked after each
   block), then closes the connection. The receiving side counts until EOF (and gives up
   duration + 5 s after the start).

Measurement (both directions, done by whichever side is the client): bytes are counted as
they are written (sender) or read (receiver); whenever at least 1 s has passed since the
current interval began, the interval is closed at that moment. At the end the unfinished
interval is kept if it lasted more than 10 ms, and a total covering the whole test is added.
Times are seconds since the test's start. Those are Tailscale's rules: the CLI prints
these intervals (``%.2f-%.2f sec  %.4f Mbits/sec``).

Layout: :class:`IntervalMeter` and the config codec are pure (time passed in); the two
protocols are thin Twisted adapters over any stream transport (TCP, the tunnel's netstack).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPullProducer, IStreamClientEndpoint
from zope.interface import implementer

from coderstack.twistedtypes import Clock, StreamTransport, stream_transport

VERSION = 2
DOWNLOAD = 0
UPLOAD = 1
BLOCK_SIZE = 2 * 1024 * 1024
INCREMENT = 1.0
MIN_INTERVAL = 0.010
DEFAULT_DURATION = 5.0
MAX_DURATION = 300.0
RECEIVE_GRACE = 5.0
MAX_CONFIG_LINE = 4096
DIRECTIONS = {"down": DOWNLOAD, "download": DOWNLOAD, "up": UPLOAD, "upload": UPLOAD}


class SpeedtestError(Exception):
    """A bad config, a refused test or a broken connection."""


@dataclass(frozen=True)
class Config:
    version: int
    duration: float  # seconds
    direction: int


def encode_config(direction: int, duration: float) -> bytes:
    return json.dumps({"version": VERSION, "time": int(duration * 1e9), "direction": direction}).encode() + b"\n"


def parse_config(line: bytes) -> Config:
    """Parse and validate the client's config line; raises :class:`SpeedtestError`."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as err:
        raise SpeedtestError(f"invalid config: {err}") from None
    if not isinstance(obj, dict):
        raise SpeedtestError("invalid config: not an object")
    version, nanos, direction = obj.get("version"), obj.get("time"), obj.get("direction", DOWNLOAD)
    if not isinstance(version, int) or isinstance(version, bool):
        raise SpeedtestError("invalid config: version")
    if version != VERSION:
        raise SpeedtestError(f"version mismatch! Server is version {VERSION}, client is version {version}")
    if not isinstance(nanos, int) or isinstance(nanos, bool) or not 0 < nanos <= MAX_DURATION * 1e9:
        raise SpeedtestError("invalid config: time")
    if direction not in (DOWNLOAD, UPLOAD) or isinstance(direction, bool):
        raise SpeedtestError("invalid config: direction")
    return Config(version, nanos / 1e9, direction)


def encode_response(error: str | None = None) -> bytes:
    return (json.dumps({"error": error}) if error else "{}").encode() + b"\n"


def parse_response(line: bytes) -> str | None:
    """The server's answer: None to go ahead, or its error text."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return "invalid response from the speedtest server"
    if not isinstance(obj, dict):
        return "invalid response from the speedtest server"
    err = obj.get("error")
    return str(err) if err else None


@dataclass
class Result:
    """Intervals ``(start, end, bytes)`` in seconds since the start, and the whole test's total."""

    intervals: list[tuple[float, float, int]] = field(default_factory=list)
    total: tuple[float, float, int] | None = None


class IntervalMeter:
    """Counts bytes into ~1 s intervals; pure (the caller passes the time)."""

    def __init__(self, start: float):
        self.start = start
        self.interval_start = start
        self.interval_bytes = 0
        self.total_bytes = 0
        self.last = start
        self.intervals: list[tuple[float, float, int]] = []

    def add(self, nbytes: int, now: float) -> None:
        self.interval_bytes += nbytes
        self.last = now
        if now - self.interval_start >= INCREMENT:
            self._close(now)

    def _close(self, now: float) -> None:
        self.intervals.append((self.interval_start - self.start, now - self.start, self.interval_bytes))
        self.total_bytes += self.interval_bytes
        self.interval_bytes = 0
        self.interval_start = now

    def finish(self) -> Result:
        now = self.last
        if now - self.interval_start > MIN_INTERVAL:
            self._close(now)
        else:
            self.total_bytes += self.interval_bytes
            self.interval_bytes = 0
        total = (0.0, now - self.start, self.total_bytes) if now - self.start > MIN_INTERVAL else None
        return Result(list(self.intervals), total)


@implementer(IPullProducer)
class _BlockSender:
    """Writes 2 MiB blocks whenever the transport wants more, until the duration has passed."""

    def __init__(self, transport: StreamTransport, clock: Clock, meter: IntervalMeter, duration: float,
                 on_done: Callable[[], None]):
        self.transport, self.clock, self.meter = transport, clock, meter
        self.deadline = meter.start + duration
        self.block = os.urandom(BLOCK_SIZE)  # random, so no compression along the path flatters us
        self.on_done = on_done
        self.stopped = False

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        self.transport.write(self.block)
        now = self.clock.seconds()
        self.meter.add(BLOCK_SIZE, now)
        if now > self.deadline:
            self.stopped = True
            self.transport.unregisterProducer()
            self.on_done()

    def stopProducing(self) -> None:
        self.stopped = True


class _LineThenStream(protocol.Protocol):
    """Shared: collect the first line, then hand further bytes to ``stream_received``."""

    line_done = False

    def __init__(self) -> None:
        self._buf = b""

    def dataReceived(self, data: bytes) -> None:
        if self.line_done:
            self.stream_received(data)
            return
        self._buf += data
        nl = self._buf.find(b"\n")
        if nl < 0:
            if len(self._buf) > MAX_CONFIG_LINE:
                self.bad_line()
            return
        line, rest = self._buf[:nl], self._buf[nl + 1:]
        self._buf = b""
        self.line_done = True
        self.line_received(line)
        if rest and self.transport is not None:
            self.stream_received(rest)

    def line_received(self, line: bytes) -> None:
        raise NotImplementedError

    def stream_received(self, data: bytes) -> None:
        raise NotImplementedError

    def bad_line(self) -> None:
        stream_transport(self).loseConnection()


class SpeedtestServerProtocol(_LineThenStream):
    """The agent's side: obeys the client's config, doing the opposite direction."""

    def __init__(self, clock: Clock):
        super().__init__()
        self.clock = clock
        self.meter: IntervalMeter | None = None
        self.timeout: Any = None
        self.errors = 0

    def line_received(self, line: bytes) -> None:
        try:
            config = parse_config(line)
        except SpeedtestError as err:
            self.errors += 1
            stream_transport(self).write(encode_response(str(err)))
            stream_transport(self).loseConnection()
            return
        stream_transport(self).write(encode_response())
        self.meter = IntervalMeter(self.clock.seconds())
        if config.direction == DOWNLOAD:  # the client downloads: we send
            sender = _BlockSender(stream_transport(self), self.clock, self.meter, config.duration,
                                  stream_transport(self).loseConnection)
            stream_transport(self).registerProducer(sender, False)
        else:
            self.timeout = self.clock.callLater(config.duration + RECEIVE_GRACE, stream_transport(self).abortConnection)

    def stream_received(self, data: bytes) -> None:
        if self.meter is not None:
            self.meter.add(len(data), self.clock.seconds())

    def bad_line(self) -> None:
        self.errors += 1
        stream_transport(self).write(encode_response("invalid config: line too long"))
        stream_transport(self).loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self.timeout is not None and self.timeout.active():
            self.timeout.cancel()


def _reactor_clock() -> Clock:
    from twisted.internet import reactor

    return cast(Clock, reactor)


class SpeedtestServerFactory(protocol.Factory):
    def __init__(self, clock: Clock | None = None):
        self.clock = clock if clock is not None else _reactor_clock()

    def buildProtocol(self, addr: Any) -> SpeedtestServerProtocol:
        p = SpeedtestServerProtocol(self.clock)
        p.factory = self
        return p


class SpeedtestClientProtocol(_LineThenStream):
    """Runs one test; ``done`` fires with a :class:`Result` or fails with :class:`SpeedtestError`."""

    def __init__(self, direction: int, duration: float, clock: Clock):
        super().__init__()
        self.direction, self.duration, self.clock = direction, duration, clock
        self.done: defer.Deferred[Result] = defer.Deferred()
        self.meter: IntervalMeter | None = None
        self.error: str | None = None
        self.timeout: Any = None

    def connectionMade(self) -> None:
        stream_transport(self).write(encode_config(self.direction, self.duration))

    def line_received(self, line: bytes) -> None:
        self.error = parse_response(line)
        if self.error is not None:
            stream_transport(self).loseConnection()
            return
        self.meter = IntervalMeter(self.clock.seconds())
        if self.direction == UPLOAD:
            sender = _BlockSender(stream_transport(self), self.clock, self.meter, self.duration,
                                  stream_transport(self).loseConnection)
            stream_transport(self).registerProducer(sender, False)
        else:
            self.timeout = self.clock.callLater(self.duration + RECEIVE_GRACE, self._give_up)

    def _give_up(self) -> None:
        self.error = "speedtest timed out"
        stream_transport(self).abortConnection()

    def stream_received(self, data: bytes) -> None:
        if self.meter is not None:
            self.meter.add(len(data), self.clock.seconds())

    def bad_line(self) -> None:
        self.error = "invalid response from the speedtest server"
        stream_transport(self).loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self.timeout is not None and self.timeout.active():
            self.timeout.cancel()
        if self.done.called:
            return
        if self.error is not None:
            self.done.errback(SpeedtestError(self.error))
        elif self.meter is None:
            self.done.errback(SpeedtestError("connection closed before the test started"))
        else:
            self.done.callback(self.meter.finish())


async def run_speedtest(endpoint: IStreamClientEndpoint, direction: int = DOWNLOAD,
                        duration: float = DEFAULT_DURATION, clock: Clock | None = None) -> Result:
    """Connect ``endpoint`` (the agent's port 3 over the tunnel, or any stream) and run one test."""
    from twisted.internet.endpoints import connectProtocol

    proto = SpeedtestClientProtocol(direction, duration, clock if clock is not None else _reactor_clock())
    await connectProtocol(endpoint, proto)
    return await proto.done
