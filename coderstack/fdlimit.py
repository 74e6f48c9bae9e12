"""The process's open-file limit: raised to the hard limit at start, and the share HTTP may use.

Every HTTP connection (API requests, coordinator and DERP websockets) holds a descriptor; the
default soft limit (often 1024) is far below what a server with many agents needs, and the hard
limit is what an unprivileged process may raise it to.
"""

from __future__ import annotations

import resource

#: Descriptors kept back from HTTP connections: the database, logs, listening and STUN
#: sockets, terraform's pipes, and one to accept (and refuse) a connection with.
MIN_RESERVE = 64


def raise_open_files_limit() -> int:
    """Set the soft RLIMIT_NOFILE to the hard limit (where the OS allows); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft  # e.g. above the kernel's nr_open: keep what we have
        return target
    return soft


def connection_budget(open_files_limit: int) -> tuple[int, int]:
    """(HTTP connections that may be open at once, spare ones for sources holding none) under
    this limit; half the reserve stays untouched either way."""
    reserve = max(MIN_RESERVE, open_files_limit // 10)
    max_open = max(16, open_files_limit - reserve)
    return max_open, max(0, min(reserve // 2, open_files_limit - max_open - reserve // 2))
