"""Who may read /metrics: the pure decisions of gtvp.metrics_auth, the cache, the operator's
flags, and the HTTPS server with a guard (reviews faked here; the real API server's answers
are in tests/integration/test_metrics_auth.py)."""

from __future__ import annotations

import datetime
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry, Counter

from gtvp import http_endpoints, metrics_auth, operator_main
from gtvp.http_endpoints import Probe
from gtvp.metrics_auth import Guard, Identity, Refusal, ReviewCache
from gtvp_local.processes import free_port

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


def _status(refusal: Refusal | None) -> int:
    return 200 if refusal is None else refusal.status


class FakeApi:
    """Counts the reviews; tokens 'good' and 'viewer' authenticate, only 'good' may read."""

    def __init__(self) -> None:
        self.token_reviews = 0
        self.access_reviews = 0
        self.now = 1000.0
        self.down = False

    def clock(self) -> float:
        return self.now

    def review_token(self, body: dict[str, Any]) -> Mapping[str, Any]:
        self.token_reviews += 1
        if self.down:
            raise ConnectionError("connection refused")
        token = body["spec"]["token"]
        if token in ("good", "viewer"):
            return {"authenticated": True, "user": {"username": token, "groups": ["g"]}}
        return {"authenticated": False}

    def review_access(self, body: dict[str, Any]) -> Mapping[str, Any]:
        self.access_reviews += 1
        spec = body["spec"]
        ok = spec["user"] == "good" and spec["nonResourceAttributes"] == {
            "path": "/metrics",
            "verb": "get",
        }
        return {"allowed": ok}

    def guard(self, size: int = metrics_auth.CACHE_SIZE) -> Guard:
        return Guard(self.review_token, self.review_access, self.clock, ReviewCache(size))


def test_no_token_or_a_bad_one_is_401_not_allowed_403_allowed_served() -> None:
    api = FakeApi()
    guard = api.guard()
    no_token = guard.check(None, "/metrics", "GET")
    assert _status(no_token) == 401
    assert api.token_reviews == 0  # nothing to ask the API server
    bad = guard.check("Bearer forged", "/metrics", "GET")
    assert _status(bad) == 401
    assert api.access_reviews == 0  # no identity, no access review
    viewer = guard.check("Bearer viewer", "/metrics", "GET")
    assert viewer == Refusal(403, 'Forbidden: user "viewer" may not get /metrics\n')
    assert guard.check("Bearer good", "/metrics", "GET") is None
    other = guard.check("Bearer good", "/debug", "GET")  # the path is what is authorized
    assert _status(other) == 403


def test_answers_are_cached_briefly_so_scrapes_do_not_each_cost_two_reviews() -> None:
    api = FakeApi()
    guard = api.guard()
    for _ in range(4):  # a minute of scrapes every 15 s
        assert guard.check("Bearer good", "/metrics", "GET") is None
        api.now += 14.9
    assert (api.token_reviews, api.access_reviews) == (1, 1)
    api.now += 1.0  # past ALLOWED_TTL since the first review
    assert guard.check("Bearer good", "/metrics", "GET") is None
    assert (api.token_reviews, api.access_reviews) == (2, 2)
    # refusals are kept for a shorter time: a binding just created is seen soon
    assert guard.check("Bearer viewer", "/metrics", "GET") is not None
    assert guard.check("Bearer viewer", "/metrics", "GET") is not None
    assert api.token_reviews == 3
    api.now += metrics_auth.REFUSED_TTL
    assert guard.check("Bearer viewer", "/metrics", "GET") is not None
    assert api.token_reviews == 4


def test_the_cache_is_bounded_and_forgets_the_least_recently_used() -> None:
    api = FakeApi()
    guard = api.guard(size=3)
    for token in ("a", "b", "c", "d", "e"):
        guard.check(f"Bearer {token}", "/metrics", "GET")
    assert len(guard.cache) == 3
    guard.check("Bearer good", "/metrics", "GET")
    guard.check("Bearer c", "/metrics", "GET")  # still cached: refreshed as recently used
    reviews = api.token_reviews
    guard.check("Bearer x", "/metrics", "GET")
    guard.check("Bearer c", "/metrics", "GET")
    assert api.token_reviews == reviews + 1
    assert len(guard.cache) == 3


def test_the_cache_never_holds_the_token_itself() -> None:
    key = ReviewCache.key("secret-token", "/metrics", "get")
    assert "secret-token" not in repr(key)


def test_an_api_server_that_cannot_review_is_a_503_and_not_remembered() -> None:
    api = FakeApi()
    guard = api.guard()
    api.down = True
    down = guard.check("Bearer good", "/metrics", "GET")
    assert _status(down) == 503
    assert down is not None
    assert "connection refused" in down.text
    api.down = False
    assert guard.check("Bearer good", "/metrics", "GET") is None


def test_plain_http_only_on_loopback() -> None:
    for ok in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
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


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[tuple[str, ssl.SSLContext, FakeApi]]:
    registry = CollectorRegistry()
    Counter("gtvp_test_total", "a counter", registry=registry).inc(3)
    crt, key = _self_signed(tmp_path)
    api = FakeApi()
    port = free_port()
    server = http_endpoints.serve(
        port,
        "127.0.0.1",
        registry,
        lambda: Probe(loaded=True, loop_started=True, loop_idle_seconds=1.0),
        tls=metrics_auth.TlsFiles(str(crt), str(key)).context,
        guard=api.guard().check,
    )
    client = ssl.create_default_context(cafile=str(crt))
    try:
        yield f"https://localhost:{port}", client, api
    finally:
        server.shutdown()
        server.server_close()


def _get(
    url: str, context: ssl.SSLContext, token: str | None = None
) -> tuple[int, str, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - https on loopback
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as resp:  # noqa: S310
            return int(resp.status), resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def test_https_metrics_need_an_allowed_token_and_probes_stay_open(
    secure: tuple[str, ssl.SSLContext, FakeApi],
) -> None:
    base, context, _ = secure
    code, _, headers = _get(f"{base}/metrics", context)
    assert code == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert _get(f"{base}/metrics", context, "forged")[0] == 401
    assert _get(f"{base}/metrics", context, "viewer")[0] == 403
    code, text, _ = _get(f"{base}/metrics", context, "good")
    assert code == 200
    assert "gtvp_test_total 3.0" in text
    # the kubelet's probes carry no token
    assert _get(f"{base}/readyz", context)[0] == 200
    assert _get(f"{base}/healthz", context)[0] == 200


def test_plain_http_is_not_answered_on_the_https_port(
    secure: tuple[str, ssl.SSLContext, FakeApi],
) -> None:
    base, context, _ = secure
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(base.replace("https", "http") + "/metrics", timeout=5)  # noqa: S310
    assert _get(f"{base}/readyz", context)[0] == 200  # and the server still answers


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    crt, key = _self_signed(tmp_path)
    files = metrics_auth.TlsFiles(str(crt), str(key))
    first = files.context()
    assert files.context() is first
    _self_signed(tmp_path)
    stat = crt.stat()
    os.utime(crt, (stat.st_atime, stat.st_mtime + 5))
    assert files.context() is not first
