"""A semantically bad SecurityPolicy must not quarantine the pool, and must not be silent.

The attack (or the slip): a policy the API server's schema accepts but the operator cannot
use (here an EK CA bundle whose PEM block holds no valid DER certificate) used to turn
every member Untrusted NoPolicy, taint every node and refuse every gated admission, with
the reason only in the operator's log. Now the operator's webhook refuses it with the
field and the reason; if it gets in anyway (webhook bypassed), the pool goes on under the
last accepted generation, also after an operator restart, and the policy's status and a
Warning Event say why.

Real: kube-apiserver + etcd, gtvp-operator with its webhooks, one gtvp-agent per member on
its own swtpm, kubectl. Simulated: Nodes (kwok), KubeVirt's virt-controller (virtsim).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gtvp import webhook_config
from gtvp.core.trust import TAINT_KEY
from gtvp_local.controlplane import ControlPlane
from gtvp_local.pool import Pool
from tests.pools import trusted_pool
from tests.pools import wait_for as _wait

pytestmark = [pytest.mark.e2e, pytest.mark.controlplane, pytest.mark.tpm]

# a PEM block the API server's CEL rule takes for a certificate; its DER is an INTEGER
BAD_CA = (
    "-----BEGIN CERTIFICATE-----\n"
    + base64.b64encode(b"\x30\x03\x02\x01\x01").decode()
    + "\n-----END CERTIFICATE-----\n"
)


@pytest.fixture(scope="module")
def pool(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    # validFor leaves room for an operator restart on a busy machine (a verdict must outlive it)
    with trusted_pool(
        control_plane,
        tmp_path_factory.mktemp("secpol"),
        tag="secpol",
        identities={"a": 3, "b": 2},
        policy={"interval": "2s", "valid_for": "20s"},
    ) as p:
        yield p


def _policy(pool: Pool) -> dict[str, Any]:
    out = pool.cp.kubectl("get", "securitypolicy", pool.policy_name, "-o", "json")
    obj: dict[str, Any] = json.loads(out.stdout)
    return obj


def _accepted(policy: dict[str, Any]) -> dict[str, Any]:
    conditions = (policy.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "Accepted"), {})


def _judged(pool: Pool, status: str) -> dict[str, Any]:
    """The policy once the operator has judged its current generation as `status`."""

    def probe() -> dict[str, Any]:
        p = _policy(pool)
        gen = p["metadata"]["generation"]
        cond = _accepted(p)
        done = p.get("status", {}).get("observedGeneration") == gen and cond.get("status") == status
        return p if done else {}

    return _wait(f"SecurityPolicy {pool.policy_name} Accepted={status}", probe, timeout=30)


def _columns(pool: Pool) -> dict[str, str]:
    header, row = pool.cp.kubectl("get", "secpol", pool.policy_name).stdout.splitlines()[:2]
    return dict(zip(header.split(), row.split(), strict=False))


def _patch_spec(pool: Pool, spec: dict[str, Any]) -> Any:
    return pool.cp.kubectl(
        "patch",
        "securitypolicy",
        pool.policy_name,
        "--type=merge",
        "-p",
        json.dumps({"spec": spec}),
        check=False,
    )


def _members(pool: Pool) -> dict[str, dict[str, Any]]:
    return {n: pool.member(n).get("status") or {} for n in sorted(pool.tpms)}


def _fresh_verdicts_while_watching(
    pool: Pool, during: Callable[[], None] | None = None, timeout: float = 60
) -> set[tuple[str, str, str]]:
    """Run `during`, then wait until every member verified a quote issued after it; returns
    every (member, phase, reason) seen meanwhile."""
    seen: set[tuple[str, str, str]] = set()

    def look() -> dict[str, dict[str, Any]]:
        now = _members(pool)
        for n, s in now.items():
            seen.add((n, str(s.get("phase")), str((s.get("trust") or {}).get("reason"))))
        return now

    if during is not None:
        during()
    started = {n: (s.get("trust") or {}).get("verifiedAt") for n, s in look().items()}
    time.sleep(1.1)  # verifiedAt has a resolution of one second
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = look()
        if all(
            s.get("phase") == "Trusted"
            and (s.get("trust") or {}).get("verifiedAt") not in (None, started[n])
            for n, s in now.items()
        ):
            return seen
        time.sleep(0.3)
    raise AssertionError(f"members did not verify fresh quotes in {timeout:.0f}s: {seen}")


def test_a_good_policy_is_accepted_with_its_level_count_and_generation(pool: Pool) -> None:
    policy = _judged(pool, "True")
    gen = policy["metadata"]["generation"]
    status = policy["status"]
    assert status["levelCount"] == 3
    assert status["acceptedGeneration"] == gen
    assert status["acceptedSpec"] == policy["spec"]
    cond = _accepted(policy)
    assert cond["reason"] == "Valid"
    assert cond["observedGeneration"] == gen
    assert (
        f"generation {gen} is usable: 3 levels (standard, sensitive, restricted)"
        in (cond["message"])
    )
    columns = _columns(pool)
    assert (columns["LEVELS"], columns["ACCEPTED"]) == ("3", "True")


def test_the_webhook_refuses_a_box_attestation_ca_that_is_no_certificate(pool: Pool) -> None:
    """The CRD's rule sees a PEM header; only the operator can tell there is no certificate
    behind it (a policy whose boxes could then never attest)."""
    gen = _judged(pool, "True")["metadata"]["generation"]
    refused = _patch_spec(pool, {"boxAttestation": {"caBundle": BAD_CA}})
    assert refused.returncode != 0
    assert "spec.boxAttestation.caBundle: cannot be read as PEM X.509" in refused.stderr
    assert _policy(pool)["metadata"]["generation"] == gen


def test_bad_policy_does_not_quarantine_the_pool(pool: Pool) -> None:
    good = _judged(pool, "True")
    good_gen = good["metadata"]["generation"]

    # 1. the operator's webhook refuses it, saying which field and why
    refused = _patch_spec(pool, {"ekTrust": {"caBundle": BAD_CA}})
    assert refused.returncode != 0
    assert "spec.ekTrust.caBundle" in refused.stderr
    assert "certificate 1 of 1 (line 1) is not a DER X.509 certificate" in refused.stderr
    assert _policy(pool)["metadata"]["generation"] == good_gen

    # 2. with the webhook out of the way (not installed, or an administrator bypassing it),
    # the bad generation gets in; the pool goes on under the last good one
    pool.cp.kubectl("delete", "validatingwebhookconfiguration", webhook_config.POLICY_CONFIGURATION)
    try:
        seen = _fresh_verdicts_while_watching(
            pool,
            during=lambda: _patch_spec(pool, {"ekTrust": {"caBundle": BAD_CA}}).check_returncode(),
        )
        assert {phase for _, phase, _ in seen} == {"Trusted"}, seen
        bad = _judged(pool, "False")
        bad_gen = bad["metadata"]["generation"]
        assert bad_gen > good_gen
        status, cond = bad["status"], _accepted(bad)
        assert status["observedGeneration"] == bad_gen
        assert status["levelCount"] == 3
        assert status["acceptedGeneration"] == good_gen
        assert cond["reason"] == "Invalid"
        assert cond["observedGeneration"] == bad_gen
        assert cond["message"].startswith(
            f"generation {bad_gen} is unusable: spec.ekTrust.caBundle"
        )
        assert (
            f"the pool goes on under generation {good_gen}, the last one accepted"
            in (cond["message"])
        )
        columns = _columns(pool)
        assert (columns["LEVELS"], columns["ACCEPTED"]) == ("3", "False")
        events = json.loads(
            pool.cp.kubectl(
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                f"involvedObject.kind=SecurityPolicy,involvedObject.name={pool.policy_name},"
                "type=Warning",
                "-o",
                "json",
            ).stdout
        )["items"]
        assert any(
            e["reason"] == "PolicyInvalid" and "spec.ekTrust.caBundle" in e["message"]
            for e in events
        ), events
        for name in pool.tpms:
            node = json.loads(pool.cp.kubectl("get", "node", name, "-o", "json").stdout)
            assert not any(t["key"] == TAINT_KEY for t in node["spec"].get("taints") or [])

        # 3. a restarted operator finds the last good generation in status.acceptedSpec
        def restart() -> None:
            pool.stop_operator()
            pool.start_operator()

        seen = _fresh_verdicts_while_watching(pool, during=restart)
        assert not any(reason == "NoPolicy" for _, _, reason in seen), seen
        assert _accepted(_policy(pool))["observedGeneration"] == bad_gen  # still says why

        # 4. fixed: the new generation is accepted
        _patch_spec(pool, {"ekTrust": {"caBundle": good["spec"]["ekTrust"]["caBundle"]}})
        fixed = _judged(pool, "True")
        assert fixed["status"]["acceptedGeneration"] == fixed["metadata"]["generation"]
        assert fixed["metadata"]["generation"] > bad_gen
    finally:
        pool.install_webhooks()
