"""What a running VMI takes from its node (placement's and migration targets' room).

A VMI's footprint is what KubeVirt's virt-launcher pod for it requests, as far as the VMI's
spec tells: `spec.domain.resources.requests` (CPU and memory), else the limits (Kubernetes
requests what a container limits when it requests nothing); without either, the guest memory
(`spec.domain.memory.guest`) and 100m per vCPU (KubeVirt's default `cpuAllocationRatio` of 10:
sockets x cores x threads of `spec.domain.cpu`; a whole CPU per vCPU with
`dedicatedCpuPlacement`, and one more for `isolateEmulatorThread`); to the memory KubeVirt
adds its estimate of the pod's own overhead (`launcher_overhead`: page tables, virt-launcher,
virtqemud, virtlogd and qemu, per vCPU, video, vTPM, ... about 270 MiB for a small VM)
unless the VMI sets `overcommitGuestOverhead`. A Lazy Box's VMI and every VM people run next
to them alike, each by its own spec, whatever its labels say (anyone who creates a VMI can
label it as a box; a label must not hide the room it takes). Not counted: a cluster-wide
`additionalGuestMemoryOverheadRatio` or `cpuAllocationRatio` other than the defaults, network
binding plugins' overhead, and pods that are not VMs: a member can look a little roomier to
gtvp than the scheduler finds it (a box's VM that the scheduler then cannot place says so,
`core.boxes.unschedulable`), the resources of the pod's other containers (console log,
container disks), and hugepages (KubeVirt asks for a guest on hugepages as its own resource;
gtvp counts it as memory). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gtvp.core.quantity import cpu_millis, memory_bytes, parse_quantity

FINISHED = frozenset({"Succeeded", "Failed"})
"""A VMI's final phases: it runs nowhere, takes no room, has nothing to move or stop."""


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
        guest = memory_bytes(memory or "0")
        skip = resources.get("overcommitGuestOverhead") is True
        return millis, guest + (0 if skip else launcher_overhead(vmi))
    except ValueError:
        return 0, 0


def box_asks(cpu: int, memory: int) -> tuple[int, int]:
    """What the launcher pod of a Lazy Box's VM asking for `cpu` millicores and `memory`
    bytes will request, before its VMI exists: the same plus KubeVirt's overhead for the
    composed VM, counted with a vTPM (attested boxes have one: 53 MiB more than an
    unattested box needs, until its VMI counts by its own spec)."""
    requests = {"cpu": f"{cpu}m", "memory": str(memory)}
    vmi = {"spec": {"domain": {"resources": {"requests": requests}, "devices": {"tpm": {}}}}}
    return cpu, memory + launcher_overhead(vmi)


MIB = 2**20
FIXED_OVERHEAD = (25 + 100 + 25 + 40 + 30) * MIB  # virt-launcher-monitor, virt-launcher,
# virtlogd, virtqemud, qemu (less the guest's RAM): KubeVirt v1.9's GetMemoryOverhead (later
# releases raise qemu's share). A VMI's status.memory.memoryOverhead is not read: gtvp
# counts what the spec asks for, not what is written about the VM after it started.


def launcher_overhead(vmi: Mapping[str, Any]) -> int:
    """The memory KubeVirt adds to a VMI's launcher pod on x86-64 for what runs beside the
    guest (its GetMemoryOverhead, at the default `additionalGuestMemoryOverheadRatio`):
    page tables (1/512 of the memory requested), the fixed processes, 8 MiB per vCPU and for
    the I/O thread, 32 MiB of video unless `autoattachGraphicsDevice` is false, 1 GiB for
    VFIO devices, 1 MiB for a downward-metrics disk, exec probes, 256 MiB for SEV, 53 MiB for
    a vTPM's swtpm, 100 MiB with dedicated CPUs or guaranteed QoS, and what the VMI reserves
    itself (`memory.reservedOverhead.addedOverhead`). Raises ValueError on quantities
    KubeVirt's schema refuses."""
    spec = vmi.get("spec") or {}
    domain = spec.get("domain") or {}
    devices = domain.get("devices") or {}
    resources = domain.get("resources") or {}
    requested = (resources.get("requests") or {}).get("memory")
    total = memory_bytes(requested) // 512 if requested else 0
    total += FIXED_OVERHEAD + 8 * MIB * _overhead_vcpus(domain) + 8 * MIB
    reserved = ((domain.get("memory") or {}).get("reservedOverhead") or {}).get("addedOverhead")
    if reserved:
        total += memory_bytes(reserved)
    if devices.get("autoattachGraphicsDevice") is not False:
        total += 32 * MIB
    interfaces = devices.get("interfaces") or []
    vfio = devices.get("hostDevices") or devices.get("gpus")
    if vfio or any(isinstance(i, Mapping) and "sriov" in i for i in interfaces):
        total += 1024 * MIB
    if any(isinstance(v, Mapping) and "downwardMetrics" in v for v in spec.get("volumes") or []):
        total += MIB
    probes = [
        p for p in (spec.get("livenessProbe"), spec.get("readinessProbe"))
        if isinstance(p, Mapping) and "exec" in p
    ]  # fmt: skip
    total += len(probes) * 10 * MIB + (100 * MIB if probes else 0)
    security = domain.get("launchSecurity") or {}
    if isinstance(security, Mapping) and ("sev" in security or "snp" in security):
        total += 256 * MIB
    tpm = devices.get("tpm")
    if isinstance(tpm, Mapping) and tpm.get("enabled", True) is not False:
        total += 53 * MIB
    if (domain.get("cpu") or {}).get("dedicatedCpuPlacement") is True or _guaranteed(resources):
        total += 100 * MIB
    return total


def _overhead_vcpus(domain: Mapping[str, Any]) -> int:
    """vCPUs as KubeVirt counts them for the overhead: the topology, else the CPU limit or
    request (whole CPUs), at least 1."""
    if domain.get("cpu") is not None:
        return _vcpus(domain.get("cpu") or {})
    resources = domain.get("resources") or {}
    cpu = (resources.get("limits") or {}).get("cpu") or (resources.get("requests") or {}).get("cpu")
    return max(-(-cpu_millis(cpu) // 1000), 1) if cpu else 1  # whole CPUs, rounded up


def _guaranteed(resources: Mapping[str, Any]) -> bool:
    """CPU and memory limited, each request absent or equal to its limit (KubeVirt's
    WantsToHaveQOSGuaranteed on the VMI its webhook completed: a CPU limit becomes the CPU
    request, and a memory limit without a request qualifies)."""
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    for k in ("cpu", "memory"):
        if not limits.get(k) or parse_quantity(limits[k]) == 0:
            return False
        if requests.get(k) and parse_quantity(requests[k]) != parse_quantity(limits[k]):
            return False
    return True


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
