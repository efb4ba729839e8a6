"""SIMULATION: KubeVirt's virt-launcher pods, and virt-api's eviction interceptor.

For the local pool (`gtvp_local.virtsim --launcher-pods`), so that tools which act on pods,
such as the Kubernetes descheduler, see the VMs as KubeVirt shows them:

- **A pod per VMI.** For each VMI placed on a node (status.nodeName, phase Scheduled or
  Running) the stand-in keeps one `virt-launcher-<vmi>-xxxxx` pod bound to that node: labels
  `kubevirt.io=virt-launcher`, `kubevirt.io/created-by=<VMI uid>` and `vm.kubevirt.io/name`,
  an ownerReference to the VMI, the VMI's nodeSelector and tolerations, one `compute`
  container whose requests are what KubeVirt asks for the VMI (`gtvp.core.footprint`: its
  requests, else its limits, else the guest memory and 100m per vCPU), and status
  Running as a kubelet would report (kwok runs the Nodes but is not asked to run pods).
  When a migration lands (the VMI's node changes) a pod is created on the target and the
  source's is deleted; a VMI that is gone loses its pod (the garbage collector's job; none
  runs here). Like KubeVirt the pods carry `descheduler.alpha.kubernetes.io/request-evict-only`,
  so a descheduler with `EvictionsInBackground` counts an eviction that started a migration.
- **Eviction becomes a live migration.** A validating admission webhook on
  `pods/eviction` CREATE (what virt-api registers, `virt-launcher-eviction-interceptor`)
  is served over HTTPS by the stand-in on a loopback port, with its own CA (the
  ValidatingWebhookConfiguration's caBundle). An eviction of a virt-launcher pod whose VMI's
  evictionStrategy is External, LiveMigrate or LiveMigrateIfPossible is refused with 429
  ("Eviction triggered evacuation of VMI ...") and the VMI gets `status.evacuationNodeName`
  = the pod's node; the stand-in's evacuation path (virtsim) then creates the migration for
  LiveMigrate* VMIs, and gtvp does for External ones it gates. Any other pod's eviction,
  and the eviction of a pod whose VMI is already marked, is answered as virt-api does
  (allowed, respectively 429 again without a second mark).

How it differs from KubeVirt: the pods run nothing (no kubelet; the VM, when there is one, is
a qemu process of `gtvp_local.vmruntime`); during a migration KubeVirt already runs the
target pod while here it appears when the migration lands (its requests count at the target
for the stand-in's own placement decisions from the moment a target is chosen, `NodeLoad`);
no PodDisruptionBudget is created (current KubeVirt relies on the webhook too; the
API server runs admission before any PDB check, so a PDB would change nothing here); and the
webhook looks the pod and the VMI up in the API server on each call instead of an informer.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gtvp.core.api_resources import KUBEVIRT_API_VERSION, KUBEVIRT_GROUP, KUBEVIRT_VERSION
from gtvp.core.footprint import vmi_requests
from gtvp.core.launchers import APP_LABEL, APP_VALUE
from gtvp.core.quantity import cpu_quantity, memory_quantity

log = logging.getLogger("gtvp.virtsim.pods")
OWN_PODS = f"{APP_LABEL}={APP_VALUE}"
"""The stand-in's own launcher pods (gtvp's view counts any value of the label)."""
KV = (KUBEVIRT_GROUP, KUBEVIRT_VERSION)
API_BANNER = "[SIMULATED virt-api]"
KUBELET_BANNER = "[SIMULATED kubelet]"
CREATED_BY = "kubevirt.io/created-by"
VM_NAME_LABEL = "vm.kubevirt.io/name"
EVICT_ONLY = "descheduler.alpha.kubernetes.io/request-evict-only"
EVACUATING = ("External", "LiveMigrate", "LiveMigrateIfPossible")
WEBHOOK_NAME = "virt-launcher-eviction-interceptor.kubevirt.io"
WEBHOOK_CONFIG = "gtvp-simulated-virt-api-eviction"
EVICTION_MESSAGE = "Eviction triggered evacuation of VMI"
"""The text descheduler's EvictionsInBackground looks for in the 429 (as virt-api says it)."""


@dataclass(frozen=True)
class PodPlan:
    """What to change so that every placed VMI has exactly one pod, on its node."""

    create: tuple[Mapping[str, Any], ...]  # VMIs that need a pod on their node
    delete: tuple[tuple[str, str], ...]  # (namespace, pod name)


def placed(vmi: Mapping[str, Any]) -> str | None:
    """The node a VMI's launcher pod belongs on (None: it has no pod)."""
    status = vmi.get("status") or {}
    node = status.get("nodeName")
    if node and status.get("phase") in ("Scheduled", "Running"):
        return str(node)
    return None


def plan_pods(vmis: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]]) -> PodPlan:
    """Pure: pods to create (one per placed VMI without a live pod on its node) and to
    delete (a pod whose VMI is gone, not placed, or on another node; duplicates)."""
    want = {str(v["metadata"]["uid"]): v for v in vmis if placed(v)}
    kept: set[str] = set()
    delete: list[tuple[str, str]] = []
    for pod in sorted(pods, key=lambda p: str(p["metadata"]["name"])):
        meta = pod["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        uid = str((meta.get("labels") or {}).get(CREATED_BY, ""))
        vmi = want.get(uid)
        node = (pod.get("spec") or {}).get("nodeName")
        if vmi is None or node != placed(vmi) or uid in kept:
            delete.append((str(meta["namespace"]), str(meta["name"])))
        else:
            kept.add(uid)
    create = tuple(v for uid, v in sorted(want.items()) if uid not in kept)
    return PodPlan(create, tuple(delete))


def launcher_pod(vmi: Mapping[str, Any]) -> dict[str, Any]:
    """The virt-launcher pod of a placed VMI, as KubeVirt's virt-controller creates it (the
    parts a scheduler or descheduler reads)."""
    meta, spec = vmi["metadata"], vmi.get("spec") or {}
    cpu, memory = vmi_requests(vmi)  # KubeVirt's defaults where the VMI requests nothing
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"virt-launcher-{meta['name']}-",
            "namespace": meta["namespace"],
            "labels": {
                APP_LABEL: APP_VALUE,
                CREATED_BY: meta["uid"],
                VM_NAME_LABEL: meta["name"],
            },
            "annotations": {EVICT_ONLY: "", "kubevirt.io/domain": meta["name"]},
            "ownerReferences": [
                {
                    "apiVersion": KUBEVIRT_API_VERSION,
                    "kind": "VirtualMachineInstance",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "nodeName": placed(vmi),
            "nodeSelector": dict(spec.get("nodeSelector") or {}),
            "tolerations": list(spec.get("tolerations") or []),
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "compute",
                    "image": "quay.io/kubevirt/virt-launcher:simulated",
                    "resources": {
                        "requests": {"cpu": cpu_quantity(cpu), "memory": memory_quantity(memory)}
                    },
                }
            ],
        },
    }


MIGRATION_DONE = ("Succeeded", "Failed")


@dataclass
class NodeLoad:
    """Pure: what the stand-in places VMIs and migration targets by, as kube-scheduler does.
    A VMI's requests are its launcher pod's (`gtvp.core.footprint.vmi_requests`).

    With requests (`of_requests`, launcher pods): each node's allocatable and the requests of
    the VMIs on it, and of each VMI migrating to it (KubeVirt runs the target pod, with the
    same requests, for the whole migration); a node fits a VMI when both requests fit in what
    is left (NodeResourcesFit), and the lowest commitment per mille, the larger of CPU and
    memory, wins (LeastAllocated). Without (`of_counts`): VMIs per node, every node fits.
    `commit` counts a decision at once, as kube-scheduler assumes a pod it has bound: two
    VMIs placed in one pass do not both go to the node that was emptiest before either."""

    room: dict[str, tuple[int, int]] | None  # None: counting VMIs
    used: dict[str, list[int]]

    @classmethod
    def of_counts(cls, vmis: Iterable[Mapping[str, Any]]) -> NodeLoad:
        load = cls(None, {})
        for v in vmis:
            node = (v.get("status") or {}).get("nodeName")
            if node:
                load.commit(str(node), v)
        return load

    @classmethod
    def of_requests(
        cls,
        vmis: Iterable[Mapping[str, Any]],
        nodes: Sequence[Mapping[str, Any]],
        migrations: Iterable[Mapping[str, Any]] = (),
    ) -> NodeLoad:
        """Node dicts as the Kubernetes client's to_dict() gives them."""
        from gtvp.core.quantity import cpu_millis, memory_bytes

        room: dict[str, tuple[int, int]] = {}
        for n in nodes:
            alloc = (n.get("status") or {}).get("allocatable") or {}
            try:
                room[str(n["metadata"]["name"])] = (
                    cpu_millis(alloc.get("cpu", "0")),
                    memory_bytes(alloc.get("memory", "0")),
                )
            except ValueError:
                continue
        load = cls(room, {})
        by_key = {}
        for v in vmis:
            meta = v.get("metadata") or {}
            by_key[(meta.get("namespace"), meta.get("name"))] = v
            node = (v.get("status") or {}).get("nodeName")
            if node:
                load.commit(str(node), v)
        for m in migrations:
            status = m.get("status") or {}
            target = (status.get("migrationState") or {}).get("targetNode")
            vmi = by_key.get(
                ((m.get("metadata") or {}).get("namespace"), (m.get("spec") or {}).get("vmiName"))
            )
            if (
                target
                and vmi is not None
                and status.get("phase") not in MIGRATION_DONE
                and (vmi.get("status") or {}).get("nodeName") != target
            ):
                load.commit(str(target), vmi)
        return load

    def score(self, node: str) -> int:
        """Lower places first: VMIs, or the commitment per mille."""
        cpu, mem = self.used.get(node, (0, 0))
        if self.room is None:
            return cpu
        alloc_cpu, alloc_mem = self.room.get(node, (0, 0))
        return max(cpu * 1000 // max(alloc_cpu, 1), mem * 1000 // max(alloc_mem, 1))

    def per_mille(self) -> dict[str, int]:
        return {n: self.score(n) for n in (self.room or self.used)}

    def fits(self, node: str, vmi: Mapping[str, Any]) -> bool:
        if self.room is None:
            return True
        if node not in self.room:
            return False  # no readable allocatable: kube-scheduler would not place there either
        cpu, mem = vmi_requests(vmi)
        used_cpu, used_mem = self.used.get(node, (0, 0))
        alloc_cpu, alloc_mem = self.room[node]
        return used_cpu + cpu <= alloc_cpu and used_mem + mem <= alloc_mem

    def commit(self, node: str, vmi: Mapping[str, Any]) -> None:
        used = self.used.setdefault(node, [0, 0])
        if self.room is None:
            used[0] += 1
            return
        cpu, mem = vmi_requests(vmi)
        used[0] += cpu
        used[1] += mem


RUNNING_STATUS = {
    "phase": "Running",
    "conditions": [
        {"type": "PodScheduled", "status": "True"},
        {"type": "Initialized", "status": "True"},
        {"type": "ContainersReady", "status": "True"},
        {"type": "Ready", "status": "True"},
    ],
    "containerStatuses": [
        {
            "name": "compute",
            "ready": True,
            "restartCount": 0,
            "image": "quay.io/kubevirt/virt-launcher:simulated",
            "imageID": "",
            "started": True,
            "state": {"running": {}},
        }
    ],
}


def eviction_verdict(
    pod: Mapping[str, Any] | None, vmi: Mapping[str, Any] | None
) -> tuple[bool, str | None, str]:
    """Pure: virt-api's answer to the eviction of `pod` (with its VMI): (allowed, the node
    to mark as status.evacuationNodeName or None, message)."""
    if pod is None or (pod.get("metadata") or {}).get("labels", {}).get(APP_LABEL) != APP_VALUE:
        return True, None, ""
    if vmi is None:
        return True, None, ""
    strategy = (vmi.get("spec") or {}).get("evictionStrategy")
    if strategy not in EVACUATING:
        return True, None, ""
    ns, name = vmi["metadata"]["namespace"], vmi["metadata"]["name"]
    node = (pod.get("spec") or {}).get("nodeName")
    message = f"{EVICTION_MESSAGE} {ns}/{name}"
    marked = (vmi.get("status") or {}).get("evacuationNodeName")
    return False, (None if marked or not node else str(node)), message


class LauncherPods:
    """Keeps the pods in step with the VMIs (call `sync` every tick)."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.accounts: set[str] = set()  # namespaces known to have their default ServiceAccount

    def sync(self, vmis: Sequence[Mapping[str, Any]]) -> None:
        pods = [
            p.to_dict()
            # the stand-in's own pods only (gtvp's view takes any value of the label)
            for p in self.core.list_pod_for_all_namespaces(label_selector=OWN_PODS).items
        ]
        for p in pods:  # to_dict() is snake_case
            p["metadata"]["deletionTimestamp"] = p["metadata"].get("deletion_timestamp")
            p["spec"]["nodeName"] = p["spec"].get("node_name")
        plan = plan_pods(vmis, pods)
        for ns, name in plan.delete:
            self._delete(ns, name)
        for vmi in plan.create:
            body = launcher_pod(vmi)
            self._default_account(body["metadata"]["namespace"])
            pod = self.core.create_namespaced_pod(body["metadata"]["namespace"], body)
            self.core.patch_namespaced_pod_status(
                pod.metadata.name, pod.metadata.namespace, {"status": RUNNING_STATUS}
            )
            log.info("%s pod %s/%s Running on %s (VMI %s)", KUBELET_BANNER,
                     pod.metadata.namespace, pod.metadata.name, pod.spec.node_name,
                     vmi["metadata"]["name"])  # fmt: skip

    def _default_account(self, ns: str) -> None:
        """The namespace's `default` ServiceAccount, which the API server's admission needs
        for a pod: kube-controller-manager creates it, and none runs here."""
        from kubernetes.client.rest import ApiException

        if ns in self.accounts:
            return
        try:
            self.core.create_namespaced_service_account(ns, {"metadata": {"name": "default"}})
        except ApiException as exc:
            if exc.status != 409:
                raise
        self.accounts.add(ns)

    def _delete(self, ns: str, name: str) -> None:
        from kubernetes.client.rest import ApiException

        try:  # no kubelet to wait for: gone at once
            self.core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                raise
        log.info("%s pod %s/%s deleted", KUBELET_BANNER, ns, name)


class EvictionWebhook:
    """SIMULATED virt-api: the validating webhook on pods/eviction, over HTTPS."""

    def __init__(self, api: Any, core: Any, pki_dir: Path) -> None:
        from gtvp_local import pki
        from gtvp_local.processes import free_port

        self.api, self.core = api, core
        ca = pki.ensure_ca(pki_dir, "gtvp-simulated-virt-api-ca")
        cert = pki.issue(ca, pki_dir, "virt-api", common_name="virt-api",
                         server_ips=("127.0.0.1",))  # fmt: skip
        self.ca_pem = ca.cert.read_bytes()
        self.port = free_port()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                review = json.loads(self.rfile.read(length) or b"{}")
                body = json.dumps(owner.review(review)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self._register()

    def stop(self) -> None:
        self.server.shutdown()

    def _register(self) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        admission = client.AdmissionregistrationV1Api(self.core.api_client)
        body = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": WEBHOOK_CONFIG},
            "webhooks": [
                {
                    "name": WEBHOOK_NAME,
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "NoneOnDryRun",
                    "failurePolicy": "Fail",
                    "timeoutSeconds": 10,
                    "clientConfig": {
                        "url": f"https://127.0.0.1:{self.port}/pod-eviction",
                        "caBundle": base64.b64encode(self.ca_pem).decode(),
                    },
                    "rules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["pods/eviction"],
                            "scope": "Namespaced",
                        }
                    ],
                }
            ],
        }
        try:
            admission.delete_validating_webhook_configuration(WEBHOOK_CONFIG)
        except ApiException as exc:
            if exc.status != 404:
                raise
        admission.create_validating_webhook_configuration(body)
        log.info("%s eviction webhook on 127.0.0.1:%d (pods/eviction)", API_BANNER, self.port)

    def review(self, review: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one AdmissionReview (never raises: an error allows, as no webhook would)."""
        request = review.get("request") or {}
        uid = request.get("uid", "")
        try:
            allowed, _, message = self._decide(request)
        except Exception as exc:  # noqa: BLE001 - answer anyway
            log.warning("%s eviction review failed: %s", API_BANNER, exc)
            allowed, message = True, ""
        response: dict[str, Any] = {"uid": uid, "allowed": allowed}
        if not allowed:
            response["status"] = {"code": 429, "reason": "TooManyRequests", "message": message}
        return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "response": response}  # fmt: skip

    def _decide(self, request: Mapping[str, Any]) -> tuple[bool, str | None, str]:
        from kubernetes.client.rest import ApiException

        ns, name = str(request.get("namespace", "")), str(request.get("name", ""))
        try:
            pod = self.core.read_namespaced_pod(name, ns).to_dict()
        except ApiException:
            return True, None, ""
        labels = (pod.get("metadata") or {}).get("labels") or {}
        vmi_name = labels.get(VM_NAME_LABEL)
        pod = {"metadata": {"labels": labels}, "spec": {"nodeName": pod["spec"].get("node_name")}}
        vmi = None
        if vmi_name:
            try:
                vmi = self.api.get_namespaced_custom_object(
                    *KV, ns, "virtualmachineinstances", vmi_name
                )
            except ApiException:
                vmi = None
        if vmi is not None and vmi["metadata"].get("uid") != labels.get(CREATED_BY):
            vmi = None  # a new VMI of the same name: not this pod's
        allowed, mark, message = eviction_verdict(pod, vmi)
        if mark is not None and not request.get("dryRun"):
            self.api.patch_namespaced_custom_object(
                *KV, ns, "virtualmachineinstances", str(vmi_name),
                {"status": {"evacuationNodeName": mark}},
            )  # fmt: skip
            log.info("%s eviction of pod %s/%s refused (429): VMI %s "
                     "status.evacuationNodeName=%s", API_BANNER, ns, name, vmi_name,
                     mark)  # fmt: skip
        return allowed, mark, message
