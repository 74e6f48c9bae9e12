"""coder_script cron: parsing and next firing times, checked against a brute-force evaluator."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.cron import CronError, parse

UTC = dt.UTC
BOUNDS = [(0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 6)]
MONTH_NAMES = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DAY_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


def t(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


@st.composite
def field(draw, index: int) -> tuple[str, set[int], bool]:
    """(text, the values it means, whether it is unrestricted) for field ``index``, with the
    expansion worked out here independently of the parser."""
    low, high = BOUNDS[index]
    names = MONTH_NAMES if index == 4 else DAY_NAMES if index == 5 else None

    def show(v: int) -> str:
        if names is not None and draw(st.booleans()):
            name = names[v - low]
            return draw(st.sampled_from([name, name.upper(), name.title()]))
        return str(v)

    kind = draw(st.sampled_from(["star", "question", "starstep", "value", "range", "list", "openstep"]))
    if kind in ("star", "question"):
        return ("*" if kind == "star" else "?"), set(range(low, high + 1)), True
    if kind == "starstep":
        step = draw(st.integers(1, high - low + 1))
        return f"*/{step}", set(range(low, high + 1, step)), step == 1
    if kind == "value":
        v = draw(st.integers(low, high))
        return show(v), {v}, False
    if kind == "openstep":
        a = draw(st.integers(low, high))
        step = draw(st.integers(1, 20))
        return f"{a}/{step}", set(range(a, high + 1, step)), False
    items, values = [], set()
    for _ in range(draw(st.integers(1, 3)) if kind == "list" else 1):
        a = draw(st.integers(low, high))
        b = draw(st.integers(a, high))
        if draw(st.booleans()):
            step = draw(st.integers(1, 10))
            items.append(f"{show(a)}-{show(b)}/{step}")
            values |= set(range(a, b + 1, step))
        else:
            items.append(f"{show(a)}-{show(b)}")
            values |= set(range(a, b + 1))
    return ",".join(items), values, False


@st.composite
def expressions(draw):
    parts = [draw(field(i)) for i in range(6)]
    return " ".join(p[0] for p in parts), parts


def brute_next(parts, after: dt.datetime, horizon: dt.timedelta) -> dt.datetime | None:
    """Walk minute by minute (each minute's seconds checked) from ``after`` up to ``horizon``."""
    secs, mins, hours, doms, months, dows = (p[1] for p in parts)
    dom_star, dow_star = parts[3][2], parts[5][2]
    start = after.replace(microsecond=0) + dt.timedelta(seconds=1)
    minute = start.replace(second=0)
    end = start + horizon
    while minute <= end:
        dom_ok, dow_ok = minute.day in doms, (minute.isoweekday() % 7) in dows
        day_ok = (dom_ok and dow_ok) if (dom_star or dow_star) else (dom_ok or dow_ok)
        if day_ok and minute.month in months and minute.hour in hours and minute.minute in mins:
            for s in sorted(secs):
                candidate = minute.replace(second=s)
                if candidate >= start:
                    return candidate
        minute += dt.timedelta(minutes=1)
    return None


class CronAgainstBruteForceTests(unittest.TestCase):
    @settings(max_examples=150, deadline=None)
    @given(expressions(), st.datetimes(min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2030, 1, 1)))
    def test_next_after_matches_brute_force(self, expr_parts, when) -> None:
        expr, parts = expr_parts
        when = when.replace(tzinfo=UTC)
        horizon = dt.timedelta(days=3)
        expected = brute_next(parts, when, horizon)
        got = parse(expr).next_after(when)
        if expected is not None:
            self.assertEqual(got, expected, expr)
        else:
            # Nothing in the window: the answer, if any, lies beyond it.
            self.assertTrue(got is None or got > when + horizon, (expr, got))
            if got is not None:
                self.assertEqual(brute_next(parts, got - dt.timedelta(seconds=1), dt.timedelta(0)), got, expr)

    @settings(max_examples=100, deadline=None)
    @given(st.text(max_size=40))
    def test_any_text_parses_or_raises_cron_error(self, text: str) -> None:
        try:
            sched = parse(text)
        except CronError as err:
            self.assertTrue(str(err))
        else:
            nxt = sched.next_after(t(2026, 1, 1))
            self.assertTrue(nxt is None or nxt > t(2026, 1, 1))


class CronExamplesTests(unittest.TestCase):
    def test_every_five_minutes(self) -> None:
        s = parse("0 */5 * * * *")
        self.assertEqual(s.next_after(t(2026, 12, 1, 23, 57, 30)), t(2026, 12, 2, 0, 0, 0))
        self.assertEqual(s.next_after(t(2026, 12, 2, 0, 0, 0)), t(2026, 12, 2, 0, 5, 0))

    def test_strictly_after_and_whole_seconds(self) -> None:
        s = parse("* * * * * *")
        self.assertEqual(s.next_after(dt.datetime(2026, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)), t(2026, 1, 1, 0, 0, 1))
        self.assertEqual(s.next_after(t(2026, 1, 1, 0, 0, 0)), t(2026, 1, 1, 0, 0, 1))

    def test_naive_times_are_utc_and_other_zones_convert(self) -> None:
        s = parse("0 0 12 * * *")
        self.assertEqual(s.next_after(dt.datetime(2026, 1, 1, 11, 0)), t(2026, 1, 1, 12))
        plus2 = dt.timezone(dt.timedelta(hours=2))
        self.assertEqual(s.next_after(dt.datetime(2026, 1, 1, 13, 30, tzinfo=plus2)), t(2026, 1, 1, 12))

    def test_dom_and_dow_both_restricted_is_or(self) -> None:
        s = parse("0 0 0 13 * fri")
        # 2026-02-06 is a Friday, before the 13th.
        self.assertEqual(s.next_after(t(2026, 2, 1)), t(2026, 2, 6))
        self.assertEqual(s.next_after(t(2026, 2, 12)), t(2026, 2, 13))

    def test_star_in_dom_or_dow_is_and(self) -> None:
        self.assertEqual(parse("0 0 0 * * mon").next_after(t(2026, 2, 1)), t(2026, 2, 2))
        self.assertEqual(parse("0 0 0 15 * ?").next_after(t(2026, 2, 1)), t(2026, 2, 15))
        # */1 is unrestricted, */2 is not (as robfig/cron reads them).
        self.assertEqual(parse("0 0 0 */1 * mon").next_after(t(2026, 2, 1)), t(2026, 2, 2))
        self.assertEqual(parse("0 0 0 */2 * mon").next_after(t(2026, 2, 1, 1)), t(2026, 2, 2))

    def test_names_any_case_and_ranges(self) -> None:
        s = parse("30 15 9 * Jan-MAR mon-fri")
        self.assertEqual(s.months, frozenset({1, 2, 3}))
        self.assertEqual(s.days_of_week, frozenset({1, 2, 3, 4, 5}))
        self.assertEqual(s.next_after(t(2026, 3, 31, 10)), t(2027, 1, 1, 9, 15, 30))

    def test_five_fields_have_the_weekday_optional(self) -> None:
        self.assertEqual(parse("0 0 6 * *").next_after(t(2026, 5, 5, 7)), t(2026, 5, 6, 6))

    def test_descriptors(self) -> None:
        now = t(2026, 5, 5, 7, 8, 9)
        self.assertEqual(parse("@yearly").next_after(now), t(2027, 1, 1))
        self.assertEqual(parse("@annually").next_after(now), t(2027, 1, 1))
        self.assertEqual(parse("@monthly").next_after(now), t(2026, 6, 1))
        self.assertEqual(parse("@weekly").next_after(now), t(2026, 5, 10))  # a Sunday
        self.assertEqual(parse("@daily").next_after(now), t(2026, 5, 6))
        self.assertEqual(parse("@midnight").next_after(now), t(2026, 5, 6))
        self.assertEqual(parse("@hourly").next_after(now), t(2026, 5, 5, 8))

    def test_every_duration(self) -> None:
        now = dt.datetime(2026, 5, 5, 7, 8, 9, 250000, tzinfo=UTC)
        self.assertEqual(parse("@every 90s").next_after(now), t(2026, 5, 5, 7, 9, 39))
        self.assertEqual(parse("@every 1h30m").next_after(now), t(2026, 5, 5, 8, 38, 9))
        self.assertEqual(parse("@every 100ms").next_after(now), t(2026, 5, 5, 7, 8, 10))

    def test_never_firing_schedule_answers_none(self) -> None:
        self.assertIsNone(parse("0 0 0 30 feb *").next_after(t(2026, 1, 1)))

    def test_leap_day(self) -> None:
        self.assertEqual(parse("0 0 0 29 2 *").next_after(t(2026, 1, 1)), t(2028, 2, 29))


class CronBadInputTests(unittest.TestCase):
    def assert_bad(self, expr: str, *words: str) -> None:
        with self.assertRaises(CronError) as caught:
            parse(expr)
        for word in words:
            self.assertIn(word, str(caught.exception))

    def test_field_count(self) -> None:
        self.assert_bad("* * * *", "4 fields", "expected 6")
        self.assert_bad("* * * * * * *", "7 fields")
        self.assert_bad("", "empty")
        self.assert_bad("   ", "empty")

    def test_out_of_range_names_the_field(self) -> None:
        self.assert_bad("60 * * * * *", "second", "60", "maximum 59")
        self.assert_bad("* 61 * * * *", "minute")
        self.assert_bad("* * 24 * * *", "hour", "maximum 23")
        self.assert_bad("* * * 0 * *", "day of month", "minimum 1")
        self.assert_bad("* * * * 13 *", "month")
        self.assert_bad("* * * * * 7", "day of week", "maximum 6")

    def test_malformed_items(self) -> None:
        self.assert_bad("* * * * * mon-sun", "day of week", "after its end")
        self.assert_bad("*/0 * * * * *", "second", "positive")
        self.assert_bad("*/x * * * * *", "second", "step")
        self.assert_bad("1/2/3 * * * * *", "slashes")
        self.assert_bad("1-2-3 * * * * *", "hyphens")
        self.assert_bad("1,,2 * * * * *", "empty list item")
        self.assert_bad("* * * * foo *", "month", "'foo'", "jan")
        self.assert_bad("* * * * * -1", "day of week")
        self.assert_bad("* * * * jan-feb/2x *", "month")
        self.assert_bad("mon * * * * *", "second", "not a number")

    def test_descriptors(self) -> None:
        self.assert_bad("@often", "unknown descriptor", "@often")
        self.assert_bad("@every", "duration")
        self.assert_bad("@every soon", "invalid duration")
        self.assert_bad("@every10s", "duration")
