"""TPM keys whose private half can be computed from the public one (ROCA, CVE-2017-15361)
are refused as EKs and AKs; ordinary RSA keys are not."""

from __future__ import annotations

import math
import secrets

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gtvp.core import errors
from gtvp.core.enrolment import check_ek_public
from gtvp.core.quote import REQUIRED_AK_ATTRIBUTES, check_ak_attributes
from gtvp.core.tpm_wire import (
    ADMIN_WITH_POLICY,
    ALG_NULL,
    ALG_RSA,
    ALG_SHA256,
    DECRYPT,
    FIXED_PARENT,
    FIXED_TPM,
    RESTRICTED,
    PublicArea,
)
from gtvp.core.weak_keys import ROCA_PRIMES, roca_fingerprint

M = math.prod((2, *ROCA_PRIMES))


def _roca_prime_form(bits: int) -> int:
    """A number shaped like the vulnerable generator's primes: k * M + (65537^a mod M) (the
    fingerprint needs only that shape, not primality)."""
    a = secrets.randbelow(2**20)
    k = secrets.randbits(bits - M.bit_length()) | 1 << (bits - M.bit_length() - 1)
    return k * M + pow(65537, a, M)


def _roca_modulus() -> int:
    """A 2048-bit modulus of two such factors."""
    while (n := _roca_prime_form(1024) * _roca_prime_form(1025)).bit_length() != 2048:
        pass
    return n


def _area(n: int, attributes: int) -> PublicArea:
    key = rsa.RSAPublicNumbers(65537, n).public_key()
    return PublicArea(ALG_RSA, ALG_SHA256, attributes, ALG_NULL, ALG_NULL, key, ALG_NULL, b"")


EK_ATTRIBUTES = RESTRICTED | DECRYPT | FIXED_TPM | FIXED_PARENT | ADMIN_WITH_POLICY
AK_ATTRIBUTES = sum(REQUIRED_AK_ATTRIBUTES.values())


def test_a_modulus_of_the_vulnerable_generators_shape_has_the_fingerprint() -> None:
    for _ in range(5):
        assert roca_fingerprint(_roca_modulus())


def test_ordinary_rsa_keys_do_not() -> None:
    for _ in range(8):
        key = rsa.generate_private_key(65537, 2048)
        assert not roca_fingerprint(key.public_key().public_numbers().n)


@pytest.mark.parametrize("role", ["EK", "AK"])
def test_a_tpm_key_with_the_fingerprint_is_refused_saying_why(role: str) -> None:
    """An EK would let root decrypt gtvp's credential and bind a software AK; an AK would let
    anyone who read it forge quotes, for good."""
    weak = _roca_modulus()
    ordinary = rsa.generate_private_key(65537, 2048).public_key().public_numbers().n
    check, attributes, error = {
        "EK": (check_ek_public, EK_ATTRIBUTES, errors.EkCertificateInvalid),
        "AK": (check_ak_attributes, AK_ATTRIBUTES, errors.AkAttributesInvalid),
    }[role]
    check(_area(ordinary, attributes))
    with pytest.raises(error) as refused:
        check(_area(weak, attributes))
    assert "ROCA" in refused.value.message
    assert "CVE-2017-15361" in refused.value.message


def test_verify_quote_refuses_a_weak_bare_ak_before_reading_the_quote() -> None:
    """`gtvp verify-quote --ak-public ak.pem` (a bare key, its TPM attributes unknown): the
    ROCA check is on the key, so it still applies."""
    from gtvp.core.quote import Evidence, Expectation, verify_quote
    from gtvp.quote_cli import load_ak

    weak = rsa.RSAPublicNumbers(65537, _roca_modulus()).public_key()
    pem = weak.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    area, known = load_ak(pem)
    assert not known
    exp = Expectation(ak=area, nonce=b"n", pcr_bank="sha256", pcrs=(0,), signer=None,
                      ak_attributes_known=False)  # fmt: skip
    with pytest.raises(errors.AkAttributesInvalid, match="ROCA"):
        verify_quote(Evidence(attest=b"", signature=b"", pcr_bank="sha256", pcr_values={}), exp)


@pytest.mark.parametrize("role", ["EK", "AK"])
def test_an_rsa_tpm_key_under_2048_bits_is_refused(role: str) -> None:
    """A 1024-bit EK could be factored and gtvp's credential answered without the TPM (the
    AK had this bound already; the EK had none). Found by a review."""
    small = rsa.generate_private_key(65537, 1024).public_key().public_numbers().n  # noqa: S505 - the weak key refused
    check, attributes, error = {
        "EK": (check_ek_public, EK_ATTRIBUTES, errors.EkCertificateInvalid),
        "AK": (check_ak_attributes, AK_ATTRIBUTES, errors.AkAttributesInvalid),
    }[role]
    with pytest.raises(error, match="RSA-1024; at least 2048"):
        check(_area(small, attributes))
