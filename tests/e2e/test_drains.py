"""Drains finish for Lazy Boxes and gated External VMs: gtvp is the external eviction controller.

On `kubectl drain`, KubeVirt sets `status.evacuationNodeName` on a VMI with
`evictionStrategy: External` and waits for an external controller; gtvp live-migrates the
ones it gates to a Trusted, schedulable member of their level, and the drain ends once the
VMI runs there (KubeVirt clears the field). LiveMigrate VMIs stay KubeVirt's to move.

Real: kube-apiserver + etcd, KubeVirt's CRDs, one gtvp-agent per member on its own swtpm,
gtvp-operator with its webhooks, `kubectl cordon`. SIMULATED (no kubelet or KubeVirt here):
Nodes by kwok, and KubeVirt's virt-controller/virt-api by gtvp's stand-in
(`gtvp_local.virtsim`), which on a cordoned node does what virt-api's pod-eviction
webhook does when a drain evicts a virt-launcher pod (kwok nodes run no pods, so `kubectl
drain` would evict nothing: a cordon plus this simulated eviction is what runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gtvp_local.controlplane import ControlPlane
from gtvp_local.pool import Pool
from tests.e2e.test_lazyboxes import box, box_pool, get, ordinary_vm, running
from tests.e2e.test_trusted_pool import _vm
from tests.pools import wait_for as _wait

pytestmark = [pytest.mark.e2e, pytest.mark.controlplane, pytest.mark.tpm]
DRAIN = "gtvp.io/drain"


@pytest.fixture(scope="module")
def pool(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with box_pool(control_plane, tmp_path_factory.mktemp("drains"), tag="drain") as p:
        yield p


@pytest.fixture
def cordoned(pool: Pool) -> Iterator[list[str]]:
    """Nodes a test cordons; uncordoned afterwards, whatever happened."""
    nodes: list[str] = []
    yield nodes
    for n in nodes:
        pool.cp.kubectl("uncordon", n, check=False)


def vmi(pool: Pool, ns: str, name: str) -> dict[str, Any]:
    return get(pool, "vmi", ns, name)


def node_of(pool: Pool, ns: str, name: str) -> str | None:
    got: str | None = (vmi(pool, ns, name).get("status") or {}).get("nodeName")
    return got


def drain_migrations(pool: Pool, ns: str) -> list[dict[str, Any]]:
    out = pool.cp.kubectl("get", "vmim", "-n", ns, "-l", DRAIN, "-o", "json")
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return items


def events(pool: Pool, ns: str, kind: str, name: str, reason: str) -> list[dict[str, Any]]:
    out = pool.cp.kubectl(
        "get",
        "events",
        "-n",
        ns,
        "--field-selector",
        f"involvedObject.kind={kind},involvedObject.name={name},reason={reason}",
        "-o",
        "json",
    )
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return items


def cordon(pool: Pool, cordoned: list[str], node: str) -> None:
    cordoned.append(node)
    pool.cp.kubectl("cordon", node)


def test_drain_moves_a_lazy_box_off_the_node(
    pool: Pool, namespace: str, cordoned: list[str]
) -> None:
    a, b, _low = pool.members()
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(box("web")))
    host = _wait("the box to run", lambda: running(pool, namespace, "web"))["node"]
    other = b if host == a else a  # the level-1 member cannot take a level-2 box
    cordon(pool, cordoned, host)
    moved = _wait(
        "the box's VMI to leave the drained node",
        lambda: (st := running(pool, namespace, "web")) and st["node"] == other and st,
        timeout=40,
    )
    assert moved["node"] == other
    status = vmi(pool, namespace, "web")["status"]
    assert status["nodeName"] == other
    assert "evacuationNodeName" not in status  # cleared: the drain can finish
    (mig,) = drain_migrations(pool, namespace)  # one, not one per round
    assert mig["metadata"]["labels"][DRAIN] == host
    assert mig["spec"]["addedNodeSelector"]["kubernetes.io/hostname"] == other
    assert mig["status"]["phase"] == "Succeeded"
    # when each phase was reached, as virt-controller records it (gtvp's settle reads it)
    stamps = mig["status"]["phaseTransitionTimestamps"]
    assert [t["phase"] for t in stamps][-2:] == ["Running", "Succeeded"]
    said = events(pool, namespace, "LazyBox", "web", "DrainMigration")
    assert f"node {host} is being drained: live-migrating to {other}" in said[0]["message"]


def test_drain_of_a_gated_external_vm_waits_for_a_target_then_finishes(
    pool: Pool, namespace: str, cordoned: list[str]
) -> None:
    a, b, low = pool.members()
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(_vm("db", 3)))
    host = _wait("the VM to run", lambda: node_of(pool, namespace, "db"))
    other = b if host == a else a
    ungated = ordinary_vm("plain", host, {"cpu": "1", "memory": "128Mi"})
    ungated["spec"]["template"]["spec"]["evictionStrategy"] = "External"
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(ungated))
    _wait("the ungated VM to run", lambda: node_of(pool, namespace, "plain") == host)
    cordon(pool, cordoned, other)  # the only other level-3 member receives nothing
    cordon(pool, cordoned, host)
    waiting = _wait(
        "a DrainWaiting event on the VMI",
        lambda: events(pool, namespace, "VirtualMachineInstance", "db", "DrainWaiting"),
    )
    message = waiting[0]["message"]
    assert f"node {host} is being drained" in message
    assert f"1 cordoned ({other})" in message
    assert f"1 below level 3 ({low}: level 1)" in message
    assert vmi(pool, namespace, "db")["status"]["evacuationNodeName"] == host
    time.sleep(5)  # several drain rounds (every 2 s while a drain is outstanding)
    again = events(pool, namespace, "VirtualMachineInstance", "db", "DrainWaiting")
    assert [e.get("count", 1) for e in again] == [1]  # said once, not every round
    assert node_of(pool, namespace, "db") == host
    assert drain_migrations(pool, namespace) == []
    pool.cp.kubectl("uncordon", other)  # a target qualifies: the VM moves at once
    _wait("the VM to leave the drained node", lambda: node_of(pool, namespace, "db") == other)
    assert "evacuationNodeName" not in vmi(pool, namespace, "db")["status"]
    (mig,) = drain_migrations(pool, namespace)
    assert mig["spec"]["vmiName"] == "db"
    # an ungated VM with External belongs to whoever chose External: gtvp leaves it alone
    plain = vmi(pool, namespace, "plain")["status"]
    assert plain["nodeName"] == host
    assert plain["evacuationNodeName"] == host


@contextlib.contextmanager
def frozen_virtsim(pool: Pool) -> Iterator[None]:
    """SIGSTOP the KubeVirt stand-in: migrations stay where they are (Pending) meanwhile."""
    tracked = pool.procs.get("virtsim")
    assert tracked is not None
    os.kill(tracked.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(tracked.pid, signal.SIGCONT)


def test_a_drain_migration_whose_target_is_cordoned_before_it_was_scheduled_is_retargeted(
    pool: Pool, namespace: str, cordoned: list[str]
) -> None:
    """Two nodes drained one after the other: the migration gtvp pinned to the second before
    KubeVirt scheduled it is cancelled, not left pending on a node that takes nothing."""
    a, b, low = pool.members()
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(_vm("db", 3)))
    host = _wait("the VM to run", lambda: node_of(pool, namespace, "db"))
    _wait("the VMI Running", lambda: vmi(pool, namespace, "db")["status"].get("phase") == "Running")
    other = b if host == a else a
    with frozen_virtsim(pool):  # KubeVirt schedules nothing meanwhile
        cordon(pool, cordoned, host)
        mark = {"status": {"evacuationNodeName": host}}  # what virt-api does on the drain
        pool.cp.kubectl(
            "patch", "vmi", "db", "-n", namespace, "--type", "merge", "-p", json.dumps(mark)
        )
        (planned,) = _wait("gtvp's drain migration", lambda: drain_migrations(pool, namespace))
        assert planned["spec"]["addedNodeSelector"]["kubernetes.io/hostname"] == other
        assert (planned.get("status") or {}).get("phase", "Pending") == "Pending"
        cordon(pool, cordoned, other)  # the second drain, before KubeVirt scheduled the first
        said = _wait(
            "a DrainRetarget event on the VMI",
            lambda: events(pool, namespace, "VirtualMachineInstance", "db", "DrainRetarget"),
        )
        name = planned["metadata"]["name"]
        assert f"cancelled migration {name}, its target {other} was cordoned" in said[0]["message"]
        assert said[0]["type"] == "Warning"  # a drain that cannot finish is news
        _wait("the cancelled migration to be gone", lambda: drain_migrations(pool, namespace) == [])
        waiting = _wait(
            "a DrainWaiting event on the VMI",
            lambda: events(pool, namespace, "VirtualMachineInstance", "db", "DrainWaiting"),
        )
        assert f"1 cordoned ({other})" in waiting[0]["message"]
        assert f"1 below level 3 ({low}: level 1)" in waiting[0]["message"]
    pool.cp.kubectl("uncordon", other)  # a target qualifies again: the VM moves there
    _wait("the VM to leave the drained node", lambda: node_of(pool, namespace, "db") == other)
    (mig,) = drain_migrations(pool, namespace)
    assert mig["metadata"]["uid"] != planned["metadata"]["uid"]  # planned again, not revived
    assert mig["status"]["phase"] == "Succeeded"


def test_drain_of_a_live_migrate_vm_is_left_to_kubevirt(
    pool: Pool, namespace: str, cordoned: list[str]
) -> None:
    a, b, _low = pool.members()
    vm = _vm("lm", 3)
    vm["spec"]["template"]["spec"]["evictionStrategy"] = "LiveMigrate"
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(vm))
    host = _wait("the VM to run", lambda: node_of(pool, namespace, "lm"))
    other = b if host == a else a
    cordon(pool, cordoned, host)
    # KubeVirt's own evacuation controller (SIMULATED here) migrates LiveMigrate VMIs; the
    # mutating webhook keeps the move on trusted members of the VM's level
    _wait("the VM to leave the drained node", lambda: node_of(pool, namespace, "lm") == other)
    out = pool.cp.kubectl("get", "vmim", "-n", namespace, "-o", "json")
    (mig,) = json.loads(out.stdout)["items"]
    assert mig["metadata"]["name"].startswith("kubevirt-evacuation-")
    assert mig["metadata"]["annotations"]["kubevirt.io/evacuationMigration"] == host
    assert mig["spec"]["addedNodeSelector"]["node-restriction.kubernetes.io/gtvp-level-3"]
    assert drain_migrations(pool, namespace) == []  # gtvp started none of its own
