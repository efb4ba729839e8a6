"""The migration budget evacuations, drains and balancing share: every active migration gtvp
started counts against the cluster, its source and its target, finished ones free their
slots; migrations gtvp did not start are KubeVirt's to queue and count for nothing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gtvp.core.balance import BALANCE_LABEL
from gtvp.core.evacuation import (
    DRAIN_LABEL,
    EVACUATION_LABEL,
    GTVP_MIGRATION_LABELS,
    Migration,
    Vmi,
    migration_view,
    plan_evacuation,
)
from gtvp.core.migration_budget import MigrationBudget, recorded_source, tenant_share
from gtvp.core.policy import MigrationLimits

LIMITS = MigrationLimits(max_parallel=3, max_outbound_per_node=2, max_inbound_per_node=1)
NODES = ["a", "b", "c"]


def mig(
    name: str,
    *,
    vmi: str = "vm",
    source: str | None = None,
    target: str | None = None,
    phase: str = "Running",
    pinned: str | None = None,
) -> Migration:
    return Migration("ns", name, vmi, source, target, phase, pinned)


def test_an_empty_budget_allows_what_the_limits_allow() -> None:
    budget = MigrationBudget.of(LIMITS, [])
    assert budget.running == 0
    assert budget.allows("a", "b")
    budget.take("a", "b")
    assert not budget.receives("b")  # inbound limit 1
    assert not budget.allows("c", "b")
    assert budget.allows("a", "c")
    budget.take("a", "c")
    assert not budget.sends("a")  # outbound limit 2
    assert budget.allows("b")
    budget.take("b")
    assert not budget.cluster_allows()  # cluster limit 3
    assert not budget.allows("c")
    assert (budget.leaving("a"), budget.arriving("b"), budget.arriving("c")) == (2, 1, 1)


def test_active_migrations_count_and_finished_ones_do_not() -> None:
    budget = MigrationBudget.of(
        LIMITS,
        [
            mig("m1", source="a", target="b"),
            mig("m2", source="a", phase="Pending", pinned="c"),  # pinned: inbound before Scheduled
            mig("m3", source="a", target="b", phase="Succeeded"),
            mig("m4", source="b", target="c", phase="Failed"),
        ],
    )
    assert budget.running == 2
    assert budget.outbound == {"a": 2}
    assert budget.inbound == {"b": 1, "c": 1}


def test_only_the_migrations_gtvp_started_count() -> None:
    def body(name: str, labels: dict[str, str]) -> dict[str, object]:
        return {
            "metadata": {"namespace": "ns", "name": name, "labels": labels},
            "spec": {"vmiName": name, "addedNodeSelector": {"kubernetes.io/hostname": "b"}},
            "status": {"phase": "Scheduling", "migrationState": {"sourceNode": "a"}},
        }

    ours = [
        migration_view(body(f"m-{label}", {label: "a"}))
        for label in (EVACUATION_LABEL, DRAIN_LABEL, BALANCE_LABEL)
    ]
    tenants = [migration_view(body(f"t{i}", {"app": "x"})) for i in range(5)]
    assert set(GTVP_MIGRATION_LABELS) == {EVACUATION_LABEL, DRAIN_LABEL, BALANCE_LABEL}
    assert [m.foreign for m in ours] == [False, False, False]
    assert all(m.foreign for m in tenants)
    budget = MigrationBudget.of(LIMITS, [*ours, *tenants])
    assert (budget.running, budget.outbound, budget.inbound) == (3, {"a": 3}, {"b": 3})
    assert MigrationBudget.of(LIMITS, tenants).allows("a", "b")


def test_the_source_is_the_callers_to_name() -> None:
    without = mig("m1", vmi="vm1", phase="Pending")  # KubeVirt has not recorded a source yet
    recorded = mig("m2", vmi="vm2", source="b")
    node_of = {("ns", "vm1"): "a", ("ns", "vm2"): "a"}
    plain = MigrationBudget.of(LIMITS, [without, recorded])
    assert plain.outbound == {"b": 1}
    assert plain.running == 2
    by_vmi = MigrationBudget.of(LIMITS, [without, recorded], recorded_source(node_of))
    assert by_vmi.outbound == {"a": 1, "b": 1}  # KubeVirt's sourceNode wins when recorded


def test_the_least_busy_target_with_room_is_chosen_by_arrivals_then_name() -> None:
    limits = MigrationLimits(max_parallel=10, max_outbound_per_node=10, max_inbound_per_node=2)
    budget = MigrationBudget.of(limits, [mig("m1", target="a"), mig("m2", target="c")])
    assert budget.least_busy(["c", "b", "a"]) == "b"
    budget.take("x", "b")
    assert budget.least_busy(["c", "b", "a"]) == "a"  # all at 1: by name
    budget.take("x", "a")
    budget.take("x", "b")
    assert budget.least_busy(["a", "b"]) is None  # both at the limit
    assert budget.least_busy([]) is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([*NODES, None]),
            st.sampled_from([*NODES, None]),
            st.sampled_from(["Pending", "Running", "Succeeded", "Failed"]),
        ),
        max_size=8,
    ),
    st.lists(st.tuples(st.sampled_from(NODES), st.sampled_from(NODES)), max_size=10),
)
def test_taking_only_what_is_allowed_keeps_every_limit(
    existing: list[tuple[str | None, str | None, str]], wanted: list[tuple[str, str]]
) -> None:
    migrations = [mig(f"m{i}", source=s, target=t, phase=p) for i, (s, t, p) in enumerate(existing)]
    budget = MigrationBudget.of(LIMITS, migrations)
    before = MigrationBudget.of(LIMITS, migrations)
    taken: list[tuple[str, str]] = []
    for source, target in wanted:
        if budget.allows(source, target):
            budget.take(source, target)
            taken.append((source, target))
    assert budget.running == before.running + len(taken)
    assert len(taken) <= max(0, LIMITS.max_parallel - before.running)
    for node in NODES:
        out = sum(1 for s, _ in taken if s == node)
        into = sum(1 for _, t in taken if t == node)
        assert out == 0 or before.leaving(node) + out <= LIMITS.max_outbound_per_node
        assert into == 0 or before.arriving(node) + into <= LIMITS.max_inbound_per_node
        assert budget.leaving(node) == before.leaving(node) + out
        assert budget.arriving(node) == before.arriving(node) + into


def test_moves_a_tenants_own_evidence_causes_leave_room_for_a_member_that_lost_trust() -> None:
    """A tenant can make its boxes fail their vTPM quotes at will, and keep each move long
    (a guest dirtying its memory): with the whole budget theirs, a member that lost trust
    waited for its evacuation until its VMs were stopped at migrateWithin (found by a
    review). Such moves now share half of maxParallel; the rest stays for the others."""
    limits = MigrationLimits(max_parallel=4, max_outbound_per_node=4, max_inbound_per_node=4)
    targets = [("t1", 2), ("t2", 2)]
    tenant = [  # two of the tenant's boxes on their way off member a
        migration_view(obj)
        for i in range(2)
        for obj in plan_evacuation(member="a", incident="attest-1",
                                   vmis=[Vmi("ns", f"box{i}", "a", 2)], migrations=[],
                                   limits=limits, targets=targets)
    ]  # fmt: skip
    assert [m.vmi for m in tenant if m.active and not m.foreign] == ["box0", "box1"]
    moving = frozenset({("ns", "box0"), ("ns", "box1"), ("ns", "box2")})
    third = [Vmi("ns", "box2", "a", 2)]
    # a third waits ...
    shared = tenant_share(limits, tenant, moving)
    assert plan_evacuation(member="a", incident="attest-2", vmis=third, migrations=tenant,
                           limits=shared, targets=targets) == []  # fmt: skip
    # ... as it would not with the whole budget
    assert plan_evacuation(member="a", incident="attest-2", vmis=third, migrations=tenant,
                           limits=limits, targets=targets)  # fmt: skip
    # a member that lost trust still moves its two VMs
    lost = [Vmi("ns", "vm1", "b", 2), Vmi("ns", "vm2", "b", 2)]
    assert len(plan_evacuation(member="b", incident="lost", vmis=lost, migrations=tenant,
                               limits=limits, targets=targets)) == 2  # fmt: skip
    # the others' moves do not count against the tenants' share
    assert tenant_share(limits, tenant, frozenset()).max_parallel == 2 + 2
    assert tenant_share(MigrationLimits(max_parallel=1), [], moving).max_parallel == 1
