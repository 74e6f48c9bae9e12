"""Password hashing on a small thread pool of its own, with a bounded queue.

scrypt costs tens of milliseconds of CPU and 16 MiB of memory per call. On the reactor's shared
pool a flood of logins would queue without limit (memory) and delay everything else that pool
runs; here at most ``threads`` hashes run at once and at most ``queue`` more wait. Beyond that
:meth:`HashPool.run` fails at once with :class:`PoolBusy`, which the API answers with 503 and
Retry-After instead of holding the request.
"""

from __future__ import annotations

from collections.abc import Callable
from threading import Thread
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class PoolBusy(Exception):
    """Every hashing thread is busy and the queue is full."""


def _daemon_thread(*args: Any, **kwargs: Any) -> Thread:
    # A pool that was never stopped must not keep the process alive at exit.
    return Thread(*args, daemon=True, **kwargs)


class HashPool:
    def __init__(self, reactor: Any, threads: int = 2, queue: int = 32) -> None:
        self.reactor = reactor
        self.limit = threads + queue
        self.pending = 0
        self.refused = 0
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="coderstack-passwords")
        self._pool.threadFactory = _daemon_thread  # type: ignore[assignment]  # twisted types threadFactory as threading.Thread itself
        self._started = False

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        if self.pending >= self.limit:
            self.refused += 1
            return fail(PoolBusy(f"{self.pending} password checks are already waiting"))
        if not self._started:
            self._started = True
            self._pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        self.pending += 1

        def finished(result: Any) -> Any:
            self.pending -= 1
            return result

        return deferToThreadPool(self.reactor, self._pool, fn, *args).addBoth(finished)

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._pool.stop()
