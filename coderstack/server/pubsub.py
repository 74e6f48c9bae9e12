"""PostgreSQL LISTEN/NOTIFY for the replicas of one server, off the reactor thread.

One dedicated thread per replica holds one autocommit connection that LISTENs on the channels
its subscribers asked for (all of them before it starts) and waits for notifications; each one
reaches the reactor thread through ``callFromThread`` and the :class:`Subscriber` handlers of
its channel. Publishing needs no connection of its own: a replica calls
:func:`notify` inside the transaction that changed the rows, so the notification leaves when
(and only if) the change commits.

When the connection drops (PostgreSQL restarting, the network) notifications sent meanwhile
are lost. The thread tells the handler (``unlistened``), reconnects with backoff, and says
``listening`` again once its LISTENs are in place — the moment to re-read whatever state the
notifications were about.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

import sqlalchemy as sa
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from coderstack.backoff import Backoff

log = Logger()

#: A NOTIFY payload must stay under 8000 bytes; ours are ids.
MAX_PAYLOAD = 7999


class Subscriber(Protocol):
    def listening(self) -> None:
        """LISTEN is in place (first time or after a reconnect): anything may have been missed."""

    def unlistened(self, error: str) -> None:
        """The connection dropped; notifications are being lost until ``listening``."""

    def notified(self, channel: str, payload: str) -> None: ...


def libpq_url(sqlalchemy_url: str) -> str:
    """The libpq form of a ``postgresql+psycopg://`` URL."""
    url = sa.engine.make_url(sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def notify(conn: sa.Connection, channel: str, payload: str) -> None:
    """Queue a notification in the current transaction (sent at commit)."""
    notify_many(conn, channel, (payload,))


_NOTIFY_MANY = sa.text(
    "SELECT pg_notify(:c, p) FROM unnest(CAST(:ps AS text[])) WITH ORDINALITY AS t(p, i) ORDER BY i")


def notify_many(conn: sa.Connection, channel: str, payloads: Sequence[str]) -> None:
    """Queue notifications in the current transaction, in order, in one statement (a round
    trip per notification would make a busy replica's writes as slow as its database's
    latency times the changes)."""
    for payload in payloads:
        if len(payload.encode()) > MAX_PAYLOAD:
            raise ValueError(f"notification payload on {channel} is too long")
    if payloads:
        conn.execute(_NOTIFY_MANY, {"c": channel, "ps": list(payloads)})


class Listener:
    """One LISTEN connection in a thread of its own: ``subscribe()`` every handler, ``start()``,
    then ``stop()``."""

    #: How long one wait for notifications lasts before the thread checks whether to stop.
    poll_seconds = 0.25

    def __init__(self, reactor: IReactorFromThreads, url: str) -> None:
        self._reactor = reactor
        self._url = libpq_url(url)
        self._by_channel: dict[str, list[Subscriber]] = {}
        self._subscribers: list[Subscriber] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def subscribe(self, channels: Sequence[str], subscriber: Subscriber) -> None:
        """``subscriber`` is told of ``channels``' notifications and of every drop and
        reconnect. Only before :meth:`start`: the thread LISTENs once per connection."""
        if self._thread is not None:
            raise RuntimeError("subscribe() after the listener started")
        for ch in channels:
            if not ch.isidentifier():
                raise ValueError(f"bad channel name {ch!r}")
            self._by_channel.setdefault(ch, []).append(subscriber)
        if subscriber not in self._subscribers:
            self._subscribers.append(subscriber)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="coderstack-listen", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end; it does within ``poll_seconds``. Never blocks the reactor."""
        self._stopping.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # Called on the reactor thread.
    def _listening(self) -> None:
        for sub in self._subscribers:
            sub.listening()

    def _unlistened(self, error: str) -> None:
        for sub in self._subscribers:
            sub.unlistened(error)

    def _notified(self, channel: str, payload: str) -> None:
        for sub in self._by_channel.get(channel, ()):
            sub.notified(channel, payload)

    def _run(self) -> None:
        import psycopg

        backoff = Backoff(first=0.1, cap=5.0)
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=5,
                                     keepalives=1, keepalives_idle=5, keepalives_interval=2,
                                     keepalives_count=3) as conn:
                    for ch in self._by_channel:
                        conn.execute(f"LISTEN {ch}")
                    backoff.reset()
                    self._reactor.callFromThread(self._listening)
                    while not self._stopping.is_set():
                        for n in conn.notifies(timeout=self.poll_seconds):
                            self._reactor.callFromThread(self._notified, n.channel, n.payload)
            except psycopg.Error as e:
                if self._stopping.is_set():
                    return
                self._reactor.callFromThread(self._unlistened, str(e).strip() or type(e).__name__)
                self._stopping.wait(backoff.next_delay())
