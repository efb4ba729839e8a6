"""A level may trust fewer TPMs than the pool admits (`spec.levels[].ekCaBundle`): a member
whose EK certificate does not chain to that level's CAs holds at most the level below it,
through the operator's own attestation cycle with the real agent code over software-held
TPMs certified by two CAs (two vendors). A policy edit that narrows a level applies at
once to members already Trusted above it; a TPM without an EK certificate holds no scoped
level; the policy webhook names a level bundle that is not PEM certificates."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any, cast

import pytest

from gtvp.core.enrolment import ek_fingerprint
from gtvp.core.policy import Policy, PolicyError, parse_policy
from gtvp.core.tpm_wire import parse_public
from gtvp_local.pool import pool_policy
from gtvp_local.swtpm import SwtpmCA
from tests.softmember import AgentMember, Bundle
from tests.softtpm import SoftCA, SoftTpm

T0 = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
LATER = dt.timedelta(seconds=11)


@pytest.fixture(scope="module")
def vendors() -> tuple[SoftCA, SoftCA]:
    return SoftCA("discrete TPM vendor"), SoftCA("virtual TPM vendor")


def _spec(*admitted: SoftCA, **kwargs: Any) -> dict[str, Any]:
    bundle = Bundle(*(c.bundle_pem() for c in admitted))
    spec: dict[str, Any] = pool_policy(cast(SwtpmCA, bundle), name="default", **kwargs)["spec"]
    return spec


def _scoped(admitted: tuple[SoftCA, ...], level3: SoftCA, **kwargs: Any) -> Policy:
    """Both vendors admitted; level 3 (restricted) only on `level3`'s TPMs."""
    spec = _spec(*admitted, **kwargs)
    spec["levels"][2]["ekCaBundle"] = level3.bundle_pem()
    return parse_policy("default", spec)


def test_only_tpms_the_level_trusts_hold_it(vendors: tuple[SoftCA, SoftCA]) -> None:
    discrete, virtual = vendors
    policy = _scoped(vendors, discrete)
    strong = AgentMember(SoftTpm(discrete), policy)
    assert strong.enrol(T0).outcome == "Verified"
    assert (strong.phase, strong.status["level"]) == ("Trusted", 3)
    weak = AgentMember(SoftTpm(virtual), policy)
    assert weak.enrol(T0).outcome == "Verified"
    assert (weak.phase, weak.status["level"]) == ("Trusted", 2)
    message = weak.status["trust"]["message"]
    assert "held at level 2: level 3 (restricted) and above need an EK certificate" in message
    # the same member holds level 3 under the pool's bundle alone
    unscoped = AgentMember(SoftTpm(virtual), parse_policy("default", _spec(*vendors)))
    assert unscoped.enrol(T0).outcome == "Verified"
    assert unscoped.status["level"] == 3


def test_a_scope_on_a_middle_level_bounds_every_level_above_it(
    vendors: tuple[SoftCA, SoftCA],
) -> None:
    discrete, virtual = vendors
    spec = _spec(*vendors)
    spec["levels"][1]["ekCaBundle"] = discrete.bundle_pem()  # level 2; level 3 names none
    m = AgentMember(SoftTpm(virtual), parse_policy("default", spec))
    assert m.enrol(T0).outcome == "Verified"
    assert m.status["level"] == 1


def test_narrowing_a_level_drops_members_already_trusted_at_it_at_once(
    vendors: tuple[SoftCA, SoftCA],
) -> None:
    discrete, virtual = vendors
    m = AgentMember(SoftTpm(virtual), parse_policy("default", _spec(*vendors)))
    assert m.enrol(T0).outcome == "Verified"
    assert m.status["level"] == 3
    m.policy = _scoped(vendors, discrete)
    m.operator(T0 + dt.timedelta(seconds=1))  # no fresh quote needed to go down
    assert (m.phase, m.status["level"]) == ("Trusted", 2)
    # its next quote is judged at level 2; widened again, level 3 waits for a fresh quote
    # judged at it
    assert m.cycle(T0 + LATER).outcome == "Verified"
    assert m.status["trust"]["level"] == 2
    m.policy = parse_policy("default", _spec(*vendors))
    m.operator(T0 + LATER + dt.timedelta(seconds=1))
    assert m.status["level"] == 2
    assert m.cycle(T0 + 2 * LATER).outcome == "Verified"
    assert m.status["level"] == 3


def test_a_tpm_without_an_ek_certificate_holds_no_scoped_level(
    vendors: tuple[SoftCA, SoftCA],
) -> None:
    discrete, _virtual = vendors
    spec = _spec(discrete)
    spec["ekTrust"]["allowUncertifiedWithApproval"] = True
    spec["levels"][2]["ekCaBundle"] = discrete.bundle_pem()
    tpm = SoftTpm(None)
    m = AgentMember(tpm, parse_policy("default", spec))
    m.spec["approval"] = {"ekSHA256": ek_fingerprint(parse_public(tpm.ek_public))}
    assert m.enrol(T0).outcome == "Verified"
    assert m.status["level"] == 2
    assert "this TPM has no EK certificate" in m.status["trust"]["message"]


def test_a_level_bundle_that_is_not_pem_certificates_is_refused_by_name(
    vendors: tuple[SoftCA, SoftCA],
) -> None:
    spec = _spec(*vendors)
    spec["levels"][2]["ekCaBundle"] = "-----BEGIN CERTIFICATE-----\nnot base64!\n"
    with pytest.raises(PolicyError) as err:
        parse_policy("default", spec)
    assert "spec.levels[2].ekCaBundle" in str(err.value)
    spec["levels"][2]["ekCaBundle"] = "a vendor's name, not its certificate"
    with pytest.raises(PolicyError, match=r"spec\.levels\[2\]\.ekCaBundle.*holds no PEM"):
        parse_policy("default", spec)
    # unset: the pool's bundle alone, as before
    levels = parse_policy("default", _spec(*vendors)).levels
    assert all(lv.ek_ca_bundle is None for lv in levels)


def test_withdrawing_the_ek_certificate_does_not_escape_the_levels_readmission(
    vendors: tuple[SoftCA, SoftCA],
) -> None:
    """Level 3 says autoRecover false. Root on a level-3 host withdraws its EK certificate
    from the enrolment it publishes, fails, and puts it back: judged by the level its
    certificate then allowed (2, which recovers on its own), it came back Trusted at level
    3 without a human (found by a review). The level it would hold, not the one the EK
    allows, decides how a failure is handled."""
    discrete, _virtual = vendors
    spec = _spec(*vendors)
    spec["levels"][2]["ekCaBundle"] = discrete.bundle_pem()
    spec["levels"][2]["autoRecover"] = False
    m = AgentMember(SoftTpm(discrete), parse_policy("default", spec))
    assert m.enrol(T0).outcome == "Verified"
    assert m.status["level"] == 3
    certificate = m.status["agent"]["enrollment"].pop("ekCertificate")
    m.operator(T0 + dt.timedelta(seconds=1))
    assert (m.phase, m.reason) == ("Untrusted", "EkCertificateMissing")
    assert m.status["trust"].get("awaitingReadmission")
    assert m.status["effectivePolicy"]["onUntrusted"] == spec["levels"][2]["onUntrusted"]
    m.status["agent"]["enrollment"]["ekCertificate"] = certificate
    for i in range(2, 6):
        m.cycle(T0 + i * LATER)
    assert m.phase == "Untrusted"
    assert m.reason == "AwaitingReadmission"


def test_an_unreadable_ek_certificate_holds_no_scoped_level_and_breaks_nothing(
    vendors: tuple[SoftCA, SoftCA],
) -> None:
    """Bytes the agent publishes as its certificate that break the X.509 parser (here a
    version field no certificate has) are the agent's fault, refused as enrolment refuses
    them: the ceiling, worked out on every look, raises nothing."""
    discrete, _virtual = vendors
    m = AgentMember(SoftTpm(discrete), _scoped(vendors, discrete))
    assert m.enrol(T0).outcome == "Verified"
    enrollment = m.status["agent"]["enrollment"]
    der = bytearray(base64.b64decode(enrollment["ekCertificate"]))
    at = der.index(bytes.fromhex("a003020102"))  # [0] EXPLICIT INTEGER 2: X.509 v3
    der[at + 4] = 0x07
    enrollment["ekCertificate"] = base64.b64encode(bytes(der)).decode()
    step = m.operator(T0 + dt.timedelta(seconds=1))
    assert m.phase == "Untrusted"
    assert step.outcome is not None


def test_the_reason_names_the_levels_bundle_and_appears_only_when_it_holds_the_member_back(
    vendors: tuple[SoftCA, SoftCA],
) -> None:
    discrete, virtual = vendors
    weak = AgentMember(SoftTpm(virtual), _scoped(vendors, discrete))
    assert weak.enrol(T0).outcome == "Verified"
    message = weak.status["trust"]["message"]
    assert "to a CA in the level's ekCaBundle" in message
    assert "ekTrust.caBundle" not in message  # its advice (add the CA) would undo the scope
    # an identity of 2 holds it at 2 anyway: nothing to say about its EK
    capped = AgentMember(SoftTpm(virtual), _scoped(vendors, discrete))
    capped.spec["identity"] = 2
    assert capped.enrol(T0).outcome == "Verified"
    assert capped.status["level"] == 2
    assert "held at level" not in capped.status["trust"]["message"]


def test_a_tpm_outside_the_lowest_levels_scope_holds_no_level(
    vendors: tuple[SoftCA, SoftCA],
) -> None:
    """Trusted at level 0: its quote verified, but no gated VM may use it."""
    discrete, virtual = vendors
    spec = _spec(*vendors)
    spec["levels"][0]["ekCaBundle"] = discrete.bundle_pem()
    m = AgentMember(SoftTpm(virtual), parse_policy("default", spec))
    assert m.enrol(T0).outcome == "Verified"
    assert m.status["level"] == 0
    assert "held at level 0: level 1 (standard)" in m.status["trust"]["message"]
