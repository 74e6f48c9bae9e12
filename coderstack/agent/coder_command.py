"""The ``coder`` command inside a workspace: ``coder stat cpu|mem|disk`` (Coder's flags).

``python -m coderstack.agent.coder_command stat cpu [--host] [--output text|json]``
``... stat mem [--host] [--prefix Ki|Mi|Gi|Ti] [--output ...]``
``... stat disk [--path /] [--prefix ...] [--output ...]``

Without ``--host``, CPU and memory are the container's (its cgroup) when the workspace runs in
one, as Coder's do. Kept free of Twisted so it starts fast: metadata scripts call it every few
seconds with a one-second timeout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

from coderstack.agent import stat

SAMPLE_INTERVAL = 0.1
CGROUP = "/sys/fs/cgroup"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _exists(path: str) -> bool:
    return os.path.exists(path)


def containerized(read: Callable[[str], str] = _read, exists: Callable[[str], bool] = _exists) -> bool:
    try:
        text = read("/proc/1/cgroup")
    except OSError:
        text = ""
    return stat.is_containerized(text, exists("/.dockerenv") or exists("/run/.containerenv"))


def cpu(host: bool, sleep: Callable[[float], None] = time.sleep, read: Callable[[str], str] = _read,
        exists: Callable[[str], bool] = _exists, clock: Callable[[], float] = time.monotonic,
        nproc: int | None = None) -> stat.Result:
    n = nproc or os.cpu_count() or 1
    if not host and containerized(read, exists):
        if exists(f"{CGROUP}/cpu.stat"):
            def usage() -> float:
                return stat.cgroup2_cpu_usage_usec(read(f"{CGROUP}/cpu.stat")) / 1e6
            limit = stat.cgroup2_cpu_limit(read(f"{CGROUP}/cpu.max"), n) if exists(f"{CGROUP}/cpu.max") else n
        else:
            usage_path = _v1(exists, "cpuacct.usage", "cpuacct", "cpu,cpuacct", "cpu")
            quota_path = _v1(exists, "cpu.cfs_quota_us", "cpu", "cpu,cpuacct")
            period_path = _v1(exists, "cpu.cfs_period_us", "cpu", "cpu,cpuacct")

            def usage() -> float:
                return int(read(usage_path).strip()) / 1e9
            limit = stat.cgroup1_cpu_limit(read(quota_path), read(period_path), n)
        t1, u1 = clock(), usage()
        sleep(SAMPLE_INTERVAL)
        t2, u2 = clock(), usage()
        return stat.container_cpu(u1, u2, t2 - t1, float(limit))
    first = read("/proc/stat")
    sleep(SAMPLE_INTERVAL)
    return stat.host_cpu(first, read("/proc/stat"), n)


def _v1(exists: Callable[[str], bool], name: str, *controllers: str) -> str:
    """A cgroup v1 file: controllers are mounted alone (``cpu``) or joined (``cpu,cpuacct``)."""
    for controller in controllers:
        path = f"{CGROUP}/{controller}/{name}"
        if exists(path):
            return path
    raise stat.StatError(f"no cgroup file {name}")


def mem(host: bool, prefix: str, read: Callable[[str], str] = _read,
        exists: Callable[[str], bool] = _exists) -> stat.Result:
    host_result = stat.host_memory(read("/proc/meminfo"), prefix)
    if host or not containerized(read, exists):
        return host_result
    host_total = int(host_result.total or 0)
    if exists(f"{CGROUP}/memory.current"):
        limit = read(f"{CGROUP}/memory.max") if exists(f"{CGROUP}/memory.max") else "max"
        return stat.container_memory_v2(read(f"{CGROUP}/memory.current"), limit,
                                        read(f"{CGROUP}/memory.stat"), host_total, prefix)
    base = f"{CGROUP}/memory"
    return stat.container_memory_v1(read(f"{base}/memory.usage_in_bytes"), read(f"{base}/memory.limit_in_bytes"),
                                    read(f"{base}/memory.stat"), host_total, prefix)


def disk(path: str, prefix: str) -> stat.Result:
    st = os.statvfs(path)
    return stat.disk(st.f_blocks, st.f_bfree, st.f_frsize, prefix)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coder", description="The workspace's coder command.")
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stat", help="Show resource usage for the current workspace.")
    kinds = st.add_subparsers(dest="kind", required=True)
    for name, help_text in (("cpu", "Show CPU usage, in cores."), ("mem", "Show memory usage, in gigabytes."),
                            ("disk", "Show disk usage, in gigabytes.")):
        k = kinds.add_parser(name, help=help_text)
        k.add_argument("--output", "-o", choices=("text", "json"), default="text")
        if name != "disk":
            k.add_argument("--host", action="store_true", help="Force host-level stats.")
        if name != "cpu":
            k.add_argument("--prefix", choices=("Ki", "Mi", "Gi", "Ti"), default="Gi")
        if name == "disk":
            k.add_argument("--path", default="/", help="Path for which to check disk usage.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.kind == "cpu":
            result = cpu(args.host)
        elif args.kind == "mem":
            result = mem(args.host, args.prefix)
        else:
            result = disk(args.path, args.prefix)
    except (OSError, ValueError, stat.StatError) as err:
        print(f"coder stat {args.kind}: {err}", file=sys.stderr)
        return 1
    print(result.json() if args.output == "json" else result.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
