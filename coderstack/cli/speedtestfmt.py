"""What ``coderstack speedtest`` prints (Coder's ``cli/speedtest.go``), as pure functions.

Table (one row per ~1 s interval, a separator, then the whole test)::

    INTERVAL       THROUGHPUT
    0.00-1.00 sec  630.7404 Mbits/sec
    ...
    ---------------------------------
    0.00-5.02 sec  853.8217 Mbits/sec

JSON: ``{"overall": {start_time_seconds, end_time_seconds, throughput_mbits},
"intervals": [...]}``. Throughput is bytes × 8 / 10⁶ per second, as Tailscale computes it.
Input is :class:`coderstack.agent.speedtest.Result` (``(start, end, bytes)`` tuples in seconds).
"""

from __future__ import annotations

from typing import Any

from coderstack.cli.pingfmt import go_duration, go_json, render_table


def mbits_per_second(start: float, end: float, nbytes: int) -> float:
    span = end - start
    return nbytes * 8 / 1e6 / span if span > 0 else 0.0


def interval_cells(start: float, end: float, nbytes: int) -> list[str]:
    return [f"{start:.2f}-{end:.2f} sec", f"{mbits_per_second(start, end, nbytes):.4f} Mbits/sec"]


def table(result: Any) -> str:
    rows = [interval_cells(*i) for i in result.intervals]
    total = interval_cells(*result.total) if result.total else None
    widths_rows = rows + ([total] if total else [])
    text = render_table(["INTERVAL", "THROUGHPUT"], widths_rows)
    if total is None:
        return text
    lines = text.split("\n")[:-1]
    width = max(len(line) for line in lines)
    return "\n".join([*lines[:-1], "-" * width, lines[-1]]) + "\n"


def to_json(result: Any) -> str:
    def item(start: float, end: float, nbytes: int) -> dict[str, float]:
        return {"start_time_seconds": start, "end_time_seconds": end,
                "throughput_mbits": mbits_per_second(start, end, nbytes)}
    overall = item(*result.total) if result.total else item(0.0, 0.0, 0)
    return go_json({"overall": overall, "intervals": [item(*i) for i in result.intervals]})


def starting_line(duration: float, direction: str) -> str:
    """``Starting a 5s download test...`` (direction "down"/"up" are spelt out)."""
    word = {"down": "download", "up": "upload"}.get(direction, direction)
    return f"Starting a {go_duration(duration)} {word} test..."


def path_line(latency: float, via: str) -> str:
    """``29ms via coder`` (a DERP region code) or ``1ms via direct``."""
    return f"{go_duration(latency, 0.001)} via {via}"


def waiting_line(latency: float, via: str) -> str:
    return f"Waiting for a direct connection... ({go_duration(latency, 0.001)} via {via})"
