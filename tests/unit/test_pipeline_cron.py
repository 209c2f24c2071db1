"""The cron engine: parsing and its errors, next/previous fire times, and daylight saving in four zones."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from tandem.pipeline.cron import CronError, fires_between, next_fire, parse_cron, prev_fire, zone
from tandem.pipeline.spec import Pipeline, PipelineError, Schedule

NY, BERLIN, SYDNEY = "America/New_York", "Europe/Berlin", "Australia/Sydney"


def utc(text: str) -> datetime:
    """'2026-03-08 07:00' as an aware UTC datetime."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def between(expr: str, tz: str, start: str, end: str) -> list[str]:
    return [f.strftime("%Y-%m-%d %H:%M") for f in fires_between(expr, tz, utc(start), utc(end))]


# -- parsing ------------------------------------------------------------------------------------------------------

def test_fields_lists_ranges_steps_and_names() -> None:
    s = parse_cron("0,30 9-17/4 1,15 JAN-mar mon-FRI")
    assert s.minutes == (0, 30)
    assert s.hours == (9, 13, 17)
    assert s.days_of_month == {1, 15}
    assert s.months == {1, 2, 3}
    assert s.days_of_week == {1, 2, 3, 4, 5}
    assert s.dom_restricted and s.dow_restricted
    assert parse_cron("*/15 * * * *").minutes == (0, 15, 30, 45)
    assert parse_cron("5/20 * * * *").minutes == (5, 25, 45)
    assert parse_cron("0 0 * * 7").days_of_week == {0}
    assert parse_cron("0 0 * * 0,7").days_of_week == {0}
    assert parse_cron("0 0 * * 5-7").days_of_week == {0, 5, 6}
    assert parse_cron("0 0 * * *").every_hour is False
    assert parse_cron("30 * * * *").every_hour and parse_cron("0 0-23 * * *").every_hour


@pytest.mark.parametrize(("macro", "same_as"), [
    ("@hourly", "0 * * * *"), ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"), ("@weekly", "0 0 * * 0"),
    ("@monthly", "0 0 1 * *"), ("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *"), ("@DAILY", "0 0 * * *")])
def test_macros(macro: str, same_as: str) -> None:
    a, b = parse_cron(macro), parse_cron(same_as)
    assert (a.minutes, a.hours, a.days_of_month, a.months, a.days_of_week) == \
        (b.minutes, b.hours, b.days_of_month, b.months, b.days_of_week)


@pytest.mark.parametrize(("expr", "message"), [
    ("61 * * * *", "cron '61 * * * *': minute 61 is outside 0-59"),
    ("0 24 * * *", "hour 24 is outside 0-23"),
    ("0 0 0 * *", "day-of-month 0 is outside 1-31"),
    ("0 0 32 * *", "day-of-month 32 is outside 1-31"),
    ("0 0 * 13 *", "month 13 is outside 1-12"),
    ("0 0 * * 8", "day-of-week 8 is outside 0-7"),
    ("0 0 * FOO *", "month 'FOO' is not a number or a name such as JAN (allowed 1-12)"),
    ("0 0 * * FUN", "day-of-week 'FUN' is not a number or a name such as SUN (allowed 0-7)"),
    ("x * * * *", "minute 'x' is not a number (allowed 0-59)"),
    ("MON * * * *", "minute 'MON' is not a number"),
    ("-1 * * * *", "minute '' is not a number"),
    ("1,,2 * * * *", "minute '' is not a number"),
    ("0 17-9 * * *", "hour range 17-9 goes backwards"),
    ("*/0 * * * *", "minute step '0' is not a whole number in 1-60"),
    ("*/61 * * * *", "minute step '61' is not a whole number in 1-60"),
    ("*/x * * * *", "minute step 'x' is not a whole number"),
    ("* * * *", "expected 5 fields (minute hour day-of-month month day-of-week) or a macro such as @daily, got 4"),
    ("* * * * * *", "got 6"),
    ("", "got 0"),
    ("@reboot", "cron '@reboot': unknown macro; use one of @yearly"),
    ("0 0 30 2 *", "never fires: no month in the month field has day 30"),
    ("0 0 31 4,6 *", "never fires"),
])
def test_parse_errors_name_the_field_and_range(expr: str, message: str) -> None:
    with pytest.raises(CronError) as exc:
        parse_cron(expr)
    assert message in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_feb_30_with_a_weekday_fires_on_that_weekday() -> None:
    # Vixie: both day fields restricted -> either matches, so this is simply "every Monday in February"
    assert next_fire("0 0 30 2 MON", "UTC", utc("2026-01-01 00:00")) == utc("2026-02-02 00:00")


def test_zone() -> None:
    assert zone("Europe/Berlin") == ZoneInfo("Europe/Berlin")
    for bad in ("Mars/Base", "", "../etc/passwd", "America"):
        with pytest.raises(CronError, match=r"unknown time zone .*; use an IANA name such as Europe/Berlin"):
            zone(bad)
    with pytest.raises(CronError, match="unknown time zone 'Mars/Base'"):
        next_fire("0 0 * * *", "Mars/Base", utc("2026-01-01 00:00"))


def test_pipeline_validation_uses_the_engine() -> None:
    Pipeline(name="p", schedules=[Schedule(cron="@daily", timezone=NY)]).validate_dag()
    with pytest.raises(PipelineError, match=r"schedules\[0\].*minute 61 is outside 0-59"):
        Pipeline(name="p", schedules=[Schedule(cron="61 * * * *")]).validate_dag()
    with pytest.raises(PipelineError, match=r"schedules\[1\].*unknown time zone 'Mars/Base'"):
        Pipeline(name="p", schedules=[Schedule(cron="@daily"), Schedule(cron="@daily", timezone="Mars/Base")]
                 ).validate_dag()


# -- ordinary fire times -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("expr", "after", "expected"), [
    ("*/15 * * * *", "2026-06-10 10:07", "2026-06-10 10:15"),
    ("*/15 * * * *", "2026-06-10 10:15", "2026-06-10 10:30"),        # strictly after
    ("*/15 * * * *", "2026-06-10 23:59", "2026-06-11 00:00"),
    ("0 9 * * MON-FRI", "2026-06-12 09:00", "2026-06-15 09:00"),     # Friday -> Monday
    ("0 0 1 * *", "2026-01-31 12:00", "2026-02-01 00:00"),
    ("@yearly", "2026-06-10 10:00", "2027-01-01 00:00"),
    ("0 0 29 2 *", "2026-01-01 00:00", "2028-02-29 00:00"),
    ("0 0 13 * FRI", "2026-02-07 00:00", "2026-02-13 00:00"),        # 13th (a Friday too)
    ("0 0 13 * FRI", "2026-03-01 00:00", "2026-03-06 00:00"),        # Vixie OR: a Friday before the 13th
    ("0 0 13 * FRI", "2026-03-06 00:00", "2026-03-13 00:00"),
    ("0 0 */10 * MON", "2026-05-31 00:00", "2026-06-01 00:00"),      # '*'-led: AND, Mondays on 1, 11, 21, 31
    ("0 0 */10 * MON", "2026-06-01 00:00", "2026-08-31 00:00"),
    ("0 0 * * 7", "2026-06-10 00:00", "2026-06-14 00:00"),           # 7 = Sunday
])
def test_next_fire_ordinary(expr: str, after: str, expected: str) -> None:
    assert next_fire(expr, "UTC", utc(after)) == utc(expected)


def test_next_fire_zones_and_inputs() -> None:
    # 09:00 in Berlin in summer is 07:00 UTC; the input may be in any zone, the answer is UTC
    after = datetime(2026, 7, 1, 12, 0, tzinfo=ZoneInfo("Asia/Tokyo"))
    got = next_fire(parse_cron("0 9 * * *"), ZoneInfo(BERLIN), after)
    assert got == utc("2026-07-01 07:00") and got.tzinfo is UTC
    # 05:30 in Kolkata (UTC+5:30) is midnight UTC; strictly after it is the next day
    assert next_fire("30 5 * * *", "Asia/Kolkata", utc("2026-07-01 00:00")) == utc("2026-07-02 00:00")
    with pytest.raises(ValueError, match="naive datetime"):
        next_fire("* * * * *", "UTC", datetime(2026, 1, 1))


def test_prev_fire_is_at_or_before() -> None:
    assert prev_fire("0 */6 * * *", "UTC", utc("2026-06-10 12:00")) == utc("2026-06-10 12:00")
    assert prev_fire("0 */6 * * *", "UTC", utc("2026-06-10 11:59")) == utc("2026-06-10 06:00")
    assert prev_fire("0 0 29 2 *", "UTC", utc("2026-01-01 00:00")) == utc("2024-02-29 00:00")


@pytest.mark.parametrize(("start", "end"), [("2026-03-01 00:00", "2026-04-10 00:00"),
                                            ("2026-09-25 00:00", "2026-11-05 00:00")])
def test_next_prev_and_between_agree_across_transitions(start: str, end: str) -> None:
    # these windows hold all six 2026 clock changes of New York, Berlin and Sydney
    for tz in (NY, BERLIN, SYDNEY):
        for expr in ("30 2 * * *", "30 1 * * *", "30 * * * *", "10,50 */2 * * *", "0 2,3 * * *"):
            spec = parse_cron(expr)
            listed = fires_between(spec, tz, utc(start), utc(end))
            chained, t = [], utc(start)
            while (t := next_fire(spec, tz, t)) <= utc(end):
                chained.append(t)
            assert listed == chained, (tz, expr)
            assert [prev_fire(spec, tz, f) for f in listed] == listed
            assert [prev_fire(spec, tz, f - timedelta(seconds=1)) for f in listed[1:]] == listed[:-1]


# -- daylight saving time -----------------------------------------------------------------------------------------
# New York: EST UTC-5 / EDT UTC-4; 2026-03-08 02:00 -> 03:00 (07:00Z), 2026-11-01 02:00 -> 01:00 (06:00Z).
# Berlin: CET UTC+1 / CEST UTC+2; 2026-03-29 02:00 -> 03:00 (01:00Z), 2026-10-25 03:00 -> 02:00 (01:00Z).

DST_CASES = [
    # daily at 02:30: the spring gap runs at its end (03:00 local), the fall-back day runs once
    ("30 2 * * *", NY, "2026-03-06 12:00", "2026-03-10 00:00",
     ["2026-03-07 07:30", "2026-03-08 07:00", "2026-03-09 06:30"]),
    ("30 2 * * *", NY, "2026-10-30 12:00", "2026-11-03 00:00",
     ["2026-10-31 06:30", "2026-11-01 07:30", "2026-11-02 07:30"]),
    ("30 1 * * *", NY, "2026-10-30 12:00", "2026-11-03 00:00",           # 01:30 twice: the first (EDT) only
     ["2026-10-31 05:30", "2026-11-01 05:30", "2026-11-02 06:30"]),
    ("30 1 * * *", NY, "2026-03-06 12:00", "2026-03-10 00:00",
     ["2026-03-07 06:30", "2026-03-08 06:30", "2026-03-09 05:30"]),
    ("30 2 * * *", BERLIN, "2026-03-27 12:00", "2026-03-31 00:00",
     ["2026-03-28 01:30", "2026-03-29 01:00", "2026-03-30 00:30"]),
    ("30 2 * * *", BERLIN, "2026-10-23 12:00", "2026-10-27 00:00",       # 02:30 twice in Berlin: CEST only
     ["2026-10-24 00:30", "2026-10-25 00:30", "2026-10-26 01:30"]),
    ("30 1 * * *", BERLIN, "2026-10-23 12:00", "2026-10-27 00:00",
     ["2026-10-23 23:30", "2026-10-24 23:30", "2026-10-26 00:30"]),
    # hourly: every real hour, one hour apart; the wall hour that never existed has no run
    ("30 * * * *", NY, "2026-03-08 05:00", "2026-03-08 09:00",
     ["2026-03-08 05:30", "2026-03-08 06:30", "2026-03-08 07:30", "2026-03-08 08:30"]),
    ("30 * * * *", NY, "2026-11-01 04:00", "2026-11-01 08:00",           # 01:30 EDT and 01:30 EST
     ["2026-11-01 04:30", "2026-11-01 05:30", "2026-11-01 06:30", "2026-11-01 07:30"]),
    ("30 * * * *", BERLIN, "2026-03-28 23:00", "2026-03-29 03:00",
     ["2026-03-28 23:30", "2026-03-29 00:30", "2026-03-29 01:30", "2026-03-29 02:30"]),
    ("30 * * * *", BERLIN, "2026-10-24 23:00", "2026-10-25 03:00",
     ["2026-10-24 23:30", "2026-10-25 00:30", "2026-10-25 01:30", "2026-10-25 02:30"]),
    # every 15 minutes: every 15 real minutes through both changes
    ("*/15 * * * *", NY, "2026-03-08 06:30", "2026-03-08 07:30",
     ["2026-03-08 06:45", "2026-03-08 07:00", "2026-03-08 07:15", "2026-03-08 07:30"]),
    ("*/15 * * * *", NY, "2026-11-01 05:30", "2026-11-01 06:30",
     ["2026-11-01 05:45", "2026-11-01 06:00", "2026-11-01 06:15", "2026-11-01 06:30"]),
    ("*/15 * * * *", BERLIN, "2026-03-29 00:30", "2026-03-29 01:30",
     ["2026-03-29 00:45", "2026-03-29 01:00", "2026-03-29 01:15", "2026-03-29 01:30"]),
    ("*/15 * * * *", BERLIN, "2026-10-25 00:30", "2026-10-25 01:30",
     ["2026-10-25 00:45", "2026-10-25 01:00", "2026-10-25 01:15", "2026-10-25 01:30"]),
    # 02:00 (in the gap, so at 03:00) and 03:00 are the same instant: one run
    ("0 2,3 * * *", NY, "2026-03-07 12:00", "2026-03-09 00:00", ["2026-03-08 07:00"]),
    # Sydney, southern hemisphere: AEST UTC+10 -> AEDT UTC+11 on 2026-10-04 at 02:00
    ("30 2 * * *", SYDNEY, "2026-10-02 00:00", "2026-10-05 00:00",
     ["2026-10-02 16:30", "2026-10-03 16:00", "2026-10-04 15:30"]),
]


@pytest.mark.parametrize(("expr", "tz", "start", "end", "expected"), DST_CASES)
def test_dst_transitions_exact_instants(expr: str, tz: str, start: str, end: str, expected: list[str]) -> None:
    assert between(expr, tz, start, end) == expected
    chained, t = [], utc(start)
    while (t := next_fire(expr, tz, t)) <= utc(end):
        chained.append(t.strftime("%Y-%m-%d %H:%M"))
    assert chained == expected


def test_every_15_minutes_is_regular_in_real_time_all_year() -> None:
    for tz in (NY, BERLIN, SYDNEY):
        fires = fires_between("*/15 * * * *", tz, utc("2026-01-01 00:00"), utc("2027-01-01 00:00"))
        assert len(fires) == 365 * 96
        assert {b - a for a, b in zip(fires, fires[1:])} == {timedelta(minutes=15)}


@pytest.mark.parametrize("tz", [NY, BERLIN, SYDNEY])
@pytest.mark.parametrize("expr", ["30 2 * * *", "30 1 * * *", "0 3 * * *", "@daily"])
def test_daily_job_runs_once_every_local_day_of_the_year(tz: str, expr: str) -> None:
    z = ZoneInfo(tz)
    start = datetime(2026, 1, 1, tzinfo=z)
    fires = fires_between(expr, tz, start - timedelta(microseconds=1), datetime(2027, 1, 1, tzinfo=z)
                          - timedelta(microseconds=1))
    days = [f.astimezone(z).date() for f in fires]
    assert len(fires) == 365 == len(set(fires))
    assert days == [date(2026, 1, 1) + timedelta(days=i) for i in range(365)]


def test_leap_year_has_366_daily_runs() -> None:
    assert len(fires_between("30 2 * * *", NY, utc("2028-01-01 08:00"), utc("2029-01-01 08:00"))) == 366
