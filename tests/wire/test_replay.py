"""The RFC 6479 replay window: in order, out of order, too old, duplicates, the limit."""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.wire.replay import REJECT_AFTER_MESSAGES, WINDOW_SIZE, ReplayWindow


class ReplayWindowTests(unittest.TestCase):
    def test_width_matches_wireguard_go_and_linux(self):
        self.assertEqual(WINDOW_SIZE, 8128)

    def test_in_order(self):
        w = ReplayWindow()
        for n in range(5000):
            self.assertTrue(w.accept(n))

    def test_duplicates_refused(self):
        w = ReplayWindow()
        for n in (0, 1, 2, 100, 70, 9000):
            self.assertTrue(w.accept(n))
            self.assertFalse(w.accept(n))
        self.assertFalse(w.accept(0))  # now too old as well

    def test_out_of_order_within_window(self):
        w = ReplayWindow()
        self.assertTrue(w.accept(20000))
        for n in range(20000 - 1, 20000 - WINDOW_SIZE - 1, -1):
            self.assertTrue(w.accept(n), n)
        for n in range(20000 - WINDOW_SIZE, 20001):
            self.assertFalse(w.accept(n), n)

    def test_too_old_edge(self):
        w = ReplayWindow()
        self.assertTrue(w.accept(10000))
        self.assertFalse(w.accept(10000 - WINDOW_SIZE - 1))
        self.assertTrue(w.accept(10000 - WINDOW_SIZE))

    def test_edge_on_every_bit_position(self):
        # The exact edge must hold wherever the newest counter sits inside its 64-bit block.
        for last in range(WINDOW_SIZE + 64, WINDOW_SIZE + 128 + 64):
            w = ReplayWindow()
            self.assertTrue(w.accept(last))
            self.assertTrue(w.accept(last - WINDOW_SIZE), last)
            self.assertFalse(w.accept(last - WINDOW_SIZE - 1), last)

    def test_big_jump_clears_old_bits(self):
        w = ReplayWindow()
        for n in range(200):
            w.accept(n)
        self.assertTrue(w.accept(200 + 64 * 128 * 3 + 5))  # further than the whole ring
        # Counters that reuse ring slots of the old ones are fresh again where in the window.
        self.assertTrue(w.accept(200 + 64 * 128 * 3))
        self.assertFalse(w.accept(199))

    def test_limit(self):
        w = ReplayWindow()
        self.assertFalse(w.accept(REJECT_AFTER_MESSAGES))
        self.assertFalse(w.accept(2**64 - 1))
        self.assertTrue(w.accept(REJECT_AFTER_MESSAGES - 1))
        self.assertFalse(w.accept(-1))

    @given(st.lists(st.integers(min_value=0, max_value=30000), max_size=300))
    def test_matches_a_set_model(self, counters):
        w = ReplayWindow()
        seen: set[int] = set()
        last = 0
        for n in counters:
            expected = n not in seen and not (last - n > WINDOW_SIZE)
            self.assertEqual(w.accept(n), expected, (n, last))
            if expected:
                seen.add(n)
                last = max(last, n)
