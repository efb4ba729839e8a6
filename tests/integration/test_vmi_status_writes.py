"""Only KubeVirt writes where a VMI runs (ValidatingAdmissionPolicy gtvp-vmi-status,
enforced by the real API server).

KubeVirt's VirtualMachineInstance has no status subresource: the API server lets anyone who
may update or create a VMI write its status. KubeVirt's virt-api puts the old status back on
a user's update, but keeps what a user creates a VMI with (phase forced to Pending), and no
KubeVirt runs here: the policy is what stops a VM user from naming a member the VM is not on
(room it does not take; no verdict use spent where it starts) or marking it drained (gtvp
would move it on its own migration budget)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gtvp_local.controlplane import ADMIN, ControlPlane, Identity
from gtvp_local.pool import apply_manifests
from tests.rbac import grant, until_refused

pytestmark = [pytest.mark.controlplane]

TENANT = Identity("gtvp-test-vmi-tenant", (), "vmi-tenant")
HANDLER = Identity("system:serviceaccount:kubevirt:kubevirt-handler", (), "kv-handler-status")
REFUSED = "only KubeVirt"


@pytest.fixture(scope="module")
def vmi_writers(control_plane: ControlPlane) -> None:
    apply_manifests(control_plane)
    verbs = ["get", "list", "create", "update", "patch", "delete"]
    grant(
        control_plane,
        "gtvp-test-vmi-writer",
        [{"apiGroups": ["kubevirt.io"], "resources": ["virtualmachineinstances"], "verbs": verbs}],
        (TENANT, HANDLER),
    )


def _vmi(name: str, status: dict[str, Any] | None = None, **labels: str) -> dict[str, Any]:
    """An ungated VMI (gtvp's webhooks do not look at it)."""
    body: dict[str, Any] = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "labels": labels},
        "spec": {"domain": {"devices": {}, "memory": {"guest": "64Mi"}}},
    }
    if status is not None:
        body["status"] = status
    return body


def _create(cp: ControlPlane, ns: str, obj: dict[str, Any], who: Identity) -> Any:
    return cp.kubectl(
        "create", "-n", ns, "-f", "-", input_text=json.dumps(obj), identity=who, check=False
    )


def _patch(cp: ControlPlane, ns: str, name: str, patch: Any, who: Identity) -> Any:
    return cp.kubectl(
        "patch", "vmi", name, "-n", ns, "--type=merge", "-p", json.dumps(patch),
        identity=who, check=False,
    )  # fmt: skip


@pytest.mark.usefixtures("vmi_writers")
def test_a_tenant_cannot_write_where_a_vmi_runs(
    control_plane: ControlPlane, namespace: str
) -> None:
    cp = control_plane
    until_refused(
        cp, "gtvp-vmi-status", REFUSED, "create", "-n", namespace, "-f", "-",
        input_text=json.dumps(_vmi("probe", {"nodeName": "x"})), identity=TENANT,
    )  # fmt: skip
    # a VMI that says at creation where it runs, that it migrates, is drained or is running
    for i, status in enumerate(
        (
            {"nodeName": "trusted-member"},
            {"evacuationNodeName": "trusted-member"},
            {"migrationState": {"targetNode": "trusted-member"}},
            {"phase": "Running"},
        )
    ):
        refused = _create(cp, namespace, _vmi(f"made-{i}", status), TENANT)
        assert refused.returncode != 0, status
        assert "may not create one whose status names a node" in refused.stderr
        assert "gtvp-test-vmi-tenant" in refused.stderr
    labelled = _create(cp, namespace, _vmi("labelled", None, **{"kubevirt.io/nodeName": "n"}),
                       TENANT)  # fmt: skip
    assert labelled.returncode != 0
    assert "kubevirt.io/nodeName" in labelled.stderr
    # a VMI as users create them passes (a Pending phase too)
    for name, status in (("plain", None), ("pending", {"phase": "Pending"})):
        made = _create(cp, namespace, _vmi(name, status), TENANT)
        assert made.returncode == 0, made.stderr
    # KubeVirt places it; the tenant may not rewrite that, nor mark it drained, nor end it
    where = {"status": {"phase": "Running", "nodeName": "host-a"}}
    placed = _patch(cp, namespace, "plain", where, HANDLER)
    assert placed.returncode == 0, placed.stderr
    for patch in (
        {"status": {"nodeName": "trusted-member"}},
        {"status": {"nodeName": None}},
        {"status": {"evacuationNodeName": "host-a"}},
        {"status": {"phase": "Succeeded"}},
        {"status": None},
        {"metadata": {"labels": {"kubevirt.io/nodeName": "trusted-member"}}},
    ):
        refused = _patch(cp, namespace, "plain", patch, TENANT)
        assert refused.returncode != 0, patch
        assert "may not change them" in refused.stderr
    got = json.loads(cp.kubectl("get", "vmi", "plain", "-n", namespace, "-o", "json").stdout)
    assert got["status"] == {"phase": "Running", "nodeName": "host-a"}
    # the tenant may still label and annotate its VMI
    touched = _patch(cp, namespace, "plain", {"metadata": {"labels": {"app": "db"}}}, TENANT)
    assert touched.returncode == 0, touched.stderr
    # KubeVirt's service accounts and break-glass administrators may write the status
    for who, node in ((HANDLER, "host-b"), (ADMIN, "host-c")):
        moved = _patch(cp, namespace, "plain", {"status": {"nodeName": node}}, who)
        assert moved.returncode == 0, moved.stderr
    cp.kubectl("delete", "vmi", "--all", "-n", namespace, "--wait=false")
