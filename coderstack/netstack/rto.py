"""Round-trip time estimation and the retransmission timeout (RFC 6298).

Samples come from timestamps (RFC 7323 §4) when both ends use them, else from one timed segment
at a time; Karn's rule: a segment that was retransmitted is never timed, since its ACK cannot
tell which copy it answers.  Sequence numbers are unwrapped, like everywhere in the connection.
"""

from __future__ import annotations

__all__ = ["RTOEstimator"]


class RTOEstimator:
    __slots__ = ("max_rto", "min_rto", "rto", "rttvar", "srtt", "timed_at", "timed_seq")

    def __init__(self, initial: float, min_rto: float, max_rto: float) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = initial
        self.min_rto = min_rto
        self.max_rto = max_rto
        # The segment being timed: its ACK must reach ``timed_seq``; sent at ``timed_at``.
        self.timed_seq: int | None = None
        self.timed_at = 0.0

    def time(self, seq: int, now: float) -> None:
        """Time the segment that ends at ``seq``, sent ``now``."""
        self.timed_seq = seq
        self.timed_at = now

    def cancel(self) -> None:
        """Karn: the timed segment was (or may be) retransmitted."""
        self.timed_seq = None

    def timed_sample(self, ack: int, now: float) -> float | None:
        """The round trip of the timed segment, if ``ack`` covers it (and it ends the timing)."""
        seq = self.timed_seq
        if seq is None or ack < seq:
            return None
        self.timed_seq = None
        return now - self.timed_at

    def sample(self, r: float) -> None:
        """Fold in one measured round trip ``r`` (RFC 6298 (2.2), (2.3), (2.4))."""
        srtt = self.srtt
        if srtt is None:
            self.srtt = r
            self.rttvar = r / 2
        else:
            d = srtt - r
            self.rttvar = 0.75 * self.rttvar + 0.25 * (d if d > 0 else -d)
            self.srtt = 0.875 * srtt + 0.125 * r
        rto = self.srtt + max(0.001, 4 * self.rttvar)
        self.rto = self.min_rto if rto < self.min_rto else (self.max_rto if rto > self.max_rto else rto)

    def back_off(self) -> None:
        """The timer expired: double the timeout (RFC 6298 (5.5)), up to the maximum."""
        self.rto = min(self.rto * 2, self.max_rto)
