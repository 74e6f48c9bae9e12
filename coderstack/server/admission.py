"""Which new connections the server takes: a cap per source address and a total high-water mark.

Sans-IO bookkeeping for the HTTP listeners (``httpguard.py`` is the Twisted side). A source may
hold at most ``per_source`` connections at once (0: no cap); all sources together at most
``max_open``, a mark set below the process's open-file limit so that ``accept()`` itself never
fails for want of a descriptor. Past that mark ``spare`` more connections are kept for sources
that hold none yet, so while a flood from a few sources fills the budget a new source — a
load balancer's ``/healthz``, an agent reconnecting — still gets in. A refused connection is
answered and closed at once.
"""

from __future__ import annotations

from collections import Counter


class Admission:
    def __init__(self, per_source: int, max_open: int, spare: int = 0) -> None:
        self.per_source = per_source
        self.max_open = max_open
        self.spare = spare
        self.open = 0
        self._by_source: Counter[str] = Counter()
        self.refused = {"source": 0, "total": 0}

    def admit(self, source: str) -> str | None:
        """Take a connection from ``source`` (then :meth:`release` it), or say why not."""
        held = self._by_source.get(source, 0)
        if self.open >= self.max_open + (0 if held else self.spare):
            self.refused["total"] += 1
            return f"the server is at its limit of {self.max_open} open connections"
        if self.per_source and held >= self.per_source:
            self.refused["source"] += 1
            return f"at most {self.per_source} connections per source address"
        self.open += 1
        self._by_source[source] += 1
        return None

    def release(self, source: str) -> None:
        if self._by_source[source] <= 0:
            return
        self.open -= 1
        self._by_source[source] -= 1
        if not self._by_source[source]:
            del self._by_source[source]

    def connections_from(self, source: str) -> int:
        return self._by_source.get(source, 0)

    def sources(self) -> int:
        return len(self._by_source)
