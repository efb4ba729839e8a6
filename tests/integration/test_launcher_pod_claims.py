"""Only KubeVirt's virt-controller makes a pod a VMI's launcher (ValidatingAdmissionPolicy
gtvp-launcher-pods, enforced by the real API server).

KubeVirt takes the newest pod a VMI controls for its virt-launcher and records that pod's
node as the VMI's. A VM user who may create pods could create one with spec.nodeName set to
an untrusted node, bypassing the scheduler and the trust selector gtvp put on the VMI."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from gtvp_local.controlplane import ADMIN, ControlPlane, Identity
from gtvp_local.pool import manifests

pytestmark = [pytest.mark.controlplane]

TENANT = Identity("gtvp-test-pod-tenant", (), "pod-tenant")
KUBEVIRT = Identity("system:serviceaccount:kubevirt:kubevirt-controller", (), "kv-controller")


@pytest.fixture(scope="module")
def pod_creators(control_plane: ControlPlane) -> None:
    for m in manifests():
        control_plane.kubectl("apply", "-f", str(m))
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "gtvp-test-pod-creator"},
        "rules": [{"apiGroups": [""], "resources": ["pods"],
                   "verbs": ["get", "list", "create", "update", "patch", "delete"]}],
    }  # fmt: skip
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "gtvp-test-pod-creator"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": who.user}
                     for who in (TENANT, KUBEVIRT)],
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "gtvp-test-pod-creator"},
    }  # fmt: skip
    for obj in (role, binding):
        control_plane.kubectl("apply", "-f", "-", input_text=json.dumps(obj))


def _pod(name: str, *, controller: bool | None) -> dict[str, Any]:
    owner: dict[str, Any] = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "name": "db",
        "uid": "11111111-2222-3333-4444-555555555555",
    }
    if controller is not None:
        owner["controller"] = controller
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "ownerReferences": [owner]},
        "spec": {"nodeName": "an-untrusted-node",
                 "containers": [{"name": "compute", "image": "virt-launcher"}]},
    }  # fmt: skip


def _create(cp: ControlPlane, ns: str, obj: dict[str, Any], who: Identity) -> Any:
    return cp.kubectl(
        "create", "-n", ns, "-f", "-", input_text=json.dumps(obj), identity=who, check=False
    )


@pytest.mark.usefixtures("pod_creators")
def test_a_tenant_cannot_make_a_pod_a_vmis_launcher(
    control_plane: ControlPlane, namespace: str
) -> None:
    # no controller manager here makes the namespace's default ServiceAccount
    control_plane.kubectl("create", "serviceaccount", "default", "-n", namespace)
    deadline = time.monotonic() + 30  # the API server loads a new policy a moment later
    while True:
        refused = control_plane.kubectl(
            "create", "-n", namespace, "--dry-run=server", "-f", "-",
            input_text=json.dumps(_pod("fake-launcher", controller=True)),
            identity=TENANT, check=False,
        )  # fmt: skip
        if "as its controller" in refused.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert refused.returncode != 0
    assert "pod fake-launcher names a VirtualMachineInstance as its controller" in refused.stderr
    assert "gtvp-test-pod-tenant may not" in refused.stderr
    # a plain owner reference does not make a launcher: allowed, and cannot be made one later
    assert (
        _create(control_plane, namespace, _pod("helper", controller=None), TENANT).returncode == 0
    )
    claim = [{"op": "add", "path": "/metadata/ownerReferences/0/controller", "value": True}]
    later = control_plane.kubectl(
        "patch", "pod", "helper", "-n", namespace, "--type=json", "-p", json.dumps(claim),
        identity=TENANT, check=False,
    )  # fmt: skip
    assert later.returncode != 0
    assert "names a VirtualMachineInstance as its controller" in later.stderr
    for who, name in ((KUBEVIRT, "by-kubevirt"), (ADMIN, "by-admin")):
        made = _create(control_plane, namespace, _pod(name, controller=True), who)
        assert made.returncode == 0, made.stderr
    # others may still update a launcher pod that KubeVirt made (its labels, annotations)
    touch = json.dumps({"metadata": {"labels": {"example.com/x": "y"}}})
    ok = control_plane.kubectl(
        "patch", "pod", "by-kubevirt", "-n", namespace, "--type=merge", "-p", touch,
        identity=TENANT, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    control_plane.kubectl("delete", "pods", "--all", "-n", namespace, "--wait=false")
