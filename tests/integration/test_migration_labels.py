"""Only the operator may mark a migration as gtvp's (gtvp.io/evacuation, /drain,
/balancing): gtvp counts only those against its limits and reads them as its history, so a
tenant must not be able to fill that budget or pass a migration off as gtvp's. Enforced by
the real API server (ValidatingAdmissionPolicy gtvp-migration-labels)."""

from __future__ import annotations

import json
import time
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
    # the API server loads a new or changed policy a moment after the write: wait until a
    # marked migration is refused (a server-side dry run passes admission, stores nothing)
    probe = json.dumps(_migration("probe", {"gtvp.io/evacuation": "node-1"}))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        out = control_plane.kubectl(
            "create", "-n", "default", "--dry-run=server", "-f", "-",
            input_text=probe, check=False,
        )  # fmt: skip
        if out.returncode != 0 and "mark the migrations gtvp starts" in out.stderr:
            return
        time.sleep(0.2)
    raise AssertionError("the gtvp-migration-labels policy never took effect")


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


@pytest.mark.usefixtures("policies_applied")
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("gtvp.io/evacuation-attempt", "99"),  # would end the run of failures gtvp counts
        ("kubevirt.io/migrationPendingPodTimeoutSeconds", "0"),  # fails the migration at once
        ("kubevirt.io/migrationUnschedulablePodTimeoutSeconds", "0"),
    ],
)
def test_only_the_operator_touches_gtvps_annotations_on_its_migrations(
    control_plane: ControlPlane, namespace: str, key: str, value: str
) -> None:
    """Whoever may update the VM's migrations could otherwise rewrite gtvp's attempt numbers
    (so that a retry forgets where the last ones failed) or make gtvp's evacuation fail at
    once with KubeVirt's test-only timeouts, three times, and keep the VM where it is."""
    body = _migration("evac", {"gtvp.io/evacuation": "node-1"})
    body["metadata"]["annotations"] = {"gtvp.io/evacuation-attempt": "0"}
    assert _create(control_plane, namespace, body, OPERATOR).returncode == 0

    def patch(annotations: dict[str, Any], identity: Any = ADMIN) -> Any:
        return control_plane.kubectl(
            "patch", "vmim", "evac", "-n", namespace, "--type=merge",
            "-p", json.dumps({"metadata": {"annotations": annotations}}),
            identity=identity, check=False,
        )  # fmt: skip

    refused = patch({key: value})
    assert refused.returncode != 0
    assert "belong to the operator" in refused.stderr
    assert "may not set, change or remove them" in refused.stderr
    removed = patch({"gtvp.io/evacuation-attempt": None})
    assert removed.returncode != 0
    assert patch({"kubevirt.io/note": "x"}).returncode == 0  # others' annotations pass
    assert patch({key: value}, OPERATOR).returncode == 0
    # a migration that is not gtvp's is its owner's to annotate
    assert _create(control_plane, namespace, _migration("own", {})).returncode == 0
    own = control_plane.kubectl(
        "patch", "vmim", "own", "-n", namespace, "--type=merge",
        "-p", json.dumps({"metadata": {"annotations": {key: value}}}), check=False,
    )  # fmt: skip
    assert own.returncode == 0, own.stderr
