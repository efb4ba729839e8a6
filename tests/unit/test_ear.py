"""Signed verdict tokens (gtvp.core.ear, gtvp.verdict_keys, `gtvp token`): what a relying
party reads in them, and every way a forged, stale or foreign token is refused."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import io
import json
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gtvp import cli, verdict_keys
from gtvp.core import ear
from gtvp.handlers import attestation
from gtvp.runtime import OperatorSettings, Runtime

NOW = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
ISSUER = ear.cluster_issuer("5b0c9e4e-0000-4000-8000-000000000001")
EXPIRES = NOW + dt.timedelta(minutes=5)


def _status(
    verdict: str | None, *, reason: str = "QuoteVerified", phase: str = ""
) -> dict[str, Any]:
    trust: dict[str, Any] = {}
    if verdict is not None:
        trust = {
            "verdict": verdict,
            "reason": reason,
            "verifiedAt": "2026-06-01T11:59:58Z",
            "usesLeft": 50,
            "memberClass": "swtpm",
            "ekSHA256": "ab" * 32,
            "akName": "000b" + "cd" * 32,
        }
        if verdict == "Trusted":
            trust["expiresAt"] = EXPIRES.strftime("%Y-%m-%dT%H:%M:%SZ")
    trusted = verdict == "Trusted"
    return {
        "phase": phase or ("Trusted" if trusted else "Untrusted" if verdict else "Pending"),
        "level": 3 if trusted and phase != "Maintenance" else 0,
        "trust": trust,
    }


def _claims(status: dict[str, Any], **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "member": "node-1",
        "status": status,
        "policy": ear.PolicyId("default", 4),
        "now": NOW,
        "audience": "gtvp",
        "issuer": ISSUER,
        "build": "gtvp 0.1.0",
        "lifetime": dt.timedelta(seconds=15),
    }
    args.update(kw)
    return ear.verdict_claims(**args)


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def other_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _token(key: ec.EllipticCurvePrivateKey, **kw: Any) -> str:
    return ear.sign(_claims(_status("Trusted"), **kw), key)


def _verify(token: str, *keys: ec.EllipticCurvePrivateKey, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"audience": "gtvp", "now": NOW}
    args.update(kw)
    return ear.verify(token, ear.jwks([k.public_key() for k in keys]), **args)


# ----- the claims, in the EAR draft's names and value sets -----------------------------------


def test_a_trusted_verdict_is_an_affirming_ear_with_the_ar4si_vector_and_gtvps_facts() -> None:
    claims = _claims(_status("Trusted"))
    assert claims["eat_profile"] == "tag:github.com,2023:veraison/ear"
    assert claims["ear.verifier-id"] == {"developer": "gtvp", "build": "gtvp 0.1.0"}
    assert (claims["iat"], claims["exp"], claims["aud"]) == (
        int(NOW.timestamp()),
        int(EXPIRES.timestamp()),  # the token expires with the verdict
        "gtvp",
    )
    sub = claims["submods"]["node-1"]
    assert sub["ear.status"] == "affirming"
    assert sub["ear.trustworthiness-vector"] == {
        "instance-identity": 2,
        "configuration": 2,
        "executables": 3,
        "hardware": 2,
    }
    assert sub["ear.appraisal-policy-id"] == "policy://gtvp/securitypolicy/default/generation/4"
    facts = sub["gtvp"]
    assert facts["member"] == "node-1"
    assert (facts["level"], facts["usesLeft"], facts["ekSHA256"]) == (3, 50, "ab" * 32)
    assert facts["expiresAt"] == "2026-06-01T12:05:00Z"


@pytest.mark.parametrize(
    ("reason", "claim", "value"),
    [
        ("PcrMismatch", "executables", 96),  # contraindicated executables
        ("ForbiddenEvent", "executables", 96),
        ("UnexplainedPcr", "executables", 33),  # unrecognized
        ("BadSignature", "instance-identity", 99),  # cryptographic validation failed
        ("EkCertificateUntrusted", "hardware", 97),  # not recognized
        ("AkNameMismatch", "instance-identity", 96),
        ("VerdictExpired", "instance-identity", 0),  # no current assertion
    ],
)
def test_an_untrusted_verdict_is_contraindicated_and_says_what_failed(
    reason: str, claim: str, value: int
) -> None:
    claims = _claims(_status("Untrusted", reason=reason))
    sub = claims["submods"]["node-1"]
    assert sub["ear.status"] == "contraindicated"
    assert sub["ear.trustworthiness-vector"][claim] == value
    assert sub["gtvp"]["reason"] == reason
    # an Untrusted token lives for the policy's longest validFor, not forever
    assert claims["exp"] == int((NOW + dt.timedelta(seconds=15)).timestamp())


def test_no_verdict_is_none_and_maintenance_is_a_warning() -> None:
    none = _claims(_status(None))["submods"]["node-1"]
    assert none["ear.status"] == "none"
    assert set(none["ear.trustworthiness-vector"].values()) == {0}
    maintenance = _claims(_status("Trusted", phase="Maintenance"))["submods"]["node-1"]
    assert maintenance["ear.status"] == "warning"
    assert maintenance["gtvp"]["level"] == 0


# ----- JOSE: the token and the key set ---------------------------------------------------


def test_a_signed_token_verifies_and_reads_back(key: ec.EllipticCurvePrivateKey) -> None:
    token = _token(key)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "ES256", "kid": ear.thumbprint(key.public_key()), "typ": "JWT"}
    assert len(base64.urlsafe_b64decode(token.split(".")[2] + "==")) == 64  # raw r||s
    (a,) = ear.appraisals(_verify(token, key))
    assert (a.member, a.status, a.level, a.expires) == ("node-1", "affirming", 3, EXPIRES)


def test_the_jwks_names_each_key_by_its_rfc7638_thumbprint(key: ec.EllipticCurvePrivateKey) -> None:
    (entry,) = ear.jwks([key.public_key()])["keys"]
    assert {k: entry[k] for k in ("kty", "crv", "use", "alg")} == {
        "kty": "EC",
        "crv": "P-256",
        "use": "sig",
        "alg": "ES256",
    }
    members = {k: entry[k] for k in ("crv", "kty", "x", "y")}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    import hashlib

    digest = hashlib.sha256(canonical).digest()
    assert entry["kid"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _swap_payload(token: str, change: dict[str, Any]) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["submods"]["node-1"].update(change)
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def test_a_tampered_payload_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    token = ear.sign(_claims(_status("Untrusted", reason="PcrMismatch")), key)
    forged = _swap_payload(token, {"ear.status": "affirming"})
    with pytest.raises(ear.BadSignature) as refused:
        _verify(forged, key)
    assert refused.value.reason == "bad-signature"


def test_a_tampered_signature_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    token = _token(key)
    head, _, sig = token.rpartition(".")
    flipped = bytearray(base64.urlsafe_b64decode(sig + "=="))
    flipped[5] ^= 1
    forged = f"{head}.{base64.urlsafe_b64encode(bytes(flipped)).rstrip(b'=').decode()}"
    with pytest.raises(ear.BadSignature):
        _verify(forged, key)
    with pytest.raises(ear.BadSignature, match="64 bytes"):
        _verify(f"{head}.{sig[:40]}", key)


def test_an_expired_token_and_one_from_the_future_are_refused(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    token = _token(key)
    with pytest.raises(ear.Expired) as expired:
        _verify(token, key, now=EXPIRES)
    assert expired.value.reason == "expired"
    with pytest.raises(ear.NotYetValid):
        _verify(token, key, now=NOW - dt.timedelta(minutes=1))


def test_a_token_signed_by_a_key_outside_the_jwks_is_refused(
    key: ec.EllipticCurvePrivateKey, other_key: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(ear.UnknownKey) as refused:
        _verify(_token(other_key), key)
    assert refused.value.reason == "unknown-key"
    # nor does naming a published key's kid help: the signature is checked with that key
    _header, payload, signature = _token(other_key).split(".")
    kid = ear.thumbprint(key.public_key())
    lying = {"alg": "ES256", "kid": kid, "typ": "JWT"}
    lying_header = base64.urlsafe_b64encode(json.dumps(lying).encode()).rstrip(b"=").decode()
    with pytest.raises(ear.BadSignature):
        _verify(f"{lying_header}.{payload}.{signature}", key)


def test_a_token_for_another_audience_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ear.WrongAudience) as refused:
        _verify(_token(key, audience="someone-else"), key)
    assert refused.value.reason == "wrong-audience"


def test_a_token_of_another_cluster_is_refused_where_the_issuer_is_checked(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    """Two clusters, a member named node-1 in each, and a relying party holding both
    clusters' keys: the other cluster's token passes only where the issuer is not asked."""
    other = ear.cluster_issuer("6e5a1f00-0000-4000-8000-000000000002")
    theirs = _token(key, issuer=other)
    assert _verify(theirs, key)["iss"] == other  # same key set, no issuer asked: accepted
    with pytest.raises(ear.WrongIssuer) as refused:
        _verify(theirs, key, issuer=ISSUER)
    assert refused.value.reason == "wrong-issuer"
    assert other in str(refused.value)
    assert _verify(_token(key), key, issuer=ISSUER)["iss"] == ISSUER


def test_no_token_is_issued_before_the_issuer_is_named() -> None:
    issuer = verdict_keys.Issuer(namespace="gtvp-system", keys=[verdict_keys.new_key(NOW)])
    assert issuer.token("node-1", _status("Trusted"), None, NOW, dt.timedelta(minutes=1)) is None
    issuer.name = ISSUER
    token = issuer.token("node-1", _status("Trusted"), None, NOW, dt.timedelta(minutes=1))
    assert token is not None
    assert ear.parse(token).claims["iss"] == ISSUER


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "!!!.e30.AA",
        "e30.e30.",
        "bnVsbA.e30.AA",
        # a header nested deeper than the parser goes: refused before any key is looked at
        base64.urlsafe_b64encode(b"[" * 3000).rstrip(b"=").decode() + ".e30.AA",
    ],
)
def test_malformed_tokens_are_refused(key: ec.EllipticCurvePrivateKey, token: str) -> None:
    with pytest.raises(ear.Malformed) as refused:
        _verify(token, key)
    assert refused.value.reason == "malformed"


def _unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes) -> str:
    def enc(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{enc(json.dumps(header).encode())}.{enc(json.dumps(claims).encode())}.{enc(signature)}"


def test_alg_none_and_hmac_with_the_public_key_are_refused(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    import hashlib
    import hmac

    kid = ear.thumbprint(key.public_key())
    claims = _claims(_status("Trusted"))
    with pytest.raises(ear.Malformed, match="only ES256"):
        _verify(_unsigned({"alg": "none", "kid": kid}, claims, b""), key)
    public = json.dumps(ear.jwk(key.public_key())).encode()
    header = {"alg": "HS256", "kid": kid}
    unsigned = _unsigned(header, claims, b"").rstrip(".")
    mac = hmac.new(public, unsigned.encode(), hashlib.sha256).digest()
    with pytest.raises(ear.Malformed, match="only ES256"):
        _verify(_unsigned(header, claims, mac), key)


def test_a_signed_token_without_the_ear_profile_is_refused(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    claims = _claims(_status("Trusted"))
    claims["eat_profile"] = "tag:example.com,2024:other"
    with pytest.raises(ear.Malformed, match="not an EAR token"):
        _verify(ear.sign(claims, key), key)


# ----- rotation --------------------------------------------------------------------------


def test_a_rotated_key_verifies_its_tokens_until_they_expire_then_is_removed() -> None:
    keys = [verdict_keys.new_key(NOW - dt.timedelta(days=1))]
    old_token = ear.sign(_claims(_status("Trusted")), keys[-1].private)
    keys = verdict_keys.rotated(keys, NOW)
    assert keys[0].retired == NOW
    assert keys[-1].retired is None
    new_token = ear.sign(_claims(_status("Trusted")), keys[-1].private)
    assert ear.parse(new_token).header["kid"] == keys[-1].kid != keys[0].kid
    retention = dt.timedelta(minutes=5)  # the policy's longest validFor
    kept = verdict_keys.pruned(keys, NOW + retention, retention)
    assert [k.kid for k in kept] == [k.kid for k in keys]  # a replica may still sign with it
    # while both are published, both tokens verify
    for token in (old_token, new_token):
        ear.verify(token, verdict_keys.public_jwks(kept), audience="gtvp", now=NOW)
    later = NOW + retention + verdict_keys.REFRESH
    kept = verdict_keys.pruned(keys, later, retention)
    assert [k.kid for k in kept] == [keys[-1].kid]  # the newest key always stays
    with pytest.raises(ear.UnknownKey):
        ear.verify(old_token, verdict_keys.public_jwks(kept), audience="gtvp", now=NOW)
    ear.verify(new_token, verdict_keys.public_jwks(kept), audience="gtvp", now=NOW)


def test_stored_keys_round_trip_and_bad_storage_names_no_key_material() -> None:
    keys = verdict_keys.rotated([verdict_keys.new_key(NOW)], NOW)
    back = verdict_keys.load(verdict_keys.dump(keys))
    assert [(k.kid, k.created, k.retired) for k in back] == [
        (k.kid, k.created, k.retired) for k in keys
    ]
    broken = json.loads(verdict_keys.dump(keys))
    broken["keys"][0]["pem"] = broken["keys"][0]["pem"][:60] + "garbage-----"
    with pytest.raises(ValueError, match="cannot be read") as refused:
        verdict_keys.load(json.dumps(broken))
    assert "PRIVATE KEY" not in str(refused.value)
    assert "PRIVATE" not in repr(keys[0])


# ----- the write path: a token rides on the verdict's own status patch ----------------------


def _runtime(issuer: verdict_keys.Issuer | None) -> Runtime:
    rt = Runtime(settings=OperatorSettings(), clients=cast(Any, None))
    if issuer is not None:
        rt.verdict_issuer = issuer
    return rt


def test_a_token_is_issued_with_a_changed_verdict_and_kept_while_it_stands() -> None:
    issuer = verdict_keys.Issuer(
        namespace="gtvp-system", name=ISSUER, keys=[verdict_keys.new_key(NOW)]
    )
    rt = _runtime(issuer)
    trusted = _status("Trusted")
    first = attestation._with_token(rt, "node-1", _status(None), trusted)
    token = first["trust"]["token"]
    assert (
        ear.appraisals(
            ear.verify(token, issuer.jwks(), audience="gtvp", now=dt.datetime.now(dt.UTC))
        )[0].status
        == "affirming"
    )
    # the same verdict again (a no-op reconcile): the same token, so an empty patch
    again = attestation._with_token(rt, "node-1", first, json.loads(json.dumps(trusted)))
    assert again == first
    # the verdict changes: a new token in the same patch
    untrusted = _status("Untrusted", reason="PcrMismatch")
    changed = attestation._with_token(rt, "node-1", first, untrusted)
    claims = ear.parse(changed["trust"]["token"]).claims
    assert claims["submods"]["node-1"]["ear.status"] == "contraindicated"


def test_a_standing_token_without_this_clusters_issuer_is_issued_anew() -> None:
    """A token an older gtvp issued (no `iss`) or one issued under another name is signed
    anew at the next look, its verdict unchanged: relying parties that check `iss` (and
    gtvp's own key release) are not refused for a whole validFor after an upgrade."""
    stored = verdict_keys.new_key(NOW)
    rt = _runtime(verdict_keys.Issuer(namespace="gtvp-system", name=ISSUER, keys=[stored]))
    trusted = _status("Trusted")
    for iss in (None, "gtvp.io/cluster/elsewhere"):
        claims = _claims(trusted)
        claims.pop("iss")
        if iss is not None:
            claims["iss"] = iss
        old = {**trusted, "trust": {**trusted["trust"], "token": ear.sign(claims, stored.private)}}
        again = attestation._with_token(rt, "node-1", old, json.loads(json.dumps(trusted)))
        assert ear.parse(again["trust"]["token"]).claims["iss"] == ISSUER, iss


def test_no_signing_key_means_no_token_and_a_changed_verdict_drops_the_old_one() -> None:
    issuer = verdict_keys.Issuer(
        namespace="gtvp-system", name=ISSUER, keys=[verdict_keys.new_key(NOW)]
    )
    first = attestation._with_token(_runtime(issuer), "n", _status(None), _status("Trusted"))
    assert first["trust"]["token"]
    keyless = _runtime(None)
    dropped = attestation._with_token(keyless, "n", first, _status("Untrusted", reason="X"))
    assert "token" not in dropped["trust"]  # the merge patch deletes it: fail closed


def test_a_status_with_nothing_else_to_write_gets_no_token_of_its_own() -> None:
    issuer = verdict_keys.Issuer(
        namespace="gtvp-system", name=ISSUER, keys=[verdict_keys.new_key(NOW)]
    )
    old = _status("Trusted")  # written by an operator without tokens
    assert (
        "token"
        not in attestation._with_token(_runtime(issuer), "n", old, _status("Trusted"))["trust"]
    )


# ----- the public documents --------------------------------------------------------------


def test_the_operator_serves_the_jwks_and_each_members_token() -> None:
    issuer = verdict_keys.Issuer(namespace="gtvp-system")
    tokens = {"node-1": "a.b.c"}
    answer = verdict_keys.documents(issuer, tokens.get)
    assert answer("/.well-known/jwks.json")[0] == 503  # type: ignore[index]
    issuer.keys = [verdict_keys.new_key(NOW)]
    code, ctype, body = answer("/.well-known/jwks.json")  # type: ignore[misc]
    assert (code, ctype) == (200, "application/jwk-set+json")
    assert json.loads(body) == issuer.jwks()
    assert answer("/ear/members/node-1") == (200, "application/jwt", b"a.b.c")
    assert answer("/ear/members/node-2")[0] == 404  # type: ignore[index]
    assert answer("/ear/members/../etc")[0] == 404  # type: ignore[index]
    assert answer("/metrics") is None


# ----- gtvp token ------------------------------------------------------------------------


@pytest.fixture
def jwks_file(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(ear.jwks([key.public_key()])))
    return path


def _now_claims(status: dict[str, Any], member: str = "node-1", **kw: Any) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    status = json.loads(json.dumps(status))
    if status["trust"].get("expiresAt"):
        status["trust"]["expiresAt"] = (now + dt.timedelta(minutes=5)).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
    return _claims(status, member=member, now=now, **kw)


def test_gtvp_token_verify_exit_codes(
    key: ec.EllipticCurvePrivateKey,
    other_key: ec.EllipticCurvePrivateKey,
    jwks_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good = ear.sign(_now_claims(_status("Trusted")), key)
    jwks = str(jwks_file)
    assert cli.main(["token", "verify", good, "--jwks", jwks, "--min-level", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("node-1: affirming, level 3, expires ")
    assert cli.main(["token", "verify", good, "--jwks", jwks, "--min-level", "4"]) == 1
    assert "refused (below-level)" in capsys.readouterr().err
    assert cli.main(["token", "verify", good, "--jwks", jwks, "--member", "node-2"]) == 1
    assert "wrong-member" in capsys.readouterr().err
    cases = {
        "expired": ear.sign(_claims(_status("Trusted")), key),
        "unknown-key": ear.sign(_now_claims(_status("Trusted")), other_key),
        "bad-signature": _swap_payload(
            ear.sign(_now_claims(_status("Trusted")), key), {"ear.status": "warning"}
        ),
        "wrong-audience": ear.sign(_now_claims(_status("Trusted"), audience="x"), key),
        "wrong-issuer": ear.sign(_now_claims(_status("Trusted"), issuer="gtvp.io/cluster/x"), key),
        "malformed": "not-a-token",
    }
    for reason, token in cases.items():
        asked = ["--issuer", ISSUER]
        assert cli.main(["token", "verify", token, "--jwks", jwks, *asked]) == 1, reason
        assert f"refused ({reason})" in capsys.readouterr().err
    # a contraindicated token is valid as a statement, but never passes --min-level
    bad = ear.sign(_now_claims(_status("Untrusted", reason="PcrMismatch")), key)
    assert cli.main(["token", "verify", bad, "--jwks", jwks]) == 0
    assert "contraindicated, level 0" in capsys.readouterr().out
    assert cli.main(["token", "verify", bad, "--jwks", jwks, "--min-level", "0"]) == 1
    # from stdin
    monkeypatch.setattr("sys.stdin", io.StringIO(good + "\n"))
    assert cli.main(["token", "verify", "-", "--jwks", jwks]) == 0


def test_gtvp_token_show_decodes_and_says_it_did_not_verify(
    key: ec.EllipticCurvePrivateKey, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["token", "show", _token(key)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("# NOT VERIFIED")
    shown = json.loads(out.split("\n", 1)[1])
    assert shown["claims"]["submods"]["node-1"]["ear.status"] == "affirming"
    assert cli.main(["token", "show", "garbage"]) == 1


# ----- interoperability: any JWT library verifies them -----------------------------------


def test_pyjwt_verifies_a_token_with_the_published_jwk_and_refuses_a_tampered_one(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    jwt = pytest.importorskip("jwt")
    (entry,) = ear.jwks([key.public_key()])["keys"]
    token = ear.sign(_now_claims(_status("Trusted")), key)
    key_of = jwt.PyJWK(entry).key
    claims = jwt.decode(token, key_of, algorithms=["ES256"], audience="gtvp", issuer=ISSUER)
    assert claims["submods"]["node-1"]["ear.status"] == "affirming"
    with pytest.raises(jwt.InvalidIssuerError):  # another cluster's token, as docs/tokens.md
        jwt.decode(token, key_of, algorithms=["ES256"], audience="gtvp", issuer="gtvp.io/x")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            _swap_payload(token, {"ear.status": "warning"}),
            jwt.PyJWK(entry).key,
            algorithms=["ES256"],
            audience="gtvp",
        )
    # and gtvp verifies what PyJWT signs (same JOSE, both ways)
    theirs = jwt.encode(
        _now_claims(_status("Trusted")),
        key,
        algorithm="ES256",
        headers={"kid": entry["kid"]},
    )
    ear.verify(theirs, {"keys": [entry]}, audience="gtvp", now=dt.datetime.now(dt.UTC))


def test_the_public_documents_are_served_without_credentials_where_metrics_need_them() -> None:
    """Over real HTTP: a box VM (no Kubernetes credentials) fetches the JWKS and its host's
    token; /metrics behind the same guard stays refused."""
    import urllib.error
    import urllib.request

    from prometheus_client import CollectorRegistry

    from gtvp import http_endpoints
    from gtvp_local.processes import free_port

    @dataclasses.dataclass(frozen=True)
    class No:
        status: int = 401
        text: str = "no\n"
        reason: str = "Unauthorized"

    issuer = verdict_keys.Issuer(
        namespace="gtvp-system", name=ISSUER, keys=[verdict_keys.new_key(NOW)]
    )
    port = free_port()
    server = http_endpoints.serve(
        port,
        "127.0.0.1",
        CollectorRegistry(),
        lambda: http_endpoints.Probe(loaded=True, loop_started=False, loop_idle_seconds=0),
        guard=lambda _auth, _path, _method: No(),
        public=verdict_keys.documents(issuer, {"node-1": "a.b.c"}.get),
    )
    base = f"http://127.0.0.1:{port}"

    def get(path: str) -> tuple[str, bytes]:
        with urllib.request.urlopen(base + path, timeout=5) as got:  # noqa: S310 - loopback
            return str(got.headers["Content-Type"]), bytes(got.read())

    try:
        assert json.loads(get("/.well-known/jwks.json")[1]) == issuer.jwks()
        assert get("/ear/members/node-1") == ("application/jwt", b"a.b.c")
        with pytest.raises(urllib.error.HTTPError) as missing:
            get("/ear/members/node-9")
        assert missing.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as refused:
            get("/metrics")
        assert refused.value.code == 401
    finally:
        server.shutdown()
        server.server_close()


def test_gtvp_token_verify_imports_no_kubernetes_client(
    key: ec.EllipticCurvePrivateKey, jwks_file: Path
) -> None:
    import subprocess
    import sys

    token = ear.sign(_now_claims(_status("Trusted")), key)
    code = (
        "import sys\nfrom gtvp import cli\n"
        f"rc = cli.main(['token', 'verify', {token!r}, '--jwks', {str(jwks_file)!r}])\n"
        "assert rc == 0, rc\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'kopf')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[-1] == "[]"


def test_key_release_takes_its_own_keys_tokens_with_no_issuer_but_not_anothers() -> None:
    """Key release verifies against this operator's own keys only, so a token they signed
    is this cluster's: one an older gtvp issued without `iss` is taken (until re-signed at
    the next look, after an upgrade, a guest is not refused its Secrets), one naming another
    issuer is not."""
    from gtvp import key_release

    stored = verdict_keys.new_key(NOW)
    rt = _runtime(verdict_keys.Issuer(namespace="gtvp-system", name=ISSUER, keys=[stored]))
    endpoint = key_release.Endpoint(rt)
    now = dt.datetime.now(dt.UTC)
    claims = _now_claims(_status("Trusted"))
    older = {k: v for k, v in claims.items() if k != "iss"}
    taken, refusal = endpoint._claims(ear.sign(older, stored.private), now)
    assert refusal is None
    assert taken["submods"]
    elsewhere = {**claims, "iss": "gtvp.io/cluster/other"}
    taken, refusal = endpoint._claims(ear.sign(elsewhere, stored.private), now)
    assert taken is None
    assert refusal is not None
    assert refusal[0] == "wrong-issuer"
    assert endpoint._claims(ear.sign(claims, stored.private), now)[1] is None


def test_the_jwks_names_its_issuer_and_verify_refuses_another_clusters_key_set(
    key: ec.EllipticCurvePrivateKey, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`iss` is written by whoever signs: a cluster someone else runs can claim yours. What
    protects is verifying each cluster's tokens against its own key set; the published key
    set names its issuer, and `gtvp token verify --issuer` refuses a key set of another."""
    stored = verdict_keys.new_key(NOW)
    issuer = verdict_keys.Issuer(namespace="gtvp-system", name=ISSUER, keys=[stored])
    assert issuer.jwks()["issuer"] == ISSUER
    theirs = tmp_path / "theirs.json"
    theirs.write_text(json.dumps(verdict_keys.public_jwks([stored], "gtvp.io/cluster/them")))
    token = ear.sign(_now_claims(_status("Trusted")), stored.private)
    assert cli.main(["token", "verify", token, "--jwks", str(theirs), "--issuer", ISSUER]) == 1
    assert "is the key set of issuer 'gtvp.io/cluster/them'" in capsys.readouterr().err
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps(issuer.jwks()))
    assert cli.main(["token", "verify", token, "--jwks", str(ours), "--issuer", ISSUER]) == 0
