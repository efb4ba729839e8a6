"""What a running VMI takes from its node (placement's and migration targets' room).

A VMI's footprint is what KubeVirt's virt-launcher pod for it requests, as far as the VMI's
spec tells: `spec.domain.resources.requests` (CPU and memory), else the limits (Kubernetes
requests what a container limits when it requests nothing); without either, the guest memory
(`spec.domain.memory.guest`) and 100m per vCPU (KubeVirt's default `cpuAllocationRatio` of 10:
sockets x cores x threads of `spec.domain.cpu`; a whole CPU per vCPU with
`dedicatedCpuPlacement`, and one more for `isolateEmulatorThread`). A Lazy Box's VMI and
every VM people run next to them alike, each by its own spec, whatever its labels say
(anyone who creates a VMI can label it as a box; a label must not hide the room it takes).
Not counted: KubeVirt's
per-pod memory overhead (a few hundred MiB, which depends on the cluster's KubeVirt), a
cluster-wide `cpuAllocationRatio` other than the default, and pods that are not VMs: a member
can look a little roomier to gtvp than the scheduler finds it. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gtvp.core.quantity import cpu_millis, memory_bytes

FINISHED = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class Footprint:
    node: str
    cpu_millis: int
    memory_bytes: int


def placed_footprint(vmi: Mapping[str, Any]) -> Footprint | None:
    """The room any VMI takes on its node, a box's too (None: unplaced or finished). What
    migration targets are judged by: a VMI's own requests, whatever its labels say."""
    status = vmi.get("status") or {}
    node = status.get("nodeName")
    if not node or status.get("phase") in FINISHED:
        return None
    return Footprint(str(node), *vmi_requests(vmi))


CPU_PER_VCPU_MILLIS = 100  # KubeVirt's default cpuAllocationRatio: 1/10 of a CPU per vCPU
MAX_TOPOLOGY = 4096  # per sockets/cores/threads: more is no VM that can be scheduled


def vmi_requests(vmi: Mapping[str, Any]) -> tuple[int, int]:
    """(CPU millicores, memory bytes) a VMI's launcher pod asks for (module docstring); (0, 0)
    for quantities KubeVirt's own schema refuses."""
    domain = (vmi.get("spec") or {}).get("domain") or {}
    resources = domain.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    memory = (
        requests.get("memory") or limits.get("memory") or (domain.get("memory") or {}).get("guest")
    )
    cpu = requests.get("cpu") or limits.get("cpu")
    try:
        millis = cpu_millis(cpu) if cpu else _default_cpu(domain.get("cpu") or {})
        return millis, memory_bytes(memory or "0")
    except ValueError:
        return 0, 0


def _default_cpu(topology: Mapping[str, Any]) -> int:
    """What the launcher pod requests without a CPU request: 100m per vCPU, or a whole CPU per
    vCPU with dedicated CPUs (KubeVirt sets the limit, Kubernetes requests it), one more for
    an isolated emulator thread."""
    if topology.get("dedicatedCpuPlacement") is True:
        extra = 1 if topology.get("isolateEmulatorThread") is True else 0
        return (_vcpus(topology) + extra) * 1000
    return _vcpus(topology) * CPU_PER_VCPU_MILLIS


def _vcpus(topology: Mapping[str, Any]) -> int:
    count = 1
    for field in ("sockets", "cores", "threads"):
        n = topology.get(field, 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_TOPOLOGY:
            raise ValueError(f"{field}: {n!r}")
        count *= max(n, 1)
    return count


def usage_by_node(footprints: Mapping[Any, Footprint]) -> dict[str, tuple[int, int]]:
    """Summed (CPU millicores, memory bytes) per node."""
    out: dict[str, tuple[int, int]] = {}
    for fp in footprints.values():
        cpu, mem = out.get(fp.node, (0, 0))
        out[fp.node] = (cpu + fp.cpu_millis, mem + fp.memory_bytes)
    return out
