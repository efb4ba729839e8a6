"""Publisher signatures on OS components: what is covered, and every way a check fails."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given
from hypothesis import strategies as st

from gtvp.core.component_checks import OUT_OF_SCOPE, check_component
from gtvp.core.component_signing import ComponentSignatureError, canonical_bytes, sign, verify
from gtvp.core.policy import PolicyError, parse_policy
from tests.catalogue import Publisher
from tests.samples import sample_policy_spec

DIGEST = "sha256:" + "ab" * 32


def _spec() -> dict[str, Any]:
    return {
        "componentName": "openssl",
        "version": "3.3.2",
        "type": "library",
        "image": f"registry.example.com/openssl@{DIGEST}",
        "digest": DIGEST,
        "sizeBytes": 7_400_000,
        "requires": [{"name": "libc", "versions": ""}],
        "level": 2,
    }


def _keys(kind: str) -> tuple[bytes, str]:
    key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
    key = (
        ed25519.Ed25519PrivateKey.generate()
        if kind == "ed25519"
        else ec.generate_private_key(ec.SECP256R1())
    )
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return priv, pub.decode()


@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_signed_component_verifies(kind: str) -> None:
    priv, pub = _keys(kind)
    spec = _spec()
    spec["signature"] = sign(spec, priv, "acme")
    verify(spec, {"acme": pub})


def test_server_defaults_do_not_break_a_signature() -> None:
    priv, pub = _keys("ed25519")
    spec = _spec()
    spec["requires"] = [{"name": "libc"}]  # the API server fills versions: ""
    del spec["level"]
    spec["signature"] = sign(spec, priv, "acme")
    stored = copy.deepcopy(spec)
    stored["requires"][0]["versions"] = ""
    stored["level"] = 1
    verify(stored, {"acme": pub})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image", f"evil.example.com/openssl@{DIGEST}"),
        ("digest", "sha256:" + "cd" * 32),
        ("version", "3.3.3"),
        ("requires", []),
        ("level", 9),
        ("sizeBytes", 1),
        ("conflicts", [{"name": "glibc", "versions": ""}]),
    ],
)
def test_any_changed_field_breaks_the_signature(field: str, value: Any) -> None:
    priv, pub = _keys("ed25519")
    spec = _spec()
    spec["signature"] = sign(spec, priv, "acme")
    spec[field] = value
    with pytest.raises(ComponentSignatureError) as err:
        verify(spec, {"acme": pub})
    assert err.value.reason == "BadSignature"


def test_unknown_publisher_is_refused() -> None:
    priv, pub = _keys("ed25519")
    spec = _spec()
    spec["signature"] = sign(spec, priv, "acme")
    with pytest.raises(ComponentSignatureError) as err:
        verify(spec, {"other": pub})
    assert err.value.reason == "UnknownPublisher"


def test_key_of_another_type_is_an_algorithm_mismatch() -> None:
    priv, _ = _keys("ed25519")
    _, p256_pub = _keys("p256")
    spec = _spec()
    spec["signature"] = sign(spec, priv, "acme")
    with pytest.raises(ComponentSignatureError) as err:
        verify(spec, {"acme": p256_pub})
    assert err.value.reason == "AlgorithmMismatch"


def test_missing_and_malformed_signatures_have_their_own_reasons() -> None:
    _, pub = _keys("ed25519")
    with pytest.raises(ComponentSignatureError) as err:
        verify(_spec(), {"acme": pub})
    assert err.value.reason == "MissingSignature"
    spec = _spec() | {"signature": {"publisher": "acme", "algorithm": "Ed25519", "value": "%%"}}
    with pytest.raises(ComponentSignatureError) as err:
        verify(spec, {"acme": pub})
    assert err.value.reason == "MalformedSignature"


@given(st.binary(max_size=96))
def test_random_signature_bytes_never_verify(raw: bytes) -> None:
    import base64

    _, pub = _keys("ed25519")
    spec = _spec() | {
        "signature": {
            "publisher": "acme",
            "algorithm": "Ed25519",
            "value": base64.b64encode(raw).decode(),
        }
    }
    with pytest.raises(ComponentSignatureError):
        verify(spec, {"acme": pub})


def test_canonical_bytes_ignore_order_of_lists() -> None:
    a = _spec() | {"provides": ["x", "y"], "requires": [{"name": "b"}, {"name": "a"}]}
    b = _spec() | {"provides": ["y", "x"], "requires": [{"name": "a"}, {"name": "b"}]}
    assert canonical_bytes(a) == canonical_bytes(b)


def test_a_publisher_signs_only_the_components_and_levels_the_policy_lets_it() -> None:
    """An application team's key (nginx, openssl, up to level 2) is compromised, or the team
    oversteps: a component it signs under another name, providing libc, or declaring a
    higher level fails verification (OutOfScope) however good its signature; the same
    signature verifies under a policy that does not scope the key."""
    team = Publisher("web-team")

    def policy(**scope: Any) -> Any:
        spec = sample_policy_spec()
        spec["publisherKeys"] = [{"name": team.name, "publicKey": team.public_pem, **scope}]
        return parse_policy("p", spec)

    scoped = policy(components=["nginx", "openssl"], maxLevel=2)
    nginx = team.component("nginx", "1.26.2", "application", requires=["libc"], level=2)
    for obj, ok in (
        (nginx, True),
        (team.component("openssl", "3.3.2", level=2), True),
        (team.component("linux", "6.6.52", "kernel", provides=["kernel"], level=1), False),
        # a kernel under an allowed name: the box's kernel slot is not the team's to fill
        (team.component("openssl", "9.9.9", "kernel", level=1), False),
        (team.component("openssl", "3.3.3", provides=["libc"], level=2), False),
        (team.component("nginx", "1.26.3", "application", level=3), False),
    ):
        check = check_component(obj, scoped.publisher_keys, scoped.publisher_scopes)
        assert check.ok == ok, check
        if not ok:
            assert check.reason == OUT_OF_SCOPE
            assert team.name in check.message
        unscoped = policy()
        assert check_component(obj, unscoped.publisher_keys, unscoped.publisher_scopes).ok
    nothing = policy(components=[])
    assert not check_component(nginx, nothing.publisher_keys, nothing.publisher_scopes).ok
    with pytest.raises(PolicyError, match=r"publisherKeys\[0\]\.maxLevel"):
        policy(maxLevel=0)


def test_a_revoked_component_fails_whatever_its_signature() -> None:
    """Deleting an OSComponent is no revocation: anyone who may create OSComponents can
    apply a saved signed copy of a withdrawn version again, and every box would resolve
    to it. Listed in the policy's revokedComponents (by its image or disk digest), it fails
    verification (Revoked); the other versions still verify."""
    pub = Publisher()
    bad = pub.component("glibc", "2.36.0+deb12u4", requires=["rootfs"], provides=["libc"])
    good = pub.component("glibc", "2.36.0+deb12u5", requires=["rootfs"], provides=["libc"])
    spec = sample_policy_spec()
    spec["publisherKeys"] = [{"name": pub.name, "publicKey": pub.public_pem}]
    spec["revokedComponents"] = [bad["spec"]["digest"], bad["spec"]["digest"]]
    policy = parse_policy("p", spec)
    assert policy.revoked_components == {bad["spec"]["digest"]}

    def check(obj: dict[str, Any]) -> Any:
        keys, scopes = policy.publisher_keys, policy.publisher_scopes
        return check_component(obj, keys, scopes, policy.revoked_components)

    got = check(bad)
    assert (got.state, got.reason) == ("Failed", "Revoked")
    assert bad["spec"]["digest"] in got.message
    assert check(good).ok
    renamed = copy.deepcopy(bad)  # the same bytes under another object name
    renamed["metadata"]["name"] = "glibc-again"
    assert check(renamed).reason == "Revoked"
    spec["revokedComponents"] = ["SHA256:" + "a" * 64]
    with pytest.raises(PolicyError, match=r"revokedComponents\[0\].*not a component digest"):
        parse_policy("p", spec)
