"""A VMI's virt-launcher pod on the real API server, as KubeVirt's virt-controller makes it
(created here by the administrator, whom the gtvp-launcher-pods policy lets too): the tests
of where gtvp holds a VMI to run whatever its status says."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gtvp_local.controlplane import ControlPlane


def create_launcher_pod(
    cp: ControlPlane,
    namespace: str,
    vmi: Mapping[str, Any],
    node: str,
    *,
    migration_uid: str | None = None,
) -> dict[str, Any]:
    """A launcher pod of `vmi` (its name and uid) bound to `node` (the target pod of the
    migration with `migration_uid`, if given); the pod as created."""
    cp.kubectl("create", "serviceaccount", "default", "-n", namespace, check=False)  # no KCM
    meta = vmi["metadata"]
    owner = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"virt-launcher-{meta['name']}-",
            "namespace": namespace,
            "labels": {
                "kubevirt.io": "virt-launcher",
                "kubevirt.io/created-by": meta["uid"],
                **({"kubevirt.io/migrationJobUID": migration_uid} if migration_uid else {}),
            },
            "ownerReferences": [owner],
        },
        "spec": {"nodeName": node, "containers": [{"name": "compute", "image": "x"}]},
    }
    made: dict[str, Any] = json.loads(
        cp.kubectl("create", "-o", "json", "-f", "-", input_text=json.dumps(pod)).stdout
    )
    return made
