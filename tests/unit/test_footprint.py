"""Room taken by VMIs: what placement and migration targets subtract from a node."""

from __future__ import annotations

from typing import Any

from gtvp.core.footprint import (
    Footprint,
    box_asks,
    placed_footprint,
    usage_by_node,
    vmi_requests,
)

MIB = 2**20


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
    # KubeVirt's launcher pod overhead: 2 GiB / 512 of page tables, 220 MiB of processes,
    # 8 MiB for each of its two vCPUs (1.5 CPUs, rounded up), 8 MiB for the I/O thread, 32
    # MiB of video
    assert got == Footprint("n1", 1500, 2 * 2**30 + (4 + 220 + 16 + 8 + 32) * MIB)


def test_guest_memory_counts_when_no_memory_is_requested() -> None:
    # no memory requested: no page tables in KubeVirt's overhead
    assert placed_footprint(_vmi(guest="512Mi")) == Footprint("n1", 100, (512 + 268) * MIB)


def test_without_a_cpu_request_each_vcpu_takes_what_kubevirt_requests_for_it() -> None:
    """A tenant's VMs with many vCPUs and no CPU request still fill a node for the scheduler
    (KubeVirt's launcher pod asks 100m per vCPU by default): they must not look free to
    gtvp, or an evacuation gets pinned where its target pod cannot be placed."""
    eight = _vmi(guest="1Gi")
    eight["spec"]["domain"]["cpu"] = {"sockets": 2, "cores": 4}
    assert placed_footprint(eight) == Footprint("n1", 800, (1024 + 220 + 8 * 8 + 8 + 32) * MIB)
    limited = _vmi(guest="1Gi")
    limited["spec"]["domain"]["resources"] = {"limits": {"cpu": "3", "memory": "2Gi"}}
    # limits as requests; three vCPUs, and limits alone are Guaranteed QoS: 100 MiB more
    limited_mib = 2048 + 220 + 24 + 8 + 32 + 100
    assert placed_footprint(limited) == Footprint("n1", 3000, limited_mib * MIB)
    dedicated = _vmi(guest="1Gi")  # KubeVirt limits it to whole CPUs: requested as much
    dedicated["spec"]["domain"]["cpu"] = {"cores": 4, "dedicatedCpuPlacement": True}
    pinned = (1024 + 220 + 32 + 8 + 32 + 100) * MIB  # +100 MiB for dedicated CPUs
    assert placed_footprint(dedicated) == Footprint("n1", 4000, pinned)
    dedicated["spec"]["domain"]["cpu"]["isolateEmulatorThread"] = True
    assert placed_footprint(dedicated) == Footprint("n1", 5000, pinned)
    absurd = _vmi(guest="1Gi")
    absurd["spec"]["domain"]["cpu"] = {"cores": "many"}
    assert placed_footprint(absurd) == Footprint("n1", 0, 0)  # refused, as its schema would


def test_unplaced_and_finished_vmis_take_no_room_and_a_box_label_hides_none() -> None:
    labelled = placed_footprint(_vmi(labels={"gtvp.io/lazybox": "web"}, guest="1Gi"))
    assert labelled == Footprint("n1", 100, (1024 + 268) * MIB)  # anyone can write that label
    assert placed_footprint(_vmi(node=None, guest="1Gi")) is None
    assert placed_footprint(_vmi(phase="Succeeded", guest="1Gi")) is None


def test_usage_sums_per_node() -> None:
    fps = {
        "a": Footprint("n1", 100, 10),
        "b": Footprint("n1", 200, 20),
        "c": Footprint("n2", 1, 1),
    }
    assert usage_by_node(fps) == {"n1": (300, 30), "n2": (1, 1)}


def test_kubevirts_overhead_follows_what_runs_beside_the_guest() -> None:
    """The scheduler places a launcher pod by the guest's memory plus KubeVirt's estimate of
    what runs beside it; a member that gtvp counts without it looks roomier than it is, and
    a VM pinned there is never scheduled."""
    base = _vmi(requests={"cpu": "1", "memory": "1Gi"})
    plain = vmi_requests(base)[1] - 2**30
    assert plain == (2 + 220 + 8 + 8 + 32) * MIB
    devices = base["spec"]["domain"]["devices"]
    devices["autoattachGraphicsDevice"] = False
    assert vmi_requests(base)[1] - 2**30 == plain - 32 * MIB  # no video
    devices["tpm"] = {}  # a vTPM runs an swtpm beside qemu
    assert vmi_requests(base)[1] - 2**30 == plain - 32 * MIB + 53 * MIB
    devices["tpm"] = {"enabled": False}
    assert vmi_requests(base)[1] - 2**30 == plain - 32 * MIB
    base["spec"]["readinessProbe"] = {"exec": {"command": ["true"]}}
    assert vmi_requests(base)[1] - 2**30 == plain - 32 * MIB + 110 * MIB
    guaranteed = _vmi(requests={"cpu": "2", "memory": "1Gi"})
    guaranteed["spec"]["domain"]["resources"]["limits"] = {"cpu": "2", "memory": "1Gi"}
    assert vmi_requests(guaranteed)[1] - 2**30 == plain + 8 * MIB + 100 * MIB  # 2 vCPUs, QoS
    reserving = _vmi(requests={"cpu": "1", "memory": "1Gi"})
    reserving["spec"]["domain"]["memory"] = {"reservedOverhead": {"addedOverhead": "64Mi"}}
    assert vmi_requests(reserving)[1] - 2**30 == plain + 64 * MIB
    # the VMI can ask the scheduler to leave the overhead out
    base["spec"]["domain"]["resources"]["overcommitGuestOverhead"] = True
    assert vmi_requests(base) == (1000, 2**30)


def test_a_box_asks_before_its_vm_exists_what_its_pod_will() -> None:
    """Placement counts a box by its spec until its VMI runs: the composed VM's pod asks the
    box's memory, KubeVirt's overhead and (attested boxes have one) a vTPM's swtpm."""
    cpu, memory = box_asks(2500, 512 * MIB)
    assert cpu == 2500
    assert memory == (512 + 1 + 220 + 3 * 8 + 8 + 32 + 53) * MIB  # 2.5 CPUs: 3 vCPUs
