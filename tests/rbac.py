"""RBAC for the identities the admission-policy tests act as: a ClusterRole and a binding to
those users, so that what refuses them is the policy under test, not a missing permission;
and a wait until a policy just applied refuses what it should."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gtvp_local.controlplane import ControlPlane, Identity

RBAC = "rbac.authorization.k8s.io"


def grant(
    cp: ControlPlane, name: str, rules: Sequence[Mapping[str, Any]], users: Iterable[Identity]
) -> None:
    """ClusterRole `name` with `rules`, bound to `users` (applied: a rerun changes nothing)."""
    role = {
        "apiVersion": f"{RBAC}/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": list(rules),
    }
    binding = {
        "apiVersion": f"{RBAC}/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "subjects": [{"apiGroup": RBAC, "kind": "User", "name": who.user} for who in users],
        "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": name},
    }
    for obj in (role, binding):
        cp.kubectl("apply", "-f", "-", input_text=json.dumps(obj))


def until_refused(cp: ControlPlane, policy: str, needle: str, *args: str, **kwargs: Any) -> None:
    """The API server loads a new or changed policy a moment after the write: wait until
    this request (as a server-side dry run, which passes admission and stores nothing) is
    refused saying `needle`."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        out = cp.kubectl(*args, "--dry-run=server", check=False, **kwargs)
        if out.returncode != 0 and needle in out.stderr:
            return
        time.sleep(0.2)
    raise AssertionError(f"the {policy} policy never took effect")


def pod_token_kubeconfig(
    cp: ControlPlane, namespace: str, account: str, node: str, pod: str, path: Path
) -> Path:
    """A kubeconfig at `path` holding what root on `node` finds there: the token of
    `account` (an existing ServiceAccount of `namespace`) bound to a pod `pod` of it on that
    node, which the API server turns into a user naming the node
    (`authentication.kubernetes.io/node-name`)."""
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod, "namespace": namespace},
        "spec": {"nodeName": node, "serviceAccountName": account,
                 "containers": [{"name": "c", "image": "x"}]},
    }  # fmt: skip
    cp.kubectl("create", "-f", "-", input_text=json.dumps(body))
    token = cp.kubectl(
        "create", "token", account, "-n", namespace,
        "--bound-object-kind=Pod", f"--bound-object-name={pod}",
    ).stdout.strip()  # fmt: skip
    cp.write_kubeconfig(path, account, {"token": token})
    return path
