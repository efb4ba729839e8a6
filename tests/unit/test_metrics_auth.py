"""Who may read /metrics: the pure parts of gtvp.metrics_auth (the bearer token, the review
bodies, the decisions from plain review statuses, the TLS files) and the operator's flags.
Everything that needs the API server's answers (the guard, its cache, the 503, the HTTPS
server) is in tests/integration/test_metrics_auth.py, on the real API server."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gtvp import metrics_auth, operator_main
from gtvp.metrics_auth import Identity, Refusal, ReviewCache

ALICE = {
    "authenticated": True,
    "user": {
        "username": "system:serviceaccount:monitoring:prometheus",
        "uid": "u-1",
        "groups": ["system:serviceaccounts", "system:authenticated"],
        "extra": {"authentication.kubernetes.io/pod-name": ["prometheus-0"]},
    },
}


def test_bearer_token_is_read_from_the_authorization_header() -> None:
    assert metrics_auth.bearer_token("Bearer abc.def") == "abc.def"
    assert metrics_auth.bearer_token("bearer   abc ") == "abc"
    for bad in (None, "", "Basic dXNlcjpwdw==", "Bearer", "Bearer ", "Bearer a b"):
        assert metrics_auth.bearer_token(bad) is None, bad


def test_reviews_carry_the_token_then_the_identity_path_and_verb() -> None:
    assert metrics_auth.token_review("t") == {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": "t"},
    }
    who = metrics_auth.authenticated(ALICE)
    assert who == Identity(
        user="system:serviceaccount:monitoring:prometheus",
        uid="u-1",
        groups=("system:serviceaccounts", "system:authenticated"),
        extra=(("authentication.kubernetes.io/pod-name", ("prometheus-0",)),),
    )
    assert metrics_auth.access_review(who, "/metrics", "get") == {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": "system:serviceaccount:monitoring:prometheus",
            "uid": "u-1",
            "groups": ["system:serviceaccounts", "system:authenticated"],
            "extra": {"authentication.kubernetes.io/pod-name": ["prometheus-0"]},
            "nonResourceAttributes": {"path": "/metrics", "verb": "get"},
        },
    }
    assert metrics_auth.authenticated({"authenticated": False, "error": "expired"}) is None
    assert metrics_auth.authenticated({"authenticated": True, "user": {}}) is None
    assert metrics_auth.allowed({"allowed": True})
    assert not metrics_auth.allowed({"allowed": False})
    assert not metrics_auth.allowed({"allowed": True, "denied": True})


def test_no_identity_is_401_an_identity_not_allowed_403_an_allowed_one_served() -> None:
    who = Identity(user="system:serviceaccount:monitoring:prometheus")
    assert metrics_auth.verdict("/metrics", "get", None, may=False) == Refusal(
        401, "Unauthorized: no valid bearer token\n"
    )
    forbidden = metrics_auth.verdict("/metrics", "get", who, may=False)
    assert forbidden == Refusal(
        403, 'Forbidden: user "system:serviceaccount:monitoring:prometheus" may not get /metrics\n'
    )
    assert metrics_auth.verdict("/metrics", "get", who, may=True) is None
    assert [Refusal(s, "").reason for s in (401, 403, 503)] == [
        "Unauthorized",
        "Forbidden",
        "Service Unavailable",
    ]


def test_the_cache_never_holds_the_token_itself() -> None:
    key = ReviewCache.key("secret-token", "/metrics", "get")
    assert "secret-token" not in repr(key)


def test_plain_http_only_on_loopback() -> None:
    for ok in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert metrics_auth.plain_http_allowed(ok), ok
    for bad in ("0.0.0.0", "::", "10.0.0.1", "example.com", ""):  # noqa: S104
        assert not metrics_auth.plain_http_allowed(bad), bad


def _serving(*argv: str) -> operator_main.MetricsServing:
    return operator_main.metrics_serving_from(operator_main.parser().parse_args(argv))


def test_the_operators_flags_keep_plain_loopback_by_default_and_refuse_open_plain_http() -> None:
    assert _serving() == operator_main.MetricsServing()  # what the local pool runs
    assert _serving("--metrics-address=127.0.0.1", "--metrics-port=9191").secure is False
    with pytest.raises(ValueError, match="plain HTTP"):
        _serving("--metrics-address=0.0.0.0")
    assert _serving("--metrics-address=0.0.0.0", "--metrics-port=0") == (
        operator_main.MetricsServing()
    )  # nothing served at all
    secure = _serving(
        "--metrics-address=0.0.0.0",
        "--metrics-secure",
        "--webhook-cert=/certs/tls.crt",
        "--webhook-key=/certs/tls.key",
    )
    assert secure == operator_main.MetricsServing(True, "/certs/tls.crt", "/certs/tls.key")
    own = _serving("--metrics-secure", "--metrics-cert=/m/c", "--metrics-key=/m/k")
    assert (own.cert, own.key) == ("/m/c", "/m/k")
    with pytest.raises(ValueError, match="certificate"):
        _serving("--metrics-secure")
    assert operator_main.main(["--metrics-address=0.0.0.0", "--webhook-port=0"]) == 2


def _self_signed(directory: Path, name: str = "localhost") -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    crt, pem = directory / "tls.crt", directory / "tls.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return crt, pem


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    crt, key = _self_signed(tmp_path)
    files = metrics_auth.TlsFiles(str(crt), str(key))
    first = files.context()
    assert files.context() is first
    _self_signed(tmp_path)
    stat = crt.stat()
    os.utime(crt, (stat.st_atime, stat.st_mtime + 5))
    assert files.context() is not first
