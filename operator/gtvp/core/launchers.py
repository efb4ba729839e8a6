"""Where a VMI's virt-launcher pods say it runs: what gtvp believes of a VMI's node besides
its own status.

A VMI's `status.nodeName` (and its `kubevirt.io/nodeName` label) is written by KubeVirt's
virt-handler, and root on a host can write it with that host's virt-handler token: a VMI
running on an untrusted host could name a trusted one, and gtvp would neither move nor
stop it. A launcher pod's `spec.nodeName` cannot change once the pod is bound, only
KubeVirt's virt-controller creates pods labelled `kubevirt.io` with a controller (the
`gtvp-launcher-pods` admission policy), and the pod names its VMI by uid: gtvp counts a
gated VMI on every node where one of its launcher pods is, as well as on the node its
status names. That is never less than before: a pod adds nodes, it never takes the
status's away.

Which pods count: every launcher pod of the VMI that has not ended; when none runs, every
one of them (its kubelet, root on that host too, can write its pod Succeeded or Failed).
A migration's source pod that lingers for a moment after the VMI really moved counts too,
so evacuation leaves alone, for `SETTLE` after it, a VMI that gtvp's own migration off that
member brought away (`settled_until`; the time is virt-controller's, on a migration that only
KubeVirt's controllers may update); a host that keeps such a pod "Running" longer holds the
VMI again. While a migration of the VMI is unfinished, a pod that ended after it began still
counts. What remains (docs/threat-model.md): the host's kubelet may
delete its own pod (virt-controller then fails the VMI); the source's virt-handler reports
how a migration ends, so a host can have KubeVirt record gtvp's evacuation as Succeeded,
then write its pod ended and the VMI on the target, and gtvp believes KubeVirt (only the
target's side could tell: not done); and a host may keep an aborted migration's target pod
"Running" so that the VMI is held there too (gtvp then moves or stops a VM that is
elsewhere: fail closed).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gtvp.core.evacuation import DRAIN_LABEL, EVACUATION_LABEL
from gtvp.core.timestamps import parse_ts

APP_LABEL = "kubevirt.io"
APP_VALUE = "virt-launcher"
"""The value KubeVirt gives its launcher pods' APP_LABEL."""
CREATED_BY_LABEL = "kubevirt.io/created-by"
"""The uid of the VMI a launcher pod runs, as KubeVirt labels it (only KubeVirt's
controllers make launcher pods or change their labels: `gtvp-launcher-pods`)."""
SELECTOR = APP_LABEL
"""The label selector of the pods gtvp looks at (the watch and the start-up listing): every
pod carrying the label, whatever its value, as KubeVirt takes for a VMI's launcher any pod
with that label the VMI controls (a pod whose value was changed to hide it from gtvp is
still KubeVirt's launcher; the gtvp-launcher-pods admission policy refuses the change too)."""
MIGRATION_JOB_LABEL = "kubevirt.io/migrationJobUID"
"""On a migration's target launcher pod: the migration's uid (virt-controller's; the
`gtvp-launcher-pods` admission policy keeps anyone else from changing it)."""
ENDED = frozenset({"Succeeded", "Failed"})
SETTLE = dt.timedelta(seconds=60)
"""How long after gtvp's migration of a VMI off a member succeeded its source pod there
may still run (virt-launcher exits once the VM has left) before it holds the VMI again."""


@dataclass(frozen=True)
class LauncherPod:
    """A bound launcher pod of one VMI."""

    vmi: tuple[str, str]
    """(namespace, name) of the VMI it runs."""
    vmi_uid: str
    node: str
    ended: bool
    migration_uid: str = ""
    """The migration it is the target pod of ("": none)."""


def launcher_pod(body: Mapping[str, Any]) -> LauncherPod | None:
    """The launcher pod `body` is, or None: no APP_LABEL (any value), no VMI as its controller,
    or not bound to a node yet (then it runs nowhere)."""
    meta = body.get("metadata") or {}
    if APP_LABEL not in (meta.get("labels") or {}):
        return None
    owner = next(
        (
            ref
            for ref in meta.get("ownerReferences") or ()
            if ref.get("controller")
            and ref.get("kind") == "VirtualMachineInstance"
            and str(ref.get("apiVersion", "")).startswith("kubevirt.io/")
        ),
        None,
    )
    node = (body.get("spec") or {}).get("nodeName")
    if owner is None or not owner.get("uid") or not owner.get("name") or not node:
        return None
    return LauncherPod(
        vmi=(str(meta.get("namespace", "")), str(owner["name"])),
        vmi_uid=str(owner["uid"]),
        node=str(node),
        ended=(body.get("status") or {}).get("phase") in ENDED,
        migration_uid=str((meta.get("labels") or {}).get(MIGRATION_JOB_LABEL) or ""),
    )


def pod_nodes(
    pods: Iterable[LauncherPod],
    vmi_uid: str | None,
    *,
    ended_while_migrating: Iterable[LauncherPod] = (),
) -> frozenset[str]:
    """The nodes the launcher pods of the VMI with `vmi_uid` hold it on (None: a VMI gtvp
    does not know: none): every running pod's, and those of `ended_while_migrating` (pods
    that ended after the VMI's unfinished migration began: a source host that writes its own
    pod ended while the target's pod runs still holds the VMI); every pod's when none runs.
    Pods of another VMI under the same name (another uid) never count."""
    if vmi_uid is None:
        return frozenset()
    own = [p for p in pods if p.vmi_uid == vmi_uid]
    running = frozenset(p.node for p in own if not p.ended)
    if not running:
        return frozenset(p.node for p in own)
    return running | {p.node for p in ended_while_migrating if p.vmi_uid == vmi_uid}


def made_for(migration: Mapping[str, Any], vmi: Mapping[str, Any], *, undated: bool) -> bool:
    """Whether `migration` was made for the VMI `vmi`, not for an earlier VMI under its
    name: created no earlier than it. `undated` is the answer when either has no
    creationTimestamp (a migration gtvp planned but has not written yet has none): each
    caller picks the answer that fails closed for it."""
    born = parse_ts((vmi.get("metadata") or {}).get("creationTimestamp"))
    made = parse_ts((migration.get("metadata") or {}).get("creationTimestamp"))
    if born is None or made is None:
        return undated
    return made >= born


def settled_until(
    migrations: Iterable[Mapping[str, Any]],
    vmi: Mapping[str, Any],
    member: str,
    now: dt.datetime,
) -> dt.datetime | None:
    """Until when VMI `vmi` counts as just brought off `member` by one of gtvp's evacuations
    or drains of it (labels only the operator may set, on a migration only KubeVirt's
    controllers may update: gtvp-migration-labels), made for this VMI (not before it; an
    undated one is not: this loosens what holds the VMI) and Succeeded less than `SETTLE`
    ago at the time virt-controller recorded; None: not so."""
    name = (vmi.get("metadata") or {}).get("name")
    until: dt.datetime | None = None
    for m in migrations:
        labels = (m.get("metadata") or {}).get("labels") or {}
        status = m.get("status") or {}
        if (m.get("spec") or {}).get("vmiName") != name:
            continue
        if status.get("phase") != "Succeeded":
            continue
        if member not in (labels.get(EVACUATION_LABEL), labels.get(DRAIN_LABEL)):
            continue
        if not made_for(m, vmi, undated=False):
            continue  # a migration of an earlier VMI under this name, or undated
        for t in status.get("phaseTransitionTimestamps") or ():
            at = parse_ts(t.get("phaseTransitionTimestamp"))
            if t.get("phase") == "Succeeded" and at is not None and now - at < SETTLE:
                until = max(until or at + SETTLE, at + SETTLE)
    return until
