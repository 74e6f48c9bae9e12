"""The clock the server's sans-IO parts take: the slice of ``IReactorTime`` they use.

The reactor and ``twisted.internet.task.Clock`` (in tests) both fit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    """A call scheduled by :meth:`Clock.callLater` (an ``IDelayedCall``)."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class Clock(Protocol):
    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> Timer: ...
