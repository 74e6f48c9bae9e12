"""Resource usage as ``coder stat cpu|mem|disk`` reports it, from /proc and cgroup files.

Pure functions over the text of those files; :mod:`coderstack.agent.coder_command` reads them.

A result is ``used``, an optional ``total``, a ``unit`` and a display ``prefix`` (``Ki Mi Gi Ti``
or none). Text: ``<used>/<total> <prefix><unit> (<percent>%)``, numbers scaled by the prefix and
rounded to at most 3, 2, 1 or 0 decimals for values below 1, 10, 100 and above (trailing zeros
dropped): ``0.42/2 cores (21%)``, ``1.2/3.9 GiB (31%)``. JSON: ``{"total", "unit", "used"}`` with
unscaled numbers (``total`` null when unbounded).

- CPU, host: two samples of the ``cpu`` line of ``/proc/stat``; used cores = busy share of the
  elapsed jiffies × the number of CPUs.
- CPU, container: cgroup v2 ``cpu.stat`` ``usage_usec`` (v1: ``cpuacct.usage`` in ns) sampled
  twice; total = ``cpu.max`` quota/period (v1: ``cpu.cfs_quota_us``/``cpu.cfs_period_us``), or
  the host's CPU count when unlimited.
- Memory, host: ``MemTotal - MemAvailable`` of ``/proc/meminfo``.
- Memory, container: v2 ``memory.current`` minus ``inactive_file`` of ``memory.stat``, out of
  ``memory.max`` (v1: ``memory.usage_in_bytes`` minus ``total_inactive_file``, out of
  ``memory.limit_in_bytes``); an unlimited cgroup counts the host's total.
- Disk: ``statvfs`` of a path (default ``/``): total = blocks × fragment size, used = total − free.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

PREFIXES = {"": 1.0, "Ki": 1024.0, "Mi": 1024.0**2, "Gi": 1024.0**3, "Ti": 1024.0**4}


class StatError(Exception):
    """A /proc or cgroup file that does not say what we need."""


@dataclass(frozen=True)
class Result:
    used: float
    total: float | None
    unit: str
    prefix: str = ""

    def text(self) -> str:
        scale = PREFIXES.get(self.prefix, 1.0)
        out = humanize(self.used / scale)
        if self.total is not None:
            out += "/" + humanize(self.total / scale)
        out += " " + self.prefix + self.unit
        if self.total is not None and self.total > 0:
            out += f" ({self.used / self.total * 100:.0f}%)"
        return out.strip()

    def json(self) -> str:
        return json.dumps({"total": self.total, "unit": self.unit, "used": self.used})


def humanize(value: float) -> str:
    """At most 3 significant-ish decimals: 3 below 1, 2 below 10, 1 below 100, else none."""
    a = abs(value)
    digits = 0 if a == 0 else 3 if a < 1 else 2 if a < 10 else 1 if a < 100 else 0
    if not math.isfinite(value):
        return str(value)
    scale = 10.0**digits
    # Half away from zero, as Go's math.Round.
    rounded = math.copysign(math.floor(a * scale + 0.5), value) / scale
    if rounded == int(rounded):
        return str(int(rounded))
    return repr(rounded)


# --- CPU ---------------------------------------------------------------------------------------


def proc_stat_cpu(text: str) -> tuple[int, int]:
    """(total jiffies, idle jiffies incl. iowait) from the aggregate ``cpu`` line of /proc/stat."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            try:
                values = [int(v) for v in fields[1:]]
            except ValueError:
                break
            if len(values) < 4:
                break
            # guest and guest_nice are already counted in user and nice.
            total = sum(values[:8])
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            return total, idle
    raise StatError("/proc/stat has no aggregate cpu line")


def host_cpu(first: str, second: str, nproc: int) -> Result:
    t1, i1 = proc_stat_cpu(first)
    t2, i2 = proc_stat_cpu(second)
    total = t2 - t1
    used = 0.0 if total <= 0 else (total - (i2 - i1)) / total * nproc
    return Result(max(0.0, used), float(nproc), "cores")


def cgroup2_cpu_usage_usec(cpu_stat: str) -> int:
    for line in cpu_stat.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value)
    raise StatError("cpu.stat has no usage_usec")


def cgroup2_cpu_limit(cpu_max: str, nproc: int) -> float:
    parts = cpu_max.split()
    if not parts or parts[0] == "max":
        return float(nproc)
    quota = int(parts[0])
    period = int(parts[1]) if len(parts) > 1 else 100000
    return quota / period if period > 0 else float(nproc)


def cgroup1_cpu_limit(quota_us: str, period_us: str, nproc: int) -> float:
    quota, period = int(quota_us.strip()), int(period_us.strip())
    return float(nproc) if quota <= 0 or period <= 0 else quota / period


def container_cpu(usage_1_seconds: float, usage_2_seconds: float, elapsed: float, limit: float) -> Result:
    used = 0.0 if elapsed <= 0 else max(0.0, usage_2_seconds - usage_1_seconds) / elapsed
    return Result(used, limit, "cores")


# --- memory -------------------------------------------------------------------------------------


def meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if not fields:
            continue
        try:
            value = int(fields[0])
        except ValueError:
            continue
        out[key.strip()] = value * 1024 if len(fields) > 1 and fields[1] == "kB" else value
    return out


def host_memory(meminfo_text: str, prefix: str = "Gi") -> Result:
    info = meminfo(meminfo_text)
    if "MemTotal" not in info:
        raise StatError("/proc/meminfo has no MemTotal")
    total = info["MemTotal"]
    available = info.get("MemAvailable", info.get("MemFree", 0))
    return Result(float(total - available), float(total), "B", prefix)


def _stat_value(text: str, key: str) -> int:
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return int(v)
    return 0


def container_memory_v2(current: str, memory_max: str, memory_stat: str, host_total: int,
                        prefix: str = "Gi") -> Result:
    used = int(current.strip()) - _stat_value(memory_stat, "inactive_file")
    limit = memory_max.strip()
    total = host_total if limit == "max" else int(limit)
    return Result(float(max(0, used)), float(total), "B", prefix)


def container_memory_v1(usage: str, limit: str, memory_stat: str, host_total: int,
                        prefix: str = "Gi") -> Result:
    used = int(usage.strip()) - _stat_value(memory_stat, "total_inactive_file")
    cap = int(limit.strip())
    # An unlimited v1 cgroup reports a huge page-rounded number.
    total = host_total if cap <= 0 or cap >= host_total else cap
    return Result(float(max(0, used)), float(total), "B", prefix)


# --- containers and disks ------------------------------------------------------------------------

_CONTAINER_MARKERS = ("docker", "kubepods", "containerd", "libpod", "lxc", "garden", "actions_job")


def is_containerized(proc_1_cgroup: str, marker_files: bool = False) -> bool:
    """Whether /proc/1/cgroup names a container runtime (or a marker file such as /.dockerenv
    exists, as the caller says)."""
    return marker_files or any(m in proc_1_cgroup for m in _CONTAINER_MARKERS)


def disk(total_blocks: int, free_blocks: int, fragment_size: int, prefix: str = "Gi") -> Result:
    total = total_blocks * fragment_size
    free = free_blocks * fragment_size
    return Result(float(total - free), float(total), "B", prefix)
