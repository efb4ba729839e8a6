"""Software-held TPM keys (tests/softtpm.py), as the scale benchmark's simulated members use
them: the operator's own verification accepts them only through the same path as a TPM's,
refuses them tampered, and refuses them outright under a policy that does not trust their
software CA (they are no back door).

Also: the operator's memoized checks (EK facts and certificate path, AK facts, the quote
reference) are keyed by content, so a changed CA bundle, EK, AK or golden value is checked
afresh, and validity is still judged against the time of every cycle.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID
from tpm2_pytss.types import TPM2B_PUBLIC
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from gtvp.core import attestation as core_attestation
from gtvp.core import errors
from gtvp.core.enrolment import check_ek_certificate, ek_facts, make_activation_challenge
from gtvp.core.policy import Policy, parse_policy
from gtvp.core.quote import Evidence, Expectation, quote_reference, verify_quote
from gtvp.core.refvalues import PcrRule, ReferenceSet
from gtvp.core.tpm_wire import parse_public
from gtvp_agent.tpm import AK_ATTRIBUTES, AK_TEMPLATES
from gtvp_local.pool import pool_policy
from gtvp_local.swtpm import SwtpmCA
from tests.eventlogs import synth_log
from tests.softmember import AgentMember, Bundle, policy_trusting
from tests.softtpm import SoftCA, SoftTpm, SoftTpmError

# the operator's clock runs behind the agent's here, so that every answerAfter has passed
# for gtvp-agent's real-time check and a cycle needs no sleep
T0 = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
LATER = dt.timedelta(seconds=11)


@pytest.fixture(scope="module")
def ca() -> SoftCA:
    return SoftCA()


def _trusted(ca: SoftCA, *extra_cas: SoftCA) -> AgentMember:
    m = AgentMember(
        SoftTpm(ca), policy_trusting(ca.bundle_pem(), *(c.bundle_pem() for c in extra_cas))
    )
    step = m.enrol(T0)
    assert (m.phase, step.outcome) == ("Trusted", "Verified"), m.status.get("trust")
    return m


# ----- the same formats as a TPM's -----------------------------------------------------------


def test_soft_ek_is_the_tcg_low_range_ecc_p256_template(ca: SoftCA) -> None:
    tpm = SoftTpm(ca)
    _cert, template = create_ek_template("EK-ECC256", _no_nv)
    x, y = _xy(tpm.ek_public)
    template.publicArea.unique.ecc.x = x
    template.publicArea.unique.ecc.y = y
    assert bytes(template.marshal()) == tpm.ek_public


def test_soft_ak_is_the_agents_ak_template(ca: SoftCA) -> None:
    tpm = SoftTpm(ca)
    template = TPM2B_PUBLIC.parse(AK_TEMPLATES["ecc"], objectAttributes=AK_ATTRIBUTES)
    x, y = _xy(tpm.ak_public)
    template.publicArea.unique.ecc.x = x
    template.publicArea.unique.ecc.y = y
    assert bytes(template.marshal()) == tpm.ak_public
    assert tpm.ak_name == bytes(template.get_name().marshal())[2:]


def test_soft_activation_answers_the_operators_credential_and_only_for_its_own_keys(
    ca: SoftCA,
) -> None:
    tpm, other = SoftTpm(ca), SoftTpm(ca)
    secret = bytes(range(32))
    ch = make_activation_challenge(ek_public_area=tpm.ek_public, ak_name=tpm.ak_name, secret=secret)
    assert tpm.activate_credential(ch.credential_blob, ch.encrypted_secret) == secret
    # another TPM (another EK) cannot unwrap it; nor can this one for another AK's name
    with pytest.raises(SoftTpmError, match="INTEGRITY"):
        other.activate_credential(ch.credential_blob, ch.encrypted_secret)
    for_other_ak = make_activation_challenge(
        ek_public_area=tpm.ek_public, ak_name=other.ak_name, secret=secret
    )
    with pytest.raises(SoftTpmError, match="INTEGRITY"):
        tpm.activate_credential(for_other_ak.credential_blob, for_other_ak.encrypted_secret)


# ----- enrolment and quotes through the operator's path ---------------------------------------


def test_soft_member_enrols_through_activation_and_is_trusted(ca: SoftCA) -> None:
    m = AgentMember(SoftTpm(ca), policy_trusting(ca.bundle_pem()))
    m.operator(T0)
    assert m.phase == "Pending"
    m.cycle(T0)  # the agent publishes its enrolment; the EK is checked, a credential issued
    assert m.phase == "Enrolling"
    credential = m.status["challenge"]["credential"]
    assert credential["akName"] == m.status["agent"]["enrollment"]["akName"]
    m.cycle(T0)  # the soft TPM activates it: the AK is bound, a nonce is asked for
    assert m.status["trust"]["akName"] == credential["akName"]
    assert m.status["challenge"]["nonce"]
    step = m.cycle(T0)  # the first quote
    assert (m.phase, m.reason, step.outcome) == ("Trusted", "QuoteVerified", "Verified")
    # the agent's code wrote what it writes for a TPM
    agent = m.status["agent"]
    assert set(agent["enrollment"]) == {
        "ekPublic",
        "ekCertificate",
        "akPublic",
        "akName",
        "activation",
    }
    assert set(agent["evidence"]) == {
        "nonce",
        "attest",
        "signature",
        "pcrBank",
        "pcrValues",
        "producedAt",
    }
    # and keeps being trusted, quote after quote
    for i in range(1, 4):
        step = m.cycle(T0 + i * LATER)
        assert (m.phase, step.outcome) == ("Trusted", "Verified")


def test_tampered_soft_member_is_refused(ca: SoftCA) -> None:
    m = _trusted(ca)
    assert isinstance(m.tpm, SoftTpm)
    m.tpm.extend(7, b"a modified bootloader")
    step = m.cycle(T0 + LATER)
    assert (m.phase, step.outcome) == ("Untrusted", "PcrMismatch")


def test_soft_member_evidence_altered_after_signing_is_refused(ca: SoftCA) -> None:
    m = _trusted(ca)
    m.operator(T0 + LATER)  # the next nonce, when due
    m.agent_step()
    evidence = m.status["agent"]["evidence"]
    attest = bytearray(base64.b64decode(evidence["attest"]))
    attest[-1] ^= 1  # the PCR digest, after the TPM signed it
    evidence["attest"] = base64.b64encode(bytes(attest)).decode()
    step = m.operator(T0 + LATER)
    assert (m.phase, step.outcome) == ("Untrusted", "BadSignature")


def test_soft_member_signing_with_another_key_is_refused(ca: SoftCA) -> None:
    m = _trusted(ca)
    impostor = SoftTpm(ca)
    m.operator(T0 + LATER)  # the next nonce, when due
    m.agent_step()
    ch = m.status["challenge"]
    q = impostor.quote(bytes.fromhex(ch["nonce"]), ch["pcrBank"], ch["pcrs"])
    m.status["agent"]["evidence"]["signature"] = base64.b64encode(q.signature).decode()
    assert m.operator(T0 + LATER).outcome == "BadSignature"


def test_soft_ek_is_no_back_door_without_its_ca_in_the_policy(ca: SoftCA) -> None:
    """The software CA is trusted only where a policy names it: under any other bundle a
    soft member is refused at its EK certificate, before any credential is issued."""
    other = SoftCA("another CA")
    m = AgentMember(SoftTpm(ca), policy_trusting(other.bundle_pem()))
    step = m.enrol(T0)
    assert (m.phase, step.outcome) == ("Untrusted", "EkCertificateUntrusted")
    assert not m.status["challenge"]  # no credential challenge for an untrusted EK
    uncertified = AgentMember(SoftTpm(None), policy_trusting(ca.bundle_pem()))
    assert uncertified.enrol(T0).outcome == "EkCertificateMissing"


# ----- the memoized checks follow their inputs ------------------------------------------------


def test_a_bound_member_whose_ca_leaves_the_bundle_is_refused_at_the_next_cycle(
    ca: SoftCA,
) -> None:
    """The EK's certificate path is memoized, by content: the same EK, accepted every cycle
    before, is refused as soon as the policy's bundle no longer holds its CA."""
    spare = SoftCA("spare CA")
    m = _trusted(ca, spare)
    assert m.cycle(T0 + LATER).outcome == "Verified"
    m.policy = policy_trusting(spare.bundle_pem())
    step = m.cycle(T0 + 2 * LATER)
    assert (m.phase, step.outcome) == ("Untrusted", "EkCertificateUntrusted")
    m.policy = policy_trusting(ca.bundle_pem())  # and back: the path holds again
    m.agent_step()
    assert m.operator(T0 + 3 * LATER).outcome != "EkCertificateUntrusted"


def test_ek_certificate_path_is_memoized_but_validity_is_judged_every_time(ca: SoftCA) -> None:
    tpm = SoftTpm(ca)
    assert tpm.ek_certificate is not None
    ek = ek_facts(tpm.ek_public)
    now = dt.datetime.now(dt.UTC)

    def check(bundle: str, at: dt.datetime) -> None:
        check_ek_certificate(
            ek_spki=ek.spki,
            certificate=tpm.ek_certificate or b"",
            presented_chain=[],
            ca_bundle_pem=bundle,
            now=at,
        )

    check(ca.bundle_pem(), now)
    check(ca.bundle_pem(), now)  # from the memo
    with pytest.raises(errors.EkCertificateInvalid, match="expired"):
        check(ca.bundle_pem(), now + dt.timedelta(days=365))
    with pytest.raises(errors.EkCertificateUntrusted):
        check(SoftCA("other").bundle_pem(), now)
    # another EK than the certified one: the same certificate, another key
    with pytest.raises(errors.EkCertificateInvalid, match="another key"):
        check_ek_certificate(
            ek_spki=ek_facts(SoftTpm(ca).ek_public).spki,
            certificate=tpm.ek_certificate,
            presented_chain=[],
            ca_bundle_pem=ca.bundle_pem(),
            now=now,
        )


def test_a_changed_golden_value_is_judged_by_the_new_policy_at_once(ca: SoftCA) -> None:
    m = _trusted(ca)
    spec_golden = {str(p): "00" * 32 for p in range(8)}
    spec_golden["7"] = "11" * 32
    policy = policy_trusting(ca.bundle_pem())
    m.policy = _with_golden(policy, {int(k): bytes.fromhex(v) for k, v in spec_golden.items()})
    step = m.cycle(T0 + LATER)
    assert (m.phase, step.outcome) == ("Untrusted", "PcrMismatch")


def test_quote_reference_is_shared_by_content_only(ca: SoftCA) -> None:
    zero = {p: bytes(32) for p in range(8)}
    a = quote_reference(pcr_bank="sha256", pcrs=tuple(range(8)), golden=dict(zero))
    assert quote_reference(pcr_bank="sha256", pcrs=tuple(range(8)), golden=dict(zero)) is a
    changed = {**zero, 3: b"\1" * 32}
    b = quote_reference(pcr_bank="sha256", pcrs=tuple(range(8)), golden=changed)
    assert b is not a
    assert b.golden_concatenated != a.golden_concatenated
    # an expectation never takes a reference that does not hold exactly its values
    tpm = SoftTpm(ca)
    ak = parse_public(tpm.ak_public)
    q = tpm.quote(b"n" * 32, "sha256", range(8))
    ev = Evidence(q.attest, q.signature, "sha256", q.pcr_values)
    good = Expectation.of(a, ak=ak, nonce=b"n" * 32, signer=tpm.qualified_signer)
    verify_quote(ev, good)
    mismatched = Expectation(
        ak=ak,
        nonce=b"n" * 32,
        pcr_bank="sha256",
        pcrs=tuple(range(8)),
        signer=tpm.qualified_signer,
        golden=changed,
        reference=a,
    )
    with pytest.raises(errors.PcrMismatch):
        verify_quote(ev, mismatched)


def test_a_changed_ak_public_area_is_checked_afresh(ca: SoftCA) -> None:
    """The AK's facts are memoized by its public area: one bit changed (restricted cleared)
    is another key, parsed and refused, though the AK was accepted every cycle before."""
    m = _trusted(ca)
    m.agent_step()  # the next quote
    en = m.status["agent"]["enrollment"]
    area = bytearray(base64.b64decode(en["akPublic"]))
    (attributes,) = struct.unpack_from(">I", area, 6)
    struct.pack_into(">I", area, 6, attributes & ~(1 << 16))
    en["akPublic"] = base64.b64encode(bytes(area)).decode()
    step = m.operator(T0 + LATER)
    assert (m.phase, step.outcome) == ("Untrusted", "AkAttributesInvalid")


class _PoolView(Mapping[str, str]):
    """Like the operator's view of the EKs other members are bound to: a lookup is cheap,
    a walk (len, iteration) goes over the whole pool."""

    def __init__(self, holders: dict[str, str]) -> None:
        self.holders = holders
        self.walks = 0

    def __getitem__(self, fingerprint: str) -> str:
        return self.holders[fingerprint]

    def __iter__(self) -> Iterator[str]:
        self.walks += 1
        return iter(self.holders)

    def __len__(self) -> int:
        self.walks += 1
        return len(self.holders)


def test_a_cycle_looks_the_ek_up_among_other_members_without_walking_the_pool(
    ca: SoftCA,
) -> None:
    """One lookup per cycle, whatever the pool's size (a walk per cycle made every cycle
    cost O(members): 13 of the operator's 36 CPU seconds at 1,000 members)."""
    m = _trusted(ca)
    view = _PoolView({})
    m.ek_holders = view  # type: ignore[assignment]
    assert m.cycle(T0 + LATER).outcome == "Verified"
    assert view.walks == 0
    fingerprint = m.status["trust"]["ekSHA256"]
    view.holders[fingerprint] = "m-other"
    step = m.cycle(T0 + 2 * LATER)
    assert (m.phase, step.outcome) == ("Untrusted", "DuplicateEk")
    assert view.walks == 0


# ----- helpers -----------------------------------------------------------------------------


def _no_nv(index: int) -> bytes:
    raise NoSuchIndex(index)


def _xy(public: bytes) -> tuple[bytes, bytes]:
    key = parse_public(public).key
    assert isinstance(key, ec.EllipticCurvePublicKey)
    nums = key.public_numbers()
    return nums.x.to_bytes(32, "big"), nums.y.to_bytes(32, "big")


def _with_golden(policy: Policy, golden: dict[int, bytes]) -> Policy:
    cls = policy.member_classes["swtpm"]
    return dataclasses.replace(
        policy, member_classes={"swtpm": dataclasses.replace(cls, golden=golden)}
    )


# ----- enrolment data that breaks a parser: fail closed, never a frozen verdict ----------------


def _ek_key(m: AgentMember) -> ec.EllipticCurvePublicKey:
    spki = ek_facts(base64.b64decode(m.status["agent"]["enrollment"]["ekPublic"])).spki
    key = serialization.load_der_public_key(spki)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def _cert_with_broken_extension(m: AgentMember) -> str:
    """An 'EK certificate' for the member's own EK, signed by any key, whose basicConstraints
    is not valid DER (cryptography parses extensions only when they are read)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not an EK CA")])
    broken = x509.UnrecognizedExtension(ExtensionOID.BASIC_CONSTRAINTS, b"\x30\x03\x01\x01")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_ek_key(m))
        .serial_number(7)
        .not_valid_before(T0 - dt.timedelta(days=1))
        .not_valid_after(T0 + dt.timedelta(days=9))
        .add_extension(broken, critical=False)
        .sign(key, hashes.SHA256())
    )
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def _bare_ek_and_another_ak(ca: SoftCA, m: AgentMember) -> None:
    """The member's EK written without its TPM2B size prefix, and another TPM's AK."""
    en = m.status["agent"]["enrollment"]
    ek = base64.b64decode(en["ekPublic"])
    assert int.from_bytes(ek[:2], "big") == len(ek) - 2
    en["ekPublic"] = base64.b64encode(ek[2:]).decode()
    other = AgentMember(SoftTpm(ca), m.policy)
    other.enrol(T0)
    en["akPublic"] = other.status["agent"]["enrollment"]["akPublic"]
    en["akName"] = other.status["agent"]["enrollment"]["akName"]


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        ("broken certificate extension", "EkCertificateInvalid"),
        ("bare EK with another AK", "EnrolmentChanged"),
    ],
)
def test_enrolment_data_that_breaks_a_parser_untrusts_the_member_and_never_freezes_it(
    ca: SoftCA, attack: str, reason: str
) -> None:
    """Root on a Trusted member writes enrolment data that made a parser or the TPM library
    raise something other than a verification error: the step raised, nothing was written
    and the verdict stayed Trusted past its expiry (an attack review's finding)."""
    m = _trusted(ca)
    expires = m.status["trust"]["expiresAt"]
    if attack == "broken certificate extension":
        m.status["agent"]["enrollment"]["ekCertificate"] = _cert_with_broken_extension(m)
    else:
        _bare_ek_and_another_ak(ca, m)
    step = m.operator(T0 + LATER)
    assert (m.phase, step.outcome) == ("Untrusted", reason)
    trust = m.status["trust"]
    assert "expiresAt" not in trust, trust
    assert trust["usesLeft"] == 0
    # and so it stays, long after the old verdict's expiry
    m.operator(T0 + dt.timedelta(hours=5))
    assert m.phase == "Untrusted"
    assert expires not in str(m.status)


def test_a_judgement_that_fails_unforeseen_untrusts_the_member(
    ca: SoftCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever else a parser or library may raise on what an agent wrote (here the
    enrolment check itself raises, as a fault there would) is a failed check: Untrusted,
    the AK to be bound again, one Warning, not one every cycle."""
    m = _trusted(ca)

    def fault(*_: object, **__: object) -> None:
        raise ValueError("error parsing asn1 value")

    monkeypatch.setattr(core_attestation, "_check_enrolment", fault)
    step = m.operator(T0 + LATER)
    assert (m.phase, step.outcome) == ("Untrusted", "EvidenceUnprocessable")
    trust = m.status["trust"]
    assert "expiresAt" not in trust, trust
    assert trust["usesLeft"] == 0
    assert "akName" not in trust  # bound again once the agent publishes well-formed data
    assert "could not be processed (ValueError: error parsing asn1 value)" in trust["message"]
    assert [e.reason for e in step.events] == ["EvidenceUnprocessable"]
    again = m.operator(T0 + dt.timedelta(hours=5))
    assert m.phase == "Untrusted"
    assert again.events == ()


# ----- a policy edit that revokes what a verdict rested on ------------------------------------


def test_revoking_the_values_a_verdict_rested_on_stops_new_decisions_and_asks_at_once(
    ca: SoftCA,
) -> None:
    """An administrator revokes a golden value (a firmware found vulnerable): a member judged
    under it backs no new placement from the next look on, and its next quote is asked for
    now, not at its routine time; an agent that withholds it keeps no usable verdict."""
    m = _trusted(ca)  # its agent has not answered the next nonce yet
    assert m.status["trust"]["usesLeft"] > 0
    golden = dict(m.policy.member_classes["swtpm"].golden)
    golden[7] = b"\x11" * 32
    m.policy = _with_golden(m.policy, golden)
    step = m.operator(T0 + LATER)
    trust = m.status["trust"]
    assert m.phase == "Trusted"  # until the quote it is asked for is judged
    assert trust["usesLeft"] == 0  # but no new placement or migration rests on it
    assert "reference values" in trust["message"]
    asked = dt.datetime.fromisoformat(m.status["challenge"]["answerAfter"].replace("Z", "+00:00"))
    assert asked <= T0 + LATER
    assert [e.reason for e in step.events] == ["ReferencesChanged"]
    again = m.cycle(T0 + LATER * 2)
    assert (m.phase, again.outcome) == ("Untrusted", "PcrMismatch")


def test_a_policy_edit_that_leaves_a_verdicts_values_alone_keeps_it_usable(ca: SoftCA) -> None:
    m = _trusted(ca)
    uses = m.status["trust"]["usesLeft"]
    cls = m.policy.member_classes["swtpm"]
    other = dataclasses.replace(cls, name="other", golden={7: b"\x22" * 32})
    m.policy = dataclasses.replace(m.policy, member_classes={"swtpm": cls, "other": other})
    step = m.operator(T0 + LATER)
    assert m.phase == "Trusted"
    assert m.status["trust"]["usesLeft"] == uses
    assert step.events == ()


def test_a_class_change_is_no_revocation_of_the_old_classs_values(ca: SoftCA) -> None:
    """A member moved to another class is judged by a fresh quote under it (its verdict
    kept meanwhile, as the phase machine says), not spent as if its values were revoked."""
    m = _trusted(ca)
    uses = m.status["trust"]["usesLeft"]
    cls = m.policy.member_classes["swtpm"]
    other = dataclasses.replace(cls, name="other", golden={**cls.golden, 7: b"\x22" * 32})
    m.policy = dataclasses.replace(m.policy, member_classes={"swtpm": cls, "other": other})
    m.spec["memberClass"] = "other"
    step = m.operator(T0 + LATER)
    assert m.phase == "Trusted"
    assert m.status["trust"]["usesLeft"] == uses
    assert "ReferencesChanged" not in [e.reason for e in step.events]


def test_a_revocation_in_the_class_a_verdict_was_judged_under_spends_it_after_a_move(
    ca: SoftCA,
) -> None:
    """The member was moved to another class (its verdict stands until a quote judged
    under it); then the old class's golden value is revoked, and the agent withholds its
    quote: no new decision rests on the verdict from the next look on. Found by a review:
    a verdict judged under a class other than the current one was never compared."""
    m = _trusted(ca)
    cls = m.policy.member_classes["swtpm"]
    other = dataclasses.replace(cls, name="other")
    m.policy = dataclasses.replace(m.policy, member_classes={"swtpm": cls, "other": other})
    m.spec["memberClass"] = "other"
    m.operator(T0 + LATER)
    assert m.status["trust"]["usesLeft"] > 0  # the move alone revokes nothing
    revoked = dataclasses.replace(cls, golden={**cls.golden, 7: b"\x22" * 32})
    m.policy = dataclasses.replace(m.policy, member_classes={"swtpm": revoked, "other": other})
    step = m.operator(T0 + LATER + dt.timedelta(seconds=1))
    assert m.status["trust"]["usesLeft"] == 0
    assert "reference values of member class swtpm" in m.status["trust"]["message"]
    assert [e.reason for e in step.events] == ["ReferencesChanged"]


def test_removing_the_class_a_verdict_was_judged_under_stops_new_decisions_at_once(
    ca: SoftCA,
) -> None:
    """An administrator revokes a firmware by removing its member class and making another
    the default; the member's agent withholds its next quote. Its verdict, judged under the
    removed class, backs no new placement from the next look on (key release already
    refused it), and its next quote is asked for now."""
    m = _trusted(ca)
    assert m.status["trust"]["usesLeft"] > 0
    cls = m.policy.member_classes["swtpm"]
    new = dataclasses.replace(cls, name="fw-new", golden={**cls.golden, 7: b"\x22" * 32})
    m.policy = dataclasses.replace(
        m.policy, member_classes={"fw-new": new}, default_member_class="fw-new"
    )
    step = m.operator(T0 + LATER)
    trust = m.status["trust"]
    assert m.phase == "Trusted"  # until the quote it is asked for is judged
    assert trust["usesLeft"] == 0
    assert "no longer has member class swtpm" in trust["message"]
    assert [e.reason for e in step.events] == ["ReferencesChanged"]
    asked = dt.datetime.fromisoformat(m.status["challenge"]["answerAfter"].replace("Z", "+00:00"))
    assert asked <= T0 + LATER


def test_a_shorter_validfor_or_fewer_uses_apply_to_the_standing_verdict_at_once(
    ca: SoftCA,
) -> None:
    """An administrator who suspects the hosts cuts the level's validFor (and maxUses): a
    compromised agent that withholds its next quote keeps its verdict no longer than the
    new validFor from when it was verified, not the old one."""
    m = _trusted(ca)
    verified = dt.datetime.fromisoformat(m.status["trust"]["verifiedAt"].replace("Z", "+00:00"))
    before = m.status["trust"]["expiresAt"]
    short = dt.timedelta(seconds=5)  # from 15 s
    levels = tuple(
        dataclasses.replace(lv, valid_for=short, max_uses=1, interval=dt.timedelta(seconds=2))
        for lv in m.policy.levels
    )
    m.policy = dataclasses.replace(m.policy, levels=levels)
    m.operator(T0 + dt.timedelta(seconds=1))
    trust = m.status["trust"]
    assert trust["expiresAt"] != before
    expires = dt.datetime.fromisoformat(trust["expiresAt"].replace("Z", "+00:00"))
    assert expires <= verified + short
    assert trust["usesLeft"] == 1
    m.operator(verified + short + dt.timedelta(seconds=1))  # the agent stays silent
    assert (m.phase, m.status["trust"]["reason"]) == ("Untrusted", "VerdictExpired")
    # verified longer ago than the new validFor: one interval from the edit to answer the
    # quote asked for now, not expired (nor held for readmission) by the edit alone
    old = _trusted(ca)
    old.policy = m.policy
    edit = T0 + dt.timedelta(seconds=10)
    old.operator(edit)
    assert old.phase == "Trusted"
    expires = dt.datetime.fromisoformat(old.status["trust"]["expiresAt"].replace("Z", "+00:00"))
    assert edit + dt.timedelta(seconds=1) < expires <= edit + dt.timedelta(seconds=2)
    asked = dt.datetime.fromisoformat(old.status["challenge"]["answerAfter"].replace("Z", "+00:00"))
    assert asked <= edit


def test_dropping_the_judged_level_applies_the_bounds_of_the_level_it_falls_to(
    ca: SoftCA,
) -> None:
    """Level 3 is merged into level 2, whose validFor and maxUses are cut in the same edit:
    the verdict judged at level 3, published at level 2 now, keeps no more than level 2
    allows (found by a review: it kept level 3's)."""
    m = _trusted(ca)
    assert m.status["trust"]["level"] == 3
    verified = dt.datetime.fromisoformat(m.status["trust"]["verifiedAt"].replace("Z", "+00:00"))
    short = dt.timedelta(seconds=5)
    levels = tuple(
        lv if lv.level < 2 else dataclasses.replace(lv, valid_for=short, max_uses=1,
                                                    interval=dt.timedelta(seconds=2))
        for lv in m.policy.levels
        if lv.level < 3
    )  # fmt: skip
    m.policy = dataclasses.replace(m.policy, levels=levels)
    m.operator(T0 + dt.timedelta(seconds=1))
    trust = m.status["trust"]
    expires = dt.datetime.fromisoformat(trust["expiresAt"].replace("Z", "+00:00"))
    assert expires <= verified + short
    assert trust["usesLeft"] == 1


def test_a_raise_to_a_level_with_a_shorter_validfor_does_not_cut_the_standing_verdict(
    ca: SoftCA,
) -> None:
    """A member judged at level 1 is raised to level 3, whose validFor is shorter: its
    verdict keeps level 1's until the fresh quote judged at level 3 (the phase machine),
    not cut to level 3's and expired (at a level without autoRecover, held for
    readmission) by the raise alone."""
    m = AgentMember(SoftTpm(ca), policy_trusting(ca.bundle_pem()))
    m.spec["identity"] = 1
    assert m.enrol(T0).outcome == "Verified"
    before = m.status["trust"]["expiresAt"]
    levels = tuple(
        lv if lv.level < 3 else dataclasses.replace(lv, valid_for=dt.timedelta(seconds=3))
        for lv in m.policy.levels
    )
    m.policy = dataclasses.replace(m.policy, levels=levels)
    m.spec["identity"] = 3
    m.operator(T0 + dt.timedelta(seconds=10))
    assert m.phase == "Trusted"
    assert m.status["trust"]["expiresAt"] == before


def test_a_first_reference_set_added_to_a_class_is_a_change_of_its_values(ca: SoftCA) -> None:
    """A verdict that matched no set rested on the class having none: once one is added,
    the member's log must match it, which its next quote must show."""
    m = _trusted(ca)
    cls = m.policy.member_classes["swtpm"]
    first = ReferenceSet(name="fw-1", pcrs=(PcrRule(4, ()),))
    m.policy = dataclasses.replace(
        m.policy,
        member_classes={"swtpm": dataclasses.replace(cls, reference_sets=(first,))},
    )
    step = m.operator(T0 + LATER)
    assert m.status["trust"]["usesLeft"] == 0
    assert [e.reason for e in step.events] == ["ReferencesChanged"]


# ----- a log the verdict judges is bound to the quote on every PCR it covers ------------------

SHIM, GRUB, SEPARATOR = b"shim-15.8", b"grub-2.12", b"\0\0\0\0"


def _booted_shim(ca: SoftCA, tmp_path: Path, events: list[tuple[int, int, bytes]]) -> AgentMember:
    """A member whose TPM measured shim, grub and a separator into PCR 4, under a class whose
    golden PCR 4 is that boot and which forbids the shim (found bad after the golden values
    were taken); its agent sends `events` as its event log."""
    tpm = SoftTpm(ca)
    for data in (SHIM, GRUB, SEPARATOR):
        tpm.extend(4, data)
    policy = policy_trusting(ca.bundle_pem())
    cls = policy.member_classes["swtpm"]
    golden = {**cls.golden, 4: tpm.pcrs["sha256"][4]}
    shim = hashlib.sha256(SHIM).hexdigest()
    cls = dataclasses.replace(cls, golden=golden, forbidden_digests=frozenset({shim}))
    m = AgentMember(tpm, dataclasses.replace(policy, member_classes={"swtpm": cls}))
    log_file = tmp_path / "binary_bios_measurements"
    log_file.write_bytes(synth_log(events))
    m.agent.cfg = dataclasses.replace(m.agent.cfg, event_log=log_file)
    return m


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        ("the log as measured", "ForbiddenEvent"),
        ("the log without the shim", "EventLogMismatch"),
        ("a log of no events", "EventLogMismatch"),
    ],
)
def test_a_forbidden_digest_on_a_golden_pcr_cannot_be_hidden_by_editing_the_log(
    ca: SoftCA, tmp_path: Path, sent: str, reason: str
) -> None:
    """Golden PCR 4 still matches the bad boot; only the log shows the forbidden shim. A
    host that leaves the shim out of its log (or sends an empty one) does not pass: the log
    a verdict judges must replay to what the TPM signed on every quoted PCR."""
    measured = [(4, 0x80000003, SHIM), (4, 0x80000003, GRUB), (4, 0x4, SEPARATOR)]
    events = {
        "the log as measured": measured,
        "the log without the shim": measured[1:],
        "a log of no events": [],
    }[sent]
    m = _booted_shim(ca, tmp_path, events)
    step = m.enrol(T0)
    assert (m.phase, step.outcome) == ("Untrusted", reason)


def test_a_forbidden_digest_is_judged_only_with_a_log(ca: SoftCA, tmp_path: Path) -> None:
    """The class forbids a digest but does not say `required`: a host that sends no log at
    all would never be judged by it, so no log is a refusal too."""
    m = _booted_shim(ca, tmp_path, [])
    m.agent.cfg = dataclasses.replace(m.agent.cfg, event_log=None)
    step = m.enrol(T0)
    assert (m.phase, step.outcome) == ("Untrusted", "EventLogMissing")


def test_selecting_another_pcr_spends_a_verdict_that_never_quoted_it(ca: SoftCA) -> None:
    """The administrator adds PCR 8 (its golden value not what the host measured) to the
    selection: the standing verdict never showed PCR 8, so no new decision or key release
    rests on it, and the quote it is asked for fails on PCR 8. (A golden value for PCR 8
    set before it was selected is refused, so adding it to the selection always changes
    the class's values.)"""
    m = _trusted(ca)
    assert m.status["trust"]["usesLeft"] > 0
    spec = pool_policy(cast(SwtpmCA, Bundle(ca.bundle_pem())), name="default")["spec"]
    spec["pcrSelection"]["pcrs"] = [*range(9)]
    spec["memberClasses"][0]["goldenPCRs"]["8"] = "11" * 32
    m.policy = parse_policy("default", spec)
    assert "reference values" in str(
        core_attestation.references_revoked(m.status["trust"], m.policy)
    )
    step = m.operator(T0 + LATER)
    assert m.phase == "Trusted"  # until the quote it is asked for is judged
    assert m.status["trust"]["usesLeft"] == 0
    assert [e.reason for e in step.events] == ["ReferencesChanged"]
    again = m.cycle(T0 + LATER * 2)
    assert (m.phase, again.outcome) == ("Untrusted", "PcrMismatch")


def test_a_pcr_taken_out_of_the_selection_leaves_no_stale_value_behind(ca: SoftCA) -> None:
    """The agent's evidence is a JSON merge patch, which keeps what it does not name: the
    value of a PCR no longer quoted is removed, or every later quote would be refused for
    reporting a PCR it does not cover (PcrSelectionMismatch, held on strict levels)."""
    m = _trusted(ca)
    spec = pool_policy(cast(SwtpmCA, Bundle(ca.bundle_pem())), name="default")["spec"]
    kept = spec["pcrSelection"]["pcrs"][:-1]
    spec["pcrSelection"]["pcrs"] = kept
    golden = spec["memberClasses"][0]["goldenPCRs"]
    spec["memberClasses"][0]["goldenPCRs"] = {k: golden[k] for k in map(str, kept)}
    m.policy = parse_policy("default", spec)
    reasons = []
    for i in range(2, 5):
        m.cycle(T0 + i * LATER)
        reasons.append(m.reason)
    assert m.phase == "Trusted", reasons
    assert sorted(map(int, m.status["agent"]["evidence"]["pcrValues"])) == kept
