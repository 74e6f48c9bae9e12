"""What a scale test measures, and its summary: latency samples with percentiles, errors counted
by kind, the server's own figures read from its ``/metrics``, as a table or JSON.

Pure: no reactor, no I/O. The load generator records into :class:`Samples` and
:class:`Errors`; :func:`server_figures` reads the Prometheus text exposition (one sample per
line, ``name{labels} value``; ``#`` lines are comments) and keeps the series a summary shows.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


class Samples:
    """Latencies in seconds; percentiles by nearest rank (the sample itself, never interpolated,
    so p99 of 100 samples is the 99th smallest)."""

    def __init__(self) -> None:
        self._values: list[float] = []
        self._sorted = True

    def add(self, seconds: float) -> None:
        if math.isfinite(seconds):
            self._values.append(max(0.0, seconds))
            self._sorted = False

    def __len__(self) -> int:
        return len(self._values)

    def percentile(self, p: float) -> float | None:
        """The ``p``-th percentile (0 < p <= 100), or None without samples."""
        if not 0 < p <= 100:
            raise ValueError(f"a percentile is in (0, 100], not {p}")
        if not self._values:
            return None
        if not self._sorted:
            self._values.sort()
            self._sorted = True
        rank = math.ceil(p / 100 * len(self._values))
        return self._values[max(rank, 1) - 1]

    def to_json(self) -> dict[str, Any]:
        """Count and p50/p95/p99/max in milliseconds (None without samples)."""
        def ms(p: float) -> float | None:
            v = self.percentile(p)
            return None if v is None else round(v * 1000, 3)

        return {"count": len(self), "p50_ms": ms(50), "p95_ms": ms(95), "p99_ms": ms(99),
                "max_ms": ms(100)}


class Errors(Counter[str]):
    """Failures counted by kind (``dial``, ``coordinate``, ``echo-timeout``, ...)."""

    def add(self, kind: str) -> None:
        self[kind] += 1


def error_kind(err: BaseException) -> str:
    """A short name for a failure, to count errors by kind: ``http-403``, ``refused``, ..."""
    status = getattr(err, "status", None)
    if isinstance(status, int):
        return f"http-{status}"
    name = type(err).__name__
    return {"ConnectionRefusedError": "refused", "TimeoutError": "timeout", "DialError": "timeout",
            "ConnectError": "connect", "ConnectingCancelledError": "timeout"}.get(name, name)


#: The /metrics series a summary shows, by the name it shows them under.
SERVER_SERIES = {
    "rss_bytes": "process_resident_memory_bytes",
    "cpu_seconds": "process_cpu_seconds_total",
    "open_fds": "process_open_fds",
    "derp_packets_relayed": "coderstack_derp_packets_relayed_total",
    "derp_bytes_relayed": "coderstack_derp_bytes_relayed_total",
    "derp_packets_dropped": "coderstack_derp_packets_dropped_total",
    "derp_connections": "coderstack_derp_clients_connected",
}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {series: value}, labelled series summed under their bare name. Lines
    that do not parse are skipped: a summary must not fail on a server's newer metrics."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, _, rest = line.partition("{")
            _labels, sep, rest = rest.partition("}")
            if not sep:
                continue
            fields = rest.split()
        else:
            name, *fields = line.split()
        if not fields or not name.replace("_", "a").replace(":", "a").isalnum():
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if math.isfinite(value):
            out[name] = out.get(name, 0.0) + value
    return out


FANOUT_HISTOGRAM = "coderstack_coordinator_fanout_seconds"


def parse_buckets(text: str, name: str = FANOUT_HISTOGRAM) -> dict[float, float]:
    """A histogram's cumulative buckets from Prometheus text: {upper bound: count}."""
    out: dict[float, float] = {}
    prefix = name + "_bucket{"
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        labels, sep, rest = line[len(prefix):].partition("}")
        le = next((v.strip('"') for k, _, v in (p.partition("=") for p in labels.split(",")) if k == "le"), None)
        try:
            bound, count = float(le) if le is not None else math.nan, float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        if sep and not math.isnan(bound) and math.isfinite(count):
            out[bound] = count
    return out


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile (0-1) of what a histogram observed between two scrapes: the upper bound
    of the first bucket holding it (an upper estimate, as the buckets allow); None if nothing was
    observed, inf if it lies beyond the largest finite bound."""
    bounds = sorted(after)
    counts = [max(0.0, after[b] - before.get(b, 0.0)) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    target = q * counts[-1]
    for bound, count in zip(bounds, counts, strict=True):
        if count >= target:
            return bound
    return math.inf


def server_figures(before: dict[str, float], after: dict[str, float], seconds: float,
                   buckets: tuple[dict[float, float], dict[float, float]] | None = None) -> dict[str, Any]:
    """The server's figures over a measured interval: RSS and descriptors at its end, CPU as a
    share of one core during it, relay packets per second; a series the server lacks is None."""
    def at_end(key: str) -> float | None:
        return after.get(SERVER_SERIES[key])

    def rate(key: str) -> float | None:
        name = SERVER_SERIES[key]
        if name not in after or name not in before or seconds <= 0:
            return None
        return max(0.0, after[name] - before[name]) / seconds

    cpu = rate("cpu_seconds")
    fanout: dict[str, float | None] = {}
    if buckets is not None:
        for label, q in (("p50", 0.5), ("p99", 0.99)):
            v = bucket_quantile(buckets[0], buckets[1], q)
            fanout[f"coordinator_fanout_{label}_ms_at_most"] = None if v is None else round(v * 1000, 3)
    return {**fanout,
        "rss_bytes": at_end("rss_bytes"),
        "open_fds": at_end("open_fds"),
        "cpu_percent": None if cpu is None else round(cpu * 100, 1),
        "derp_connections": at_end("derp_connections"),
        "derp_packets_per_second": _round(rate("derp_packets_relayed")),
        "derp_bytes_per_second": _round(rate("derp_bytes_relayed")),
        "derp_packets_dropped": _round(rate("derp_packets_dropped"), per=seconds),
    }


def _round(value: float | None, per: float = 1.0) -> float | None:
    return None if value is None else round(value * per, 1)


@dataclass
class Summary:
    """One scale-test run: what was asked, what held, what failed, what it cost the server."""

    role: str  # "agents" or "traffic"
    wanted: int
    connected: int = 0
    seconds: float = 0.0
    errors: Errors = field(default_factory=Errors)
    fanout: Samples = field(default_factory=Samples)  # a node's creation -> its arrival at a peer
    latency: Samples = field(default_factory=Samples)  # one tick's bytes echoed back
    connect: Samples = field(default_factory=Samples)  # start -> connected (or tunnel reachable)
    lag: Samples = field(default_factory=Samples)  # how late the generator's own timers fired
    bytes_sent: int = 0
    bytes_received: int = 0
    paths: Counter[str] = field(default_factory=Counter)  # "p2p" / "derp" per connection
    server: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: float | None = None  # the generator process's own CPU over ``seconds``
    socket_drops: Counter[str] = field(default_factory=Counter)  # the shared UDP socket's, by reason

    @property
    def cpu_percent(self) -> float | None:
        """The generator's CPU as a share of one core: near 100 means its latencies are its own."""
        if self.cpu_seconds is None or self.seconds <= 0:
            return None
        return round(100 * self.cpu_seconds / self.seconds, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "wanted": self.wanted,
            "connected": self.connected,
            "seconds": round(self.seconds, 3),
            "errors": dict(sorted(self.errors.items())),
            "connect": self.connect.to_json(),
            "fanout": self.fanout.to_json(),
            "latency": self.latency.to_json(),
            "generator_lag": self.lag.to_json(),
            "generator_cpu_percent": self.cpu_percent,
            "socket_drops": dict(sorted(self.socket_drops.items())),
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "paths": dict(sorted(self.paths.items())),
            "server": self.server,
        }

    def rows(self) -> list[list[str]]:
        """(what, value) rows for the table."""
        def lat(s: Samples) -> str:
            j = s.to_json()
            if not j["count"]:
                return "no samples"
            return f"p50 {j['p50_ms']} ms, p95 {j['p95_ms']} ms, p99 {j['p99_ms']} ms ({j['count']})"

        rows = [
            [f"{self.role} connected", f"{self.connected} of {self.wanted}"],
            ["errors", ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"],
            ["connect time", lat(self.connect)],
            ["node fan-out", lat(self.fanout)],
            ["generator lag", lat(self.lag)],
            ["generator CPU", "unknown" if self.cpu_percent is None else f"{self.cpu_percent}% of a core"],
        ]
        if self.role == "traffic":
            rate = (self.bytes_received / self.seconds) if self.seconds > 0 else 0.0
            rows += [
                ["echo latency", lat(self.latency)],
                ["bytes sent / echoed", f"{self.bytes_sent} / {self.bytes_received} ({rate / 1000:.1f} kB/s)"],
                ["paths", ", ".join(f"{k} {v}" for k, v in sorted(self.paths.items())) or "none"],
            ]
        s = self.server
        if s:
            rss = s.get("rss_bytes")
            rows += [
                ["server RSS", "unknown" if rss is None else f"{rss / 2**20:.0f} MiB"],
                ["server CPU", "unknown" if s.get("cpu_percent") is None else f"{s['cpu_percent']}% of a core"],
                ["server fds", _text(s.get("open_fds"))],
                ["relay packets/s", _text(s.get("derp_packets_per_second"))],
            ]
            if s.get("coordinator_fanout_p99_ms_at_most") is not None:
                rows.append(["server fan-out", f"p50 ≤ {s['coordinator_fanout_p50_ms_at_most']} ms, "
                                               f"p99 ≤ {s['coordinator_fanout_p99_ms_at_most']} ms"])
        return rows

    @property
    def failed(self) -> bool:
        return bool(self.errors) or self.connected < self.wanted


def _text(value: Any) -> str:
    if value is None:
        return "unknown"
    return f"{value:.0f}" if isinstance(value, float) else str(value)
