"""What a running VMI takes from its node (placement's and migration targets' room).

A VMI's footprint is its `spec.domain.resources.requests` (CPU and memory), with the guest
memory (`spec.domain.memory.guest`) when no memory is requested: a Lazy Box's VMI and every
VM people run next to them alike, each by its own spec, whatever its labels say (anyone who
creates a VMI can label it as a box; a label must not hide the room it takes). Pure.
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


def vmi_requests(vmi: Mapping[str, Any]) -> tuple[int, int]:
    """(CPU millicores, memory bytes) a VMI asks for: its requests, the guest memory when it
    requests none; (0, 0) for quantities KubeVirt's own schema refuses."""
    domain = (vmi.get("spec") or {}).get("domain") or {}
    requests = (domain.get("resources") or {}).get("requests") or {}
    memory = requests.get("memory") or (domain.get("memory") or {}).get("guest") or "0"
    try:
        return cpu_millis(requests.get("cpu") or "0"), memory_bytes(memory)
    except ValueError:
        return 0, 0


def usage_by_node(footprints: Mapping[Any, Footprint]) -> dict[str, tuple[int, int]]:
    """Summed (CPU millicores, memory bytes) per node."""
    out: dict[str, tuple[int, int]] = {}
    for fp in footprints.values():
        cpu, mem = out.get(fp.node, (0, 0))
        out[fp.node] = (cpu + fp.cpu_millis, mem + fp.memory_bytes)
    return out
