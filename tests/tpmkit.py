"""Helpers for tests that need real TPM evidence (swtpm via the agent's own Tpm class) or
crafted evidence signed by a software key (to reach checks a real TPM never fails)."""

from __future__ import annotations

import hashlib
import secrets
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from gtvp.core.quote import ClockState, Evidence, Expectation
from gtvp.core.tpm_wire import (
    ALG_ECC,
    ALG_ECDSA,
    ALG_NULL,
    ALG_SHA256,
    FIXED_PARENT,
    FIXED_TPM,
    RESTRICTED,
    SENSITIVE_DATA_ORIGIN,
    SIGN_ENCRYPT,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_QUOTE,
    USER_WITH_AUTH,
    PcrSelection,
    PublicArea,
    ak_qualified_name,
    marshal_pcr_selections,
    parse_public,
)
from gtvp_agent.tpm import Enrolment, Quote, Tpm

PCRS = (0, 1, 2, 3, 4, 5, 6, 7)
AK_ATTRS = (
    RESTRICTED | SIGN_ENCRYPT | FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | (USER_WITH_AUTH)
)


@dataclass(frozen=True)
class RealQuote:
    """A quote from a real (emulated) TPM with what is needed to verify it."""

    enrolment: Enrolment
    quote: Quote
    nonce: bytes

    @property
    def ak(self) -> PublicArea:
        return parse_public(self.enrolment.ak_public)

    @property
    def ek(self) -> PublicArea:
        return parse_public(self.enrolment.ek_public)

    def evidence(self, **changes: object) -> Evidence:
        ev = Evidence(
            self.quote.attest,
            self.quote.signature,
            self.quote.pcr_bank,
            dict(self.quote.pcr_values),
        )
        return replace(ev, **changes)  # type: ignore[arg-type]

    def expectation(self, **changes: object) -> Expectation:
        exp = Expectation(
            ak=self.ak,
            nonce=self.nonce,
            pcr_bank="sha256",
            pcrs=PCRS,
            signer=ak_qualified_name(self.ek, self.ak),
            golden=dict(self.quote.pcr_values),
        )
        return replace(exp, **changes)  # type: ignore[arg-type]


def real_quote(
    tcti: str, state: Path, *, nonce: bytes | None = None, pcrs: tuple[int, ...] = PCRS
) -> RealQuote:
    nonce = nonce or secrets.token_bytes(32)
    with Tpm.open(tcti, state) as tpm:
        enrolment = tpm.enrolment()
        quote = tpm.quote(nonce, "sha256", pcrs)
    return RealQuote(enrolment, quote, nonce)


# ----- crafted evidence, signed by a software key posing as an AK ------------------------------


def soft_ak(attributes: int = AK_ATTRS) -> tuple[ec.EllipticCurvePrivateKey, PublicArea]:
    key = ec.generate_private_key(ec.SECP256R1())
    nums = key.public_key().public_numbers()
    body = struct.pack(">HHI", ALG_ECC, ALG_SHA256, attributes) + struct.pack(">H", 0)
    body += struct.pack(">H", ALG_NULL)  # symmetric
    body += struct.pack(">HH", ALG_ECDSA, ALG_SHA256)  # scheme
    body += struct.pack(">HH", 0x0003, ALG_NULL)  # curve P-256, kdf null
    body += struct.pack(">H", 32) + nums.x.to_bytes(32, "big")
    body += struct.pack(">H", 32) + nums.y.to_bytes(32, "big")
    return key, parse_public(struct.pack(">H", len(body)) + body)


def craft_attest(
    *,
    signer: bytes,
    nonce: bytes,
    pcr_values: dict[int, bytes],
    magic: int = TPM_GENERATED_VALUE,
    type_: int = TPM_ST_ATTEST_QUOTE,
    clock: ClockState | None = None,
) -> bytes:
    clock = clock or ClockState(1000, 1, 0)
    sel = (PcrSelection(ALG_SHA256, tuple(sorted(pcr_values))),)
    digest = hashlib.sha256(b"".join(pcr_values[p] for p in sorted(pcr_values))).digest()
    out = struct.pack(">IH", magic, type_)
    out += struct.pack(">H", len(signer)) + signer
    out += struct.pack(">H", len(nonce)) + nonce
    out += struct.pack(">QIIB", clock.clock, clock.reset_count, clock.restart_count, 1)
    out += struct.pack(">Q", 0x2020)
    out += marshal_pcr_selections(sel) + struct.pack(">H", len(digest)) + digest
    return out


def soft_sign(key: ec.EllipticCurvePrivateKey, message: bytes, hash_alg: int = ALG_SHA256) -> bytes:
    der = key.sign(message, ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return (
        struct.pack(">HH", ALG_ECDSA, hash_alg)
        + struct.pack(">H", 32)
        + r.to_bytes(32, "big")
        + struct.pack(">H", 32)
        + s.to_bytes(32, "big")
    )
