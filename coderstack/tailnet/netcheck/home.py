"""The home (preferred) DERP region, with Tailscale's hysteresis. Pure: latencies, times and the
previous choice in, a region id out.

A node's peers reach it through its home region, so moving home costs every peer a reconnect:
the choice moves only for a clear gain. Each region scores the best latency it had over the
last ~5 minutes of reports (times the map's ``RegionScore``); the current home is kept unless
the best other one beats it by at least 10 ms *and* by a third. A home that was not measured
this time is kept while DERP frames still arrive from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from coderstack.derpmap import DERPMap

HISTORY_MAX_AGE = 300.0 + 5.0
HYSTERESIS_ABSOLUTE = 0.010
HYSTERESIS_RATIO = 2 / 3
PREFERRED_FRAME_RECENT = 8.0
KEEP_HOME_NO_MEASURE = 120.0  # 2 x DERP keep-alive


class ReportHistory:
    """Region latencies of recent reports (time -> {region: seconds}), for hysteresis."""

    def __init__(self, max_age: float = HISTORY_MAX_AGE) -> None:
        self.max_age = max_age
        self.entries: list[tuple[float, dict[int, float]]] = []

    def add(self, now: float, region_latency: Mapping[int, float]) -> None:
        self.entries.append((now, dict(region_latency)))
        self.prune(now)

    def prune(self, now: float) -> None:
        self.entries = [(t, lat) for t, lat in self.entries if now - t <= self.max_age]

    def best_recent(self) -> dict[int, float]:
        best: dict[int, float] = {}
        for _, lat in self.entries:
            for rid, d in lat.items():
                if rid not in best or d < best[rid]:
                    best[rid] = d
        return best


def home_candidates(derp_map: DERPMap) -> set[int]:
    return {rid for rid, r in derp_map.regions.items() if r.derp_nodes and not r.no_measure_no_home}


def select_preferred_derp(
    derp_map: DERPMap,
    current_latency: Mapping[int, float],
    best_recent: Mapping[int, float],
    *,
    previous: int = 0,
    now: float = 0.0,
    report_start: float | None = None,
    derp_frame_times: Mapping[int, float] | None = None,
    force_preferred: int = 0,
) -> int:
    """The home region (0 when none), with Tailscale's hysteresis.

    ``best_recent`` is the minimum latency per region over the history (including this report);
    it is multiplied by ``HomeParams.RegionScore``. ``derp_frame_times`` is when a DERP frame last
    arrived from each region (liveness beyond probes).
    """
    frames = derp_frame_times or {}
    start = now if report_start is None else report_start
    candidates = home_candidates(derp_map)

    def heard_recently(rid: int, within: float) -> bool:
        t = frames.get(rid)
        return t is not None and (t >= start or now - t <= within)

    if force_preferred and force_preferred in derp_map.regions and (
        force_preferred in current_latency or heard_recently(force_preferred, PREFERRED_FRAME_RECENT)
    ):
        return force_preferred

    def score(rid: int) -> float:
        return best_recent.get(rid, current_latency.get(rid, math.inf)) * derp_map.region_score.get(rid, 1.0)

    measured = [rid for rid in current_latency if rid in candidates]
    measured = [rid for rid in measured
                if not derp_map.regions[rid].avoid or rid == previous]
    if not measured:
        if previous and heard_recently(previous, KEEP_HOME_NO_MEASURE):
            return previous
        return 0
    best = min(measured, key=lambda rid: (score(rid), rid))
    if previous and previous != best and previous in candidates:
        accessible = previous in current_latency or heard_recently(previous, PREFERRED_FRAME_RECENT)
        if accessible:
            old = score(previous)
            new = score(best)
            if math.isinf(old):
                return previous  # alive (frames) but unmeasured: do not move on no evidence
            if old - new < HYSTERESIS_ABSOLUTE or new > old * HYSTERESIS_RATIO:
                return previous
    return best
