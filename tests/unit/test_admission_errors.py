"""What an admission refusal and its log line carry when the caller may be anyone on the
pod network (a review posted straight to the webhook port): the API server's status, never
its headers or body; one bounded log line, whatever the review named. Found by a review."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, cast

import kopf
import pytest
from kubernetes.client.exceptions import ApiException

from gtvp import kube
from gtvp.core.gating import Decision
from gtvp.handlers import admission
from gtvp.runtime import OperatorSettings, Runtime


class _Response:
    status, reason, data = 500, "Internal Server Error", b'{"secret": "body"}'
    headers: ClassVar[dict[str, str]] = {
        "Audit-Id": "4f1c-audit",
        "X-Kubernetes-Pf-Flowschema-Uid": "fs-uid",
    }

    def getheaders(self) -> dict[str, str]:
        return self.headers


def test_an_api_error_reading_the_migrated_vmi_says_its_status_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(*_a: Any, **_kw: Any) -> None:
        raise ApiException(http_resp=_Response())

    monkeypatch.setattr(kube, "get_if_present", fail)
    rt = Runtime(settings=OperatorSettings(policy_name="p"), clients=cast(kube.Clients, None))
    with pytest.raises(kopf.AdmissionError) as refused:
        admission._vmi(rt, "ns", "web", "VirtualVirtualMachineInstanceMigration")
    said = str(refused.value)
    assert "500 Internal Server Error" in said
    assert "Audit-Id" not in said
    assert "4f1c-audit" not in said
    assert "secret" not in said


def test_a_refusal_is_logged_on_one_bounded_line(caplog: pytest.LogCaptureFixture) -> None:
    forged = "a\n2026-12-05 INFO gtvp: member node-7 Trusted at level 3" + "x" * 5000
    with caplog.at_level(logging.INFO, logger="gtvp.webhooks"), pytest.raises(kopf.AdmissionError):
        admission._decide("VirtualMachineInstance", Decision(False, forged))
    [record] = [r for r in caplog.records if r.name == "gtvp.webhooks"]
    line = record.getMessage()
    assert "\n" not in line
    assert len(line) < 600
