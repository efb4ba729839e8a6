"""The operator's /metrics as Prometheus reads it: every labelled counter at 0 for each label
value it can take (so a first occurrence is an increase), build info, the process collector,
the per-member verdict expiry, and no `_created` series."""

from __future__ import annotations

import platform
import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import gtvp
from gtvp.core import component_signing
from gtvp.core.component_checks import COMPONENT_FAILURE_REASONS
from gtvp.core.errors import ALL_REASONS
from gtvp.metrics import Metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(m: Metrics) -> Samples:
    text = generate_latest(m.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_every_labelled_counter_starts_at_zero_for_each_known_value() -> None:
    got = _scrape(Metrics())
    for state in ("started", "finished", "aborted"):
        assert _value(got, "gtvp_evacuation_migrations_total", state=state) == 0
    for state in ("started", "finished"):
        assert _value(got, "gtvp_drain_migrations_total", state=state) == 0
    for outcome in ("placed", "pending"):
        assert _value(got, "gtvp_lazybox_placements_total", outcome=outcome) == 0
    for reason in COMPONENT_FAILURE_REASONS:
        assert (
            _value(got, "gtvp_component_verifications_total", result="failed", reason=reason) == 0
        )
    assert (
        _value(
            got, "gtvp_component_verifications_total", result="verified", reason="SignatureValid"
        )
        == 0
    )
    for reason in ALL_REASONS:
        assert _value(got, "gtvp_attestations_total", result="failed", reason=reason) == 0
    for kind in ("VirtualMachine", "VirtualMachineInstance", "VirtualMachineInstanceMigration"):
        for outcome in ("allowed", "denied", "mutated", "unchanged"):
            assert _value(got, "gtvp_admission_decisions_total", kind=kind, outcome=outcome) == 0
    for outcome in ("allowed", "denied"):
        assert (
            _value(got, "gtvp_admission_decisions_total", kind="SecurityPolicy", outcome=outcome)
            == 0
        )
    for name in ("gtvp_balancing_migrations_total", "gtvp_lease_renewal_failures_total"):
        assert _value(got, name) == 0


def test_a_first_occurrence_is_an_increase_of_an_existing_series() -> None:
    m = Metrics()
    m.evacuation("aborted")
    m.components.labels("failed", "BadSignature").inc()
    got = _scrape(m)
    assert _value(got, "gtvp_evacuation_migrations_total", state="aborted") == 1
    assert _value(got, "gtvp_evacuation_migrations_total", state="started") == 0
    failed = _value(
        got, "gtvp_component_verifications_total", result="failed", reason="BadSignature"
    )
    assert failed == 1


def test_build_info_and_the_process_collector_and_no_created_series() -> None:
    got = _scrape(Metrics())
    assert (
        _value(got, "gtvp_build_info", version=gtvp.__version__, python=platform.python_version())
        == 1
    )
    names = {name for name, _ in got}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= names
    assert (_value(got, "process_resident_memory_bytes") or 0) > 0
    assert not [n for n in names if n.endswith("_created")]


def test_verdict_expiry_per_member_is_forgotten_with_the_member() -> None:
    m = Metrics()
    m.set_member("node-1", "Trusted", 3, 1_800_000_000.0)
    m.set_member("node-2", "Trusted", 2, 1_800_000_010.0)
    name = "gtvp_member_verdict_expiry_timestamp_seconds"
    got = _scrape(m)
    assert _value(got, name, member="node-1") == 1_800_000_000.0
    assert _value(got, name, member="node-2") == 1_800_000_010.0
    m.forget_member("node-1")  # gone, or its shard moved to another replica
    m.set_member("node-2", "Untrusted", 0, None)  # no current verdict: no expiry
    got = _scrape(m)
    assert _value(got, name, member="node-1") is None
    assert _value(got, name, member="node-2") is None
    assert _value(got, "gtvp_members", phase="Untrusted", level="0") == 1


def test_every_component_failure_reason_is_exported() -> None:
    """Each reason the component checks can fail with is listed, so it starts at 0."""
    source = Path(component_signing.__file__).read_text()
    raised = set(re.findall(r'ComponentSignatureError\(\s*"(\w+)"', source))
    assert raised
    assert raised | {"MalformedComponent", "DigestMismatch"} <= set(COMPONENT_FAILURE_REASONS)
