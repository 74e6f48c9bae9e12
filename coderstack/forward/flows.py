"""Datagram flows: UDP given TCP-like semantics, one flow for each source that writes.

Both ends of ``port-forward --udp`` keep one: the CLI one flow per local source address, the
agent one per (peer address, tunnel port). A flow is made on its source's first datagram and
lives until the table closes it: when the table is closed, or, if the table has an idle
timeout, once that many seconds pass without a datagram either way (a UDP "connection" has no
end but silence). A table with ``max_flows`` is full at that many, so a peer cannot exhaust
the sockets behind them.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping
from typing import Protocol, TypeVar

from coderstack.twistedtypes import Clock, DelayedCall


class Flow(Protocol):
    def close(self) -> None: ...


K = TypeVar("K", bound=Hashable)
F = TypeVar("F", bound=Flow)


class FlowTable(Mapping[K, F]):
    """The live flows by source; reading it is reading a dict."""

    def __init__(self, clock: Clock | None = None, idle_timeout: float | None = None,
                 max_flows: int | None = None) -> None:
        if idle_timeout is not None and clock is None:
            raise ValueError("an idle timeout needs a clock")
        self.clock, self.idle_timeout, self.max_flows = clock, idle_timeout, max_flows
        self._flows: dict[K, F] = {}
        self._idle: dict[K, DelayedCall] = {}

    def __getitem__(self, key: K) -> F:
        return self._flows[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._flows)

    def __len__(self) -> int:
        return len(self._flows)

    def full(self) -> bool:
        return self.max_flows is not None and len(self._flows) >= self.max_flows

    def add(self, key: K, flow: F) -> None:
        self._flows[key] = flow
        if self.clock is not None and self.idle_timeout is not None:
            self._idle[key] = self.clock.callLater(self.idle_timeout, self.close, key)

    def touch(self, key: K) -> None:
        """A datagram went through ``key``'s flow: its idle time starts again."""
        timer = self._idle.get(key)
        if timer is not None and self.idle_timeout is not None:
            timer.reset(self.idle_timeout)

    def close(self, key: K) -> None:
        timer = self._idle.pop(key, None)
        if timer is not None and timer.active():
            timer.cancel()
        flow = self._flows.pop(key, None)
        if flow is not None:
            flow.close()

    def close_all(self) -> None:
        for key in list(self._flows):
            self.close(key)
