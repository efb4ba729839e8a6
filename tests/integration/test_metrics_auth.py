"""/metrics behind the real API server's TokenReview and SubjectAccessReview, with the RBAC
the chart renders: the operator's service account may create the reviews
(<release>-metrics-auth), Prometheus' may get /metrics (<release>-metrics-reader)."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter

from gtvp import http_endpoints, kube, metrics_auth
from gtvp.http_endpoints import Probe
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


@pytest.fixture
def served(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> Iterator[tuple[str, ssl.SSLContext, dict[str, str]]]:
    """The operator's endpoints served as the chart runs them (HTTPS, reviews made with the
    operator's service-account token and the chart's RBAC); tokens of three callers."""
    cp = control_plane
    release = f"m{uuid.uuid4().hex[:8]}"
    rbac = _chart_rbac(release, namespace)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rbac) == [
        ("ClusterRole", f"{release}-metrics-auth"),
        ("ClusterRole", f"{release}-metrics-reader"),
        ("ClusterRoleBinding", f"{release}-metrics-auth"),
    ]
    prometheus = f"system:serviceaccount:{namespace}:prometheus"
    reader_binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": f"{release}-prometheus"},
        "subjects": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": namespace}],
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": f"{release}-metrics-reader",
        },
    }
    operator_token = _token(cp, namespace, "gtvp-operator")
    tokens = {
        "prometheus": _token(cp, namespace, "prometheus"),
        "stranger": _token(cp, namespace, "stranger"),
    }
    _apply(cp, [*rbac, reader_binding])
    server = None
    try:
        deadline = time.monotonic() + 30
        while not _can_get_metrics(cp, prometheus):  # the authorizer sees the binding
            assert time.monotonic() < deadline, "the metrics-reader binding never took effect"
            time.sleep(0.2)
        kubeconfig = tmp_path / "operator.kubeconfig"
        cp.write_kubeconfig(
            kubeconfig,
            f"system:serviceaccount:{namespace}:gtvp-operator",
            {"token": operator_token},
        )
        clients = kube.make_clients(str(kubeconfig))
        review_token, review_access = metrics_auth.api_reviewer(clients.api)
        guard = metrics_auth.Guard(review_token, review_access, clock=time.monotonic)
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
        yield f"https://localhost:{port}", ssl.create_default_context(cafile=str(crt)), tokens
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
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


def _get(url: str, context: ssl.SSLContext, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - https on loopback
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:  # noqa: S310
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_answer_only_a_token_the_api_server_allows_to_get_them(
    served: tuple[str, ssl.SSLContext, dict[str, str]],
) -> None:
    base, context, tokens = served
    assert _get(f"{base}/metrics", context)[0] == 401  # no token
    forged = tokens["prometheus"][:-4] + "AAAA"
    assert _get(f"{base}/metrics", context, forged)[0] == 401  # a token that does not verify
    assert _get(f"{base}/metrics", context, "not-a-jwt")[0] == 401
    code, text = _get(f"{base}/metrics", context, tokens["stranger"])  # no role
    assert code == 403
    assert "may not get /metrics" in text
    code, text = _get(f"{base}/metrics", context, tokens["prometheus"])  # bound to metrics-reader
    assert code == 200, text
    assert "gtvp_test_total 2.0" in text
    # allowed to /metrics only (the non-resource URL the role names)
    assert _get(f"{base}/debug", context, tokens["prometheus"])[0] == 403
    # the kubelet's probes need no token
    assert _get(f"{base}/readyz", context)[0] == 200
