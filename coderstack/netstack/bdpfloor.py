"""A congestion window floor from the path's measured bandwidth-delay product, kept only while
losses are rare: random loss is not congestion.

A loss-based controller (NewReno, CUBIC) cuts its window on every loss event, so at a random
loss rate ``p`` its window settles near ``1.2 / sqrt(p)`` segments whatever the path can carry:
about 17 segments at 0.5%, which on a tunnel whose round trip is set by the endpoints' CPU (a
millisecond, not the wire's tens of microseconds) is a small fraction of the path. Model-based
control (BBR) instead estimates the bottleneck bandwidth and the minimum round trip and keeps
about twice their product in flight, ignoring isolated losses; BBRv2 adds back a response to
loss once it exceeds 2% of what is delivered in a round, the point where loss stops being noise
and starts being a full queue.

This keeps the loss-based controller and adds BBR's model only as a floor under it:

* bandwidth: bytes newly delivered (cumulatively ACKed or SACKed) per measuring interval (at
  least one smoothed RTT and :data:`MIN_INTERVAL`), the maximum over the last
  :data:`BW_ROUNDS` intervals;
* minimum RTT: the smallest RTT sample of the last :data:`MIN_RTT_WINDOW` seconds;
* loss: bytes marked lost against bytes delivered over the last :data:`LOSS_ROUNDS` intervals;
* ``floor() = GAIN * bandwidth * min RTT`` while that loss rate is under :data:`LOSS_THRESHOLD`
  and no RTT sample ever was under :data:`MIN_RTT_FLOOR`, else 0 (the loss-based controller
  alone, cuts and all);
* and never above a ceiling that each congested interval lowers by 0.7 and each clean one
  raises by a sixty-fourth of the product (in the spirit of BBRv2's ``inflight_hi``), so a short
  queue that overflowed once is remembered.

So a path that drops 0.5% at random keeps its window at the bottleneck's product (simulated, 20 ms
and 100 Mbit/s: 8.5 Mbit/s without the floor, 82 with it), and a congested one (a full queue
drops in bursts, well over 2%) is backed off by CUBIC as before.
Sans-IO: the connection feeds it times and byte counts.
"""

from __future__ import annotations

from collections import deque

__all__ = ["BDPFloor"]

GAIN = 2.0  # BBR's cwnd gain: the product twice over, room for the peer's ACK batching
BW_ROUNDS = 10  # BBR's bandwidth filter length, in rounds
LOSS_ROUNDS = 16  # enough rounds that 0.5% loss on a window of tens of segments averages out
LOSS_THRESHOLD = 0.02  # BBRv2's loss_thresh
MIN_RTT_WINDOW = 10.0  # seconds (BBR's min_rtt filter)
MIN_INTERVAL = 0.01  # seconds: long enough to average over the peer's ACK batches
MIN_DELIVERED = 64 << 10  # bytes delivered in all before the model is trusted at all
#: Below this minimum round trip there is no floor. On a LAN or a loopback tunnel the round trip
#: is the endpoints' own CPU, which is also what limits the rate; there a larger window only
#: makes more segments out of order behind each loss, each dearer to both ends than one in
#: order (measured: 0.5% loss through the NAT lab's sub-millisecond veths ran 229 Mbit/s
#: without the floor and 198 with it). Across a WAN it is the other way round: at 20 ms and
#: 0.5% loss the loss-based window carries a tenth of the path.
MIN_RTT_FLOOR = 0.002


class BDPFloor:
    __slots__ = ("_start", "_delivered", "_lost", "_rounds", "_rates", "min_rtt", "_min_rtt_at", "total",
                 "ceiling", "base_rtt")

    def __init__(self) -> None:
        self._start: float | None = None  # the current interval's start
        self._delivered = 0  # in the current interval
        self._lost = 0
        self._rounds: deque[tuple[int, int]] = deque(maxlen=LOSS_ROUNDS)  # (delivered, lost)
        self._rates: deque[float] = deque(maxlen=BW_ROUNDS)  # bytes per second
        self.min_rtt = float("inf")
        self._min_rtt_at = 0.0
        self.total = 0  # bytes delivered since the start
        self.ceiling = float("inf")  # the most the floor may ask for, learnt from congestion
        self.base_rtt = float("inf")  # the smallest RTT ever seen: is this a LAN path

    def on_rtt(self, rtt: float, now: float) -> None:
        if rtt < self.base_rtt:
            self.base_rtt = rtt
        if rtt <= self.min_rtt or now - self._min_rtt_at > MIN_RTT_WINDOW:
            self.min_rtt = rtt
            self._min_rtt_at = now

    def on_delivered(self, nbytes: int, now: float, srtt: float | None) -> None:
        """``nbytes`` reached the peer (newly ACKed or SACKed) at ``now``."""
        start = self._start
        if start is None:
            self._start = now
            start = now
        self._delivered += nbytes
        self.total += nbytes
        elapsed = now - start
        if elapsed >= MIN_INTERVAL and elapsed >= (srtt or 0.0):
            self._rates.append(self._delivered / elapsed)
            self._rounds.append((self._delivered, self._lost))
            self._start = now
            self._delivered = self._lost = 0
            self._adjust_ceiling()

    def _adjust_ceiling(self) -> None:
        # Congestion (the loss rate over the threshold) lowers the ceiling by CUBIC's beta each
        # interval it lasts, and each interval without it raises the ceiling by a
        # sixty-fourth of the model's product: a floor that overfilled a short queue once does
        # not do it again as soon as the losses have left the window.
        model = self._model()
        if not model:
            return
        if self.loss_rate() >= LOSS_THRESHOLD:
            self.ceiling = 0.7 * min(self.ceiling, model)
        elif self.ceiling < model:
            self.ceiling += model / 64

    def on_lost(self, nbytes: int) -> None:
        """``nbytes`` were marked lost."""
        self._lost += nbytes

    def loss_rate(self) -> float:
        delivered = self._delivered + sum(d for d, _ in self._rounds)
        lost = self._lost + sum(x for _, x in self._rounds)
        return lost / (delivered + lost) if delivered + lost else 0.0

    def _model(self) -> float:
        """``GAIN`` times the measured product, or 0 while it is not known (or not wanted)."""
        if not self._rates or self.total < MIN_DELIVERED or self.min_rtt == float("inf"):
            return 0.0
        if self.base_rtt < MIN_RTT_FLOOR:
            return 0.0  # ever under it: the path is short, however long its queues grew since
        return GAIN * max(self._rates) * self.min_rtt

    def floor(self) -> int:
        """The window the model asks for (bytes), or 0 where it has no say."""
        # Asked on every ACK: the model's cheap checks first (a short path stops there), the
        # loss rate's sums only where there is a floor to give.
        model = self._model()
        if not model or self.loss_rate() >= LOSS_THRESHOLD:
            return 0
        return int(min(model, self.ceiling))
