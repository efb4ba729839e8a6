"""Planning evacuations: limits hold even before KubeVirt records a migration's source."""

from __future__ import annotations

from gtvp.core.evacuation import Migration, Vmi, migration_name, plan_evacuation
from gtvp.core.policy import MigrationLimits

LIMITS = MigrationLimits(max_parallel=5, max_outbound_per_node=2, max_inbound_per_node=2)


def _vmis(n: int, node: str = "bad") -> list[Vmi]:
    return [Vmi("ns", f"vm{i}", node, 3) for i in range(n)]


def test_outbound_limit_holds_for_migrations_without_a_source_yet() -> None:
    vmis = _vmis(4)
    first = plan_evacuation(member="bad", incident="x", vmis=vmis, migrations=[], limits=LIMITS)
    assert len(first) == 2
    in_flight = [
        Migration("ns", m["metadata"]["name"], m["spec"]["vmiName"], None, None, "Pending")
        for m in first
    ]
    again = plan_evacuation(
        member="bad", incident="x", vmis=vmis, migrations=in_flight, limits=LIMITS
    )
    assert again == []  # not 2 more: the first two still leave this member


def test_names_are_deterministic_per_incident() -> None:
    vmi = _vmis(1)[0]
    assert migration_name(vmi, "PcrMismatch@t1") == migration_name(vmi, "PcrMismatch@t1")
    assert migration_name(vmi, "PcrMismatch@t1") != migration_name(vmi, "PcrMismatch@t2")


def test_finished_migrations_free_the_budget_and_higher_levels_go_first() -> None:
    vmis = [Vmi("ns", "low", "bad", 1), Vmi("ns", "high", "bad", 3), Vmi("ns", "mid", "bad", 2)]
    done = [Migration("ns", "old", "other", "bad", "good", "Succeeded")]
    plan = plan_evacuation(member="bad", incident="x", vmis=vmis, migrations=done, limits=LIMITS)
    assert [m["spec"]["vmiName"] for m in plan] == ["high", "mid"]
    selector = plan[0]["spec"]["addedNodeSelector"]
    assert selector["node-restriction.kubernetes.io/gtvp-level-3"] == "true"


def test_cluster_limit_holds() -> None:
    busy = [Migration("ns", f"m{i}", f"x{i}", "elsewhere", None, "Running") for i in range(5)]
    assert (
        plan_evacuation(member="bad", incident="x", vmis=_vmis(3), migrations=busy, limits=LIMITS)
        == []
    )


def test_inbound_limit_holds_and_targets_are_spread() -> None:
    limits = MigrationLimits(max_parallel=10, max_outbound_per_node=10, max_inbound_per_node=2)
    targets = [("t1", 3), ("t2", 3), ("low", 1)]
    plan = plan_evacuation(
        member="bad", incident="x", vmis=_vmis(6), migrations=[], limits=limits, targets=targets
    )
    pinned = [m["spec"]["addedNodeSelector"]["kubernetes.io/hostname"] for m in plan]
    assert sorted(pinned) == ["t1", "t1", "t2", "t2"]  # 2 each; "low" cannot take level 3
    assert plan[0]["spec"]["addedNodeSelector"]["node-restriction.kubernetes.io/gtvp-level-3"]
    # pinned but not yet Scheduled migrations count as inbound: nothing more goes to t1/t2
    in_flight = [
        Migration("ns", m["metadata"]["name"], m["spec"]["vmiName"], None, None, "Pending", p)
        for m, p in zip(plan, pinned, strict=True)
    ]
    more = plan_evacuation(
        member="bad",
        incident="x",
        vmis=_vmis(6),
        migrations=in_flight,
        limits=limits,
        targets=targets,
    )
    assert more == []
    # a finished migration frees its target's inbound slot
    in_flight[0] = Migration("ns", "done", "vm0", "bad", pinned[0], "Succeeded", pinned[0])
    assert (
        len(
            plan_evacuation(
                member="bad",
                incident="x",
                vmis=_vmis(6),
                migrations=in_flight,
                limits=limits,
                targets=targets,
            )
        )
        == 1
    )
