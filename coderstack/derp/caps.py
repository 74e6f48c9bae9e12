"""Per-key caps on open relay connections (a key is whoever the server counts them against).

Sans-IO bookkeeping: ``acquire`` before an upgrade, ``release`` when the connection ends.
"""

from __future__ import annotations

from collections.abc import Hashable


class ConnectionCaps:
    def __init__(self) -> None:
        self._open: dict[Hashable, int] = {}
        #: Upgrades refused because their key was at its limit.
        self.refused = 0

    def count(self, key: Hashable) -> int:
        return self._open.get(key, 0)

    def acquire(self, key: Hashable, limit: int) -> str | None:
        """Take one slot for ``key``; None on success, else why not (naming the limit)."""
        n = self._open.get(key, 0)
        if n >= limit:
            self.refused += 1
            return f"{n} DERP connections are open for this user; the limit is {limit}"
        self._open[key] = n + 1
        return None

    def release(self, key: Hashable) -> None:
        n = self._open.get(key, 0) - 1
        if n > 0:
            self._open[key] = n
        else:
            self._open.pop(key, None)
