"""The relay's logic, independent of transport (sans-IO apart from an injected clock).

One :class:`Relay` per server. Each accepted connection (HTTP upgrade or websocket) becomes a
:class:`ServerConn`, fed bytes with ``data_received`` and writing through a :class:`ConnSink`
the adapter provides. The adapter reports its transport's flow control with ``set_writable``.

Queueing (what makes a stalled receiver harmless to the others): every connection has a data
queue and a separate disco queue, ``queue_depth`` (32) packets each. While the receiver's
transport accepts writes the queues are written out at the end of each sender's read (one
``write_frames`` call per receiver per read: writer batching). While it does not, packets
wait; a full queue drops its oldest packet (head drop) to make room. Tailscale retries the head
drop up to 3 times before dropping the new packet at the tail because its writer races with
the enqueuer; here a head drop always makes room, so ``queue_tail`` only counts packets for a
receiver that is already closing. A receiver that stays unwritable for ``write_timeout`` with
packets waiting is disconnected, like Tailscale's write deadline.

Counted drop reasons: ``unknown_dest``, ``unknown_dest_on_fwd``, ``unauthorized``,
``queue_head``, ``queue_tail``, ``gone_disconnected`` (packets still queued when the receiver
left), ``write_error`` (a failed write, whose packets were already counted as sent). Each but
``write_error`` also counts the packets' bytes (``dropped_bytes``).
"""

from __future__ import annotations

import hmac
import random
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Protocol

from coderstack.derp.ipliteral import is_ip
from coderstack.twistedtypes import Clock, DelayedCall, cancel
from coderstack.wire import derp as w

SendForwarder = Callable[[bytes, bytes, bytes], None]
PolicyAllows = Callable[[Any, bytes, bytes], bool]  # (principal, src key, dst key)

# Frames only a mesh peer (a client that logged in with the mesh key) may send.
_MESH_FRAMES = frozenset((w.FORWARD_PACKET, w.WATCH_CONNS, w.CLOSE_PEER))


class ConnSink(Protocol):
    """What a transport adapter gives the relay for one connection."""

    def write_frames(self, frames: list[bytes]) -> None:
        """Write these byte strings, in order (one transport write)."""

    def close(self, reason: str) -> None:
        """Drop the connection; ``connection_lost`` follows."""


class _TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.last = rate, burst, burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class ServerConn:
    """One client connection on the relay."""

    def __init__(
        self, relay: Relay, sink: ConnSink, principal: Any, peer: tuple[str, int], require_mesh: bool
    ) -> None:
        self.relay = relay
        self.sink = sink
        self.principal = principal
        self.peer = peer
        self.require_mesh = require_mesh
        self.key: bytes = b""
        self.info: w.ClientInfo | None = None
        self.is_mesh = False
        self.preferred = False
        self.registered = False
        self.closed = False
        self.writable = True
        self.close_reason = ""
        self._reader = w.FrameReader(w.MAX_CLIENT_INFO_LEN)
        self._ctrl: list[bytes] = []
        self._disco: deque[tuple[bytes, bytes]] = deque()
        self._data: deque[tuple[bytes, bytes]] = deque()
        self._pong: bytes | None = None
        self._authz: dict[bytes, float] = {}
        self._not_here = _TokenBucket(1.0, 3.0, relay.clock.seconds())
        self._handshake_timer: DelayedCall | None = None
        self._keepalive_timer: DelayedCall | None = None
        self._write_timer: DelayedCall | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Send the ServerKey greeting and wait for ClientInfo."""
        self._ctrl.append(w.encode(w.ServerKey(self.relay.public_key)))
        self._handshake_timer = self.relay.clock.callLater(
            self.relay.handshake_timeout, self.close, "handshake timeout"
        )
        self.flush()

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.close_reason = reason
        self.sink.close(reason)
        self.connection_lost()

    def connection_lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        for t in (self._handshake_timer, self._keepalive_timer, self._write_timer):
            cancel(t)
        dropped = len(self._data) + len(self._disco)
        if dropped:
            self.relay.drops["gone_disconnected"] += dropped
            self.relay.dropped_bytes["gone_disconnected"] += sum(
                len(data) for q in (self._data, self._disco) for _, data in q
            )
        self._data.clear()
        self._disco.clear()
        self._ctrl.clear()
        if self.preferred:
            # The gauge counts connected home clients; one that leaves is no longer one.
            self.preferred = False
            self.relay.home_clients -= 1
        if self.registered:
            self.relay._unregister(self)

    # --- input -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        relay = self.relay
        try:
            frames = self._reader.feed(data)
        except w.DERPProtocolError as e:
            relay.bad_frames += 1
            self.close(f"bad frame: {e}")
            return
        for ftype, payload in frames:
            if self.closed:
                break
            if ftype == w.SEND_PACKET and self.registered:
                n = len(payload) - w.KEY_LEN
                if n < 0 or n > w.MAX_PACKET_SIZE:
                    relay.bad_frames += 1
                    self.close("bad SendPacket length")
                    break
                relay._send(self, payload[: w.KEY_LEN], payload[w.KEY_LEN :])
                continue
            try:
                self._frame(ftype, payload)
            except w.DERPProtocolError as e:
                relay.bad_frames += 1
                self.close(f"bad frame: {e}")
                break
        relay.flush()

    def _frame(self, ftype: int, payload: bytes) -> None:
        relay = self.relay
        if not self.registered:
            if ftype != w.CLIENT_INFO:
                raise w.DERPProtocolError(f"expected ClientInfo, got frame type {ftype:#x}")
            match w.decode(ftype, payload):
                case w.ClientInfoFrame() as login:
                    self._login(login)
            return
        if ftype == w.PONG:
            relay.pongs += 1  # answers to nothing we track (the server sends no pings)
            return
        if ftype == w.CLIENT_INFO:
            raise w.DERPProtocolError("second ClientInfo")
        if ftype in _MESH_FRAMES and not self.is_mesh:
            self.close("mesh frame from a client without the mesh key")
            return
        if ftype == w.PING:
            relay.pings += 1
        elif ftype != w.NOTE_PREFERRED and ftype not in _MESH_FRAMES:
            relay.unknown_frames += 1  # skipped by length, as the protocol asks
            return
        match w.decode(ftype, payload):
            case w.Ping(data):
                if self._pong is None:
                    self._pong = data
                    relay._mark(self)
                else:
                    relay.drops["ping_slot_full"] += 1
            case w.NotePreferred(pref):
                if pref != self.preferred:
                    relay.home_clients += 1 if pref else -1
                self.preferred = pref
            case w.ForwardPacket(src, dst, data):
                relay._deliver_forwarded(src, dst, data)
            case w.WatchConns():
                relay._watch(self)
            case w.ClosePeer(key):
                relay.close_peer(key)

    def _login(self, frame: w.ClientInfoFrame) -> None:
        relay = self.relay
        info = w.open_client_info(frame, relay.private_key)
        mesh = bool(
            relay.mesh_key and info.mesh_key and hmac.compare_digest(info.mesh_key, relay.mesh_key)
        )
        if self.require_mesh and not mesh:
            self.close("mesh login without the right mesh key")
            return
        cancel(self._handshake_timer)
        self.key, self.info, self.is_mesh = frame.key, info, mesh
        # After login, frames are packets; the 256 KiB ClientInfo allowance no longer applies.
        self._reader.max_frame_size = 2 * w.KEY_LEN + w.MAX_PACKET_SIZE
        self.registered = True
        relay._register(self)
        self._ctrl.append(w.seal_server_info(relay.private_key, self.key, w.ServerInfo()))
        relay._mark(self)
        self._arm_keepalive()

    # --- policy ------------------------------------------------------------------------------

    def authorized(self, dst: bytes, now: float) -> bool:
        exp = self._authz.get(dst)
        if exp is not None and exp > now:
            return True
        if self.relay.policy_allows(self.principal, self.key, dst):
            self._authz[dst] = now + self.relay.authz_cache_seconds
            return True
        self._authz.pop(dst, None)
        return False

    # --- output ------------------------------------------------------------------------------

    def enqueue_packet(self, src: bytes, data: bytes) -> None:
        relay = self.relay
        if self.closed:
            relay.drops["queue_tail"] += 1
            relay.dropped_bytes["queue_tail"] += len(data)
            return
        q = self._disco if w.looks_like_disco(data) else self._data
        if len(q) >= relay.queue_depth:
            if self.writable:
                self.flush()
            else:
                _, old = q.popleft()
                relay.drops["queue_head"] += 1
                relay.dropped_bytes["queue_head"] += len(old)
        q.append((w.recv_packet_header(src, len(data)), data))
        relay._mark(self)

    def enqueue_control(self, frame: bytes) -> None:
        if not self.closed:
            self._ctrl.append(frame)
            self.relay._mark(self)

    def flush(self) -> None:
        """Write everything queued in one call (control frames, pong, disco, then data)."""
        if self.closed or not self.writable:
            return
        out = self._ctrl
        self._ctrl = []
        if self._pong is not None:
            out.append(w.raw_frame(w.PONG, self._pong))
            self._pong = None
        relay = self.relay
        for q in (self._disco, self._data):
            if q:
                n = len(q)
                relay.packets_sent += n
                for hdr, data in q:
                    out.append(hdr)
                    out.append(data)
                    relay.bytes_sent += len(data)
                q.clear()
        if out:
            try:
                self.sink.write_frames(out)
            except Exception:  # a broken transport closes this connection, never the relay
                relay.drops["write_error"] += 1
                self.close("write error")

    def set_writable(self, writable: bool) -> None:
        """The adapter's transport paused (False) or resumed (True) our writes."""
        if writable == self.writable or self.closed:
            return
        self.writable = writable
        if writable:
            cancel(self._write_timer)
            self._write_timer = None
            self.flush()
        elif self.relay.write_timeout:
            self._write_timer = self.relay.clock.callLater(
                self.relay.write_timeout, self._write_timed_out
            )

    def _write_timed_out(self) -> None:
        self._write_timer = None
        if not self.writable:
            self.close("write timeout")

    def queued(self) -> tuple[int, int]:
        """(data, disco) packets waiting; for tests and debugging."""
        return len(self._data), len(self._disco)

    def _arm_keepalive(self) -> None:
        relay = self.relay
        delay = relay.keepalive_interval + relay.rng.uniform(0, relay.keepalive_jitter)
        self._keepalive_timer = relay.clock.callLater(delay, self._keepalive)

    def _keepalive(self) -> None:
        if self.closed:
            return
        self.enqueue_control(w.raw_frame(w.KEEP_ALIVE))
        self.flush()
        self._arm_keepalive()

    def peer_gone_not_here(self, dst: bytes) -> None:
        if self._not_here.take(self.relay.clock.seconds()):
            self.relay.peer_gone_frames["not_here"] += 1
            self.enqueue_control(w.encode(w.PeerGone(dst, w.PEER_GONE_NOT_HERE)))


class Relay:
    """All clients of one relay server, by node public key."""

    def __init__(
        self,
        private_key: bytes,
        clock: Clock,
        policy_allows: PolicyAllows,
        *,
        mesh_key: str = "",
        queue_depth: int = 32,
        keepalive_interval: float = 60.0,
        keepalive_jitter: float = 5.0,
        handshake_timeout: float = 10.0,
        write_timeout: float = 2.0,
        authz_cache_seconds: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        self.private_key = private_key
        self.public_key = w.public_key(private_key)
        self.clock = clock
        self.policy_allows = policy_allows
        self.mesh_key = mesh_key
        self.queue_depth = queue_depth
        self.keepalive_interval = keepalive_interval
        self.keepalive_jitter = keepalive_jitter
        self.handshake_timeout = handshake_timeout
        self.write_timeout = write_timeout
        self.authz_cache_seconds = authz_cache_seconds
        self.rng = rng or random.Random()
        # key -> connections in connect order; the active one receives.
        self._conns: dict[bytes, list[ServerConn]] = {}
        self._active: dict[bytes, ServerConn] = {}
        self._sent_to: dict[bytes, set[bytes]] = {}
        self._forwarders: dict[bytes, list[SendForwarder]] = {}
        self._watchers: list[ServerConn] = []
        self._dirty: dict[ServerConn, None] = {}
        self.drops: Counter[str] = Counter()
        #: Payload bytes of the packets in ``drops``, by the same reasons (not ``write_error``).
        self.dropped_bytes: Counter[str] = Counter()
        self.peer_gone_frames: Counter[str] = Counter()
        self.packets_received = 0
        self.bytes_received = 0
        self.packets_sent = 0
        self.bytes_sent = 0
        self.packets_forwarded_out = 0
        self.packets_forwarded_in = 0
        self.bytes_forwarded_out = 0
        self.bytes_forwarded_in = 0
        self.accepts = 0
        self.home_clients = 0
        self.bad_frames = 0
        self.unknown_frames = 0
        self.pings = 0
        self.pongs = 0

    # --- connections -------------------------------------------------------------------------

    def accept(
        self, sink: ConnSink, principal: Any, peer: tuple[str, int] = ("", 0), *,
        require_mesh: bool = False,
    ) -> ServerConn:
        """A transport finished its upgrade. Call ``start()`` on the result once it can write."""
        self.accepts += 1
        return ServerConn(self, sink, principal, peer, require_mesh)

    @property
    def clients(self) -> int:
        return sum(len(v) for v in self._conns.values())

    @property
    def unique_keys(self) -> int:
        return len(self._conns)

    @property
    def duplicate_conns(self) -> int:
        return sum(len(v) - 1 for v in self._conns.values())

    def is_connected(self, key: bytes) -> bool:
        return key in self._active

    def active_conn(self, key: bytes) -> ServerConn | None:
        return self._active.get(key)

    def _register(self, conn: ServerConn) -> None:
        conns = self._conns.setdefault(conn.key, [])
        first = not conns
        conns.append(conn)
        self._active[conn.key] = conn  # the newest connection receives until another sends
        frame = w.encode(
            w.PeerPresent(conn.key, conn.peer[0] if is_ip(conn.peer[0]) else "", conn.peer[1] & 0xFFFF,
                          w.PEER_PRESENT_MESH_PEER if conn.is_mesh else w.PEER_PRESENT_REGULAR)
        )
        for watcher in self._watchers:
            watcher.enqueue_control(frame)
        if first:
            self._flush_dirty()

    def _unregister(self, conn: ServerConn) -> None:
        if conn in self._watchers:
            self._watchers.remove(conn)
        self._dirty.pop(conn, None)
        conns = self._conns.get(conn.key)
        if not conns or conn not in conns:
            return
        conns.remove(conn)
        if conns:
            if self._active.get(conn.key) is conn:
                self._active[conn.key] = conns[-1]
            return
        del self._conns[conn.key]
        self._active.pop(conn.key, None)
        gone = w.encode(w.PeerGone(conn.key, w.PEER_GONE_DISCONNECTED))
        for dst in self._sent_to.pop(conn.key, ()):
            receiver = self._active.get(dst)
            if receiver is not None:
                self.peer_gone_frames["disconnected"] += 1
                receiver.enqueue_control(gone)
        for watcher in self._watchers:
            watcher.enqueue_control(gone)
        self._flush_dirty()

    def close_peer(self, key: bytes) -> None:
        """Close every connection of ``key`` (mesh ClosePeer, or the server kicking a node)."""
        for conn in list(self._conns.get(key, ())):
            conn.close("closed by peer request")

    def announce_restart(self, reconnect_in: float, try_for: float) -> None:
        """Tell every client the server is going down (before a graceful restart): they should
        reconnect after ``reconnect_in`` seconds and keep trying for ``try_for`` seconds."""
        frame = w.encode(w.Restarting(int(reconnect_in * 1000), int(try_for * 1000)))
        for conns in self._conns.values():
            for c in conns:
                c.enqueue_control(frame)
        self._flush_dirty()

    def set_health(self, problem: str) -> None:
        """Tell every client about a server problem; ``""`` clears it."""
        frame = w.encode(w.Health(problem))
        for conns in self._conns.values():
            for c in conns:
                c.enqueue_control(frame)
        self._flush_dirty()

    def policy_changed(self) -> None:
        """Forget cached authorizations (a tunnel was removed): the next packet asks again."""
        for conns in self._conns.values():
            for c in conns:
                c._authz.clear()

    # --- packets -----------------------------------------------------------------------------

    def _send(self, src: ServerConn, dst: bytes, data: bytes) -> None:
        self.packets_received += 1
        self.bytes_received += len(data)
        key = src.key
        conns = self._conns.get(key)
        if conns is not None and len(conns) > 1 and self._active.get(key) is not src:
            self._active[key] = src  # duplicate key: the last writer becomes the receiver
        if not src.authorized(dst, self.clock.seconds()):
            self.drops["unauthorized"] += 1
            self.dropped_bytes["unauthorized"] += len(data)
            return
        receiver = self._active.get(dst)
        if receiver is None:
            fwds = self._forwarders.get(dst)
            if fwds:
                self.packets_forwarded_out += 1
                self.bytes_forwarded_out += len(data)
                fwds[-1](key, dst, data)
                return
            self.drops["unknown_dest"] += 1
            self.dropped_bytes["unknown_dest"] += len(data)
            if w.looks_like_disco(data):
                src.peer_gone_not_here(dst)
            return
        receiver.enqueue_packet(key, data)
        sent = self._sent_to.get(key)
        if sent is None:
            self._sent_to[key] = {dst}
        elif dst not in sent:
            sent.add(dst)

    def _deliver_forwarded(self, src: bytes, dst: bytes, data: bytes) -> None:
        """A mesh peer forwarded a packet already authorized where it entered the region."""
        self.packets_forwarded_in += 1
        self.bytes_forwarded_in += len(data)
        receiver = self._active.get(dst)
        if receiver is None:
            self.drops["unknown_dest_on_fwd"] += 1
            self.dropped_bytes["unknown_dest_on_fwd"] += len(data)
            return
        receiver.enqueue_packet(src, data)

    def add_packet_forwarder(self, key: bytes, forwarder: SendForwarder) -> None:
        """Packets for ``key`` (when not connected here) go to ``forwarder(src, dst, data)``."""
        self._forwarders.setdefault(key, []).append(forwarder)

    def remove_packet_forwarder(self, key: bytes, forwarder: SendForwarder) -> None:
        fwds = self._forwarders.get(key)
        if fwds and forwarder in fwds:
            fwds.remove(forwarder)
            if not fwds:
                del self._forwarders[key]

    def _watch(self, conn: ServerConn) -> None:
        if conn not in self._watchers:
            self._watchers.append(conn)
        for key, conns in self._conns.items():
            c = conns[-1]
            conn.enqueue_control(
                w.encode(w.PeerPresent(key, c.peer[0] if is_ip(c.peer[0]) else "",
                                       c.peer[1] & 0xFFFF, w.PEER_PRESENT_REGULAR))
            )

    # --- writing -----------------------------------------------------------------------------

    def _mark(self, conn: ServerConn) -> None:
        self._dirty[conn] = None

    def flush(self) -> None:
        """Write out every connection that has something queued and can take it."""
        if self._dirty:
            self._flush_dirty()

    def _flush_dirty(self) -> None:
        dirty = self._dirty
        self._dirty = {}
        for conn in dirty:
            if conn.writable:
                conn.flush()
            elif not conn.closed:
                # Stays queued; set_writable(True) flushes it.
                pass

