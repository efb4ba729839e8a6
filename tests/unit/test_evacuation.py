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
