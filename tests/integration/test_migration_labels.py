"""Only the operator may mark a migration as gtvp's (gtvp.io/evacuation, /drain,
/balancing): gtvp counts only those against its limits and reads them as its history, so a
tenant must not be able to fill that budget or pass a migration off as gtvp's. Enforced by
the real API server (ValidatingAdmissionPolicy gtvp-migration-labels)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gtvp_local.controlplane import ADMIN, OPERATOR, ControlPlane
from gtvp_local.pool import manifests

pytestmark = [pytest.mark.controlplane]


def _migration(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": name, "labels": labels},
        "spec": {"vmiName": "web"},
    }


@pytest.fixture(scope="module")
def policies_applied(control_plane: ControlPlane) -> None:
    for m in manifests():
        control_plane.kubectl("apply", "-f", str(m))


def _create(cp: ControlPlane, ns: str, obj: dict[str, Any], identity: Any = ADMIN) -> Any:
    return cp.kubectl(
        "create", "-n", ns, "-f", "-", input_text=json.dumps(obj), identity=identity, check=False
    )


@pytest.mark.usefixtures("policies_applied")
@pytest.mark.parametrize("label", ["gtvp.io/evacuation", "gtvp.io/drain", "gtvp.io/balancing"])
def test_a_tenant_cannot_mark_a_migration_as_gtvps(
    control_plane: ControlPlane, namespace: str, label: str
) -> None:
    out = _create(control_plane, namespace, _migration("fake", {label: "node-1"}))
    assert out.returncode != 0
    assert "mark the migrations gtvp starts" in out.stderr
    assert "may not set or change them" in out.stderr


@pytest.mark.usefixtures("policies_applied")
def test_the_operator_may_and_others_may_not_add_the_mark_later(
    control_plane: ControlPlane, namespace: str
) -> None:
    assert _create(control_plane, namespace, _migration("own", {}), ADMIN).returncode == 0
    patch = json.dumps({"metadata": {"labels": {"gtvp.io/evacuation": "node-1"}}})
    later = control_plane.kubectl(
        "patch", "vmim", "own", "-n", namespace, "--type=merge", "-p", patch, check=False
    )
    assert later.returncode != 0
    assert "may not set or change them" in later.stderr
    mine = _create(
        control_plane, namespace, _migration("gtvps", {"gtvp.io/evacuation": "node-1"}), OPERATOR
    )
    assert mine.returncode == 0, mine.stderr
    # KubeVirt (or anyone) may update gtvp's migration otherwise, labels unchanged
    touch = json.dumps({"metadata": {"annotations": {"kubevirt.io/note": "x"}}})
    ok = control_plane.kubectl(
        "patch", "vmim", "gtvps", "-n", namespace, "--type=merge", "-p", touch, check=False
    )
    assert ok.returncode == 0, ok.stderr
