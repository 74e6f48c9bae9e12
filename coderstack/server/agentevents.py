"""In-process notices that an agent reported something, for the user-facing streams.

The agent-facing routes :meth:`AgentEvents.publish` after each stored report (``logs``,
``metadata``, ``lifecycle``, ``health``); a following logs request or a metadata watch
subscribes to one agent and re-reads the store when told.  A notice carries no data, so a
subscriber that misses one (or runs on another replica) loses nothing but latency: the streams
also re-read on a slow timer.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

Listener = Callable[[str], None]


class AgentEvents:
    def __init__(self) -> None:
        self._listeners: dict[uuid.UUID, list[Listener]] = {}

    def subscribe(self, agent_id: uuid.UUID, listener: Listener) -> Callable[[], None]:
        """Call ``listener(kind)`` on each notice about the agent; returns the unsubscriber."""
        self._listeners.setdefault(agent_id, []).append(listener)

        def unsubscribe() -> None:
            found = self._listeners.get(agent_id, [])
            if listener in found:
                found.remove(listener)
            if not found:
                self._listeners.pop(agent_id, None)

        return unsubscribe

    def publish(self, agent_id: uuid.UUID, kind: str) -> None:
        for listener in list(self._listeners.get(agent_id, [])):
            try:
                listener(kind)
            except Exception:  # one broken stream must not stop the others
                pass

    def listening(self, agent_id: uuid.UUID) -> int:
        return len(self._listeners.get(agent_id, []))
