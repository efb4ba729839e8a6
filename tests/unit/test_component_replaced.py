"""A component deleted and made again under its name while a use of it is spent: the new
object never inherits the old one's check (nor is a use of the old one counted as spent on
it). Found by a review: a status write meeting a 409 read the new object into the view,
which kept the old object's Verified by name until its DELETED event came."""

from __future__ import annotations

import copy
from typing import Any, cast

import pytest
from kubernetes.client.exceptions import ApiException

from gtvp import kube
from gtvp.core.component_checks import Check
from gtvp.handlers import components
from gtvp.runtime import OperatorSettings, Runtime
from tests.catalogue import Publisher

PUB = Publisher()


def test_a_component_made_again_under_its_name_is_not_verified_by_the_old_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good = PUB.component("nginx", "1.26.2", "application", max_uses=5)
    good["metadata"].update(uid="uid-1", resourceVersion="10")
    good["status"] = {"verification": {"state": "Verified", "reason": "SignatureValid",
                                       "message": "", "usesLeft": 3}}  # fmt: skip
    name = good["metadata"]["name"]
    rt = Runtime(settings=OperatorSettings(policy_name="p"), clients=cast(kube.Clients, None))
    rt.view.observe_component(good, "ADDED")
    rt.boxes.checks[name] = Check("Verified", "SignatureValid", "signed by test-publisher")
    # deleted and made again: other bytes, unsigned, no maxUses
    evil = copy.deepcopy(good)
    evil["metadata"].update(uid="uid-2", resourceVersion="11")
    evil["spec"]["digest"] = "sha256:" + "e" * 64
    evil["spec"]["image"] = "evil.example.com/nginx@" + evil["spec"]["digest"]
    del evil["spec"]["signature"], evil["spec"]["maxUses"], evil["status"]

    def conflict(*_a: Any, **_kw: Any) -> None:
        raise ApiException(status=409, reason="Conflict")

    monkeypatch.setattr(kube, "patch_status", conflict)
    monkeypatch.setattr(kube, "get_if_present", lambda *_a, **_kw: evil)
    assert components.spend(rt, ((name, "uid-1"),)) == [name]  # the use planned on: not spent
    assert rt.view.components[name]["metadata"]["uid"] == "uid-2"
    assert name not in rt.boxes.checks  # boxes wait (Verifying) until the new one is checked


def test_a_use_planned_on_an_object_replaced_since_is_not_charged_to_the_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The plan resolved the box over one object; a watch event brought another under its
    name before the use was spent: the new object's uses stay whole and the box plans again."""
    old = PUB.component("nginx", "1.26.2", "application", max_uses=5)
    old["metadata"].update(uid="uid-1", resourceVersion="10")
    name = old["metadata"]["name"]
    new = copy.deepcopy(old)
    new["metadata"].update(uid="uid-2", resourceVersion="12")
    new["status"] = {"verification": {"state": "Verified", "reason": "SignatureValid",
                                      "message": "", "usesLeft": 2}}  # fmt: skip
    rt = Runtime(settings=OperatorSettings(policy_name="p"), clients=cast(kube.Clients, None))
    rt.view.observe_component(new, "ADDED")
    rt.boxes.checks[name] = Check("Verified", "SignatureValid", "signed by test-publisher")
    writes: list[dict[str, Any]] = []

    def patch_status(_c: Any, _r: Any, _n: str, status: dict[str, Any], **_kw: Any) -> Any:
        writes.append(status)
        return {**new, "status": status}

    monkeypatch.setattr(kube, "patch_status", patch_status)
    assert components.spend(rt, ((name, "uid-1"),)) == [name]
    assert writes == []  # uid-2's usesLeft is not spent on uid-1's behalf
    assert components.spend(rt, ((name, "uid-2"),)) == []
    assert [w["verification"]["usesLeft"] for w in writes] == [1]
