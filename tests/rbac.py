"""RBAC for the identities the admission-policy tests act as: a ClusterRole and a binding to
those users, so that what refuses them is the policy under test, not a missing permission."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
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
