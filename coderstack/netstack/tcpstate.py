"""The states of a TCP connection (RFC 9293 §3.3.2).

An ``IntEnum`` so that the sets below hash their members as plain integers: the state is tested
on every segment, and an ``Enum`` member hashes through a Python-level method.  Hot paths compare
module-level aliases with ``is`` (a class attribute lookup per test would cost more).
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["RECEIVING", "SENDING", "State"]


class State(IntEnum):
    CLOSED = 0
    LISTEN = 1
    SYN_SENT = 2
    SYN_RECEIVED = 3
    ESTABLISHED = 4
    FIN_WAIT_1 = 5
    FIN_WAIT_2 = 6
    CLOSE_WAIT = 7
    CLOSING = 8
    LAST_ACK = 9
    TIME_WAIT = 10


# States in which we may (re)send data or our FIN.
SENDING = frozenset((State.ESTABLISHED, State.CLOSE_WAIT, State.FIN_WAIT_1, State.CLOSING, State.LAST_ACK))
# States in which the peer may still send us data.
RECEIVING = frozenset((State.ESTABLISHED, State.FIN_WAIT_1, State.FIN_WAIT_2))
