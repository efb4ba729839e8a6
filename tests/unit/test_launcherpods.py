"""The stand-in's virt-launcher pods and virt-api's eviction answer (pure parts)."""

from __future__ import annotations

from typing import Any

from gtvp_local.launcherpods import (
    EVICTION_MESSAGE,
    NodeLoad,
    eviction_verdict,
    launcher_pod,
    plan_pods,
)
from gtvp_local.virtsim import choose_node


def _vmi(name: str, node: str | None, phase: str = "Running", **spec: Any) -> dict[str, Any]:
    # without KubeVirt's per-pod overhead (test_footprint's business), so that the loads
    # below read as whole fractions of a node
    resources = {"requests": {"cpu": "2", "memory": "4Gi"}, "overcommitGuestOverhead": True}
    return {
        "metadata": {"name": name, "namespace": "apps", "uid": f"uid-{name}"},
        "spec": {"domain": {"resources": resources}, **spec},
        "status": {"nodeName": node, "phase": phase},
    }


def _pod(name: str, vmi: str, node: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "apps",
            "labels": {"kubevirt.io/created-by": f"uid-{vmi}"},
        },
        "spec": {"nodeName": node},
    }


def test_a_placed_vmi_without_a_pod_gets_one_and_a_landed_one_moves() -> None:
    plan = plan_pods(
        [_vmi("a", "n1"), _vmi("b", "n2"), _vmi("c", None, "Scheduling")],
        [_pod("virt-launcher-b-x", "b", "n1"), _pod("virt-launcher-gone-y", "gone", "n1")],
    )
    assert [v["metadata"]["name"] for v in plan.create] == ["a", "b"]
    assert sorted(plan.delete) == [("apps", "virt-launcher-b-x"), ("apps", "virt-launcher-gone-y")]


def test_one_pod_per_vmi_is_kept() -> None:
    plan = plan_pods([_vmi("a", "n1")], [_pod("p1", "a", "n1"), _pod("p2", "a", "n1")])
    assert plan.create == ()
    assert plan.delete == (("apps", "p2"),)


def test_the_pod_carries_what_a_descheduler_reads() -> None:
    vmi = _vmi("a", "n1", nodeSelector={"gtvp.io/gtvp-trusted": "true"})
    pod = launcher_pod(vmi)
    assert pod["metadata"]["labels"]["kubevirt.io"] == "virt-launcher"
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "VirtualMachineInstance"
    assert "descheduler.alpha.kubernetes.io/request-evict-only" in pod["metadata"]["annotations"]
    assert pod["spec"]["nodeName"] == "n1"
    assert pod["spec"]["nodeSelector"] == {"gtvp.io/gtvp-trusted": "true"}
    assert pod["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}
    # without requests, what KubeVirt asks: the guest memory and 100m per vCPU, so a
    # descheduler reading the pods sees the load the scheduler placed
    bare = _vmi("b", "n1")
    bare["spec"]["domain"] = {"cpu": {"cores": 4}, "memory": {"guest": "1Gi"}}
    asked = launcher_pod(bare)["spec"]["containers"][0]["resources"]["requests"]
    # and KubeVirt's overhead: 220 MiB of processes, 4 vCPUs, I/O thread, video (no page
    # tables: KubeVirt counts them on the memory requested, and none is)
    assert asked == {"cpu": "400m", "memory": f"{1024 + 220 + 32 + 8 + 32}Mi"}


def test_an_eviction_of_a_migratable_vm_is_refused_and_marks_it_once() -> None:
    pod = {"metadata": {"labels": {"kubevirt.io": "virt-launcher"}}, "spec": {"nodeName": "n1"}}
    vmi = _vmi("a", "n1", evictionStrategy="LiveMigrate")
    allowed, mark, message = eviction_verdict(pod, vmi)
    assert (allowed, mark) == (False, "n1")
    assert message.startswith(EVICTION_MESSAGE)
    vmi["status"]["evacuationNodeName"] = "n1"
    assert eviction_verdict(pod, vmi)[:2] == (False, None)
    assert eviction_verdict(pod, _vmi("b", "n1", evictionStrategy="None"))[0] is True
    assert eviction_verdict({"metadata": {"labels": {}}}, vmi)[0] is True


def _nodes(*names: str, cpu: str = "8", memory: str = "8Gi") -> list[dict[str, Any]]:
    return [
        {
            "metadata": {"name": n, "labels": {}},
            "status": {
                "allocatable": {"cpu": cpu, "memory": memory},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
        for n in names
    ]


def test_request_load_is_the_larger_commitment_per_mille() -> None:
    load = NodeLoad.of_requests([_vmi("a", "n1"), _vmi("b", "n1")], _nodes("n1", "n2"))
    assert load.per_mille() == {"n1": 1000, "n2": 0}


def test_two_vms_scheduled_in_one_pass_do_not_both_go_to_the_emptiest_node() -> None:
    # kube-scheduler counts a pod it has just bound before the next decision; deciding both
    # from the same snapshot sent a drained node's every VM to one member (and overloaded it)
    nodes = _nodes("n1", "n2", "n3")
    load = NodeLoad.of_requests([_vmi("a", "n1"), _vmi("b", "n2")], nodes)
    chosen = []
    for name in ("c", "d"):
        vmi = _vmi(name, None, phase="Pending")
        node = choose_node(nodes, {}, [], None, load, vmi=vmi)
        assert node is not None
        load.commit(node, vmi)
        chosen.append(node)
    assert chosen == ["n3", "n1"]


def test_a_vm_goes_to_its_preferred_node_only_where_its_requests_fit() -> None:
    nodes = _nodes("n1", "n2")
    full = NodeLoad.of_requests([_vmi("a", "n1"), _vmi("b", "n1"), _vmi("c", "n1")], nodes)
    vmi = _vmi("d", None, phase="Pending")  # 2 CPUs, 4 GiB: n1 has 2 CPUs and 0 bytes left
    assert choose_node(nodes, {}, [], None, full, vmi=vmi, preferred="n1") == "n2"
    assert choose_node(nodes[:1], {}, [], None, full, vmi=vmi, preferred="n1") is None


def test_a_migration_in_flight_holds_its_requests_at_the_target() -> None:
    nodes = _nodes("n1", "n2", "n3")
    vmis = [_vmi("a", "n1"), _vmi("b", "n3")]
    migration = {
        "metadata": {"namespace": "apps", "name": "m"},
        "spec": {"vmiName": "a"},
        "status": {"phase": "Running", "migrationState": {"targetNode": "n2"}},
    }
    load = NodeLoad.of_requests(vmis, nodes, [migration])
    assert load.per_mille() == {"n1": 500, "n2": 500, "n3": 500}
    migration["status"]["phase"] = "Succeeded"  # landed: counted where the VMI now says
    assert NodeLoad.of_requests(vmis, nodes, [migration]).per_mille()["n2"] == 0
