"""The stand-in's virt-launcher pods and virt-api's eviction answer (pure parts)."""

from __future__ import annotations

from typing import Any

from gtvp_local.launcherpods import (
    EVICTION_MESSAGE,
    eviction_verdict,
    launcher_pod,
    plan_pods,
    request_load,
)


def _vmi(name: str, node: str | None, phase: str = "Running", **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "apps", "uid": f"uid-{name}"},
        "spec": {"domain": {"resources": {"requests": {"cpu": "2", "memory": "4Gi"}}}, **spec},
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


def test_request_load_is_the_larger_commitment_per_mille() -> None:
    nodes = [{"metadata": {"name": n}, "status": {"allocatable": {"cpu": "8", "memory": "8Gi"}}}
             for n in ("n1", "n2")]  # fmt: skip
    assert request_load([_vmi("a", "n1"), _vmi("b", "n1")], nodes) == {"n1": 1000, "n2": 0}
