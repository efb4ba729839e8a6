"""gtvp's alerts fire on the first occurrence of what they watch, and when the operator is
gone: promtool evaluates the chart's rules (charts/gtvp/files/alerts.yaml) over series taken
from the operator's own /metrics exposition (gtvp.metrics), scraped before and after the
event, as Prometheus would store them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gtvp.metrics import Metrics
from gtvp_local import layout

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian prometheus)"
)

RUNBOOK = "https://example.com/runbooks"


def _series(m: Metrics, prefix: str) -> dict[str, float]:
    """`name{labels}` -> value for every sample of the exposition starting with `prefix`."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in family.samples:
            if s.name.startswith(prefix):
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
    return out


def _before_and_after(before: dict[str, float], after: dict[str, float]) -> list[dict[str, str]]:
    """promtool input: 5 scrapes before the event, 10 after; a series missing from a scrape
    is `_` (no sample), as Prometheus stores a series that appears only later."""
    rows = []
    for name in sorted(set(before) | set(after)):
        first = f"{before[name]:g}x4" if name in before else "_x4"
        rows.append({"series": name, "values": f"{first} {after[name]:g}x10"})
    return rows


def _promtool(tmp_path: Path, tests: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    rules = tmp_path / "rules.yaml"
    text = (layout.repo_root() / "charts" / "gtvp" / "files" / "alerts.yaml").read_text()
    rules.write_text(text.replace("RUNBOOK_BASE", RUNBOOK))
    test = tmp_path / "test.yaml"
    test.write_text(
        yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": tests})
    )
    return subprocess.run(
        ["promtool", "test", "rules", str(test)], capture_output=True, text=True, check=False
    )


def _annotations(name: str) -> dict[str, str]:
    rules = yaml.safe_load(
        (layout.repo_root() / "charts" / "gtvp" / "files" / "alerts.yaml").read_text()
    )
    rule = next(r for r in rules["groups"][0]["rules"] if r["alert"] == name)
    return {
        k: v.replace("RUNBOOK_BASE", RUNBOOK)
        for k, v in rule["annotations"].items()
        if "{{" not in v
    }


def test_first_evacuation_abort_and_first_failed_component_fire(tmp_path: Path) -> None:
    m = Metrics()
    before = _series(m, "gtvp_evacuation_migrations") | _series(m, "gtvp_component_verif")
    m.evacuation("started")
    m.evacuation("aborted")  # the first abort since the operator started
    m.components.labels("failed", "BadSignature").inc()  # the first failed component
    after = _series(m, "gtvp_evacuation_migrations") | _series(m, "gtvp_component_verif")
    run = _promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": _before_and_after(before, after),
                "alert_rule_test": [
                    {"eval_time": "3m", "alertname": "GtvpEvacuationAborted", "exp_alerts": []},
                    {
                        "eval_time": "6m",
                        "alertname": "GtvpEvacuationAborted",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "state": "aborted"},
                                "exp_annotations": _annotations("GtvpEvacuationAborted"),
                            }
                        ],
                    },
                    {
                        "eval_time": "6m",
                        "alertname": "GtvpComponentVerificationFailed",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "reason": "BadSignature"},
                                "exp_annotations": {
                                    **_annotations("GtvpComponentVerificationFailed"),
                                    "summary": "OS components fail verification: BadSignature",
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_first_vm_stopped_past_its_bound_fires(tmp_path: Path) -> None:
    """A VM gtvp stopped because it could not be moved off an untrusted member in time is
    an outage someone must look at: the first one pages (critical)."""
    m = Metrics()
    before = _series(m, "gtvp_evacuation_deadline_stops")
    assert before == {"gtvp_evacuation_deadline_stops_total{}": 0}  # exposed from the start
    m.deadline_stop()
    after = _series(m, "gtvp_evacuation_deadline_stops")
    fired = {"exp_labels": {"severity": "critical"},
             "exp_annotations": _annotations("GtvpEvacuationDeadlineStop")}  # fmt: skip
    run = _promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": _before_and_after(before, after),
                "alert_rule_test": [
                    {
                        "eval_time": "3m",
                        "alertname": "GtvpEvacuationDeadlineStop",
                        "exp_alerts": [],
                    },
                    {
                        "eval_time": "6m",
                        "alertname": "GtvpEvacuationDeadlineStop",
                        "exp_alerts": [fired],
                    },
                ],
            }
        ],
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize(
    ("metric", "alert"),
    [
        ("gtvp_evacuation_migrations", "GtvpEvacuationRetargeting"),
        ("gtvp_drain_migrations", "GtvpDrainRetargeting"),
    ],
)
def test_repeated_retargets_fire_and_a_single_one_does_not(
    tmp_path: Path, metric: str, alert: str
) -> None:
    def run(cancels: int) -> subprocess.CompletedProcess[str]:
        m = Metrics()
        before = _series(m, metric)
        counter = m.evacuations if metric == "gtvp_evacuation_migrations" else m.drain_migrations
        for _ in range(cancels):
            counter.labels("cancelled").inc()
        after = _series(m, metric)
        fired = {
            "exp_labels": {"severity": "warning", "state": "cancelled"},
            "exp_annotations": _annotations(alert),
        }
        expected = [fired] if cancels >= 3 else []
        return _promtool(
            tmp_path,
            [
                {
                    "interval": "1m",
                    "input_series": _before_and_after(before, after),
                    "alert_rule_test": [
                        {"eval_time": "6m", "alertname": alert, "exp_alerts": expected}
                    ],
                }
            ],
        )

    for cancels in (1, 3):
        result = run(cancels)
        assert result.returncode == 0, result.stdout + result.stderr


def test_operator_absent_fires_when_no_replica_is_scraped(tmp_path: Path) -> None:
    info = _series(Metrics(), "gtvp_build_info")
    assert len(info) == 1
    (build_info,) = info
    run = _promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                # scraped for 5 minutes, then gone (every replica down, or not scraped)
                "input_series": [{"series": build_info, "values": "1x4 stale"}],
                "alert_rule_test": [
                    {"eval_time": "4m", "alertname": "GtvpOperatorAbsent", "exp_alerts": []},
                    {"eval_time": "8m", "alertname": "GtvpOperatorAbsent", "exp_alerts": []},
                    {
                        "eval_time": "12m",
                        "alertname": "GtvpOperatorAbsent",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical"},
                                "exp_annotations": _annotations("GtvpOperatorAbsent"),
                            }
                        ],
                    },
                ],
            }
        ],
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_has_its_runbook() -> None:
    rules = yaml.safe_load(
        (layout.repo_root() / "charts" / "gtvp" / "files" / "alerts.yaml").read_text()
    )["groups"][0]["rules"]
    runbooks = (layout.repo_root() / "docs" / "runbooks.md").read_text().splitlines()
    headings = {ln.removeprefix("## ").strip() for ln in runbooks if ln.startswith("## ")}
    for rule in rules:
        assert rule["alert"] in headings
        assert rule["annotations"]["runbook_url"] == f"RUNBOOK_BASE#{rule['alert'].lower()}"
