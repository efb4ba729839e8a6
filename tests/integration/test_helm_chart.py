"""The Helm chart: linted and rendered by the real helm, accepted by the real API server,
and in step with the manifests the tests run against; its alerts checked by promtool."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gtvp import webhook_config
from gtvp_local import toolchain
from gtvp_local.controlplane import ControlPlane

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


def _render(*sets: str) -> list[dict[str, Any]]:
    out = _helm(
        "template",
        "gtvp",
        str(CHART),
        "--namespace",
        "gtvp-system",
        "--kube-version",
        "v1.36.3",
        *(a for s in sets for a in ("--set", s)),
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_chart_lints(control_plane: ControlPlane) -> None:
    out = _helm("lint", str(CHART), "--kube-version", "v1.36.3", "--strict")
    assert out.returncode == 0, out.stdout + out.stderr


def test_bad_values_are_refused_by_the_schema(control_plane: ControlPlane) -> None:
    out = _helm("template", "gtvp", str(CHART), "--set", "agent.ekType=dsa")
    assert out.returncode != 0
    assert "ekType" in out.stderr


def test_rendered_chart_is_accepted_by_the_api_server(control_plane: ControlPlane) -> None:
    docs = _render()
    control_plane.kubectl("create", "namespace", "gtvp-system", check=False)
    text = "\n---\n".join(json.dumps(d) for d in docs)
    out = control_plane.kubectl(
        "apply",
        "--dry-run=server",
        "--server-side",
        "--force-conflicts",
        "-f",
        "-",
        input_text=text,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("(server dry run)") == len(docs)


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
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert {"name": "metrics", "containerPort": 9090} in container["ports"]
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
        assert excluded["values"] == ["kube-system", "gtvp-system"]  # the release's namespace
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


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus)")
def test_alerts_pass_promtool_and_fire(tmp_path: Path) -> None:
    rule = next(
        d
        for d in _render("monitoring.prometheusRule.enabled=true")
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


def test_the_operator_runs_alone_and_off_the_nodes_that_host_tenant_vms(
    control_plane: ControlPlane,
) -> None:
    """Its token can write verdicts: never on a pool member running VMs by default (root
    there could read it), never two replicas (competing verdicts), not even in a rollout."""
    deployment = next(
        d
        for d in _render()
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "gtvp-operator"
    )
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"node-role.kubernetes.io/control-plane": ""}
    assert {
        "key": "node-role.kubernetes.io/control-plane",
        "operator": "Exists",
        "effect": "NoSchedule",
    } in pod["tolerations"]
    two = _helm("template", "gtvp", str(CHART), "--set", "operator.replicas=2")
    assert two.returncode != 0
    assert "replicas" in two.stderr


def test_chart_reserves_gtvps_migration_labels_as_the_local_pool_does(
    control_plane: ControlPlane,
) -> None:
    """The same policy as operator/gtvp/manifests/migration-labels-vap.yaml, exempting the
    release's operator service account instead of the local pool's operator user."""
    local = [
        d
        for d in yaml.safe_load_all(
            (REPO / "operator" / "gtvp" / "manifests" / "migration-labels-vap.yaml").read_text()
        )
        if d
    ]
    rendered = [
        d
        for d in _render()
        if d["kind"].startswith("ValidatingAdmissionPolicy")
        and d["metadata"]["name"] == "gtvp-migration-labels"
    ]
    chart_policy = next(d for d in rendered if d["kind"] == "ValidatingAdmissionPolicy")
    local_policy = next(d for d in local if d["kind"] == "ValidatingAdmissionPolicy")
    assert chart_policy["spec"]["matchConditions"] == [
        {
            "name": "not-the-operator",
            "expression": "request.userInfo.username != "
            "'system:serviceaccount:gtvp-system:gtvp-operator'",
        }
    ]
    chart_policy["spec"]["matchConditions"] = local_policy["spec"]["matchConditions"]
    assert chart_policy["spec"] == local_policy["spec"]
    assert {d["kind"] for d in rendered} == {
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
