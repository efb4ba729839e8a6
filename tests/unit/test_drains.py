"""Planning drains: gtvp moves the gated External VMIs KubeVirt marks for evacuation.

`kubectl drain` makes KubeVirt set `status.evacuationNodeName` on a VMI whose eviction
strategy is External and then waits for an external controller; for gated VMIs (Lazy Boxes
always are) gtvp is that controller. These tests pin down which VMIs are gtvp's, that the
policy's migration limits hold, that only Trusted, schedulable members of a sufficient level
receive, and that a VMI nobody can take gets a reason instead of a migration.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gtvp.core.evacuation import (
    DRAIN_ATTEMPT_ANNOTATION,
    DRAIN_LABEL,
    MAX_DRAIN_FAILURES,
    Attempt,
    DrainTarget,
    Evacuee,
    Migration,
    drain_evacuee,
    drain_history,
    is_planned_drain,
    migration_view,
    plan_drains,
)
from gtvp.core.policy import MigrationLimits

LIMITS = MigrationLimits(max_parallel=5, max_outbound_per_node=2, max_inbound_per_node=2)
HOST = "kubernetes.io/hostname"


def vmi_body(
    name: str = "web",
    *,
    node: str = "n1",
    marked: str | None = "n1",
    strategy: str | None = "External",
    labels: dict[str, str] | None = None,
    phase: str = "Running",
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "nodeName": node}
    if marked is not None:
        status["evacuationNodeName"] = marked
    spec: dict[str, Any] = {"domain": {"devices": {}}}
    if strategy is not None:
        spec["evictionStrategy"] = strategy
    return {
        "metadata": {
            "namespace": "ns",
            "name": name,
            "labels": {"gtvp.io/level": "2"} if labels is None else labels,
        },
        "spec": spec,
        "status": status,
    }


def evacuees(n: int, node: str = "n1", level: int = 2) -> list[Evacuee]:
    return [Evacuee("ns", f"vm{i}", node, level) for i in range(n)]


def targets(*specs: tuple[str, int]) -> list[DrainTarget]:
    return [DrainTarget(name, level, trusted=True) for name, level in specs]


def plan(
    vmis: list[Evacuee],
    tgts: list[DrainTarget],
    migrations: list[Migration] | None = None,
    limits: MigrationLimits = LIMITS,
    history: dict[tuple[str, str, str], list[Attempt]] | None = None,
    allowed: dict[tuple[str, str], frozenset[str]] | None = None,
) -> Any:
    return plan_drains(
        evacuees=vmis,
        migrations=migrations or [],
        history=history or {},
        node_of={(v.namespace, v.name): v.node for v in vmis},
        limits=limits,
        targets=tgts,
        allowed=allowed,
    )


def test_a_marked_gated_external_vmi_is_gtvps_to_move() -> None:
    one_vcpu = 100  # no CPU requested: what its launcher pod asks for one vCPU
    overhead = (220 + 8 + 8 + 32) * 2**20  # no guest memory: KubeVirt's overhead alone
    asks = {"cpu_millis": one_vcpu, "memory_bytes": overhead}
    assert drain_evacuee(vmi_body()) == Evacuee("ns", "web", "n1", 2, **asks)
    box = drain_evacuee(vmi_body(labels={"gtvp.io/level": "3", "gtvp.io/lazybox": "web"}))
    assert box == Evacuee("ns", "web", "n1", 3, box=True, **asks)


def test_vmis_that_are_not_gtvps_to_move_are_left_alone() -> None:
    assert drain_evacuee(vmi_body(marked=None)) is None  # not being drained
    assert drain_evacuee(vmi_body(marked="n0")) is None  # already left the drained node
    assert drain_evacuee(vmi_body(strategy="LiveMigrate")) is None  # KubeVirt moves it
    assert drain_evacuee(vmi_body(strategy=None)) is None
    assert drain_evacuee(vmi_body(labels={})) is None  # ungated: the admin's controller
    assert drain_evacuee(vmi_body(phase="Scheduling")) is None


def test_a_level_raised_through_the_trust_selector_is_the_level_drained_at() -> None:
    """A VMI raised live to level 3 through its trust selector (its label still says 1) runs
    on a level-3 member: planned at level 1, every drain target would be refused by
    admission, the same each pass, and the drain never ends (found by a review)."""
    from gtvp.core.trust import trust_selector

    raised = vmi_body(labels={"gtvp.io/level": "1"})
    raised["spec"]["nodeSelector"] = {**trust_selector(1), **trust_selector(3)}
    got = drain_evacuee(raised)
    assert got is not None
    assert got.level == 3
    unlabelled = vmi_body(labels={})
    unlabelled["spec"]["nodeSelector"] = trust_selector(2)  # its label gone, its selector kept
    assert (drain_evacuee(unlabelled) or Evacuee("", "", "", 0)).level == 2


def test_a_drain_pins_only_where_the_vmis_own_constraints_allow() -> None:
    """A drain pinned where the VMI's own nodeSelector or node affinity forbids it could
    never be scheduled; one they allow nowhere waits and says why (found by a review)."""
    vmis = [Evacuee("ns", "pinned", "n1", 2), Evacuee("ns", "zoned", "n1", 2)]
    own = {("ns", "pinned"): frozenset[str](), ("ns", "zoned"): frozenset({"t2"})}
    got = plan(vmis, targets(("t1", 2), ("t2", 2)), allowed=own)
    assert [
        (m["spec"]["vmiName"], m["spec"]["addedNodeSelector"][HOST]) for m in got.migrations
    ] == [("zoned", "t2")]
    assert got.waiting[("ns", "pinned")] == (
        "no Trusted, uncordoned member of level 2 or above is one its own nodeSelector or "
        "node affinity allows"
    )


def test_an_unreadable_level_is_treated_as_the_strictest() -> None:
    got = drain_evacuee(vmi_body(labels={"gtvp.io/level": "high"}))
    assert got is not None
    assert got.level == 9


def test_the_vmi_is_pinned_to_a_trusted_schedulable_target_of_its_level() -> None:
    tgts = [
        DrainTarget("n1", 3, trusted=True),  # the drained node itself
        DrainTarget("a-low", 1, trusted=True),
        DrainTarget("b-cordoned", 3, trusted=True, cordoned=True),
        DrainTarget("c-untrusted", 3, trusted=False),
        DrainTarget("d-good", 2, trusted=True),
    ]
    got = plan(evacuees(1), tgts)
    assert not got.waiting
    (mig,) = got.migrations
    assert mig["spec"]["vmiName"] == "vm0"
    selector = mig["spec"]["addedNodeSelector"]
    assert selector[HOST] == "d-good"
    assert selector["node-restriction.kubernetes.io/gtvp-level-2"] == "true"
    assert mig["metadata"]["labels"] == {DRAIN_LABEL: "n1"}
    assert mig["metadata"]["annotations"][DRAIN_ATTEMPT_ANNOTATION] == "0"


def test_with_no_eligible_target_the_vmi_waits_with_a_reason_per_obstacle() -> None:
    tgts = [
        DrainTarget("a", 1, trusted=True),
        DrainTarget("b", 3, trusted=True, cordoned=True),
        DrainTarget("c", 3, trusted=False),
    ]
    got = plan(evacuees(1), tgts)
    assert got.migrations == ()
    why = got.waiting[("ns", "vm0")]
    assert "node n1 is being drained" in why
    assert "level >= 2" in why
    assert "1 cordoned (b)" in why
    assert "1 not Trusted (c)" in why
    assert "1 below level 2 (a: level 1)" in why
    assert "no other member" in plan(evacuees(1), targets(("n1", 3))).waiting[("ns", "vm0")]


def test_cluster_outbound_and_inbound_limits_hold() -> None:
    wide = MigrationLimits(max_parallel=10, max_outbound_per_node=10, max_inbound_per_node=2)
    spread = plan(evacuees(6), targets(("t1", 3), ("t2", 3)), limits=wide)
    pinned = sorted(m["spec"]["addedNodeSelector"][HOST] for m in spread.migrations)
    assert pinned == ["t1", "t1", "t2", "t2"]  # two each, the rest waits for the next plan
    assert not spread.waiting  # held back by the limits only: no reason to report
    many = targets(*((f"t{i}", 3) for i in range(10)))
    assert len(plan(evacuees(6), many).migrations) == 2  # outbound per node
    busy = [Migration("x", f"m{i}", f"o{i}", "far", None, "Running") for i in range(4)]
    two_nodes = evacuees(2) + evacuees(2, node="n2")
    assert len(plan(two_nodes, many, migrations=busy).migrations) == 1  # cluster: 5


def test_a_migration_without_a_source_yet_counts_as_outbound_from_its_vmis_node() -> None:
    vmis = evacuees(3)
    first = plan(vmis, targets(("t1", 3), ("t2", 3), ("t3", 3)))
    assert len(first.migrations) == 2
    in_flight = [migration_view(m) for m in first.migrations]  # Pending, no source yet
    again = plan(vmis, targets(("t1", 3), ("t2", 3), ("t3", 3)), migrations=in_flight)
    assert again.migrations == ()  # the first two still leave n1, and are not started twice


def test_a_pinned_target_counts_as_inbound_before_kubevirt_records_it() -> None:
    tight = MigrationLimits(max_parallel=10, max_outbound_per_node=10, max_inbound_per_node=1)
    first = plan(evacuees(1, node="n1"), targets(("t1", 3)), limits=tight)
    in_flight = [migration_view(m) for m in first.migrations]
    other = plan(evacuees(1, node="n2"), targets(("t1", 3)), in_flight, limits=tight)
    assert other.migrations == ()


def test_names_are_deterministic_and_a_new_attempt_gets_a_new_name() -> None:
    tgts = targets(("t1", 3))
    one = plan(evacuees(1), tgts).migrations[0]["metadata"]["name"]
    assert one == plan(evacuees(1), tgts).migrations[0]["metadata"]["name"]  # a restart
    assert one.startswith("gtvp-drain-vm0-")
    done = {
        ("ns", "vm0", "n1"): [Attempt(0, "Succeeded", one, "t1")]
    }  # it came back and is drained again
    again = plan(evacuees(1), tgts, history=done).migrations[0]
    assert again["metadata"]["name"] != one
    assert again["metadata"]["annotations"][DRAIN_ATTEMPT_ANNOTATION] == "1"


def test_after_repeated_failures_the_vmi_waits_with_a_reason() -> None:
    tgts = targets(("t1", 3))
    failures = [Attempt(i, "Failed", f"d{i}", "t1") for i in range(MAX_DRAIN_FAILURES)]
    stuck = plan(evacuees(1), tgts, history={("ns", "vm0", "n1"): failures})
    assert stuck.migrations == ()
    assert (
        f"the last {MAX_DRAIN_FAILURES} drain migrations off n1 failed (towards t1);"
        in (stuck.waiting[("ns", "vm0")])
    )
    one_failed = {
        ("ns", "vm0", "n1"): [Attempt(0, "Succeeded", "d0", "t1"), Attempt(1, "Failed", "d1", "t1")]
    }
    retry = plan(evacuees(1), tgts, history=one_failed).migrations
    assert retry[0]["metadata"]["annotations"][DRAIN_ATTEMPT_ANNOTATION] == "2"


def test_a_retry_goes_where_no_attempt_failed_while_such_a_member_can_take_the_vmi() -> None:
    """A target the scheduler cannot use (filled by pods gtvp does not count) would fail
    every retry pinned to it, and three failures leave the VM on the drained node."""
    tgts = targets(("a-first", 3), ("b-later", 3))
    first = plan(evacuees(1), tgts).migrations[0]
    assert first["spec"]["addedNodeSelector"][HOST] == "a-first"
    failed = [{**first, "status": {"phase": "Failed"}}]
    retry = plan(evacuees(1), tgts, history=drain_history(failed)).migrations[0]
    assert retry["spec"]["addedNodeSelector"][HOST] == "b-later"
    assert retry["metadata"]["annotations"][DRAIN_ATTEMPT_ANNOTATION] == "1"
    # where every member failed once, the usual choice decides among them: the VMI is
    # retried (up to three failures), not left waiting
    both = [*failed, {**retry, "status": {"phase": "Failed"}}]
    third = plan(evacuees(1), tgts, history=drain_history(both)).migrations[0]
    assert third["metadata"]["annotations"][DRAIN_ATTEMPT_ANNOTATION] == "2"
    assert third["spec"]["addedNodeSelector"][HOST] == "a-first"
    # a member that did not fail but is at its inbound limit: the VMI waits for it rather
    # than spend an attempt where one failed
    one = MigrationLimits(max_parallel=5, max_outbound_per_node=2, max_inbound_per_node=1)
    busy = [Migration("other", "in", "x", "n9", "b-later", "Running", "b-later")]
    held = plan(evacuees(1), tgts, busy, limits=one, history=drain_history(failed))
    assert held.migrations == ()
    # a cancelled attempt in between is no success: the run (and what it avoids) goes on
    cancelled = {
        **retry,
        "metadata": {**retry["metadata"], "deletionTimestamp": "2026-12-03T00:00:00Z"},
    }
    after = plan(evacuees(1), tgts, history=drain_history([*failed, cancelled])).migrations[0]
    assert after["spec"]["addedNodeSelector"][HOST] == "b-later"
    # a success ends the run: its failures no longer steer the next drain
    ok = [*failed, {**retry, "status": {"phase": "Succeeded"}}]
    again = plan(evacuees(1), tgts, history=drain_history(ok)).migrations[0]
    assert again["spec"]["addedNodeSelector"][HOST] == "a-first"


def test_a_vmi_already_migrating_is_not_planned_again() -> None:
    busy = [Migration("ns", "any", "vm0", "n1", "t1", "Running")]
    assert plan(evacuees(1), targets(("t1", 3), ("t2", 3)), migrations=busy).migrations == ()


def test_history_reads_gtvps_drain_migrations_only() -> None:
    plan_out = plan(evacuees(1), targets(("t1", 3))).migrations[0]
    finished = {**plan_out, "status": {"phase": "Failed"}}
    other = {"metadata": {"namespace": "ns", "name": "x"}, "spec": {"vmiName": "vm0"}}
    name = plan_out["metadata"]["name"]
    assert drain_history([finished, other]) == {("ns", "vm0", "n1"): [(0, "Failed", name, "t1")]}


def test_higher_levels_go_first() -> None:
    vmis = [Evacuee("ns", "low", "n1", 1), Evacuee("ns", "high", "n1", 3)]
    vmis.append(Evacuee("ns", "mid", "n1", 2))
    got = plan(vmis, targets(("t1", 3), ("t2", 3)))
    assert [m["spec"]["vmiName"] for m in got.migrations] == ["high", "mid"]


NODES = ["n0", "n1", "n2", "n3"]
evacuee_st = st.builds(
    Evacuee,
    namespace=st.just("ns"),
    name=st.sampled_from([f"vm{i}" for i in range(8)]),
    node=st.sampled_from(NODES),
    level=st.integers(1, 3),
)
target_st = st.builds(
    DrainTarget,
    name=st.sampled_from(NODES),
    level=st.integers(0, 3),
    trusted=st.booleans(),
    cordoned=st.booleans(),
)
active_st = st.builds(
    Migration,
    namespace=st.just("other"),
    name=st.sampled_from([f"m{i}" for i in range(6)]),
    vmi=st.sampled_from([f"x{i}" for i in range(6)]),
    source=st.sampled_from(NODES),
    target=st.sampled_from([*NODES, None]),
    phase=st.sampled_from(["Pending", "Running", "Succeeded"]),
)
limits_st = st.builds(
    MigrationLimits,
    max_parallel=st.integers(0, 6),
    max_outbound_per_node=st.integers(0, 3),
    max_inbound_per_node=st.integers(0, 3),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(evacuee_st, max_size=8, unique_by=lambda e: e.name),
    st.lists(target_st, max_size=4, unique_by=lambda t: t.name),
    st.lists(active_st, max_size=6, unique_by=lambda m: m.name),
    limits_st,
)
def test_plans_keep_every_limit_and_pin_only_eligible_targets(
    vmis: list[Evacuee],
    tgts: list[DrainTarget],
    busy: list[Migration],
    limits: MigrationLimits,
) -> None:
    got = plan(vmis, tgts, migrations=busy, limits=limits)
    after = busy + [migration_view(m) for m in got.migrations]
    active = [m for m in after if m.active]
    by_name = {v.name: v for v in vmis}
    assert len(active) <= max(limits.max_parallel, len([m for m in busy if m.active]))
    for mig in got.migrations:
        vmi = by_name[mig["spec"]["vmiName"]]
        target = next(t for t in tgts if t.name == mig["spec"]["addedNodeSelector"][HOST])
        assert target.trusted
        assert not target.cordoned
        assert target.name != vmi.node
        assert target.level >= vmi.level
        assert (vmi.namespace, vmi.name) not in got.waiting
    for node in NODES:
        planned_out = sum(1 for m in got.migrations if by_name[m["spec"]["vmiName"]].node == node)
        already_out = sum(1 for m in busy if m.active and m.source == node)
        assert planned_out == 0 or planned_out + already_out <= limits.max_outbound_per_node
        planned_in = sum(1 for m in got.migrations if m["spec"]["addedNodeSelector"][HOST] == node)
        already_in = sum(1 for m in busy if m.active and m.inbound_to == node)
        assert planned_in == 0 or planned_in + already_in <= limits.max_inbound_per_node


def _pending_drain(phase: str, pinned: str = "t1", target: str | None = None) -> Migration:
    return Migration(
        "ns", "gtvp-drain-vm0-x", "vm0", "n1", target, phase, pinned=pinned, drains="n1"
    )


def test_a_drain_migration_whose_target_was_cordoned_before_it_was_scheduled_is_cancelled() -> None:
    cordoned = [DrainTarget("t1", 3, trusted=True, cordoned=True), DrainTarget("t2", 3, True)]
    for phase in ("Pending", "Scheduling"):
        got = plan(evacuees(1), cordoned, migrations=[_pending_drain(phase)])
        (stale,) = got.cancel
        assert (stale.namespace, stale.name, stale.vmi) == ("ns", "gtvp-drain-vm0-x", "vm0")
        assert "its target t1 was cordoned before the migration was scheduled" in stale.why
        assert got.migrations == ()  # re-planned once the cancelled one is gone
    lost = [DrainTarget("t1", 3, trusted=False)]
    (stale,) = plan(evacuees(1), lost, migrations=[_pending_drain("Scheduling")]).cancel
    assert "t1 is not Trusted" in stale.why
    gone = plan(evacuees(1), targets(("t2", 3)), migrations=[_pending_drain("Pending")]).cancel
    assert "t1 has no Node" in gone[0].why


def test_a_drain_migration_that_kubevirt_scheduled_or_whose_target_still_qualifies_stays() -> None:
    cordoned = [DrainTarget("t1", 3, trusted=True, cordoned=True)]
    for phase in ("Scheduled", "PreparingTarget", "TargetReady", "Running"):
        assert plan(evacuees(1), cordoned, migrations=[_pending_drain(phase)]).cancel == ()
    scheduled = _pending_drain("Scheduling", target="t1")  # the target pod has a node
    assert plan(evacuees(1), cordoned, migrations=[scheduled]).cancel == ()
    fine = plan(evacuees(1), targets(("t1", 3)), migrations=[_pending_drain("Pending")])
    assert fine.cancel == ()
    assert fine.migrations == ()
    going = dataclasses.replace(_pending_drain("Scheduling"), deleting=True)  # finalizer pending
    assert plan(evacuees(1), cordoned, migrations=[going]).cancel == ()  # not again
    not_ours = Migration("ns", "kubevirt-evacuation-1", "vm0", "n1", None, "Pending", pinned="t1")
    assert plan(evacuees(1), cordoned, migrations=[not_ours]).cancel == ()


def test_the_drain_label_is_read_from_the_migration() -> None:
    (obj,) = plan(evacuees(1), targets(("t1", 3))).migrations
    view = migration_view(obj)
    assert not view.deleting
    assert migration_view(
        {**obj, "metadata": {**obj["metadata"], "deletionTimestamp": "x"}}
    ).deleting
    assert view.drains == "n1"
    assert view.pinned == "t1"
    assert view.phase == "Pending"


def test_a_drain_migrations_name_taken_by_someone_else_gets_a_spare() -> None:
    """Anyone can compute the name of a drain migration and create one first (a tenant's
    migration of another VMI): gtvp must not take it for its own and wait for ever (the
    drain hanging); the next plan uses a spare name, and gtvp's own migration under the
    first name is still recognised as started."""
    first = plan(evacuees(1), targets(("t", 2))).migrations[0]
    name = first["metadata"]["name"]
    squat = {
        "metadata": {"namespace": "ns", "name": name},
        "spec": {"vmiName": "someone-elses"},
        "status": {"phase": "Succeeded"},
    }
    assert not is_planned_drain(squat, first)
    assert is_planned_drain(first, first)
    again = plan(evacuees(1), targets(("t", 2)), migrations=[migration_view(squat)])
    (mig,) = again.migrations
    assert mig["metadata"]["name"] != name
    assert mig["metadata"]["name"].startswith("gtvp-drain-vm0-")
    assert mig["spec"]["vmiName"] == "vm0"
