"""The netcheck driver: runs one report at a time on an injected clock and keeps what the next
one needs (the last report, the latency history of home-region hysteresis).

A report, in phases (Tailscale's netcheck, with Coder's fork's one change):

1. STUN round trips to the regions' STUN nodes, on the probe plan (full every 5 minutes, or
   after a report that saw a captive portal and no UDP; incremental otherwise), at most 3 s.
2. ``GET <node>/derp/latency-check`` over HTTPS (HTTP for ``ForceHTTP`` nodes) for relay regions
   that still have no latency: all of them when UDP is blocked, and always for relay regions
   without STUN (Coder's embedded region advertises ``STUNPort: -1``). Those without STUN start
   at once; the others after the STUN phase. Everything ends at the report's 5 s deadline.
3. On a full report without any STUN answer after 200 ms, a captive-portal check.

Only regions with relay (non-STUN-only) nodes can become home; ``NoMeasureNoHome`` regions are
never probed. The probes themselves are :mod:`coderstack.tailnet.netcheck.probes`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer

from coderstack.derpmap import DERPMap
from coderstack.netinfo import have_global_v6, os_has_ipv6
from coderstack.stun.client import open_stun_client
from coderstack.tailnet.netcheck.home import ReportHistory
from coderstack.tailnet.netcheck.httpget import TreqHTTP
from coderstack.tailnet.netcheck.plan import (
    CAPTIVE_PORTAL_DELAY,
    ENOUGH_REGIONS,
    FULL_REPORT_INTERVAL,
    REPORT_TIMEOUT,
    STUN_PROBE_TIMEOUT,
    make_probe_plan,
)
from coderstack.tailnet.netcheck.probes import (
    HTTPGet,
    ReportRun,
    Resolve,
    STUNQuery,
    resolve_in_thread,
    with_deadline,
)
from coderstack.tailnet.netcheck.report import Report, assemble_report
from coderstack.twistedtypes import Clock, DelayedCall


class Netchecker:
    """Runs netcheck reports; keeps the history that home-region hysteresis needs.

    ``stun`` is normally the tunnel's :class:`coderstack.stun.client.STUNClient` (fed by the
    tunnel's socket), ``http_get`` a :class:`~coderstack.tailnet.netcheck.httpget.TreqHTTP`;
    ``resolve`` defaults to getaddrinfo in a thread.
    """

    def __init__(
        self,
        clock: Clock,
        stun: STUNQuery,
        http_get: HTTPGet,
        *,
        resolve: Resolve | None = None,
        have_v4: bool = True,
        have_v6: bool | None = None,
        os_has_ipv6: bool | None = None,
        enough_regions: int = ENOUGH_REGIONS,
        captive_portal_check: bool = True,
        derp_frame_times: Callable[[], Mapping[int, float]] | None = None,
        stun_probe_timeout: float = STUN_PROBE_TIMEOUT,
        report_timeout: float = REPORT_TIMEOUT,
    ) -> None:
        self.clock = clock
        self.stun_probe_timeout = stun_probe_timeout
        self.report_timeout = report_timeout
        self.stun = stun
        self.http_get = http_get
        self.resolve: Resolve = resolve or resolve_in_thread
        self.have_v4 = have_v4
        self._have_v6 = have_v6
        self._os_has_ipv6 = os_has_ipv6
        self.enough_regions = enough_regions
        self.captive_portal_check = captive_portal_check
        self.derp_frame_times = derp_frame_times
        self.history = ReportHistory()
        self.last: Report | None = None
        self.last_full: float | None = None
        self.force_preferred = 0
        self._running = False

    def get_report(self, derp_map: DERPMap, *, full: bool | None = None) -> defer.Deferred[Report]:
        """One report (full: every region; else Tailscale's incremental plan, decided like
        Tailscale when ``full`` is None). Not re-entrant: one report at a time."""
        if self._running:
            return defer.fail(RuntimeError("a netcheck report is already running"))
        self._running = True
        return defer.ensureDeferred(self._one_report(derp_map, full))

    async def _one_report(self, derp_map: DERPMap, full: bool | None) -> Report:
        try:
            return await self._get_report(derp_map, full)
        finally:
            self._running = False

    async def _get_report(self, derp_map: DERPMap, full: bool | None) -> Report:
        clock = self.clock
        start = clock.seconds()
        if full is None:
            full = (self.last is None or self.last_full is None
                    or start - self.last_full > FULL_REPORT_INTERVAL
                    or (not self.last.udp and self.last.captive_portal is True))
        if full:
            self.last_full = start
        have_v6 = self._have_v6 if self._have_v6 is not None else have_global_v6()
        os6 = self._os_has_ipv6 if self._os_has_ipv6 is not None else os_has_ipv6()
        plan = make_probe_plan(derp_map, have_v4=self.have_v4, have_v6=have_v6,
                               last=None if full else self.last)
        logs: list[str] = []
        if not plan:
            logs.append("empty probe plan; do we have STUN regions?")
        run = ReportRun(self.clock, self.stun, self.http_get, self.resolve, derp_map, start, logs,
                        enough_regions=self.enough_regions,
                        preferred=self.last.preferred_derp if self.last else 0)
        deadline = start + self.report_timeout

        # Relay regions without any STUN node: HTTP(S) latency from the start.
        no_stun = [r for _, r in sorted(derp_map.regions.items())
                   if r.derp_nodes and not r.stun_nodes and not r.no_measure_no_home]
        http_early = [defer.ensureDeferred(run.http_latency(r, deadline)) for r in no_stun]

        captive: defer.Deferred[None] | None = None
        captive_call: DelayedCall | None = None
        if full and self.captive_portal_check:

            def start_captive() -> None:
                nonlocal captive
                if run.udp_seen:
                    return
                captive = defer.ensureDeferred(run.check_captive_portal())

            captive_call = clock.callLater(CAPTIVE_PORTAL_DELAY, start_captive)

        await run.run_stun(plan, min(self.stun_probe_timeout, deadline - start), full)
        if captive_call is not None and captive_call.active():
            captive_call.cancel()

        need = [r for _, r in sorted(derp_map.regions.items())
                if r.derp_nodes and r.stun_nodes and not r.no_measure_no_home
                and r.region_id not in run.regions_with_latency()]
        if need and not run.udp_seen:
            logs.append("UDP is blocked, trying HTTPS")
        http_late = [defer.ensureDeferred(run.http_latency(r, deadline)) for r in need]
        waits = http_early + http_late + ([captive] if captive is not None else [])
        if waits:
            await with_deadline(clock, defer.DeferredList(waits, consumeErrors=True),
                                 deadline - clock.seconds())
        run.stop()

        now = clock.seconds()
        frames = dict(self.derp_frame_times()) if self.derp_frame_times else {}
        report = assemble_report(
            derp_map, run.results, history=self.history, now=now, report_start=start,
            previous_preferred=self.last.preferred_derp if self.last else 0,
            derp_frame_times=frames, force_preferred=self.force_preferred,
            os_has_ipv6=os6,
            captive_portal=run.captive_portal,
        )
        report.logs = logs
        self.last = report
        return report


async def run_netcheck(reactor: Any, derp_map: DERPMap, **netchecker_kw: Any) -> Report:
    """One full report with a private STUN socket and treq; everything is closed afterwards."""
    sock = open_stun_client(reactor)
    http = TreqHTTP(reactor)
    try:
        checker = Netchecker(reactor, sock.client, http, **netchecker_kw)
        return await checker.get_report(derp_map, full=True)
    finally:
        await sock.close()
        await http.close()
