"""Migrations under way and the pre-fetch waits before them, against the real API server:
what a host's root can write must not keep a gated VM where it may not be.

- KubeVirt records a migration's target from the VMI's status, which a host's virt-handler
  token writes: gtvp also judges the node of the target launcher pod KubeVirt made for the
  migration, and deletes the migration when that node lost trust.
- A migration spends one use of its target's verdict: its own spend (the last use) does not
  make gtvp delete it at its next event.
- A pre-fetch request on the target's Node is writable by hosts: a request rewritten into the
  future, or removed, neither moves nor restarts the wait; past the bound the box moves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

import kopf
import pytest

from gtvp import kube
from gtvp.core.api_resources import MEMBERS, MIGRATIONS
from gtvp.core.component_checks import Check
from gtvp.core.compose import BOX_LABEL
from gtvp.core.evacuation import EVACUATION_LABEL, HOSTNAME_LABEL
from gtvp.core.prefetch import ANNOTATION, requests_on
from gtvp.core.timestamps import format_ts
from gtvp.handlers import attestation, launcher_pod_event, prefetch
from gtvp.handlers.evacuation import judge_migration, rejudge_migrations_to
from gtvp.runtime import OperatorSettings, Runtime
from gtvp_local.controlplane import ControlPlane
from tests.catalogue import Publisher
from tests.launcher_pods import create_launcher_pod

pytestmark = [pytest.mark.controlplane]


@pytest.fixture
def rt(operator_clients: kube.Clients) -> Runtime:
    runtime = Runtime(settings=OperatorSettings(policy_name="inflight"), clients=operator_clients)
    runtime.view.loaded = True
    return runtime


def _status(level: int, uses: int, *, trusted: bool = True) -> dict[str, Any]:
    if not trusted:
        return {"phase": "Untrusted", "level": 0}
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    return {"phase": "Trusted", "level": level,
            "trust": {"expiresAt": format_ts(expires), "usesLeft": uses}}  # fmt: skip


@pytest.fixture
def members(control_plane: ControlPlane, rt: Runtime) -> Iterator[dict[str, str]]:
    """Members on the API server, in the runtime's view: `good` (Trusted, level 3, one use
    left), `other` (Trusted, level 3) and `bad` (Untrusted)."""
    tag = uuid.uuid4().hex[:6]
    names = {role: f"{role}-{tag}" for role in ("good", "other", "bad")}
    statuses = {"good": _status(3, 1), "other": _status(3, 5), "bad": _status(0, 0, trusted=False)}
    try:
        for role, name in names.items():
            body = {"apiVersion": MEMBERS.api_version, "kind": MEMBERS.kind,
                    "metadata": {"name": name}, "spec": {"identity": 3}}  # fmt: skip
            control_plane.kubectl("create", "-f", "-", input_text=json.dumps(body))
            patch = json.dumps({"status": statuses[role]})
            control_plane.kubectl("patch", "member", name, "--subresource=status",
                                  "--type=merge", "-p", patch)  # fmt: skip
            _refresh(rt, name)
        yield names
    finally:
        for name in names.values():
            control_plane.kubectl("delete", "member", name, "--ignore-not-found", "--wait=false")


def _refresh(rt: Runtime, member: str) -> dict[str, Any]:
    got = kube.get_if_present(rt.clients, MEMBERS, member)
    assert got is not None
    rt.view.remember_member(member, got)
    return got


def _gated_vmi(rt: Runtime, namespace: str, name: str) -> dict[str, Any]:
    vmi = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "labels": {"gtvp.io/level": "3", BOX_LABEL: name},
        },
        "spec": {"domain": {"devices": {}, "memory": {"guest": "64Mi"}}},
        "status": {"phase": "Running", "nodeName": "src"},
    }
    rt.view.observe_vmi(vmi, "ADDED")
    return vmi


def _migration(
    cp: ControlPlane, rt: Runtime, namespace: str, vmi: str, *, phase: str, target: str | None
) -> dict[str, Any]:
    """A migration on the server (as an administrator: its status as KubeVirt would have
    written it, `target` copied from the VMI's migrationState), in the runtime's view."""
    body = {"apiVersion": MIGRATIONS.api_version, "kind": MIGRATIONS.kind,
            "metadata": {"name": f"mig-{uuid.uuid4().hex[:6]}", "namespace": namespace},
            "spec": {"vmiName": vmi}}  # fmt: skip
    made = json.loads(cp.kubectl("create", "-o", "json", "-f", "-",
                                 input_text=json.dumps(body)).stdout)  # fmt: skip
    made["status"] = {"phase": phase, "migrationState": {"sourceNode": "src", "targetNode": target}}
    rt.view.observe_migration(made, "MODIFIED")
    return made


def _target_pod(
    cp: ControlPlane, rt: Runtime, namespace: str, vmi: dict[str, Any], mig: dict[str, Any],
    node: str,
) -> None:  # fmt: skip
    """The target launcher pod KubeVirt makes for `mig`, bound to `node`."""
    made = create_launcher_pod(cp, namespace, vmi, node, migration_uid=mig["metadata"]["uid"])
    rt.view.observe_pod(made, "ADDED")


def _exists(rt: Runtime, mig: dict[str, Any]) -> bool:
    meta = mig["metadata"]
    return kube.get_if_present(rt.clients, MIGRATIONS, meta["name"], meta["namespace"]) is not None


def test_a_migration_spending_its_targets_last_use_is_not_aborted_by_it(
    control_plane: ControlPlane, rt: Runtime, namespace: str, members: dict[str, str]
) -> None:
    """The target's verdict has one use left (maxUses 1): the migration spends it when
    KubeVirt prepares the target, and must still be there once it runs."""
    good = members["good"]
    vmi = _gated_vmi(rt, namespace, "db")
    mig = _migration(control_plane, rt, namespace, "db", phase="PreparingTarget", target=good)
    _target_pod(control_plane, rt, namespace, vmi, mig, good)
    asyncio.run(judge_migration(rt, mig))
    assert _refresh(rt, good)["status"]["trust"]["usesLeft"] == 0  # spent, once
    running = {**mig, "status": {**mig["status"], "phase": "Running"}}
    rt.view.observe_migration(running, "MODIFIED")
    asyncio.run(judge_migration(rt, running))
    assert _exists(rt, mig)
    # a restarted operator sees the migration first: its use was spent, nothing more
    restarted = Runtime(settings=rt.settings, clients=rt.clients)
    restarted.view = rt.view
    asyncio.run(judge_migration(restarted, running))
    assert _exists(rt, mig)
    assert _refresh(rt, good)["status"]["trust"]["usesLeft"] == 0


def test_a_target_forged_in_the_vmis_status_does_not_save_a_migration_to_an_untrusted_host(
    control_plane: ControlPlane, rt: Runtime, namespace: str, members: dict[str, str]
) -> None:
    """Root on the target host names a Trusted member as the migration's target (through
    the VMI's migrationState, which its virt-handler token may write): the target pod KubeVirt
    bound to that host still counts, and the migration is deleted."""
    vmi = _gated_vmi(rt, namespace, "web")
    mig = _migration(control_plane, rt, namespace, "web", phase="Running", target=members["other"])
    _target_pod(control_plane, rt, namespace, vmi, mig, members["bad"])
    asyncio.run(rejudge_migrations_to(rt, members["bad"]))  # the host's verdict changed
    assert not _exists(rt, mig)
    assert _refresh(rt, members["other"])["status"]["trust"]["usesLeft"] == 5  # not spent


def _box(rt: Runtime, namespace: str, name: str) -> None:
    """A placed box in the view whose components are signed and verified."""
    catalogue = Publisher().web_catalogue()[:3]
    for body in catalogue:
        rt.view.components[body["metadata"]["name"]] = body
        rt.boxes.checks[body["metadata"]["name"]] = Check("Verified", "Verified", "")
    resolved = [{"digest": c["spec"]["digest"], "sizeBytes": c["spec"]["sizeBytes"]}
                for c in catalogue]  # fmt: skip
    rt.view.boxes[(namespace, name)] = {"metadata": {"name": name, "namespace": namespace},
                                        "status": {"resolved": resolved}}  # fmt: skip
    _gated_vmi(rt, namespace, name)


def _node(cp: ControlPlane, rt: Runtime, name: str) -> dict[str, Any]:
    got: dict[str, Any] = json.loads(cp.kubectl("get", "node", name, "-o", "json").stdout)
    rt.view.observe_node(got, "MODIFIED")
    return got


def test_a_host_rewriting_or_removing_the_prefetch_request_does_not_hold_the_box(
    control_plane: ControlPlane,
    rt: Runtime,
    namespace: str,
    cluster_names: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Root on the box's untrusted member rewrites the target Node's request to 2099 (or
    deletes it), with the node-patching token of a daemon there: the wait still counts from
    gtvp's ask, the request is written back as gtvp made it, and past the bound the
    migration goes."""
    monkeypatch.setenv(prefetch.EVACUATION_TIMEOUT_ENV, "60")
    target = f"fetcher-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": target}}))  # fmt: skip
    cluster_names.append(f"node/{target}")
    _node(control_plane, rt, target)
    _box(rt, namespace, "web")
    planned = {
        "metadata": {"namespace": namespace, "name": "web-evac",
                     "labels": {EVACUATION_LABEL: "bad"}},
        "spec": {"vmiName": "web", "addedNodeSelector": {HOSTNAME_LABEL: target}},
    }  # fmt: skip
    first = asyncio.run(prefetch.hold(rt, planned, "evacuation"))
    assert first is not None
    assert first.action == "request"
    asked = requests_on(_node(control_plane, rt, target))[f"{namespace}/web"]
    forged = json.loads(json.dumps(json.loads(
        _node(control_plane, rt, target)["metadata"]["annotations"][ANNOTATION])))  # fmt: skip
    forged[f"{namespace}/web"]["requestedAt"] = "2099-01-01T00:00:00Z"
    for value in (json.dumps(forged), None):  # rewritten, then removed
        args = [f"{ANNOTATION}={value}"] if value else [f"{ANNOTATION}-"]
        control_plane.kubectl("annotate", "node", target, "--overwrite", *args)
        _node(control_plane, rt, target)
        again = asyncio.run(prefetch.hold(rt, planned, "evacuation"))
        assert again is not None
        assert again.action == "wait"
        back = requests_on(_node(control_plane, rt, target))[f"{namespace}/web"]
        assert back.requested_at == asked.requested_at  # gtvp's request, written back
    key = (f"{namespace}/web", target)  # the bound passes (no sleep: the wait is gtvp's)
    rt.prefetch_asked[key] = dataclasses.replace(
        rt.prefetch_asked[key], requested_at=asked.requested_at - dt.timedelta(seconds=61)
    )
    last = asyncio.run(prefetch.hold(rt, planned, "evacuation"))
    assert last is not None
    assert (last.action, last.timed_out) == ("migrate", True)


def test_a_migration_to_a_node_whose_member_is_deleted_is_aborted_at_once(
    control_plane: ControlPlane,
    operator_clients: kube.Clients,
    namespace: str,
    cluster_names: list[str],
) -> None:
    """A Member deleted (to enrol its host afresh, or by mistake) while a gated VM migrates
    to its Node: the Node has no verdict from then on, and the migration is deleted then,
    not at KubeVirt's next update of it."""
    settings = OperatorSettings(policy_name="inflight", create_members=False)
    rt = Runtime(settings=settings, clients=operator_clients)
    rt.view.loaded = True
    name = f"memberless-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}))  # fmt: skip
    cluster_names.append(f"node/{name}")
    _node(control_plane, rt, name)
    vmi = _gated_vmi(rt, namespace, "db")
    mig = _migration(control_plane, rt, namespace, "db", phase="Running", target=name)
    _target_pod(control_plane, rt, namespace, vmi, mig, name)
    asyncio.run(attestation._untrust_memberless_node(rt, name))  # judged as a bare Node
    assert not _exists(rt, mig)


def test_a_target_pod_bound_to_an_untrusted_node_aborts_its_migration_at_once(
    control_plane: ControlPlane, rt: Runtime, namespace: str, members: dict[str, str]
) -> None:
    """The migration's last event named a Trusted target (forged in the VMI's status);
    KubeVirt's target pod is then bound to a host that lost trust: the pod's own event
    judges the migration by that node, without waiting for the migration's next update."""
    vmi = _gated_vmi(rt, namespace, "api")
    mig = _migration(
        control_plane, rt, namespace, "api", phase="Scheduled", target=members["other"]
    )
    made = create_launcher_pod(
        control_plane, namespace, vmi, members["bad"], migration_uid=mig["metadata"]["uid"]
    )
    asyncio.run(launcher_pod_event(body=kopf.Body(made), type="ADDED", memo=kopf.Memo(runtime=rt)))
    assert not _exists(rt, mig)
