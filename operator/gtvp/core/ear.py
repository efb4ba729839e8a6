"""Signed verdict tokens: a member's verdict as an EAT Attestation Result (EAR), as a JWT.

Pure. `verdict_claims` turns a member's status (what `attestation_step` just decided) into
the claims of draft-ietf-rats-ear-04 (profile `tag:github.com,2023:veraison/ear`): one
`submods` entry per attester (the member), its `ear.status` and AR4SI trustworthiness vector
(draft-ietf-rats-ar4si value sets), the appraisal policy (the SecurityPolicy's name and
generation) and gtvp's own verdict facts under the extension key `gtvp`. `sign` makes a
compact JWS with ES256 (P-256, the signature as raw r||s, RFC 7518 section 3.4); `verify`
checks one against a JWKS and refuses with a distinct `TokenRefused` subclass (its `reason`
code) for each way it can fail. `jwk` / `jwks` publish public keys (RFC 7517), each named
by its RFC 7638 thumbprint. No JWT library: `cryptography` only.

How a verdict maps (docs/tokens.md has the table):

- `ear.status`: Trusted -> affirming; Trusted but the member in Maintenance (a valid verdict,
  no new work) -> warning; Untrusted -> contraindicated; no verdict yet -> none.
- trustworthiness vector: Trusted -> instance-identity 2 (EK certified, AK bound to it by
  credential activation), hardware 2 (the EK certificate chains to a CA of the policy),
  executables 3 (only approved executables loaded during boot: PCRs / event log; gtvp does
  not appraise runtime), configuration 2 (the PCRs match an approved configuration). An
  Untrusted verdict's vector names what failed (`vector_for`).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from gtvp.core.timestamps import parse_ts

EAR_PROFILE: Final = "tag:github.com,2023:veraison/ear"
DEVELOPER: Final = "gtvp"
EXTENSION: Final = "gtvp"
"""The key of gtvp's own claims inside each submod (an unregistered EAR extension)."""
ALG: Final = "ES256"
MAX_TOKEN_BYTES: Final = 16 * 1024

# AR4SI trustworthiness tiers, as `ear.status` names them
AFFIRMING, WARNING, CONTRAINDICATED, NONE = "affirming", "warning", "contraindicated", "none"
STATUS_ORDER: Final = (NONE, AFFIRMING, WARNING, CONTRAINDICATED)

# AR4SI claim values (draft-ietf-rats-ar4si, "Specific Claims")
_TRUSTED_VECTOR: Final = {
    "instance-identity": 2,  # recognized, not known to be compromised
    "configuration": 2,  # a known and approved configuration
    "executables": 3,  # only approved executables loaded during the boot process
    "hardware": 2,  # genuine/supported hardware (EK certificate path)
}
_CRYPTO_FAILED: Final = dict.fromkeys(_TRUSTED_VECTOR, 99)  # cryptographic validation failed
_UNKNOWN_TPM: Final = {"instance-identity": 97, "hardware": 97}  # not recognized
_UNTRUSTWORTHY_KEY: Final = {"instance-identity": 96}  # its key says: not trustworthy
_BAD_BOOT: Final = {
    "instance-identity": 2,
    "hardware": 2,
    "configuration": 96,  # unsupportable configuration
    "executables": 96,  # contraindicated executables
}
_UNRECOGNIZED_BOOT: Final = {
    "instance-identity": 2,
    "hardware": 2,
    "configuration": 96,
    "executables": 33,  # executables that are not recognized
}
_NO_LOG: Final = {"instance-identity": 2, "hardware": 2, "configuration": 96, "executables": 0}
_NO_APPRAISAL: Final = dict.fromkeys(_TRUSTED_VECTOR, 0)  # no (current) assertion

_VECTOR_BY_REASON: Final[Mapping[str, Mapping[str, int]]] = {
    **dict.fromkeys(
        (
            "MalformedEvidence",
            "UnsupportedAlgorithm",
            "WeakHashAlgorithm",
            "BadSignature",
            "NotTpmGenerated",
            "NotAQuote",
            "SignerMismatch",
            "PcrDigestMismatch",
            "PcrSelectionMismatch",
        ),
        _CRYPTO_FAILED,
    ),
    **dict.fromkeys(
        ("EkCertificateInvalid", "EkCertificateUntrusted", "EkCertificateMissing", "EkNotApproved"),
        _UNKNOWN_TPM,
    ),
    **dict.fromkeys(
        (
            "EkChanged",
            "EkRevoked",
            "DuplicateEk",
            "AkNameMismatch",
            "AkAttributesInvalid",
            "ActivationFailed",
            "EnrolmentChanged",
            "NonceMismatch",
            "NonceReplayed",
            "ClockWentBack",
            "CounterWentBack",
            "FirmwareWentBack",
        ),
        _UNTRUSTWORTHY_KEY,
    ),
    **dict.fromkeys(("PcrMismatch", "ForbiddenEvent"), _BAD_BOOT),
    **dict.fromkeys(
        ("UnexplainedPcr", "EventLogMismatch", "EventNotAllowed", "ReferenceSetExpired"),
        _UNRECOGNIZED_BOOT,
    ),
    "EventLogMissing": _NO_LOG,
}


# ----- refusals ---------------------------------------------------------------------------


class TokenRefused(ValueError):
    """A token that must not be relied on; `reason` is a stable code, the message says why."""

    reason = "refused"


class Malformed(TokenRefused):
    reason = "malformed"


class UnknownKey(TokenRefused):
    """Signed by a key the JWKS does not hold (another issuer's, or rotated away)."""

    reason = "unknown-key"


class BadSignature(TokenRefused):
    """The signature does not match header and payload (tampered)."""

    reason = "bad-signature"


class Expired(TokenRefused):
    reason = "expired"


class NotYetValid(TokenRefused):
    reason = "not-yet-valid"


class WrongAudience(TokenRefused):
    reason = "wrong-audience"


class WrongIssuer(TokenRefused):
    """Issued by another operator (another cluster's: its `iss` names another cluster)."""

    reason = "wrong-issuer"


ISSUER_PREFIX: Final = "gtvp.io/cluster/"


def cluster_issuer(cluster_uid: str) -> str:
    """The `iss` of a cluster's tokens: named by the uid of its `kube-system` namespace (one
    per cluster, never reused), so that tokens of two clusters with same-named members do
    not pass for each other where a relying party holds both clusters' keys."""
    return f"{ISSUER_PREFIX}{cluster_uid}"


# ----- claims -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyId:
    """The SecurityPolicy a verdict was reached under."""

    name: str
    generation: int | None = None

    def uri(self) -> str:
        """`ear.appraisal-policy-id`: policy://gtvp/securitypolicy/<name>[/generation/<n>]."""
        base = f"policy://gtvp/securitypolicy/{self.name}"
        return base if self.generation is None else f"{base}/generation/{self.generation}"


def ear_status(status: Mapping[str, Any]) -> str:
    """The member's verdict as an AR4SI tier (see the module's docstring)."""
    verdict = (status.get("trust") or {}).get("verdict")
    if verdict == "Trusted":
        return WARNING if status.get("phase") == "Maintenance" else AFFIRMING
    if verdict == "Untrusted":
        return CONTRAINDICATED
    return NONE


def vector_for(status: Mapping[str, Any]) -> dict[str, int]:
    """The AR4SI trustworthiness vector of the member's verdict."""
    trust = status.get("trust") or {}
    verdict = trust.get("verdict")
    if verdict == "Trusted":
        return dict(_TRUSTED_VECTOR)
    if verdict == "Untrusted":
        return dict(_VECTOR_BY_REASON.get(str(trust.get("reason", "")), _NO_APPRAISAL))
    return dict(_NO_APPRAISAL)


_KEY_FIELDS: Final = (
    "verdict",
    "reason",
    "verifiedAt",
    "expiresAt",
    "memberClass",
    "ekSHA256",
    "akName",
)


def verdict_key(status: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a token states: a new token is issued when (and only when) this changes."""
    trust = status.get("trust") or {}
    return (
        status.get("phase"),
        status.get("level"),
        *(trust.get(k) for k in _KEY_FIELDS),
    )


def _epoch(t: dt.datetime) -> int:
    return int(t.timestamp())


def verdict_claims(
    *,
    member: str,
    status: Mapping[str, Any],
    policy: PolicyId | None,
    now: dt.datetime,
    audience: str,
    issuer: str,
    build: str,
    lifetime: dt.timedelta,
) -> dict[str, Any]:
    """The EAR claims for `member` whose (new) status is `status`.

    A Trusted verdict's token expires with the verdict (`trust.expiresAt`); any other's
    `lifetime` after `now` (the policy's longest validFor), so none outlives what the
    operator would say about the member by then."""
    trust = status.get("trust") or {}
    expires = parse_ts(trust.get("expiresAt")) if trust.get("verdict") == "Trusted" else None
    exp = expires if expires is not None else now + lifetime
    level = int(status.get("level", 0) or 0)
    facts: dict[str, Any] = {
        "member": member,
        "phase": status.get("phase", ""),
        "level": level,
        "verdict": trust.get("verdict", ""),
        "reason": trust.get("reason", ""),
    }
    for k in ("verifiedAt", "expiresAt", "usesLeft", "memberClass", "ekSHA256", "akName"):
        if trust.get(k) is not None:
            facts[k] = trust[k]
    submod: dict[str, Any] = {
        "ear.status": ear_status(status),
        "ear.trustworthiness-vector": vector_for(status),
        EXTENSION: facts,
    }
    if policy is not None:
        submod["ear.appraisal-policy-id"] = policy.uri()
    return {
        "eat_profile": EAR_PROFILE,
        "iss": issuer,
        "iat": _epoch(now),
        "nbf": _epoch(now),
        "exp": max(_epoch(exp), _epoch(now) + 1),
        "aud": audience,
        "ear.verifier-id": {"developer": DEVELOPER, "build": build},
        "submods": {member: submod},
    }


# ----- JOSE -------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, what: str) -> bytes:
    if not text or any(c not in _B64URL for c in text) or len(text) % 4 == 1:
        raise Malformed(f"{what} is not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise Malformed(f"{what} is not base64url") from exc


_B64URL: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _coordinates(key: ec.EllipticCurvePublicKey) -> tuple[str, str]:
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"verdict keys are P-256, not {key.curve.name}")
    numbers = key.public_numbers()
    return b64url(numbers.x.to_bytes(32, "big")), b64url(numbers.y.to_bytes(32, "big"))


def thumbprint(key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256): the key's `kid`."""
    x, y = _coordinates(key)
    canonical = f'{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}'.encode()
    return b64url(hashlib.sha256(canonical).digest())


def jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The public key as a JWK (RFC 7517/7518): EC P-256, for ES256 signatures."""
    x, y = _coordinates(key)
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": x,
        "y": y,
        "kid": thumbprint(key),
        "use": "sig",
        "alg": ALG,
    }


def jwks(keys: list[ec.EllipticCurvePublicKey]) -> dict[str, Any]:
    """A JWK Set of `keys` (the order kept: newest last)."""
    return {"keys": [jwk(k) for k in keys]}


def sign(claims: Mapping[str, Any], key: ec.EllipticCurvePrivateKey) -> str:
    """A compact JWS (JWT) of `claims` signed ES256 with `key` (`kid`: its thumbprint)."""
    header = {"alg": ALG, "kid": thumbprint(key.public_key()), "typ": "JWT"}
    signing_input = f"{b64url(_json(header))}.{b64url(_json(claims))}".encode("ascii")
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return f"{signing_input.decode()}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


@dataclass(frozen=True)
class Parsed:
    """A token split and decoded, nothing checked beyond its form."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def _object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # nested too deep too
        raise Malformed(f"the {what} is not JSON") from exc
    if not isinstance(value, dict):
        raise Malformed(f"the {what} is not a JSON object")
    return value


def parse(token: str) -> Parsed:
    """Split and decode a compact JWS; `Malformed` when it is not one (unverified)."""
    token = token.strip()
    if len(token) > MAX_TOKEN_BYTES:
        raise Malformed(f"the token is longer than {MAX_TOKEN_BYTES} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise Malformed(f"a JWT has 3 dot-separated parts, this has {len(parts)}")
    header = _object(b64url_decode(parts[0], "the header"), "header")
    claims = _object(b64url_decode(parts[1], "the payload"), "payload")
    signature = b64url_decode(parts[2], "the signature") if parts[2] else b""
    return Parsed(header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)


def _public_key(entry: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    if entry.get("kty") != "EC" or entry.get("crv") != "P-256":
        raise Malformed(f"JWKS key {entry.get('kid')!r} is not an EC P-256 key")
    x = int.from_bytes(b64url_decode(str(entry.get("x", "")), "a JWKS key's x"), "big")
    y = int.from_bytes(b64url_decode(str(entry.get("y", "")), "a JWKS key's y"), "big")
    try:
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    except ValueError as exc:
        raise Malformed(f"JWKS key {entry.get('kid')!r} is not a point on P-256") from exc


def _key_for(kid: str, key_set: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    entries = key_set.get("keys")
    if not isinstance(entries, list):
        raise Malformed("the JWKS has no 'keys' list")
    for entry in entries:
        if isinstance(entry, Mapping) and entry.get("kid") == kid:
            key = _public_key(entry)
            if thumbprint(key) != kid:
                raise Malformed(f"JWKS key {kid!r} is not named by its thumbprint")
            return key
    raise UnknownKey(
        f"signed by key {kid!r}, which the JWKS does not hold (another issuer's key, or one "
        "rotated away after its tokens expired)"
    )


def _int_claim(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Malformed(f"the token has no numeric {name!r} claim")
    return int(value)


def verify(
    token: str,
    key_set: Mapping[str, Any],
    *,
    audience: str,
    now: dt.datetime,
    issuer: str | None = None,
    issuer_may_be_absent: bool = False,
    leeway: dt.timedelta = dt.timedelta(seconds=0),
) -> dict[str, Any]:
    """The claims of `token` once its signature, validity, audience and (given `issuer`)
    issuer are checked against `key_set` (a JWKS); a `TokenRefused` subclass otherwise.
    Only ES256 is accepted (never `none`, never an HMAC with a public key as its secret).
    `issuer_may_be_absent`: a token with no `iss` at all passes (one a gtvp before
    2026-12-05 issued, where `key_set` holds one cluster's keys only)."""
    parsed = parse(token)
    if parsed.header.get("alg") != ALG:
        raise Malformed(f"algorithm {parsed.header.get('alg')!r}: only {ALG} is accepted")
    kid = parsed.header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise Malformed("the header names no key ('kid')")
    key = _key_for(kid, key_set)
    if len(parsed.signature) != 64:
        raise BadSignature("an ES256 signature is 64 bytes (r||s)")
    r = int.from_bytes(parsed.signature[:32], "big")
    s = int.from_bytes(parsed.signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), parsed.signing_input, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise BadSignature("the signature does not match the token (tampered)") from exc
    claims = parsed.claims
    if claims.get("eat_profile") != EAR_PROFILE:
        raise Malformed(f"not an EAR token (eat_profile {claims.get('eat_profile')!r})")
    if not isinstance(claims.get("submods"), dict) or not claims["submods"]:
        raise Malformed("the token has no submods")
    t = _epoch(now)
    exp, iat = _int_claim(claims, "exp"), _int_claim(claims, "iat")
    slack = int(leeway.total_seconds())
    if t >= exp + slack:
        raise Expired(f"expired {t - exp}s ago")
    nbf = int(claims.get("nbf", iat)) if isinstance(claims.get("nbf"), int) else iat
    if t + slack < max(nbf, iat):
        raise NotYetValid(f"not valid for another {max(nbf, iat) - t}s (clock skew?)")
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if audience not in audiences:
        raise WrongAudience(f"issued for audience {aud!r}, not {audience!r}")
    absent = issuer_may_be_absent and "iss" not in claims
    if issuer is not None and claims.get("iss") != issuer and not absent:
        raise WrongIssuer(
            f"issued by {claims.get('iss')!r}, not {issuer!r} (another cluster's operator?)"
        )
    return claims


@dataclass(frozen=True)
class Appraisal:
    """One attester's result in a token, as a relying party reads it."""

    member: str
    status: str
    level: int
    expires: dt.datetime
    vector: Mapping[str, int]


def appraisals(claims: Mapping[str, Any]) -> list[Appraisal]:
    """Each submod of verified `claims` (Malformed when one lacks the EAR fields)."""
    expires = dt.datetime.fromtimestamp(_int_claim(claims, "exp"), dt.UTC)
    out = []
    for name, sub in (claims.get("submods") or {}).items():
        if not isinstance(sub, Mapping) or sub.get("ear.status") not in STATUS_ORDER:
            raise Malformed(f"submod {name!r} has no valid ear.status")
        facts = sub.get(EXTENSION) or {}
        level = facts.get("level", 0) if isinstance(facts, Mapping) else 0
        vector = sub.get("ear.trustworthiness-vector") or {}
        out.append(
            Appraisal(
                member=str(name),
                status=str(sub["ear.status"]),
                level=int(level) if isinstance(level, int) else 0,
                expires=expires,
                vector=dict(vector) if isinstance(vector, Mapping) else {},
            )
        )
    return out
