"""Plan the migrations that empty a member that is no longer trusted.

Pure. Given the VMIs on the member, the migrations already in flight and the policy's
limits, returns the VirtualMachineInstanceMigrations to create now. Names are
deterministic (VMI, source member, the incident), so an operator restarted halfway never
starts the same migration twice: creating it again answers AlreadyExists. KubeVirt limits
parallel migrations per cluster and outbound per node but not inbound, so when the
caller names the usable targets the plan picks, for each VMI, the eligible target with the
fewest inbound migrations and pins it (`kubernetes.io/hostname` in `addedNodeSelector`,
next to the trust selector); a VMI whose every eligible target is full waits for the next
plan. A pinned target counts as inbound before KubeVirt records it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gtvp.core.policy import MigrationLimits
from gtvp.core.trust import trust_selector

EVACUATION_LABEL = "gtvp.io/evacuation"
HOSTNAME_LABEL = "kubernetes.io/hostname"
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
    pinned: str | None = None  # the target named in addedNodeSelector, if any

    @property
    def active(self) -> bool:
        return self.phase not in FINISHED

    @property
    def inbound_to(self) -> str | None:
        return self.target or self.pinned


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
    targets: Sequence[tuple[str, int]] | None = None,
) -> list[dict[str, Any]]:
    """The VirtualMachineInstanceMigration objects to create now for `member`.

    `targets`: the usable members (name, level) that may receive VMIs; with them the
    inbound limit holds and each migration is pinned to one target.
    """
    active = [m for m in migrations if m.active]
    busy_vmis = {(m.namespace, m.vmi) for m in active}
    here = {(v.namespace, v.name) for v in vmis if v.node == member}
    budget_cluster = limits.max_parallel - len(active)
    # a migration leaves this member if its VMI runs here: KubeVirt may not have recorded a
    # sourceNode yet, so the VMI's node, not the migration's state, decides
    budget_out = limits.max_outbound_per_node - sum(
        1 for m in active if m.source == member or (m.namespace, m.vmi) in here
    )

    inbound: dict[str, int] = {}
    for m in active:
        if m.inbound_to:
            inbound[m.inbound_to] = inbound.get(m.inbound_to, 0) + 1
    out: list[dict[str, Any]] = []
    for vmi in sorted(vmis, key=lambda v: (-v.level, v.namespace, v.name)):
        if vmi.node != member or (vmi.namespace, vmi.name) in busy_vmis:
            continue
        if budget_cluster <= 0 or budget_out <= 0:
            break
        selector = trust_selector(vmi.level)
        if targets is not None:
            room = [
                name
                for name, level in targets
                if name != member
                and level >= vmi.level
                and inbound.get(name, 0) < limits.max_inbound_per_node
            ]
            if not room:
                continue  # every eligible target is receiving its limit: wait
            target = min(room, key=lambda n: (inbound.get(n, 0), n))
            inbound[target] = inbound.get(target, 0) + 1
            selector = {**selector, HOSTNAME_LABEL: target}
        out.append(
            migration_object(
                name=migration_name(vmi, incident),
                namespace=vmi.namespace,
                vmi=vmi.name,
                label=(EVACUATION_LABEL, member),
                reason=f"member {member} is no longer trusted",
                selector=selector,
            )
        )
        budget_cluster -= 1
        budget_out -= 1
    return out


def migration_object(
    *,
    name: str,
    namespace: str,
    vmi: str,
    label: tuple[str, str],
    reason: str,
    selector: Mapping[str, str],
) -> dict[str, Any]:
    """A VirtualMachineInstanceMigration gtvp starts: labelled with why (evacuation or
    balancing, and the source member), its reason annotated, its targets restricted."""
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {label[0]: label[1]},
            "annotations": {"gtvp.io/reason": reason},
        },
        "spec": {"vmiName": vmi, "addedNodeSelector": dict(selector)},
    }


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
        pinned=((obj.get("spec") or {}).get("addedNodeSelector") or {}).get(HOSTNAME_LABEL),
    )
