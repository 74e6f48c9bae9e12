"""One netcheck report in progress: sending its probes and collecting their results.

- STUN: each probe of the plan fires at its delay, single-shot, to the node's address for its
  family (a literal from the map, else DNS, once per report). A probe set stops at its first
  answer, unless a probe still to come would tell whether the IPv4 mapping varies by
  destination. The STUN phase ends at its deadline, when every set is done, or once
  ``enough_regions`` answered plus the slowest of their latencies (doubled on a full report).
- HTTP(S): two GETs of a region's first relay node's ``/derp/latency-check`` on one
  connection; the second one's time is the latency.
- Captive portal: ``GET /generate_204`` with an ``X-Tailscale-Challenge`` header to up to five
  nodes (the last home region's first); no portal if any answers 204 with the echoed
  ``X-Tailscale-Response``, a portal if all that answered did otherwise.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from twisted.internet import defer, threads

from coderstack.derpmap import DERPMap, DERPNode, DERPRegion
from coderstack.stun.client import STUNResult
from coderstack.tailnet.netcheck.plan import (
    CAPTIVE_PORTAL_MAX_CONCURRENT,
    CAPTIVE_PORTAL_TIMEOUT,
    ENOUGH_REGIONS,
    Probe,
    captive_portal_url,
    latency_check_url,
)
from coderstack.tailnet.netcheck.report import ProbeResult, join_host_port
from coderstack.twistedtypes import Clock, DelayedCall


class STUNQuery(Protocol):
    """What a report needs of :class:`coderstack.stun.client.STUNClient`."""

    def query(self, server: tuple[str, int], *, max_transmissions: int | None = None,
              timeout: float | None = None) -> defer.Deferred[STUNResult]: ...


class HTTPGet(Protocol):
    """One GET: fires with ``(status, headers with lower-case names)``; the body is drained."""

    def __call__(self, url: str, *, headers: Mapping[str, str], timeout: float,
                 insecure: bool = False,
                 follow_redirects: bool = False) -> defer.Deferred[tuple[int, dict[str, str]]]: ...


# ``(host, 4 or 6)`` -> an IP literal of that family, or None.
Resolve = Callable[[str, int], "defer.Deferred[str | None]"]


async def with_deadline(clock: Clock, d: defer.Deferred[Any], timeout: float) -> Any:
    """``await d``, or None once ``timeout`` passed (``d`` is cancelled then)."""
    if timeout <= 0:
        d.cancel()
        return None
    timer = clock.callLater(timeout, d.cancel)
    try:
        return await d
    except defer.CancelledError:
        return None
    finally:
        if timer.active():
            timer.cancel()


def resolve_in_thread(host: str, family: int) -> defer.Deferred[str | None]:
    """getaddrinfo in a thread: the first address of ``family`` (4 or 6), or None."""
    fam = socket.AF_INET6 if family == 6 else socket.AF_INET

    def lookup() -> str | None:
        try:
            infos = socket.getaddrinfo(host, None, fam, socket.SOCK_DGRAM)
        except OSError:
            return None
        return str(infos[0][4][0]) if infos else None

    return threads.deferToThread(lookup)


class ReportRun:
    """State of one report in progress: its probes, their results, its timers.

    ``preferred`` is the home region of the last report (asked first for a captive portal);
    ``enough_regions`` answering ends the STUN phase early.
    """

    def __init__(self, clock: Clock, stun: STUNQuery, http_get: HTTPGet, resolve: Resolve,
                 derp_map: DERPMap, start: float, logs: list[str], *,
                 enough_regions: int = ENOUGH_REGIONS, preferred: int = 0) -> None:
        self.clock = clock
        self.stun = stun
        self.http_get = http_get
        self.resolve = resolve
        self.enough_regions = enough_regions
        self.preferred = preferred
        self.derp_map = derp_map
        self.start = start
        self.logs = logs
        self.results: list[ProbeResult] = []
        self.udp_seen = False
        self.captive_portal: bool | None = None
        self._pending: list[defer.Deferred[Any]] = []
        self._timers: list[DelayedCall] = []
        self._nodes = {n.name: n for r in derp_map.regions.values() for n in r.nodes}
        self._resolved: dict[tuple[str, int], str | None] = {}
        self._waiters: dict[tuple[str, int], list[defer.Deferred[str | None]]] = {}

    def regions_with_latency(self) -> set[int]:
        return {p.region_id for p in self.results if p.ok}

    def stop(self) -> None:
        for t in self._timers:
            if t.active():
                t.cancel()
        for d in list(self._pending):
            d.cancel()

    def _address(self, node: DERPNode, family: int) -> defer.Deferred[str | None]:
        """The node's IP for ``family`` (4/6): a literal from the map, else DNS (once per run)."""
        key = (node.name, family)
        if key in self._resolved:
            return defer.succeed(self._resolved[key])
        d: defer.Deferred[str | None] = defer.Deferred()
        if key in self._waiters:
            self._waiters[key].append(d)
            return d
        self._waiters[key] = [d]

        def done(value: str | None) -> None:
            self._resolved[key] = value
            for w in self._waiters.pop(key):
                w.callback(value)

        literal = node.stun_test_ip or (node.ipv4 if family == 4 else node.ipv6) or None
        if literal is None:
            try:
                ipaddress.ip_address(node.host_name)
                literal = node.host_name
            except ValueError:
                pass
        if literal is not None:
            try:
                ok = ipaddress.ip_address(literal).version == family
            except ValueError:
                ok = False  # "none" disables the family
            done(literal if ok else None)
        else:
            self.resolve(node.host_name, family).addCallbacks(done, lambda _f: done(None))
        return d

    async def run_stun(self, plan: dict[str, list[Probe]], timeout: float, full: bool = True) -> None:
        """Run the probe plan; returns at the STUN deadline, when every set is done, or when
        enough regions answered (plus the slowest latency, doubled)."""
        clock = self.clock
        if not plan:
            return
        finished: defer.Deferred[None] = defer.Deferred()
        answered: dict[str, bool] = {k: False for k in plan}
        unfired: dict[str, list[Probe]] = {k: list(probes) for k, probes in plan.items()}
        inflight: dict[str, list[Probe]] = {k: [] for k in plan}
        enough_timer: list[DelayedCall] = []

        def set_finished(key: str) -> bool:
            if answered[key]:
                # A set stops at its first answer unless a probe still to come (or under way)
                # would tell whether the mapping varies by destination.
                return not any(self._would_help(p) for p in unfired[key] + inflight[key])
            return not unfired[key] and not inflight[key]

        def maybe_finish() -> None:
            if not finished.called and all(set_finished(k) for k in plan):
                finished.callback(None)

        def on_region_latency() -> None:
            lat: dict[int, float] = {}
            for p in self.results:
                if p.latency is not None and p.family in (4, 6):
                    lat[p.region_id] = min(p.latency, lat.get(p.region_id, math.inf))
            if len(lat) == self.enough_regions and not enough_timer:
                wait = max(lat.values()) * (2 if full else 1)  # a full report waits longer
                enough_timer.append(clock.callLater(
                    wait, lambda: finished.callback(None) if not finished.called else None))
                self._timers.append(enough_timer[0])

        for key, probes in plan.items():
            for probe in probes:
                def fire(probe: Probe = probe, key: str = key) -> None:
                    unfired[key].remove(probe)
                    if finished.called or (answered[key] and not self._would_help(probe)):
                        maybe_finish()
                        return
                    inflight[key].append(probe)
                    d = defer.ensureDeferred(self._stun_probe(probe, timeout - (clock.seconds() - self.start)))

                    def got(ok: bool, key: str = key, probe: Probe = probe) -> None:
                        inflight[key].remove(probe)
                        if ok and not answered[key]:
                            answered[key] = True
                            on_region_latency()
                        maybe_finish()

                    d.addCallback(got)
                    d.addErrback(lambda _f: got(False))

                self._timers.append(clock.callLater(probe.delay, fire))

        await with_deadline(clock, finished, timeout)

    def _would_help(self, probe: Probe) -> bool:
        """Would this probe, in a set that already answered, tell us something? Only whether
        the IPv4 mapping varies by destination: that needs answers from two STUN servers, so a
        probe to another one helps until two answered (Tailscale probes on while the question is
        open too). The embedded region's second STUN port makes this work with one server."""
        if probe.family != 4:
            return False
        answered = {p.node for p in self.results if p.ok and p.family == 4}
        return len(answered) < 2 and probe.node not in answered

    async def _stun_probe(self, probe: Probe, timeout: float) -> bool:
        node = self._nodes[probe.node]
        port = node.effective_stun_port
        if port is None or timeout <= 0:
            return False
        ip = await self._address(node, probe.family)
        if ip is None:
            self.results.append(ProbeResult(probe.region_id, node.name, probe.family,
                                            error="no address"))
            return False
        d = self.stun.query((ip, port), max_transmissions=1, timeout=timeout)
        self._pending.append(d)
        try:
            res = await d
        except OSError as e:
            self.results.append(ProbeResult(probe.region_id, node.name, probe.family,
                                            server=(ip, port), error="send failed"))
            self.logs.append(f"STUN to {join_host_port((ip, port))}: {e}")
            return False
        except Exception as e:  # timeout, error response, cancelled
            self.results.append(ProbeResult(probe.region_id, node.name, probe.family,
                                            server=(ip, port), error=type(e).__name__))
            return False
        finally:
            if d in self._pending:
                self._pending.remove(d)
        self.udp_seen = True
        self.results.append(ProbeResult(probe.region_id, node.name, probe.family,
                                        latency=res.rtt, mapped=res.mapped, server=(ip, port)))
        return True

    async def http_latency(self, region: DERPRegion, deadline: float) -> None:
        """Two GETs of ``/derp/latency-check`` on one connection; the second one's time is the
        latency (the first pays for TCP and TLS set-up)."""
        clock = self.clock
        node = region.derp_nodes[0]
        url = latency_check_url(node)
        best: float | None = None
        err: str | None = None
        for _ in range(2):
            remaining = deadline - clock.seconds()
            if remaining <= 0:
                break
            t0 = clock.seconds()
            d = self.http_get(url, headers={}, timeout=remaining,
                                    insecure=node.insecure_for_tests, follow_redirects=False)
            self._pending.append(d)
            try:
                status, _headers = await d
            except Exception as e:
                err = f"{type(e).__name__}: {e}"
                break
            finally:
                if d in self._pending:
                    self._pending.remove(d)
            if status != 200:
                err = f"HTTP {status}"
                break
            best = clock.seconds() - t0
        if best is not None:
            self.results.append(ProbeResult(region.region_id, node.name, 0, latency=best))
        else:
            self.results.append(ProbeResult(region.region_id, node.name, 0, error=err or "timeout"))
            self.logs.append(f"latency check {url}: {err or 'timeout'}")

    async def check_captive_portal(self) -> None:
        """GET /generate_204 with the challenge; a portal when no node gives 204 + the echo."""
        preferred = self.preferred
        order = sorted(self.derp_map.regions.values(),
                       key=lambda r: (r.region_id != preferred, r.region_id))
        urls = []
        for region in order:
            for node in region.derp_nodes:
                u = captive_portal_url(node)
                if u:
                    urls.append((node, u))
        if not urls:
            return
        urls = urls[:CAPTIVE_PORTAL_MAX_CONCURRENT]
        now = int(self.start)

        async def one(node: DERPNode, url: str) -> bool | None:
            challenge = "ts_" + node.host_name
            d = self.http_get(f"{url}?t={now}", headers={"X-Tailscale-Challenge": challenge},
                                    timeout=CAPTIVE_PORTAL_TIMEOUT, insecure=False,
                                    follow_redirects=False)
            self._pending.append(d)
            try:
                status, headers = await d
            except Exception:
                return None  # unreachable is not evidence of a portal
            finally:
                if d in self._pending:
                    self._pending.remove(d)
            return not (status == 204 and headers.get("x-tailscale-response") == f"response {challenge}")

        results = await defer.DeferredList(
            [defer.ensureDeferred(one(n, u)) for n, u in urls], consumeErrors=True)
        verdicts = [v for ok, v in results if ok and v is not None]
        if verdicts:
            # One clean answer is enough to say there is no portal.
            self.captive_portal = all(verdicts)
