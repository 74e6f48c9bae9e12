"""Cron schedules as ``coder_script.cron`` writes them: six fields, seconds first.

Syntax (the dialect of Coder's agent, which uses robfig/cron with seconds)::

    sec   min   hour  dom   month  dow
    0-59  0-59  0-23  1-31  1-12   0-6 (0 = Sunday)

- A field is a comma-separated list of items; an item is ``*`` or ``?`` (every value), a value,
  or a range ``a-b``, each optionally with a step ``/n``. ``a/n`` means ``a-<max>/n``.
- Months and weekdays also take their English three-letter names (``jan``, ``MON``; any case).
- Five fields are read as ``sec min hour dom month`` with the weekday ``*`` (Coder's parser has the
  weekday optional).
- Descriptors: ``@yearly`` (``@annually``), ``@monthly``, ``@weekly``, ``@daily`` (``@midnight``),
  ``@hourly``, and ``@every <duration>`` with a Go-style duration (``90s``, ``1h30m``; at least 1s,
  whole seconds).
- Day of month and day of week: when either field is ``*`` or ``?`` a day must match both (so
  just the other); when both are restricted, a day matching either one matches (``0 0 0 1 * mon``
  is the first of the month *and* every Monday). ``*/2`` counts as restricted, ``*/1`` does not.

All times are UTC; :meth:`Schedule.next_after` answers the first whole second strictly after a
time that the schedule fires at, or ``None`` when it never fires within five years (``0 0 0 30 2
*``).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CronError", "Schedule", "parse"]


class CronError(ValueError):
    """A cron expression that cannot be parsed; the message names the field at fault."""


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int]


_MONTHS = {m: i + 1 for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"))}
_DAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}

_FIELDS = (
    _Field("second", 0, 59, {}),
    _Field("minute", 0, 59, {}),
    _Field("hour", 0, 23, {}),
    _Field("day of month", 1, 31, {}),
    _Field("month", 1, 12, _MONTHS),
    _Field("day of week", 0, 6, _DAYS),
)

_DESCRIPTORS = {
    "@yearly": "0 0 0 1 1 *",
    "@annually": "0 0 0 1 1 *",
    "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0",
    "@daily": "0 0 0 * * *",
    "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}

# How far ahead next_after looks before it gives up (as robfig/cron does).
_HORIZON_YEARS = 5


@dataclass(frozen=True)
class Schedule:
    """When a cron expression fires. ``every`` is set (in seconds) for ``@every`` schedules."""

    expression: str
    seconds: frozenset[int] = frozenset()
    minutes: frozenset[int] = frozenset()
    hours: frozenset[int] = frozenset()
    days_of_month: frozenset[int] = frozenset()
    months: frozenset[int] = frozenset()
    days_of_week: frozenset[int] = frozenset()
    dom_any: bool = True
    dow_any: bool = True
    every: int = 0

    def day_matches(self, day: dt.date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days_of_month
        dow = (day.isoweekday() % 7) in self.days_of_week
        if self.dom_any or self.dow_any:
            return dom and dow
        return dom or dow

    def next_after(self, when: dt.datetime) -> dt.datetime | None:
        """The first firing time strictly after ``when`` (a UTC or naive-UTC datetime), as an
        aware UTC datetime on a whole second; ``None`` if there is none within five years."""
        if when.tzinfo is not None:
            when = when.astimezone(dt.UTC).replace(tzinfo=None)
        start = when.replace(microsecond=0) + dt.timedelta(seconds=1)
        if self.every:
            # Like robfig/cron's constant delay: the interval from ``when``, on a whole second.
            return (when.replace(microsecond=0) + dt.timedelta(seconds=self.every)).replace(tzinfo=dt.UTC)
        day = start.date()
        first = True
        end = dt.date(min(start.year + _HORIZON_YEARS, dt.MAXYEAR), 12, 31)
        while day <= end:
            if self.day_matches(day):
                earliest = start.time() if first else dt.time(0, 0, 0)
                found = self._time_on_or_after(earliest)
                if found is not None:
                    return dt.datetime.combine(day, found, tzinfo=dt.UTC)
            first = False
            if day.month not in self.months:
                # Skip to the first day of the next month (a cheap jump over excluded months).
                day = (day.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
            else:
                day += dt.timedelta(days=1)
        return None

    def _time_on_or_after(self, t: dt.time) -> dt.time | None:
        for h in sorted(self.hours):
            if h < t.hour:
                continue
            for m in sorted(self.minutes):
                if h == t.hour and m < t.minute:
                    continue
                for s in sorted(self.seconds):
                    if h == t.hour and m == t.minute and s < t.second:
                        continue
                    return dt.time(h, m, s)
        return None


def parse(expr: str) -> Schedule:
    """Parse a ``coder_script.cron`` expression; raises :class:`CronError` naming the bad field."""
    if not isinstance(expr, str):
        raise CronError("cron expression must be a string")
    text = expr.strip()
    if not text:
        raise CronError("empty cron expression")
    if text.startswith("@"):
        return _descriptor(expr, text)
    fields = text.split()
    if len(fields) == 5:
        fields.append("*")
    if len(fields) != 6:
        raise CronError(
            f"cron expression {expr!r} has {len(fields)} fields; expected 6 "
            "(second minute hour day-of-month month day-of-week)")
    sets: list[frozenset[int]] = []
    stars: list[bool] = []
    for spec, text_field in zip(_FIELDS, fields, strict=True):
        values, star = _parse_field(spec, text_field)
        sets.append(values)
        stars.append(star)
    second, minute, hour, dom, month, dow = sets
    return Schedule(expr, second, minute, hour, dom, month, dow, dom_any=stars[3], dow_any=stars[5])


def _descriptor(expr: str, text: str) -> Schedule:
    lowered = text.lower()
    if lowered in _DESCRIPTORS:
        sched = parse(_DESCRIPTORS[lowered])
        return Schedule(expr, sched.seconds, sched.minutes, sched.hours, sched.days_of_month,
                        sched.months, sched.days_of_week, sched.dom_any, sched.dow_any)
    if lowered.startswith("@every"):
        rest = text[len("@every"):]
        if not rest[:1].isspace() or not rest.strip():
            raise CronError(f"cron expression {expr!r}: @every needs a duration, e.g. '@every 1h30m'")
        seconds = parse_duration(rest.strip())
        return Schedule(expr, every=max(1, int(seconds)))
    raise CronError(f"cron expression {expr!r}: unknown descriptor {text.split()[0]!r}")


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """A Go duration (``1h30m``, ``90s``, ``1.5h``) in seconds; raises :class:`CronError`."""
    pos, total = 0, 0.0
    if not text or text == "0":
        if text == "0":
            return 0.0
        raise CronError("empty duration")
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            raise CronError(f"invalid duration {text!r} (e.g. '90s', '1h30m')")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return total


def _parse_field(spec: _Field, text: str) -> tuple[frozenset[int], bool]:
    values: set[int] = set()
    star = False
    for item in text.split(","):
        got, item_star = _parse_item(spec, item, text)
        values |= got
        star = star or item_star
    return frozenset(values), star


def _parse_item(spec: _Field, item: str, whole: str) -> tuple[set[int], bool]:
    def bad(why: str) -> CronError:
        return CronError(f"{spec.name} field {whole!r}: {why}")

    if not item:
        raise bad("empty list item")
    range_part, slash, step_part = item.partition("/")
    if "/" in step_part:
        raise bad(f"too many slashes in {item!r}")
    star = False
    if range_part in ("*", "?"):
        low, high, star = spec.low, spec.high, True
    else:
        first, dash, last = range_part.partition("-")
        if "-" in last:
            raise bad(f"too many hyphens in {item!r}")
        low = _value(spec, first, bad)
        high = _value(spec, last, bad) if dash else (spec.high if slash else low)
    step = 1
    if slash:
        if not step_part.isdigit():
            raise bad(f"step {step_part!r} is not a positive number")
        step = int(step_part)
        if step == 0:
            raise bad("step must be a positive number")
        if step > 1:
            star = False
    if low < spec.low:
        raise bad(f"{low} is below the minimum {spec.low}")
    if high > spec.high:
        raise bad(f"{high} is above the maximum {spec.high}")
    if low > high:
        raise bad(f"range start {low} is after its end {high}")
    return set(range(low, high + 1, step)), star


def _value(spec: _Field, text: str, bad: Callable[[str], CronError]) -> int:
    lowered = text.lower()
    if lowered in spec.names:
        return spec.names[lowered]
    if not text.isdigit() or not text.isascii():
        allowed = f" or a name ({', '.join(spec.names)})" if spec.names else ""
        raise bad(f"{text!r} is not a number{allowed}")
    return int(text)
