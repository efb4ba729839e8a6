"""A migration under way is aborted when any node it may be bringing its VM to may not hold
the VM's level, and its one use of its target's verdict does not abort it afterwards.

KubeVirt's recorded target comes from the VMI's status, which the hosts' virt-handler
writes: root on a host can name a Trusted member there while the VM goes to a host that lost
trust. gtvp also judges the node it pinned and the node of the target launcher pod KubeVirt
made for the migration."""

from __future__ import annotations

import dataclasses
import datetime as dt

from gtvp.core.evacuation import Migration
from gtvp.core.inflight import InFlight, heading_for, judge_in_flight, spend_on
from gtvp.core.trust import MemberView

NOW = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(minutes=5)
GOOD = MemberView("good", "Trusted", 3, LATER, uses_left=5)
OTHER = MemberView("other", "Trusted", 3, LATER, uses_left=5)
LOST = MemberView("bad", "Untrusted", 0, None, uses_left=0)
MIGRATION = Migration("apps", "mig", "db", source="src", target="good", phase="Running")


def _judge(
    migration: Migration,
    pods: list[str],
    members: dict[str, MemberView | None],
    *,
    first: bool = True,
) -> InFlight:
    return judge_in_flight(
        heading_for(migration, pods),
        spend_on(migration, pods),
        members,
        level=3,
        now=NOW,
        first=first,
    )


def test_a_trusted_target_spends_one_use_at_the_first_look_only() -> None:
    assert _judge(MIGRATION, ["good"], {"good": GOOD}) == InFlight(spend="good")
    assert _judge(MIGRATION, ["good"], {"good": GOOD}, first=False) == InFlight()


def test_the_targets_last_use_spent_by_the_migration_does_not_abort_it() -> None:
    """With maxUses 1 the migration's own spend empties the verdict: its next event (the
    target ready, running) must not delete it, nor may other decisions' spends."""
    spent = dataclasses.replace(GOOD, uses_left=0)
    assert _judge(MIGRATION, ["good"], {"good": spent}, first=False) == InFlight()


def test_a_migration_first_seen_after_a_restart_on_a_spent_verdict_is_left_alone() -> None:
    """A restarted operator (or the new holder of the target's shard) sees a migration
    whose use the previous process spent, the target's last: it neither aborts it nor
    spends again."""
    spent = dataclasses.replace(GOOD, uses_left=0)
    assert _judge(MIGRATION, ["good"], {"good": spent}) == InFlight()


def test_a_target_that_lost_trust_expired_or_is_too_low_aborts_it() -> None:
    expired = dataclasses.replace(GOOD, expires_at=NOW)
    low = dataclasses.replace(GOOD, level=2)
    for member in (LOST, expired, low, None):
        got = _judge(MIGRATION, ["good"], {"good": member}, first=False)
        assert got.abort == "good", member


def test_a_forged_recorded_target_does_not_hide_the_real_one() -> None:
    """Root on the untrusted target writes a Trusted member into the VMI's
    migrationState.targetNode: the target pod's node (and gtvp's pin) still count."""
    forged = dataclasses.replace(MIGRATION, target="other")
    got = _judge(forged, ["bad"], {"other": OTHER, "bad": LOST}, first=False)
    assert got.abort == "bad"
    pinned = dataclasses.replace(MIGRATION, target="other", pinned="bad")
    assert _judge(pinned, [], {"other": OTHER, "bad": LOST}, first=False).abort == "bad"
    blanked = dataclasses.replace(MIGRATION, target=None)
    assert _judge(blanked, ["bad"], {"bad": LOST}, first=False).abort == "bad"


def test_a_forged_untrusted_target_does_not_abort_a_move_off_an_untrusted_host() -> None:
    """Root on the host being evacuated names an untrusted node as the migration's target,
    so that gtvp would abort each of its moves and the VM would stay: once KubeVirt's target
    pod is known, where it is bound is what counts."""
    forged = dataclasses.replace(MIGRATION, target="bad", pinned="good")
    got = _judge(forged, ["good"], {"good": GOOD, "bad": LOST})
    assert got == InFlight(spend="good")
    assert heading_for(forged, ["good"]) == frozenset({"good"})
    assert heading_for(forged, []) == frozenset({"bad", "good"})  # no pod yet: both


def test_the_use_is_spent_on_the_node_the_target_pod_is_bound_to() -> None:
    forged = dataclasses.replace(MIGRATION, target="other")
    got = _judge(forged, ["good"], {"other": OTHER, "good": GOOD})
    assert got == InFlight(spend="good")
    assert spend_on(forged, []) == "other"
    assert spend_on(dataclasses.replace(MIGRATION, target=None, pinned="good"), []) == "good"


def test_nodes_this_replica_does_not_judge_are_left_to_their_holders() -> None:
    """Only the nodes passed in are judged (the shell passes those whose shards it
    holds); a node the replica does not hold is neither aborted on nor spent."""
    got = judge_in_flight(["other"], None, {"other": OTHER}, level=3, now=NOW, first=True)
    assert got == InFlight()
