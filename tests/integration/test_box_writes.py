"""What the box loop writes when the API server refuses a box's VirtualMachine.

Against the real API server and KubeVirt's real CRDs: a composed VM the server refuses makes
the box Failed with the server's words, and the rest of its status stays (what it resolved,
the compositions gtvp vouches for, its attestation): the status is written as a whole, so a
write of phase and message alone would remove them, and the next pass would take a running
box for one gtvp never recorded.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gtvp import kube
from gtvp.core.api_resources import LAZY_BOXES
from gtvp.core.components import parse_component
from gtvp.core.compose import BoxRef, compose_vm
from gtvp.core.resolve import BoxRequest, resolve
from gtvp.handlers import box_writes, lazyboxes
from gtvp.runtime import OperatorSettings, Runtime
from gtvp_local.controlplane import ControlPlane
from tests.catalogue import Publisher

pytestmark = [pytest.mark.controlplane]

SPEC: dict[str, Any] = {
    "application": {"name": "nginx"},
    "level": 2,
    "resources": {"cpu": "500m", "memory": "512Mi"},
}


def _box(control_plane: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    """A LazyBox of `name` (SPEC), as the API server made it."""
    box = {
        "apiVersion": LAZY_BOXES.api_version,
        "kind": LAZY_BOXES.kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": SPEC,
    }
    out = control_plane.kubectl("create", "-o", "json", "-f", "-", input_text=json.dumps(box))
    made: dict[str, Any] = json.loads(out.stdout)
    return made


def test_a_refused_vm_fails_the_box_and_keeps_the_rest_of_its_status(
    control_plane: ControlPlane, operator_clients: kube.Clients, namespace: str
) -> None:
    rt = Runtime(settings=OperatorSettings(policy_name="p"), clients=operator_clients)
    _box(control_plane, namespace, "web")
    kept = {
        "phase": "Running",
        "resolved": [{"name": "nginx", "version": "1.26.2", "digest": "sha256:" + "a" * 64}],
        "composedBoots": ["b" * 64],
        "composedAt": "2026-12-04T06:00:00Z",
    }
    written = kube.patch_status(operator_clients, LAZY_BOXES, "web", kept, namespace)
    rt.view.observe_box(dict(written), "ADDED")
    comps = resolve(
        BoxRequest.from_spec(SPEC), [parse_component(o) for o in Publisher().web_catalogue()]
    )
    uid = str(written["metadata"]["uid"])
    vm = compose_vm(BoxRef("web", namespace, uid), SPEC, comps, None)
    vm["spec"]["template"]["spec"]["domain"]["devices"]["disks"] = "one"  # not a list: refused
    assert not box_writes.write_vm(rt, (namespace, "web"), vm)
    got = kube.get_if_present(operator_clients, LAZY_BOXES, "web", namespace)
    assert got is not None
    status = got["status"]
    assert status["phase"] == "Failed"
    assert "refused the composed VirtualMachine" in status["message"]
    assert {k: status.get(k) for k in ("resolved", "composedBoots", "composedAt")} == {
        k: kept[k] for k in ("resolved", "composedBoots", "composedAt")
    }


def _plain(kind: str, name: str, namespace: str) -> dict[str, Any]:
    """A colleague's own VM (or standalone VMI), made without gtvp."""
    spec: dict[str, Any] = {"domain": {"devices": {}, "memory": {"guest": "64Mi"}}}
    if kind == "VirtualMachineInstance":
        return {
            "apiVersion": "kubevirt.io/v1",
            "kind": kind,
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"runStrategy": "Always", "template": {"spec": spec}},
    }


@pytest.mark.parametrize("kind", ["VirtualMachine", "VirtualMachineInstance"])
def test_a_box_named_after_a_colleagues_vm_leaves_that_vm_alone(
    control_plane: ControlPlane, operator_clients: kube.Clients, namespace: str, kind: str
) -> None:
    """Whoever may create LazyBoxes must not get gtvp to replace, restart or delete a VM
    (or VMI) of that name that is not the box's: the box fails and says why."""
    theirs = json.loads(
        control_plane.kubectl(
            "create", "-o", "json", "-f", "-", input_text=json.dumps(_plain(kind, "db", namespace))
        ).stdout
    )
    made = _box(control_plane, namespace, "db")
    rt = Runtime(settings=OperatorSettings(policy_name="p"), clients=operator_clients)
    rt.view.observe_box(made, "ADDED")
    if kind == "VirtualMachine":
        rt.view.observe_vm(theirs, "ADDED")
    else:
        rt.view.observe_vmi(theirs, "ADDED")
    key = (namespace, "db")
    decision = lazyboxes.reconcile_box(rt, key)
    assert decision is not None
    assert decision.vm is None
    assert not decision.restart
    got = kube.get_if_present(operator_clients, LAZY_BOXES, "db", namespace)
    assert got is not None
    assert got["status"]["phase"] == "Failed"
    assert "not own" in got["status"]["message"] or "not control" in got["status"]["message"]
    placed = next(c for c in got["status"]["conditions"] if c["type"] == "Placed")
    assert placed["reason"] == "VMNameTaken"
    box_writes.delete_vm(rt, key, str(made["metadata"]["uid"]))  # the box deleted
    resource = "vm" if kind == "VirtualMachine" else "vmi"
    now = json.loads(
        control_plane.kubectl("get", resource, "db", "-n", namespace, "-o", "json").stdout
    )
    assert now["metadata"]["uid"] == theirs["metadata"]["uid"]
    assert now["metadata"]["resourceVersion"] == theirs["metadata"]["resourceVersion"]


def test_a_vm_still_being_deleted_is_waited_for_not_replaced(
    control_plane: ControlPlane, operator_clients: kube.Clients, namespace: str
) -> None:
    """A box whose level was lowered gets a new VM (its level label cannot go down on an
    update); KubeVirt keeps the old one, being deleted, while its VMI shuts down. gtvp
    waits for it to go instead of replacing it (which admission would refuse, failing the
    box), and creates the new one then."""
    rt = Runtime(settings=OperatorSettings(policy_name="p"), clients=operator_clients)
    made = _box(control_plane, namespace, "held")
    rt.view.observe_box(made, "ADDED")
    comps = resolve(
        BoxRequest.from_spec(SPEC), [parse_component(o) for o in Publisher().web_catalogue()]
    )
    ref = BoxRef("held", namespace, str(made["metadata"]["uid"]))
    old = compose_vm(ref, SPEC, comps, None)
    old["metadata"]["finalizers"] = ["example.com/hold"]  # as KubeVirt's, while its VMI goes
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(old))
    control_plane.kubectl("delete", "vm", "held", "-n", namespace, "--wait=false")
    new = compose_vm(ref, SPEC, comps, "node-x")
    assert not box_writes.write_vm(rt, (namespace, "held"), new)
    status = (kube.get_if_present(operator_clients, LAZY_BOXES, "held", namespace) or {}).get(
        "status"
    ) or {}
    assert status.get("phase") != "Failed"
    assert status.get("message") == box_writes.WAITING_FOR_DELETION  # said, not silent
    control_plane.kubectl(
        "patch", "vm", "held", "-n", namespace, "--type=merge", "-p",
        json.dumps({"metadata": {"finalizers": None}}),
    )  # fmt: skip
    assert box_writes.write_vm(rt, (namespace, "held"), compose_vm(ref, SPEC, comps, "node-x"))
