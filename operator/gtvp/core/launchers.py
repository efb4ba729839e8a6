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

Which pods count: the newest running launcher pod of the VMI (during a migration the
target's: KubeVirt makes it after the source's; the source still counts through the
status, which names it until the migration ends); when none runs, every one of them (its
kubelet, root on that host too, can write its pod Succeeded or Failed). So a migration's
source pod that lingers, or that a host keeps "Running", after the VMI really moved holds it
nowhere, and a host that marks its own pod ended still holds the VMI. What remains: a newer
running pod exists only while virt-controller runs a migration of the VMI (bounded by
KubeVirt's migration timeouts), and the host's kubelet may delete its own pod, after which
virt-controller fails the VMI.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

APP_LABEL = "kubevirt.io"
APP_VALUE = "virt-launcher"
SELECTOR = f"{APP_LABEL}={APP_VALUE}"
"""The label selector of KubeVirt's launcher pods (the watch and the start-up listing)."""
ENDED = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class LauncherPod:
    """A bound launcher pod of one VMI."""

    vmi: tuple[str, str]
    """(namespace, name) of the VMI it runs."""
    vmi_uid: str
    node: str
    created: str
    """Its creationTimestamp (RFC 3339, UTC: ordered as strings)."""
    ended: bool


def launcher_pod(body: Mapping[str, Any]) -> LauncherPod | None:
    """The launcher pod `body` is, or None: not labelled as one, no VMI as its controller,
    or not bound to a node yet (then it runs nowhere)."""
    meta = body.get("metadata") or {}
    if (meta.get("labels") or {}).get(APP_LABEL) != APP_VALUE:
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
        created=str(meta.get("creationTimestamp") or ""),
        ended=(body.get("status") or {}).get("phase") in ENDED,
    )


def pod_nodes(pods: Iterable[LauncherPod], vmi_uid: str | None) -> frozenset[str]:
    """The nodes the launcher pods of the VMI with `vmi_uid` hold it on (None: a VMI gtvp
    does not know: none): the newest running pod's, else every pod's. Pods of another VMI
    under the same name (another uid) never count."""
    if vmi_uid is None:
        return frozenset()
    own = [p for p in pods if p.vmi_uid == vmi_uid]
    newest = max((p.created for p in own if not p.ended), default=None)
    if newest is None:
        return frozenset(p.node for p in own)
    return frozenset(p.node for p in own if not p.ended and p.created == newest)
