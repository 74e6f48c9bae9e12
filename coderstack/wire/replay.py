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
        last = self.last
        ring = self._ring
        if counter > last:
            if counter >= self.limit:
                return False
            block = counter >> _BLOCK_SHIFT
            current = last >> _BLOCK_SHIFT
            if block != current:
                # Clear the blocks we move onto (all of them, at most, for a big jump).
                for i in range(current + 1, min(block, current + _RING_BLOCKS) + 1):
                    ring[i & _RING_MASK] = 0
            self.last = counter
            # Nothing above `last` was ever marked, so a new maximum is always fresh.
            ring[block & _RING_MASK] |= 1 << (counter & _BIT_MASK)
            return True
        if last - counter > WINDOW_SIZE or counter < 0:
            return False
        index = (counter >> _BLOCK_SHIFT) & _RING_MASK
        bit = 1 << (counter & _BIT_MASK)
        old = ring[index]
        if old & bit:
            return False
        ring[index] = old | bit
        return True
