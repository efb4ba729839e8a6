"""RSA keys that TPMs generated badly: the ROCA fingerprint (CVE-2017-15361).

Infineon's RSA key generation (TPM firmware before its 2017 fix, on many servers' TPMs)
made primes of the form k * M + (65537^a mod M), M a primorial, so that the private key
of a 2048-bit modulus can be computed from the public key (Nemec et al., CCS 2017). Such
a modulus has a fingerprint: modulo every small prime p of M, it is a power of 65537. A
random modulus has it with a probability below 2^-150. An EK with it lets root on the
host decrypt the credential gtvp sends and bind a software AK; an AK with it lets anyone
who read its public key forge quotes.

Pure; `roca_fingerprint` follows the published detection (the residues of the modulus
modulo the primes 3..167 against the subgroups 65537 generates).
"""

from __future__ import annotations

import functools

from cryptography.hazmat.primitives.asymmetric import rsa

ROCA_PRIMES = (
    3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89,
    97, 101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167,
)  # fmt: skip
GENERATOR = 65537


@functools.cache
def _powers(p: int) -> frozenset[int]:
    """The subgroup 65537 generates modulo the prime `p`."""
    out, x = {1}, GENERATOR % p
    while x not in out:
        out.add(x)
        x = x * GENERATOR % p
    return frozenset(out)


def roca_fingerprint(modulus: int) -> bool:
    """Whether an RSA modulus has the ROCA fingerprint (its private key is computable)."""
    return modulus > 0 and all(modulus % p in _powers(p) for p in ROCA_PRIMES)


def roca_weak(key: object) -> bool:
    """Whether a public key is an RSA key with the ROCA fingerprint (EC keys never are)."""
    return isinstance(key, rsa.RSAPublicKey) and roca_fingerprint(key.public_numbers().n)


WHY_ROCA = (
    "its modulus has the ROCA fingerprint (CVE-2017-15361: Infineon TPM firmware before its "
    "2017 update generated RSA keys whose private key can be computed from the public key)"
)
"""Said of a refused key; the fix is the TPM's firmware update and new keys."""
