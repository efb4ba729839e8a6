"""A VMI's own node constraints against a target's labels (gtvp.core.node_affinity): an
evacuation pinned where they exclude it could never be scheduled, and would hold a slot
every evacuation shares until KubeVirt failed it."""

from __future__ import annotations

from typing import Any

from gtvp.core.evacuation import Vmi, plan_evacuation
from gtvp.core.node_affinity import allows, constrained
from gtvp.core.policy import MigrationLimits
from gtvp.core.trust import trust_selector

ZONE_A = {"kubernetes.io/hostname": "t1", "topology.kubernetes.io/zone": "a", "gen": "5"}


def _required(*terms: dict[str, Any]) -> dict[str, Any]:
    return {"nodeSelectorTerms": list(terms)}


def _spec(selector: dict[str, str] | None = None, **required: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"nodeSelector": {**trust_selector(2), **(selector or {})}}
    if required:
        spec["affinity"] = {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}
        }
    return spec


def test_the_trust_selector_alone_constrains_nothing() -> None:
    """gtvp judges trust itself (the labels follow its verdict a moment later)."""
    spec = _spec()
    assert not constrained(spec)
    assert allows(spec, "t1", {})


def test_a_node_selector_must_match_every_entry() -> None:
    spec = _spec({"kubernetes.io/hostname": "bad"})
    assert constrained(spec)
    assert not allows(spec, "t1", ZONE_A)
    assert allows(_spec({"topology.kubernetes.io/zone": "a"}), "t1", ZONE_A)


def test_required_affinity_terms_are_ored_and_expressions_anded() -> None:
    in_b = {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["b"]}
    newer = {"key": "gen", "operator": "Gt", "values": ["4"]}
    named = {"key": "metadata.name", "operator": "In", "values": ["t1"]}
    assert not allows(_spec(**_required({"matchExpressions": [in_b]})), "t1", ZONE_A)
    assert allows(_spec(**_required({"matchExpressions": [in_b]}, {"matchExpressions": [newer]})),
                  "t1", ZONE_A)  # fmt: skip
    assert not allows(_spec(**_required({"matchExpressions": [newer, in_b]})), "t1", ZONE_A)
    assert allows(_spec(**_required({"matchFields": [named]})), "t1", ZONE_A)
    assert not allows(_spec(**_required({"matchFields": [named]})), "t2", ZONE_A)
    gone = {"key": "gpu", "operator": "DoesNotExist"}
    assert allows(_spec(**_required({"matchExpressions": [gone]})), "t1", ZONE_A)
    not_a = {"key": "topology.kubernetes.io/zone", "operator": "NotIn", "values": ["a"]}
    assert not allows(_spec(**_required({"matchExpressions": [not_a]})), "t1", ZONE_A)


def test_empty_terms_and_unknown_operators_match_no_node() -> None:
    assert not allows(_spec(**_required()), "t1", ZONE_A)
    assert not allows(_spec(**_required({})), "t1", ZONE_A)
    odd = {"key": "gen", "operator": "Near", "values": ["5"]}
    assert not allows(_spec(**_required({"matchExpressions": [odd]})), "t1", ZONE_A)
    bad_number = {"key": "topology.kubernetes.io/zone", "operator": "Gt", "values": ["1"]}
    assert not allows(_spec(**_required({"matchExpressions": [bad_number]})), "t1", ZONE_A)


def _plan(allowed: dict[tuple[str, str], frozenset[str]]) -> list[tuple[str, str]]:
    """(VMI, pinned target) of what an evacuation of `bad` starts: one slot out of it."""
    limits = MigrationLimits(max_parallel=5, max_outbound_per_node=1, max_inbound_per_node=5)
    got = plan_evacuation(
        member="bad",
        incident="x",
        vmis=[Vmi("aaa", "pinned", "bad", 2), Vmi("zzz", "victim", "bad", 2)],
        migrations=[],
        limits=limits,
        targets=[("t1", 2), ("t2", 2)],
        allowed=allowed,
    )
    return [
        (m["spec"]["vmiName"], m["spec"]["addedNodeSelector"]["kubernetes.io/hostname"])
        for m in got
    ]


def test_an_evacuation_is_pinned_only_where_the_vmis_own_constraints_allow() -> None:
    assert _plan({("aaa", "pinned"): frozenset({"t2"})}) == [("pinned", "t2")]
    # one its constraints allow nowhere takes no slot: the next VMI gets it
    assert _plan({("aaa", "pinned"): frozenset()}) == [("victim", "t1")]
