"""A real Prometheus scrapes the operator of a running pool and loads gtvp's alert rules;
after a gated VM, a Lazy Box and a tamper, every panel of the chart's Grafana dashboard
returns data.

Real: Prometheus (Debian's package), the operator's /metrics, the chart's alert rules and
dashboard, and the pool of tests.pools (kube-apiserver, swtpm members, agents, operator;
kwok Nodes and the virt-controller stand-in simulated).
"""

from __future__ import annotations

import json
import math
import re
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
from tests.catalogue import Publisher
from tests.pools import trusted_pool, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.controlplane,
    pytest.mark.tpm,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus (Debian)"),
]


PUB = Publisher()


def _catalogue() -> list[dict[str, Any]]:
    """The signed sample catalogue, and one component whose manifest changed after it was
    signed (it fails verification: BadSignature)."""
    forged = PUB.component("curl", "8.9.1")
    forged["spec"]["sizeBytes"] += 1
    return [*PUB.web_catalogue(), forged]


def _apply(cp: ControlPlane, objs: list[dict[str, Any]], *extra: str) -> None:
    items = {"apiVersion": "v1", "kind": "List", "items": objs}
    cp.kubectl("apply", *extra, "-f", "-", input_text=json.dumps(items))


@pytest.fixture(scope="module")
def pool(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    catalogue = _catalogue()
    try:
        with trusted_pool(
            control_plane,
            tmp_path_factory.mktemp("prom"),
            tag="prom",
            identities={"a": 3, "b": 2},
            policy={
                "interval": "2s",
                "valid_for": "6s",
                "max_uses": 50,
                "publisher_keys": PUB.keys,
            },
            before_start=lambda p: _apply(p.cp, catalogue),
        ) as p:
            yield p
    finally:
        for obj in catalogue:
            control_plane.kubectl(
                "delete", "oscomponent", obj["metadata"]["name"], "--wait=false", check=False
            )


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
                "static_configs": [
                    {"targets": [f"127.0.0.1:{r.metrics_port}" for r in pool.replicas]}
                ],
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
    assert {t["health"] for t in targets["activeTargets"]} == {"up"}


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


def _panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel of the chart's dashboard (rows'
    panels too), Grafana's interval variables replaced as Grafana would."""
    path = layout.repo_root() / "charts" / "gtvp" / "files" / "dashboard.json"
    out = []
    panels = list(json.loads(path.read_text())["panels"])
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels") or [])
        for target in panel.get("targets") or []:
            expr = re.sub(r"\$\{?__(rate_)?interval\}?", "1m", str(target["expr"]))
            out.append((str(panel.get("title")), expr))
    return out


def _vm(name: str, level: int) -> dict[str, Any]:
    template = {
        "metadata": {"labels": {"gtvp.io/level": str(level)}},
        "spec": {
            "domain": {"devices": {}, "memory": {"guest": "128Mi"}},
            "evictionStrategy": "External",
        },
    }
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "labels": {"gtvp.io/level": str(level)}},
        "spec": {"running": True, "template": template},
    }


def _box(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "gtvp.io/v1alpha1",
        "kind": "LazyBox",
        "metadata": {"name": name},
        "spec": {
            "application": {"name": "nginx"},
            "dependencies": [{"name": "debian-minimal"}],
            "level": 2,
            "resources": {"cpu": "1", "memory": "512Mi"},
        },
    }


def _jsonpath(pool: Pool, kind: str, namespace: str, name: str, path: str) -> str:
    where = ["-n", namespace] if namespace else []
    out = pool.cp.kubectl("get", kind, name, *where, "-o", f"jsonpath={path}", check=False)
    return out.stdout.strip() if out.returncode == 0 else ""


def _query(prometheus: str, expr: str) -> list[float] | None:
    data = _api(prometheus, "query", query=expr)
    if data is None:
        return None
    return [float(r["value"][1]) for r in data.get("result") or []]


def _tamper_with_a_vm_and_a_box(pool: Pool, namespace: str) -> str:
    """A gated VM and a Lazy Box run; the VM's member is tampered with (quarantined, the VM
    evacuated). Returns the tampered member."""
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(_vm("vm", 2)))
    _apply(pool.cp, [_box("box")], "-n", namespace)
    host = wait_for(
        "the gated VM to run",
        lambda: _jsonpath(pool, "vmi", namespace, "vm", "{.status.nodeName}"),
        60,
    )
    wait_for(
        "the Lazy Box to run",
        lambda: _jsonpath(pool, "lazybox", namespace, "box", "{.status.phase}") == "Running",
        90,
    )
    pool.extend_pcr(host, 7, b"prometheus e2e")
    pool.wait_phase(host, "Untrusted", reason="PcrMismatch", timeout=30)
    wait_for(
        "the gated VM to be evacuated",
        lambda: _jsonpath(pool, "vmi", namespace, "vm", "{.status.nodeName}") not in ("", host),
        60,
    )
    return host


def test_every_dashboard_panel_returns_data_after_a_tamper(
    pool: Pool, prometheus: str, namespace: str
) -> None:
    assert wait_for("Prometheus to scrape", lambda: _query(prometheus, "up == 1"), 60)
    host = _tamper_with_a_vm_and_a_box(pool, namespace)
    expiry = f'gtvp_member_verdict_expiry_timestamp_seconds{{member="{host}"}}'
    wait_for(
        "the tampered member's verdict expiry to go", lambda: _query(prometheus, expiry) == [], 30
    )
    queries = _panel_queries()
    assert len(queries) >= 12

    def empty() -> list[str]:
        missing = []
        for title, expr in queries:
            values = _query(prometheus, expr)
            if not values or any(math.isnan(v) for v in values):
                missing.append(f"{title}: {expr} -> {values}")
        return missing

    wait_for("every panel to return data", lambda: not empty(), 60)
    assert not empty()
    evacuations = 'sum(increase(gtvp_evacuation_migrations_total{state="started"}[15m]))'
    assert (_query(prometheus, evacuations) or [0])[0] > 0
    pcr = 'sum(gtvp_attestations_total{result="failed",reason="PcrMismatch"})'
    assert (_query(prometheus, pcr) or [0])[0] > 0
    bad = 'sum(gtvp_component_verifications_total{result="failed",reason="BadSignature"})'
    assert (_query(prometheus, bad) or [0])[0] > 0

    def untrusted_agrees() -> bool:
        """The gauge counts what the Members say: the tampered one at least (under load
        another member's 6 s verdict may lapse too, and then both say so)."""
        phases = {m: _jsonpath(pool, "member", "", m, "{.status.phase}") for m in pool.tpms}
        said = sorted(m for m, p in phases.items() if p == "Untrusted")
        got = (_query(prometheus, 'sum(gtvp_members{phase="Untrusted"})') or [0])[0]
        return host in said and got == len(said)

    assert wait_for("gtvp_members to count the Untrusted members", untrusted_agrees, 30)


def test_build_info_process_metrics_verdict_expiry_and_no_created_series(
    pool: Pool, prometheus: str
) -> None:
    assert wait_for("Prometheus to scrape", lambda: _query(prometheus, "gtvp_build_info"), 60)
    assert _query(prometheus, "process_resident_memory_bytes")
    assert _query(prometheus, "process_cpu_seconds_total")
    assert _query(prometheus, 'count({__name__=~".+_created"})') == []
    expiry = _api(prometheus, "query", query="gtvp_member_verdict_expiry_timestamp_seconds")
    by_member = {r["metric"]["member"]: float(r["value"][1]) for r in expiry["result"]}
    trusted = {
        m for m in pool.tpms if _jsonpath(pool, "member", "", m, "{.status.phase}") == "Trusted"
    }
    assert trusted
    assert trusted <= set(by_member)
    now = float(_api(prometheus, "query", query="time()")["result"][1])
    assert all(now - 10 < by_member[m] < now + 60 for m in trusted)
