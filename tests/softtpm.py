"""Software-held TPM keys for simulated members: benchmarks and tests only, never a pool.

The scale benchmark simulates thousands of members at the API level; real swtpm instances
cannot quote that fast on two cores. A `SoftTpm` holds the keys a TPM would, in process
memory, and answers exactly what gtvp-agent asks of its TPM (`gtvp_agent.tpm.Tpm`), so the
agent's own code (`gtvp_agent.agent.Agent`) turns its answers into the `status.agent` it
writes, in the same format byte for byte:

- an EK: ECC P-256 from the TCG EK Credential Profile's low-range template L-2 (nameAlg
  SHA-256, restricted decrypt, fixedTPM/fixedParent, adminWithPolicy with the
  PolicySecret(endorsement) authPolicy, AES-128-CFB), certified by a `SoftCA`;
- an AK: the ECC P-256 restricted ECDSA-SHA256 signing key gtvp-agent creates under the EK
  (same attributes: fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, noDA);
- TPM2_ActivateCredential in software (TPM 2.0 Part 1, "Credential Protection"): the seed
  from ECDH between the EK and the caller's ephemeral point through KDFe ("IDENTITY"), the
  outer HMAC checked with the KDFa "INTEGRITY" key over the encrypted credential and the
  AK's name, the credential decrypted with the KDFa "STORAGE" key (AES-128-CFB, zero IV);
- TPM2_Quote: a TPMS_ATTEST (TPM_GENERATED_VALUE, ATTEST_QUOTE, the AK's qualified name
  under the EK, the nonce, clockInfo, firmware version, the PCR selection and the digest
  of the selected PCRs) signed ECDSA-SHA256 over those bytes, r and s padded to 32 bytes as
  a TPM marshals them; PCRs start at zero and `extend` extends them as TPM2_PCR_Extend does.

Written from the specification with `cryptography` only: nothing of gtvp's verifier is
used to produce what the verifier checks.

Why this is no back door: the operator trusts an EK only through a certificate path to a CA
in the policy's `ekTrust.caBundle`. A `SoftCA` is created in process for one benchmark or
test run (its key never leaves memory), and only the policies those write hold it; nothing
in gtvp, its chart or `gtvp local` creates or trusts one. A software EK certified by any
other CA is refused (`EkCertificateUntrusted`) like any other TPM's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode
from cryptography.x509.oid import NameOID, ObjectIdentifier

from gtvp_agent.tpm import Enrolment, Quote

try:  # AES-CFB, as TPM credential protection uses it, moved to `decrepit` in cryptography 47
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

# TPM 2.0 constants (Part 2), spelled here rather than taken from gtvp's verifier
TPM_ALG_ECC = 0x0023
TPM_ALG_SHA256 = 0x000B
TPM_ALG_AES = 0x0006
TPM_ALG_CFB = 0x0043
TPM_ALG_NULL = 0x0010
TPM_ALG_ECDSA = 0x0018
TPM_ECC_NIST_P256 = 0x0003
TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_RH_ENDORSEMENT = 0x4000000B
# TPMA_OBJECT
FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN = 1 << 1, 1 << 4, 1 << 5
USER_WITH_AUTH, ADMIN_WITH_POLICY, NO_DA = 1 << 6, 1 << 7, 1 << 10
RESTRICTED, DECRYPT, SIGN = 1 << 16, 1 << 17, 1 << 18
EK_ATTRIBUTES = (
    FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | ADMIN_WITH_POLICY | RESTRICTED | DECRYPT
)
AK_ATTRIBUTES = (
    FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH | NO_DA | RESTRICTED | SIGN
)
# PolicySecret(TPM_RH_ENDORSEMENT), SHA-256: the low-range EK templates' authPolicy
EK_AUTH_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
FIRMWARE_VERSION = 0x2019102300163636  # what swtpm 0.x reports
TCG_EK_CERTIFICATE = ObjectIdentifier("2.23.133.8.1")
PCR_COUNT = 24


class SoftTpmError(RuntimeError):
    """A command a TPM would refuse (e.g. TPM_RC_INTEGRITY on a credential for another key)."""


def _u16(n: int) -> bytes:
    return struct.pack(">H", n)


def _tpm2b(data: bytes) -> bytes:
    return _u16(len(data)) + data


def _read_tpm2b(data: bytes, offset: int, what: str) -> tuple[bytes, int]:
    if offset + 2 > len(data):
        raise SoftTpmError(f"{what} is truncated (TPM_RC_SIZE)")
    (size,) = struct.unpack_from(">H", data, offset)
    end = offset + 2 + size
    if end > len(data):
        raise SoftTpmError(f"{what} is truncated (TPM_RC_SIZE)")
    return data[offset + 2 : end], end


def _point(key: ec.EllipticCurvePublicKey) -> tuple[bytes, bytes]:
    nums = key.public_numbers()
    return nums.x.to_bytes(32, "big"), nums.y.to_bytes(32, "big")


def _ecc_public(key: ec.EllipticCurvePublicKey, attributes: int, *, ek: bool) -> bytes:
    """TPM2B_PUBLIC of an ECC P-256 key: the EK's low-range template or the agent's AK."""
    x, y = _point(key)
    body = struct.pack(">HHI", TPM_ALG_ECC, TPM_ALG_SHA256, attributes)
    if ek:
        body += _tpm2b(EK_AUTH_POLICY)
        body += struct.pack(">HHH", TPM_ALG_AES, 128, TPM_ALG_CFB)  # symmetric
        body += struct.pack(">H", TPM_ALG_NULL)  # scheme
    else:
        body += _tpm2b(b"")
        body += struct.pack(">H", TPM_ALG_NULL)  # symmetric
        body += struct.pack(">HH", TPM_ALG_ECDSA, TPM_ALG_SHA256)  # scheme
    body += struct.pack(">HH", TPM_ECC_NIST_P256, TPM_ALG_NULL)  # curve, kdf
    body += _tpm2b(x) + _tpm2b(y)
    return _tpm2b(body)


def _name(public: bytes) -> bytes:
    """nameAlg || SHA-256(TPMT_PUBLIC) (the TPM2B_PUBLIC without its size)."""
    return _u16(TPM_ALG_SHA256) + hashlib.sha256(public[2:]).digest()


def _qualified(parent_qualified_name: bytes, name: bytes) -> bytes:
    return _u16(TPM_ALG_SHA256) + hashlib.sha256(parent_qualified_name + name).digest()


def kdfa(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa with SHA-256 (SP 800-108 counter mode HMAC, as TPM 2.0 Part 1 defines it)."""
    return KBKDFHMAC(
        algorithm=hashes.SHA256(),
        mode=Mode.CounterMode,
        length=bits // 8,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=label,
        context=context_u + context_v,
        fixed=None,
    ).derive(key)


def kdfe(z: bytes, use: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """KDFe with SHA-256 (SP 800-56A concatenation KDF; `use` includes its NUL octet)."""
    return ConcatKDFHash(hashes.SHA256(), bits // 8, use + party_u + party_v).derive(z)


class SoftCA:
    """A software EK certificate authority for one benchmark or test run (ECDSA P-256).

    Only a policy that puts `bundle_pem()` into `ekTrust.caBundle` trusts what it signs.
    """

    def __init__(self, name: str = "gtvp soft EK CA (benchmarks and tests only)") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    def bundle_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    def certify_ek(self, ek: ec.EllipticCurvePublicKey, *, model: str = "soft") -> bytes:
        """A TCG EK certificate (DER) for `ek`, shaped like swtpm's: no subject, the TPM's
        manufacturer in a critical subjectAltName, EKU tcg-kp-EKCertificate, not a CA."""
        tpm = x509.Name(
            [
                x509.NameAttribute(ObjectIdentifier("2.23.133.2.1"), "id:47545650"),
                x509.NameAttribute(ObjectIdentifier("2.23.133.2.2"), model),
                x509.NameAttribute(ObjectIdentifier("2.23.133.2.3"), "id:20191023"),
            ]
        )
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.name)
            .public_key(ek)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(tpm)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([TCG_EK_CERTIFICATE]), critical=False)
            .add_extension(_ek_key_usage(), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.DER)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _ek_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=True,  # an ECC EK is a key-agreement key
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass
class _Clock:
    started: float
    offset_ms: int
    reset_count: int
    restart_count: int = 0

    def now_ms(self) -> int:
        return self.offset_ms + int((time.monotonic() - self.started) * 1000)


class SoftTpm:
    """One simulated TPM: an EK certified by `ca`, an AK under it, PCRs, a clock.

    Implements what `gtvp_agent.agent.Agent` uses of `gtvp_agent.tpm.Tpm` (`enrolment`,
    `activate_credential`, `quote`), and `extend` for tampering. Thread-safe.
    """

    def __init__(self, ca: SoftCA | None, *, model: str = "soft") -> None:
        self._ek = ec.generate_private_key(ec.SECP256R1())
        self._ak = ec.generate_private_key(ec.SECP256R1())
        self.ek_public = _ecc_public(self._ek.public_key(), EK_ATTRIBUTES, ek=True)
        self.ak_public = _ecc_public(self._ak.public_key(), AK_ATTRIBUTES, ek=False)
        self.ak_name = _name(self.ak_public)
        ek_qn = _qualified(struct.pack(">I", TPM_RH_ENDORSEMENT), _name(self.ek_public))
        self.qualified_signer = _qualified(ek_qn, self.ak_name)
        self.ek_certificate = ca.certify_ek(self._ek.public_key(), model=model) if ca else None
        self.pcrs = {"sha256": [bytes(32)] * PCR_COUNT}
        self._clock = _Clock(time.monotonic(), secrets.randbelow(10**6), 1 + secrets.randbelow(8))
        self._lock = threading.Lock()

    # ----- what gtvp_agent.tpm.Tpm offers ---------------------------------------------------
    def enrolment(self) -> Enrolment:
        return Enrolment(
            ek_public=self.ek_public,
            ek_certificate=self.ek_certificate,
            ak_public=self.ak_public,
            ak_name=self.ak_name,
        )

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential(AK, EK): the credential, if it was made for this EK and
        this AK's name; TPM_RC_INTEGRITY otherwise."""
        blob, _ = _read_tpm2b(credential_blob, 0, "credentialBlob")
        secret, _ = _read_tpm2b(encrypted_secret, 0, "secret")
        x, off = _read_tpm2b(secret, 0, "the secret's ECC point")
        y, _ = _read_tpm2b(secret, off, "the secret's ECC point")
        try:
            ephemeral = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            ).public_key()
        except ValueError as exc:
            raise SoftTpmError("the secret is not a P-256 point (TPM_RC_ECC_POINT)") from exc
        z = self._ek.exchange(ec.ECDH(), ephemeral)
        seed = kdfe(z, b"IDENTITY\x00", x, _point(self._ek.public_key())[0], 256)
        integrity, off = _read_tpm2b(blob, 0, "credentialBlob.integrityHMAC")
        enc_identity = blob[off:]
        hmac_key = kdfa(seed, b"INTEGRITY", b"", b"", 256)
        want = hmac.new(hmac_key, enc_identity + self.ak_name, hashlib.sha256).digest()
        if not hmac.compare_digest(integrity, want):
            raise SoftTpmError("the credential was not made for this EK and AK (TPM_RC_INTEGRITY)")
        sym_key = kdfa(seed, b"STORAGE", self.ak_name, b"", 128)
        dec = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).decryptor()
        plain = dec.update(enc_identity) + dec.finalize()
        credential, end = _read_tpm2b(plain, 0, "the credential")
        if end != len(plain):
            raise SoftTpmError("the credential has trailing bytes (TPM_RC_SIZE)")
        return credential

    def quote(self, nonce: bytes, bank: str, pcrs: Sequence[int]) -> Quote:
        """TPM2_Quote with the AK over `nonce` and the PCRs, then the PCR values."""
        if bank != "sha256":
            raise SoftTpmError(f"the soft TPM has no {bank} bank")
        if len(nonce) > 64:
            raise SoftTpmError("qualifyingData is larger than a digest (TPM_RC_SIZE)")
        selected = sorted(set(pcrs))
        with self._lock:
            values = {p: self.pcrs[bank][p] for p in selected}
            clock = self._clock.now_ms()
        bitmap = bytearray(3)
        for p in selected:
            bitmap[p // 8] |= 1 << (p % 8)
        attest = struct.pack(">IH", TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE)
        attest += _tpm2b(self.qualified_signer) + _tpm2b(nonce)
        attest += struct.pack(
            ">QIIBQ", clock, self._clock.reset_count, self._clock.restart_count, 1, FIRMWARE_VERSION
        )
        attest += struct.pack(">IHB", 1, TPM_ALG_SHA256, len(bitmap)) + bytes(bitmap)
        attest += _tpm2b(hashlib.sha256(b"".join(values[p] for p in selected)).digest())
        r, s = decode_dss_signature(self._ak.sign(attest, ec.ECDSA(hashes.SHA256())))
        signature = struct.pack(">HH", TPM_ALG_ECDSA, TPM_ALG_SHA256)
        signature += _tpm2b(r.to_bytes(32, "big")) + _tpm2b(s.to_bytes(32, "big"))
        return Quote(attest, signature, bank, values)

    # ----- for tampering --------------------------------------------------------------------
    def extend(self, pcr: int, data: bytes, bank: str = "sha256") -> None:
        """TPM2_PCR_Extend with the SHA-256 of `data` (as `gtvp_agent.tpm.Tpm.extend_pcr`)."""
        with self._lock:
            old = self.pcrs[bank][pcr]
            self.pcrs[bank][pcr] = hashlib.sha256(old + hashlib.sha256(data).digest()).digest()
