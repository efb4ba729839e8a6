"""A level's `migrateWithin` bounds how long its VMs stay on a member that lost trust: past
it they are stopped instead of waiting longer for a migration, whatever held the migration
back. The clock is the member's `Attested` condition, which only the operator writes."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml

from gtvp.core.evacuation import Vmi, past_deadline
from gtvp.core.policy import PolicyError, parse_policy
from gtvp.core.timestamps import format_ts, human_duration
from gtvp.core.trust import untrusted_since

T0 = dt.datetime(2026, 12, 3, 8, 0, tzinfo=dt.UTC)
TEN = dt.timedelta(minutes=10)


def _status(attested: str, when: dt.datetime, ready_since: dt.datetime = T0) -> dict[str, Any]:
    return {
        "phase": "Untrusted" if attested == "False" else "Trusted",
        "conditions": [
            {"type": "Ready", "status": "False", "lastTransitionTime": format_ts(ready_since)},
            {"type": "Attested", "status": attested, "lastTransitionTime": format_ts(when)},
        ],
    }


def test_the_clock_starts_when_the_member_lost_its_verdict() -> None:
    assert untrusted_since(_status("False", T0)) == T0
    assert untrusted_since(_status("True", T0)) is None
    assert untrusted_since({"phase": "Untrusted"}) is None  # never written: no clock


def test_time_in_maintenance_before_the_verdict_was_lost_does_not_count() -> None:
    """Ready turned False when the member went into Maintenance an hour ago; its verdict was
    lost only now: a VM still there is not stopped at once when Maintenance ends."""
    now = T0 + dt.timedelta(hours=1)
    assert untrusted_since(_status("False", now, ready_since=T0)) == now


def test_only_a_vmi_whose_own_level_bounds_it_is_stopped_and_only_once_the_bound_passed() -> None:
    sensitive, standard = Vmi("ns", "db", "bad", 2), Vmi("ns", "web", "bad", 1)
    within = {2: TEN}
    early = past_deadline([sensitive, standard], since=T0, now=T0 + TEN / 2, within=within)
    assert early == []
    late = past_deadline([sensitive, standard], since=T0, now=T0 + TEN, within=within)
    assert late == [(sensitive, TEN)]


def test_an_unknown_time_stops_nothing() -> None:
    vmi = Vmi("ns", "db", "bad", 2)
    assert past_deadline([vmi], since=None, now=T0 + 100 * TEN, within={2: TEN}) == []


SAMPLE = Path(__file__).parents[2] / "crds" / "samples" / "securitypolicy.yaml"


def _policy(level: dict[str, Any]) -> dict[str, Any]:
    """The sample policy with its first level changed by `level`."""
    spec: dict[str, Any] = next(d for d in yaml.safe_load_all(SAMPLE.read_text()) if d)["spec"]
    spec["levels"][0] = {
        k: v for k, v in spec["levels"][0].items() if k not in ("onUntrusted", "migrateWithin")
    } | level
    return spec


def test_the_policy_reads_migrate_within() -> None:
    pol = parse_policy("p", _policy({"onUntrusted": "Migrate", "migrateWithin": "1h30m"}))
    assert pol.levels[0].migrate_within == dt.timedelta(minutes=90)
    assert parse_policy("p", _policy({})).levels[0].migrate_within is None


@pytest.mark.parametrize("action", ["Keep", "Stop"])
def test_migrate_within_with_another_action_is_refused_by_name(action: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy("p", _policy({"onUntrusted": action, "migrateWithin": "10m"}))
    assert "spec.levels[0].migrateWithin" in str(err.value)
    assert action in str(err.value)


def test_a_malformed_bound_is_refused_by_name() -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy("p", _policy({"migrateWithin": "soon"}))
    assert "spec.levels[0].migrateWithin" in str(err.value)


def test_durations_read_as_written_in_a_policy() -> None:
    assert human_duration(TEN) == "10m"
    assert human_duration(dt.timedelta(minutes=90, seconds=5)) == "1h30m5s"
    assert human_duration(dt.timedelta(seconds=45)) == "45s"
