"""A real Prometheus scrapes the operator of a running pool and loads gtvp's alert rules.

Real: Prometheus (Debian's package), the operator's /metrics, the chart's alert rules, and
the pool of tests.pools (kube-apiserver, swtpm members, agents, operator; kwok Nodes and
the virt-controller stand-in simulated).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from gtvp_local import layout
from gtvp_local.controlplane import ControlPlane
from gtvp_local.pool import Pool
from gtvp_local.processes import free_port
from tests.pools import trusted_pool, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.controlplane,
    pytest.mark.tpm,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus (Debian)"),
]


@pytest.fixture(scope="module")
def pool(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with trusted_pool(
        control_plane,
        tmp_path_factory.mktemp("prom"),
        tag="prom",
        identities={"a": 3, "b": 2},
        policy={"interval": "2s", "valid_for": "6s", "max_uses": 50},
    ) as p:
        yield p


@pytest.fixture(scope="module")
def prometheus(pool: Pool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("prometheus")
    rules = (layout.repo_root() / "charts" / "gtvp" / "files" / "alerts.yaml").read_text()
    (d / "rules.yaml").write_text(rules.replace("RUNBOOK_BASE", "https://example.com/runbooks"))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(d / "rules.yaml")],
        "scrape_configs": [
            {
                "job_name": "gtvp-operator",
                "static_configs": [{"targets": [f"127.0.0.1:{pool.metrics_port}"]}],
            }
        ],
    }
    (d / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (d / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={d / 'prometheus.yml'}",
            f"--storage.tsdb.path={d / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def _api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback test server
            return json.loads(r.read())["data"]
    except OSError:
        return None


def test_prometheus_scrapes_member_phases_and_attestations(pool: Pool, prometheus: str) -> None:
    def trusted() -> float | None:
        data = _api(prometheus, "query", query='sum(gtvp_members{phase="Trusted"})')
        result = (data or {}).get("result") or []
        return float(result[0]["value"][1]) if result else None

    assert wait_for("Prometheus to see 2 Trusted members", lambda: trusted() == 2, 60)
    data = _api(prometheus, "query", query='sum(gtvp_attestations_total{result="verified"})')
    assert float(data["result"][0]["value"][1]) > 0
    targets = _api(prometheus, "targets")
    assert [t["health"] for t in targets["activeTargets"]] == ["up"]


def test_prometheus_loads_gtvp_alert_rules(prometheus: str) -> None:
    def rules() -> list[dict[str, Any]] | None:
        data = _api(prometheus, "rules")
        groups = (data or {}).get("groups") or []
        return groups[0]["rules"] if groups else None

    loaded = wait_for("the rules to load", rules, 30)
    names = {r["name"] for r in loaded}
    assert {"GtvpMemberUntrusted", "GtvpNoTrustedMembers", "GtvpLazyBoxFailed"} <= names
    assert all(r["health"] in ("ok", "unknown") for r in loaded)
    firing = {r["name"] for r in loaded if r.get("state") == "firing"}
    assert "GtvpNoTrustedMembers" not in firing
