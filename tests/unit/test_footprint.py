"""Room taken by VMIs: what placement and migration targets subtract from a node."""

from __future__ import annotations

from typing import Any

from gtvp.core.footprint import Footprint, placed_footprint, usage_by_node


def _vmi(
    node: str | None = "n1",
    *,
    labels: dict[str, str] | None = None,
    requests: dict[str, str] | None = None,
    guest: str | None = None,
    phase: str = "Running",
) -> dict[str, Any]:
    domain: dict[str, Any] = {"devices": {}}
    if requests is not None:
        domain["resources"] = {"requests": requests}
    if guest is not None:
        domain["memory"] = {"guest": guest}
    status: dict[str, Any] = {"phase": phase}
    if node:
        status["nodeName"] = node
    return {"metadata": {"labels": labels or {}}, "spec": {"domain": domain}, "status": status}


def test_requests_count_on_the_node_the_vmi_runs_on() -> None:
    got = placed_footprint(_vmi(requests={"cpu": "1500m", "memory": "2Gi"}))
    assert got == Footprint("n1", 1500, 2 * 2**30)


def test_guest_memory_counts_when_no_memory_is_requested() -> None:
    assert placed_footprint(_vmi(guest="512Mi")) == Footprint("n1", 100, 512 * 2**20)


def test_without_a_cpu_request_each_vcpu_takes_what_kubevirt_requests_for_it() -> None:
    """A tenant's VMs with many vCPUs and no CPU request still fill a node for the scheduler
    (KubeVirt's launcher pod asks 100m per vCPU by default): they must not look free to
    gtvp, or an evacuation gets pinned where its target pod cannot be placed."""
    eight = _vmi(guest="1Gi")
    eight["spec"]["domain"]["cpu"] = {"sockets": 2, "cores": 4}
    assert placed_footprint(eight) == Footprint("n1", 800, 2**30)
    limited = _vmi(guest="1Gi")
    limited["spec"]["domain"]["resources"] = {"limits": {"cpu": "3", "memory": "2Gi"}}
    assert placed_footprint(limited) == Footprint("n1", 3000, 2 * 2**30)  # limits as requests
    dedicated = _vmi(guest="1Gi")  # KubeVirt limits it to whole CPUs: requested as much
    dedicated["spec"]["domain"]["cpu"] = {"cores": 4, "dedicatedCpuPlacement": True}
    assert placed_footprint(dedicated) == Footprint("n1", 4000, 2**30)
    dedicated["spec"]["domain"]["cpu"]["isolateEmulatorThread"] = True
    assert placed_footprint(dedicated) == Footprint("n1", 5000, 2**30)
    absurd = _vmi(guest="1Gi")
    absurd["spec"]["domain"]["cpu"] = {"cores": "many"}
    assert placed_footprint(absurd) == Footprint("n1", 0, 0)  # refused, as its schema would


def test_unplaced_and_finished_vmis_take_no_room_and_a_box_label_hides_none() -> None:
    labelled = placed_footprint(_vmi(labels={"gtvp.io/lazybox": "web"}, guest="1Gi"))
    assert labelled == Footprint("n1", 100, 2**30)  # anyone can write that label
    assert placed_footprint(_vmi(node=None, guest="1Gi")) is None
    assert placed_footprint(_vmi(phase="Succeeded", guest="1Gi")) is None


def test_usage_sums_per_node() -> None:
    fps = {
        "a": Footprint("n1", 100, 10),
        "b": Footprint("n1", 200, 20),
        "c": Footprint("n2", 1, 1),
    }
    assert usage_by_node(fps) == {"n1": (300, 30), "n2": (1, 1)}
