"""Only KubeVirt's virt-controller makes a pod a VMI's launcher (ValidatingAdmissionPolicy
gtvp-launcher-pods, enforced by the real API server).

KubeVirt takes the newest pod a VMI controls for its virt-launcher and records that pod's
node as the VMI's. A VM user who may create pods could create one with spec.nodeName set to
an untrusted node, bypassing the scheduler and the trust selector gtvp put on the VMI."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gtvp_local.controlplane import ADMIN, ControlPlane, Identity
from gtvp_local.pool import apply_manifests
from tests.rbac import grant, until_refused

pytestmark = [pytest.mark.controlplane]

TENANT = Identity("gtvp-test-pod-tenant", (), "pod-tenant")
CNI = Identity("system:serviceaccount:kube-system:multus", (), "cni-daemon")
"""A host daemon's account that may write pods/status cluster-wide (as Multus' and Calico's
are): root on any host holds its token."""
KUBEVIRT = Identity("system:serviceaccount:kubevirt:kubevirt-controller", (), "kv-controller")
VMI_UID = "11111111-2222-3333-4444-555555555555"


@pytest.fixture(scope="module")
def pod_creators(control_plane: ControlPlane) -> None:
    apply_manifests(control_plane)
    verbs = ["get", "list", "create", "update", "patch", "delete"]
    grant(
        control_plane,
        "gtvp-test-pod-creator",
        [{"apiGroups": [""], "resources": ["pods"], "verbs": verbs}],
        (TENANT, KUBEVIRT),
    )
    grant(
        control_plane,
        "gtvp-test-pod-status-writer",
        [{"apiGroups": [""], "resources": ["pods", "pods/status"],
          "verbs": ["get", "list", "update", "patch"]}],
        (CNI,),
    )  # fmt: skip


def _pod(
    name: str, *, controller: bool | None, kind: str = "VirtualMachineInstance", app: bool = True
) -> dict[str, Any]:
    """A pod owned by the gated VMI `db` (uid below) of `kind` (KubeVirt compares only the
    uid), labelled as KubeVirt labels its launchers when `app`."""
    owner: dict[str, Any] = {
        "apiVersion": "kubevirt.io/v1",
        "kind": kind,
        "name": "db",
        "uid": VMI_UID,
    }
    if controller is not None:
        owner["controller"] = controller
    labels = {"kubevirt.io": "virt-launcher"} if app else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "ownerReferences": [owner]},
        "spec": {"nodeName": "an-untrusted-node",
                 "containers": [{"name": "compute", "image": "virt-launcher"}]},
    }  # fmt: skip


def _create(cp: ControlPlane, ns: str, obj: dict[str, Any], who: Identity) -> Any:
    return cp.kubectl(
        "create", "-n", ns, "-f", "-", input_text=json.dumps(obj), identity=who, check=False
    )


def _patch(cp: ControlPlane, ns: str, name: str, patch: Any, who: Identity) -> Any:
    kind = "json" if isinstance(patch, list) else "merge"
    return cp.kubectl(
        "patch", "pod", name, "-n", ns, f"--type={kind}", "-p", json.dumps(patch),
        identity=who, check=False,
    )  # fmt: skip


REFUSED = "carries KubeVirt's label kubevirt.io: only KubeVirt makes a VMI's launcher pod"


@pytest.mark.usefixtures("pod_creators")
def test_a_tenant_cannot_make_a_pod_a_vmis_launcher(
    control_plane: ControlPlane, namespace: str
) -> None:
    # no controller manager here makes the namespace's default ServiceAccount
    control_plane.kubectl("create", "serviceaccount", "default", "-n", namespace)
    until_refused(
        control_plane, "gtvp-launcher-pods", REFUSED, "create", "-n", namespace, "-f", "-",
        input_text=json.dumps(_pod("fake-launcher", controller=True)), identity=TENANT,
    )  # fmt: skip
    for kind in ("VirtualMachineInstance", "Pod"):  # KubeVirt compares the uid alone
        refused = _create(control_plane, namespace, _pod("fake", controller=True, kind=kind),
                          TENANT)  # fmt: skip
        assert refused.returncode != 0, kind
        assert f"pod fake {REFUSED}" in refused.stderr
        assert "gtvp-test-pod-tenant may not" in refused.stderr
    # without KubeVirt's label virt-controller never sees the pod: allowed, but the label
    # cannot be added later
    plain = _create(control_plane, namespace, _pod("helper", controller=True, app=False), TENANT)
    assert plain.returncode == 0, plain.stderr
    app_label = {"metadata": {"labels": {"kubevirt.io": "virt-launcher"}}}
    labelled = _patch(control_plane, namespace, "helper", app_label, TENANT)
    assert labelled.returncode != 0
    assert REFUSED in labelled.stderr
    for who, name in ((KUBEVIRT, "by-kubevirt"), (ADMIN, "by-admin")):
        made = _create(control_plane, namespace, _pod(name, controller=True), who)
        assert made.returncode == 0, made.stderr
    # the launcher KubeVirt made for the tenant's own VMI cannot be pointed at another VMI
    other = [{"op": "replace", "path": "/metadata/ownerReferences/0/uid",
              "value": "99999999-2222-3333-4444-555555555555"}]  # fmt: skip
    moved = _patch(control_plane, namespace, "by-kubevirt", other, TENANT)
    assert moved.returncode != 0
    assert REFUSED in moved.stderr
    # others may still update a launcher pod (its other labels, annotations)
    touch = {"metadata": {"labels": {"example.com/x": "y"}}}
    ok = _patch(control_plane, namespace, "by-kubevirt", touch, TENANT)
    assert ok.returncode == 0, ok.stderr
    control_plane.kubectl("delete", "pods", "--all", "-n", namespace, "--wait=false")


@pytest.mark.usefixtures("pod_creators")
def test_no_one_but_kubevirt_changes_which_migration_a_target_pod_is_for(
    control_plane: ControlPlane, namespace: str
) -> None:
    """gtvp judges a migration by the node of the target pod KubeVirt made for it (the
    target the migration records comes from the VMI's status, which hosts write): a tenant
    may not take the label off that pod, point it at another migration, or add it to
    another launcher pod."""
    control_plane.kubectl("create", "serviceaccount", "default", "-n", namespace, check=False)
    job = "kubevirt.io/migrationJobUID"
    target = _pod("target", controller=True)
    target["metadata"]["labels"][job] = "aaaaaaaa-2222-3333-4444-555555555555"
    made = _create(control_plane, namespace, target, KUBEVIRT)
    assert made.returncode == 0, made.stderr
    source = _create(control_plane, namespace, _pod("source", controller=True), KUBEVIRT)
    assert source.returncode == 0, source.stderr
    until_refused(
        control_plane, "gtvp-launcher-pods", REFUSED, "label", "pod", "target", f"{job}-",
        "-n", namespace, identity=TENANT,
    )  # fmt: skip
    for name, patch in (
        ("target", {"metadata": {"labels": {job: "bbbbbbbb-2222-3333-4444-555555555555"}}}),
        ("source", {"metadata": {"labels": {job: "aaaaaaaa-2222-3333-4444-555555555555"}}}),
    ):
        refused = _patch(control_plane, namespace, name, patch, TENANT)
        assert refused.returncode != 0, name
        assert "kubevirt.io/migrationJobUID" in refused.stderr
    control_plane.kubectl("delete", "pods", "--all", "-n", namespace, "--wait=false")


@pytest.mark.usefixtures("pod_creators")
def test_neither_the_status_subresource_nor_an_empty_value_gets_around_the_label(
    control_plane: ControlPlane, namespace: str
) -> None:
    """Root on a host with a CNI daemon's token (pods/status, cluster-wide) changes the label
    of a gated VM's launcher pod so that gtvp no longer sees it, while KubeVirt, taking a
    pod by the label's key, still does; a tenant adds the label with an empty value to a pod
    its VMI controls, which an absent label would have compared equal to."""
    control_plane.kubectl("create", "serviceaccount", "default", "-n", namespace, check=False)
    made = _create(control_plane, namespace, _pod("launcher", controller=True), KUBEVIRT)
    assert made.returncode == 0, made.stderr
    hide = {"metadata": {"labels": {"kubevirt.io": "hidden"}}}
    until_refused(
        control_plane, "gtvp-launcher-pods", REFUSED, "patch", "pod", "launcher",
        "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(hide),
        identity=CNI,
    )  # fmt: skip
    job = {
        "metadata": {
            "labels": {"kubevirt.io/migrationJobUID": "cccccccc-2222-3333-4444-555555555555"}
        }
    }
    added = control_plane.kubectl(
        "patch", "pod", "launcher", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps(job), identity=CNI, check=False,
    )  # fmt: skip
    assert added.returncode != 0
    assert REFUSED in added.stderr
    # its status may still be written (the kubelet's and the daemons' own business)
    status = {"status": {"message": "ok"}}
    ok = control_plane.kubectl(
        "patch", "pod", "launcher", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps(status), identity=CNI, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    plain = _create(control_plane, namespace, _pod("plain", controller=True, app=False), TENANT)
    assert plain.returncode == 0, plain.stderr
    empty = _patch(
        control_plane, namespace, "plain", {"metadata": {"labels": {"kubevirt.io": ""}}}, TENANT
    )
    assert empty.returncode != 0
    assert REFUSED in empty.stderr
    control_plane.kubectl("delete", "pods", "--all", "-n", namespace, "--wait=false")
