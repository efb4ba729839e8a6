"""Only the operator sets gtvp's trust labels on a Node (ValidatingAdmissionPolicy
gtvp-node-trust-labels, enforced by the real API server).

The NodeRestriction plugin stops a kubelet from writing labels under
node-restriction.kubernetes.io/, but other identities on a host may patch its Node: KubeVirt's
virt-handler has `patch` on every Node, CNI daemons often do too. Root on an untrusted host
holds their tokens; with them it could label its own Node trusted between two of the
operator's passes, and a gated VM scheduled in that moment would start there."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from gtvp.core.trust import LEVEL_LABEL, TRUSTED_LABEL
from gtvp_local.controlplane import ADMIN, OPERATOR, ControlPlane, Identity
from gtvp_local.pool import apply_manifests
from tests.rbac import grant, pod_token_kubeconfig, until_refused

pytestmark = [pytest.mark.controlplane]

HANDLER = Identity("system:serviceaccount:kubevirt:kubevirt-handler", (), "kv-handler")
"""What root on a host holds when KubeVirt's virt-handler runs there: `patch` on Nodes."""


@pytest.fixture(scope="module")
def node_patchers(control_plane: ControlPlane) -> None:
    apply_manifests(control_plane)
    grant(control_plane, "gtvp-test-node-patcher",
          [{"apiGroups": [""], "resources": ["nodes", "nodes/status"],
            "verbs": ["get", "list", "patch", "update"]}], (HANDLER,))  # fmt: skip


@pytest.fixture
def node(control_plane: ControlPlane, cluster_names: list[str]) -> str:
    name = f"labels-{uuid.uuid4().hex[:6]}"
    body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(body))
    cluster_names.append(f"node/{name}")
    return name


def _label(cp: ControlPlane, node: str, labels: dict[str, Any], who: Identity, *sub: str) -> Any:
    patch = json.dumps({"metadata": {"labels": labels}})
    return cp.kubectl(
        "patch", "node", node, *sub, "--type=merge", "-p", patch, identity=who, check=False
    )


def _until_refused(cp: ControlPlane, node: str) -> None:
    until_refused(
        cp, "gtvp-node-trust-labels", "may remove them but not set or change them",
        "patch", "node", node, "--type=merge",
        "-p", json.dumps({"metadata": {"labels": {TRUSTED_LABEL: "true"}}}), identity=HANDLER,
    )  # fmt: skip


@pytest.mark.usefixtures("node_patchers")
def test_another_identity_on_the_host_cannot_label_its_node_trusted(
    control_plane: ControlPlane, node: str
) -> None:
    _until_refused(control_plane, node)
    for labels, sub in (
        ({TRUSTED_LABEL: "true"}, ()),
        ({f"{LEVEL_LABEL}3": "true"}, ()),
        ({TRUSTED_LABEL: "true"}, ("--subresource=status",)),  # a status write keeps labels
    ):
        refused = _label(control_plane, node, labels, HANDLER, *sub)
        assert refused.returncode != 0, (labels, sub)
        assert f"say that gtvp verified Node {node}" in refused.stderr
        assert "kubevirt-handler may remove them but not set or change them" in refused.stderr
    assert _label(control_plane, node, {"example.com/rack": "r1"}, HANDLER).returncode == 0
    ok = _label(control_plane, node, {TRUSTED_LABEL: "true", f"{LEVEL_LABEL}1": "true"}, OPERATOR)
    assert ok.returncode == 0, ok.stderr
    changed = _label(control_plane, node, {f"{LEVEL_LABEL}1": "yes"}, HANDLER)
    assert changed.returncode != 0
    # taking trust away is always allowed: it only fails closed
    removed = _label(control_plane, node, {TRUSTED_LABEL: None}, HANDLER)
    assert removed.returncode == 0, removed.stderr
    assert _label(control_plane, node, {TRUSTED_LABEL: "true"}, ADMIN).returncode == 0


RULE_LABEL = "node-restriction.kubernetes.io/hardware"
"""A label a SecurityPolicy's transitions may match (a member's class and level)."""


def _host_token(cp: ControlPlane, namespace: str, node: str, tmp_path: Path) -> Path:
    """A kubeconfig holding what root on `node` finds there: the token of a pod's service
    account (a CNI daemon's, virt-handler's) bound to a pod on that node, which the API
    server turns into a user naming the node; the account may patch Nodes."""
    account = "node-daemon"
    cp.kubectl("create", "serviceaccount", account, "-n", namespace)
    grant(cp, f"gtvp-test-{namespace}", [{"apiGroups": [""], "resources": ["nodes", "nodes/status"],
          "verbs": ["get", "patch", "delete"]}],
          (Identity(f"system:serviceaccount:{namespace}:{account}", (), account),))  # fmt: skip
    return pod_token_kubeconfig(
        cp, namespace, account, node, "daemon", tmp_path / "host.kubeconfig"
    )


def _patch_as(
    cp: ControlPlane, kubeconfig: Path, node: str, labels: dict[str, Any], *sub: str
) -> Any:
    return subprocess.run(
        [str(cp.bin.kubectl), f"--kubeconfig={kubeconfig}", "patch", "node", node, *sub,
         "--type=merge", "-p", json.dumps({"metadata": {"labels": labels}})],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.usefixtures("node_patchers")
def test_an_identity_on_the_host_cannot_pick_its_nodes_transition_labels(
    control_plane: ControlPlane, node: str, namespace: str, tmp_path: Path
) -> None:
    """A policy's transitions pick a member's class and level from its Node's labels under
    node-restriction.kubernetes.io/ (up to its identity's): the kubelet cannot set those,
    and no other identity of the host may set, change or remove them either."""
    _until_refused(control_plane, node)
    assert _label(control_plane, node, {RULE_LABEL: "tdx"}, ADMIN).returncode == 0
    host = _host_token(control_plane, namespace, node, tmp_path)
    for labels, sub in (
        ({RULE_LABEL: "sev"}, ()),
        ({RULE_LABEL: None}, ()),  # removing one can make a later rule match
        ({"node-restriction.kubernetes.io/rack": "r1"}, ()),
        ({RULE_LABEL: "sev"}, ("--subresource=status",)),  # a status write keeps labels
    ):
        refused = _patch_as(control_plane, host, node, labels, *sub)
        assert refused.returncode != 0, (labels, sub)
        assert (
            f"decide what a SecurityPolicy's transitions give Node {node}; "
            f"system:serviceaccount:{namespace}:node-daemon, an identity on node {node}, "
            "may not set, change or remove them"
        ) in refused.stderr
    assert _node_labels(control_plane, node)[RULE_LABEL] == "tdx"
    # other labels, and the Node's other fields, stay open to it
    allowed = _patch_as(control_plane, host, node, {"example.com/rack": "r1"})
    assert allowed.returncode == 0, allowed.stderr
    # an administrator still sets them; the operator's own trust labels stay the operator's
    assert _label(control_plane, node, {RULE_LABEL: "sev"}, ADMIN).returncode == 0
    assert _patch_as(control_plane, host, node, {TRUSTED_LABEL: "true"}).returncode != 0
    # nor may it delete its own Node, which would register again without them
    deleted = subprocess.run(
        [str(control_plane.bin.kubectl), f"--kubeconfig={host}", "delete", "node", node],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert deleted.returncode != 0
    assert "an identity on that node, may not delete it" in deleted.stderr
    assert _node_labels(control_plane, node)[RULE_LABEL] == "sev"


@pytest.mark.usefixtures("node_patchers")
def test_an_identity_on_the_host_cannot_make_its_node_look_like_the_control_plane(
    control_plane: ControlPlane, node: str, namespace: str, tmp_path: Path
) -> None:
    """The chart runs gtvp's operator, whose token writes verdicts, on nodes labelled
    node-role.kubernetes.io/control-plane: root on a host that labelled its own Node so
    would draw the operator there at its next reschedule, and take its token."""
    _until_refused(control_plane, node)
    host = _host_token(control_plane, namespace, node, tmp_path)
    role = "node-role.kubernetes.io/control-plane"
    for labels, sub in (({role: ""}, ()), ({role: ""}, ("--subresource=status",))):
        refused = _patch_as(control_plane, host, node, labels, *sub)
        assert refused.returncode != 0, sub
        assert "labels under node-role.kubernetes.io/ say which nodes run the control plane" in (
            refused.stderr
        )
    assert role not in _node_labels(control_plane, node)
    assert _label(control_plane, node, {role: ""}, ADMIN).returncode == 0  # kubeadm's way
    assert _patch_as(control_plane, host, node, {role: "x"}).returncode != 0
    # nor take it off (from the control plane's Nodes: the operator could run nowhere)
    removed = _patch_as(control_plane, host, node, {role: None})
    assert removed.returncode != 0
    assert "may not set, change or remove them" in removed.stderr
    assert _node_labels(control_plane, node)[role] == ""


@pytest.mark.usefixtures("node_patchers")
def test_an_identity_on_a_host_cannot_take_trust_from_another_hosts_node(
    control_plane: ControlPlane, cluster_names: list[str], namespace: str, tmp_path: Path
) -> None:
    """Root on one host, with a node daemon's token, would otherwise strip the trust labels
    of every other Node and keep gated VMs off the whole pool (until the operator's next
    pass, and again after it)."""
    own, other = (f"labels-{uuid.uuid4().hex[:6]}" for _ in range(2))
    for name in (own, other):
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}
        control_plane.kubectl("create", "-f", "-", input_text=json.dumps(body))
        cluster_names.append(f"node/{name}")
    _until_refused(control_plane, own)
    trusted = {TRUSTED_LABEL: "true", f"{LEVEL_LABEL}2": "true"}
    for name in (own, other):
        assert _label(control_plane, name, trusted, OPERATOR).returncode == 0
    host = _host_token(control_plane, namespace, own, tmp_path)
    for labels, sub in (
        ({TRUSTED_LABEL: None}, ()),
        ({f"{LEVEL_LABEL}2": None}, ("--subresource=status",)),
    ):
        refused = _patch_as(control_plane, host, other, labels, *sub)
        assert refused.returncode != 0, (labels, sub)
        assert (
            f"say that gtvp verified Node {other}; system:serviceaccount:{namespace}:node-daemon, "
            f"an identity on node {own}, may not remove them from another node"
        ) in refused.stderr
    assert _node_labels(control_plane, other).items() >= trusted.items()
    # its own Node's trust it may give up (that only fails closed), other labels stay open
    assert _patch_as(control_plane, host, own, {TRUSTED_LABEL: None}).returncode == 0
    assert TRUSTED_LABEL not in _node_labels(control_plane, own)
    assert _patch_as(control_plane, host, other, {"example.com/rack": "r2"}).returncode == 0
    # identities that are not on a host (a controller elsewhere, the handler's own user here)
    # still may remove them anywhere
    assert _label(control_plane, other, {TRUSTED_LABEL: None}, HANDLER).returncode == 0


def _node_labels(cp: ControlPlane, node: str) -> dict[str, str]:
    got: dict[str, str] = json.loads(cp.kubectl("get", "node", node, "-o", "json").stdout)[
        "metadata"
    ].get("labels", {})
    return got


def _boot_as(cp: ControlPlane, kubeconfig: Path | None, node: str, boot: str) -> Any:
    """Patch the Node's reported boot as `kubeconfig`'s user (the administrator: None)."""
    return subprocess.run(
        [str(cp.bin.kubectl), f"--kubeconfig={kubeconfig or cp.kubeconfig_for(ADMIN)}",
         "patch", "node", node, "--subresource=status",
         "--type=merge", "-p", json.dumps({"status": {"nodeInfo": {"bootID": boot}}})],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.usefixtures("node_patchers")
def test_an_identity_on_a_host_cannot_say_another_host_rebooted(
    control_plane: ControlPlane, cluster_names: list[str], namespace: str, tmp_path: Path
) -> None:
    """A Node's reported boot changing spends its member's verdict until a fresh quote (its
    Node's labels come off): root on one host, with a node daemon's token, would otherwise
    keep gated VMs off every other host by rewriting their bootIDs."""
    own, other = (f"boot-{uuid.uuid4().hex[:6]}" for _ in range(2))
    for name in (own, other):
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}
        control_plane.kubectl("create", "-f", "-", input_text=json.dumps(body))
        cluster_names.append(f"node/{name}")
        assert _boot_as(control_plane, None, name, "first").returncode == 0
    _until_refused(control_plane, own)
    host = _host_token(control_plane, namespace, own, tmp_path)
    refused = _boot_as(control_plane, host, other, "forged")
    assert refused.returncode != 0
    assert (
        f"status.nodeInfo.bootID tells gtvp that Node {other} rebooted; "
        f"system:serviceaccount:{namespace}:node-daemon, an identity on node {own}, may not "
        "change it on another node"
    ) in refused.stderr
    assert _boot(control_plane, other) == "first"
    assert _boot_as(control_plane, host, own, "second").returncode == 0  # its own, as kubelet
    assert _boot(control_plane, own) == "second"


def _boot(cp: ControlPlane, node: str) -> str:
    got = json.loads(cp.kubectl("get", "node", node, "-o", "json").stdout)
    return str(got["status"]["nodeInfo"]["bootID"])


@pytest.mark.usefixtures("node_patchers")
def test_an_identity_on_a_host_cannot_take_another_hosts_hostname(
    control_plane: ControlPlane,
    node: str,
    cluster_names: list[str],
    namespace: str,
    tmp_path: Path,
) -> None:
    """gtvp pins each of its migrations with kubernetes.io/hostname next to the trust
    labels: a Trusted host that labelled its own Node with another member's hostname
    (NodeRestriction lets a kubelet set it), or registered its Node again so labelled (a
    kubelet may delete its own Node), drew moves pinned there, charged to the other; one
    that took the label off another Node left every move pinned there unschedulable
    (found by reviews). Its own name, or the value it had, stays allowed."""
    _until_refused(control_plane, node)
    host = _host_token(control_plane, namespace, node, tmp_path)
    hostname = "kubernetes.io/hostname"
    said = f"may set it on Node {node} to that name only, and take it off its own Node only"
    refused = _patch_as(control_plane, host, node, {hostname: "another-member"})
    assert refused.returncode != 0
    assert said in refused.stderr
    assert _patch_as(control_plane, host, node, {hostname: node}).returncode == 0
    assert _patch_as(control_plane, host, node, {hostname: node}).returncode == 0  # kept
    assert _label(control_plane, node, {hostname: "renamed"}, ADMIN).returncode == 0
    assert _patch_as(control_plane, host, node, {"example.com/rack": "r2"}).returncode == 0
    # another Node's label stays; its own may come off
    other = f"labels-{uuid.uuid4().hex[:6]}"
    body = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": other, "labels": {hostname: other}}}  # fmt: skip
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(body))
    cluster_names.append(f"node/{other}")
    taken = _patch_as(control_plane, host, other, {hostname: None})
    assert taken.returncode != 0
    assert "take it off its own Node only" in taken.stderr
    assert _patch_as(control_plane, host, node, {hostname: None}).returncode == 0
    # a kubelet registering its Node again under another member's hostname
    again = f"labels-{uuid.uuid4().hex[:6]}"
    kubelet = Identity(f"system:node:{again}", ("system:nodes",), f"kubelet-{again}")
    for value, ok in ((other, False), (again, True)):
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": again, "labels": {hostname: value}}}  # fmt: skip
        made = control_plane.kubectl("create", "-f", "-", input_text=json.dumps(body),
                                     identity=kubelet, check=False)  # fmt: skip
        assert (made.returncode == 0) == ok, made.stderr
        assert ok or f"may set it on Node {again} to that name only" in made.stderr
    cluster_names.append(f"node/{again}")
