"""Per-peer path state: which way a datagram to this peer goes, direct UDP or DERP. Sans-IO.

One :class:`Endpoint` per peer. Time comes in as ``now`` (seconds, from the caller's
IReactorTime); outputs are :class:`DiscoOut` (a disco message to send to a UDP address, or via
DERP when ``dest`` is None) and :class:`WantCallMeMaybe` (send our endpoints to the peer via
DERP). The caller seals and sends them; see ``coderstack/tailnet/magicsock.py``.

Rules (Tailscale's magicsock, see reference/tailscale-protocols.md §5):

- Candidates come from the peer's Node endpoints, from CallMeMaybe (via DERP only), and from
  the source of UDP pings we receive (peer-reflexive).
- ``send_plan(now)``: with a best address trusted until ``trust_until`` the datagram goes over
  UDP only; otherwise over the best address (if any) *and* DERP, and every candidate not pinged
  in the last 5 s is pinged; when any ping went out, a CallMeMaybe follows via DERP so that
  the peer pings us back at the same time (simultaneous open through both NATs).
- A UDP ping from the peer is answered with a pong on the same path and, while we have no
  trusted path, with a ping of our own to that address (its NAT is open now: this finishes a
  simultaneous open in one round trip instead of after the 5 s ping interval).
- A pong from a UDP address records its latency; the address becomes best when
  :func:`better_addr` says so or the current best is no longer trusted; the best is then trusted
  for 6.5 s. Pongs via DERP never make a best address.
- ``tick(now)``: while the peer was sent to in the last 45 s, ping the best address every 3 s
  (heartbeat) and re-probe all candidates when the best is missing or untrusted, or every
  minute when its latency is above 5 ms. Two missed heartbeats let trust lapse: traffic goes to
  UDP and DERP again and discovery restarts, inside the same WireGuard session.

Failover (faster than trust expiry, ours rather than Tailscale's):

- While data goes out on the trusted direct path (a send in the last 2 s) and nothing came back
  on it for 0.5 s (no pong from the best address, no WireGuard packet from it that the caller
  authenticated, see :meth:`Endpoint.note_udp_rx`), the best address is checked: a disco ping
  every 0.3 s (or twice its latency, if larger). Anything heard from it ends the check. After 3
  checks in a row went unanswered the address is no longer trusted: traffic goes via DERP (and
  UDP) about 1.4 s after the path went quiet, and the heartbeats and discovery pings that follow
  bring it back when it answers again. One lost pong is one unanswered check: no switch.
- ``path_change(now)`` tells the caller, once per change, that the path went from direct to
  DERP, from DERP to direct, or to another direct address (for its log).

Path MTU (with ``pmtu_enabled``; sizes in ``coderstack/tailnet/pmtu.py``):

- Every discovery ping to a candidate goes with padded probes, one per rung of the ladder; a
  pong for a probe proves that inner MTU on that address (``Candidate.mtu``). Probes never go
  via DERP, whose MTU is fixed (``derp_mtu``).
- While the best address is trusted, each heartbeat also sends a probe at its current MTU; when
  no such probe was answered for 6.5 s (two heartbeats lost) the address falls back to 1280 and
  the ladder is probed again. Rungs above the current MTU are re-tried every 30 s.
- ``path_mtu(now)``: the trusted best address's proven MTU, else ``derp_mtu`` (the packets go
  via DERP, or via DERP as well as UDP). 1280 when probing is off.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from coderstack.tailnet import pmtu
from coderstack.wire import disco

Addr = tuple[str, int]

HEARTBEAT_INTERVAL = 3.0
TRUST_UDP_ADDR_DURATION = 6.5
SESSION_ACTIVE_TIMEOUT = 45.0
UPGRADE_INTERVAL = 60.0
GOOD_ENOUGH_LATENCY = 0.005
DISCO_PING_INTERVAL = 5.0
PING_TIMEOUT = 5.0
PING_BACK_INTERVAL = 0.5  # answer a peer's ping with our own at most this often per address
REFLEXIVE_LIFETIME = 6.5 * 10  # peer-reflexive candidates without a pong expire
MTU_TRUST = TRUST_UDP_ADDR_DURATION  # a proven MTU lapses without a confirming pong this long
MTU_REPROBE_INTERVAL = 30.0  # retry larger rungs on a trusted address this often
FAILOVER_QUIET = 0.5  # data went out, nothing came back on the direct path this long: check it
FAILOVER_PING_INTERVAL = 0.3  # between checks (at least twice the path's latency)
FAILOVER_PINGS = 3  # checks in a row unanswered: stop trusting the direct path
DATA_ACTIVE = 2.0  # "data is flowing": a send to the peer this recently


class DiscoOut(NamedTuple):
    dest: Addr | None  # None: via DERP to the peer's home region
    message: disco.Message


class WantCallMeMaybe(NamedTuple):
    pass


Action = DiscoOut | WantCallMeMaybe


class PathChange(NamedTuple):
    """The path to the peer changed: now direct via ``direct``, or via DERP (``direct`` None,
    ``why`` says why not direct)."""

    direct: Addr | None
    why: str = ""


class PongResult(NamedTuple):
    """A pong that answered one of our pings."""

    tx_id: bytes
    latency: float
    via: Addr | None  # None: via DERP
    seen_as: Addr  # our address as the peer saw it
    size: int = 0  # the inner MTU the ping was padded for (0: a plain ping)


PathKind = Literal["p2p", "derp"]


@dataclass(frozen=True)
class PingResult:
    """An answered disco ping: how long it took and the path it took (direct or relayed)."""

    latency: float           # seconds
    kind: PathKind
    endpoint: str = ""       # the peer's "ip:port" when direct
    derp_region: int = 0     # the relay's region when relayed
    derp_name: str = ""      # that region's name, when the DERP map gives one

    @classmethod
    def direct(cls, latency: float, endpoint: str) -> PingResult:
        return cls(latency, "p2p", endpoint=endpoint)

    @classmethod
    def relayed(cls, latency: float, region: int, name: str = "") -> PingResult:
        return cls(latency, "derp", derp_region=region, derp_name=name)

    @property
    def p2p(self) -> bool:
        return self.kind == "p2p"

    def describe(self) -> str:
        """For people (logs, lab output): ``p2p 192.0.2.1:41641`` or ``DERP(<name or id>)``,
        as :meth:`Endpoint.path` shows paths."""
        return f"p2p {self.endpoint}" if self.p2p else f"DERP({self.derp_name or self.derp_region})"


@dataclass
class Candidate:
    addr: Addr
    source: str  # "node", "call-me-maybe", "reflexive"
    added: float
    last_ping: float = -math.inf
    last_pong: float = -math.inf
    last_ping_back: float = -math.inf
    latency: float | None = None
    mtu: int = pmtu.BASE_MTU  # the largest inner MTU a probe proved on this address
    mtu_ok: float = -math.inf  # when a pong last confirmed ``mtu`` (or more)
    mtu_probed: float = -math.inf  # when the rungs above ``mtu`` were last probed

    def proven_mtu(self, now: float) -> int:
        return self.mtu if now - self.mtu_ok <= MTU_TRUST else pmtu.BASE_MTU


@dataclass
class _SentPing:
    dest: Addr | None
    sent: float
    user: bool = False
    size: int = 0  # the inner MTU a padded probe stands for; 0 for a plain ping


@dataclass
class AddrLatency:
    addr: Addr | None
    latency: float = math.inf
    mtu: int = 0


def _ip(addr: Addr) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(addr[0])
    except ValueError:
        return None


# RFC 1918 and ULA only (Python's is_private also counts documentation ranges).
_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))


def _bonus(addr: Addr) -> float:
    ip = _ip(addr)
    if ip is None:
        return 0.0
    points = 0.0
    if ip.is_loopback:
        points += 50
    elif ip.is_link_local:
        points += 30
    elif any(ip in net for net in _PRIVATE):
        points += 20
    if ip.version == 6:
        points += 10
    return points


def better_addr(a: AddrLatency, b: AddrLatency) -> bool:
    """Is ``a`` a better path than ``b``? Tailscale's points, bonuses and 1% hysteresis."""
    if a.addr == b.addr:
        return a.mtu > b.mtu
    if a.addr is None:
        return False
    if b.addr is None:
        return True
    a_points = b_points = 0.0
    if a.latency < b.latency and b.latency > 0:
        a_points = 100 - a.latency * 100 / b.latency if math.isfinite(b.latency) else 100
    elif b.latency < a.latency and a.latency > 0:
        b_points = 100 - b.latency * 100 / a.latency if math.isfinite(a.latency) else 100
    a_points += _bonus(a.addr)
    b_points += _bonus(b.addr)
    if a_points <= 1 and b_points == 0:
        return False  # not enough better to switch
    return a_points > b_points


def format_addr(addr: Addr) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def parse_addr(text: str) -> Addr:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    ipaddress.ip_address(host)
    return host, int(port)


@dataclass
class Endpoint:
    """Path state for one peer (identified by its WireGuard node key)."""

    node_key: bytes
    disco_key: bytes
    derp_region: int = 0
    derp_region_name: str = ""
    name: str = ""  # how the log names the peer
    direct_disabled: bool = False
    urandom: Callable[[int], bytes] = os.urandom
    pmtu_enabled: bool = False  # probe direct paths for an MTU above 1280
    own_node_key: bytes | None = None  # put in our pings (a padded Ping must carry it)
    derp_mtu: int = pmtu.BASE_MTU
    reported_mtu: int = pmtu.BASE_MTU  # the last path MTU the caller was told (magicsock's)
    candidates: dict[Addr, Candidate] = field(default_factory=dict)
    best: AddrLatency | None = None
    trust_until: float = -math.inf
    last_send: float = -math.inf
    last_full_ping: float = -math.inf
    last_heartbeat: float = -math.inf
    ever_trusted: bool = False
    pongs: int = 0
    last_direct_rx: float = -math.inf  # last pong or authenticated packet from the best address
    stopped_answering: Addr | None = None  # the direct address the last failover left
    announced: Addr | None = None  # the path ``path_change`` last reported (None: DERP)
    _checks: int = 0  # failover checks sent to the best address since it was last heard
    _last_check: float = -math.inf
    _pings: dict[bytes, _SentPing] = field(default_factory=dict)
    _cmm_endpoints: set[Addr] = field(default_factory=set)
    _seen_pings: dict[tuple[bytes, Addr | None], float] = field(default_factory=dict)

    # -- candidates ------------------------------------------------------------------------

    def set_node_endpoints(self, endpoints: Iterable[Addr], now: float) -> None:
        """The peer's endpoints from its latest Node (replacing the previous Node's)."""
        wanted = set(endpoints)
        for addr, cand in list(self.candidates.items()):
            if cand.source == "node" and addr not in wanted:
                self._forget(addr)
        for addr in wanted:
            if addr not in self.candidates:
                self.candidates[addr] = Candidate(addr, "node", now)

    def _forget(self, addr: Addr) -> None:
        self.candidates.pop(addr, None)
        if self.best is not None and self.best.addr == addr:
            self.best = None
            self.trust_until = -math.inf

    def handle_call_me_maybe(self, endpoints: Iterable[Addr], now: float) -> list[Action]:
        """A CallMeMaybe from this peer (the caller checked it came via DERP): ping them all now."""
        if self.direct_disabled:
            return []
        listed = set()
        for addr in endpoints:
            ip = _ip(addr)
            if ip is None or (ip.version == 6 and ip.is_link_local) or ip.is_unspecified:
                continue
            listed.add(addr)
            if addr not in self.candidates:
                self.candidates[addr] = Candidate(addr, "call-me-maybe", now)
        for addr in self._cmm_endpoints - listed:
            cand = self.candidates.get(addr)
            if cand is not None and cand.source == "call-me-maybe":
                self._forget(addr)
        self._cmm_endpoints = listed
        for cand in self.candidates.values():
            cand.last_ping = -math.inf
        return self._ping_all(now, call_me_maybe=False)

    # -- disco in --------------------------------------------------------------------------

    def handle_ping(self, ping: disco.Ping, src: Addr | None, now: float) -> list[Action]:
        """Answer a ping on the path it came (``src`` None: via DERP); learn reflexive addresses."""
        key = (ping.tx_id, src)
        if key in self._seen_pings:
            return []
        self._seen_pings[key] = now
        if len(self._seen_pings) > 256:
            cutoff = now - PING_TIMEOUT
            self._seen_pings = {k: t for k, t in self._seen_pings.items() if t >= cutoff}
        if src is None:
            # The peer sees us through DERP; the pong's address is DERP's magic one.
            return [DiscoOut(None, disco.Pong(ping.tx_id, ("127.3.3.40", self.derp_region & 0xFFFF)))]
        out: list[Action] = [DiscoOut(src, disco.Pong(ping.tx_id, src))]
        if self.direct_disabled:
            return out
        cand = self.candidates.get(src)
        if cand is None:
            cand = self.candidates[src] = Candidate(src, "reflexive", now)
        # The peer's ping got through, so its NAT (and ours) now pass this address pair: ping
        # back at once instead of waiting out the 5 s ping interval, unless we already have a
        # trusted path. This completes a simultaneous open in one round trip.
        if not self.trusted(now) and now - cand.last_ping_back >= PING_BACK_INTERVAL:
            cand.last_ping_back = now
            out.append(self._ping(src, now))
        return out

    def handle_pong(self, pong: disco.Pong, src: Addr | None, now: float) -> PongResult | None:
        sent = self._pings.pop(pong.tx_id, None)
        if sent is None or sent.dest != src:
            return None  # not ours, late, or from another path than the ping went
        latency = max(0.0, now - sent.sent)
        self.pongs += 1
        if src is not None:
            cand = self.candidates.get(src)
            if cand is None:
                cand = self.candidates[src] = Candidate(src, "reflexive", now)
            cand.last_pong = now
            if sent.size:
                # A padded probe came through: that size works on this address now.
                if sent.size >= cand.proven_mtu(now):
                    cand.mtu = sent.size
                    cand.mtu_ok = now
            else:
                cand.latency = latency  # probes are bigger and slower: time plain pings only
            if sent.size and cand.latency is not None:
                latency = cand.latency
            new = AddrLatency(src, latency, cand.proven_mtu(now))
            if self.best is None or now >= self.trust_until or better_addr(new, self.best):
                self.best = new
            if self.best.addr == src:
                self.best.latency = latency
                self.best.mtu = cand.proven_mtu(now)
                self.trust_until = now + TRUST_UDP_ADDR_DURATION
                self.ever_trusted = True
                self.last_direct_rx = now
                self._checks = 0
                self.stopped_answering = None
        return PongResult(pong.tx_id, latency, src, pong.src, sent.size)

    # -- sending ---------------------------------------------------------------------------

    def trusted(self, now: float) -> bool:
        return self.best is not None and now < self.trust_until and not self.direct_disabled

    def note_udp_rx(self, addr: Addr, now: float) -> None:
        """The caller authenticated a packet from this peer that came from ``addr`` over UDP: if
        that is the best address, the direct path works (no failover check needed now)."""
        best = self.best
        if best is not None and best.addr == addr:
            self.last_direct_rx = now
            self._checks = 0

    def send_plan(self, now: float) -> tuple[Addr | None, bool, list[Action]]:
        """Where one outgoing datagram goes: (UDP address or None, also via DERP?, actions)."""
        self.last_send = now
        checks: list[Action] = []
        if self.trusted(now):
            assert self.best is not None
            if now - self.last_direct_rx <= FAILOVER_QUIET:
                return self.best.addr, False, []
            checks = self._check_direct(now)
            if self.trusted(now):
                return self.best.addr, False, checks
        if self.direct_disabled:
            return None, True, []
        udp = self.best.addr if self.best is not None else None
        return udp, True, checks + self._ping_all(now, call_me_maybe=True)

    def _check_direct(self, now: float) -> list[Action]:
        """Failover: ping a quiet trusted best address; distrust it after unanswered checks."""
        best = self.best
        if best is None or best.addr is None:
            return []
        if now - self.last_send > DATA_ACTIVE or now - self.last_direct_rx <= FAILOVER_QUIET:
            self._checks = 0
            return []
        latency = best.latency if math.isfinite(best.latency) else 0.0
        if now - self._last_check < max(FAILOVER_PING_INTERVAL, 2 * latency):
            return []
        if self._checks >= FAILOVER_PINGS:
            self.trust_until = now
            self.stopped_answering = best.addr
            self._checks = 0
            return []
        self._checks += 1
        self._last_check = now
        return [self._ping(best.addr, now, check=True)]

    def checking(self, now: float) -> bool:
        """Is a failover check under way, or due (the caller then ticks more often)?"""
        if not self.trusted(now):
            return False  # checks are for a trusted path only; anything else ticks as usual
        return bool(self._checks) or (now - self.last_send <= DATA_ACTIVE
                                      and now - self.last_direct_rx > FAILOVER_QUIET)

    def _ping(self, dest: Addr | None, now: float, user: bool = False, check: bool = False) -> DiscoOut:
        tx_id = self.urandom(disco.TXID_LEN)
        self._pings[tx_id] = _SentPing(dest, now, user)
        # A failover check is not discovery: it must not hold back discovery or heartbeat probes.
        if dest is not None and dest in self.candidates and not check:
            self.candidates[dest].last_ping = now
        return DiscoOut(dest, disco.Ping(tx_id, self.own_node_key))

    def _probes(self, cand: Candidate, now: float, above: int = 0) -> list[Action]:
        """Padded pings to ``cand`` for every rung above ``above`` (direct paths only)."""
        if not self.pmtu_enabled or self.own_node_key is None:
            return []
        cand.mtu_probed = now
        out: list[Action] = []
        for size in pmtu.probe_mtus(":" in cand.addr[0]):
            if size > above:
                out.append(self._probe(cand.addr, size, now))
        return out

    def _probe(self, dest: Addr, size: int, now: float) -> DiscoOut:
        tx_id = self.urandom(disco.TXID_LEN)
        self._pings[tx_id] = _SentPing(dest, now, size=size)
        return DiscoOut(dest, disco.Ping(tx_id, self.own_node_key, pmtu.probe_padding(size)))

    # -- path MTU ----------------------------------------------------------------------------

    def path_mtu(self, now: float) -> int:
        """The inner MTU for packets to this peer now: a trusted direct path's proven one, else
        DERP's (the packet goes via DERP, perhaps also via UDP)."""
        if not self.pmtu_enabled:
            return pmtu.BASE_MTU
        if self.trusted(now):
            assert self.best is not None and self.best.addr is not None
            cand = self.candidates.get(self.best.addr)
            return cand.proven_mtu(now) if cand is not None else pmtu.BASE_MTU
        return self.derp_mtu

    def udp_mtu(self, addr: Addr, now: float) -> int:
        """The proven inner MTU of one direct address (1280 unless probed)."""
        cand = self.candidates.get(addr)
        return cand.proven_mtu(now) if cand is not None else pmtu.BASE_MTU

    def udp_too_big(self, addr: Addr, size: int, now: float) -> None:
        """Sending ``size`` bytes to ``addr`` failed with EMSGSIZE (the kernel learned a smaller
        path MTU, or the route changed): forget what the address was proven at, probe again."""
        cand = self.candidates.get(addr)
        if cand is None:
            return
        if size <= pmtu.wire_size(pmtu.BASE_MTU):
            return  # not even 1280 fits: nothing smaller to fall back to
        cand.mtu, cand.mtu_ok, cand.mtu_probed = pmtu.BASE_MTU, -math.inf, -math.inf
        if self.best is not None and self.best.addr == addr:
            self.best.mtu = cand.proven_mtu(now)

    def _ping_all(self, now: float, call_me_maybe: bool) -> list[Action]:
        if self.direct_disabled:
            return []
        out: list[Action] = []
        for addr, cand in list(self.candidates.items()):
            if cand.source == "reflexive" and now - max(cand.added, cand.last_pong) > REFLEXIVE_LIFETIME:
                self._forget(addr)
                continue
            if now - cand.last_ping >= DISCO_PING_INTERVAL:
                out.append(self._ping(addr, now))
                out.extend(self._probes(cand, now))
        if out:
            self.last_full_ping = now
            if call_me_maybe and self.derp_region:
                out.append(WantCallMeMaybe())
        return out

    def own_endpoints_changed(self, now: float) -> list[Action]:
        """We learned new endpoints of our own (STUN found our NAT's mapping): a peer we are
        still finding a path to was told the old ones in our last CallMeMaybe, and cannot open
        its NAT toward the new ones until told. Ping every candidate and tell it again, now
        rather than after the 5 s ping interval. Nothing for a trusted path or an idle peer."""
        if self.direct_disabled or self.trusted(now) or now - self.last_send > SESSION_ACTIVE_TIMEOUT:
            return []
        for cand in self.candidates.values():
            cand.last_ping = -math.inf
        return self._ping_all(now, call_me_maybe=True)

    def network_changed(self) -> None:
        """Our network changed (new interface, wake from sleep): distrust the best address and
        let the next send re-probe every candidate at once."""
        self.best = None
        self.trust_until = -math.inf
        self.last_full_ping = -math.inf
        self._checks = 0
        self.stopped_answering = None
        for cand in self.candidates.values():
            cand.last_ping = -math.inf
            cand.mtu, cand.mtu_ok, cand.mtu_probed = pmtu.BASE_MTU, -math.inf, -math.inf

    def user_ping(self, now: float) -> tuple[bytes, list[Action]]:
        """A ping over the current path (trusted direct address, else DERP): (TxID, actions).

        Like ``tailscale ping``, a ping with no trusted direct path also starts discovery (pings
        to every candidate and a CallMeMaybe), so pinging is enough to go p2p.
        """
        trusted = self.trusted(now)
        dest = self.best.addr if trusted and self.best is not None else None
        self.last_send = now  # user pings count as activity: keep the heartbeats going
        out = self._ping(dest, now, user=True)
        assert isinstance(out.message, disco.Ping)
        actions: list[Action] = [out]
        if not trusted:
            actions += self._ping_all(now, call_me_maybe=True)
        return out.message.tx_id, actions

    # -- timers ----------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Heartbeats and re-probes; call at least every second or so."""
        for tx_id, sent in list(self._pings.items()):
            if now - sent.sent > PING_TIMEOUT:
                del self._pings[tx_id]
        if self.direct_disabled or now - self.last_send > SESSION_ACTIVE_TIMEOUT:
            return []
        out: list[Action] = []
        if self.trusted(now):
            out.extend(self._check_direct(now))
        best = self.candidates.get(self.best.addr) if self.best is not None and self.best.addr else None
        if self.best is not None and now - self.last_heartbeat >= HEARTBEAT_INTERVAL:
            self.last_heartbeat = now
            if best is None or now - best.last_ping >= 1.0:  # skip if a probe just went out
                out.append(self._ping(self.best.addr, now))
                if best is not None and self.pmtu_enabled and best.proven_mtu(now) > pmtu.BASE_MTU:
                    # Keep proving the size we use: if the path stops carrying it, it lapses.
                    out.append(self._probe(best.addr, best.mtu, now))
        if best is not None and self.pmtu_enabled and self.trusted(now):
            proven = best.proven_mtu(now)
            if proven < best.mtu:
                best.mtu = proven  # lapsed: back to 1280 and climb the ladder again at once
                best.mtu_probed = -math.inf
                if self.best is not None:
                    self.best.mtu = proven
            if now - best.mtu_probed >= MTU_REPROBE_INTERVAL and proven < max(pmtu.probe_mtus(":" in best.addr[0])):
                out.extend(self._probes(best, now, above=proven))
        need_full = (
            self.best is None
            or not self.trusted(now)
            or (self.best.latency > GOOD_ENOUGH_LATENCY and now - self.last_full_ping >= UPGRADE_INTERVAL)
        )
        if need_full and now - self.last_full_ping >= DISCO_PING_INTERVAL:
            out.extend(self._ping_all(now, call_me_maybe=True))
        return out

    def expired_user_pings(self, now: float) -> list[bytes]:
        return [t for t, s in self._pings.items() if s.user and now - s.sent > PING_TIMEOUT]

    # -- description -----------------------------------------------------------------------

    def derp_name(self) -> str:
        return f"DERP({self.derp_region_name or self.derp_region})"

    def path(self, now: float) -> tuple[str, str]:
        """(``"p2p ip:port"`` or ``"DERP(<region name>)"``, why relayed — "" when direct)."""
        if self.trusted(now):
            assert self.best is not None and self.best.addr is not None
            return f"p2p {format_addr(self.best.addr)}", ""
        if self.direct_disabled:
            reason = "direct connections disabled"
        elif not self.candidates:
            reason = "no endpoints"
        elif self.stopped_answering is not None:
            reason = f"direct {format_addr(self.stopped_answering)} stopped answering"
        elif self.ever_trusted:
            reason = "trust expired (no pong for 6.5 s)"
        else:
            reason = "no pong yet"
        if not self.derp_region:
            reason += "; peer has no DERP home"
        return self.derp_name(), reason

    def path_change(self, now: float) -> PathChange | None:
        """The path if it changed since the last call (direct address, or DERP and why), else None."""
        direct = self.best.addr if self.trusted(now) and self.best is not None else None
        if direct == self.announced:
            return None
        was, self.announced = self.announced, direct
        if direct is not None:
            return PathChange(direct)
        assert was is not None
        if self.direct_disabled:
            return PathChange(None, "direct connections disabled")
        if self.stopped_answering is not None or self.best is not None:
            return PathChange(None, f"direct {format_addr(was)} stopped answering")
        return PathChange(None, "network changed")
