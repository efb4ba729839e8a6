"""What the agent does when its own writes or its TPM fail: an honest host keeps its trust.

A lost evidence write (the API server restarting, a timeout) is quoted and sent again on
the next pass; a TPM error while loading the enrolled AK keeps the AK (a new one would
unbind the member: EnrolmentChanged, held for a readmission on `autoRecover: false`
levels). Found by a review.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import TPM2_RC
from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC

from gtvp_agent.tpm import Tpm, TpmUnavailable
from tests.softmember import AgentMember, merge_patch, policy_trusting
from tests.softtpm import SoftCA, SoftTpm


class _RestartingApi:
    """Serves the member's status to the agent; the first evidence write fails (503)."""

    def __init__(self, m: AgentMember) -> None:
        self.m = m
        self.failed = False

    def get_cluster_custom_object(self, *_a: Any, **_kw: Any) -> dict[str, Any]:
        return {"metadata": {"resourceVersion": "1"}, "status": copy.deepcopy(self.m.status)}

    def patch_cluster_custom_object_status(self, *args: Any, **_kw: Any) -> None:
        agent = args[4]["status"]["agent"]
        if "evidence" in agent and not self.failed:
            self.failed = True
            raise ApiException(status=503, reason="the API server is restarting")
        merge_patch(self.m.status.setdefault("agent", {}), agent)


def test_a_nonce_whose_evidence_write_failed_is_answered_again_and_the_host_stays_trusted() -> None:
    start = dt.datetime.now(dt.UTC)
    ca = SoftCA()
    m = AgentMember(SoftTpm(ca), policy_trusting(ca.bundle_pem()))
    m.enrol(start)
    later = start + dt.timedelta(minutes=10)
    m.operator(later)  # the next nonce, published when due
    nonce = m.status["challenge"]["nonce"]
    api = _RestartingApi(m)
    m.agent.api = api
    with pytest.raises(ApiException):
        m.agent.step()  # Agent.run logs it and looks again after a back-off
    assert api.failed
    m.agent.step()
    assert m.status["agent"]["evidence"]["nonce"] == nonce
    m.operator(later + dt.timedelta(seconds=5))
    assert (m.phase, m.status["trust"]["reason"]) == ("Trusted", "QuoteVerified")
    assert m.status["challenge"].get("nonce") != nonce  # answered: not asked again


class _Esapi:
    """Just enough of an ESAPI for `Tpm._loaded_ak`: the first load fails with `rc`."""

    def __init__(self, rc: int) -> None:
        self.rc, self.loads, self.created = rc, 0, 0

    def load(self, *_a: Any, **_kw: Any) -> str:
        self.loads += 1
        if self.loads == 1:
            raise TSS2_Exception(self.rc)
        return "ak"

    def create(self, *_a: Any, **_kw: Any) -> tuple[Any, ...]:
        self.created += 1
        return TPM2B_PRIVATE(b"a new AK"), TPM2B_PUBLIC.parse("ecc256"), None, None, None

    def flush_context(self, _handle: Any) -> None:
        return None


def _tpm(state: Path, esapi: _Esapi) -> Tpm:
    tpm = Tpm(esapi, None, state, ek_type="rsa", ak_type="ecc")  # type: ignore[arg-type]

    @contextlib.contextmanager
    def held() -> Iterator[tuple[str, None]]:
        yield "ek", None

    @contextlib.contextmanager
    def session() -> Iterator[str]:
        yield "session"

    tpm._ek = held  # type: ignore[method-assign]
    tpm._ek_session = session  # type: ignore[method-assign]
    return tpm


def _enrolled(state: Path) -> Path:
    (state / "ak-rsa-ecc.pub").write_bytes(bytes(TPM2B_PUBLIC.parse("ecc256").marshal()))
    priv = state / "ak-rsa-ecc.priv"
    priv.write_bytes(bytes(TPM2B_PRIVATE(b"the enrolled AK").marshal()))
    return priv


@pytest.mark.parametrize("rc", [TPM2_RC.RETRY, TPM2_RC.TESTING, TPM2_RC.OBJECT_MEMORY])
def test_a_tpm_that_cannot_load_the_ak_now_keeps_it(tmp_path: Path, rc: int) -> None:
    priv = _enrolled(tmp_path)
    esapi = _Esapi(rc)
    with (
        pytest.raises(TpmUnavailable, match="could not load the AK"),
        _tpm(tmp_path, esapi)._loaded_ak(),
    ):
        pass
    assert esapi.created == 0
    assert b"the enrolled AK" in priv.read_bytes()
    with _tpm(tmp_path, esapi)._loaded_ak():  # the TPM answers again: the same AK
        pass
    assert esapi.created == 0


def test_blobs_another_tpm_made_are_replaced_by_a_new_ak(tmp_path: Path) -> None:
    priv = _enrolled(tmp_path)
    esapi = _Esapi(TPM2_RC.INTEGRITY + TPM2_RC.P + TPM2_RC.RC1)  # as a foreign blob fails
    with _tpm(tmp_path, esapi)._loaded_ak():
        pass
    assert esapi.created == 1
    assert b"a new AK" in priv.read_bytes()


def test_an_evidence_write_that_keeps_failing_is_retried_less_and_less_often() -> None:
    """A write refused every time (a 403 after an RBAC change, a 422 from an admission
    policy) must not have the agent quote and write once a second for ever: the back-off
    grows until a write succeeds. Found by a review of the re-answer fix."""
    start = dt.datetime.now(dt.UTC)
    ca = SoftCA()
    m = AgentMember(SoftTpm(ca), policy_trusting(ca.bundle_pem()))
    m.enrol(start)
    m.operator(start + dt.timedelta(minutes=10))

    class Refusing(_RestartingApi):
        def patch_cluster_custom_object_status(self, *args: Any, **_kw: Any) -> None:
            raise ApiException(status=403, reason="Forbidden")

    m.agent.api = Refusing(m)
    waits = []
    for _ in range(4):
        with pytest.raises(ApiException):
            m.agent.step()
        waits.append(m.agent._backoff)
        m.agent._backoff = min(m.agent._backoff * 2, 30.0)  # what Agent.run does on the error
    assert waits == sorted(waits)
    assert waits[-1] >= 8
