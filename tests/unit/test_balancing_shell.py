"""What the balancing shell hands the pure planner: the boxes placed, each at the level the
planner must keep it at (`gtvp.handlers.balancing.placed_boxes`)."""

from __future__ import annotations

from typing import Any, cast

from gtvp import kube
from gtvp.core.trust import trust_selector
from gtvp.handlers.balancing import placed_boxes
from gtvp.runtime import OperatorSettings, Runtime


def _runtime(level: int, selector: dict[str, str]) -> Runtime:
    rt = Runtime(settings=OperatorSettings(policy_name="p"), clients=cast(kube.Clients, None))
    box: dict[str, Any] = {
        "metadata": {"name": "web", "namespace": "ns", "uid": "box-uid"},
        "spec": {"level": level, "resources": {"cpu": "1", "memory": "1Gi"}},
        "status": {"resolved": []},
    }
    owner = {"kind": "LazyBox", "name": "web", "uid": "box-uid", "controller": True}
    vm = {"metadata": {"name": "web", "namespace": "ns", "uid": "vm-uid",
                       "ownerReferences": [owner]}}  # fmt: skip
    vmi = {
        "metadata": {
            "name": "web",
            "namespace": "ns",
            "labels": {"gtvp.io/level": str(level), "gtvp.io/lazybox": "web"},
            "ownerReferences": [
                {"kind": "VirtualMachine", "name": "web", "uid": "vm-uid", "controller": True}
            ],
        },
        "spec": {"nodeSelector": selector, "domain": {"devices": {}}},
        "status": {"phase": "Running", "nodeName": "n1"},
    }
    rt.view.observe_box(box, "ADDED")
    rt.view.observe_vm(vm, "ADDED")
    rt.view.observe_vmi(vmi, "ADDED")
    return rt


def test_a_box_is_balanced_at_its_level() -> None:
    (placed,) = placed_boxes(_runtime(2, trust_selector(2)))
    assert (placed.name, placed.node, placed.level) == ("web", "n1", 2)


def test_a_box_raised_live_through_its_trust_selector_is_moved_only_at_that_level() -> None:
    """Its VMI now needs level 3 where it runs (a live update of the selector): a target
    of the box's own level 2 would be refused by admission, every pass (found by a review)."""
    raised = {**trust_selector(2), **trust_selector(3)}
    (placed,) = placed_boxes(_runtime(2, raised))
    assert placed.level == 3
