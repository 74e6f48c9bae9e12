from twisted.trial import unittest

from coderstack.backoff import Backoff


class BackoffTests(unittest.TestCase):
    def test_doubles_to_the_cap_without_jitter(self) -> None:
        b = Backoff(first=0.5, cap=4.0, rng=lambda: 0.0)
        self.assertEqual([b.next_delay() for _ in range(6)], [0.5, 1.0, 2.0, 4.0, 4.0, 4.0])

    def test_jitter_only_shortens(self) -> None:
        b = Backoff(first=1.0, cap=10.0, jitter=0.3, rng=lambda: 1.0)
        self.assertAlmostEqual(b.next_delay(), 0.7)
        self.assertAlmostEqual(b.next_delay(), 1.4)

    def test_reset_starts_over(self) -> None:
        b = Backoff(first=0.5, cap=10.0, rng=lambda: 0.0)
        b.next_delay()
        b.next_delay()
        b.reset()
        self.assertEqual(b.next_delay(), 0.5)

    def test_many_failures_do_not_overflow(self) -> None:
        b = Backoff(first=0.5, cap=10.0, rng=lambda: 0.0)
        self.assertEqual(b.delay_for(10_000), 10.0)
