"""Only the operator may mark a migration as gtvp's (gtvp.io/evacuation, /drain,
/balancing): gtvp counts only those against its limits and reads them as its history, so a
tenant must not be able to fill that budget or pass a migration off as gtvp's. Nor may a
tenant delete one (cancelling each evacuation keeps the VM where it is). Enforced by the
real API server (ValidatingAdmissionPolicies gtvp-migration-labels, gtvp-migration-deletion)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

from gtvp_local.controlplane import ADMIN, OPERATOR, ControlPlane, Identity
from gtvp_local.pool import apply_manifests
from tests.rbac import grant, until_refused

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
    apply_manifests(control_plane)
    probe = json.dumps(_migration("probe", {"gtvp.io/evacuation": "node-1"}))
    until_refused(
        control_plane, "gtvp-migration-labels", "mark the migrations gtvp starts",
        "create", "-n", "default", "-f", "-", input_text=probe,
    )  # fmt: skip


TENANT = Identity("gtvp-test-tenant", (), "tenant")
"""A VM user whose role lets it create, update and delete the VM's migrations (as KubeVirt's
aggregated namespace roles may): the identity the deletion policy stands against."""
KUBEVIRT = Identity("system:serviceaccount:kubevirt:kubevirt-controller", (), "kv-controller")
"""The user name KubeVirt's virt-controller has (it deletes the migrations of a deleted VMI)."""


@pytest.fixture(scope="module")
def migration_editors(control_plane: ControlPlane, policies_applied: None) -> None:
    """RBAC for TENANT and KUBEVIRT on migrations, and the deletion policy loaded."""
    resources = ["virtualmachineinstancemigrations", "virtualmachineinstancemigrations/status"]
    verbs = ["get", "list", "create", "update", "patch", "delete"]
    grant(control_plane, "gtvp-test-migration-editor",
          [{"apiGroups": ["kubevirt.io"], "resources": resources, "verbs": verbs}],
          (TENANT, KUBEVIRT))  # fmt: skip
    probe = _migration("deletion-probe", {"gtvp.io/evacuation": "node-1"})
    _create(control_plane, "default", probe, OPERATOR)
    try:
        until_refused(
            control_plane, "gtvp-migration-deletion", "is one gtvp started",
            "delete", "vmim", "deletion-probe", "-n", "default", identity=TENANT,
        )  # fmt: skip
    finally:  # a marked migration left behind would count against later pools' limits
        control_plane.kubectl("delete", "vmim", "deletion-probe", "-n", "default", check=False)


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
    assert "may not set, change or remove them" in out.stderr


@pytest.mark.usefixtures("policies_applied")
def test_the_operator_may_and_others_may_not_add_the_mark_later(
    control_plane: ControlPlane, namespace: str
) -> None:
    assert _create(control_plane, namespace, _migration("own", {}), ADMIN).returncode == 0
    later = _patch(
        control_plane, namespace, "own", {"metadata": {"labels": {"gtvp.io/evacuation": "node-1"}}}
    )
    assert later.returncode != 0
    assert "may not set, change or remove them" in later.stderr
    mine = _create(
        control_plane, namespace, _migration("gtvps", {"gtvp.io/evacuation": "node-1"}), OPERATOR
    )
    assert mine.returncode == 0, mine.stderr
    # KubeVirt (or anyone) may update gtvp's migration otherwise, labels unchanged
    touch = {"metadata": {"annotations": {"kubevirt.io/note": "x"}}}
    ok = _patch(control_plane, namespace, "gtvps", touch)
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

    def patch(annotations: dict[str, Any], identity: Identity = ADMIN) -> Any:
        return _patch(
            control_plane, namespace, "evac", {"metadata": {"annotations": annotations}}, identity
        )

    refused = patch({key: value})
    assert refused.returncode != 0
    assert "belong to the operator" in refused.stderr
    assert "may not set, change or remove them" in refused.stderr
    removed = patch({"gtvp.io/evacuation-attempt": None})
    assert removed.returncode != 0
    assert patch({"kubevirt.io/note": "x"}).returncode == 0  # others' annotations pass
    # the policy lets the operator through (its own role has no patch on migrations: it never
    # changes one; granted here to show that the policy does not stand in its way)
    grant(control_plane, "gtvp-test-operator-migration-patch",
          [{"apiGroups": ["kubevirt.io"], "resources": ["virtualmachineinstancemigrations"],
            "verbs": ["patch"]}], (OPERATOR,))  # fmt: skip
    assert patch({key: value}, OPERATOR).returncode == 0
    # a migration that is not gtvp's is its owner's to annotate
    assert _create(control_plane, namespace, _migration("own", {})).returncode == 0
    own = _patch(control_plane, namespace, "own", {"metadata": {"annotations": {key: value}}})
    assert own.returncode == 0, own.stderr


def _patch(
    cp: ControlPlane,
    ns: str,
    name: str,
    patch: Mapping[str, Any],
    identity: Identity = ADMIN,
    *args: str,
) -> Any:
    """A merge patch of migration `name` (`args`: e.g. --subresource=status); not checked."""
    return cp.kubectl(
        "patch", "vmim", name, "-n", ns, "--type=merge", *args, "-p", json.dumps(patch),
        identity=identity, check=False,
    )  # fmt: skip


def _delete(cp: ControlPlane, ns: str, name: str, identity: Identity) -> Any:
    return cp.kubectl("delete", "vmim", name, "-n", ns, identity=identity, check=False)


@pytest.mark.usefixtures("migration_editors")
@pytest.mark.parametrize("label", ["gtvp.io/evacuation", "gtvp.io/drain", "gtvp.io/balancing"])
def test_a_tenant_cannot_delete_a_migration_gtvp_started(
    control_plane: ControlPlane, namespace: str, label: str
) -> None:
    """A deleted migration is no failure: whoever deletes each evacuation gtvp starts (or
    the failed ones, which are gtvp's record of where retries must not go) would keep the
    VM on the untrusted member for ever. The tenant may still delete its own migrations."""
    body = _migration("gtvps", {label: "node-1"})
    assert _create(control_plane, namespace, body, OPERATOR).returncode == 0
    refused = _delete(control_plane, namespace, "gtvps", TENANT)
    assert refused.returncode != 0
    assert f"migration gtvps is one gtvp started ({label})" in refused.stderr
    assert "gtvp-test-tenant may not" in refused.stderr
    assert _create(control_plane, namespace, _migration("own", {}), TENANT).returncode == 0
    assert _delete(control_plane, namespace, "own", TENANT).returncode == 0
    gone = _delete(control_plane, namespace, "gtvps", OPERATOR)  # gtvp cancels its own
    assert gone.returncode == 0, gone.stderr


@pytest.mark.usefixtures("migration_editors")
def test_kubevirt_and_a_break_glass_administrator_may_delete_gtvps_migrations(
    control_plane: ControlPlane, namespace: str
) -> None:
    """KubeVirt's virt-controller deletes the migrations of a deleted VMI and old finished
    ones; an administrator in system:masters deletes a stalled evacuation's failed ones (the
    runbook's remedy)."""
    for name in ("by-kubevirt", "by-admin"):
        body = _migration(name, {"gtvp.io/evacuation": "node-1"})
        assert _create(control_plane, namespace, body, OPERATOR).returncode == 0
    kubevirt = _delete(control_plane, namespace, "by-kubevirt", KUBEVIRT)
    assert kubevirt.returncode == 0, kubevirt.stderr
    admin = _delete(control_plane, namespace, "by-admin", ADMIN)
    assert admin.returncode == 0, admin.stderr


@pytest.mark.usefixtures("migration_editors")
def test_a_tenant_cannot_have_the_garbage_collector_delete_gtvps_migration(
    control_plane: ControlPlane, namespace: str
) -> None:
    """The garbage collector may delete gtvp's migrations (it cleans up after deleted
    owners), so an owner reference pointing at nothing would delete one for the tenant."""
    body = _migration("gtvps", {"gtvp.io/evacuation": "node-1"})
    assert _create(control_plane, namespace, body, OPERATOR).returncode == 0
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "gone",
             "uid": "00000000-0000-0000-0000-000000000000"}  # fmt: skip
    patch = {"metadata": {"ownerReferences": [owner]}}
    refused = _patch(control_plane, namespace, "gtvps", patch, TENANT)
    assert refused.returncode != 0
    assert "is one gtvp started: only gtvp and KubeVirt update it" in refused.stderr
    assert _create(control_plane, namespace, _migration("own", {}), TENANT).returncode == 0
    mine = _patch(control_plane, namespace, "own", patch, TENANT)
    assert mine.returncode == 0, mine.stderr


@pytest.mark.usefixtures("migration_editors")
def test_a_tenant_cannot_unmark_gtvps_migration_and_then_delete_it(
    control_plane: ControlPlane, namespace: str
) -> None:
    """Removing gtvp's label would make the migration an ordinary one, which its owner may
    delete: the label stays as the operator set it."""
    body = _migration("gtvps", {"gtvp.io/evacuation": "node-1"})
    assert _create(control_plane, namespace, body, OPERATOR).returncode == 0
    unmark = {"metadata": {"labels": {"gtvp.io/evacuation": None}}}
    refused = _patch(control_plane, namespace, "gtvps", unmark, TENANT)
    assert refused.returncode != 0
    assert "may not set, change or remove them" in refused.stderr
    assert _delete(control_plane, namespace, "gtvps", TENANT).returncode != 0


@pytest.mark.usefixtures("migration_editors")
@pytest.mark.parametrize(
    ("what", "patch", "subresource"),
    [
        ("a finalizer", {"metadata": {"finalizers": ["tenant.example/hold"]}}, None),
        ("an annotation", {"metadata": {"annotations": {"tenant.example/note": "x"}}}, None),
        ("a failed phase", {"status": {"phase": "Failed"}}, "status"),
    ],
)
def test_a_tenant_cannot_touch_gtvps_migration_at_all(
    control_plane: ControlPlane,
    namespace: str,
    what: str,
    patch: dict[str, Any],
    subresource: str | None,
) -> None:
    """Any write changes the migration's resourceVersion, which fails gtvp's conditional
    cancel of a pin that can no longer be scheduled (so the pin stays until KubeVirt fails
    it); a Failed written into its status counts as a failed attempt. KubeVirt's own
    controller still updates it."""
    body = _migration("gtvps", {"gtvp.io/evacuation": "node-1"})
    assert _create(control_plane, namespace, body, OPERATOR).returncode == 0

    def write(identity: Identity) -> Any:
        sub = [f"--subresource={subresource}"] if subresource else []
        return _patch(control_plane, namespace, "gtvps", patch, identity, *sub)

    refused = write(TENANT)
    assert refused.returncode != 0, f"{what}: {refused.stdout}"
    assert "is one gtvp started: only gtvp and KubeVirt update it" in refused.stderr
    if what == "an annotation":  # (a finalizer no controller removes would outlive the test)
        mine = write(KUBEVIRT)
        assert mine.returncode == 0, mine.stderr
