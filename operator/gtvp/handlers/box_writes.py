"""What the box loop writes: a box's VirtualMachine, its status, and the deletions.

I/O only, each result put back into the cluster view (the next plan sees it before its watch
event). Deleting a box deletes its VM (the owner reference lets a cluster's garbage
collector do the same); VMs whose box is gone are swept after confirming with the API
server that the box really is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final, Literal

from kubernetes.client.exceptions import ApiException

from gtvp import kube
from gtvp.cluster_view import Key
from gtvp.core.api_resources import LAZY_BOXES, VIRTUAL_MACHINE_INSTANCES, VIRTUAL_MACHINES
from gtvp.core.boxes import someone_elses
from gtvp.core.trust import VM_LEVEL_LABEL
from gtvp.runtime import Runtime

log = logging.getLogger("gtvp.lazyboxes")


def _level_label(vm: Mapping[str, Any]) -> int:
    raw = str(((vm.get("metadata") or {}).get("labels") or {}).get(VM_LEVEL_LABEL, "0"))
    return int(raw) if raw.isdigit() else 9


WAITING_FOR_DELETION = (
    "waiting for its previous VirtualMachine to be deleted (KubeVirt holds it while its VMI "
    "shuts down) before writing the new one"
)


class _Terminating(Exception):
    """The box's VM of the name is being deleted (`write_vm` waits for it to go)."""


def write_vm(rt: Runtime, key: Key, vm: dict[str, Any]) -> bool:
    """Create or replace the box's VM; False (and the box Failed) when the API server
    refuses it."""
    current = rt.view.vms.get(key)
    if current is not None and _level_label(vm) < _level_label(current):
        # the admitted level sticks (the webhooks refuse lowering it on an update): a box
        # whose level went down gets a new VM, which restarts it
        log.info("box %s/%s: level lowered, its VirtualMachine is created anew", *key)
        try:
            kube.delete_if_present(rt.clients, VIRTUAL_MACHINES, key[1], key[0])
        except ApiException as exc:
            log.warning("box %s/%s: cannot delete its VirtualMachine: %s", *key, exc.reason)
        rt.view.vms.pop(key, None)
        current = None
    known = None if current is None else str(current["metadata"]["resourceVersion"])
    box_uid = str(((rt.view.boxes.get(key) or {}).get("metadata") or {}).get("uid", ""))

    def ours(found: Mapping[str, Any]) -> bool:
        if (found.get("metadata") or {}).get("deletionTimestamp"):
            raise _Terminating  # KubeVirt holds it while its VMI shuts down: not replaced
        return someone_elses(box_uid, found, None) is None

    try:
        if current is not None and (current.get("metadata") or {}).get("deletionTimestamp"):
            raise _Terminating
        out = kube.create_or_replace(
            rt.clients, VIRTUAL_MACHINES, vm, resource_version=known, ours=ours
        )
    except _Terminating:
        # created once it is gone (its DELETED event looks at the box again); replacing a
        # VM being deleted would be refused (a lowered level) or undone by its deletion
        log.info("box %s/%s: its VirtualMachine is still being deleted; written once gone", *key)
        before = (rt.view.boxes.get(key) or {}).get("status") or {}
        if before.get("message") != WAITING_FOR_DELETION:
            write_status(rt, key, {**before, "message": WAITING_FOR_DELETION})
        return False
    except kube.NotOurs as exc:
        # someone else's VM of the box's name, made since the view last saw none: left
        # alone, and the box's next plan fails it (VMNameTaken)
        log.warning("box %s/%s: a VirtualMachine of its name is not its own", *key)
        rt.view.vms[key] = exc.found
        rt.touch_boxes(key)
        return False
    except ApiException as exc:
        message = f"the API server refused the composed VirtualMachine: {exc.status} {exc.body}"
        log.error("box %s/%s: %s", *key, message)
        # the rest of the status stays (what the box resolved, the compositions gtvp vouches
        # for, its attestation): the status is written as a whole, missing keys removed
        before = (rt.view.boxes.get(key) or {}).get("status") or {}
        write_status(rt, key, {**before, "phase": "Failed", "message": message[:4000]})
        return False
    rt.view.vms[key] = out
    return True


def restart_vmi(rt: Runtime, key: Key) -> None:
    """Delete the box's VMI: its VM starts a new one (with the new boot)."""
    kube.delete_if_present(rt.clients, VIRTUAL_MACHINE_INSTANCES, key[1], key[0])


KEEP: Final = "keep"
"""`write_status(attestation=KEEP)`: `status.attestation` as the view holds it now."""


def write_status(
    rt: Runtime,
    key: Key,
    status: dict[str, Any],
    *,
    attestation: dict[str, Any] | Literal["keep"] | None = KEEP,
) -> None:
    """Merge-patch the box's status (nothing when unchanged; forgotten when it is gone).
    `status.attestation` is left as the view holds it now (`KEEP`), replaced by a fresh
    credential's (just armed) or removed (None: nothing gtvp composed runs under the
    box's name): the endpoint and the sweep write it, each with the resourceVersion it
    read, and a status planned on an older view must not undo what they wrote meanwhile
    (a quote judged a mismatch, an answered nonce)."""
    box = rt.view.boxes.get(key)
    if box is None:
        return
    held = (box.get("status") or {}).get("attestation")
    status = {k: v for k, v in status.items() if k != "attestation"}
    if attestation == KEEP:
        if held is not None:
            status["attestation"] = held
    elif attestation is not None:
        status["attestation"] = attestation
    patch = kube.merge_patch_for(box.get("status") or {}, status)
    if not patch:
        return
    out = kube.patch_status_if_present(rt.clients, LAZY_BOXES, key[1], patch, key[0])
    if out is None:
        rt.view.boxes.pop(key, None)
    else:
        rt.view.boxes[key] = out


def delete_vm(rt: Runtime, key: Key, box_uid: str) -> None:
    """The box (of that uid) is gone: delete its VM (and nothing else: a VM of its name
    that another box, or nobody, owns stays)."""
    vm = rt.view.vms.get(key)
    if vm is None:
        return
    owners = (vm.get("metadata") or {}).get("ownerReferences") or []
    if not any(o.get("kind") == LAZY_BOXES.kind and o.get("uid") == box_uid for o in owners):
        return
    rt.view.vms.pop(key, None)
    try:
        if kube.delete_if_present(rt.clients, VIRTUAL_MACHINES, key[1], key[0]):
            log.info("LazyBox %s/%s deleted: deleted its VirtualMachine", *key)
    except ApiException as exc:
        log.warning("cannot delete VM %s/%s: %s", *key, exc.reason)


def sweep_orphans(rt: Runtime) -> None:
    """Delete VMs of boxes that no longer exist (confirmed with the API server)."""
    for key, vm in list(rt.view.vms.items()):
        owners = [
            o
            for o in (vm.get("metadata") or {}).get("ownerReferences") or []
            if o.get("kind") == LAZY_BOXES.kind
        ]
        current = ((rt.view.boxes.get(key) or {}).get("metadata") or {}).get("uid")
        if not owners or current == owners[0].get("uid"):
            continue  # not a box's, or the box's own
        try:
            box = kube.get_if_present(rt.clients, LAZY_BOXES, owners[0]["name"], key[0])
        except ApiException:
            continue
        if box is not None and box["metadata"]["uid"] == owners[0].get("uid"):
            continue
        delete_vm(rt, key, str(owners[0].get("uid", "")))
