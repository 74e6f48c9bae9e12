"""twistd entry for ``coderstack-server``: the options class and makeService.

A server that fails to start (port taken, database unreachable) stops the reactor; under twistd
that alone would end the process with status 0, so the failure also sets exit status 1 for
supervisors and scripts. This lives here, in the twistd adapter, because ``makeService`` is also
run inside other processes (tests) that must not exit.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

from coderstack.server.options import ServerOptions as Options
from coderstack.server.service import ServerService
from coderstack.server.service import makeService as _make_service

__all__ = ["Options", "makeService"]


def _exit_status_1() -> None:
    # Runs at interpreter exit, after twistd has stopped the reactor and removed its pidfile.
    # twistd's own exit status is always 0 here, so end the process with 1 instead.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed stream must not hide the status
            pass
    os._exit(1)


def _failed_to_start(failure: Any) -> None:
    # The service has already logged the reason and is stopping the reactor.
    atexit.register(_exit_status_1)


def makeService(config: dict[str, Any]) -> ServerService:
    from twisted.internet import reactor

    from coderstack.heap import HeapService

    svc = _make_service(config)
    svc.ready.addErrback(_failed_to_start)
    # Full garbage collections scan only what was made since the last one (heap.py).
    HeapService(reactor, svc.ready).setServiceParent(svc)
    return svc
