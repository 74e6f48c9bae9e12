"""Anti-replay sliding window for WireGuard transport counters (RFC 6479).

The window is a ring of 128 blocks of 64 bits. The block holding the highest counter seen so far
is "current"; moving forward clears the blocks skipped over, so the ring always covers the newest
counter and 127 whole blocks behind it. Hence a counter up to ``WINDOW_SIZE`` = (128 - 1) * 64 =
8128 behind the newest one is still judged exactly; anything older is refused. This is the same
width as wireguard-go and the Linux kernel (8192 - 64).

A counter must be checked only *after* its packet authenticated, otherwise an attacker could
move the window forward with forged counters.
"""

from __future__ import annotations

_BLOCK_SHIFT = 6  # 64-bit blocks
_BIT_MASK = (1 << _BLOCK_SHIFT) - 1
_RING_BLOCKS = 128
_RING_MASK = _RING_BLOCKS - 1

WINDOW_SIZE = (_RING_BLOCKS - 1) << _BLOCK_SHIFT  # 8128

#: Counters at or above this are never accepted (REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1).
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1


class ReplayWindow:
    """Accepts each counter at most once, within ``WINDOW_SIZE`` of the newest one."""

    __slots__ = ("last", "_ring", "limit")

    def __init__(self, limit: int = REJECT_AFTER_MESSAGES) -> None:
        self.last = 0
        self.limit = limit
        self._ring = [0] * _RING_BLOCKS

    def accept(self, counter: int) -> bool:
        """True (and remember it) if ``counter`` is new and not too old; False otherwise."""
        if counter >= self.limit or counter < 0:
            return False
        ring = self._ring
        last = self.last
        block = counter >> _BLOCK_SHIFT
        if counter > last:
            current = last >> _BLOCK_SHIFT
            skipped = block - current
            if skipped:
                if skipped > _RING_BLOCKS:
                    skipped = _RING_BLOCKS
                for i in range(current + 1, current + skipped + 1):
                    ring[i & _RING_MASK] = 0
            self.last = counter
        elif last - counter > WINDOW_SIZE:
            return False
        index = block & _RING_MASK
        bit = 1 << (counter & _BIT_MASK)
        old = ring[index]
        if old & bit:
            return False
        ring[index] = old | bit
        return True
