"""Cron expressions, written here: five fields or a macro, and their fire times in an IANA time zone.

Fields: ``minute hour day-of-month month day-of-week`` with values 0-59, 0-23, 1-31, 1-12 (or JAN-DEC) and 0-7
(or SUN-SAT; 0 and 7 are both Sunday). Each field is a comma list of ``*``, ``N``, ``A-B``, ``*/S``, ``A-B/S``
or ``A/S`` (A to the field's end, step S). Macros: ``@yearly`` (``@annually``) = ``0 0 1 1 *``, ``@monthly`` =
``0 0 1 * *``, ``@weekly`` = ``0 0 * * 0``, ``@daily`` (``@midnight``) = ``0 0 * * *``, ``@hourly`` = ``0 * * * *``.

Days (the Vixie cron rule): when both day-of-month and day-of-week are restricted (the field does not start with
``*``), a day matches if either matches; otherwise both must match (so ``0 0 13 * FRI`` runs on every 13th and
every Friday, ``0 0 * * FRI`` only on Fridays).

Daylight saving time. Fire times are wall-clock times in the schedule's zone. Two kinds of job differ:

* a job with fixed hours (its hour field does not cover all 24 hours, e.g. ``30 2 * * *``, ``0 */6 * * *``)
  follows the wall clock and runs once per matching day:

  - spring forward: a wall time in the gap (02:30 on 2026-03-08 in New York, which does not exist) runs once, at
    the first instant after the gap (03:00 local, the same instant as the gap's end); a job that also fires at
    03:00 runs once there, not twice;
  - fall back: a wall time that occurs twice (01:30 on 2026-11-01 in New York) runs once, at the first occurrence
    (01:30 EDT, not again at 01:30 EST);

* a job whose hour field covers every hour (``30 * * * *``, ``*/15 * * * *``) follows real time and runs in every
  real hour: both at 01:30 EDT and 01:30 EST when the clock falls back, because those are different hours; and
  nothing for the wall hour that never existed in spring (01:30 EST is followed by 03:30 EDT, one hour later).

So never a run doubled and never one skipped: a fixed-hour job runs exactly once per matching day, an every-hour
job once per real hour. `next_fire` and `fires_between` return UTC datetimes; they walk day by day and only
through the hours and minutes a spec allows, so a yearly job costs a few thousand cheap day checks at most.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["CronError", "CronSpec", "fires_between", "next_fire", "parse_cron", "prev_fire", "zone"]

_MONTHS = {n: i for i, n in enumerate(("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT",
                                       "NOV", "DEC"), start=1)}
_DAYS = {n: i for i, n in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))}
# (name, low, high, names allowed in the field)
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day-of-month", 1, 31, {}), ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 7, _DAYS))
_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
           "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
_MONTH_DAYS = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}
_ONE_DAY = timedelta(days=1)
_HORIZON_DAYS = 366 * 9   # 29 February can be eight years away (2096 -> 2104)


class CronError(ValueError):
    """A cron expression or time zone is wrong; the message quotes it and names the field and the allowed range."""


@dataclass(frozen=True)
class CronSpec:
    """A parsed cron expression: the values each field allows (day-of-week 0 = Sunday)."""

    expr: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days_of_month: frozenset[int]
    months: frozenset[int]
    days_of_week: frozenset[int]
    dom_restricted: bool
    dow_restricted: bool
    day_minutes: tuple[int, ...] = ()   # hour * 60 + minute of every fire in a day, ascending

    def __post_init__(self) -> None:
        if not self.day_minutes:
            object.__setattr__(self, "day_minutes", tuple(h * 60 + m for h in self.hours for m in self.minutes))

    @property
    def every_hour(self) -> bool:
        """Whether the hour field covers all 24 hours (such a job follows real time across DST changes)."""
        return len(self.hours) == 24

    def matches_day(self, day: date) -> bool:
        """Whether the job runs on local date `day` (Vixie rule when both day fields are restricted)."""
        if day.month not in self.months:
            return False
        dom = day.day in self.days_of_month
        dow = day.isoweekday() % 7 in self.days_of_week
        if self.dom_restricted and self.dow_restricted:
            return dom or dow
        return dom and dow


def parse_cron(expr: str) -> CronSpec:
    """Parse five cron fields or a macro (``@daily``); raise `CronError` naming the field and its range."""
    text = expr.strip()
    if text.startswith("@"):
        body = _MACROS.get(text.lower())
        if body is None:
            raise CronError(f"cron {expr!r}: unknown macro; use one of {', '.join(_MACROS)}")
    else:
        body = text
    parts = body.split()
    if len(parts) != 5:
        raise CronError(f"cron {expr!r}: expected 5 fields (minute hour day-of-month month day-of-week) "
                        f"or a macro such as @daily, got {len(parts)}")
    values = [_parse_field(expr, part, *field) for part, field in zip(parts, _FIELDS)]
    spec = CronSpec(expr=expr, minutes=tuple(sorted(values[0])), hours=tuple(sorted(values[1])),
                    days_of_month=frozenset(values[2]), months=frozenset(values[3]),
                    days_of_week=frozenset(v % 7 for v in values[4]),
                    dom_restricted=not parts[2].startswith("*"), dow_restricted=not parts[4].startswith("*"))
    if spec.dom_restricted and not spec.dow_restricted:
        longest = max(_MONTH_DAYS[m] for m in spec.months)
        if min(spec.days_of_month) > longest:
            raise CronError(f"cron {expr!r}: never fires: no month in the month field has day "
                            f"{min(spec.days_of_month)}")
    return spec


def _parse_field(expr: str, text: str, name: str, lo: int, hi: int, names: dict[str, int]) -> set[int]:
    out: set[int] = set()
    for item in text.split(","):
        base, slash, step_text = item.partition("/")
        if base == "*":
            first, last = lo, hi
        elif "-" in base:
            left, _, right = base.partition("-")
            first, last = _value(expr, name, left, lo, hi, names), _value(expr, name, right, lo, hi, names)
            if first > last:
                raise CronError(f"cron {expr!r}: {name} range {base} goes backwards; write it low-high")
        else:
            first = _value(expr, name, base, lo, hi, names)
            last = hi if slash else first
        step = 1
        if slash:
            span = hi - lo + 1
            if not (step_text.isascii() and step_text.isdigit()) or not 1 <= int(step_text) <= span:
                raise CronError(f"cron {expr!r}: {name} step {step_text!r} is not a whole number in 1-{span}")
            step = int(step_text)
        out.update(range(first, last + 1, step))
    return out


def _value(expr: str, name: str, token: str, lo: int, hi: int, names: dict[str, int]) -> int:
    word = token.upper()
    if word in names:
        return names[word]
    if not (word.isascii() and word.isdigit()):
        hint = f" or a name such as {next(iter(names))}" if names else ""
        raise CronError(f"cron {expr!r}: {name} {token!r} is not a number{hint} (allowed {lo}-{hi})")
    value = int(word)
    if not lo <= value <= hi:
        raise CronError(f"cron {expr!r}: {name} {value} is outside {lo}-{hi}")
    return value


def zone(name: str) -> ZoneInfo:
    """The IANA time zone `name`; `CronError` if there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise CronError(f"unknown time zone {name!r}; use an IANA name such as Europe/Berlin") from None


def next_fire(spec: CronSpec | str, tz: str | tzinfo, after: datetime) -> datetime:
    """The first fire time strictly after `after` (an aware datetime), in UTC."""
    cron, z, t = _prepare(spec, tz, after)
    return _search(cron, z, t.astimezone(z).date() - _ONE_DAY, t, forward=True)


def prev_fire(spec: CronSpec | str, tz: str | tzinfo, at: datetime) -> datetime:
    """The last fire time at or before `at` (an aware datetime), in UTC."""
    cron, z, t = _prepare(spec, tz, at)
    return _search(cron, z, t.astimezone(z).date() + _ONE_DAY, t, forward=False)


def fires_between(spec: CronSpec | str, tz: str | tzinfo, start: datetime, end: datetime) -> list[datetime]:
    """Every fire time strictly after `start` and at or before `end`, in UTC, ascending."""
    cron, z, t0 = _prepare(spec, tz, start)
    t1 = _prepare(cron, z, end)[2]
    found: set[datetime] = set()
    # a day before and after: a gap or fold at midnight can move a day's fire across the date line
    day, last = t0.astimezone(z).date() - _ONE_DAY, t1.astimezone(z).date() + _ONE_DAY
    while day <= last:
        if cron.matches_day(day):
            found.update(f for f in _day_fires(cron, z, day) if t0 < f <= t1)
        day += _ONE_DAY
    return sorted(found)


def _prepare(spec: CronSpec | str, tz: str | tzinfo, when: datetime) -> tuple[CronSpec, tzinfo, datetime]:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{when!r} is a naive datetime; pass an aware one (datetime.now(UTC))")
    cron = parse_cron(spec) if isinstance(spec, str) else spec
    return cron, zone(tz) if isinstance(tz, str) else tz, when.astimezone(UTC)


def _search(cron: CronSpec, z: tzinfo, start: date, t: datetime, *, forward: bool) -> datetime:
    """Walk days from `start` (forward or back) to the nearest fire after `t` (forward) or at/before it."""
    step = _ONE_DAY if forward else -_ONE_DAY
    found: list[datetime] = []
    for i in range(_HORIZON_DAYS):
        day = start + step * i
        hit = _nearest_on_day(cron, z, day, t, forward) if cron.matches_day(day) else None
        if found:   # one more day after the first hit: a midnight gap or fold can reorder adjacent days
            found += [hit] if hit else []
            break
        found = [hit] if hit else []
    if not found:
        raise CronError(f"cron {cron.expr!r}: no fire time within {_HORIZON_DAYS // 366} years")
    return min(found) if forward else max(found)


def _nearest_on_day(cron: CronSpec, z: tzinfo, day: date, t: datetime, forward: bool) -> datetime | None:
    """The first fire on local date `day` after `t` (forward), or the last one at or before `t`."""
    offset = _steady_offset(z, day)
    if offset is None:
        fires = [f for f in _day_fires(cron, z, day) if (f > t if forward else f <= t)]
        return (min(fires) if forward else max(fires)) if fires else None
    base = datetime.combine(day, time(), tzinfo=UTC) - offset
    # minutes since local midnight, floored: fire m is after t iff m > it, at or before t iff m <= it
    elapsed = (t - base) // timedelta(minutes=1)
    i = bisect_right(cron.day_minutes, elapsed) - (0 if forward else 1)
    if not 0 <= i < len(cron.day_minutes):
        return None
    return base + timedelta(minutes=cron.day_minutes[i])


def _steady_offset(z: tzinfo, day: date) -> timedelta | None:
    """The UTC offset of local date `day` if the clock does not change that day, else None."""
    midnight = _offset(datetime.combine(day, time(), tzinfo=z))
    next_midnight = _offset(datetime.combine(day + _ONE_DAY, time(fold=1), tzinfo=z))
    return midnight if midnight == next_midnight else None


def _day_fires(cron: CronSpec, z: tzinfo, day: date) -> list[datetime]:
    """The fire instants (UTC, ascending, distinct) of `cron` on local date `day`."""
    offset = _steady_offset(z, day)
    if offset is not None:   # no clock change today: wall time minus one offset
        base = datetime.combine(day, time(), tzinfo=UTC) - offset
        return [base + timedelta(minutes=m) for m in cron.day_minutes]
    found: set[datetime] = set()
    for h in cron.hours:
        for m in cron.minutes:
            found.update(_wall_instants(datetime.combine(day, time(h, m)), z, cron.every_hour))
    return sorted(found)


def _wall_instants(wall: datetime, z: tzinfo, every_hour: bool) -> list[datetime]:
    """The instants at which naive local time `wall` fires, under the DST rules of the module docstring."""
    first = wall.replace(tzinfo=z).astimezone(UTC)
    second = wall.replace(tzinfo=z, fold=1).astimezone(UTC)
    if first == second:
        return [first]
    if first < second:   # the clock fell back: this wall time happens twice
        return [first, second] if every_hour else [first]
    # the clock sprang forward: `wall` does not exist; fold=1 read it with the new offset, fold=0 with the old,
    # so the change lies in (second, first]
    return [] if every_hour else [_transition(z, second, first)]


def _transition(z: tzinfo, lo: datetime, hi: datetime) -> datetime:
    """The instant in (lo, hi] where `z` changes its UTC offset (tz data changes on whole seconds)."""
    before = _offset(lo.astimezone(z))
    a, b = int(lo.timestamp()), int(hi.timestamp())
    while b - a > 1:
        mid = (a + b) // 2
        if _offset(datetime.fromtimestamp(mid, z)) == before:
            a = mid
        else:
            b = mid
    return datetime.fromtimestamp(b, UTC)


def _offset(dt: datetime) -> timedelta:
    off = dt.utcoffset()
    if off is None:
        raise CronError(f"time zone {dt.tzinfo!r} gives no UTC offset for {dt.isoformat()}")
    return off
