"""The server process's own resource use, under the names the Prometheus client libraries give it.

``process_resident_memory_bytes``, ``process_virtual_memory_bytes``, ``process_cpu_seconds_total``,
``process_open_fds``, ``process_max_fds`` and ``process_start_time_seconds``, so a dashboard made
for any Prometheus-instrumented process works on ``/metrics`` unchanged.

On Linux they come from ``/proc/self/stat`` (parsed by the pure :func:`parse_stat`), the boot time
in ``/proc/stat`` (:func:`parse_boot_time`), ``/proc/self/fd`` and ``RLIMIT_NOFILE``. Elsewhere
only what ``resource`` knows is reported. A sample that cannot be read is left out rather than
reported as zero, which a graph would show as a real value.
"""

from __future__ import annotations

import functools
import math
import os
import resource
from dataclasses import dataclass

__all__ = ["ProcStat", "parse_stat", "parse_boot_time", "from_proc", "sample", "metrics_text"]

_HELP = {
    "process_cpu_seconds_total": ("counter", "Total user and system CPU time spent in seconds."),
    "process_virtual_memory_bytes": ("gauge", "Virtual memory size in bytes."),
    "process_resident_memory_bytes": ("gauge", "Resident memory size in bytes."),
    "process_start_time_seconds": ("gauge", "Start time of the process since unix epoch in seconds."),
    "process_open_fds": ("gauge", "Number of open file descriptors."),
    "process_max_fds": ("gauge", "Maximum number of open file descriptors."),
}


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` these metrics need, in the kernel's units."""

    utime_ticks: int
    stime_ticks: int
    start_ticks: int  # after boot
    vsize_bytes: int
    rss_pages: int


def parse_stat(text: str) -> ProcStat | None:
    """``/proc/<pid>/stat``'s text, or None if it does not look like one.

    The command name (field 2) is in parentheses and may itself hold spaces and parentheses, so
    the fields are counted from the last ``)``.
    """
    _, paren, rest = text.rpartition(")")
    if not paren:
        return None
    fields = rest.split()
    # rest starts at field 3 (state); utime is field 14, stime 15, starttime 22, vsize 23, rss 24.
    if len(fields) < 22:
        return None
    try:
        values = [int(fields[i]) for i in (11, 12, 19, 20, 21)]
    except ValueError:
        return None
    if any(v < 0 or v >= 1 << 64 for v in values):  # the kernel's fields are u64s
        return None
    return ProcStat(*values)


def parse_boot_time(text: str) -> float | None:
    """The ``btime`` line of ``/proc/stat`` (seconds since the epoch), or None."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "btime":
            try:
                btime = float(value.strip())
            except ValueError:
                return None
            return btime if math.isfinite(btime) and btime >= 0 else None
    return None


def from_proc(stat: ProcStat, boot_time: float | None, ticks_per_second: int,
              page_size: int) -> dict[str, float]:
    """The memory, CPU and start-time samples that ``stat`` (and the boot time) give."""
    out: dict[str, float] = {
        "process_cpu_seconds_total": (stat.utime_ticks + stat.stime_ticks) / ticks_per_second,
        "process_virtual_memory_bytes": float(stat.vsize_bytes),
        "process_resident_memory_bytes": float(stat.rss_pages * page_size),
    }
    if boot_time is not None:
        out["process_start_time_seconds"] = boot_time + stat.start_ticks / ticks_per_second
    return out


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


@functools.cache
def _boot_time() -> float | None:
    # Fixed until the machine reboots, and /proc/stat grows with the number of CPUs: read once.
    text = _read("/proc/stat")
    return None if text is None else parse_boot_time(text)


def _sysconf(name: str) -> int | None:
    try:
        value = os.sysconf(name)
    except (ValueError, OSError, AttributeError):
        return None
    return value if value > 0 else None


def sample() -> dict[str, float]:
    """This process's samples, by metric name; those it cannot read are missing."""
    out: dict[str, float] = {}
    text = _read("/proc/self/stat")
    stat = None if text is None else parse_stat(text)
    ticks, page = _sysconf("SC_CLK_TCK"), _sysconf("SC_PAGE_SIZE")
    if stat is not None and ticks is not None and page is not None:
        out.update(from_proc(stat, _boot_time(), ticks, page))
    else:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out["process_cpu_seconds_total"] = usage.ru_utime + usage.ru_stime
    try:
        # The listing's own descriptor is in it; the client libraries count it too.
        out["process_open_fds"] = float(len(os.listdir("/proc/self/fd")))
    except OSError:
        pass
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        out["process_max_fds"] = float(soft)
    return out


def metrics_text(samples: dict[str, float] | None = None) -> str:
    """Prometheus text for ``samples`` (default: :func:`sample` now), in a fixed order."""
    if samples is None:
        samples = sample()
    lines: list[str] = []
    for name, (kind, help_) in _HELP.items():
        if name in samples:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {samples[name]!r}"]
    return "\n".join(lines) + "\n" if lines else ""
