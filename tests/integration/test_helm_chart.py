"""The Helm chart: linted and rendered by the real helm, accepted by the real API server,
and in step with the manifests the tests run against; its alerts checked by promtool."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from gtvp import http_endpoints, webhook_config
from gtvp.http_endpoints import Probe
from gtvp_local import pki, toolchain
from gtvp_local.controlplane import ADMIN, ControlPlane, Identity
from gtvp_local.processes import free_port
from tests.samples import sample_policy

pytestmark = pytest.mark.controlplane

CHART = Path(__file__).parents[2] / "charts" / "gtvp"
REPO = Path(__file__).parents[2]


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(toolchain.binaries().helm), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@contextmanager
def _values_args(values: dict[str, Any] | None) -> Iterator[tuple[str, ...]]:
    """`--values <file>` for these values (none for None), the file kept while in use."""
    if values is None:
        yield ()
        return
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        yield ("--values", str(path))


def _template(
    *sets: str,
    namespace: str = "gtvp-system",
    api_versions: Sequence[str] = (),
    values: dict[str, Any] | None = None,
    kubeconfig: Path | None = None,
    upgrade: bool = False,
    release: str = "gtvp",
) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart as release `release`; values go through a values file,
    a kubeconfig makes it render against that API server (--dry-run=server: the chart's
    lookups see live objects); `upgrade`: rendered as for an upgrade (else an install)."""
    server: tuple[str, ...] = ("--is-upgrade",) if upgrade else ()
    if kubeconfig is not None:
        server += ("--dry-run=server", "--kubeconfig", str(kubeconfig))
    with _values_args(values) as values_args:
        return _helm(
            "template",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "--kube-version",
            "v1.36.3",
            *server,
            *values_args,
            *(a for s in sets for a in ("--set", s)),
            *(a for v in api_versions for a in ("--api-versions", v)),
        )


def _render(*sets: str, **options: Any) -> list[dict[str, Any]]:
    """The documents `_template(*sets, **options)` renders (it must render)."""
    out = _template(*sets, **options)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _refused(*sets: str, **options: Any) -> str:
    """What `helm template` says when it refuses these values (it must refuse them)."""
    out = _template(*sets, **options)
    assert out.returncode != 0, f"rendered with {sets} {options}"
    return out.stderr


def _lints(values: dict[str, Any] | None = None) -> None:
    """`helm lint --strict` passes, with these values if any."""
    with _values_args(values) as values_args:
        out = _helm("lint", str(CHART), "--kube-version", "v1.36.3", "--strict", *values_args)
    assert out.returncode == 0, out.stdout + out.stderr


def _dry_run_apply(
    control_plane: ControlPlane, docs: list[dict[str, Any]]
) -> subprocess.CompletedProcess[str]:
    """Server-side apply of these documents, as a dry run (nothing is stored), with the
    release's namespace in place."""
    control_plane.kubectl("create", "namespace", "gtvp-system", check=False)
    return control_plane.kubectl(
        "apply",
        "--dry-run=server",
        "--server-side",
        "--force-conflicts",
        "-f",
        "-",
        input_text="\n---\n".join(json.dumps(d) for d in docs),
        check=False,
    )


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


def _operator(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(docs, "Deployment", "gtvp-operator")


def test_chart_lints(control_plane: ControlPlane) -> None:
    _lints()


def test_template_and_lint_need_no_kube_version() -> None:
    """helm is built knowing the Kubernetes version it links (toolchain's ldflags), so a
    newcomer's plain `helm template`/`helm lint` meet the chart's kubeVersion (>= 1.30)."""
    out = _helm("template", "gtvp", str(CHART))
    assert out.returncode == 0, out.stderr
    assert "kind: Deployment" in out.stdout
    out = _helm("lint", str(CHART))
    assert out.returncode == 0, out.stdout + out.stderr


def test_bad_values_are_refused_by_the_schema(control_plane: ControlPlane) -> None:
    out = _helm("template", "gtvp", str(CHART), "--set", "agent.ekType=dsa")
    assert out.returncode != 0
    assert "ekType" in out.stderr


def test_rendered_chart_is_accepted_by_the_api_server(control_plane: ControlPlane) -> None:
    docs = _render()
    out = _dry_run_apply(control_plane, docs)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("(server dry run)") == len(docs)


def test_the_longest_release_name_helm_allows_renders_objects_the_api_server_takes(
    control_plane: ControlPlane,
) -> None:
    release = "r" * 53  # helm refuses longer release names
    docs = _render(release=release, upgrade=True)
    out = _dry_run_apply(control_plane, docs)
    assert out.returncode == 0, out.stderr
    job = _one(docs, "Job")
    assert job["metadata"]["name"].startswith("r" * 40)  # which release it checks, readable
    assert len(job["metadata"]["name"]) <= 63  # the job controller labels its pods with it


def test_chart_crds_and_access_rules_match_the_repositorys(control_plane: ControlPlane) -> None:
    for name in ("member.yaml", "securitypolicy.yaml", "oscomponent.yaml", "lazybox.yaml"):
        assert (CHART / "files" / "crds" / name).read_text() == (REPO / "crds" / name).read_text()
    manifests = REPO / "operator" / "gtvp" / "manifests"
    for name in ("rbac.yaml", "agent-vap.yaml", "webhook-conditions.yaml"):
        assert (CHART / "files" / name).read_text() == (manifests / name).read_text()


def test_gates_fail_closed_and_agents_survive_their_own_taint(control_plane: ControlPlane) -> None:
    docs = _render()
    hooks = [
        h
        for d in docs
        if d["kind"].endswith("WebhookConfiguration")
        and d["metadata"]["name"] != webhook_config.POLICY_CONFIGURATION  # not a gate
        for h in d["webhooks"]
    ]
    assert len(hooks) == len(webhook_config.MUTATING) + len(webhook_config.VALIDATING)
    assert all(h["failurePolicy"] == "Fail" for h in hooks)
    agent = next(d for d in docs if d["kind"] == "DaemonSet")
    tolerations = agent["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "gtvp.io/untrusted", "operator": "Exists"} in tolerations
    assert "NoExecute" not in json.dumps(docs)
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    assert all(d["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for d in crds)
    # admission requests reach only an operator that has loaded the pool (its /readyz)
    operator = next(d for d in docs if d["kind"] == "Deployment")
    container = operator["spec"]["template"]["spec"]["containers"][0]
    # asked inside the container on the loopback-only probe port, which no client on the
    # network (a VM at the HTTPS port, a flood of slow connections) can reach
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert "httpGet" not in container[probe]
        assert _probe_asks(container[probe]) == (9091, path)
    assert "--probe-port=9091" in container["args"]
    assert {"name": "metrics", "containerPort": 9090} in container["ports"]
    assert all(p["containerPort"] != 9091 for p in container["ports"])
    dashboard = next(d for d in docs if d["kind"] == "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    panels = json.loads(dashboard["data"]["gtvp.json"])["panels"]
    exported = (
        "gtvp_members",
        "gtvp_attestations_total",
        "gtvp_verification_seconds_bucket",
        "gtvp_admission_decisions_total",
        "gtvp_evacuation_migrations_total",
        "gtvp_lazyboxes",
        "gtvp_lazybox_placement_cached_ratio_bucket",
        "gtvp_component_verifications_total",
        "gtvp_members_overloaded",
        "gtvp_balancing_migrations_total",
    )
    for panel in panels:
        for target in panel["targets"]:
            assert any(m in target["expr"] for m in exported), target["expr"]


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A webhook configuration without where it is served and how long it may take."""
    return {
        "kind": config["kind"],
        "webhooks": [
            {k: v for k, v in h.items() if k not in ("clientConfig", "timeoutSeconds")}
            for h in config["webhooks"]
        ],
    }


def test_chart_webhooks_are_the_ones_the_tests_run_against(control_plane: ControlPlane) -> None:
    """Same hooks, rules, namespace exclusions and matchConditions as gtvp.webhook_config."""

    def gating(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            d
            for d in docs
            if d["kind"].endswith("WebhookConfiguration") and d["metadata"]["name"] == "gtvp"
        ]

    rendered = gating(_render())
    local = gating(webhook_config.webhook_configurations("https://x", b"ca"))
    assert len(rendered) == 2
    assert [_comparable(d) for d in rendered] == [_comparable(d) for d in local]
    for hook in (h for d in rendered for h in d["webhooks"]):
        assert hook["clientConfig"]["service"]["namespace"] == "gtvp-system"
        if hook["rules"][0]["apiGroups"] != ["kubevirt.io"]:
            continue
        excluded = hook["namespaceSelector"]["matchExpressions"][0]
        assert excluded["operator"] == "NotIn"
        assert excluded["values"] == ["kube-system"]  # the release's namespace is gated too
        if "migration" in hook["name"]:
            assert "matchConditions" not in hook  # the migrated VMI's level is only known to gtvp
        else:
            assert any(c["name"].startswith("gated-") for c in hook["matchConditions"])


def test_policy_webhook_refuses_early_but_never_blocks_policy_edits(
    control_plane: ControlPlane,
) -> None:
    """The SecurityPolicy hook is Ignore: an unusable policy that gets in anyway never
    replaces the last accepted one, so a down operator must not block editing the policy."""
    configs = [d for d in _render() if d["kind"] == "ValidatingWebhookConfiguration"]
    policy = next(d for d in configs if d["metadata"]["name"] == "gtvp-securitypolicy")
    (hook,) = policy["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["clientConfig"]["service"]["path"] == f"/{webhook_config.POLICY_HOOK}"
    assert hook["rules"] == [
        {
            "apiGroups": ["gtvp.io"],
            "apiVersions": ["v1alpha1"],
            "resources": ["securitypolicies"],
            "operations": ["CREATE", "UPDATE"],
            "scope": "Cluster",
        }
    ]
    rbac = [d for d in _render() if d["kind"] == "ClusterRole"]
    operator = next(d for d in rbac if d["metadata"]["name"] == "gtvp-operator")
    allowed = {
        (r, v) for rule in operator["rules"] for r in rule["resources"] for v in rule["verbs"]
    }
    assert {("securitypolicies/status", "patch"), ("events", "create")} <= allowed
    # what an administrator writes stays the administrator's: no spec of gtvp's objects
    for plural in ("securitypolicies", "oscomponents", "lazyboxes", "members"):
        assert (plural, "patch") not in allowed
        assert (plural, "update") not in allowed
    assert ("members", "create") in allowed


def test_each_account_is_granted_the_verbs_its_code_calls_and_no_more() -> None:
    """Found by a review of the chart's RBAC: verbs granted that no code calls. Statuses are
    patched (a box's also replaced; get on the subresource shows nothing more than get on
    the object, and kubectl's patch of a subresource reads it first); events only through
    the core API; the one namespace read is kube-system (the tokens' issuer)."""
    docs = _render()
    operator = _one(docs, "ClusterRole", "gtvp-operator")["rules"]
    agent = _one(docs, "ClusterRole", "gtvp-agent")["rules"]

    def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
        return {
            (group, resource, verb, ",".join(rule.get("resourceNames") or ()))
            for rule in rules
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }

    ops, ags = grants(operator), grants(agent)
    assert {v for g, r, v, _ in ags if r == "members/status"} == {"get", "patch"}
    for plural in ("members", "securitypolicies", "oscomponents"):
        assert {v for g, r, v, _ in ops if r == f"{plural}/status"} == {"get", "patch"}
    assert {v for g, r, v, _ in ops if r == "lazyboxes/status"} == {"get", "patch", "update"}
    assert not [g for g, r, _, _ in ops if g == "events.k8s.io"]
    assert {(v, names) for g, r, v, names in ops if r == "namespaces"} == {("get", "kube-system")}


def test_key_release_may_not_bind_kube_system_or_gtvps_own_namespace() -> None:
    """A RoleBinding there would give gtvp every Secret of it (bootstrap tokens; its own
    webhook key and verdict signing key), and no gated VM runs there (found by a review)."""
    said = _refused("keyRelease.namespaces={tenants,kube-system}")
    assert "keyRelease.namespaces may not name kube-system" in said
    said = _refused("keyRelease.namespaces={gtvp-system}", namespace="gtvp-system")
    assert "keyRelease.namespaces may not name gtvp-system" in said
    bound = _render("keyRelease.namespaces={tenants}", namespace="gtvp-system")
    assert [d["metadata"]["namespace"] for d in bound if d["kind"] == "RoleBinding"
            and d["metadata"]["name"] == "gtvp-key-release"] == ["tenants"]  # fmt: skip


def _ha_alert_tests(by_name: dict[str, Any]) -> list[dict[str, Any]]:
    """Three replicas: one dies holding 21 shards and the leadership; nobody takes over."""
    replicas = [
        {"series": f'gtvp_shards_held{{pod="op-{i}"}}', "values": v}
        for i, v in enumerate(("22x10", "21x10", "21 21 0x8"))
    ]
    leader = [
        {"series": 'gtvp_leader{pod="op-0"}', "values": "0x10"},
        {"series": 'gtvp_leader{pod="op-2"}', "values": "1 1 0x8"},
    ]

    def fired(name: str, summary: str) -> dict[str, Any]:
        annotations = {**by_name[name]["annotations"], "summary": summary}
        return {"exp_labels": {"severity": "critical"}, "exp_annotations": annotations}

    return [
        {
            "interval": "1m",
            "input_series": replicas + leader,
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "GtvpShardsWithoutWriter", "exp_alerts": []},
                {"eval_time": "1m", "alertname": "GtvpNoLeader", "exp_alerts": []},
                {
                    "eval_time": "6m",
                    "alertname": "GtvpShardsWithoutWriter",
                    "exp_alerts": [
                        fired(
                            "GtvpShardsWithoutWriter",
                            "Only 43 of 64 member shards have a writer: their members get "
                            "no new verdicts",
                        )
                    ],
                },
                {
                    "eval_time": "6m",
                    "alertname": "GtvpNoLeader",
                    "exp_alerts": [
                        fired(
                            "GtvpNoLeader",
                            by_name["GtvpNoLeader"]["annotations"]["summary"],
                        )
                    ],
                },
            ],
        }
    ]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus)")
def test_alerts_pass_promtool_and_fire(tmp_path: Path) -> None:
    rule = next(
        d
        for d in _render("monitoring.prometheusRule.enabled=true", api_versions=(_RULE_API,))
        if d["kind"] == "PrometheusRule"
    )
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rule["spec"]))
    check = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    for r in rule["spec"]["groups"][0]["rules"]:
        assert r["annotations"]["runbook_url"].startswith("https://")
    by_name = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    test = tmp_path / "test.yaml"
    test.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(rules)],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": [
                            {
                                "series": 'gtvp_members{phase="Untrusted",level="0"}',
                                "values": "1x5",
                            },
                            {"series": 'gtvp_members{phase="Trusted",level="2"}', "values": "2x5"},
                        ],
                        "alert_rule_test": [
                            {
                                "eval_time": "3m",
                                "alertname": "GtvpMemberUntrusted",
                                "exp_alerts": [
                                    {
                                        "exp_labels": {"severity": "warning", "phase": "Untrusted"},
                                        "exp_annotations": {
                                            "summary": "1 gtvp member(s) are Untrusted",
                                            "description": rule["spec"]["groups"][0]["rules"][0][
                                                "annotations"
                                            ]["description"],
                                            "runbook_url": rule["spec"]["groups"][0]["rules"][0][
                                                "annotations"
                                            ]["runbook_url"],
                                        },
                                    }
                                ],
                            },
                            {
                                "eval_time": "3m",
                                "alertname": "GtvpNoTrustedMembers",
                                "exp_alerts": [],
                            },
                        ],
                    },
                    {
                        "interval": "1m",
                        "input_series": [
                            {"series": 'gtvp_lazyboxes{phase="Failed"}', "values": "1x10"},
                        ],
                        "alert_rule_test": [
                            {"eval_time": "3m", "alertname": "GtvpLazyBoxFailed", "exp_alerts": []},
                            {
                                "eval_time": "7m",
                                "alertname": "GtvpLazyBoxFailed",
                                "exp_alerts": [
                                    {
                                        "exp_labels": {"severity": "warning"},
                                        "exp_annotations": {
                                            **by_name["GtvpLazyBoxFailed"]["annotations"],
                                            "summary": "1 Lazy Box(es) cannot be assembled",
                                        },
                                    }
                                ],
                            },
                        ],
                    },
                    {
                        "interval": "1m",
                        "input_series": [
                            {"series": "gtvp_members_overloaded", "values": "0 0 2x30"},
                        ],
                        "alert_rule_test": [
                            {
                                "eval_time": "10m",
                                "alertname": "GtvpMembersOverloaded",
                                "exp_alerts": [],
                            },
                            {
                                "eval_time": "20m",
                                "alertname": "GtvpMembersOverloaded",
                                "exp_alerts": [
                                    {
                                        "exp_labels": {"severity": "warning"},
                                        "exp_annotations": {
                                            **by_name["GtvpMembersOverloaded"]["annotations"],
                                            "summary": "2 trusted member(s) stay above the "
                                            "balancing high watermark",
                                        },
                                    }
                                ],
                            },
                        ],
                    },
                    *_ha_alert_tests(by_name),
                    {
                        "interval": "1m",
                        "input_series": [{"series": "gtvp_drain_waiting", "values": "0 1x30"}],
                        "alert_rule_test": [
                            {"eval_time": "10m", "alertname": "GtvpDrainBlocked", "exp_alerts": []},
                            {
                                "eval_time": "20m",
                                "alertname": "GtvpDrainBlocked",
                                "exp_alerts": [
                                    {
                                        "exp_labels": {"severity": "warning"},
                                        "exp_annotations": {
                                            **by_name["GtvpDrainBlocked"]["annotations"],
                                            "summary": "1 VM(s) hold up a node drain: no "
                                            "trusted member can take them",
                                        },
                                    }
                                ],
                            },
                        ],
                    },
                ],
            }
        )
    )
    run = subprocess.run(
        ["promtool", "test", "rules", str(test)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_operator_runs_off_the_nodes_that_host_tenant_vms(
    control_plane: ControlPlane,
) -> None:
    """Its token can write verdicts: never on a pool member running VMs by default (root
    there could read it), every replica of it alike."""
    pod = _operator(_render())["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"node-role.kubernetes.io/control-plane": ""}
    assert {
        "key": "node-role.kubernetes.io/control-plane",
        "operator": "Exists",
        "effect": "NoSchedule",
    } in pod["tolerations"]


# ----- high availability: replicas sharing the pool through Leases (issue #12) ---------------


def test_three_replicas_on_different_nodes_replaced_one_at_a_time(
    control_plane: ControlPlane,
) -> None:
    """A fail-closed webhook needs more than one replica: three by default, kept apart by
    node, rolled one at a time (never fewer than two Ready, never a fourth pod that would
    not fit beside three on three control-plane nodes)."""
    deployment = _operator(_render())
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }
    selector = deployment["spec"]["selector"]["matchLabels"]
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti == {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 100,
                "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": selector},
                },
            }
        ]
    }
    required = _operator(_render("operator.antiAffinity=required"))
    assert required["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"] == {
        "requiredDuringSchedulingIgnoredDuringExecution": [
            {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": selector}}
        ]
    }
    assert "antiAffinity" in _refused("operator.antiAffinity=sometimes")
    assert "replicas" in _refused("operator.replicas=0")
    five = _operator(_render("operator.replicas=5"))
    assert five["spec"]["replicas"] == 5


def test_a_disruption_budget_keeps_two_operator_replicas_through_drains(
    control_plane: ControlPlane,
) -> None:
    """policy/v1, minAvailable 2, selecting exactly the operator's pods: the Deployment's
    selector, which its pods carry and the agents' do not."""
    docs = _render()
    deployment = _operator(docs)
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["metadata"]["namespace"] == "gtvp-system"
    assert pdb["spec"]["minAvailable"] == 2
    selector = pdb["spec"]["selector"]
    assert selector == deployment["spec"]["selector"]
    assert (
        selector["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    agent_labels = _one(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert not selector["matchLabels"].items() <= agent_labels.items()
    # the webhook Service reaches the same pods
    assert _one(docs, "Service")["spec"]["selector"] == selector["matchLabels"]
    # a replica that is not Ready answers nothing: evicting it must not hold up a drain
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert (
        _one(_render("operator.podDisruptionBudget.minAvailable=1"), "PodDisruptionBudget")["spec"][
            "minAvailable"
        ]
        == 1
    )


def test_a_single_replica_gets_no_budget_that_would_block_drains(
    control_plane: ControlPlane,
) -> None:
    """One replica: no PodDisruptionBudget (one keeping its only pod would block every drain
    of its node), and its replacement starts before it stops."""
    docs = _render("operator.replicas=1")
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    deployment = _operator(docs)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}


def test_a_budget_that_needs_every_replica_is_refused(control_plane: ControlPlane) -> None:
    """minAvailable 2 of 2 replicas would keep every node running one from being drained."""
    said = _refused("operator.replicas=2")
    assert "operator.podDisruptionBudget.minAvailable (2) must be less than" in said
    assert "operator.replicas (2)" in said
    assert "set it to at most 1" in said
    pdb = _one(
        _render("operator.replicas=2", "operator.podDisruptionBudget.minAvailable=1"),
        "PodDisruptionBudget",
    )
    assert pdb["spec"]["minAvailable"] == 1


def test_the_webhooks_answer_only_the_api_servers_certificate_when_asked(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """webhooks.clientAuth: the operator gets the client CA (a ConfigMap: a CA is public) and
    the names; a new CA rolls the replicas; values that could not work are refused."""
    plain = _operator(_render())
    assert not any(
        "--webhook-client" in a for a in plain["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert not [d for d in _render() if d["metadata"]["name"].endswith("webhook-client-ca")]
    ca = control_plane.webhook_client_ca.read_text()
    asked = {"enabled": True, "caBundle": ca, "commonNames": ["apiserver-a", "apiserver-b"]}
    docs = _render(values={"webhooks": {"clientAuth": asked}})
    operator = _operator(docs)
    pod = operator["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert "--webhook-client-ca=/webhook-client/ca.crt" in args
    assert {"--webhook-client-name=apiserver-a", "--webhook-client-name=apiserver-b"} <= set(args)
    assert {"name": "webhook-client-ca", "mountPath": "/webhook-client", "readOnly": True} in pod[
        "containers"
    ][0]["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "webhook-client-ca"]
    config_map = _one(docs, "ConfigMap", volume["configMap"]["name"])
    assert config_map["data"]["ca.crt"] == ca
    assert _dry_run_apply(control_plane, docs).returncode == 0
    # a new CA is a new ConfigMap (the pods roll; the old ReplicaSet keeps reading the old CA)
    other = pki.ensure_ca(tmp_path, "another-ca")
    rolled = _operator(
        _render(values={"webhooks": {"clientAuth": {**asked, "caBundle": other.cert.read_text()}}})
    )
    (moved,) = [
        v for v in rolled["spec"]["template"]["spec"]["volumes"] if v["name"] == volume["name"]
    ]
    assert moved["configMap"]["name"] != volume["configMap"]["name"]
    # a name is one argument, whatever it holds
    odd = {**asked, "commonNames": ["a: b", "api #1"]}
    odd_args = _operator(_render(values={"webhooks": {"clientAuth": odd}}))["spec"]["template"][
        "spec"
    ]["containers"][0]["args"]
    assert {"--webhook-client-name=a: b", "--webhook-client-name=api #1"} <= set(odd_args)
    no_ca = _refused(values={"webhooks": {"clientAuth": {"enabled": True, "commonNames": ["a"]}}})
    assert "webhooks.clientAuth.enabled needs webhooks.clientAuth.caBundle" in no_ca
    no_name = _refused(values={"webhooks": {"clientAuth": {"enabled": True, "caBundle": ca}}})
    assert "webhooks.clientAuth.enabled needs webhooks.clientAuth.commonNames" in no_name
    with_key = {**asked, "caBundle": ca + other.key.read_text()}
    leaked = _refused(values={"webhooks": {"clientAuth": with_key}})
    assert "webhooks.clientAuth.caBundle holds a private key" in leaked
    # `helm upgrade --reuse-values` from a chart without the value renders (off, with the warning)
    reused = _template("webhooks.clientAuth=null")
    assert reused.returncode == 0, reused.stderr


def test_the_operator_runs_above_ordinary_workloads(control_plane: ControlPlane) -> None:
    """A preempted operator refuses every gated VM: a PriorityClass the chart creates, or one
    that exists already (then the chart creates none)."""
    docs = _render()
    pod = _operator(docs)["spec"]["template"]["spec"]
    created = _one(docs, "PriorityClass")
    assert pod["priorityClassName"] == created["metadata"]["name"] == "gtvp-gtvp-operator"
    assert created["value"] == 1000000
    assert created["globalDefault"] is False

    existing = _render("operator.priorityClassName=system-cluster-critical")
    assert not [d for d in existing if d["kind"] == "PriorityClass"]
    assert _operator(existing)["spec"]["template"]["spec"]["priorityClassName"] == (
        "system-cluster-critical"
    )

    none = _render("operator.priorityClass.create=false")
    assert not [d for d in none if d["kind"] == "PriorityClass"]
    assert "priorityClassName" not in _operator(none)["spec"]["template"]["spec"]


def _lease_rules(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        r
        for r in rules
        if {"coordination.k8s.io", "*"} & set(r.get("apiGroups", []))
        and {"leases", "*"} & set(r.get("resources", []))
    ]


def test_replicas_may_use_leases_in_their_own_namespace_only(
    control_plane: ControlPlane, namespace: str
) -> None:
    """A Role in the release's namespace (the one the replicas are told to use), bound to
    the operator's service account; no cluster-wide Lease rights. Checked by the real API
    server's authorizer, not only by reading the render."""
    docs = _render(namespace=namespace)
    role = _one(docs, "Role", "gtvp-operator-leases")
    assert role["metadata"]["namespace"] == namespace
    assert _lease_rules(role["rules"]) == role["rules"]
    assert [sorted(r["verbs"]) for r in role["rules"]] == [
        sorted(["list", "create", "update", "delete"])
    ]
    binding = _one(docs, "RoleBinding", "gtvp-operator-leases")
    assert binding["metadata"]["namespace"] == namespace
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "gtvp-operator-leases",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "gtvp-operator", "namespace": namespace}
    ]
    for cluster_role in (d for d in docs if d["kind"] == "ClusterRole"):
        assert not _lease_rules(cluster_role["rules"]), cluster_role["metadata"]["name"]
    # the same rights the local pool's operators get (manifests/local-bindings.yaml)
    local = yaml.safe_load_all((REPO / "operator/gtvp/manifests/local-bindings.yaml").read_text())
    assert role["rules"] == _one([d for d in local if d], "Role", "gtvp-operator-leases")["rules"]
    env = _operator(docs)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {
        "name": "GTVP_LEASE_NAMESPACE",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    } in env

    control_plane.kubectl(
        "apply", "-f", "-", input_text="\n---\n".join(json.dumps(d) for d in (role, binding))
    )
    operator_sa = f"system:serviceaccount:{namespace}:gtvp-operator"
    try:

        def can(verb: str, where: str) -> bool:
            out = control_plane.kubectl(
                "auth",
                "can-i",
                verb,
                "leases.coordination.k8s.io",
                *where.split(),
                f"--as={operator_sa}",
                check=False,
            )
            return out.stdout.strip() == "yes"

        for verb in ("list", "create", "update", "delete"):
            assert can(verb, f"-n {namespace}"), verb
        for verb in ("get", "watch", "patch"):  # never called (kube.py lists, then writes)
            assert not can(verb, f"-n {namespace}"), verb
        assert not can("update", "-n kube-system")
        assert not can("list", "--all-namespaces")
    finally:
        control_plane.kubectl(
            "delete", "role,rolebinding", "gtvp-operator-leases", "-n", namespace, check=False
        )


def test_each_replica_is_named_by_its_pod_in_the_leases(control_plane: ControlPlane) -> None:
    """Replica identity = pod name (unique, and a restarted pod is a new replica); the lease
    timing and the shutdown grace come from the values; the pod is given longer than the
    grace to hand its Leases back."""
    container = _operator(_render())["spec"]["template"]["spec"]["containers"][0]
    assert {
        "name": "GTVP_IDENTITY",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    } in container["env"]
    args = container["args"]
    assert "--identity=$(GTVP_IDENTITY)" in args
    assert "--lease-namespace=$(GTVP_LEASE_NAMESPACE)" in args
    for flag in ("--lease-duration=15", "--renew-deadline=10", "--retry-period=2"):
        assert flag in args
    assert "--shutdown-grace=5" in args
    assert _probe_asks(container["readinessProbe"])[1] == "/readyz"

    tuned = _operator(
        _render(
            "operator.leases.duration=30",
            "operator.leases.renewDeadline=20",
            "operator.leases.retryPeriod=3",
            "operator.shutdownGraceSeconds=10",
            "operator.terminationGracePeriodSeconds=40",
        )
    )
    pod = tuned["spec"]["template"]["spec"]
    for flag in (
        "--lease-duration=30",
        "--renew-deadline=20",
        "--retry-period=3",
        "--shutdown-grace=10",
    ):
        assert flag in pod["containers"][0]["args"]
    assert pod["terminationGracePeriodSeconds"] == 40
    assert _operator(_render())["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 5


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param(
            ["operator.leases.renewDeadline=15"],
            "operator.leases.renewDeadline (15) must be less than operator.leases.duration (15)",
            id="renew-deadline-not-below-duration",
        ),
        pytest.param(
            ["operator.leases.duration=8"],
            "operator.leases.renewDeadline (10) must be less than operator.leases.duration (8)",
            id="duration-below-renew-deadline",
        ),
        pytest.param(
            ["operator.leases.retryPeriod=10"],
            "operator.leases.retryPeriod (10) must be less than operator.leases.renewDeadline (10)",
            id="retry-period-not-below-renew-deadline",
        ),
        pytest.param(
            ["operator.shutdownGraceSeconds=30"],
            "operator.terminationGracePeriodSeconds (30) must be at least "
            "operator.shutdownGraceSeconds (30) + 5",
            id="no-time-to-hand-leases-back",
        ),
        pytest.param(
            ["operator.leases.retryPeriod=0"],
            "/operator/leases/retryPeriod",
            id="schema-whole-seconds-from-1",
        ),
    ],
)
def test_lease_timing_that_cannot_fence_is_refused(
    control_plane: ControlPlane, values: list[str], message: str
) -> None:
    """A holder must stop writing before its Lease can be taken (renew deadline < duration),
    get more than one try to renew (retry period < renew deadline), and get time to hand its
    Leases back after the shutdown grace; `helm template` says which value to change."""
    assert message in _refused(*values)


def test_an_upgrade_from_the_single_writer_operator_stops_it_before_starting_replicas(
    control_plane: ControlPlane, namespace: str
) -> None:
    """The operator from before the Leases writes for every member: rolled like a replica,
    it would run beside the new ones (two writers, competing nonces). Over such a
    Deployment the chart recreates once; over its own, it rolls."""

    def strategy_over_the_live_deployment() -> dict[str, Any]:
        # the kubeconfig lets the chart look the live Deployment up
        docs = _render(namespace=namespace, kubeconfig=control_plane.kubeconfig_for(ADMIN))
        strategy: dict[str, Any] = _operator(docs)["spec"]["strategy"]
        return strategy

    single_writer = _operator(_render(namespace=namespace))
    single_writer["metadata"].pop("annotations", None)  # the old chart set none
    single_writer["spec"].update(replicas=1, strategy={"type": "Recreate"})
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(single_writer))
    try:
        assert strategy_over_the_live_deployment() == {"type": "Recreate"}
        control_plane.kubectl(
            "annotate",
            "deployment",
            "gtvp-operator",
            "-n",
            namespace,
            "gtvp.io/replicas-share-leases=true",
        )
        assert strategy_over_the_live_deployment()["type"] == "RollingUpdate"
    finally:
        control_plane.kubectl("delete", "deployment", "gtvp-operator", "-n", namespace)


def test_the_highly_available_operator_is_accepted_by_the_api_server(
    control_plane: ControlPlane,
) -> None:
    """The budget, the priority class, the Lease Role and the anti-affinity (both kinds) as
    the real API server validates them."""
    for sets in ((), ("operator.antiAffinity=required",)):
        out = _dry_run_apply(control_plane, _render(*sets))
        assert out.returncode == 0, out.stderr
        for applied in (
            "poddisruptionbudget.policy/gtvp-operator",
            "priorityclass.scheduling.k8s.io/gtvp-gtvp-operator",
            "role.rbac.authorization.k8s.io/gtvp-operator-leases",
            "rolebinding.rbac.authorization.k8s.io/gtvp-operator-leases",
            "deployment.apps/gtvp-operator",
        ):
            assert f"{applied} serverside-applied (server dry run)" in out.stdout, out.stdout


def _policy_pair(name: str, rendered: list[dict[str, Any]]) -> tuple[Any, Any]:
    """The ValidatingAdmissionPolicy `name` as the chart renders it and as the local pool's
    copy (operator/gtvp/manifests/`name` less its gtvp- prefix, -vap.yaml) has it."""
    path = REPO / "operator" / "gtvp" / "manifests" / f"{name.removeprefix('gtvp-')}-vap.yaml"
    local = [d for d in yaml.safe_load_all(path.read_text()) if d]
    mine = [
        d
        for d in rendered
        if d["kind"].startswith("ValidatingAdmissionPolicy") and d["metadata"]["name"] == name
    ]
    assert {d["kind"] for d in mine} == {
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    chart_policy = next(d for d in mine if d["kind"] == "ValidatingAdmissionPolicy")
    local_policy = next(d for d in local if d["kind"] == "ValidatingAdmissionPolicy")
    return chart_policy, local_policy


def test_chart_reserves_gtvps_migration_labels_as_the_local_pool_does(
    control_plane: ControlPlane,
) -> None:
    """The same policy as operator/gtvp/manifests/migration-labels-vap.yaml, exempting the
    release's operator service account instead of the local pool's operator user."""
    chart_policy, local_policy = _policy_pair("gtvp-migration-labels", _render())
    assert chart_policy["spec"]["matchConditions"] == [
        {
            "name": "not-the-operator",
            "expression": "request.userInfo.username != "
            "'system:serviceaccount:gtvp-system:gtvp-operator'",
        }
    ]
    chart_policy["spec"]["matchConditions"] = local_policy["spec"]["matchConditions"]
    assert chart_policy["spec"] == local_policy["spec"]


@pytest.mark.parametrize("name", ["gtvp-node-trust-labels", "gtvp-status-writes"])
def test_chart_keeps_the_operators_own_policies_as_the_local_pool_does(
    control_plane: ControlPlane, name: str
) -> None:
    """The same policy as operator/gtvp/manifests/<name>-vap.yaml (Nodes' trust labels,
    gtvp's objects' status), exempting the release's operator service account instead of
    the local pool's operator identities, and for status writes the release's agent service
    account alone (no user named like a local pool's agent)."""
    chart_policy, local_policy = _policy_pair(name, _render())
    conditions = chart_policy["spec"]["matchConditions"]
    assert conditions[0]["expression"] == (
        "request.userInfo.username != 'system:serviceaccount:gtvp-system:gtvp-operator'"
    )
    chart_policy["spec"]["matchConditions"][0] = local_policy["spec"]["matchConditions"][0]
    if name == "gtvp-status-writes":
        cond = "not-an-agent-on-members"
        (agent,) = [c for c in conditions if c["name"] == cond]
        assert agent["expression"] == (
            "!(request.resource.resource == 'members' && "
            "request.userInfo.username == 'system:serviceaccount:gtvp-system:gtvp-agent')"
        )
        local = [c for c in local_policy["spec"]["matchConditions"] if c["name"] == cond]
        agent["expression"] = local[0]["expression"]
    assert chart_policy["spec"] == local_policy["spec"]


def test_chart_keeps_launcher_pods_kubevirts_as_the_local_pool_does(
    control_plane: ControlPlane,
) -> None:
    """The same policy as operator/gtvp/manifests/launcher-pods-vap.yaml, for KubeVirt's
    controller in kubevirt.namespace."""
    chart_policy, local_policy = _policy_pair(
        "gtvp-launcher-pods", _render("kubevirt.namespace=virt")
    )
    chart_cond = chart_policy["spec"]["matchConditions"][1]["expression"]
    assert "'system:serviceaccount:virt:kubevirt-controller'" in chart_cond
    local_cond = local_policy["spec"]["matchConditions"][1]["expression"]
    assert chart_cond.replace(":virt:", ":kubevirt:") == local_cond
    chart_policy["spec"]["matchConditions"] = local_policy["spec"]["matchConditions"]
    assert chart_policy["spec"] == local_policy["spec"]


def test_chart_keeps_vmi_status_kubevirts_as_the_local_pool_does(
    control_plane: ControlPlane,
) -> None:
    """The same policy as operator/gtvp/manifests/vmi-status-vap.yaml, for KubeVirt's
    service accounts in kubevirt.namespace."""
    chart_policy, local_policy = _policy_pair("gtvp-vmi-status", _render("kubevirt.namespace=virt"))
    chart_cond = chart_policy["spec"]["matchConditions"][0]["expression"]
    for account in ("controller", "handler", "apiserver", "synchronization-controller"):
        assert f"'system:serviceaccount:virt:kubevirt-{account}'" in chart_cond
    local_cond = local_policy["spec"]["matchConditions"][0]["expression"]
    assert chart_cond.replace(":virt:", ":kubevirt:") == local_cond
    chart_policy["spec"]["matchConditions"] = local_policy["spec"]["matchConditions"]
    assert chart_policy["spec"] == local_policy["spec"]


def test_chart_keeps_gtvps_migrations_from_deletion_as_the_local_pool_does(
    control_plane: ControlPlane,
) -> None:
    """The same policy as operator/gtvp/manifests/migration-deletion-vap.yaml, exempting the
    release's operator service account and KubeVirt's controllers in kubevirt.namespace."""
    chart_policy, local_policy = _policy_pair(
        "gtvp-migration-deletion", _render("kubevirt.namespace=virt")
    )
    conditions = chart_policy["spec"]["matchConditions"]
    assert conditions[0]["expression"] == (
        "request.userInfo.username != 'system:serviceaccount:gtvp-system:gtvp-operator'"
    )
    cleanup = conditions[1]["expression"]
    assert "'system:serviceaccount:virt:kubevirt-controller'" in cleanup
    assert "'system:serviceaccount:virt:kubevirt-synchronization-controller'" in cleanup
    local_conditions = local_policy["spec"]["matchConditions"]
    assert cleanup.replace(":virt:", ":kubevirt:") == local_conditions[1]["expression"]
    chart_policy["spec"]["matchConditions"] = local_conditions
    assert chart_policy["spec"] == local_policy["spec"]
    assert "/kubevirt/namespace" in _refused("kubevirt.namespace=Not_A_Namespace")


# ----- the chart as cert-manager and CloudNativePG users expect it (issue #13, section 4) -----

_RULE_API = "monitoring.coreos.com/v1/PrometheusRule"
_MONITOR_APIS = (
    _RULE_API,
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PodMonitor",
)

# every toggle and every optional value on: what a full render looks like
_ALL_ON: dict[str, Any] = {
    "imagePullSecrets": [{"name": "regcred"}],
    "operator": {
        "podLabels": {"team": "infra", "app.kubernetes.io/component": "not-the-operator"},
        "podAnnotations": {"example.com/owner": "infra"},
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
            }
        ],
        "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}},
    },
    "agent": {
        "podLabels": {"team": "infra"},
        "podAnnotations": {"example.com/owner": "infra"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "kubevirt.io/schedulable",
                                    "operator": "In",
                                    "values": ["true"],
                                }
                            ]
                        }
                    ]
                }
            }
        },
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "kubevirt"}],
        "resources": {"limits": {"cpu": "300m", "memory": "300Mi"}},
    },
    "monitoring": {
        "prometheusRule": {"enabled": True, "additionalLabels": {"release": "kps"}},
        "serviceMonitor": {
            "enabled": True,
            "additionalLabels": {"release": "kps"},
            "interval": "15s",
        },
        "podMonitor": {"enabled": True, "additionalLabels": {"release": "kps"}, "interval": "20s"},
        "bearerTokenSecret": {"name": "prometheus-gtvp-token", "key": "token"},
        "dashboards": {
            "enabled": True,
            "namespace": "grafana",
            "label": "grafana_dashboard",
            "labelValue": "gtvp",
            "annotations": {"grafana_folder": "gtvp"},
        },
    },
}


def _render_all_on() -> list[dict[str, Any]]:
    return _render(values=_ALL_ON, api_versions=_MONITOR_APIS)


def test_chart_lints_strictly_with_every_toggle_on(
    control_plane: ControlPlane,
) -> None:
    _lints(_ALL_ON)


def test_notes_say_what_was_installed_how_to_check_it_and_what_comes_next(
    control_plane: ControlPlane,
) -> None:
    """helm install prints NOTES.txt: the components, the readiness check for the operator
    replicas, the SecurityPolicy to apply, the docs; and a monitor it had to skip."""
    out = _helm(
        "install",
        "gtvp",
        str(CHART),
        "--namespace",
        "notes-ns",
        "--dry-run=client",
        "--take-ownership",  # of the CRDs earlier tests left on this API server (nothing applied)
        "--kubeconfig",
        str(control_plane.kubeconfig_for(ADMIN)),
        "--set",
        "monitoring.serviceMonitor.enabled=true",
    )
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert "Deployment gtvp-operator (3 replica(s))" in notes
    assert "DaemonSet gtvp-agent" in notes
    assert "kubectl -n notes-ns rollout status deployment/gtvp-operator" in notes
    assert "app.kubernetes.io/component=operator" in notes
    assert 'SecurityPolicy the operator enforces. It is named "default"' in notes
    assert "kubectl apply -f securitypolicy.yaml" in notes
    assert "https://github.com/gtvp/gtvp" in notes
    assert "docs/chart.md" in notes
    # this API server serves no monitoring.coreos.com: the enabled ServiceMonitor was skipped
    assert "ServiceMonitor is enabled but this cluster does not serve" in notes
    assert "PodMonitor is enabled" not in notes
    # webhooks.clientAuth is off by default: the notes say who can then call the webhooks
    assert "WARNING: the webhooks answer any caller" in notes


def test_every_object_carries_the_recommended_labels(
    control_plane: ControlPlane,
) -> None:
    """app.kubernetes.io/* on every document of a full render, ClusterRoles, admission
    policies, webhook configurations and CRDs included; podLabels never override them."""
    docs = _render_all_on()
    kinds = {d["kind"] for d in docs}
    assert {
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
        "PrometheusRule",
        "ServiceMonitor",
        "PodMonitor",
        "ConfigMap",
        "PriorityClass",
        "PodDisruptionBudget",
    } <= kinds
    objects = [(d["kind"], d["metadata"]) for d in docs]
    objects += [
        (d["kind"] + " pods", d["spec"]["template"]["metadata"])
        for d in docs
        if d["kind"] in ("Deployment", "DaemonSet", "Job")
    ]
    for kind, meta in objects:
        labels = meta.get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "gtvp", (
            kind,
            meta.get("name", ""),
        )
        assert labels.get("app.kubernetes.io/instance") == "gtvp", kind
        assert labels.get("app.kubernetes.io/version") == "0.1.0", kind
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", kind
        assert labels.get("app.kubernetes.io/part-of") == "gtvp", kind
        assert labels.get("app.kubernetes.io/component"), kind
    operator_pods = _operator(docs)["spec"]["template"]["metadata"]
    assert operator_pods["labels"]["app.kubernetes.io/component"] == "operator"
    assert operator_pods["labels"]["team"] == "infra"
    assert (
        _one(docs, "ClusterRole", "gtvp-agent")["metadata"]["labels"]["app.kubernetes.io/component"]
        == "agent"
    )


def test_monitoring_objects_only_where_prometheus_operator_serves_them(
    control_plane: ControlPlane,
) -> None:
    """PrometheusRule, ServiceMonitor and PodMonitor: each rendered when enabled and the
    cluster has its CRD, carrying additionalLabels (kube-prometheus-stack's selectors)."""
    sets = (
        "monitoring.prometheusRule.enabled=true",
        "monitoring.prometheusRule.additionalLabels.release=kps",
        "monitoring.serviceMonitor.enabled=true",
        "monitoring.serviceMonitor.additionalLabels.release=kps",
        "monitoring.serviceMonitor.interval=15s",
        "monitoring.podMonitor.enabled=true",
        "monitoring.podMonitor.additionalLabels.release=kps",
        "monitoring.bearerTokenSecret.name=prometheus-gtvp-token",
    )
    kinds = ("PrometheusRule", "ServiceMonitor", "PodMonitor")
    assert not [d for d in _render(*sets) if d["kind"] in kinds]  # no CRD, nothing to break
    assert not [
        d for d in _render(api_versions=_MONITOR_APIS) if d["kind"] in kinds
    ]  # off by default
    only_rules = _render(*sets, api_versions=(_RULE_API,))
    assert [d["kind"] for d in only_rules if d["kind"] in kinds] == ["PrometheusRule"]
    docs = _render(*sets, api_versions=_MONITOR_APIS)
    for kind in kinds:
        assert _one(docs, kind)["metadata"]["labels"]["release"] == "kps"
    service = _one(docs, "Service", "gtvp-webhooks")
    monitor = _one(docs, "ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["namespaceSelector"] == {"matchNames": ["gtvp-system"]}
    (endpoint,) = monitor["endpoints"]
    assert {k: endpoint[k] for k in ("port", "path", "interval")} == {
        "port": "metrics",
        "path": "/metrics",
        "interval": "15s",
    }
    pods = _one(docs, "PodMonitor")["spec"]
    pod_labels = _operator(docs)["spec"]["template"]["metadata"]["labels"]
    assert pods["selector"]["matchLabels"].items() <= pod_labels.items()
    (pod_endpoint,) = pods["podMetricsEndpoints"]
    assert {k: pod_endpoint[k] for k in ("port", "path", "interval")} == {
        "port": "metrics",
        "path": "/metrics",
        "interval": "30s",
    }
    assert "interval" in _refused("monitoring.serviceMonitor.interval=soon")


def test_pods_take_pull_secrets_labels_annotations_placement_and_resources(
    control_plane: ControlPlane,
) -> None:
    docs = _render_all_on()
    operator = _operator(docs)["spec"]["template"]
    agent = _one(docs, "DaemonSet")["spec"]["template"]
    check = _one(docs, "Job")["spec"]["template"]  # the pre-upgrade check: the same image
    assert check["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    for pod in (operator, agent):
        assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["metadata"]["annotations"]["example.com/owner"] == "infra"
        assert pod["metadata"]["labels"]["team"] == "infra"
    # the chart's own annotations stay
    assert operator["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    (spread,) = operator["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread["labelSelector"] == {
        "matchLabels": {
            "app.kubernetes.io/component": "operator",
            "app.kubernetes.io/instance": "gtvp",
        }
    }
    operator_resources = operator["spec"]["containers"][0]["resources"]
    assert operator_resources["requests"] == {"cpu": "200m", "memory": "256Mi"}
    agent_resources = agent["spec"]["containers"][0]["resources"]
    assert agent_resources["limits"] == {"cpu": "300m", "memory": "300Mi"}
    assert agent["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert agent["spec"]["affinity"] == _ALL_ON["agent"]["affinity"]
    # gtvp's own taint stays tolerated whatever agent.tolerations says
    tolerations = agent["spec"]["tolerations"]
    assert {"key": "gtvp.io/untrusted", "operator": "Exists"} in tolerations
    assert {"key": "dedicated", "operator": "Equal", "value": "kubevirt"} in tolerations


def test_agents_attest_tainted_nodes_by_default(control_plane: ControlPlane) -> None:
    """A KubeVirt node tainted for VMs only is still a pool member: by default the agent
    tolerates every taint; agent.tolerations=[] keeps only gtvp's own ones."""
    agent = _one(_render(), "DaemonSet")["spec"]["template"]["spec"]
    assert {"operator": "Exists"} in agent["tolerations"]
    assert agent["priorityClassName"] == "system-node-critical"
    assert "imagePullSecrets" not in agent
    narrow = _one(_render("agent.tolerations=null"), "DaemonSet")["spec"]["template"]["spec"]
    assert {"operator": "Exists"} not in narrow["tolerations"]
    assert {"key": "gtvp.io/untrusted", "operator": "Exists"} in narrow["tolerations"]


def test_unknown_values_are_refused(control_plane: ControlPlane) -> None:
    for bad in (
        "agent.tolerationz[0].operator=Exists",
        "operator.podLabelz.a=b",
        "monitoring.serviceMonitor.enabeld=true",
        "imagePullSecrets[0].nme=x",
    ):
        assert "additional properties" in _refused(bad).lower(), bad


def test_the_chart_with_every_toggle_on_is_accepted_by_the_api_server(
    control_plane: ControlPlane,
) -> None:
    docs = [
        d
        for d in _render_all_on()
        if d["apiVersion"] != "monitoring.coreos.com/v1"  # this API server has no such CRDs
    ]
    control_plane.kubectl("create", "namespace", "grafana", check=False)  # the dashboard's
    out = _dry_run_apply(control_plane, docs)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("(server dry run)") == len(docs)


# ----- metrics behind authentication, cert-manager, the dashboard, the agent's TPM (§4) ------


def _accepted_by_the_api_server(control_plane: ControlPlane, docs: list[dict[str, Any]]) -> None:
    """Server-side dry run of every document this API server can serve (no cert-manager
    or prometheus-operator CRDs here)."""
    served = [
        d for d in docs if d["apiVersion"] not in ("monitoring.coreos.com/v1", "cert-manager.io/v1")
    ]
    out = _dry_run_apply(control_plane, served)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("(server dry run)") == len(served)


def _metrics_args(docs: list[dict[str, Any]]) -> list[str]:
    args = _operator(docs)["spec"]["template"]["spec"]["containers"][0]["args"]
    return [a for a in args if a.startswith("--metrics")]


def test_guests_are_given_the_ca_of_the_key_release_port_they_must_check() -> None:
    """With `keyRelease.url`, the operator is told the CA of the certificate that port
    serves (`--key-release-ca`), so each box's cloud-init carries it: the guest's client
    trusts only that CA (a guest has no trust store that holds the chart's own CA), and
    without it no box could attest nor fetch its Secrets. Found by a review: the chart
    never passed it."""
    import base64

    from cryptography import x509

    docs = _render("keyRelease.url=https://gtvp-webhook.gtvp-system.svc:9090")
    container = _operator(docs)["spec"]["template"]["spec"]["containers"][0]
    assert "--key-release-ca=/certs/ca.crt" in container["args"]
    mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounted["certs"] == "/certs"
    secret_name = next(
        v["secret"]["secretName"]
        for v in _operator(docs)["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "certs"
    )
    data = _one(docs, "Secret", secret_name)["data"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(data["ca.crt"]))
    served = x509.load_pem_x509_certificate(base64.b64decode(data["tls.crt"]))
    served.verify_directly_issued_by(ca)  # the CA the guests are given signed what is served
    without = _operator(_render())["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in without if a.startswith("--key-release")]

    def ca_args(*sets: str) -> list[str]:
        docs = _render("keyRelease.url=https://gtvp.example.com:9090", *sets)
        args = _operator(docs)["spec"]["template"]["spec"]["containers"][0]["args"]
        return [a for a in args if a.startswith("--key-release-ca")]

    # cert-manager, the chart's chain or an issuer of the user's own: its ca.crt (which
    # the webhooks' CA injection needs too)
    pinned = ["--key-release-ca=/certs/ca.crt"]
    assert ca_args("webhooks.certManager.enabled=true") == pinned
    assert (
        ca_args("webhooks.certManager.enabled=true", "webhooks.certManager.issuerRef.name=corp-ca")
        == pinned
    )
    assert ca_args("keyRelease.pinCA=false") == []  # a URL the guests' own store vouches for


def test_metrics_are_served_over_https_to_reviewed_tokens_by_default(
    control_plane: ControlPlane,
) -> None:
    """As controller-runtime's WithAuthenticationAndAuthorization: HTTPS with the webhook
    serving certificate, TokenReview + SubjectAccessReview (the operator may create both),
    a metrics-reader ClusterRole for Prometheus; the monitors scrape in https with a token.
    The operator's answers are tested in tests/integration/test_metrics_auth.py."""
    docs = _render(
        "monitoring.serviceMonitor.enabled=true",
        "monitoring.podMonitor.enabled=true",
        "monitoring.bearerTokenSecret.name=prometheus-gtvp-token",
        api_versions=_MONITOR_APIS,
    )
    assert _metrics_args(docs) == [
        "--metrics-address=*",
        "--metrics-secure",
        "--metrics-port=9090",
    ]
    container = _operator(docs)["spec"]["template"]["spec"]["containers"][0]
    assert "--webhook-cert=/certs/tls.crt" in container["args"]  # what --metrics-secure uses
    pod = _operator(docs)["spec"]["template"]["metadata"]
    assert pod["annotations"]["prometheus.io/scheme"] == "https"

    reader = _one(docs, "ClusterRole", "gtvp-metrics-reader")
    assert reader["rules"] == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
    auth = _one(docs, "ClusterRole", "gtvp-metrics-auth")
    assert auth["rules"] == [
        {
            "apiGroups": ["authentication.k8s.io"],
            "resources": ["tokenreviews"],
            "verbs": ["create"],
        },
        {
            "apiGroups": ["authorization.k8s.io"],
            "resources": ["subjectaccessreviews"],
            "verbs": ["create"],
        },
    ]
    binding = _one(docs, "ClusterRoleBinding", "gtvp-metrics-auth")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "gtvp-operator", "namespace": "gtvp-system"}
    ]
    assert binding["roleRef"]["name"] == "gtvp-metrics-auth"

    tls = {
        "serverName": "gtvp-webhooks.gtvp-system.svc",
        "ca": {"secret": {"name": "gtvp-webhook-tls", "key": "ca.crt"}},
    }
    (endpoint,) = _one(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == tls
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "prometheus-gtvp-token", "key": "token"},
    }
    (pod_endpoint,) = _one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert pod_endpoint["scheme"] == "https"
    assert pod_endpoint["tlsConfig"] == tls
    assert pod_endpoint["authorization"] == endpoint["authorization"]
    # the webhook Secret's certificate names the Service the ServiceMonitor scrapes through
    secret = _one(docs, "Secret", "gtvp-webhook-tls")
    assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}

    # without a token Secret: Prometheus' own service-account token (ServiceMonitor); a
    # PodMonitor cannot send one, so it is refused with the value to set
    (own,) = _one(
        _render("monitoring.serviceMonitor.enabled=true", api_versions=_MONITOR_APIS),
        "ServiceMonitor",
    )["spec"]["endpoints"]
    assert own["bearerTokenFile"] == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert "authorization" not in own
    out = _template("monitoring.podMonitor.enabled=true", api_versions=_MONITOR_APIS)
    assert out.returncode != 0
    assert "monitoring.bearerTokenSecret.name" in out.stderr
    _accepted_by_the_api_server(control_plane, docs)


def test_plain_metrics_only_on_loopback_for_a_proxy_sidecar(
    control_plane: ControlPlane,
) -> None:
    """operator.metrics.secure=false: plain HTTP bound to 127.0.0.1 (never the pod's IP),
    probes from inside the container, no review rights, the sidecar added and reached by
    the Service's `metrics` port."""
    sidecar = {
        "name": "kube-rbac-proxy",
        "image": "quay.io/brancz/kube-rbac-proxy:v0.18.1",
        "args": ["--secure-listen-address=0.0.0.0:8443", "--upstream=http://127.0.0.1:9090/"],
        "ports": [{"name": "metrics", "containerPort": 8443}],
    }
    values = {"operator": {"metrics": {"secure": False, "sidecars": [sidecar]}}}
    docs = _render(
        "monitoring.serviceMonitor.enabled=true", values=values, api_versions=_MONITOR_APIS
    )
    assert _metrics_args(docs) == ["--metrics-address=127.0.0.1", "--metrics-port=9090"]
    pod = _operator(docs)["spec"]["template"]["spec"]
    operator, proxy = pod["containers"]
    assert proxy == sidecar
    assert all(p["name"] != "metrics" for p in operator["ports"])  # nothing on the pod's IP
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert _probe_asks(operator[probe]) == (9091, path)
    assert not [d for d in docs if d["metadata"]["name"] == "gtvp-metrics-auth"]
    _one(docs, "ClusterRole", "gtvp-metrics-reader")  # what the proxy checks too
    (endpoint,) = _one(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert "scheme" not in endpoint  # whatever the proxy serves: configure it there
    _accepted_by_the_api_server(control_plane, docs)
    _lints(values)


def test_no_render_serves_plain_metrics_beyond_loopback(control_plane: ControlPlane) -> None:
    for sets in ((), ("operator.metrics.secure=false",), ("operator.replicas=1",)):
        args = _metrics_args(_render(*sets))
        assert "--metrics-secure" in args or "--metrics-address=127.0.0.1" in args, sets


def test_cert_manager_issues_the_webhook_certificate_when_asked(
    control_plane: ControlPlane,
) -> None:
    """webhooks.certManager.enabled: a Certificate writes the serving Secret (the chart
    renders none), the webhook configurations get cert-manager.io/inject-ca-from instead of
    an inline caBundle; by default a self-signed Issuer bootstraps a CA Issuer; issuerRef
    names an existing issuer instead."""
    docs = _render("webhooks.certManager.enabled=true")
    assert not [d for d in docs if d["kind"] == "Secret"]
    serving = _one(docs, "Certificate", "gtvp-webhook-tls")["spec"]
    assert serving["secretName"] == "gtvp-webhook-tls"
    assert serving["dnsNames"][:3] == [
        "gtvp-webhooks",
        "gtvp-webhooks.gtvp-system",
        "gtvp-webhooks.gtvp-system.svc",
    ]
    assert serving["issuerRef"] == {
        "name": "gtvp-webhook-ca",
        "kind": "Issuer",
        "group": "cert-manager.io",
    }
    ca = _one(docs, "Certificate", "gtvp-webhook-ca")["spec"]
    assert ca["isCA"] is True
    assert ca["issuerRef"]["name"] == "gtvp-selfsigned"
    assert _one(docs, "Issuer", "gtvp-selfsigned")["spec"] == {"selfSigned": {}}
    assert _one(docs, "Issuer", "gtvp-webhook-ca")["spec"] == {
        "ca": {"secretName": "gtvp-webhook-ca"}
    }
    configs = [d for d in docs if d["kind"].endswith("WebhookConfiguration")]
    assert len(configs) == 3
    for config in configs:
        assert config["metadata"]["annotations"] == {
            "cert-manager.io/inject-ca-from": "gtvp-system/gtvp-webhook-tls"
        }
        for hook in config["webhooks"]:
            assert "caBundle" not in hook["clientConfig"]
    volumes = _operator(docs)["spec"]["template"]["spec"]["volumes"]
    assert {"name": "certs", "secret": {"secretName": "gtvp-webhook-tls"}} in volumes

    own = _render(
        "webhooks.certManager.enabled=true",
        "webhooks.certManager.issuerRef.name=corp-ca",
        "webhooks.certManager.issuerRef.kind=ClusterIssuer",
    )
    (certificate,) = [d for d in own if d["kind"] == "Certificate"]
    assert certificate["spec"]["issuerRef"] == {
        "name": "corp-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    assert not [d for d in own if d["kind"] == "Issuer"]
    assert "issuerRef" in _refused(
        "webhooks.certManager.enabled=true", "webhooks.certManager.issuerRef.kind=Vault"
    )

    # the default stays the chart's own CA, inline in every webhook
    default = _render()
    ca_crt = _one(default, "Secret", "gtvp-webhook-tls")["data"]["ca.crt"]
    for config in (d for d in default if d["kind"].endswith("WebhookConfiguration")):
        assert "annotations" not in config["metadata"]
        assert all(h["clientConfig"]["caBundle"] == ca_crt for h in config["webhooks"])
    _accepted_by_the_api_server(control_plane, docs)
    _lints({"webhooks": {"certManager": {"enabled": True}}})


def test_an_upgrade_keeps_the_generated_webhook_ca(
    control_plane: ControlPlane, namespace: str
) -> None:
    """helm upgrade renders against the live Secret (lookup): the same CA, certificate and
    key, so the caBundle the API server trusts does not change under running replicas."""
    first = _render(namespace=namespace)
    secret = _one(first, "Secret", "gtvp-webhook-tls")
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(secret))
    # the kubeconfig lets the chart look the live Secret up
    again = _render(namespace=namespace, kubeconfig=control_plane.kubeconfig_for(ADMIN))
    assert _one(again, "Secret", "gtvp-webhook-tls")["data"] == secret["data"]
    for config in (d for d in again if d["kind"].endswith("WebhookConfiguration")):
        assert all(
            h["clientConfig"]["caBundle"] == secret["data"]["ca.crt"] for h in config["webhooks"]
        )
    # a fresh render (no live Secret) generates another CA
    assert (
        _one(_render(namespace=namespace), "Secret", "gtvp-webhook-tls")["data"] != (secret["data"])
    )


def _dashboard(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(docs, "ConfigMap", "gtvp-dashboard")


def test_the_dashboard_picks_its_data_source_and_is_found_by_the_sidecar(
    control_plane: ControlPlane,
) -> None:
    """A ${datasource} variable every panel and target uses, unique panel ids, a unit on
    every panel, tags; the ConfigMap's namespace, sidecar label and annotations from values."""
    config = _dashboard(_render())
    assert config["metadata"]["namespace"] == "gtvp-system"
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(config["data"]["gtvp.json"])
    assert board["tags"]
    (variable,) = [v for v in board["templating"]["list"] if v["name"] == "datasource"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    source = {"type": "prometheus", "uid": "${datasource}"}
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids)
    for panel in panels:
        assert panel["datasource"] == source, panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, panel["title"]
            assert "$" not in target["expr"]  # queries stay plain PromQL (tests/e2e evaluates them)
    assert (CHART / "files" / "dashboard.json").read_text() == config["data"]["gtvp.json"] + "\n"

    moved = _dashboard(
        _render(
            "monitoring.dashboards.namespace=grafana",
            "monitoring.dashboards.label=my_dashboards",
            "monitoring.dashboards.labelValue=yes",
            "monitoring.dashboards.annotations.grafana_folder=gtvp",
        )
    )
    assert moved["metadata"]["namespace"] == "grafana"
    assert moved["metadata"]["labels"]["my_dashboards"] == "yes"
    assert "grafana_dashboard" not in moved["metadata"]["labels"]
    assert moved["metadata"]["labels"]["app.kubernetes.io/component"] == "monitoring"
    assert moved["metadata"]["annotations"] == {"grafana_folder": "gtvp"}
    assert not [
        d for d in _render("monitoring.dashboards.enabled=false") if d["kind"] == "ConfigMap"
    ]


def _agent(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = _one(docs, "DaemonSet")["spec"]["template"]["spec"]
    return spec


def _volume_names(pod: dict[str, Any]) -> set[str]:
    return {v["name"] for v in pod["volumes"]}


_UNPRIVILEGED = ("agent.privileged=false", "agent.tpmGroup=106", "agent.sendEventLog=false")


def test_the_default_agent_is_privileged_with_the_hostpath_device(
    control_plane: ControlPlane,
) -> None:
    pod = _agent(_render())
    (agent,) = pod["containers"]
    assert agent["securityContext"]["privileged"] is True
    assert "--tpm=device:/dev/tpmrm0" in agent["args"]
    assert {"name": "tpm", "hostPath": {"path": "/dev/tpmrm0", "type": "CharDevice"}} in pod[
        "volumes"
    ]
    assert "securityfs" in _volume_names(pod)
    assert "initContainers" not in pod


def test_an_unprivileged_agent_opens_the_tpm_through_its_group(
    control_plane: ControlPlane,
) -> None:
    """agent.privileged=false: non-root, no privileges, every capability dropped, read-only
    root; the tss group as a supplemental group; the device from the hostPath or from a
    device plugin's resource; the state directory handed over by a CHOWN-only init step."""
    docs = _render(*_UNPRIVILEGED)
    pod = _agent(docs)
    (agent,) = pod["containers"]
    assert agent["securityContext"] == {
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 106,
        "supplementalGroups": [106],
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert "--no-event-log" in agent["args"]
    assert "securityfs" not in _volume_names(pod)
    assert "tpm" in _volume_names(pod)
    (init,) = pod["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert "privileged" not in init["securityContext"]
    assert "chown -R 65532:106 /var/lib/gtvp-agent" in init["command"][2]
    assert "privileged: true" not in yaml.safe_dump(_one(docs, "DaemonSet"))
    _accepted_by_the_api_server(control_plane, docs)

    plugin = _agent(_render(*_UNPRIVILEGED, "agent.tpmResource=squat.ai/tpmrm0"))
    (agent,) = plugin["containers"]
    assert agent["resources"]["limits"]["squat.ai/tpmrm0"] == "1"
    assert agent["resources"]["requests"]["squat.ai/tpmrm0"] == "1"
    assert "tpm" not in _volume_names(plugin)  # the device plugin puts the node there
    assert plugin["securityContext"]["supplementalGroups"] == [106]
    _lints(
        {
            "agent": {
                "privileged": False,
                "tpmGroup": 106,
                "sendEventLog": False,
                "tpmResource": "squat.ai/tpmrm0",
            }
        },
    )

    assert "agent.tpmGroup" in _refused("agent.privileged=false", "agent.sendEventLog=false")
    assert "readable by root only" in _refused("agent.privileged=false", "agent.tpmGroup=106")
    assert "tpmResource" in _refused(*_UNPRIVILEGED, "agent.tpmResource=not a resource")


def test_a_test_rig_tpm_needs_no_device_and_no_privileges(
    control_plane: ControlPlane,
) -> None:
    """agent.tpm = a swtpm TCTI: used as is, nothing mounted from /dev, unprivileged, no event
    log (the node's log does not describe the emulator)."""
    tcti = "swtpm:host=10.1.2.3,port=2321"
    docs = _render(values={"agent": {"tpm": tcti}})
    pod = _agent(docs)
    (agent,) = pod["containers"]
    assert f"--tpm={tcti}" in agent["args"]
    assert "--no-event-log" in agent["args"]
    assert _volume_names(pod) == {"state"}
    assert agent["securityContext"]["privileged"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "supplementalGroups" not in pod["securityContext"]
    _accepted_by_the_api_server(control_plane, docs)


def test_every_node_of_a_rig_can_have_its_own_swtpm(
    control_plane: ControlPlane,
) -> None:
    """agent.tpmPerNode: a ConfigMap the agent reads (its NODE_NAME's entry), then agent.tpm,
    then the device; with tpmDevice "" a node without an entry has no TPM (the agent says
    which node)."""
    rig = {"node-1": "swtpm:host=10.0.0.1,port=2321", "node-2": "mssim:host=10.0.0.2,port=2321"}

    def render(agent: dict[str, Any]) -> list[dict[str, Any]]:
        return _render(values={"agent": agent})

    docs = render({"tpmPerNode": rig, "tpmDevice": ""})
    config = _one(docs, "ConfigMap", "gtvp-agent-tpm")
    assert json.loads(config["data"]["tpm-per-node.json"]) == rig
    pod = _agent(docs)
    (agent,) = pod["containers"]
    assert "--tpm-per-node=/etc/gtvp-agent/tpm-per-node.json" in agent["args"]
    assert not [a for a in agent["args"] if a.startswith("--tpm=")]  # no default: named error
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in (
        agent["env"]
    )
    assert {"name": "tpm-per-node", "configMap": {"name": "gtvp-agent-tpm"}} in pod["volumes"]
    assert "tpm" not in _volume_names(pod)
    assert agent["securityContext"]["privileged"] is False
    _accepted_by_the_api_server(control_plane, docs)

    fallback = _agent(render({"tpmPerNode": rig, "tpm": "swtpm:host=10.0.0.9,port=2321"}))
    assert "--tpm=swtpm:host=10.0.0.9,port=2321" in fallback["containers"][0]["args"]
    assert "tpm" not in _volume_names(fallback)

    device = _agent(render({"tpmPerNode": rig}))  # nodes without an entry use their device
    (agent,) = device["containers"]
    assert "--tpm=device:/dev/tpmrm0" in agent["args"]
    assert "--no-event-log" in agent["args"]
    assert agent["securityContext"]["privileged"] is True
    # privileged containers see the node's devices; a rig node without one still starts
    assert "tpm" not in _volume_names(device)

    for bad in ("device:tpmrm0", "tcp:host=x", "swtpm: host=x"):
        said = _refused(values={"agent": {"tpmPerNode": {"node-3": bad}}})
        assert 'agent.tpmPerNode["node-3"]' in said
        assert "is not a TCTI the agent can use" in said
    assert "agent.tpm (" in _refused("agent.tpm=/dev/tpmrm0")
    assert "names a TPM" in _refused("agent.tpmDevice=")
    _lints({"agent": {"tpmPerNode": rig, "tpmDevice": ""}})


def _probe_asks(probe: dict[str, Any]) -> tuple[int, str]:
    """(port, path) the chart's exec probe asks on loopback."""
    source = probe["exec"]["command"][-1]
    port = re.search(r"create_connection\(\('127\.0\.0\.1',(\d+)\)", source)
    path = re.search(r"GET (\S+) HTTP/1\.0", source)
    assert port is not None, source
    assert path is not None, source
    return int(port.group(1)), path.group(1)


def test_the_charts_probes_pass_only_while_the_operator_says_ready_and_healthy() -> None:
    """The rendered exec probes, run as the kubelet runs them, against the operator's own
    probe server on the port the chart gives it: they fail while it is not ready, pass once
    it is, and fail when nothing answers."""
    port = free_port()
    container = _operator(_render(f"operator.probePort={port}"))["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert f"--probe-port={port}" in container["args"]
    state = [Probe(loaded=False, loop_started=False, loop_idle_seconds=0.0)]
    server = http_endpoints.serve_probes(port, lambda: state[0])

    def passes(probe: str) -> bool:
        command = container[probe]["exec"]["command"]
        assert command[0] == "python3"
        timeout = int(container[probe]["timeoutSeconds"])
        got = subprocess.run(command, capture_output=True, timeout=timeout + 5, check=False)
        return got.returncode == 0

    try:
        assert not passes("readinessProbe")
        assert passes("livenessProbe")
        state[0] = Probe(loaded=True, loop_started=True, loop_idle_seconds=1.0)
        assert passes("readinessProbe")
        state[0] = Probe(loaded=True, loop_started=True, loop_idle_seconds=600.0)  # wedged
        assert not passes("livenessProbe")
    finally:
        server.shutdown()
        server.server_close()
    assert not passes("readinessProbe")  # nothing answers


# ----- the pre-upgrade check ----------------------------------------------------------------


def _log_only_policy(name: str) -> dict[str, Any]:
    """A SecurityPolicy an older gtvp accepted and this one refuses: its member class only
    requires an event log (which replays to any boot)."""
    sample = sample_policy()
    sample["metadata"] = {"name": name}
    sample["spec"]["memberClasses"] = [{"name": "generic-uefi", "eventLog": {"required": True}}]
    sample["spec"]["defaultMemberClass"] = "generic-uefi"
    return dict(sample)


def test_an_upgrade_that_would_lose_the_pools_policy_is_stopped_by_the_check_job(
    control_plane: ControlPlane, cluster_names: list[str], tmp_path: Path
) -> None:
    """The pre-upgrade hook runs `gtvp policy check` on the new image, with an account of
    its own that may only read the enforced policy, where the operator runs. Run here as
    rendered and as that account, against the real API server holding a policy the old
    version accepted and this one refuses, it fails (helm then stops the upgrade) and says
    why; once the policy is fixed it passes."""
    name = f"legacy-{uuid.uuid4().hex[:6]}"
    docs = _render(f"policyName={name}", upgrade=True)
    hooks = [d for d in docs if "helm.sh/hook" in d["metadata"].get("annotations", {})]
    assert {d["kind"] for d in hooks} == {
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Job"
    }  # fmt: skip
    for hook in hooks:
        said = hook["metadata"]["annotations"]
        when = set(said["helm.sh/hook"].split(","))
        assert when == {"pre-install", "pre-upgrade", "pre-rollback"}, hook["kind"]
        assert "hook-succeeded" in said["helm.sh/hook-delete-policy"], hook["kind"]
    weight = {d["kind"]: int(d["metadata"]["annotations"]["helm.sh/hook-weight"]) for d in hooks}
    assert weight["ServiceAccount"] < weight["Job"]  # its account exists before it runs
    assert weight["ClusterRoleBinding"] < weight["Job"]
    assert weight["RoleBinding"] < weight["Job"]
    job = _one(docs, "Job", "gtvp-upgrade-check")
    pod = job["spec"]["template"]["spec"]
    operator_pod = _operator(docs)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "gtvp-upgrade-check"  # not the operator's
    assert pod["nodeSelector"] == operator_pod["nodeSelector"]  # never on a member
    assert pod["tolerations"] == operator_pod["tolerations"]
    # not an operator pod: the webhook Service must never send admission requests to it
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "upgrade-check"
    (container,) = pod["containers"]
    command = container["command"]
    assert command == [
        "gtvp", "policy", "check", f"--name={name}", "--operator=gtvp-system/gtvp-operator"
    ]  # fmt: skip
    as_check = _as_hook(control_plane, docs, "gtvp-system")
    cluster_names.extend(
        ["clusterrole/gtvp-upgrade-check", "clusterrolebinding/gtvp-upgrade-check"]
    )
    user = "system:serviceaccount:gtvp-system:gtvp-upgrade-check"

    def can(*what: str) -> bool:
        out = control_plane.kubectl("auth", "can-i", *what, f"--as={user}", check=False)
        return out.stdout.strip() == "yes"

    assert can("get", f"securitypolicies.gtvp.io/{name}")
    assert can("get", "deployments.apps/gtvp-operator", "-n", "gtvp-system")
    assert not can("get", "deployments.apps/another", "-n", "gtvp-system")
    assert not can("get", "deployments.apps/gtvp-operator", "-n", "kube-system")
    assert not can("list", "securitypolicies.gtvp.io")
    assert not can("patch", f"securitypolicies.gtvp.io/{name}", "--subresource=status")
    assert not can("patch", "members.gtvp.io/node-1", "--subresource=status")
    assert not can("get", "secrets", "-n", "gtvp-system")

    def check() -> subprocess.CompletedProcess[str]:
        return _run_check(docs, as_check)

    gone = check()  # no such policy yet: nothing to lose
    assert gone.returncode == 0, gone.stderr
    assert f"SecurityPolicy {name}: does not exist" in gone.stdout
    legacy = _log_only_policy(name)
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(legacy))
    cluster_names.append(f"securitypolicy/{name}")
    # what the older operator wrote: it ran the pool under generation 1
    status = {"status": {"acceptedGeneration": 1, "acceptedSpec": legacy["spec"]}}
    control_plane.kubectl(
        "patch", "securitypolicy", name, "--subresource=status", "--type=merge",
        "-p", json.dumps(status),
    )  # fmt: skip
    stopped = check()
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert f"SecurityPolicy {name} (generation 1): this version refuses it" in stopped.stderr
    assert "verifies nothing" in stopped.stderr
    assert "would run under none after the upgrade" in stopped.stderr
    assert "upgradeCheck.enabled=false" in stopped.stderr
    # fixed as the message says: the class verifies every PCR (the sample's learned set)
    fixed = sample_policy()
    control_plane.kubectl(
        "patch", "securitypolicy", name, "--type=merge",
        "-p", json.dumps({"spec": {k: fixed["spec"][k]
                                   for k in ("memberClasses", "defaultMemberClass")}}),
    )  # fmt: skip
    passed = check()
    assert passed.returncode == 0, passed.stderr
    assert f"SecurityPolicy {name} (generation 2): accepted by this version" in passed.stdout
    # a cluster that cannot be read is not taken for a pass
    bad = tmp_path / "unreachable"
    bad.write_text(
        control_plane.kubeconfig_for(ADMIN)
        .read_text()
        .replace(f":{control_plane.ports.apiserver}", f":{free_port()}")
    )
    unreachable = subprocess.run(
        [sys.executable, "-m", "gtvp.cli", *command[1:], "--kubeconfig", str(bad)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert unreachable.returncode == 2, unreachable.stdout + unreachable.stderr
    assert "cannot read" in unreachable.stderr


def test_the_upgrade_check_can_be_turned_off_and_survives_reused_old_values(
    control_plane: ControlPlane,
) -> None:
    """`upgradeCheck.enabled=false` renders none of it; values from a release older than
    the check (`helm upgrade --reuse-values` uses only those) still render it, on by
    default."""
    off = _render("upgradeCheck.enabled=false")
    assert not [d for d in off if "upgrade-check" in d["metadata"]["name"]]
    job = _one(_render("upgradeCheck=null"), "Job", "gtvp-upgrade-check")
    assert job["spec"]["activeDeadlineSeconds"] == 120
    # a null that --reuse-values kept in the operator's nodeSelector selects nothing in the
    # Job, which is created afresh (the Deployment is patched, where null removes the key)
    kept = {"operator": {"nodeSelector": {"gtvp.io/dropped": None, "pool": "system"}}}
    job = _one(_render(values=kept), "Job", "gtvp-upgrade-check")
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {
        "node-role.kubernetes.io/control-plane": "",
        "pool": "system",
    }


def _as_hook(control_plane: ControlPlane, docs: list[dict[str, Any]], namespace: str) -> Path:
    """A kubeconfig of the check's own account, its rendered ServiceAccount, roles and
    bindings applied to the API server first."""
    hooks = [d for d in docs if "upgrade-check" in d["metadata"]["name"] and d["kind"] != "Job"]
    control_plane.kubectl("create", "namespace", namespace, check=False)
    control_plane.kubectl(
        "apply", "-f", "-", input_text="\n---\n".join(json.dumps(d) for d in hooks)
    )
    user = f"system:serviceaccount:{namespace}:gtvp-upgrade-check"
    groups = ("system:serviceaccounts", f"system:serviceaccounts:{namespace}")
    return control_plane.kubeconfig_for(Identity(user, groups, f"upgrade-check-{namespace}"))


def _run_check(
    docs: list[dict[str, Any]], kubeconfig: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """The rendered check's command, run here (this repository's gtvp) as `kubeconfig`."""
    (container,) = _one(docs, "Job", "gtvp-upgrade-check")["spec"]["template"]["spec"]["containers"]
    return subprocess.run(
        [sys.executable, "-m", "gtvp.cli", *container["command"][1:], *extra],
        capture_output=True, text=True, check=False, timeout=120,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
    )  # fmt: skip


def test_an_upgrade_that_points_the_operator_at_a_missing_policy_is_stopped(
    control_plane: ControlPlane, namespace: str, cluster_names: list[str]
) -> None:
    """policyName changed (or mistyped) by an upgrade: the check reads which policy the
    running operator enforces from its Deployment, and stops the upgrade while the new
    name is missing; once it exists and is accepted, the upgrade passes."""
    old, new = f"old-{uuid.uuid4().hex[:6]}", f"new-{uuid.uuid4().hex[:6]}"
    sample = sample_policy()
    running = {**sample, "metadata": {"name": old}}
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(running))
    cluster_names.append(f"securitypolicy/{old}")
    status = {"status": {"observedGeneration": 1, "acceptedGeneration": 1,
                         "acceptedSpec": sample["spec"]}}  # fmt: skip
    control_plane.kubectl(
        "patch", "securitypolicy", old, "--subresource=status", "--type=merge",
        "-p", json.dumps(status),
    )  # fmt: skip
    live = _operator(_render(f"policyName={old}", namespace=namespace))
    live["metadata"].pop("annotations", None)
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(live))
    cluster_names.extend(
        ["clusterrole/gtvp-upgrade-check", "clusterrolebinding/gtvp-upgrade-check"]
    )
    try:
        # rendered without a cluster to look at (helm template, GitOps tools): the check
        # reads the running operator's --policy from its Deployment itself
        docs = _render(f"policyName={new}", upgrade=True, namespace=namespace)
        job = _one(docs, "Job", "gtvp-upgrade-check")
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["command"][3:] == [
            f"--name={new}", f"--operator={namespace}/gtvp-operator"
        ]  # fmt: skip
        as_hook = _as_hook(control_plane, docs, namespace)
        stopped = _run_check(docs, as_hook)
        assert stopped.returncode == 1, stopped.stdout + stopped.stderr
        assert (
            f"SecurityPolicy {new}, which the upgrade makes the operator enforce instead of "
            f"{old}: does not exist"
        ) in stopped.stderr
        assert "apply it first, or keep policyName" in stopped.stderr
        control_plane.kubectl(
            "create", "-f", "-", input_text=json.dumps({**sample, "metadata": {"name": new}})
        )
        cluster_names.append(f"securitypolicy/{new}")
        passed = _run_check(docs, as_hook)
        assert passed.returncode == 0, passed.stdout + passed.stderr
        assert "accepted by this version" in passed.stdout
    finally:
        control_plane.kubectl("delete", "deployment", "gtvp-operator", "-n", namespace)


def test_a_check_that_finds_no_securitypolicies_served_passes_only_a_first_install(
    control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The API server serves no SecurityPolicies (a first install: the chart's CRDs come
    after its hooks): nothing to lose then; on an upgrade that is not what a pool looks
    like, and the check fails rather than pass it (asked of the real API server, for a
    resource it does not serve)."""
    from gtvp import policy_check_cli
    from gtvp.cli import main
    from gtvp.core.api_resources import ApiResource

    unserved = ApiResource("nothing.gtvp.io", "v1", "securitypolicies", "SecurityPolicy",
                           namespaced=False)  # fmt: skip
    monkeypatch.setattr(policy_check_cli, "SECURITY_POLICIES", unserved)
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig_for(ADMIN)))
    assert main(["policy", "check", "--name=default"]) == 2
    assert "serves no SecurityPolicies" in capsys.readouterr().err
    assert main(["policy", "check", "--name=default", "--install"]) == 0
    assert "a first install" in capsys.readouterr().out


def test_a_release_in_a_shared_namespace_gates_the_vms_there() -> None:
    """A release in `default` (a `helm install` without -n), or in a namespace shared with
    tenants, must not leave the VMs there ungated: only kube-system is left out."""
    for namespace in ("default", "gtvp-system"):
        hooks = [
            h
            for d in _render(namespace=namespace)
            if d["kind"] in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")
            for h in d["webhooks"]
            if "namespaceSelector" in h
        ]
        assert hooks
        for h in hooks:
            assert h["namespaceSelector"]["matchExpressions"][0]["values"] == ["kube-system"]
