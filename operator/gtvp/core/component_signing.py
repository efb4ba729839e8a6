"""Signatures on OS components: the canonical bytes a publisher signs, signing and checking.

Pure: takes an OSComponent spec (a mapping as the API server stores it) and keys, returns
bytes or raises `ComponentSignatureError` with a reason code. The signature covers every
field of the spec except the signature itself, after the CRD's defaults are applied, so
a component cannot be re-pointed at another image, re-versioned or given other
dependencies without breaking it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

DOMAIN = b"gtvp.io/oscomponent/v1\n"
ALGORITHMS = ("Ed25519", "ECDSA-P256-SHA256")


class ComponentSignatureError(Exception):
    """A component signature could not be made or does not verify."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _deps(items: Any) -> list[dict[str, str]]:
    out = [
        {"name": str(d["name"]), "versions": str(d.get("versions", "") or "")}
        for d in (items or [])
    ]
    return sorted(out, key=lambda d: d["name"])


def canonical_bytes(spec: Mapping[str, Any]) -> bytes:
    """The bytes a publisher signs for one component spec (defaults applied, keys sorted).
    `diskDigest` and `chunks` (the chunk digest list, in its order) are in them only when
    the spec has them, so a component without them signs the same bytes as before the
    fields existed (its signature stays valid)."""
    try:
        body = {
            "componentName": str(spec["componentName"]),
            "version": str(spec["version"]),
            "type": str(spec["type"]),
            "image": str(spec["image"]),
            "digest": str(spec["digest"]),
            "sizeBytes": int(spec["sizeBytes"]),
            "requires": _deps(spec.get("requires")),
            "provides": sorted(str(p) for p in (spec.get("provides") or [])),
            "conflicts": _deps(spec.get("conflicts")),
            "level": int(spec.get("level", 1)),
            "maxUses": int(spec["maxUses"]) if spec.get("maxUses") is not None else None,
        }
        if spec.get("diskDigest") is not None:  # absent: the bytes signed before it existed
            body["diskDigest"] = str(spec["diskDigest"])
        chunks = spec.get("chunks")
        if chunks is not None:  # the same: absent, the bytes signed before it existed
            body["chunks"] = {
                "sizeBytes": int(chunks["sizeBytes"]),
                "digests": [str(d) for d in chunks["digests"]],
            }
    except (KeyError, TypeError, ValueError) as exc:
        raise ComponentSignatureError(
            "MalformedComponent", f"component spec lacks or mistypes a signed field: {exc}"
        ) from exc
    return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def algorithm_of(private_key: object) -> str:
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return "Ed25519"
    if isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(
        private_key.curve, ec.SECP256R1
    ):
        return "ECDSA-P256-SHA256"
    raise ComponentSignatureError("UnsupportedKey", "publisher keys must be Ed25519 or ECDSA P-256")


def sign(spec: Mapping[str, Any], private_key_pem: bytes, publisher: str) -> dict[str, str]:
    """Return the `signature` block for `spec`, signed with a PEM private key."""
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ComponentSignatureError(
            "UnreadableKey", f"cannot read the private key: {exc}"
        ) from exc
    alg = algorithm_of(key)
    data = canonical_bytes(spec)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        sig = key.sign(data)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        sig = key.sign(data, ec.ECDSA(hashes.SHA256()))
    else:  # algorithm_of refused every other key type already
        raise ComponentSignatureError("UnsupportedKey", "unsupported key type")
    return {"publisher": publisher, "algorithm": alg, "value": base64.b64encode(sig).decode()}


def verify(spec: Mapping[str, Any], publisher_keys: Mapping[str, str]) -> None:
    """Check `spec.signature` against the trusted publisher keys (name -> PEM).

    Raises ComponentSignatureError(reason) with reason one of: MissingSignature,
    UnknownPublisher, UnreadableKey, AlgorithmMismatch, MalformedSignature, BadSignature,
    MalformedComponent.
    """
    sig = spec.get("signature")
    if not isinstance(sig, Mapping):
        raise ComponentSignatureError("MissingSignature", "the component carries no signature")
    publisher = str(sig.get("publisher", ""))
    pem = publisher_keys.get(publisher)
    if pem is None:
        raise ComponentSignatureError(
            "UnknownPublisher",
            f"publisher {publisher!r} is not among the SecurityPolicy's publisherKeys",
        )
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        raise ComponentSignatureError(
            "UnreadableKey", f"publisher key {publisher!r} in the policy cannot be read: {exc}"
        ) from exc
    try:
        raw = base64.b64decode(str(sig.get("value", "")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ComponentSignatureError(
            "MalformedSignature", "signature value is not base64"
        ) from exc
    data = canonical_bytes(spec)
    alg = sig.get("algorithm")
    try:
        if alg == "Ed25519" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(raw, data)
        elif (
            alg == "ECDSA-P256-SHA256"
            and isinstance(key, ec.EllipticCurvePublicKey)
            and isinstance(key.curve, ec.SECP256R1)
        ):
            key.verify(raw, data, ec.ECDSA(hashes.SHA256()))
        else:
            raise ComponentSignatureError(
                "AlgorithmMismatch",
                f"signature algorithm {alg!r} does not match publisher {publisher!r}'s key type",
            )
    except InvalidSignature as exc:
        raise ComponentSignatureError(
            "BadSignature",
            f"the signature by {publisher!r} does not match this component's content "
            "(image, digest, chunk list, version or dependencies changed after signing)",
        ) from exc
