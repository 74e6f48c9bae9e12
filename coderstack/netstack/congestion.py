"""Congestion control.  The connection asks for ``cwnd`` (bytes) and reports ACKed bytes, the
start and end of fast recovery, and retransmission timeouts; ``now`` and the smoothed RTT come
from the connection (time is injected, as everywhere in the core).

- ``NewReno``: RFC 5681 slow start and congestion avoidance, RFC 6582 recovery exit.  Slow
  start counts bytes (RFC 3465) without its per-ACK limit L: cwnd grows by all the bytes an ACK
  newly delivers.  L = 2 SMSS assumes an ACK per one or two segments, but our receiver ACKs a
  batch of up to 32 segments at once (and GRO batching does the same elsewhere), so with the
  limit slow start after a timeout would grow linearly, not double per round trip.  The
  connection reports only bytes newly delivered (not ones SACKed before), so a cumulative ACK
  that fills one hole below a large SACKed range cannot inflate cwnd in one step.
- ``Cubic``: RFC 9438 — the cubic window ``W(t) = C (t - K)^3 + W_max`` in congestion avoidance,
  beta 0.7, fast convergence, and the Reno-friendly estimate as a floor.  Better than NewReno on
  paths with a large bandwidth-delay product (a tunnel across the internet).

Either may carry a ``model`` (:class:`~coderstack.netstack.bdpfloor.BDPFloor`, fed by the
connection): while its floor (twice the measured bandwidth-delay product, kept only while losses
stay under 2%) is above the window, a loss cuts the window no lower than the floor or than what
it was, whichever is less, and below the floor the window grows as in slow start.
"""

from __future__ import annotations

from .bdpfloor import BDPFloor

__all__ = ["Cubic", "NewReno", "make"]


class NewReno:
    __slots__ = ("mss", "cwnd", "ssthresh", "_acc", "model")

    def __init__(self, mss: int, initial_window: int = 10, model: BDPFloor | None = None) -> None:
        self.mss = mss
        self.cwnd = initial_window * mss  # RFC 6928
        self.ssthresh = 1 << 62
        self._acc = 0
        self.model = model

    def _below_floor(self, delivered: int) -> bool:
        """Grow towards the model's floor at slow start's pace, if below it; True if so."""
        model = self.model
        if model is None:
            return False
        floor = model.floor()
        if self.cwnd >= floor:
            return False
        self.cwnd = min(self.cwnd + delivered, floor)
        return True

    def _keep_floor(self, before: int) -> None:
        """After a reduction from ``before``: no lower than the floor (nor than ``before``)."""
        model = self.model
        if model is None:
            return
        keep = min(model.floor(), before)
        if keep > self.ssthresh:
            self.ssthresh = keep

    def _slow_start(self, delivered: int) -> None:
        # Byte counting without a per-ACK limit (see the module docstring); stop at ssthresh.
        cwnd = self.cwnd + delivered
        self.cwnd = cwnd if cwnd < self.ssthresh else max(self.ssthresh, self.cwnd)

    def on_ack(self, acked: int, now: float = 0.0, srtt: float | None = None, delivered: int | None = None) -> None:
        """New data was cumulatively ACKed outside recovery: ``acked`` bytes, of which
        ``delivered`` (default: all) reached the peer only now (the rest was SACKed before)."""
        if self.cwnd < self.ssthresh:
            self._slow_start(acked if delivered is None else delivered)
        elif not self._below_floor(acked if delivered is None else delivered):
            self._acc += acked
            if self._acc >= self.cwnd:
                self._acc -= self.cwnd
                self.cwnd += self.mss

    def enter_recovery(self, flight: int, now: float = 0.0) -> None:
        before = self.cwnd
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self._keep_floor(before)
        self.cwnd = self.ssthresh
        self._acc = 0

    def exit_recovery(self, flight: int) -> None:
        # RFC 6582 §3.2 step 3, option 1: deflate to min(ssthresh, FlightSize + SMSS).
        self.cwnd = max(min(self.ssthresh, flight + self.mss), 2 * self.mss)

    def on_timeout(self, flight: int, now: float = 0.0) -> None:
        before = self.cwnd
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self._keep_floor(before)
        self.cwnd = self.mss
        self._acc = 0

    def snapshot(self) -> tuple:
        """All of the controller's state, to ``restore`` if a reduction proves spurious."""
        return tuple(getattr(self, name) for name in self._state_names())

    def restore(self, state: tuple) -> None:
        for name, value in zip(self._state_names(), state, strict=True):
            setattr(self, name, value)

    @classmethod
    def _state_names(cls) -> tuple[str, ...]:
        # The model measures the path; an undo restores only the controller's own state.
        return tuple(n for c in reversed(cls.__mro__) for n in getattr(c, "__slots__", ()) if n not in ("mss", "model"))

    def set_mss(self, mss: int) -> None:
        if mss < self.mss:
            self.cwnd = max(self.cwnd * mss // self.mss, mss)
        self.mss = mss


class Cubic(NewReno):
    __slots__ = ("w_max", "w_last_max", "k", "epoch", "origin", "w_est")

    C = 0.4
    BETA = 0.7
    ALPHA = 3 * (1 - 0.7) / (1 + 0.7)  # Reno-friendly additive increase (RFC 9438 §4.3)

    def __init__(self, mss: int, initial_window: int = 10, model: BDPFloor | None = None) -> None:
        super().__init__(mss, initial_window, model)
        self.w_max = 0.0  # segments
        self.w_last_max = 0.0
        self.k = 0.0
        self.epoch: float | None = None
        self.origin = 0.0
        self.w_est = 0.0

    def on_ack(self, acked: int, now: float = 0.0, srtt: float | None = None, delivered: int | None = None) -> None:
        mss = self.mss
        if self.cwnd < self.ssthresh:
            self._slow_start(acked if delivered is None else delivered)
            return
        if self._below_floor(acked if delivered is None else delivered):
            self.epoch = None  # the cubic curve starts again from where the floor leaves it
            return
        cwnd_seg = self.cwnd / mss
        if self.epoch is None:
            self.epoch = now
            if cwnd_seg < self.w_max:
                self.k = ((self.w_max - cwnd_seg) / self.C) ** (1 / 3)
                self.origin = self.w_max
            else:
                self.k = 0.0
                self.origin = cwnd_seg
            self.w_est = cwnd_seg
        t = now - self.epoch + (srtt or 0.0)
        target = self.origin + self.C * (t - self.k) ** 3
        self.w_est += self.ALPHA * (acked / mss) / cwnd_seg
        if target < self.w_est:
            target = self.w_est
        if target > 1.5 * cwnd_seg:
            target = 1.5 * cwnd_seg  # at most +50% per RTT (RFC 9438 §4.2)
        if target > cwnd_seg:
            self.cwnd += int((target - cwnd_seg) / cwnd_seg * acked)
        else:
            # In the plateau: creep up slowly (one segment per 100 cwnd of ACKs).
            self._acc += acked
            if self._acc >= 100 * self.cwnd:
                self._acc = 0
                self.cwnd += mss

    def _reduce(self) -> None:
        cwnd_seg = self.cwnd / self.mss
        # Fast convergence (RFC 9438 §4.7): release bandwidth to newer flows.
        if cwnd_seg < self.w_last_max:
            self.w_last_max = cwnd_seg
            self.w_max = cwnd_seg * (1 + self.BETA) / 2
        else:
            self.w_last_max = cwnd_seg
            self.w_max = cwnd_seg
        self.epoch = None

    def _base(self, flight: int) -> int:
        # Reduce from what was really in flight when the window was not the limit.
        return min(self.cwnd, flight) if flight > 0 else self.cwnd

    def enter_recovery(self, flight: int, now: float = 0.0) -> None:
        before = self.cwnd
        self.cwnd = self._base(flight)
        self._reduce()
        self.ssthresh = max(int(self.cwnd * self.BETA), 2 * self.mss)
        self._keep_floor(before)
        self.cwnd = self.ssthresh
        self._acc = 0

    def on_timeout(self, flight: int, now: float = 0.0) -> None:
        before = self.cwnd
        self.cwnd = self._base(flight)
        self._reduce()
        self.ssthresh = max(int(self.cwnd * self.BETA), 2 * self.mss)
        self._keep_floor(before)
        self.cwnd = self.mss
        self._acc = 0


def make(name: str, mss: int, initial_window: int, bdp_floor: bool = False) -> NewReno:
    try:
        cls = {"newreno": NewReno, "cubic": Cubic}[name]
    except KeyError:
        raise ValueError(f"unknown congestion control {name!r}") from None
    return cls(mss, initial_window, BDPFloor() if bdp_floor else None)
