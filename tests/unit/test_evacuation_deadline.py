"""A level's `migrateWithin` bounds how long its VMs stay on a member that lost trust: past
it they are stopped instead of waiting longer for a migration, whatever held the migration
back. The clock is the member's `status.belowSince` (per level, since when it has held less),
which only the operator writes."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from gtvp.core.evacuation import Vmi, evacuation_bounds, past_deadline
from gtvp.core.policy import DEFAULT_MIGRATE_WITHIN, PolicyError, parse_policy
from gtvp.core.timestamps import human_duration
from gtvp.core.trust import below_since, below_since_times, takes_trust_away
from tests.samples import sample_policy_spec

T0 = dt.datetime(2026, 12, 3, 8, 0, tzinfo=dt.UTC)
TEN = dt.timedelta(minutes=10)


def _below(held: int, previous: dict[str, str] | None, now: dt.datetime) -> dict[int, dt.datetime]:
    return below_since_times({"belowSince": below_since(previous, held, now)})


def test_the_clock_of_each_level_starts_when_the_member_stopped_holding_it() -> None:
    untrusted = below_since(None, 0, T0)  # a member that lost its verdict at T0
    assert below_since_times({"belowSince": untrusted}) == dict.fromkeys(range(1, 10), T0)
    # an hour later it is Trusted again, at level 2 only: levels 1 and 2 are held again,
    # level 3 has been out of reach since T0 without a break
    later = T0 + dt.timedelta(hours=1)
    again = _below(2, untrusted, later)
    assert sorted(again) == [3, 4, 5, 6, 7, 8, 9]
    assert again[3] == T0
    # it falls to nothing again: level 3 keeps T0, levels 1 and 2 start now
    fell = _below(0, below_since(untrusted, 2, later), later + TEN)
    assert (fell[1], fell[2], fell[3]) == (later + TEN, later + TEN, T0)
    assert below_since_times({}) == {}  # never written: no clock


def test_flapping_between_levels_does_not_restart_the_clock_of_a_level_never_reached() -> None:
    state = below_since(None, 2, T0)
    for minute in range(1, 30):  # 1, 2, 1, 2, ...: level 3 is never held
        state = below_since(state, 1 + minute % 2, T0 + dt.timedelta(minutes=minute))
    assert below_since_times({"belowSince": state})[3] == T0


def test_only_a_vmi_whose_own_level_bounds_it_is_stopped_and_only_once_the_bound_passed() -> None:
    sensitive, standard = Vmi("ns", "db", "bad", 2), Vmi("ns", "web", "bad", 1)
    within = {2: TEN}
    since = dict.fromkeys(range(1, 10), T0)
    early = past_deadline([sensitive, standard], since=since, now=T0 + TEN / 2, within=within)
    assert early == []
    late = past_deadline([sensitive, standard], since=since, now=T0 + TEN, within=within)
    assert late == [(sensitive, TEN)]


def test_a_level_the_member_still_holds_has_no_clock() -> None:
    """Trusted at level 2 now: a level-2 VM is where it may be; a level-3 one is not."""
    since = _below(2, None, T0)
    vmis = [Vmi("ns", "ok", "m", 2), Vmi("ns", "out", "m", 3)]
    late = past_deadline(vmis, since=since, now=T0 + 2 * TEN, within={2: TEN, 3: TEN})
    assert [v.name for v, _ in late] == ["out"]


def test_an_unknown_time_stops_nothing() -> None:
    vmi = Vmi("ns", "db", "bad", 2)
    assert past_deadline([vmi], since={}, now=T0 + 100 * TEN, within={2: TEN}) == []


def _policy(level: dict[str, Any]) -> dict[str, Any]:
    """The sample policy with its first level changed by `level`."""
    spec = sample_policy_spec()
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


@pytest.mark.parametrize(
    ("before", "after", "away"),
    [
        (("Trusted", 3), ("Trusted", 2), True),  # its level dropped
        (("Trusted", 3), ("Untrusted", 0), True),
        (("Trusted", 2), ("Maintenance", 0), True),
        (("Untrusted", 0), ("Trusted", 2), False),
        (("Trusted", 2), ("Trusted", 3), False),
        (("Trusted", 2), ("Trusted", 2), False),
        (("Enrolling", 0), ("Untrusted", 0), False),
    ],
)
def test_which_verdicts_are_written_over_a_newer_member(
    before: tuple[str, int], after: tuple[str, int], away: bool
) -> None:
    """A verdict that takes trust away lands even when the agent wrote since it was judged;
    one that grants trust waits for the newest body."""

    def status(s: tuple[str, int]) -> dict[str, Any]:
        return {"phase": s[0], "level": s[1]}

    assert takes_trust_away(status(before), status(after)) is away


def _levels(**within: str) -> Any:
    """The sample policy's levels (1 Keep, 2 Migrate 30m, 3 Migrate 10m), level 1 Migrate
    too, with these migrateWithin values by level name (`none` drops it)."""
    spec = sample_policy_spec()
    for lv in spec["levels"]:
        lv["onUntrusted"] = "Migrate"
        got = within.get(lv["name"])
        if got == "none":
            lv.pop("migrateWithin", None)
        elif got is not None:
            lv["migrateWithin"] = got
    return parse_policy("p", spec).levels


def test_a_vms_bound_is_its_own_levels_or_its_members_levels_for_the_levels_that_covers() -> None:
    levels = _levels(standard="4h", sensitive="none", restricted="10m")
    by = {lv.level: lv for lv in levels}
    # a member judged at level 1 (lowered from 3): its level-3 VMs move because they need
    # more, so level 1's 4h never shortens or lengthens their 10m; level 1's own VMs keep 4h
    within, chosen, source = evacuation_bounds(levels, by[1])
    assert within == {1: dt.timedelta(hours=4), 2: DEFAULT_MIGRATE_WITHIN, 3: TEN}
    assert chosen == {1, 3}  # level 2 waits the default: nobody chose it
    assert source == {1: "own", 2: "default", 3: "own"}
    # an untrusted level-3 member (10m) moves VMs of every level it covers: the shorter wins
    within, chosen, source = evacuation_bounds(levels, by[3])
    assert within == {1: TEN, 2: TEN, 3: TEN}
    assert chosen == {1, 2, 3}
    assert source == {1: "member", 2: "member", 3: "own"}


def test_an_explicit_bound_equal_to_the_default_is_named_as_chosen() -> None:
    """The member's level chose migrateWithin 1h (the default's length), the VM's level
    chose nothing: the stop names the member's level's choice, not the default."""
    levels = _levels(standard="none", sensitive="none", restricted="1h")
    bounds = evacuation_bounds(levels, levels[2])
    assert bounds.within[1] == DEFAULT_MIGRATE_WITHIN
    assert bounds.source[1] == "member"
    assert 1 in bounds.chosen


def test_a_longer_member_bound_does_not_make_the_default_a_choice() -> None:
    """The member's level waits 2h, the VM's level sets nothing: the VM's bound is the 1h
    default, nobody's choice, so a VM that cannot live-migrate stops at once."""
    levels = _levels(standard="none", sensitive="none", restricted="2h")
    within, chosen, source = evacuation_bounds(levels, levels[2])
    assert within[2] == DEFAULT_MIGRATE_WITHIN
    assert 2 not in chosen
    assert 3 in chosen
    assert source[2] == "default"
