"""Login rate limits: growing delays per source address and per account (sans-IO).

Every failed password check counts against its source address and against the account it
named. A few failures are free; after that each further one makes the next attempt wait
longer (``base * 2**k``, capped), until a quiet spell forgets them:

- **per source** (any account): stops one host guessing at speed;
- **per account** (any source): stops many hosts sharing the guesses. It does not lock out a
  source that logged in to that account before (remembered for ``trust_for`` seconds), so
  a flood of wrong guesses against an account does not keep its owner out — the owner's own
  source is only limited by its own failures.

Each source may also have only ``max_in_flight`` checks running at once, so a burst cannot
queue up hashes before the first failures are counted.

The limiter never sleeps: :meth:`LoginLimiter.begin` answers at once with either a
:class:`LoginAttempt` (go ahead, then call :meth:`LoginAttempt.done`) or a :class:`Refused`
carrying the seconds to wait (``Retry-After``). Time comes from an injected ``IReactorTime``;
the tables are bounded (least recently used entries go first).

Several replicas on one database share the counts instead: the caller reads them from the
database (``loginstore.py``) and passes them to :meth:`LoginLimiter.begin` as :class:`Shared`,
and writes each outcome back; the limiter then decides from those and keeps only the in-flight
checks of this process in memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from coderstack.twistedtypes import Clock


@dataclass(frozen=True)
class Policy:
    free: int  # failures that cost nothing
    base: float  # seconds of the first delay
    cap: float  # longest delay
    forget: float  # seconds without failures after which the count starts over

    def delay(self, failures: int) -> float:
        if failures <= self.free:
            return 0.0
        return min(self.cap, self.base * 2 ** min(failures - self.free - 1, 30))

    def wait(self, failures: int, last: float, now: float) -> float:
        """Seconds until the next attempt may run, ``failures`` counted, the last at ``last``."""
        if failures <= 0 or now - last >= self.forget:
            return 0.0
        return max(0.0, last + self.delay(failures) - now)


SOURCE_POLICY = Policy(free=10, base=1.0, cap=300.0, forget=900.0)
ACCOUNT_POLICY = Policy(free=5, base=1.0, cap=300.0, forget=900.0)
MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class Refused:
    retry_after: float
    reason: str  # "source" | "account" | "busy"


@dataclass(frozen=True)
class Shared:
    """The counts every replica shares, as read just before a check: (failures, time of the
    last one) for the source and for the account, and when this source last logged in to this
    account (None: never, or forgotten)."""

    source: tuple[int, float] = (0, 0.0)
    account: tuple[int, float] = (0, 0.0)
    trusted_since: float | None = None


class _Failures:
    """Failure counts and last-failure times per key, least recently used first."""

    def __init__(self, policy: Policy, max_entries: int) -> None:
        self.policy = policy
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def _count(self, key: str, now: float) -> tuple[int, float]:
        entry = self._entries.get(key)
        if entry is None:
            return 0, 0.0
        count, last = entry
        if now - last >= self.policy.forget:
            del self._entries[key]
            return 0, 0.0
        return count, last

    def wait(self, key: str, now: float) -> float:
        count, last = self._count(key, now)
        return self.policy.wait(count, last, now)

    def fail(self, key: str, now: float) -> None:
        count, _ = self._count(key, now)
        self._entries[key] = (count + 1, now)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self, key: str) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


class LoginAttempt:
    """One password check the limiter let through; report its outcome with :meth:`done`."""

    def __init__(self, limiter: LoginLimiter, account: str, source: str, shared: Shared | None = None) -> None:
        self._limiter, self.account, self.source = limiter, account, source
        #: The :class:`Shared` counts it was let through on, if any: the caller writes the
        #: outcome to the database, the limiter's own tables are left alone.
        self.shared = shared
        self._open = True

    def done(self, ok: bool) -> None:
        """The password check ended: ``ok`` or a failure that counts."""
        if self._open:
            self._open = False
            self._limiter._finished(self, ok)

    def abandon(self) -> None:
        """The check could not run (busy, an error): nothing is counted. Idempotent."""
        if self._open:
            self._open = False
            self._limiter._finished(self, None)


class LoginLimiter:
    def __init__(
        self,
        clock: Clock,
        source_policy: Policy = SOURCE_POLICY,
        account_policy: Policy = ACCOUNT_POLICY,
        max_in_flight: int = 2,
        trust_for: float = 30 * 86400.0,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.clock = clock
        self.source_policy = source_policy
        self.account_policy = account_policy
        # In flight is per process even when the counts are shared: it bounds this process's
        # password-hashing threads, which no other replica's checks use.
        self.max_in_flight = max_in_flight
        self.trust_for = trust_for
        self._sources = _Failures(source_policy, max_entries)
        self._accounts = _Failures(account_policy, max_entries)
        self._trusted: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._in_flight: dict[str, int] = {}
        self.max_entries = max_entries
        self.counters = {"refused_source": 0, "refused_account": 0, "refused_busy": 0, "failed": 0}

    @staticmethod
    def account_key(login: str) -> str:
        return login.strip().lower()

    def _is_trusted(self, account: str, source: str, now: float) -> bool:
        since = self._trusted.get((account, source))
        if since is None:
            return False
        if now - since >= self.trust_for:
            del self._trusted[(account, source)]
            return False
        return True

    def begin(self, login: str, source: str, shared: Shared | None = None) -> LoginAttempt | Refused:
        """Let a check run, or refuse it. With ``shared`` the counts come from there (every
        replica's) instead of this limiter's tables."""
        now = self.clock.seconds()
        account = self.account_key(login)
        if shared is None:
            wait = self._sources.wait(source, now)
        else:
            wait = self.source_policy.wait(*shared.source, now)
        if wait > 0:
            self.counters["refused_source"] += 1
            return Refused(wait, "source")
        if shared is None:
            trusted = self._is_trusted(account, source, now)
        else:
            trusted = shared.trusted_since is not None and now - shared.trusted_since < self.trust_for
        if not trusted:
            if shared is None:
                wait = self._accounts.wait(account, now)
            else:
                wait = self.account_policy.wait(*shared.account, now)
            if wait > 0:
                self.counters["refused_account"] += 1
                return Refused(wait, "account")
        if self._in_flight.get(source, 0) >= self.max_in_flight:
            self.counters["refused_busy"] += 1
            return Refused(1.0, "busy")
        self._in_flight[source] = self._in_flight.get(source, 0) + 1
        return LoginAttempt(self, account, source, shared)

    def _finished(self, attempt: LoginAttempt, ok: bool | None) -> None:
        now = self.clock.seconds()
        left = self._in_flight.get(attempt.source, 1) - 1
        if left > 0:
            self._in_flight[attempt.source] = left
        else:
            self._in_flight.pop(attempt.source, None)
        if ok is None:
            return
        if attempt.shared is not None:
            if not ok:
                self.counters["failed"] += 1
            return
        if ok:
            self._sources.clear(attempt.source)
            self._trusted[(attempt.account, attempt.source)] = now
            self._trusted.move_to_end((attempt.account, attempt.source))
            while len(self._trusted) > self.max_entries:
                self._trusted.popitem(last=False)
            return
        self.counters["failed"] += 1
        self._sources.fail(attempt.source, now)
        self._accounts.fail(attempt.account, now)

    def debug(self) -> dict[str, Any]:
        return {
            "sources": len(self._sources),
            "accounts": len(self._accounts),
            "trusted": len(self._trusted),
            "in_flight": sum(self._in_flight.values()),
            "counters": dict(self.counters),
        }
