"""Closing a server-side websocket with RFC 6455 code 1001, "going away".

Autobahn's ``sendClose`` only lets an application send 1000 or 3000-4999, but 1001 is the code
that says "the server is shutting down: reconnect later", so it is sent as a close frame directly.
"""

from __future__ import annotations

from typing import Any

CLOSE_GOING_AWAY = 1001
REASON_GOING_AWAY = "going away"


def close_going_away(proto: Any) -> None:
    """Start the close handshake of an Autobahn websocket protocol with 1001 "going away"."""
    proto.sendCloseFrame(code=CLOSE_GOING_AWAY, reasonUtf8=REASON_GOING_AWAY.encode(), isReply=False)
