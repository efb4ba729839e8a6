"""The one schedule of member rechecks: a later wish never pushes back a sooner plan."""

from __future__ import annotations

import datetime as dt
import time

from gtvp.runtime import RecheckSchedule


def test_schedule_by_keeps_a_sooner_plan_and_brings_a_later_one_forward() -> None:
    s = RecheckSchedule()
    s.schedule("m1", dt.timedelta(seconds=1))  # a verdict's recheck
    s.schedule_by("m1", dt.timedelta(seconds=61))  # a settle that ends later
    assert s.next_due["m1"] <= time.monotonic() + 1.5
    s.schedule("m2", dt.timedelta(seconds=60))
    s.schedule_by("m2", dt.timedelta(seconds=2))
    assert s.next_due["m2"] <= time.monotonic() + 2.5
    s.schedule_by("m3", dt.timedelta(seconds=5))  # nothing planned: planned now
    assert "m3" in s.next_due
    assert s.pop_due(time.monotonic() + 3) == {"m1", "m2"}
