"""SIMULATION: a small stand-in for KubeVirt's virt-controller, for the local pool and tests.

No KubeVirt runs on a machine without a kubelet, so this process does the part of
virt-controller's job that gtvp observes, against KubeVirt's real CRDs on the real API
server: it creates a VirtualMachineInstance for each VirtualMachine that should run and
"schedules" it onto a Ready node that satisfies its nodeSelector and does not carry an
untolerated NoSchedule taint (as kube-scheduler would place the virt-launcher pod), and it
moves each VirtualMachineInstanceMigration through Pending → Scheduling → Scheduled →
Running → Succeeded (recording when it reached each phase in
`status.phaseTransitionTimestamps`, as virt-controller does), choosing a target node the
same way (VMI nodeSelector plus the migration's addedNodeSelector, never the source) and
then setting the VMI's node (and clearing `status.evacuationNodeName`, as virt-handler does
when a migration completes).

It also SIMULATES what KubeVirt's virt-api does on `kubectl drain`. Here a drain is a cordon:
kwok nodes run no virt-launcher pods, so `kubectl drain` has nothing to evict. For each VMI
on a cordoned (`spec.unschedulable`) node whose eviction strategy is External, LiveMigrate or
LiveMigrateIfPossible, the stand-in does what virt-api's pod-eviction webhook does when the
drain tries to evict that VMI's virt-launcher pod: it sets `status.evacuationNodeName` to
the node (and would refuse the eviction with 429). For LiveMigrate* VMIs it then creates a
migration as virt-controller's evacuation controller does (`kubevirt-evacuation-…`, annotated
`kubevirt.io/evacuationMigration`); External ones are left to an external controller (gtvp,
for the VMIs it gates). Uncordoning clears nothing: in KubeVirt the mark stays until the VMI
has migrated (or `virtctl evacuate-cancel`). Cordoned nodes receive no VMI and no migration
target (kube-scheduler's NodeUnschedulable rule).

With `--vms qemu` it also SIMULATES virt-handler/virt-launcher with real VMs
(`gtvp_local.vmruntime.launcher`): a VMI placed on a member runs as a qemu process in that
member's network namespace (a composed Lazy Box from its components, other VMIs a
tiny test guest), goes Scheduled → Running only when the guest prints GTVP-READY, Failed
with the console's last words when the VM ends; a migration is a qemu live migration to the
target member's namespace, Succeeded or Failed as qemu reports (the VM stays on the source
when it fails). Each member then has a component cache (`gtvp_local.vmruntime.cache`): a
composed box's member fetches the images it lacks over its own link before the VM starts
(in a worker thread, the VMI Scheduling meanwhile; a migration's target before the
migration), and the stand-in writes each member's `Node.status.images` from what its cache
holds, at startup and after each fetch: in place of a kubelet (SIMULATION), but
truthfully. A pre-fetch request gtvp writes on a migration's target Node
(`gtvp.io/prefetch`: image references per VMI, docs/lazyboxes.md) is acted on the same
way, in place of the kubelet pulling the images of a pre-pull pod: the member fetches the
images its cache lacks over its link in a worker thread (the stand-in's loop goes on), and
its `status.images` lists them once they are there. Without real VMs (`--vms phases`) the
requested images are simply added to the Node's `status.images` (no bytes move).

With `--launcher-pods` (or GTVP_VIRTSIM_LAUNCHER_PODS=1) it also keeps a virt-launcher pod
per placed VMI and serves virt-api's eviction webhook (`gtvp_local.launcherpods`): an
eviction of such a pod (the Eviction API, as the Kubernetes descheduler uses it) is refused
with 429 and marks the VMI's `status.evacuationNodeName`; a marked LiveMigrate VMI then gets
an evacuation migration whether or not its node is cordoned, as in KubeVirt.

It is named as a simulation wherever it appears, and the Helm chart never installs it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gtvp.core.api_resources import KUBEVIRT_API_VERSION, KUBEVIRT_GROUP, KUBEVIRT_VERSION
from gtvp.core.compose import preferred_node
from gtvp.core.prefetch import MAX_IMAGES, requests_on
from gtvp_local.launcherpods import EvictionWebhook, LauncherPods, NodeLoad
from gtvp_local.vmruntime import cache
from gtvp_local.vmruntime.launcher import Launcher, pool_mirror, vm_id

log = logging.getLogger("gtvp.virtsim")
KV = (KUBEVIRT_GROUP, KUBEVIRT_VERSION)
BANNER = "[SIMULATED virt-controller]"
API_BANNER = "[SIMULATED virt-api]"
HANDLER_BANNER = "[SIMULATED virt-handler]"
KUBELET_BANNER = "[SIMULATED kubelet]"
SLOW_LINK_ANNOTATION = "gtvp.io/simulated-link-bytes-per-second"
"""On a migration, with --vms qemu: the member link's speed for it (a slow link, so that a
test can watch, or break, a migration in flight). A knob of the simulation only."""
MARKED_ON_EVICTION = ("External", "LiveMigrate", "LiveMigrateIfPossible")
EVACUATION_ANNOTATION = "kubevirt.io/evacuationMigration"


def node_fits(
    node: Mapping[str, Any],
    selector: Mapping[str, str],
    tolerations: Sequence[Mapping[str, Any]] = (),
) -> bool:
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    if any(labels.get(k) != v for k, v in selector.items()):
        return False
    if (node.get("spec") or {}).get("unschedulable"):
        return False  # cordoned: kube-scheduler places no pod there
    conditions = (node.get("status") or {}).get("conditions") or []
    if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
        return False
    tolerated = {t.get("key") for t in tolerations}
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and taint.get("key") not in tolerated:
            return False
    return True


def choose_node(
    nodes: Sequence[Mapping[str, Any]],
    selector: Mapping[str, str],
    tolerations: Sequence[Mapping[str, Any]],
    exclude: str | None,
    load: NodeLoad,
    *,
    vmi: Mapping[str, Any],
    preferred: str | None = None,
) -> str | None:
    """The node kube-scheduler would bind `vmi`'s pod to (`NodeLoad`: where it fits, the
    least loaded), or None."""
    fits = [
        n["metadata"]["name"]
        for n in nodes
        if n["metadata"]["name"] != exclude
        and node_fits(n, selector, tolerations)
        and load.fits(n["metadata"]["name"], vmi)
    ]
    if not fits:
        return None
    if preferred in fits:  # a preferred node affinity, as kube-scheduler weighs it
        return preferred
    best: str = min(fits, key=lambda n: (load.score(n), n))
    return best


def unschedulable_message(
    nodes: Sequence[Mapping[str, Any]],
    selector: Mapping[str, str],
    tolerations: Sequence[Mapping[str, Any]],
    load: NodeLoad,
    *,
    vmi: Mapping[str, Any],
) -> str:
    """Why no node takes `vmi`'s pod, as kube-scheduler says it in the pod's `PodScheduled`
    condition (which KubeVirt copies onto the VMI): each node's first failing rule, counted."""
    counts: dict[str, int] = {}
    for n in nodes:
        name = n["metadata"]["name"]
        if not node_fits(n, selector, ()):
            why = "node(s) didn't match Pod's node affinity/selector"
            if (n.get("spec") or {}).get("unschedulable"):
                why = "node(s) were unschedulable"
        elif not node_fits(n, selector, tolerations):
            why = "node(s) had untolerated taint"
        elif not load.fits(name, vmi):
            why = "Insufficient cpu or memory"
        else:
            continue
        counts[why] = counts.get(why, 0) + 1
    listed = ", ".join(f"{c} {why}" for why, c in sorted(counts.items()))
    return f"0/{len(nodes)} nodes are available: {listed}. (simulated)"


VIEW_EVERY_S = 1.0  # how often the stand-in re-reads Members, policies and OSComponents


def chunk_plans(
    components: Sequence[Mapping[str, Any]], publisher_keys: Mapping[str, str]
) -> dict[str, cache.ChunkPlan]:
    """The chunk lists by image of the OSComponents gtvp verified (`status.verification`,
    which only the operator writes: the enforced policy's keys and each publisher's scope)
    and whose signature verifies here too (an unsigned or unreadable chunk list is never
    used). An image digest two such components describe differently (one of them with no
    list at all, say), under one image name or several, gets no list: a cache names a file
    by its digest, so a publisher allowed to sign one application could otherwise sign a
    component that names the kernel's digest (in its own repository) with a chunk list of
    its own, and have members fetch (and serve) its bytes as the kernel's."""
    from gtvp.core.component_signing import ComponentSignatureError, verify
    from gtvp.core.components import ComponentError, parse_component

    plans: dict[str, cache.ChunkPlan | None] = {}
    by_digest: dict[str, cache.ChunkPlan | None] = {}  # a cache names a file by its digest
    disputed: set[str] = set()
    for obj in components:
        state = ((obj.get("status") or {}).get("verification") or {}).get("state")
        if state != "Verified":
            continue
        try:
            verify(obj.get("spec") or {}, publisher_keys)
            c = parse_component(obj)
        except (ComponentSignatureError, ComponentError):
            continue
        if "@sha256:" not in c.image:
            continue
        plan = None  # a component without a list says so too: none, or the other's
        if c.chunks is not None:
            whole = None if c.disk_digest is not None else c.digest
            plan = cache.ChunkPlan(c.chunks.size_bytes, c.chunks.digests, c.size, whole)
        plans.setdefault(c.image, plan)
        digest = cache.digest_hex(c.image)
        if by_digest.setdefault(digest, plan) != plan:
            disputed.add(digest)
    for digest in sorted(disputed):
        log.warning(
            "%s: verified OSComponents describe the image sha256:%s differently (under one "
            "name or several): it is fetched whole from the component store",
            BANNER,
            digest,
        )
    return {i: p for i, p in plans.items() if p is not None and cache.digest_hex(i) not in disputed}


def trusted_members(members: Sequence[Mapping[str, Any]]) -> frozenset[str]:
    return frozenset(
        str(m["metadata"]["name"])
        for m in members
        if (m.get("status") or {}).get("phase") == "Trusted"
    )


def cordoned_nodes(nodes: Sequence[Mapping[str, Any]]) -> set[str]:
    """The Nodes marked unschedulable (`kubectl cordon`, the first step of a drain)."""
    return {n["metadata"]["name"] for n in nodes if (n.get("spec") or {}).get("unschedulable")}


def migrating_vmis(migrations: Sequence[Mapping[str, Any]]) -> set[tuple[str, Any]]:
    """(namespace, VMI name) of every migration still in flight."""
    return {
        (m["metadata"]["namespace"], (m.get("spec") or {}).get("vmiName"))
        for m in migrations
        if (m.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    }


class VirtSim:
    def __init__(
        self,
        api: Any,
        core: Any,
        step_delay: float = 0.3,
        launcher: Launcher | None = None,
        pods: LauncherPods | None = None,
    ) -> None:
        self.pods = pods  # virt-launcher pods per placed VMI (None: no pods)
        self.api = api
        self.core = core
        self.delay = step_delay
        self.last_step: dict[str, float] = {}
        self.launcher = launcher
        self.refused: set[tuple[str, str, tuple[str, ...]]] = set()  # pre-fetches refused
        self.pulling: dict[tuple[str, str], str] = {}  # VMIs whose member fetches their images
        self.viewed = 0.0
        """With a launcher (`--vms qemu`), VMIs run as real VMs and migrations are real
        live migrations (gtvp_local.vmruntime.launcher); without, phases only."""

    def _list(self, plural: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.api.list_cluster_custom_object(*KV, plural)["items"]
        return items

    def _gtvp(self, plural: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.api.list_cluster_custom_object(
            "gtvp.io", "v1alpha1", plural
        )["items"]
        return items

    def _view(self, launcher: Launcher) -> None:
        """Tell the launcher who is Trusted (Members' phase) and the signed chunk lists
        (OSComponents verified against the SecurityPolicies' publisher keys)."""
        if time.monotonic() - self.viewed < VIEW_EVERY_S:
            return
        self.viewed = time.monotonic()
        try:
            self._read_view(launcher)
        except Exception as exc:  # noqa: BLE001 - no view: the mirror path stands
            log.warning("%s could not read Members or OSComponents: %s", BANNER, exc)

    def _read_view(self, launcher: Launcher) -> None:
        keys = {
            str(pk.get("name", "")): str(pk.get("publicKey", ""))
            for p in self._gtvp("securitypolicies")
            for pk in (p.get("spec") or {}).get("publisherKeys") or []
        }
        launcher.set_view(
            trusted_members(self._gtvp("members")), chunk_plans(self._gtvp("oscomponents"), keys)
        )

    def tick(self) -> None:
        if self.launcher is not None:
            self._view(self.launcher)
            self._report_caches(self.launcher)
        # to_dict() is snake_case; every field read here is a single word, so it is the same
        nodes = [n.to_dict() for n in self.core.list_node().items]
        if self.launcher is not None:
            self._serve_prefetches(self.launcher, nodes)
        else:
            self._pull_requested(nodes)
        vms = self._list("virtualmachines")
        vmis = {
            (i["metadata"]["namespace"], i["metadata"]["name"]): i
            for i in self._list("virtualmachineinstances")
        }
        migrations = self._list("virtualmachineinstancemigrations")
        load = self._loads(vmis, nodes, migrations)
        for vm in vms:
            self._reconcile_vm(vm, vmis, nodes, load)
        present = {(v["metadata"]["namespace"], v["metadata"]["name"]) for v in vms}
        for key, vmi in list(vmis.items()):
            owners = (vmi.get("metadata") or {}).get("ownerReferences") or []
            if any(o.get("kind") == "VirtualMachine" for o in owners) and key not in present:
                # what the garbage collector does once a VM is gone
                self.api.delete_namespaced_custom_object(
                    *KV, key[0], "virtualmachineinstances", key[1]
                )
                log.info(
                    "%s deleted VMI %s/%s: its VM is gone (as the garbage collector would)",
                    BANNER,
                    *key,
                )
                del vmis[key]
        for vmi in vmis.values():
            if (vmi.get("status") or {}).get("phase") in (None, "", "Pending", "Scheduling"):
                self._schedule_vmi(vmi, nodes, load)
        if self.launcher is not None:
            self._follow_vms(self.launcher, vmis)
        self._simulate_drains(nodes, vmis, migrations)
        self._evacuate_marked(nodes, vmis, migrations)
        for mig in migrations:
            self._advance_migration(mig, vmis, nodes, load)
        self._sync_pods()

    def _loads(
        self,
        vmis: Mapping[tuple[str, str], Any],
        nodes: Sequence[Mapping[str, Any]],
        migrations: Sequence[Mapping[str, Any]],
    ) -> NodeLoad:
        """What the stand-in places by: VMIs per node, or with launcher pods the requests
        of the VMIs there and migrating there, as kube-scheduler counts pods (`NodeLoad`)."""
        if self.pods is not None:
            return NodeLoad.of_requests(vmis.values(), nodes, migrations)
        return NodeLoad.of_counts(vmis.values())

    def _sync_pods(self) -> None:
        """With launcher pods: one per placed VMI (VMIs listed again: placed or landed
        during this tick)."""
        if self.pods is not None:
            self.pods.sync(self._list("virtualmachineinstances"))

    def _evacuate_marked(
        self,
        nodes: Sequence[Mapping[str, Any]],
        vmis: Mapping[tuple[str, str], Any],
        migrations: Sequence[Mapping[str, Any]],
    ) -> None:
        """SIMULATION of virt-controller's evacuation controller: a Running LiveMigrate*
        VMI marked by an eviction (status.evacuationNodeName) on a node that is not
        cordoned (those are `_simulate_drains`'s) without a migration in flight gets one;
        External ones are left to their controller."""
        if self.pods is None:
            return
        cordoned = cordoned_nodes(nodes)
        migrating = migrating_vmis(migrations)
        for key, vmi in vmis.items():
            status, spec = vmi.get("status") or {}, vmi.get("spec") or {}
            node = status.get("evacuationNodeName")
            if not node or status.get("phase") != "Running" or key in migrating:
                continue
            if node in cordoned:
                continue
            live = spec.get("evictionStrategy") in ("LiveMigrate", "LiveMigrateIfPossible")
            if live and node == status.get("nodeName"):
                self._evacuation_migration(key, str(node))

    def _simulate_drains(
        self,
        nodes: Sequence[Mapping[str, Any]],
        vmis: Mapping[tuple[str, str], Any],
        migrations: Sequence[Mapping[str, Any]],
    ) -> None:
        """SIMULATION of `kubectl drain` meeting virt-api's pod-eviction webhook (and, for
        LiveMigrate, virt-controller's evacuation controller) on cordoned nodes."""
        cordoned = cordoned_nodes(nodes)
        if not cordoned:
            return
        migrating = migrating_vmis(migrations)
        for key, vmi in vmis.items():
            status, spec = vmi.get("status") or {}, vmi.get("spec") or {}
            node = status.get("nodeName")
            strategy = spec.get("evictionStrategy")
            if node not in cordoned or status.get("phase") != "Running":
                continue
            if strategy not in MARKED_ON_EVICTION:
                continue
            if not status.get("evacuationNodeName"):
                self.api.patch_namespaced_custom_object(
                    *KV,
                    key[0],
                    "virtualmachineinstances",
                    key[1],
                    {"status": {"evacuationNodeName": node}},
                )
                log.info(
                    "%s drain of %s: eviction of the virt-launcher pod of VMI %s/%s refused "
                    "(429), status.evacuationNodeName=%s (evictionStrategy %s)",
                    API_BANNER,
                    node,
                    *key,
                    node,
                    strategy,
                )
            if strategy != "External" and key not in migrating:
                self._evacuation_migration(key, str(node))

    def _evacuation_migration(self, key: tuple[str, str], node: str) -> None:
        """SIMULATION of virt-controller's evacuation controller for LiveMigrate VMIs."""
        body = {
            "apiVersion": KUBEVIRT_API_VERSION,
            "kind": "VirtualMachineInstanceMigration",
            "metadata": {
                "generateName": "kubevirt-evacuation-",
                "annotations": {EVACUATION_ANNOTATION: node},
            },
            "spec": {"vmiName": key[1]},
        }
        created = self.api.create_namespaced_custom_object(
            *KV, key[0], "virtualmachineinstancemigrations", body
        )
        log.info(
            "%s evacuation of %s: migration %s/%s for VMI %s",
            BANNER,
            node,
            key[0],
            created["metadata"]["name"],
            key[1],
        )

    def _reconcile_vm(
        self,
        vm: Mapping[str, Any],
        vmis: Mapping[tuple[str, str], Any],
        nodes: Sequence[Mapping[str, Any]],
        load: NodeLoad,
    ) -> None:
        meta, spec = vm["metadata"], vm.get("spec") or {}
        key = (meta["namespace"], meta["name"])
        should_run = spec.get("running") is True or spec.get("runStrategy") in (
            "Always",
            "RerunOnFailure",
        )
        if should_run and key not in vmis:
            tmpl = spec.get("template") or {}
            body = {
                "apiVersion": KUBEVIRT_API_VERSION,
                "kind": "VirtualMachineInstance",
                "metadata": {
                    "name": meta["name"],
                    "namespace": meta["namespace"],
                    "labels": dict((tmpl.get("metadata") or {}).get("labels") or {}),
                    "annotations": dict((tmpl.get("metadata") or {}).get("annotations") or {}),
                    "ownerReferences": [
                        {
                            "apiVersion": KUBEVIRT_API_VERSION,
                            "kind": "VirtualMachine",
                            "name": meta["name"],
                            "uid": meta["uid"],
                            "controller": True,
                        }
                    ],
                },
                "spec": tmpl.get("spec") or {"domain": {"devices": {}}},
            }
            created = self.api.create_namespaced_custom_object(
                *KV, meta["namespace"], "virtualmachineinstances", body
            )
            log.info("%s created VMI %s/%s", BANNER, *key)
            self._schedule_vmi(created, nodes, load)
        elif not should_run and key in vmis:
            self.api.delete_namespaced_custom_object(
                *KV, meta["namespace"], "virtualmachineinstances", meta["name"]
            )
            log.info("%s stopped VMI %s/%s", BANNER, *key)

    def _follow_vms(self, launcher: Launcher, vmis: Mapping[tuple[str, str], Any]) -> None:
        """SIMULATED virt-handler: a VMI is Running once its guest said GTVP-READY, Failed
        when its VM ended (with the console's last words); VMs whose VMI is gone stop."""
        for (ns, name), vmi in vmis.items():
            phase = (vmi.get("status") or {}).get("phase")
            if phase not in ("Scheduled", "Running"):
                continue
            ended = launcher.ended(ns, name)
            if ended is not None:
                status: dict[str, Any] = {"phase": "Failed", "reason": ended}
            elif phase == "Scheduled" and launcher.ready(ns, name):
                status = {"phase": "Running"}
            else:
                continue
            self.api.patch_namespaced_custom_object(
                *KV, ns, "virtualmachineinstances", name, {"status": status}
            )
            log.info("%s VMI %s/%s: %s %s", HANDLER_BANNER, ns, name, status["phase"],
                     status.get("reason", "(the guest said GTVP-READY)"))  # fmt: skip
        # listed again: VMIs created during this tick have their VMs already
        present = {
            vm_id(i["metadata"]["namespace"], i["metadata"]["name"])
            for i in self._list("virtualmachineinstances")
        }
        for vm in launcher.known() - present:
            launcher.stop_vm(vm)

    def _serve_prefetches(self, launcher: Launcher, nodes: Sequence[Mapping[str, Any]]) -> None:
        """SIMULATED kubelet pulling a pre-pull pod's images: each request on a Node whose
        member's cache lacks some of its images starts a fetch in a worker thread. Only
        references that pin a sha256 digest are fetched (the mirror serves by digest)."""
        for node in nodes:
            member = str((node.get("metadata") or {}).get("name", ""))
            for vmi, request in sorted(requests_on(node).items()):
                images = list(request.images[:MAX_IMAGES])
                try:
                    lacking = cache.missing(images, cache.held(launcher.runtime.state, member))
                except ValueError as exc:  # a reference without a digest: nothing to fetch
                    said = (member, vmi, request.images)
                    if said not in self.refused:  # once, not every tick
                        self.refused.add(said)
                        log.warning("%s node %s: pre-fetch for %s refused: %s",
                                    KUBELET_BANNER, member, vmi, exc)  # fmt: skip
                    continue
                if lacking:
                    launcher.prefetch(member, lacking, vmi)

    def _pull_requested(self, nodes: Sequence[Mapping[str, Any]]) -> None:
        """Without real VMs (no component cache): the kubelet's pull of a pre-fetch request
        is SIMULATED by adding the requested images to the Node's status.images at once
        (the sizes the request names; no bytes move)."""
        for node in nodes:
            status = node.get("status") or {}
            listed: list[dict[str, Any]] = [  # to_dict() spells it size_bytes
                {"names": list(i.get("names") or []), "sizeBytes": int(i.get("size_bytes") or 0)}
                for i in status.get("images") or []
            ]
            have = {str(n) for i in listed for n in (i.get("names") or [])}
            added = []
            for request in requests_on(node).values():
                sizes = request.sizes or (0,) * len(request.images)
                for image, size in zip(request.images[:MAX_IMAGES], sizes, strict=False):
                    if "@sha256:" in image and image not in have:
                        have.add(image)
                        added.append({"names": [image], "sizeBytes": size})
            if not added:
                continue
            name = str((node.get("metadata") or {}).get("name", ""))
            self.core.patch_node_status(
                name,
                {"status": {"images": listed + added}},
                _content_type="application/merge-patch+json",
            )
            log.info("%s node %s: pulled %d pre-fetch image(s) (simulated: no bytes moved)",
                     KUBELET_BANNER, name, len(added))  # fmt: skip

    def _report_caches(self, launcher: Launcher) -> None:
        """SIMULATED kubelet: each member whose component cache changed (or that was not
        reported yet) gets `status.images` from what its cache holds."""
        from kubernetes.client.rest import ApiException

        for member in launcher.changed_caches():
            images = launcher.node_images(member)
            try:
                self.core.patch_node_status(
                    member,
                    {"status": {"images": images}},
                    _content_type="application/merge-patch+json",
                )
            except ApiException as exc:
                if exc.status != 404:  # no Node (yet): nothing to report on
                    launcher.cache_changed(member)  # again next tick
                    log.warning("%s node %s: status.images not written: %s",
                                KUBELET_BANNER, member, exc.reason)  # fmt: skip
                continue
            log.info("%s node %s: status.images from its component cache: %d images, %d bytes",
                     KUBELET_BANNER, member, len(images),
                     sum(i["sizeBytes"] for i in images))  # fmt: skip

    def _schedule_vmi(
        self, vmi: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]], load: NodeLoad
    ) -> None:
        meta, spec = vmi["metadata"], vmi.get("spec") or {}
        key = (meta["namespace"], meta["name"])
        node = self.pulling.get(key) or choose_node(
            nodes,
            spec.get("nodeSelector") or {},
            spec.get("tolerations") or [],
            None,
            load,
            vmi=vmi,
            preferred=preferred_node(spec),
        )
        status: dict[str, Any]
        if node is None:  # KubeVirt copies the launcher pod's PodScheduled condition
            why = unschedulable_message(
                nodes,
                spec.get("nodeSelector") or {},
                spec.get("tolerations") or [],
                load,
                vmi=vmi,
            )
            condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
            status = {"phase": "Scheduling", "conditions": [{**condition, "message": why}]}
        elif self.launcher is not None:
            load.commit(node, vmi)
            try:
                if not self.launcher.prepare(meta["namespace"], meta["name"], node, spec):
                    self._pulling(vmi, node)  # the member fetches in a worker thread
                    return
                self.pulling.pop(key, None)
                self.launcher.start(meta["namespace"], meta["name"], node, spec)
                status = {"phase": "Scheduled", "nodeName": node}
                log.info("%s VMI %s/%s: a VM starts on %s", HANDLER_BANNER, meta["namespace"],
                         meta["name"], node)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - any reason the VM cannot start is its status
                self.pulling.pop(key, None)
                status = {"phase": "Failed", "nodeName": node, "reason": f"cannot start: {exc}"}
                log.warning("%s VMI %s/%s cannot start on %s: %s", HANDLER_BANNER,
                            meta["namespace"], meta["name"], node, exc)  # fmt: skip
            self._report_caches(self.launcher)  # what the member fetched, before the phase
        else:
            load.commit(node, vmi)
            status = {"phase": "Running", "nodeName": node}
            log.info("%s VMI %s/%s runs on %s", BANNER, meta["namespace"], meta["name"], node)
        old = vmi.get("status") or {}
        if node is not None and old.get("conditions"):
            status["conditions"] = []  # scheduled: no longer Unschedulable
        # placed: always written; still waiting: only when the phase or the reason changed
        if (
            node
            or old.get("phase") != status["phase"]
            or old.get("conditions") != status.get("conditions")
        ):
            self.api.patch_namespaced_custom_object(
                *KV, meta["namespace"], "virtualmachineinstances", meta["name"], {"status": status}
            )

    def _pulling(self, vmi: Mapping[str, Any], node: str) -> None:
        """The VMI waits (Scheduling) while its member fetches its images: it keeps that
        member (as a pod bound to a node waits for its image pulls); said once."""
        meta = vmi["metadata"]
        key = (meta["namespace"], meta["name"])
        reason = f"{node} is fetching the VM's images (simulated kubelet pull)"
        first = key not in self.pulling
        self.pulling[key] = node
        if (vmi.get("status") or {}).get("reason") == reason and not first:
            return
        self.api.patch_namespaced_custom_object(
            *KV,
            meta["namespace"],
            "virtualmachineinstances",
            meta["name"],
            {"status": {"phase": "Scheduling", "reason": reason, "conditions": []}},
        )  # bound to a node: no longer Unschedulable, if it was
        log.info("%s VMI %s/%s: %s", KUBELET_BANNER, *key, reason)

    def _advance_migration(
        self,
        mig: Mapping[str, Any],
        vmis: Mapping[tuple[str, str], Any],
        nodes: Sequence[Mapping[str, Any]],
        load: NodeLoad,
    ) -> None:
        meta, spec = mig["metadata"], mig.get("spec") or {}
        status = dict(mig.get("status") or {})
        phase = status.get("phase") or ""
        if phase in ("Succeeded", "Failed"):
            return
        uid = meta["uid"]
        if time.monotonic() - self.last_step.get(uid, 0.0) < self.delay:
            return
        self.last_step[uid] = time.monotonic()
        vmi = vmis.get((meta["namespace"], spec.get("vmiName", "")))
        state = dict(status.get("migrationState") or {})
        stamps = list(status.get("phaseTransitionTimestamps") or [])

        def write(new_phase: str, **fields: Any) -> None:
            state.update(fields)
            body: dict[str, Any] = {"phase": new_phase, "migrationState": state}
            if new_phase != phase:  # as virt-controller records each phase it reaches
                at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                stamps.append({"phase": new_phase, "phaseTransitionTimestamp": at})
                body["phaseTransitionTimestamps"] = stamps
            self.api.patch_namespaced_custom_object_status(
                *KV,
                meta["namespace"],
                "virtualmachineinstancemigrations",
                meta["name"],
                {"status": body},
            )

            log.info(
                "%s migration %s/%s: %s %s",
                BANNER,
                meta["namespace"],
                meta["name"],
                new_phase,
                state.get("targetNode") or "",
            )

        if vmi is None:
            write("Failed", failed=True, failureReason="VMI not found (simulated)")
            return
        source = (vmi.get("status") or {}).get("nodeName")
        if phase in ("", "Pending"):
            write("Scheduling", sourceNode=source)
        elif phase == "Scheduling":
            vspec = vmi.get("spec") or {}
            selector = {
                **(vspec.get("nodeSelector") or {}),
                **(spec.get("addedNodeSelector") or {}),
            }
            target = choose_node(
                nodes, selector, vspec.get("tolerations") or [], source, load, vmi=vmi
            )
            if target is not None:
                load.commit(target, vmi)  # its target pod, for the next decision of this tick
                write("Scheduled", targetNode=target, sourceNode=source)
        elif phase == "Scheduled":
            if self.launcher is not None:  # a real live migration, in a worker thread
                slow = (meta.get("annotations") or {}).get(SLOW_LINK_ANNOTATION)
                vspec = vmi.get("spec") or {}
                self.launcher.migrate(
                    meta["namespace"],
                    spec["vmiName"],
                    state["targetNode"],
                    max_bandwidth=int(slow) if slow and slow.isdigit() else None,
                    vmi_spec=vspec,
                )
            write("Running")
        elif phase == "Running" and self.launcher is not None:
            self._real_migration(self.launcher, vmi, source, state, write)
        elif phase == "Running":
            self._land(vmi, source, state.get("targetNode"))
            write("Succeeded", completed=True)

    def _real_migration(
        self,
        launcher: Launcher,
        vmi: Mapping[str, Any],
        source: str | None,
        state: Mapping[str, Any],
        write: Any,
    ) -> None:
        """Follow qemu's migration: Succeeded (the VMI lands on the target) or Failed (it
        keeps running on the source, qemu's reason in failureReason)."""
        ns, name = vmi["metadata"]["namespace"], vmi["metadata"]["name"]
        future = launcher.migrate(ns, name, state["targetNode"])
        if not future.done():
            return
        launcher.finish_migration(ns, name)
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - the VM was not there to migrate
            write("Failed", failed=True, failureReason=f"not migrated: {exc}")
            return
        log.info(
            "%s migration of %s/%s to %s: %s in %.0f ms, downtime %s ms, %d bytes on the link%s",
            HANDLER_BANNER, ns, name, result.target, result.status, result.total_ms,
            result.downtime_ms, result.link_bytes, f" ({result.reason})" if result.reason else "",
        )  # fmt: skip
        if result.completed:
            self._land(vmi, source, state.get("targetNode"))
            write("Succeeded", completed=True)
        else:
            write("Failed", failed=True, failureReason=result.reason or "qemu failed")

    def _land(self, vmi: Mapping[str, Any], source: str | None, target: str | None) -> None:
        """The migration completed: the VMI runs on the target. virt-handler on the target
        also clears `status.evacuationNodeName` then (the drain mark)."""
        vmeta = vmi["metadata"]
        state = {"sourceNode": source, "targetNode": target, "completed": True}
        self.api.patch_namespaced_custom_object(
            *KV,
            vmeta["namespace"],
            "virtualmachineinstances",
            vmeta["name"],
            {"status": {"nodeName": target, "evacuationNodeName": None, "migrationState": state}},
        )


def _launcher(state: Path, core: Any) -> Launcher:
    """Real VMs: members fetch the boxes' images from the pool's registry mirror (its
    component store, else the component artifacts built here); a VMI's cloud-init user data
    in a Secret (`cloudInitNoCloud.secretRef`) is read through the API, as virt-launcher's
    cloud-init does."""
    from gtvp_local.vmruntime import runtime
    from gtvp_local.vmruntime.launcher import secret_reader

    launcher = Launcher(state, pool_mirror(state), read_secret=secret_reader(core))
    accel = launcher.runtime.accel(runtime.guest_spec())
    log.info("%s VMs run under qemu (%s), one network namespace per member", HANDLER_BANNER, accel)
    return launcher


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gtvp-virtsim", description=__doc__)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--interval", type=float, default=0.25)
    p.add_argument(
        "--vms",
        choices=("phases", "qemu"),
        default="phases",
        help="phases: VMIs and migrations only move through their phases; qemu: each VMI "
        "runs as a VM in its member's network namespace, migrations are live migrations",
    )
    p.add_argument("--state", type=Path, help="with --vms qemu: the runtime's state directory")
    p.add_argument(
        "--launcher-pods",
        action="store_true",
        default=os.environ.get("GTVP_VIRTSIM_LAUNCHER_PODS") == "1",
        help="keep a virt-launcher pod per placed VMI and turn its eviction into a live "
        "migration (virt-api's eviction webhook; gtvp_local.launcherpods)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from kubernetes import client, config

    if args.vms == "qemu" and args.state is None:
        p.error("--vms qemu needs --state")
    api_client = config.new_client_from_config(config_file=args.kubeconfig)
    api, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    launcher = _launcher(args.state, core) if args.vms == "qemu" else None
    pods = None
    if args.launcher_pods:
        pki_dir = (args.state or Path(tempfile.mkdtemp(prefix="gtvp-virtsim-"))) / "virt-api-pki"
        EvictionWebhook(api, core, pki_dir).start()
        pods = LauncherPods(core)
    sim = VirtSim(api, core, launcher=launcher, pods=pods)
    log.info("%s started: a SIMULATION of KubeVirt's virt-controller for the local pool", BANNER)
    while True:
        try:
            sim.tick()
        except Exception as exc:  # noqa: BLE001 - a simulator keeps going through API hiccups
            log.warning("%s tick failed: %s", BANNER, exc)
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
