"""Enrolment checks: the EK certificate path, the EK pin, the AK, credential activation.

Pure functions over bytes and `cryptography` objects:
- `verify_ek_certificate` validates the path from the EK certificate to an anchor in the
  policy's CA bundle with `cryptography.x509.verification` (RFC 5280: signatures, validity
  at the time given, basicConstraints cA, pathLenConstraint, name constraints, keyCertSign,
  no unknown critical extension on a CA). Certificates the node presents may serve as
  intermediates but never as anchors. EK certificates are not WebPKI end entities, so any
  EE extensions pass the validation and gtvp checks the leaf itself: a TCG EK certificate
  (EKU 2.23.133.8.1 when present, not a CA) for exactly this EK. A refusal names the
  certificate and why.
- `ek_facts` parses and checks an EK public area once (fingerprint, SPKI, TPM name);
  `ak_facts` parses an AK public area and checks its attributes once.

Once per binding, not once per cycle: a path validated for the exact bytes of the EK's
key, its certificate, the presented chain and the CA bundle is kept by their digest
(`gtvp.core.digest_cache`: bounded; any other byte in any of them is another key and is
checked from scratch), with the validity windows of its CAs and only the presented
certificates on it. Nothing is kept of a refused certificate or chain, so an agent writing
new junk with every evidence leaves nothing behind. What depends on the time is checked against
`now` on every call: the EK certificate's validity, then the kept path's windows; once one
of them no longer holds, the path is validated afresh at `now`, so an expired certificate
is refused the moment it expires, exactly as an uncached check would. A failed path
validation is never kept.
- `check_ek_pin` refuses an EK that changed under a known member unless an administrator
  approved the new one (identity takeover).
- `make_activation_challenge` / `check_activation` bind the AK to the EK (MakeCredential in
  software with tpm2-pytss; the agent's TPM can only answer if it holds both keys).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID, ObjectIdentifier
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from gtvp.core import errors
from gtvp.core.digest_cache import DigestCache, digest_of
from gtvp.core.quote import check_ak_attributes
from gtvp.core.tpm_wire import (
    ADMIN_WITH_POLICY,
    DECRYPT,
    FIXED_PARENT,
    FIXED_TPM,
    RESTRICTED,
    SIGN_ENCRYPT,
    PublicArea,
    as_tpm2b_public,
    parse_public,
)
from gtvp.core.weak_keys import WHY_ROCA, roca_weak

EK_CERTIFICATE_EKU = ObjectIdentifier("2.23.133.8.1")
MAX_CHAIN = 6
CACHE_SIZE = 1 << 15
"""Entries of each per-member cache (EK facts, EK certificate paths): more than the members
one operator replica verifies, so a cycle through all of them never evicts what the next
cycle needs (a cache smaller than the pool would miss every time under LRU)."""


def spki_der(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ek_fingerprint(ek: PublicArea) -> str:
    """SHA-256 of the EK's SubjectPublicKeyInfo, hex: what Member.spec.approval names."""
    return hashlib.sha256(spki_der(ek.key)).hexdigest()


@dataclass(frozen=True)
class EkFacts:
    """What every cycle needs of an EK, worked out once per EK public area."""

    fingerprint: str  # SHA-256 of the SubjectPublicKeyInfo, hex
    spki: bytes  # the SubjectPublicKeyInfo, DER: what its certificate must certify
    name: bytes  # the TPM name (nameAlg || H(TPMT_PUBLIC))


_EK_FACTS: DigestCache[EkFacts] = DigestCache(CACHE_SIZE)
_AK_FACTS: DigestCache[AkFacts] = DigestCache(CACHE_SIZE)


def ek_facts(ek_area: bytes) -> EkFacts:
    """Parse an EK public area and check it is a TCG endorsement key; raises as
    `parse_public` and `check_ek_public` do (memoized by its digest; failures are not)."""
    return _EK_FACTS.get(digest_of(ek_area), lambda: _ek_facts(ek_area))


def _ek_facts(ek_area: bytes) -> EkFacts:
    ek = parse_public(ek_area)
    check_ek_public(ek)
    spki = spki_der(ek.key)
    return EkFacts(fingerprint=hashlib.sha256(spki).hexdigest(), spki=spki, name=ek.name)


@dataclass(frozen=True)
class AkFacts:
    """An AK's parsed public area (its key, for every quote's signature) and name."""

    public: PublicArea
    name: str  # hex, as the agent reports it (enrollment.akName)


def ak_facts(ak_area: bytes) -> AkFacts:
    """Parse an AK public area and check it is a restricted signing key that cannot leave
    its TPM; raises as `parse_public` and `check_ak_attributes` do (memoized by its digest;
    failures are not)."""
    return _AK_FACTS.get(digest_of(ak_area), lambda: _ak_facts(ak_area))


def _ak_facts(ak_area: bytes) -> AkFacts:
    ak = parse_public(ak_area)
    check_ak_attributes(ak)
    return AkFacts(ak, ak.name.hex())


def check_ek_public(ek: PublicArea) -> None:
    """The EK must be a restricted decryption key that cannot leave its TPM, and not an RSA
    key whose private half can be computed from its public one (ROCA)."""
    need = RESTRICTED | DECRYPT | FIXED_TPM | FIXED_PARENT | ADMIN_WITH_POLICY
    if ek.attributes & need != need or ek.attributes & SIGN_ENCRYPT:
        raise errors.EkCertificateInvalid(
            "the reported EK is not a TCG endorsement key (restricted, decrypt, fixedTPM, "
            "fixedParent, adminWithPolicy; not sign)"
        )
    if isinstance(ek.key, rsa.RSAPublicKey) and ek.key.key_size < 2048:
        raise errors.EkCertificateInvalid(
            f"the EK is RSA-{ek.key.key_size}; at least 2048 is needed (a smaller key can be "
            "factored, and its credential answered without the TPM)"
        )
    if roca_weak(ek.key):
        raise errors.EkCertificateInvalid(
            f"the EK is refused: {WHY_ROCA}; root on the host could answer gtvp's credential "
            "without the TPM. Update the TPM's firmware and provision a new EK, or enrol "
            "with the TPM's ECC EK (gtvp-agent --ek ecc; the chart's agent.ekType: ecc)"
        )


@functools.lru_cache(maxsize=8)
def load_bundle(pem: str) -> tuple[x509.Certificate, ...]:
    """The policy's EK trust anchors (parsed once per bundle text)."""
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError as exc:
        raise errors.EkCertificateUntrusted(
            f"the policy's ekTrust.caBundle cannot be read: {exc}"
        ) from exc
    return tuple(certs)


def _load_der(der: bytes, what: str, *, shared: bool = False) -> x509.Certificate:
    """Parse a DER certificate (`shared`: through `_shared_certificate`)."""
    if len(der) > 16384:
        raise errors.MalformedEvidence(f"{what} is {len(der)} bytes, more than 16384 allowed")
    try:
        return _shared_certificate(der) if shared else x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise errors.EkCertificateInvalid(f"{what} is not a DER X.509 certificate: {exc}") from exc


@functools.lru_cache(maxsize=256)
def _shared_certificate(der: bytes) -> x509.Certificate:
    """A presented (intermediate) certificate, parsed once for every member that presents
    the same bytes: a fleet's TPMs present the few intermediates of their vendors, and a
    parsed certificate takes about 8 KiB (failures are not cached)."""
    return x509.load_der_x509_certificate(der)


CLOCK_SKEW = datetime.timedelta(minutes=5)
"""Tolerance for a certificate issued moments ago by a clock slightly ahead of ours."""


@dataclass(frozen=True)
class _Validity:
    """One certificate's validity window on the path, checked against the time every call."""

    not_before: datetime.datetime
    not_after: datetime.datetime
    what: str  # "the EK certificate (CN=…)"

    def check(self, now: datetime.datetime) -> None:
        if now + CLOCK_SKEW < self.not_before:
            raise errors.EkCertificateInvalid(
                f"{self.what} is not valid before {self.not_before.isoformat()}"
            )
        if now > self.not_after:
            raise errors.EkCertificateInvalid(
                f"{self.what} expired on {self.not_after.isoformat()}"
            )

    def holds(self, now: datetime.datetime) -> bool:
        return self.not_before <= now + CLOCK_SKEW and now <= self.not_after


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "no subject"


def _validity(cert: x509.Certificate, what: str) -> _Validity:
    return _Validity(
        cert.not_valid_before_utc, cert.not_valid_after_utc, f"{what} ({_subject(cert)})"
    )


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        bc = cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value
    except x509.ExtensionNotFound:
        return None
    return bc if isinstance(bc, x509.BasicConstraints) else None


def _is_ca(cert: x509.Certificate) -> bool:
    bc = _basic_constraints(cert)
    if bc is None or not bc.ca:
        return False
    try:
        ku = cert.extensions.get_extension_for_oid(ExtensionOID.KEY_USAGE).value
    except x509.ExtensionNotFound:
        return True
    return isinstance(ku, x509.KeyUsage) and ku.key_cert_sign


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def verify_ek_certificate(
    *,
    ek: PublicArea,
    certificate: bytes,
    presented_chain: Sequence[bytes],
    ca_bundle_pem: str,
    now: datetime.datetime,
) -> x509.Certificate:
    """Check the EK certificate and its path to the policy's CA bundle; return the anchor."""
    return check_ek_certificate(
        ek_spki=spki_der(ek.key),
        certificate=certificate,
        presented_chain=presented_chain,
        ca_bundle_pem=ca_bundle_pem,
        now=now,
    )


def check_ek_certificate(
    *,
    ek_spki: bytes,
    certificate: bytes,
    presented_chain: Sequence[bytes],
    ca_bundle_pem: str,
    now: datetime.datetime,
) -> x509.Certificate:
    """`verify_ek_certificate` for an EK given by its SubjectPublicKeyInfo (`EkFacts.spki`).

    The leaf checks are worked out once for these exact bytes (`_ek_path`); the EK
    certificate's validity is checked against `now` on every call, then the path: the one
    `cryptography` built last time for these bytes while each of its certificates is still
    valid at `now`, otherwise a new path validation at `now` (a failed one is never kept).
    """
    # one entry per EK certificate (and bundle), whatever else is presented beside it: an
    # agent varying the extra certificates it presents neither grows the cache nor evicts
    # other members' paths
    key = digest_of(ek_spki, certificate, ca_bundle_pem)
    kept = _EK_PATHS.peek(key)
    if kept is not None and not kept.path_ders <= frozenset(presented_chain):
        kept = None  # validated through certificates not presented now: judge afresh
    path = kept or _ek_path(ek_spki, certificate, tuple(presented_chain), ca_bundle_pem)
    if path.leaf_validity is not None:
        path.leaf_validity.check(now)
    if path.leaf_der is None:
        refusal, message = path.refusal
        raise refusal(message)
    known = path.verified[-1] if path.verified else None
    if known is not None and all(v.holds(now) for v in known.validity):
        return known.anchor
    leaf = _load_der(path.leaf_der, "the EK certificate")
    try:
        chain = _validate_path(leaf, path, now)
    except errors.VerificationError:
        if kept is None:
            raise
        # the kept path (a CA on it expired, say) with only its own certificates: every
        # certificate presented now may still make another path (a renewed intermediate)
        _EK_PATHS.drop(key)
        path = _ek_path(ek_spki, certificate, tuple(presented_chain), ca_bundle_pem)
        chain = _validate_path(leaf, path, now)
    # kept only once validated, with only the presented certificates on the path: what an
    # agent presents besides (any bytes, each distinct) never stays in memory
    ders = frozenset(c.public_bytes(serialization.Encoding.DER) for c in chain.intermediates)
    _EK_PATHS.put(
        key, replace(path, presented=chain.intermediates, verified=[chain], path_ders=ders)
    )
    return chain.anchor


@dataclass(frozen=True)
class _Chain:
    """A path `cryptography` validated: its anchor, the validity windows of the CAs on it,
    and its intermediates (presented certificates on the path)."""

    anchor: x509.Certificate
    validity: tuple[_Validity, ...]
    intermediates: tuple[x509.Certificate, ...] = ()


@dataclass(frozen=True, eq=False)
class _EkPath:
    """What does not depend on the time, per exact bytes: the EK certificate checked as a TCG
    EK certificate for this EK (or the refusal), the parsed anchors and presented
    certificates, and the last path validated for them (`verified`, at most one).

    The EK certificate is kept as its DER (the cache key's own bytes), not parsed: a parsed
    certificate takes about 8 KiB, one per member, and it is needed again only when the
    kept path no longer holds (a CA on it expired) or a validation fails."""

    leaf_validity: _Validity | None
    leaf_der: bytes | None
    refusal: tuple[type[errors.VerificationError], str] = (errors.EkCertificateUntrusted, "")
    anchors: tuple[x509.Certificate, ...] = ()
    presented: tuple[x509.Certificate, ...] = ()
    verified: list[_Chain] = field(default_factory=list)
    path_ders: frozenset[bytes] = frozenset()
    """Once kept: the DER of the presented certificates on the validated path (a later call
    uses the kept path only while they are all presented)."""


_EK_PATHS: DigestCache[_EkPath] = DigestCache(CACHE_SIZE)
"""Validated EK certificate paths, by the digest of the bytes they were judged from."""


def _ek_path(
    ek_spki: bytes, certificate: bytes, presented_chain: tuple[bytes, ...], ca_bundle_pem: str
) -> _EkPath:
    leaf_validity: _Validity | None = None
    try:
        leaf = _load_der(certificate, "the EK certificate")
        leaf_validity = _validity(leaf, "the EK certificate")
        _check_leaf(leaf, ek_spki)
        # an EK certificate in the bundle is no anchor (`cryptography` would trust it as one)
        anchors = tuple(a for a in load_bundle(ca_bundle_pem) if a != leaf)
        if not anchors:
            raise errors.EkCertificateUntrusted(
                "the policy's ekTrust.caBundle holds no CA (an EK certificate is not an anchor)"
            )
        presented = tuple(
            _load_der(d, f"presented certificate {i}", shared=True)
            for i, d in enumerate(presented_chain)
        )
    except errors.VerificationError as err:
        return _EkPath(leaf_validity, None, (type(err), err.message))
    except ValueError as exc:  # an extension that is not DER: parsed only when it is read
        said = f"the EK certificate cannot be read: {str(exc)[:200]}"
        return _EkPath(leaf_validity, None, (errors.EkCertificateInvalid, said))
    return _EkPath(leaf_validity, certificate, anchors=anchors, presented=presented)


TPM_MANUFACTURER = ObjectIdentifier("2.23.133.2.1")
"""tcg-at-tpmManufacturer: in an EK certificate's subjectAltName directoryName."""


def _extension(leaf: x509.Certificate, oid: x509.ObjectIdentifier) -> Any:
    try:
        return leaf.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None


def _names_a_tpm(san: Any) -> bool:
    """Whether a subjectAltName names a TPM manufacturer (a TCG EK certificate's mark)."""
    if not isinstance(san, x509.SubjectAlternativeName):
        return False
    return any(
        attr.oid == TPM_MANUFACTURER
        for name in san.get_values_for_type(x509.DirectoryName)
        for attr in name
    )


def _check_leaf(leaf: x509.Certificate, ek_spki: bytes) -> None:
    """The leaf is a TCG EK certificate for exactly this EK: not a CA; EKU
    tcg-kp-EKCertificate (2.23.133.8.1), or without an EKU a TPM manufacturer in its
    subjectAltName; a keyUsage, if any, for an EK's use (keyEncipherment for RSA,
    keyAgreement for ECC). The certificate is the only proof that the key lives in a TPM
    (the EK's attributes are the agent's word): any other certificate of a CA in the
    bundle (a device's, a server's) would let root enrol a key held in software and forge
    quotes (found by a review). gtvp's own checks: the path validation accepts any EE
    extensions."""
    if _is_ca(leaf):
        raise errors.EkCertificateInvalid("the EK certificate is a CA certificate, not an EK's")
    eku = _extension(leaf, ExtensionOID.EXTENDED_KEY_USAGE)
    if isinstance(eku, x509.ExtendedKeyUsage) and EK_CERTIFICATE_EKU not in eku:
        raise errors.EkCertificateInvalid(
            "the certificate's extended key usage lacks tcg-kp-EKCertificate (2.23.133.8.1)"
        )
    if eku is None and not _names_a_tpm(_extension(leaf, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)):
        raise errors.EkCertificateInvalid(
            "the certificate is no TCG EK certificate: it has neither the extended key usage "
            "tcg-kp-EKCertificate (2.23.133.8.1) nor a TPM manufacturer (2.23.133.2.1) in its "
            "subjectAltName"
        )
    leaf_key = leaf.public_key()
    if not isinstance(leaf_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey) or (
        spki_der(leaf_key) != ek_spki
    ):
        raise errors.EkCertificateInvalid(
            "the EK certificate certifies another key than the EK the agent reported"
        )
    usage = _extension(leaf, ExtensionOID.KEY_USAGE)
    if isinstance(usage, x509.KeyUsage):
        rsa_key = isinstance(leaf_key, rsa.RSAPublicKey)
        if not (usage.key_encipherment if rsa_key else usage.key_agreement):
            needed = "keyEncipherment" if rsa_key else "keyAgreement"
            raise errors.EkCertificateInvalid(
                f"the EK certificate's keyUsage lacks {needed}, which an EK's use needs: a "
                "certificate issued for another purpose"
            )


def _ca_key_usage(_policy: Policy, _cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    if ku is not None and not ku.key_cert_sign:
        raise ValueError("its keyUsage lacks keyCertSign")


_EE_POLICY = ExtensionPolicy.permit_all()
"""TPM EK certificates are not WebPKI end entities (empty subject, a critical directoryName
subjectAltName, EKU 2.23.133.8.1 or none, keyUsage keyEncipherment or keyAgreement): the
path validation accepts any EE extensions, `_check_leaf` checks what gtvp needs of them."""

_CA_POLICY = (
    ExtensionPolicy.webpki_defaults_ca()
    # RFC 5280 wants it critical; TPM vendors' CAs are not WebPKI CAs, the cA bit and
    # pathLenConstraint are enforced either way
    .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)
    # keyCertSign when keyUsage is present (as gtvp has always required); TPM CAs vary
    .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _ca_key_usage)
    # TPM intermediates may carry the TCG EKU or none, and any form of AKI
    .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None)
    .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
)
"""CAs keep the WebPKI path checks: basicConstraints cA, pathLenConstraint, name
constraints, signatures, validity at the time, no unknown critical extension."""


@functools.lru_cache(maxsize=8)
def _store(anchors: tuple[x509.Certificate, ...]) -> Store:
    return Store(list(anchors))


def _validate_path(leaf: x509.Certificate, path: _EkPath, now: datetime.datetime) -> _Chain:
    """RFC 5280 path validation by `cryptography` at `now` (and at `now + CLOCK_SKEW` if a
    certificate only becomes valid within it); on failure, the refusal names the
    certificate and why (`_refusal`)."""
    certs = (leaf, *path.presented, *path.anchors)
    times = [now]
    if any(now < c.not_valid_before_utc <= now + CLOCK_SKEW for c in certs):
        times.append(now + CLOCK_SKEW)
    reason = ""
    for at in times:
        verifier = (
            PolicyBuilder()
            .store(_store(path.anchors))
            .time(at)
            .max_chain_depth(MAX_CHAIN - 1)
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(leaf, list(path.presented))
        except VerificationError as exc:
            reason = reason or str(exc)
            continue
        ca = verified.chain[1:]
        kinds = ["an intermediate CA"] * (len(ca) - 1) + ["the trusted CA"]
        return _Chain(
            ca[-1],
            tuple(_validity(c, k) for c, k in zip(ca, kinds, strict=True)),
            tuple(ca[:-1]),
        )
    raise _refusal(leaf, path, now, reason)


def _refusal(
    leaf: x509.Certificate, path: _EkPath, now: datetime.datetime, reason: str
) -> errors.VerificationError:
    """Why the path validation failed, naming the certificate: the path is retraced by
    issuer name and signature and each CA on it checked in turn (validity, cA,
    pathLenConstraint, name constraints); else `cryptography`'s reason. The certificates
    are the agent's: one whose names or extensions `cryptography` cannot read (it parses
    them only when asked) is an untrusted chain too, not a fault of gtvp's (which would be
    no sign of tampering, and skip readmission)."""
    for prefix in ("validation failed: ", "candidates exhausted: ", "fatal error: "):
        reason = reason.removeprefix(prefix)
    try:
        return _explained(leaf, path, now, reason)
    except ValueError as exc:
        return errors.EkCertificateUntrusted(
            f"the EK certificate's path fails X.509 path validation ({reason}), and a "
            f"certificate presented with it cannot be read: {exc}"
        )


def _explained(
    leaf: x509.Certificate, path: _EkPath, now: datetime.datetime, reason: str
) -> errors.VerificationError:
    try:
        steps = _path_to_anchor(leaf, anchors=path.anchors, presented=path.presented)
        for cert, what in steps:
            _validity(cert, what).check(now)
    except errors.VerificationError as err:
        return err
    for below, (cert, what) in enumerate(steps):
        who = f"{what} ({_subject(cert)})"
        bc = _basic_constraints(cert)
        if bc is None or not _is_ca(cert):
            return errors.EkCertificateUntrusted(f"{who} signs the chain but is not a CA")
        if bc.path_length is not None and below > bc.path_length:
            return errors.EkCertificateUntrusted(
                f"{who} allows {bc.path_length} intermediate CA(s) below it "
                f"(pathLenConstraint), the EK certificate's path has {below}"
            )
        if _NAME_CONSTRAINTS.search(reason) and _has_name_constraints(cert):
            return errors.EkCertificateUntrusted(
                f"the EK certificate's path violates the name constraints of {who}: {reason}"
            )
    names = " <- ".join(_subject(c) for c in (leaf, *(c for c, _ in steps)))
    return errors.EkCertificateUntrusted(
        f"the EK certificate's path ({names}) fails X.509 path validation: {reason}"
    )


_NAME_CONSTRAINTS = re.compile(r"name ?constraint", re.IGNORECASE)


def _has_name_constraints(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_oid(ExtensionOID.NAME_CONSTRAINTS)
    except x509.ExtensionNotFound:
        return False
    return True


def _path_to_anchor(
    leaf: x509.Certificate,
    *,
    anchors: tuple[x509.Certificate, ...],
    presented: tuple[x509.Certificate, ...],
) -> list[tuple[x509.Certificate, str]]:
    """The CAs above the leaf, by issuer name and signature, up to the anchor that issued
    the path (at most MAX_CHAIN steps); presented certificates serve as intermediates only.
    Only to explain a refusal: the path validation is `cryptography`'s."""
    anchor_der = {a.public_bytes(serialization.Encoding.DER) for a in anchors}
    steps: list[tuple[x509.Certificate, str]] = []
    current = leaf
    for _depth in range(MAX_CHAIN):
        for anchor in anchors:
            if _issued_by(current, anchor):
                return [*steps, (anchor, "the trusted CA")]
        current = _intermediate_parent(
            current, leaf=leaf, intermediates=[*anchors, *presented], anchor_der=anchor_der
        )
        steps.append((current, "an intermediate CA"))
    raise errors.EkCertificateUntrusted(f"the EK certificate chain is longer than {MAX_CHAIN}")


def _intermediate_parent(
    current: x509.Certificate,
    *,
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    anchor_der: set[bytes],
) -> x509.Certificate:
    """The intermediate CA that issued `current` (a self-signed one must be an anchor)."""
    named = [c for c in intermediates if c is not current and c.subject == current.issuer]
    parent = next((c for c in named if _issued_by(current, c)), None)
    if parent is None:
        what = "the EK certificate" if current is leaf else f"intermediate {_subject(current)}"
        if named:
            raise errors.EkCertificateUntrusted(
                f"the signature on {what} does not verify with the key of its issuer "
                f"{current.issuer.rfc4514_string()}"
            )
        raise errors.EkCertificateUntrusted(
            f"no path from {what} (issuer {current.issuer.rfc4514_string()}) "
            "to a CA in the policy's ekTrust.caBundle; add the TPM vendor's CA to the "
            "bundle if this TPM is genuine"
        )
    if parent.subject == parent.issuer and (
        parent.public_bytes(serialization.Encoding.DER) not in anchor_der
    ):
        raise errors.EkCertificateUntrusted(
            f"the chain ends at a root the node presented ({parent.subject.rfc4514_string()}"
            "); roots come only from the policy's ekTrust.caBundle"
        )
    return parent


def check_ek_pin(*, pinned: str | None, current: str, approved: str | None) -> None:
    """Refuse an EK that changed under a known member, unless approved by fingerprint."""
    if pinned is None or pinned == current:
        return
    if approved is not None and hmac.compare_digest(approved, current):
        return
    raise errors.EkChanged(
        f"the member's EK changed from {pinned[:16]}… to {current[:16]}…: refused as a possible "
        f"identity takeover. If the TPM was really replaced, approve it: "
        f"kubectl patch member NAME --type=merge -p "
        f'\'{{"spec":{{"approval":{{"ekSHA256":"{current}","approvedBy":"YOU"}}}}}}\''
    )


@dataclass(frozen=True)
class ActivationChallenge:
    """What the agent receives (blob, secret) and what the operator keeps (a hash)."""

    credential_blob: bytes
    encrypted_secret: bytes
    secret_sha256: str


def make_activation_challenge(
    *, ek_public_area: bytes, ak_name: bytes, secret: bytes
) -> ActivationChallenge:
    """MakeCredential in software: only the TPM holding this EK and this AK can unwrap it."""
    from tpm2_pytss.types import TPM2B_NAME, TPM2B_PUBLIC
    from tpm2_pytss.utils import make_credential

    try:
        ek_pub, _ = TPM2B_PUBLIC.unmarshal(as_tpm2b_public(ek_public_area))
        blob, enc = make_credential(ek_pub, secret, TPM2B_NAME(ak_name))
    except (ValueError, TypeError) as exc:
        raise errors.MalformedEvidence(
            f"no credential can be made for this EK ({str(exc)[:200]})"
        ) from exc
    return ActivationChallenge(
        credential_blob=bytes(blob.marshal()),
        encrypted_secret=bytes(enc.marshal()),
        secret_sha256=hashlib.sha256(secret).hexdigest(),
    )


def check_activation(*, proof: bytes, secret_sha256: str) -> None:
    if not hmac.compare_digest(hashlib.sha256(proof).hexdigest(), secret_sha256):
        raise errors.ActivationFailed(
            "the agent's ActivateCredential answer is wrong: its AK and EK are not in one TPM"
        )
