"""The tamper suite: real swtpm quotes, each altered one way, each refused with its reason.

Every case starts from evidence a real TPM 2.0 (swtpm, through the agent's own Tpm class)
produced and that verifies; the test first proves the untouched evidence passes, then
changes one thing and asserts the verifier's reason code.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from gtvp.core import errors
from gtvp.core.enrolment import (
    check_activation,
    check_ek_pin,
    ek_fingerprint,
    make_activation_challenge,
    verify_ek_certificate,
)
from gtvp.core.quote import ClockState, verify_quote
from gtvp.core.tpm_wire import ALG_SHA1, ALG_SHA384, RESTRICTED, parse_public
from gtvp_agent.tpm import Enrolment, Tpm, TpmUnavailable
from gtvp_local.swtpm import Swtpm, SwtpmCA, SwtpmError, extend_pcr
from tests.tpmkit import PCRS, RealQuote, craft_attest, real_quote, soft_ak, soft_sign

pytestmark = pytest.mark.tpm


@pytest.fixture(scope="module")
def good(shared_tpm: Swtpm, tpm_dir: Path) -> RealQuote:
    q = real_quote(shared_tpm.tcti, tpm_dir / "agent-shared")
    verify_quote(q.evidence(), q.expectation())  # the untouched evidence verifies
    return q


def _reason(fn: Callable[[], object]) -> str:
    with pytest.raises(errors.VerificationError) as err:
        fn()
    return err.value.reason


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# ----- signature and signer ---------------------------------------------------------------------


def test_wrong_signature_is_rejected(good: RealQuote) -> None:
    sig = _flip(good.quote.signature, 10)
    assert _reason(lambda: verify_quote(good.evidence(signature=sig), good.expectation())) == (
        "BadSignature"
    )


def test_quote_signed_by_another_ak_is_rejected(
    good: RealQuote, make_tpm: Callable[..., Swtpm], tpm_dir: Path
) -> None:
    other = real_quote(make_tpm().tcti, tpm_dir / "agent-other", nonce=good.nonce)
    ev = other.evidence()
    assert _reason(lambda: verify_quote(ev, good.expectation(golden=None))) == "BadSignature"


def test_signer_of_another_ek_is_rejected(
    good: RealQuote, make_tpm: Callable[..., Swtpm], tpm_dir: Path
) -> None:
    other = real_quote(make_tpm().tcti, tpm_dir / "agent-other2")
    from gtvp.core.tpm_wire import ak_qualified_name

    exp = good.expectation(signer=ak_qualified_name(other.ek, good.ak))
    assert _reason(lambda: verify_quote(good.evidence(), exp)) == "SignerMismatch"


def test_sha1_signature_is_a_weak_hash(good: RealQuote) -> None:
    sig = good.quote.signature[:2] + struct.pack(">H", ALG_SHA1) + good.quote.signature[4:]
    assert _reason(lambda: verify_quote(good.evidence(signature=sig), good.expectation())) == (
        "WeakHashAlgorithm"
    )


def test_signature_claiming_another_hash_is_rejected(good: RealQuote) -> None:
    sig = good.quote.signature[:2] + struct.pack(">H", ALG_SHA384) + good.quote.signature[4:]
    assert _reason(lambda: verify_quote(good.evidence(signature=sig), good.expectation())) == (
        "BadSignature"
    )


def test_ak_without_restricted_is_rejected(good: RealQuote) -> None:
    ak = replace(good.ak, attributes=good.ak.attributes & ~RESTRICTED)
    assert _reason(lambda: verify_quote(good.evidence(), good.expectation(ak=ak))) == (
        "AkAttributesInvalid"
    )


def test_ak_named_with_sha1_is_refused(
    shared_tpm: Swtpm, tpm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real TPM makes an AK with every right attribute but a SHA-1 name (an agent built
    to): enrolment refuses it, so no credential is ever bound to a name SHA-1 computed."""
    import gtvp_agent.tpm as agent_tpm
    from gtvp.core.enrolment import ak_facts

    real_public = agent_tpm.TPM2B_PUBLIC

    class Sha1Named(real_public):  # type: ignore[misc,valid-type]
        @classmethod
        def parse(cls, alg: str = "rsa", **kwargs: object) -> object:
            return real_public.parse(alg, nameAlg="sha1", **kwargs)

    monkeypatch.setattr(agent_tpm, "TPM2B_PUBLIC", Sha1Named)
    with Tpm.open(shared_tpm.tcti, tpm_dir / "agent-sha1-name") as tpm:
        enrolment = tpm.enrolment()
    ak = parse_public(enrolment.ak_public)
    assert ak.name_alg == ALG_SHA1
    assert ak.attributes & RESTRICTED  # everything else about it is right
    assert _reason(lambda: ak_facts(enrolment.ak_public)) == "AkAttributesInvalid"
    with pytest.raises(errors.AkAttributesInvalid, match="SHA-1"):
        ak_facts(enrolment.ak_public)


def test_unrestricted_key_cannot_forge_a_quote() -> None:
    """An unrestricted key can sign any bytes, so a verifier must refuse it as an AK."""
    key, ak = soft_ak(attributes=soft_ak()[1].attributes & ~RESTRICTED)
    nonce = secrets.token_bytes(16)
    pcrs = dict.fromkeys(PCRS, b"\x00" * 32)
    attest = craft_attest(signer=ak.name, nonce=nonce, pcr_values=pcrs)
    from gtvp.core.quote import Evidence, Expectation

    ev = Evidence(attest, soft_sign(key, attest), "sha256", pcrs)
    exp = Expectation(ak=ak, nonce=nonce, pcr_bank="sha256", pcrs=PCRS, signer=ak.name, golden=pcrs)
    assert _reason(lambda: verify_quote(ev, exp)) == "AkAttributesInvalid"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [({"magic": 0x12345678}, "NotTpmGenerated"), ({"type_": 0x8017}, "NotAQuote")],
)
def test_signed_bytes_that_are_not_a_tpm_quote_are_rejected(
    changes: dict[str, int], reason: str
) -> None:
    key, ak = soft_ak()
    nonce = secrets.token_bytes(16)
    pcrs = dict.fromkeys(PCRS, b"\x00" * 32)
    attest = craft_attest(signer=ak.name, nonce=nonce, pcr_values=pcrs, **changes)  # type: ignore[arg-type]
    from gtvp.core.quote import Evidence, Expectation

    ev = Evidence(attest, soft_sign(key, attest), "sha256", pcrs)
    exp = Expectation(ak=ak, nonce=nonce, pcr_bank="sha256", pcrs=PCRS, signer=ak.name)
    assert _reason(lambda: verify_quote(ev, exp)) == reason


# ----- nonce ------------------------------------------------------------------------------------


def test_wrong_nonce_is_rejected(good: RealQuote) -> None:
    exp = good.expectation(nonce=secrets.token_bytes(32))
    assert _reason(lambda: verify_quote(good.evidence(), exp)) == "NonceMismatch"


def test_replayed_nonce_is_rejected(good: RealQuote) -> None:
    exp = good.expectation(nonce=secrets.token_bytes(32), answered_nonces=frozenset({good.nonce}))
    assert _reason(lambda: verify_quote(good.evidence(), exp)) == "NonceReplayed"


# ----- PCRs -------------------------------------------------------------------------------------


def test_pcr_extended_after_the_quote_is_caught(
    make_tpm: Callable[..., Swtpm], tpm_dir: Path
) -> None:
    tpm = make_tpm()
    q = real_quote(tpm.tcti, tpm_dir / "agent-ext")
    with Tpm.open(tpm.tcti, tpm_dir / "agent-ext") as t:
        t.extend_pcr(7, b"evil bootloader")
        later = t.read_pcrs("sha256", PCRS)
    ev = q.evidence(pcr_values=later)
    assert _reason(lambda: verify_quote(ev, q.expectation())) == "PcrDigestMismatch"


def test_reported_pcr_value_changed_is_a_digest_mismatch(good: RealQuote) -> None:
    values = dict(good.quote.pcr_values) | {3: b"\x11" * 32}
    ev = good.evidence(pcr_values=values)
    assert _reason(lambda: verify_quote(ev, good.expectation())) == "PcrDigestMismatch"


def test_pcr_differing_from_golden_is_rejected(good: RealQuote) -> None:
    golden = dict(good.quote.pcr_values) | {7: b"\x22" * 32}
    assert _reason(lambda: verify_quote(good.evidence(), good.expectation(golden=golden))) == (
        "PcrMismatch"
    )


def test_quote_over_other_pcrs_than_asked_is_rejected(good: RealQuote) -> None:
    exp = good.expectation(pcrs=(0, 1, 2))
    assert _reason(lambda: verify_quote(good.evidence(), exp)) == "PcrSelectionMismatch"


def test_pcr_without_golden_or_event_log_is_unexplained(good: RealQuote) -> None:
    assert _reason(lambda: verify_quote(good.evidence(), good.expectation(golden={}))) == (
        "UnexplainedPcr"
    )


def test_event_log_that_does_not_replay_is_rejected(good: RealQuote) -> None:
    # a real firmware log of another machine: it cannot reproduce this TPM's PCRs
    ev = good.evidence(event_log=_testdata("binary_bios_measurements"))
    assert _reason(lambda: verify_quote(ev, good.expectation(golden={}))) == "EventLogMismatch"


def test_required_event_log_missing_is_rejected(good: RealQuote) -> None:
    exp = good.expectation(golden={}, event_log_required=True)
    assert _reason(lambda: verify_quote(good.evidence(), exp)) == "EventLogMissing"


def test_forbidden_event_in_the_log_is_rejected(good: RealQuote) -> None:
    from gtvp.core.eventlog import parse_event_log

    data = _testdata("binary_bios_measurements")
    bad = next(iter(parse_event_log(data).all_digests("sha256")))
    exp = good.expectation(forbidden_digests=frozenset({bad}))
    assert _reason(lambda: verify_quote(good.evidence(event_log=data), exp)) == "ForbiddenEvent"


def test_bogus_event_log_is_malformed(good: RealQuote) -> None:
    ev = good.evidence(event_log=_testdata("binary_bios_measurements-bogus"))
    assert _reason(lambda: verify_quote(ev, good.expectation(golden={}))) == "MalformedEvidence"


def _testdata(name: str) -> bytes:
    return (Path(__file__).parents[1] / "data" / "uefi-eventlogs" / name).read_bytes()


# ----- clock and counters -----------------------------------------------------------------------


def test_clock_going_back_is_rejected(good: RealQuote) -> None:
    from gtvp.core.tpm_wire import parse_attest

    a = parse_attest(good.quote.attest)
    last = ClockState(a.clock + 10_000, a.reset_count, a.restart_count)
    exp = good.expectation(last_clock=last)
    assert _reason(lambda: verify_quote(good.evidence(), exp)) == "ClockWentBack"


def test_reset_count_going_back_is_rejected(good: RealQuote) -> None:
    from gtvp.core.tpm_wire import parse_attest

    a = parse_attest(good.quote.attest)
    exp = good.expectation(last_clock=ClockState(0, a.reset_count + 1, 0))
    assert _reason(lambda: verify_quote(good.evidence(), exp)) == "CounterWentBack"


def test_reboot_is_reported(make_tpm: Callable[..., Swtpm], tpm_dir: Path) -> None:
    tpm = make_tpm()
    first = real_quote(tpm.tcti, tpm_dir / "agent-reboot")
    result = verify_quote(first.evidence(), first.expectation())
    tpm.stop()
    tpm.start()  # swtpm starts with TPM2_Startup(CLEAR): a reboot
    second = real_quote(tpm.tcti, tpm_dir / "agent-reboot")
    exp = second.expectation(last_clock=result.clock)
    with pytest.raises(errors.Rebooted) as err:
        verify_quote(second.evidence(), exp)
    assert isinstance(err.value.clock, ClockState)
    assert err.value.clock.reset_count == result.clock.reset_count + 1
    # the next quote, judged against the new baseline, verifies again
    verify_quote(second.evidence(), second.expectation(last_clock=err.value.clock))


def _shutdown_state(tcti: str) -> None:
    """TPM2_Shutdown(STATE): what an OS sends before a suspend, and root before a reboot
    that should look like none."""
    from tpm2_pytss import ESAPI, TCTILdr
    from tpm2_pytss.constants import TPM2_SU

    name, _, conf = tcti.partition(":")
    esapi = ESAPI(TCTILdr(name, conf))
    try:
        esapi.shutdown(TPM2_SU.STATE)
    finally:
        esapi.close()


def test_a_reboot_through_a_tpm_restart_is_reported(
    make_tpm: Callable[..., Swtpm], tpm_dir: Path
) -> None:
    """Root sends TPM2_Shutdown(STATE), then reboots; the firmware's Startup(CLEAR) is a TPM
    Restart: the PCRs are reset and a new boot measured, resetCount stays, restartCount
    rises. A quote made before (in a brief good boot) and handed in from the new boot must
    not pass as the running boot's: the reboot is reported, the next quote judged."""
    tpm = make_tpm()
    first = real_quote(tpm.tcti, tpm_dir / "agent-restart")
    result = verify_quote(first.evidence(), first.expectation())
    _shutdown_state(tpm.tcti)
    tpm.stop()
    tpm.start()  # TPM2_Startup(CLEAR) after Shutdown(STATE)
    second = real_quote(tpm.tcti, tpm_dir / "agent-restart")
    exp = second.expectation(last_clock=result.clock)
    with pytest.raises(errors.Rebooted) as err:
        verify_quote(second.evidence(), exp)
    assert isinstance(err.value.clock, ClockState)
    assert err.value.clock.reset_count == result.clock.reset_count  # no TPM Reset
    assert err.value.clock.restart_count == result.clock.restart_count + 1
    verify_quote(second.evidence(), second.expectation(last_clock=err.value.clock))


# ----- malformed blobs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "mangle"),
    [
        ("attest", lambda b: b[: len(b) // 2]),
        ("attest", lambda b: b + b"\0" * 9000),
        ("attest", lambda b: b + b"\0"),
        ("signature", lambda b: b[:5]),
        ("signature", lambda b: b"\xff" * 4 + b[4:]),
        ("attest", lambda b: b""),
    ],
    ids=[
        "truncated-attest",
        "oversized-attest",
        "trailing-byte",
        "truncated-signature",
        "unknown-signature-scheme",
        "empty-attest",
    ],
)
def test_malformed_blobs_are_errors_of_their_own(
    good: RealQuote, field: str, mangle: Callable[[bytes], bytes]
) -> None:
    raw = good.quote.attest if field == "attest" else good.quote.signature
    ev = good.evidence(**{field: mangle(raw)})
    reason = _reason(lambda: verify_quote(ev, good.expectation()))
    # the signature covers the attest bytes: changed attest bytes fail it first, a mangled
    # signature cannot be parsed
    expected = {
        "attest": {"BadSignature", "MalformedEvidence"},
        "signature": {"MalformedEvidence", "UnsupportedAlgorithm"},
    }[field]
    assert reason in expected


def test_garbage_attest_with_valid_signature_is_malformed() -> None:
    key, ak = soft_ak()
    garbage = b"\xff\x54\x43\x47" + secrets.token_bytes(40)
    from gtvp.core.quote import Evidence, Expectation

    ev = Evidence(garbage, soft_sign(key, garbage), "sha256", {})
    exp = Expectation(ak=ak, nonce=b"n", pcr_bank="sha256", pcrs=PCRS, signer=ak.name)
    assert _reason(lambda: verify_quote(ev, exp)) in {"MalformedEvidence", "NotAQuote"}


# ----- EK certificate and identity ---------------------------------------------------------------


def _enrolment(tpm: Swtpm, state: Path) -> tuple[Enrolment, bytes]:
    with Tpm.open(tpm.tcti, state) as t:
        en = t.enrolment()
    assert en.ek_certificate is not None
    return en, en.ek_certificate


def test_ek_certificate_verifies_to_the_policy_bundle(
    shared_tpm: Swtpm, swtpm_ca: SwtpmCA, tpm_dir: Path
) -> None:
    en, cert = _enrolment(shared_tpm, tpm_dir / "agent-shared")
    anchor = verify_ek_certificate(
        ek=parse_public(en.ek_public),
        certificate=cert,
        presented_chain=[],
        ca_bundle_pem=swtpm_ca.bundle_pem(),
        now=dt.datetime.now(dt.UTC),
    )
    assert anchor.subject.rfc4514_string() == "CN=swtpm-localca"


def test_ek_certificate_from_an_untrusted_ca_is_rejected(
    make_tpm: Callable[..., Swtpm], swtpm_ca: SwtpmCA, tpm_dir: Path
) -> None:
    rogue_ca = SwtpmCA(tpm_dir / "rogue-ca").ensure()
    tpm = make_tpm(ca=rogue_ca)
    en, cert = _enrolment(tpm, tpm_dir / "agent-rogue")
    assert (
        _reason(
            lambda: verify_ek_certificate(
                ek=parse_public(en.ek_public),
                certificate=cert,
                presented_chain=[],
                ca_bundle_pem=swtpm_ca.bundle_pem(),
                now=dt.datetime.now(dt.UTC),
            )
        )
        == "EkCertificateUntrusted"
    )


def _issue(
    subject_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    issuer_name: x509.Name,
    issuer_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    days: tuple[int, int] = (-1, 365),
    subject: str = "",
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = (
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        if subject
        else (x509.Name([]))
    )
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=days[0]))
        .not_valid_after(now + dt.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:  # an EK certificate (tcg-kp-EKCertificate), so that its path is what is judged
        ek_usage = x509.ObjectIdentifier("2.23.133.8.1")
        b = b.add_extension(x509.ExtendedKeyUsage([ek_usage]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def test_expired_ek_certificate_is_rejected(
    shared_tpm: Swtpm, swtpm_ca: SwtpmCA, tpm_dir: Path
) -> None:
    en, _ = _enrolment(shared_tpm, tpm_dir / "agent-shared")
    ek = parse_public(en.ek_public)
    issuer = x509.load_pem_x509_certificate((swtpm_ca.dir / "issuercert.pem").read_bytes())
    issuer_key = serialization.load_pem_private_key(
        (swtpm_ca.dir / "signkey.pem").read_bytes(), password=None
    )
    assert isinstance(issuer_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    expired = _issue(ek.key, issuer.subject, issuer_key, ca=False, days=(-30, -1))
    der = expired.public_bytes(serialization.Encoding.DER)
    with pytest.raises(errors.EkCertificateInvalid, match="expired"):
        verify_ek_certificate(
            ek=ek,
            certificate=der,
            presented_chain=[],
            ca_bundle_pem=swtpm_ca.bundle_pem(),
            now=dt.datetime.now(dt.UTC),
        )


def test_root_smuggled_in_the_presented_chain_is_not_trusted(
    shared_tpm: Swtpm, swtpm_ca: SwtpmCA, tpm_dir: Path
) -> None:
    en, _ = _enrolment(shared_tpm, tpm_dir / "agent-shared")
    ek = parse_public(en.ek_public)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swtpm-localca-rootca")])
    root = _issue(
        root_key.public_key(), root_name, root_key, ca=True, subject="swtpm-localca-rootca"
    )
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = _issue(inter_key.public_key(), root_name, root_key, ca=True, subject="swtpm-localca")
    leaf = _issue(ek.key, inter.subject, inter_key, ca=False)
    chain = [c.public_bytes(serialization.Encoding.DER) for c in (inter, root)]
    with pytest.raises(errors.EkCertificateUntrusted, match="root the node presented"):
        verify_ek_certificate(
            ek=ek,
            certificate=leaf.public_bytes(serialization.Encoding.DER),
            presented_chain=chain,
            ca_bundle_pem=swtpm_ca.bundle_pem(),
            now=dt.datetime.now(dt.UTC),
        )


def test_ek_certificate_for_another_key_is_rejected(
    shared_tpm: Swtpm, make_tpm: Callable[..., Swtpm], swtpm_ca: SwtpmCA, tpm_dir: Path
) -> None:
    _, cert = _enrolment(shared_tpm, tpm_dir / "agent-shared")
    other, _ = _enrolment(make_tpm(), tpm_dir / "agent-o3")
    with pytest.raises(errors.EkCertificateInvalid, match="another key"):
        verify_ek_certificate(
            ek=parse_public(other.ek_public),
            certificate=cert,
            presented_chain=[],
            ca_bundle_pem=swtpm_ca.bundle_pem(),
            now=dt.datetime.now(dt.UTC),
        )


def test_ek_swapped_under_a_known_member_needs_approval(good: RealQuote) -> None:
    current = ek_fingerprint(good.ek)
    assert _reason(lambda: check_ek_pin(pinned="ab" * 32, current=current, approved=None)) == (
        "EkChanged"
    )
    check_ek_pin(pinned="ab" * 32, current=current, approved=current)  # approved: accepted


# ----- credential activation --------------------------------------------------------------------


def test_credential_activation_binds_the_ak_to_the_ek(
    good: RealQuote, shared_tpm: Swtpm, tpm_dir: Path
) -> None:
    secret = secrets.token_bytes(32)
    ch = make_activation_challenge(
        ek_public_area=good.enrolment.ek_public, ak_name=good.enrolment.ak_name, secret=secret
    )
    with Tpm.open(shared_tpm.tcti, tpm_dir / "agent-shared") as t:
        proof = t.activate_credential(ch.credential_blob, ch.encrypted_secret)
    check_activation(proof=proof, secret_sha256=ch.secret_sha256)
    assert _reason(lambda: check_activation(proof=proof[::-1], secret_sha256=ch.secret_sha256)) == (
        "ActivationFailed"
    )


def test_another_tpm_cannot_answer_the_credential_challenge(
    good: RealQuote, make_tpm: Callable[..., Swtpm], tpm_dir: Path
) -> None:
    ch = make_activation_challenge(
        ek_public_area=good.enrolment.ek_public, ak_name=good.enrolment.ak_name, secret=b"s" * 32
    )
    other = make_tpm()
    with pytest.raises(TpmUnavailable), Tpm.open(other.tcti, tpm_dir / "agent-o4") as t:
        t.activate_credential(ch.credential_blob, ch.encrypted_secret)


def test_wrong_base64_in_evidence_is_malformed() -> None:
    from gtvp.core.attestation import _b64

    with pytest.raises(errors.MalformedEvidence, match="not valid base64"):
        _b64("!!not base64!!", "evidence.attest")
    assert _b64(base64.b64encode(b"ok").decode(), "x") == b"ok"


def test_tamper_waits_for_a_tpm_that_is_not_listening_yet_and_names_one_that_never_does(
    make_tpm: Callable[..., Swtpm], tmp_path: Path
) -> None:
    tpm = make_tpm()
    tpm.stop()
    with pytest.raises(SwtpmError, match="Could not load tcti"):
        extend_pcr(tpm.tcti, 7, b"nobody listens", retry_s=1.0)
    later = threading.Timer(1.0, tpm.start)
    later.start()
    try:
        started = time.monotonic()
        extend_pcr(tpm.tcti, 7, b"listens in a second", retry_s=15.0)
        assert time.monotonic() - started >= 0.9
    finally:
        later.join()
    with Tpm.open(tpm.tcti, tmp_path) as t:
        assert t.read_pcrs("sha256", [7])[7] != bytes(32)  # the extend reached the TPM
