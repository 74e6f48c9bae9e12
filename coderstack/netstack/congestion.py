"""Congestion control: NewReno (RFC 5681 with RFC 6582 recovery, RFC 3465 byte counting).

The connection asks for ``cwnd`` and tells the controller about ACKed bytes, the start and end of
fast recovery, and retransmission timeouts.  Sizes are bytes.
"""

from __future__ import annotations

__all__ = ["NewReno"]


class NewReno:
    __slots__ = ("mss", "cwnd", "ssthresh", "_acc")

    def __init__(self, mss: int, initial_window: int = 10) -> None:
        self.mss = mss
        self.cwnd = initial_window * mss  # RFC 6928
        self.ssthresh = 1 << 62
        self._acc = 0

    def on_ack(self, acked: int) -> None:
        """New data was cumulatively ACKed outside recovery."""
        if self.cwnd < self.ssthresh:
            # Slow start with appropriate byte counting, L = 2 * SMSS.
            self.cwnd += min(acked, 2 * self.mss)
        else:
            self._acc += acked
            if self._acc >= self.cwnd:
                self._acc -= self.cwnd
                self.cwnd += self.mss

    def enter_recovery(self, flight: int) -> None:
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.ssthresh
        self._acc = 0

    def exit_recovery(self, flight: int) -> None:
        # RFC 6582 §3.2 step 3, option 1: deflate to min(ssthresh, FlightSize + SMSS).
        self.cwnd = max(min(self.ssthresh, flight + self.mss), 2 * self.mss)

    def on_timeout(self, flight: int) -> None:
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.mss
        self._acc = 0

    def set_mss(self, mss: int) -> None:
        if mss < self.mss:
            self.cwnd = max(self.cwnd * mss // self.mss, mss)
        self.mss = mss
