"""TCP socket options for DERP connections (both the client's and the relay's end).

Nagle is turned off. A DERP frame rarely ends on a TCP segment boundary: a 64 KiB packet on
loopback is one full-size segment plus a short tail, and a batch of small frames ends in a
partial segment too. Nagle holds such a tail until everything before it is acknowledged, and
the receiving kernel delays that ACK (up to 40 ms on Linux) while it waits for a second full
segment; every frame then waits out a delayed-ACK timer, which capped a relayed tunnel at
~350 Mbit/s with ~55 ms of round trip on an otherwise idle loopback (bench/bench_pmtu.py,
DERP at MTU 65472). Both ends already write whole batches of frames per reactor turn, so
small segments are not a concern.
"""

from __future__ import annotations

from typing import Any


def no_delay(transport: Any) -> bool:
    """Set TCP_NODELAY on ``transport`` (a TLS or other protocol wrapper passes it down to its
    TCP transport). False when there is no such option (an in-memory test transport) or the
    socket is already gone."""
    set_option = getattr(transport, "setTcpNoDelay", None)
    if set_option is None:
        return False
    try:
        set_option(True)
    except (OSError, AttributeError):
        return False
    return True
