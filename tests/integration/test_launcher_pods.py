"""The stand-in's virt-launcher pods and virt-api's eviction interceptor (SIMULATION of
KubeVirt, `gtvp_local.launcherpods`), on the real API server, and the real Kubernetes
descheduler (built from its Go module) evicting them: an eviction becomes a live migration.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gtvp_local import toolchain, trace_descheduler
from gtvp_local.controlplane import ControlPlane
from gtvp_local.launcherpods import EVICTION_MESSAGE, EvictionWebhook, LauncherPods
from gtvp_local.virtsim import VirtSim

pytestmark = pytest.mark.controlplane
KV = ("kubevirt.io", "v1")


@pytest.fixture
def clients(control_plane: ControlPlane) -> tuple[Any, Any]:
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=str(control_plane.admin_kubeconfig))
    return client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)


@pytest.fixture
def pool_label() -> str:
    return f"p{uuid.uuid4().hex[:8]}"


@pytest.fixture
def nodes(clients: tuple[Any, Any], pool_label: str) -> Iterator[list[str]]:
    """Two Ready Nodes of 4 CPUs / 8 GiB / 110 pods (no kubelet: Ready as written)."""
    _, core = clients
    names = [f"{pool_label}-n{i}" for i in (1, 2)]
    room = {"cpu": "4", "memory": "8Gi", "pods": "110"}
    for name in names:
        core.create_node({"metadata": {"name": name, "labels": {"gtvp.io/test-pool": pool_label}}})
        core.patch_node_status(
            name,
            {
                "status": {
                    "allocatable": room,
                    "capacity": room,
                    "conditions": [{"type": "Ready", "status": "True", "reason": "Test"}],
                }
            },
        )
    yield names
    for name in names:
        core.delete_node(name)


@pytest.fixture
def standin(clients: tuple[Any, Any], tmp_path: Path) -> Iterator[None]:
    """The stand-in with launcher pods and the eviction webhook, ticking in a thread."""
    api, core = clients
    webhook = EvictionWebhook(api, core, tmp_path / "pki")
    webhook.start()
    sim = VirtSim(api, core, step_delay=0.1, pods=LauncherPods(core))
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                sim.tick()
            except Exception:  # noqa: BLE001 - as the stand-in's own loop: go on
                traceback.print_exc()
            stop.wait(0.2)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield
    stop.set()
    t.join(5)
    webhook.stop()


def _vmi(name: str, node: str, cpu: str, memory: str, strategy: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name},
        "spec": {
            "evictionStrategy": strategy,
            "nodeSelector": {"kubernetes.io/hostname": node},
            "domain": {
                "devices": {},
                "resources": {"requests": {"cpu": cpu, "memory": memory}},
            },
        },
    }


def _wait(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _pods(core: Any, ns: str) -> list[Any]:
    return list(core.list_namespaced_pod(ns, label_selector="kubevirt.io=virt-launcher").items)


def _label_hostnames(core: Any, names: list[str]) -> None:
    for n in names:
        core.patch_node(n, {"metadata": {"labels": {"kubernetes.io/hostname": n}}})


@pytest.mark.usefixtures("standin")
def test_a_placed_vmi_gets_a_running_launcher_pod_with_its_requests(
    clients: tuple[Any, Any], namespace: str, nodes: list[str]
) -> None:
    api, core = clients
    _label_hostnames(core, nodes)
    api.create_namespaced_custom_object(
        *KV, namespace, "virtualmachineinstances", _vmi("web", nodes[0], "1", "2Gi", "LiveMigrate")
    )
    pod = _wait("a launcher pod", lambda: _pods(core, namespace))[0]
    vmi = api.get_namespaced_custom_object(*KV, namespace, "virtualmachineinstances", "web")
    assert pod.metadata.name.startswith("virt-launcher-web-")
    assert pod.metadata.labels["kubevirt.io"] == "virt-launcher"
    assert pod.metadata.labels["kubevirt.io/created-by"] == vmi["metadata"]["uid"]
    owner = pod.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.uid) == (
        "VirtualMachineInstance",
        "web",
        vmi["metadata"]["uid"],
    )
    assert pod.spec.node_name == nodes[0]
    # the VMI's requests and KubeVirt's overhead: 4 MiB of page tables, 220 MiB of processes,
    # 8 MiB for its vCPU and 8 for the I/O thread, 32 MiB of video
    assert pod.spec.containers[0].resources.requests == {"cpu": "1", "memory": "2320Mi"}
    assert _wait("Running", lambda: core.read_namespaced_pod(pod.metadata.name, namespace)
                 .status.phase == "Running")  # fmt: skip
    api.delete_namespaced_custom_object(*KV, namespace, "virtualmachineinstances", "web")
    _wait("the pod gone with its VMI", lambda: not _pods(core, namespace))


@pytest.mark.usefixtures("standin")
def test_an_eviction_is_refused_with_429_and_becomes_a_live_migration(
    clients: tuple[Any, Any], namespace: str, nodes: list[str]
) -> None:
    from kubernetes.client.rest import ApiException

    api, core = clients
    _label_hostnames(core, nodes)
    body = _vmi("db", nodes[0], "1", "1Gi", "LiveMigrate")
    body["spec"]["nodeSelector"] = {"gtvp.io/test-pool": core.read_node(nodes[0]).metadata.labels[
        "gtvp.io/test-pool"]}  # fmt: skip
    api.create_namespaced_custom_object(*KV, namespace, "virtualmachineinstances", body)
    pod = _wait("a launcher pod", lambda: _pods(core, namespace))[0]
    source = pod.spec.node_name
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": pod.metadata.name, "namespace": namespace}}  # fmt: skip
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod_eviction(pod.metadata.name, namespace, eviction)
    assert refused.value.status == 429
    assert EVICTION_MESSAGE in str(refused.value.body)

    def landed() -> Any:
        vmi = api.get_namespaced_custom_object(*KV, namespace, "virtualmachineinstances", "db")
        status = vmi.get("status") or {}
        return status.get("nodeName") not in (None, source) and vmi

    vmi = _wait("the VMI to migrate off its node", landed)
    assert not vmi["status"].get("evacuationNodeName")

    def phases() -> list[str]:
        migrations = api.list_namespaced_custom_object(
            *KV, namespace, "virtualmachineinstancemigrations"
        )["items"]
        return [(m.get("status") or {}).get("phase", "") for m in migrations]

    # the stand-in writes the VMI's new node, then the migration's end: wait for both
    _wait("the migration to succeed", lambda: phases() == ["Succeeded"])
    moved = _wait(
        "the pod to follow the VMI",
        lambda: [p for p in _pods(core, namespace) if p.spec.node_name != source],
    )
    assert len(moved) == 1
    assert moved[0].spec.node_name == vmi["status"]["nodeName"]
    _wait("the source's pod gone", lambda: len(_pods(core, namespace)) == 1)


@pytest.mark.usefixtures("standin")
def test_a_vm_without_a_migrating_eviction_strategy_is_evicted_as_a_pod(
    clients: tuple[Any, Any], namespace: str, nodes: list[str]
) -> None:
    api, core = clients
    _label_hostnames(core, nodes)
    api.create_namespaced_custom_object(
        *KV, namespace, "virtualmachineinstances", _vmi("batch", nodes[0], "1", "1Gi", "None")
    )
    pod = _wait("a launcher pod", lambda: _pods(core, namespace))[0]
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": pod.metadata.name, "namespace": namespace}}  # fmt: skip
    core.create_namespaced_pod_eviction(pod.metadata.name, namespace, eviction)
    assert not api.list_namespaced_custom_object(
        *KV, namespace, "virtualmachineinstancemigrations"
    )["items"]


def _where(api: Any, namespace: str, names: list[str]) -> dict[str, str | None]:
    got = {}
    for n in names:
        vmi = api.get_namespaced_custom_object(*KV, namespace, "virtualmachineinstances", n)
        got[n] = (vmi.get("status") or {}).get("nodeName")
    return got


@pytest.mark.usefixtures("standin")
def test_a_vm_whose_requests_fit_no_node_is_not_placed(
    clients: tuple[Any, Any], namespace: str, nodes: list[str], pool_label: str
) -> None:
    api, _ = clients
    body = _vmi("huge", nodes[0], "3", "9Gi", "LiveMigrate")  # each node has 8 GiB
    body["spec"]["nodeSelector"] = {"gtvp.io/test-pool": pool_label}
    api.create_namespaced_custom_object(*KV, namespace, "virtualmachineinstances", body)
    fits = _vmi("fits", nodes[0], "3", "6Gi", "LiveMigrate")
    fits["spec"]["nodeSelector"] = {"gtvp.io/test-pool": pool_label}
    api.create_namespaced_custom_object(*KV, namespace, "virtualmachineinstances", fits)
    _wait("the VM that fits placed", lambda: _where(api, namespace, ["fits"])["fits"])
    time.sleep(1.0)  # several ticks of the stand-in
    vmi = api.get_namespaced_custom_object(*KV, namespace, "virtualmachineinstances", "huge")
    assert not (vmi.get("status") or {}).get("nodeName")  # as kube-scheduler: Pending
    assert vmi["status"]["phase"] == "Scheduling"
    # and says why, as KubeVirt copies the launcher pod's PodScheduled condition
    (cond,) = vmi["status"]["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == (
        "PodScheduled",
        "False",
        "Unschedulable",
    )
    assert "Insufficient cpu or memory" in cond["message"]
    assert cond["message"].endswith("(simulated)")


@pytest.mark.usefixtures("standin")
def test_a_drained_nodes_vms_are_spread_as_the_scheduler_would_not_piled_on_one(
    clients: tuple[Any, Any], namespace: str, nodes: list[str], pool_label: str
) -> None:
    # each migration's target pod counts before the next is placed; deciding both from one
    # snapshot sent every VM of a leaving member to the same, then overloaded, member
    api, core = clients
    third = f"{pool_label}-n3"
    room = {"cpu": "4", "memory": "8Gi", "pods": "110"}
    core.create_node({"metadata": {"name": third, "labels": {"gtvp.io/test-pool": pool_label}}})
    try:
        core.patch_node_status(third, {"status": {"allocatable": room, "capacity": room,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Test"}]}})  # fmt: skip
        everyone = [*nodes, third]
        _label_hostnames(core, everyone)
        for n in everyone[1:]:
            core.patch_node(n, {"spec": {"unschedulable": True}})  # both start on the first
        names = ["a", "b"]
        for name in names:
            body = _vmi(name, nodes[0], "1", "1Gi", "LiveMigrate")
            body["spec"]["nodeSelector"] = {"gtvp.io/test-pool": pool_label}
            api.create_namespaced_custom_object(*KV, namespace, "virtualmachineinstances", body)
        _wait("both on the first node", lambda: set(_where(api, namespace, names).values())
              == {nodes[0]})  # fmt: skip
        for n in everyone[1:]:
            core.patch_node(n, {"spec": {"unschedulable": False}})
        core.patch_node(nodes[0], {"spec": {"unschedulable": True}})  # drain it
        _wait("both moved off", lambda: nodes[0] not in _where(api, namespace, names).values()
              and all(_where(api, namespace, names).values()))  # fmt: skip
        assert sorted(_where(api, namespace, names).values()) == sorted(everyone[1:])
    finally:
        core.delete_node(third)


def test_the_descheduler_builds_once_and_runs() -> None:
    binary = toolchain.descheduler(verbose=False)
    before = binary.stat().st_mtime_ns
    assert toolchain.descheduler(verbose=False) == binary
    assert binary.stat().st_mtime_ns == before  # cached: not built again
    import subprocess

    out = subprocess.run([str(binary), "version"], capture_output=True, text=True, check=True)
    assert "GitVersion:v0.36.0" in out.stdout + out.stderr


@pytest.mark.usefixtures("standin")
def test_the_real_descheduler_rebalances_through_live_migrations(
    control_plane: ControlPlane,
    clients: tuple[Any, Any],
    namespace: str,
    nodes: list[str],
    pool_label: str,
    tmp_path: Path,
) -> None:
    """Three 1-CPU VMs on one 4-CPU node (75 %), none on the other: LowNodeUtilization
    (under 40 % a target, over 60 % a source) evicts; each eviction is a migration."""
    api, core = clients
    core.patch_node(nodes[1], {"spec": {"unschedulable": True}})  # all start on the first
    for i in range(3):
        body = _vmi(f"vm{i}", nodes[0], "1", "1Gi", "LiveMigrate")
        body["spec"]["nodeSelector"] = {"gtvp.io/test-pool": pool_label}
        api.create_namespaced_custom_object(*KV, namespace, "virtualmachineinstances", body)
    _wait("three pods on the first node", lambda: len(_pods(core, namespace)) == 3)
    assert {p.spec.node_name for p in _pods(core, namespace)} == {nodes[0]}
    core.patch_node(nodes[1], {"spec": {"unschedulable": False}})
    body = trace_descheduler.policy(
        f"gtvp.io/test-pool={pool_label}", trace_descheduler.Thresholds(40, 60)
    )
    policy = trace_descheduler.write_policy(tmp_path, body)
    run = trace_descheduler.run_once(
        toolchain.descheduler(verbose=False), control_plane.admin_kubeconfig, policy
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Eviction in background assumed" in run.stderr or "Evicted pod" in run.stderr, (
        run.stderr[-3000:]
    )

    def on_second() -> Any:
        vmis = api.list_namespaced_custom_object(*KV, namespace, "virtualmachineinstances")
        return [v for v in vmis["items"] if (v.get("status") or {}).get("nodeName") == nodes[1]]

    moved = _wait("a VM moved by the descheduler", on_second)
    assert moved
    migrations = api.list_namespaced_custom_object(
        *KV, namespace, "virtualmachineinstancemigrations"
    )["items"]
    assert migrations
    assert all(m["metadata"]["generateName"] == "kubevirt-evacuation-" for m in migrations)
