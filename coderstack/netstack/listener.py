"""A passive open (RFC 9293 LISTEN) on a port of the stack.

Each SYN to the port becomes a connection in SYN_RECEIVED; ``pending`` counts those, and beyond
``backlog`` further SYNs are dropped (the peer retries).  When a connection is established,
``accept(conn)`` gives its handler, or None to refuse it with a RST.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .tcp import Connection, ConnectionHandler

__all__ = ["Accept", "Listener", "ListenerHost"]

Accept = Callable[["Connection"], "ConnectionHandler | None"]


class ListenerHost(Protocol):
    """The stack that holds the listener in its table."""

    def remove_listener(self, listener: Listener) -> None: ...


class Listener:
    def __init__(self, host: ListenerHost, port: int, accept: Accept, backlog: int, address: bytes | None) -> None:
        self.host = host
        self.port = port
        self.accept = accept
        self.backlog = backlog
        self.address = address
        self.pending = 0  # connections in SYN_RECEIVED
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.host.remove_listener(self)
