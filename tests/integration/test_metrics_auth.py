"""/metrics behind the real API server's TokenReview and SubjectAccessReview, with the RBAC
the chart renders: the operator's service account may create the reviews
(<release>-metrics-auth), Prometheus' may get /metrics (<release>-metrics-reader).

Also here: the guard's cache (how many reviews reach the API server, counted around the real
`metrics_auth.api_reviewer`), the 503 when the API server cannot answer (a real client aimed
at a port nothing listens on) and the HTTPS server the operator runs (probes stay open)."""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter

from gtvp import http_endpoints, kube, metrics_auth
from gtvp.http_endpoints import Probe
from gtvp.metrics_auth import Guard, Refusal, Review, ReviewCache
from gtvp_local import toolchain
from gtvp_local.controlplane import ControlPlane
from gtvp_local.processes import free_port
from tests.unit.test_metrics_auth import _self_signed

pytestmark = pytest.mark.controlplane

CHART = Path(__file__).parents[2] / "charts" / "gtvp"


def _chart_rbac(release: str, namespace: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [
            str(toolchain.binaries().helm),
            "template",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "--kube-version",
            "v1.36.3",
            "--show-only",
            "templates/rbac.yaml",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    wanted = {f"{release}-metrics-reader", f"{release}-metrics-auth"}
    return [
        d
        for d in yaml.safe_load_all(out.stdout)
        if d and d["kind"].startswith("ClusterRole") and d["metadata"]["name"] in wanted
    ]


def _token(cp: ControlPlane, namespace: str, account: str) -> str:
    cp.kubectl("create", "serviceaccount", account, "-n", namespace)
    return cp.kubectl("create", "token", account, "-n", namespace).stdout.strip()


def _apply(cp: ControlPlane, objs: list[dict[str, Any]]) -> None:
    cp.kubectl("apply", "-f", "-", input_text="\n---\n".join(json.dumps(o) for o in objs))


def _can_get_metrics(cp: ControlPlane, user: str) -> bool:
    out = cp.kubectl("auth", "can-i", "get", "/metrics", f"--as={user}", check=False)
    return out.stdout.strip() == "yes"


def _wait_until_can_get_metrics(cp: ControlPlane, user: str) -> None:
    deadline = time.monotonic() + 30
    while not _can_get_metrics(cp, user):  # the authorizer sees the binding
        assert time.monotonic() < deadline, f"{user}'s metrics-reader binding never took effect"
        time.sleep(0.2)


def _reader_binding(name: str, release: str, namespace: str, account: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": f"{release}-metrics-reader",
        },
    }


@dataclass(frozen=True)
class Cluster:
    """The chart's metrics RBAC on the real API server, the operator's service account (its
    kubeconfig) and the tokens of two callers: `prometheus` (bound to metrics-reader) and
    `stranger` (no role)."""

    cp: ControlPlane
    namespace: str
    release: str
    operator_kubeconfig: Path
    tokens: dict[str, str]

    def user(self, account: str) -> str:
        return f"system:serviceaccount:{self.namespace}:{account}"

    def reviewer(self, kubeconfig: Path | None = None) -> tuple[Review, Review]:
        """The operator's real reviews (`metrics_auth.api_reviewer`), as the operator makes
        its clients."""
        clients = kube.make_clients(str(kubeconfig or self.operator_kubeconfig))
        return metrics_auth.api_reviewer(clients.api)


@pytest.fixture
def cluster(control_plane: ControlPlane, namespace: str, tmp_path: Path) -> Iterator[Cluster]:
    cp = control_plane
    release = f"m{uuid.uuid4().hex[:8]}"
    rbac = _chart_rbac(release, namespace)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rbac) == [
        ("ClusterRole", f"{release}-metrics-auth"),
        ("ClusterRole", f"{release}-metrics-reader"),
        ("ClusterRoleBinding", f"{release}-metrics-auth"),
    ]
    reader_binding = _reader_binding(f"{release}-prometheus", release, namespace, "prometheus")
    operator_token = _token(cp, namespace, "gtvp-operator")
    tokens = {
        "prometheus": _token(cp, namespace, "prometheus"),
        "stranger": _token(cp, namespace, "stranger"),
    }
    _apply(cp, [*rbac, reader_binding])
    try:
        _wait_until_can_get_metrics(cp, f"system:serviceaccount:{namespace}:prometheus")
        kubeconfig = tmp_path / "operator.kubeconfig"
        cp.write_kubeconfig(
            kubeconfig,
            f"system:serviceaccount:{namespace}:gtvp-operator",
            {"token": operator_token},
        )
        yield Cluster(cp, namespace, release, kubeconfig, tokens)
    finally:
        for obj in (*rbac, reader_binding):
            cp.kubectl(
                "delete",
                obj["kind"].lower(),
                obj["metadata"]["name"],
                "--ignore-not-found",
                check=False,
            )
        cp.kubectl(
            "delete",
            "serviceaccount",
            "gtvp-operator",
            "prometheus",
            "stranger",
            "-n",
            namespace,
            check=False,
        )


class Counted:
    """The real reviews, counting the TokenReviews and SubjectAccessReviews that reach the
    API server."""

    def __init__(self, reviewer: tuple[Review, Review]) -> None:
        self._review_token, self._review_access = reviewer
        self.token_reviews = 0
        self.access_reviews = 0

    def review_token(self, body: dict[str, Any]) -> Mapping[str, Any]:
        self.token_reviews += 1
        return self._review_token(body)

    def review_access(self, body: dict[str, Any]) -> Mapping[str, Any]:
        self.access_reviews += 1
        return self._review_access(body)

    @property
    def reviews(self) -> tuple[int, int]:
        return self.token_reviews, self.access_reviews


class Clock:
    """The guard's clock, moved by the test (the reviews stay real)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _counted_guard(
    cluster: Cluster, size: int = metrics_auth.CACHE_SIZE
) -> tuple[Guard, Counted, Clock]:
    api, clock = Counted(cluster.reviewer()), Clock()
    return Guard(api.review_token, api.review_access, clock, ReviewCache(size)), api, clock


def test_only_an_authenticated_caller_costs_the_api_server_an_access_review(
    cluster: Cluster,
) -> None:
    guard, api, _ = _counted_guard(cluster)
    refused = guard.check(None, "/metrics", "GET")
    assert refused is not None
    assert refused.status == 401
    assert api.reviews == (0, 0)  # no token: nothing to ask
    forged = cluster.tokens["prometheus"][:-4] + "AAAA"
    refused = guard.check(f"Bearer {forged}", "/metrics", "GET")
    assert refused is not None
    assert refused.status == 401
    assert api.reviews == (1, 0)  # the API server does not vouch for it: no access review
    refused = guard.check(f"Bearer {cluster.tokens['stranger']}", "/metrics", "GET")
    assert refused == Refusal(
        403, f'Forbidden: user "{cluster.user("stranger")}" may not get /metrics\n'
    )
    assert api.reviews == (2, 1)
    assert guard.check(f"Bearer {cluster.tokens['prometheus']}", "/metrics", "GET") is None
    assert api.reviews == (3, 2)


def test_answers_are_cached_briefly_so_scrapes_do_not_each_cost_two_reviews(
    cluster: Cluster,
) -> None:
    guard, api, clock = _counted_guard(cluster)
    prometheus = f"Bearer {cluster.tokens['prometheus']}"
    for _ in range(4):  # a minute of scrapes every 15 s
        assert guard.check(prometheus, "/metrics", "GET") is None
        clock.now += 14.9
    assert api.reviews == (1, 1)
    clock.now += 1.0  # past ALLOWED_TTL since the first review
    assert guard.check(prometheus, "/metrics", "GET") is None
    assert api.reviews == (2, 2)
    # answers are per path: /debug is reviewed (and refused) on its own
    debug = guard.check(prometheus, "/debug", "GET")
    assert debug is not None
    assert debug.status == 403
    assert api.reviews == (3, 3)


def test_a_refused_caller_bound_to_the_reader_role_is_served_once_the_refusal_expires(
    cluster: Cluster, cluster_names: list[str]
) -> None:
    guard, api, clock = _counted_guard(cluster)
    stranger = f"Bearer {cluster.tokens['stranger']}"
    refused = guard.check(stranger, "/metrics", "GET")
    assert refused is not None
    assert refused.status == 403
    binding = _reader_binding(
        f"{cluster.release}-stranger", cluster.release, cluster.namespace, "stranger"
    )
    cluster_names.append(f"clusterrolebinding/{binding['metadata']['name']}")
    _apply(cluster.cp, [binding])
    _wait_until_can_get_metrics(cluster.cp, cluster.user("stranger"))
    clock.now += metrics_auth.REFUSED_TTL - 0.1
    refused = guard.check(stranger, "/metrics", "GET")  # the refusal is still remembered
    assert refused is not None
    assert refused.status == 403
    assert api.reviews == (1, 1)
    clock.now += 0.1  # REFUSED_TTL (much shorter than ALLOWED_TTL) since the refusal
    assert guard.check(stranger, "/metrics", "GET") is None
    assert api.reviews == (2, 2)


def test_the_cache_is_bounded_and_forgets_the_least_recently_used(cluster: Cluster) -> None:
    guard, api, _ = _counted_guard(cluster, size=3)
    prometheus = f"Bearer {cluster.tokens['prometheus']}"
    stranger = f"Bearer {cluster.tokens['stranger']}"
    forged = [f"Bearer forged-{i}" for i in range(8)]
    for token in (prometheus, stranger, forged[0]):
        guard.check(token, "/metrics", "GET")
    assert api.token_reviews == 3
    assert guard.check(prometheus, "/metrics", "GET") is None  # cached, now the most recent
    assert api.token_reviews == 3
    guard.check(forged[1], "/metrics", "GET")  # one too many: the least recently used goes
    assert api.token_reviews == 4
    assert guard.check(prometheus, "/metrics", "GET") is None  # kept: used recently
    assert api.token_reviews == 4
    refused = guard.check(stranger, "/metrics", "GET")  # forgotten: reviewed again
    assert refused is not None
    assert refused.status == 403
    assert api.token_reviews == 5
    for token in forged[2:]:  # a flood of bad tokens does not grow it
        guard.check(token, "/metrics", "GET")
    assert len(guard.cache) == 3


class Reaching:
    """The real reviews of whichever API server the test points the guard at."""

    def __init__(self, reviewer: tuple[Review, Review]) -> None:
        self.reviewer = reviewer

    def review_token(self, body: dict[str, Any]) -> Mapping[str, Any]:
        return self.reviewer[0](body)

    def review_access(self, body: dict[str, Any]) -> Mapping[str, Any]:
        return self.reviewer[1](body)


def test_an_api_server_that_cannot_answer_is_a_503_and_not_remembered(
    cluster: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = json.loads(cluster.operator_kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"  # nothing
    unreachable = tmp_path / "unreachable.kubeconfig"
    unreachable.write_text(json.dumps(config))
    api = Reaching(cluster.reviewer(unreachable))
    guard = Guard(api.review_token, api.review_access, Clock())
    prometheus = f"Bearer {cluster.tokens['prometheus']}"
    with caplog.at_level(logging.WARNING, logger="gtvp.metrics_auth"):
        down = guard.check(prometheus, "/metrics", "GET")
    assert down is not None
    assert (down.status, down.reason) == (503, "Service Unavailable")
    assert down.text == "cannot review the request with the API server: ask again\n"
    # why, for the operator's log only: the caller is not authenticated yet
    assert "Connection refused" in caplog.text
    api.reviewer = cluster.reviewer()  # it answers again: the next scrape is served at once
    assert guard.check(prometheus, "/metrics", "GET") is None


@pytest.fixture
def served(
    cluster: Cluster, tmp_path: Path
) -> Iterator[tuple[str, ssl.SSLContext, dict[str, str]]]:
    """The operator's endpoints served as the chart runs them (HTTPS, reviews made with the
    operator's service-account token and the chart's RBAC)."""
    review_token, review_access = cluster.reviewer()
    guard = Guard(review_token, review_access, clock=time.monotonic)
    registry = CollectorRegistry()
    Counter("gtvp_test_total", "a counter", registry=registry).inc(2)
    crt, key = _self_signed(tmp_path)
    port = free_port()
    server = http_endpoints.serve(
        port,
        "127.0.0.1",
        registry,
        lambda: Probe(loaded=True, loop_started=True, loop_idle_seconds=1.0),
        tls=metrics_auth.TlsFiles(str(crt), str(key)).context,
        guard=guard.check,
    )
    try:
        yield (
            f"https://localhost:{port}",
            ssl.create_default_context(cafile=str(crt)),
            cluster.tokens,
        )
    finally:
        server.shutdown()
        server.server_close()


def _get(
    url: str, context: ssl.SSLContext, token: str | None = None
) -> tuple[int, str, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - https on loopback
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:  # noqa: S310
            return int(resp.status), resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def test_metrics_answer_only_a_token_the_api_server_allows_to_get_them(
    served: tuple[str, ssl.SSLContext, dict[str, str]],
) -> None:
    base, context, tokens = served
    code, _, headers = _get(f"{base}/metrics", context)  # no token
    assert code == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    forged = tokens["prometheus"][:-4] + "AAAA"
    assert _get(f"{base}/metrics", context, forged)[0] == 401  # a token that does not verify
    assert _get(f"{base}/metrics", context, "not-a-jwt")[0] == 401
    code, text, _ = _get(f"{base}/metrics", context, tokens["stranger"])  # no role
    assert code == 403
    assert "may not get /metrics" in text
    code, text, _ = _get(f"{base}/metrics", context, tokens["prometheus"])  # a metrics-reader
    assert code == 200, text
    assert "gtvp_test_total 2.0" in text
    # the page is served on /metrics only: a path every authenticated caller may get
    # (/version, system:discovery) does not serve it to a token without the role
    for path in ("/version", "/livez", "/debug"):
        code, text, _ = _get(f"{base}{path}", context, tokens["stranger"])
        assert code == 404, path
        assert "gtvp_test_total" not in text
    # the kubelet's probes carry no token
    assert _get(f"{base}/readyz", context)[0] == 200
    assert _get(f"{base}/healthz", context)[0] == 200


def test_plain_http_is_not_answered_on_the_https_port(
    served: tuple[str, ssl.SSLContext, dict[str, str]],
) -> None:
    base, context, _ = served
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(base.replace("https", "http") + "/metrics", timeout=5)  # noqa: S310
    assert _get(f"{base}/readyz", context)[0] == 200  # and the server still answers
