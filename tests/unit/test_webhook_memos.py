"""Forged admission reviews leave nothing behind in the operator, and a review for a path
that names no gtvp webhook is refused.

Attacker: anyone on the pod network posts reviews to the webhook port (the API server
presents no client certificate by default). kopf keeps a memo per object uid for every
review that is not a CREATE, until a watch sees the object deleted: 1 MiB uids, ever new,
would grow each replica until it is killed. Reviews go through kopf's own admission engine
here, with gtvp's handlers registered as the operator registers them."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import kopf
import pytest
from aiohttp.test_utils import make_mocked_request
from kopf._cogs.structs import references
from kopf._core.engines.admission import serve_admission_request

from gtvp import handlers
from gtvp.runtime import OperatorSettings, Runtime
from gtvp.webhook_config import WEBHOOK_IDS
from gtvp.webhook_server import AdmissionMemories, DrainingWebhookServer

VMS = references.Resource(
    group="kubevirt.io", version="v1", plural="virtualmachines", kind="VirtualMachine",
    namespaced=True, preferred=True, verbs=["create", "update", "get", "list", "watch"],
)  # fmt: skip


def _review(uid: str) -> dict[str, Any]:
    vm = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "vm", "namespace": "tenant", "uid": uid},
        "spec": {"template": {"spec": {"domain": {"devices": {}}}}},
    }
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "resource": {"group": "kubevirt.io", "version": "v1", "resource": "virtualmachines"},
            "operation": "UPDATE",
            "userInfo": {"username": "anyone"},
            "object": vm,
            "oldObject": vm,
        },
    }


def _serve(memories: Any, uids: list[str]) -> list[Any]:
    registry = kopf.OperatorRegistry()
    handlers.register(registry, admission_webhooks=True)
    insights = references.Insights()
    insights.webhook_resources.add(VMS)
    rt = Runtime(settings=OperatorSettings(policy_name="p"), clients=None)  # type: ignore[arg-type]

    async def all_of_them() -> list[Any]:
        return [
            await serve_admission_request(
                _review(uid),  # type: ignore[arg-type]
                webhook="gtvp-validate-vm",  # type: ignore[arg-type]
                settings=kopf.OperatorSettings(),
                memories=memories,
                memobase=kopf.Memo(runtime=rt),
                registry=registry,
                insights=insights,
                indices={},  # type: ignore[arg-type]
            )
            for uid in uids
        ]

    return asyncio.run(all_of_them())


def test_forged_update_reviews_with_new_uids_keep_nothing() -> None:
    big = ["x" * 100_000 + str(n) for n in range(50)]  # 5 MB of uids
    memories = AdmissionMemories()
    answers = _serve(memories, big)
    assert all(a["response"]["allowed"] for a in answers)  # an ungated VM: allowed
    assert list(memories.iter_all_memories()) == []


def test_kopfs_own_memories_would_keep_one_per_uid() -> None:
    """The baseline the fix is measured against: without it, every forged uid stays."""
    memories = kopf._core.reactor.inventory.ResourceMemories()
    _serve(memories, [str(uuid.uuid4()) for _ in range(20)])
    assert len(list(memories.iter_all_memories())) == 20


@pytest.mark.parametrize("path", ["", "gtvp-validate-vm/extra", "other", "gtvp-validate-vmx"])
def test_a_review_posted_to_a_path_naming_no_gtvp_webhook_is_refused(path: str) -> None:
    """kopf answers such a review allowed (no handler, no objection); the API server would
    never send one, but a webhook configuration that drifted from the operator might."""
    server = DrainingWebhookServer(port=0, closing=lambda: False, webhook_ids=WEBHOOK_IDS)
    called: list[Any] = []

    async def fn(*args: Any, **kwargs: Any) -> Any:
        called.append(args)
        raise AssertionError("no handler may run")

    request = make_mocked_request("POST", f"/{path}", match_info={"id": path})
    response = asyncio.run(server._serve(fn, request))
    assert response.status == 404
    assert not called
    assert {"gtvp-validate-vm", "gtvp-mutate-vmi", "gtvp-validate-securitypolicy"} <= WEBHOOK_IDS
