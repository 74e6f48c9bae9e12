"""Login failure counts in the database, so every replica on one PostgreSQL limits the same count.

The policy (free failures, delays, forgetting, trust) stays in ``loginlimit.py``; this module
reads the counts it decides from and writes each outcome, in ``login_failures`` (migration 7):

- before a password check, one ``SELECT`` of at most three rows (this source, this account, and
  whether this source logged in to this account before);
- after a failure, one transaction of two atomic upserts (``INSERT ... ON CONFLICT DO UPDATE``),
  which add one to the source's and the account's counts, or start them over at 1 once the
  policy has forgotten them — concurrent failures on several replicas all count;
- after a success, where the in-memory limiter resets: the source's count is deleted and the
  source is trusted for the account — skipped when the source had no failures and its trust is
  less than :data:`TRUST_REFRESH` old, so an ordinary login costs the one ``SELECT``.

Keys are HMAC-SHA256 of the account or address under a deployment secret (``deployment_secrets``,
the same on every replica), so the table holds no usernames or addresses. Rows the policy has
forgotten are deleted now and then by the failure transaction itself, so the table stays small
without a timer. Times are the injected clock's seconds; replicas' clocks are assumed to agree
to well within the delays (seconds), as NTP keeps them.
"""

from __future__ import annotations

import hashlib
import hmac

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from twisted.internet.defer import Deferred

from coderstack.server.database import Database
from coderstack.server.loginlimit import LoginAttempt, LoginLimiter, Policy, Refused, Shared
from coderstack.server.schema import login_failures

#: The deployment secret the keys are made with (``AppStore.deployment_secret``).
LOGIN_KEY_NAME = "login_limit_key"
#: Seconds between sweeps of forgotten rows.
PRUNE_EVERY = 300.0
#: A trusted source's trust is renewed by a login at most this often (it lasts ``trust_for``).
TRUST_REFRESH = 86400.0

SOURCE, ACCOUNT, TRUST = "source", "account", "trust"


class LoginFailureTable:
    """The shared counts on ``db``, keyed under ``secret``; the policy is the limiter's, given
    with each write."""

    def __init__(self, db: Database, secret: bytes) -> None:
        self.db = db
        self._secret = secret
        self._pruned_at: float | None = None
        self._insert = postgresql.insert if db.engine.dialect.name == "postgresql" else sqlite.insert

    def key(self, scope: str, *parts: str) -> str:
        message = "\0".join((scope, *parts)).encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _keys(self, account: str, source: str) -> dict[str, str]:
        return {SOURCE: self.key(SOURCE, source), ACCOUNT: self.key(ACCOUNT, account),
                TRUST: self.key(TRUST, account, source)}

    def read(self, account: str, source: str) -> Deferred[Shared]:
        """The counts for this account and source (``account`` as ``LoginLimiter.account_key``
        made it)."""
        keys = self._keys(account, source)
        t = login_failures

        def work(conn: sa.Connection) -> Shared:
            rows = conn.execute(sa.select(t.c.scope, t.c.failures, t.c.last_at).where(sa.or_(
                *(sa.and_(t.c.scope == scope, t.c.key == key) for scope, key in keys.items()))))
            found = {r.scope: (int(r.failures), float(r.last_at)) for r in rows}
            trust = found.get(TRUST)
            return Shared(found.get(SOURCE, (0, 0.0)), found.get(ACCOUNT, (0, 0.0)),
                          None if trust is None else trust[1])

        return self.db.transact(work)

    def _count_failure(self, conn: sa.Connection, scope: str, key: str, policy: Policy, now: float) -> None:
        t = login_failures
        stmt = self._insert(t).values(scope=scope, key=key, failures=1, last_at=now)
        forgotten = stmt.excluded.last_at - t.c.last_at >= policy.forget
        conn.execute(stmt.on_conflict_do_update(
            index_elements=[t.c.scope, t.c.key],
            set_={"failures": sa.case((forgotten, 1), else_=t.c.failures + 1),
                  "last_at": stmt.excluded.last_at},
        ))

    def failed(self, limiter: LoginLimiter, account: str, source: str, now: float) -> Deferred[None]:
        """One more failure for this source and this account, seen at ``now``."""
        keys = self._keys(account, source)
        prune = self._pruned_at is None or now - self._pruned_at >= PRUNE_EVERY
        if prune:
            self._pruned_at = now

        def work(conn: sa.Connection) -> None:
            self._count_failure(conn, SOURCE, keys[SOURCE], limiter.source_policy, now)
            self._count_failure(conn, ACCOUNT, keys[ACCOUNT], limiter.account_policy, now)
            if prune:
                self._prune(conn, limiter, now)

        return self.db.transact(work)

    def _prune(self, conn: sa.Connection, limiter: LoginLimiter, now: float) -> None:
        # SKIP LOCKED (PostgreSQL; SQLite locks the whole database instead): the sweep never
        # waits on a row another replica's login is counting, so the two cannot deadlock.
        t = login_failures
        for scope, older_than in ((SOURCE, limiter.source_policy.forget),
                                  (ACCOUNT, limiter.account_policy.forget), (TRUST, limiter.trust_for)):
            stale = (sa.select(t.c.key).where(t.c.scope == scope, t.c.last_at <= now - older_than)
                     .with_for_update(skip_locked=True))
            conn.execute(t.delete().where(t.c.scope == scope, t.c.key.in_(stale)))

    def succeeded(self, account: str, source: str, now: float) -> Deferred[None]:
        """A login from ``source`` to ``account``: the source starts over and is trusted."""
        keys = self._keys(account, source)
        t = login_failures

        def work(conn: sa.Connection) -> None:
            conn.execute(t.delete().where(t.c.scope == SOURCE, t.c.key == keys[SOURCE]))
            stmt = self._insert(t).values(scope=TRUST, key=keys[TRUST], failures=0, last_at=now)
            conn.execute(stmt.on_conflict_do_update(index_elements=[t.c.scope, t.c.key],
                                                    set_={"last_at": stmt.excluded.last_at}))

        return self.db.transact(work)


async def begin_login(limiter: LoginLimiter, table: LoginFailureTable | None, login: str,
                      source: str) -> LoginAttempt | Refused:
    """``limiter.begin``, with the shared counts read first when there is a table."""
    if table is None:
        return limiter.begin(login, source)
    shared = await table.read(limiter.account_key(login), source)
    return limiter.begin(login, source, shared)


async def end_login(limiter: LoginLimiter, table: LoginFailureTable | None, attempt: LoginAttempt,
                    ok: bool | None) -> None:
    """The check's outcome: ``ok``, a failure that counts (False), or None (nothing to count:
    it could not run, or the password was right but the account cannot log in)."""
    if ok is None:
        attempt.abandon()
        return
    attempt.done(ok)
    shared = attempt.shared
    if table is None or shared is None:
        return
    now = limiter.clock.seconds()
    if ok:
        trusted = shared.trusted_since
        if shared.source[0] == 0 and trusted is not None and now - trusted < TRUST_REFRESH:
            return  # nothing to reset, trust fresh: no write
        await table.succeeded(attempt.account, attempt.source, now)
    else:
        await table.failed(limiter, attempt.account, attempt.source, now)
