"""Plan the migrations that empty a member that is no longer trusted.

Pure. Given the VMIs on the member, the migrations already in flight and the policy's
limits, returns the VirtualMachineInstanceMigrations to create now. Names are
deterministic (VMI, source member, the incident), so an operator restarted halfway never
starts the same migration twice: creating it again answers AlreadyExists. KubeVirt limits
parallel migrations per cluster and outbound per node but not inbound, so the plan also
holds inbound migrations per target within the policy's limit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gtvp.core.policy import MigrationLimits
from gtvp.core.trust import trust_selector

EVACUATION_LABEL = "gtvp.io/evacuation"
FINISHED = {"Succeeded", "Failed"}


@dataclass(frozen=True)
class Vmi:
    namespace: str
    name: str
    node: str
    level: int


@dataclass(frozen=True)
class Migration:
    namespace: str
    name: str
    vmi: str
    source: str | None
    target: str | None
    phase: str

    @property
    def active(self) -> bool:
        return self.phase not in FINISHED


def migration_name(vmi: Vmi, incident: str) -> str:
    digest = hashlib.sha256(f"{vmi.namespace}/{vmi.name}@{vmi.node}#{incident}".encode())
    return f"gtvp-evac-{vmi.name[:36]}-{digest.hexdigest()[:8]}"


def plan_evacuation(
    *,
    member: str,
    incident: str,
    vmis: Sequence[Vmi],
    migrations: Sequence[Migration],
    limits: MigrationLimits,
) -> list[dict[str, Any]]:
    """The VirtualMachineInstanceMigration objects to create now for `member`."""
    active = [m for m in migrations if m.active]
    busy_vmis = {(m.namespace, m.vmi) for m in active}
    here = {(v.namespace, v.name) for v in vmis if v.node == member}
    budget_cluster = limits.max_parallel - len(active)
    # a migration leaves this member if its VMI runs here: KubeVirt may not have recorded a
    # sourceNode yet, so the VMI's node, not the migration's state, decides
    budget_out = limits.max_outbound_per_node - sum(
        1 for m in active if m.source == member or (m.namespace, m.vmi) in here
    )

    out: list[dict[str, Any]] = []
    for vmi in sorted(vmis, key=lambda v: (-v.level, v.namespace, v.name)):
        if vmi.node != member or (vmi.namespace, vmi.name) in busy_vmis:
            continue
        if budget_cluster <= 0 or budget_out <= 0:
            break
        out.append(
            {
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstanceMigration",
                "metadata": {
                    "name": migration_name(vmi, incident),
                    "namespace": vmi.namespace,
                    "labels": {EVACUATION_LABEL: member},
                    "annotations": {"gtvp.io/reason": f"member {member} is no longer trusted"},
                },
                "spec": {"vmiName": vmi.name, "addedNodeSelector": trust_selector(vmi.level)},
            }
        )
        budget_cluster -= 1
        budget_out -= 1
    return out


def inbound_full(target: str, migrations: Sequence[Migration], limits: MigrationLimits) -> bool:
    """True when `target` already receives as many migrations as the policy allows."""
    return sum(1 for m in migrations if m.active and m.target == target) >= (
        limits.max_inbound_per_node
    )


def migration_view(obj: Mapping[str, Any]) -> Migration:
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    state = status.get("migrationState") or {}
    return Migration(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        vmi=str((obj.get("spec") or {}).get("vmiName", "")),
        source=state.get("sourceNode"),
        target=state.get("targetNode"),
        phase=str(status.get("phase", "Pending")),
    )
