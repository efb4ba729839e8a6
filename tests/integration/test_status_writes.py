"""Only the operator writes the status of LazyBoxes, OSComponents, SecurityPolicies and
Members (agents their own Member's, under their own policy) (ValidatingAdmissionPolicy
gtvp-status-writes, enforced by the real API server).

Key release and box attestation read a box's status back as gtvp's word (the compositions
gtvp made for it, its vTPM's pin and state). A role written with wildcards gives a status
subresource away with the object: the box's owner could declare a VM of their own
gtvp-composed, or reset a Mismatch."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from gtvp_local.controlplane import ADMIN, OPERATOR, ControlPlane, Identity, agent_identity
from gtvp_local.pool import apply_manifests
from tests.rbac import grant, pod_token_kubeconfig, until_refused

pytestmark = [pytest.mark.controlplane]

OWNER = Identity("gtvp-test-box-owner", (), "box-owner")
REFUSED = "is gtvp's to write"


@pytest.fixture(scope="module")
def wildcard_owner(control_plane: ControlPlane) -> None:
    apply_manifests(control_plane)
    grant(
        control_plane,
        "gtvp-test-box-owner",
        [{"apiGroups": ["gtvp.io"], "resources": ["*"], "verbs": ["*"]}],
        (OWNER,),
    )


def _box(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "gtvp.io/v1alpha1",
        "kind": "LazyBox",
        "metadata": {"name": name},
        "spec": {
            "application": {"name": "nginx"},
            "level": 2,
            "resources": {"cpu": "500m", "memory": "512Mi"},
        },
    }


def _patch_status(cp: ControlPlane, ns: str, status: Any, who: Identity) -> Any:
    return cp.kubectl(
        "patch", "lazybox", "box", "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}), identity=who, check=False,
    )  # fmt: skip


@pytest.mark.usefixtures("wildcard_owner")
def test_a_box_owner_with_every_right_on_gtvp_io_cannot_write_its_status(
    control_plane: ControlPlane, namespace: str
) -> None:
    made = control_plane.kubectl(
        "create", "-n", namespace, "-f", "-", input_text=json.dumps(_box("box")),
        identity=OWNER, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr  # the object itself is theirs
    forged = {"composedBoots": ["ab" * 32]}  # a composition of their own, as gtvp's
    until_refused(
        control_plane, "gtvp-status-writes", REFUSED, "patch", "lazybox", "box", "-n",
        namespace, "--subresource=status", "--type=merge", "-p", json.dumps({"status": forged}),
        identity=OWNER,
    )  # fmt: skip
    refused = _patch_status(control_plane, namespace, {"phase": "Running"}, OWNER)
    assert refused.returncode != 0
    assert f"the status of LazyBox box {REFUSED}" in refused.stderr
    assert "gtvp-test-box-owner may not" in refused.stderr
    # the operator writes it, and so may a break-glass administrator
    for who in (OPERATOR, ADMIN):
        ok = _patch_status(control_plane, namespace, {"phase": "Pending"}, who)
        assert ok.returncode == 0, (who.user, ok.stderr)


def test_an_agent_granted_more_than_its_member_still_writes_no_box_status(
    control_plane: ControlPlane, namespace: str
) -> None:
    """The agents' exemption is for their Member's status only (gtvp-agent-writes bounds
    it): root on a host whose agent account some wildcard or aggregated role gives more
    must still not write a box's composedBoots or attestation, which key release reads."""
    apply_manifests(control_plane)
    agent = agent_identity(f"host-{uuid.uuid4().hex[:6]}")
    grant(control_plane, "gtvp-test-wide-agent",
          [{"apiGroups": ["gtvp.io"], "resources": ["*"], "verbs": ["*"]}], (agent,))  # fmt: skip
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input_text=json.dumps(_box("box")))
    forged = {"composedBoots": ["ab" * 32]}
    until_refused(
        control_plane, "gtvp-status-writes", REFUSED, "patch", "lazybox", "box", "-n",
        namespace, "--subresource=status", "--type=merge", "-p", json.dumps({"status": forged}),
        identity=agent,
    )  # fmt: skip
    refused = _patch_status(control_plane, namespace, forged, agent)
    assert refused.returncode != 0
    assert f"the status of LazyBox box {REFUSED}" in refused.stderr


@pytest.mark.usefixtures("wildcard_owner")
def test_a_role_on_members_cannot_write_a_verdict(control_plane: ControlPlane) -> None:
    """A role meant to approve EKs (spec.approval), written as members/*, would otherwise
    write status.trust: a Trusted verdict that admission reads."""
    name = "status-writes-member"
    control_plane.apply(
        {"apiVersion": "gtvp.io/v1alpha1", "kind": "Member", "metadata": {"name": name},
         "spec": {"identity": 3}}
    )  # fmt: skip
    verdict = {"trust": {"verdict": "Trusted", "expiresAt": "2099-01-01T00:00:00Z"}}
    until_refused(
        control_plane, "gtvp-status-writes", REFUSED, "patch", "member", name,
        "--subresource=status", "--type=merge", "-p", json.dumps({"status": verdict}),
        identity=OWNER,
    )  # fmt: skip
    refused = control_plane.kubectl(
        "patch", "member", name, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": verdict}), identity=OWNER, check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert f"the status of Member {name} {REFUSED}" in refused.stderr
    # an administrator's spec edit (the approval) is still theirs
    approve = {"spec": {"approval": {"ekSHA256": "ab" * 32, "approvedBy": "ops"}}}
    ok = control_plane.kubectl(
        "patch", "member", name, "--type=merge", "-p", json.dumps(approve),
        identity=OWNER, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    control_plane.kubectl("delete", "member", name, check=False)


@pytest.mark.usefixtures("wildcard_owner")
def test_a_service_account_named_like_the_agent_elsewhere_is_no_agent(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    """Someone who may create pods in a namespace, and holds a role written as members/*,
    makes a ServiceAccount `gtvp-agent` there and a pod of it on node X: its token names X,
    and a name match on `:gtvp-agent` would take it for X's agent, free to withdraw X's
    enrolment (X Untrusted at once; on an autoRecover: false level until a human readmits
    it). Only the agents' own account (here: their client certificates) is an agent."""
    node = f"spoofed-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}))  # fmt: skip
    control_plane.apply(
        {"apiVersion": "gtvp.io/v1alpha1", "kind": "Member", "metadata": {"name": node},
         "spec": {"identity": 3}}
    )  # fmt: skip
    account = "gtvp-agent"
    control_plane.kubectl("create", "serviceaccount", account, "-n", namespace)
    user = f"system:serviceaccount:{namespace}:{account}"
    grant(control_plane, f"gtvp-test-{namespace}-agent",
          [{"apiGroups": ["gtvp.io"], "resources": ["*"], "verbs": ["*"]}],
          (Identity(user, (), account),))  # fmt: skip
    kubeconfig = pod_token_kubeconfig(
        control_plane, namespace, account, node, "fake-agent", tmp_path / "fake-agent.kubeconfig"
    )
    withdrawn = {"status": {"agent": {"enrolment": None, "heartbeatTime": "2026-12-05T00:00:00Z"}}}

    def patch(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(control_plane.bin.kubectl), f"--kubeconfig={kubeconfig}", "patch", "member",
             node, "--subresource=status", "--type=merge", "-p", json.dumps(withdrawn), *extra],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    try:
        deadline = time.monotonic() + 15  # a policy just applied loads a moment later
        while patch("--dry-run=server").returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        refused = patch()
        assert refused.returncode != 0, refused.stdout
        assert REFUSED in refused.stderr
        assert f"{user} may not" in refused.stderr
    finally:
        control_plane.kubectl("delete", "member", node, check=False)
        control_plane.kubectl("delete", "node", node, check=False)


@pytest.mark.usefixtures("wildcard_owner")
def test_an_agent_granted_more_cannot_readmit_its_own_member(
    control_plane: ControlPlane,
) -> None:
    """gtvp.io/readmit on a Member is an administrator's word that its host may be judged
    again after a reboot or a rollback on a level that does not recover on its own: root on
    a host whose agent account some wildcard role lets update Members wrote it on its own
    Member (found by a review). Its status (status.agent) is still its own to write."""
    apply_manifests(control_plane)
    node = f"host-{uuid.uuid4().hex[:6]}"
    agent = agent_identity(node)
    grant(control_plane, "gtvp-test-wide-agent-members",
          [{"apiGroups": ["gtvp.io"], "resources": ["*"], "verbs": ["*"]}], (agent,))  # fmt: skip
    control_plane.apply(
        {"apiVersion": "gtvp.io/v1alpha1", "kind": "Member", "metadata": {"name": node},
         "spec": {"identity": 3}}
    )  # fmt: skip
    try:
        needle = f"may not change the annotations, labels, finalizers or owners of Member {node}"
        for what in (("annotate", "member", node, "gtvp.io/readmit=2026-12-05T00:00:00Z"),
                     ("label", "member", node, "gtvp.io/anything=x")):  # fmt: skip
            until_refused(control_plane, "gtvp-agent-writes", needle, *what, identity=agent)
            refused = control_plane.kubectl(*what, identity=agent, check=False)
            assert refused.returncode != 0
            assert needle in refused.stderr
        heartbeat = {"status": {"agent": {"heartbeatTime": "2026-12-05T00:00:00Z"}}}
        ok = control_plane.kubectl(
            "patch", "member", node, "--subresource=status", "--type=merge",
            "-p", json.dumps(heartbeat), identity=agent, check=False,
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
    finally:
        control_plane.kubectl("delete", "member", node, check=False)
