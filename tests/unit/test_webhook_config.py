"""The webhook configurations' scope: which requests reach gtvp at all (issue #10 item 7).

What the CEL does is tested on the real API server (tests/e2e/test_gating_escapes.py, with the
operator down); here, that the rendering holds together."""

from __future__ import annotations

from typing import Any

from gtvp import webhook_config
from gtvp.core.gating import TRUST_KEYS
from gtvp.core.trust import VM_LEVEL_LABEL


def _hooks() -> list[dict[str, Any]]:
    configs = webhook_config.webhook_configurations("https://h:1/", b"ca")
    return [h for c in configs if c["metadata"]["name"] == "gtvp" for h in c["webhooks"]]


def test_every_named_condition_exists_and_reads_gtvps_own_keys() -> None:
    cel = webhook_config.match_conditions()
    for hook in (*webhook_config.MUTATING, *webhook_config.VALIDATING):
        assert set(hook.match_conditions) <= set(cel), hook.id
    assert all(f"'{VM_LEVEL_LABEL}'" in cel[n] for n in ("gated-vm", "gated-vmi"))
    assert f"'{TRUST_KEYS}'" in cel["gated-vmi"]
    assert "oldObject" in cel["gated-vm"]  # removing the label on an UPDATE still reaches gtvp
    assert "oldObject" in cel["gated-vmi"]


def test_only_kube_system_is_never_gated() -> None:
    """gtvp's own namespace is gated too: none of gtvp's objects is a VM, and a VM there (a
    release in `default`) would otherwise run ungated."""
    for hook in _hooks():
        assert hook["namespaceSelector"] == {
            "matchExpressions": [
                {
                    "key": "kubernetes.io/metadata.name",
                    "operator": "NotIn",
                    "values": ["kube-system"],
                }
            ]
        }


def test_vms_and_vmis_are_filtered_and_migrations_always_reach_gtvp() -> None:
    by_name = {str(h["name"]): h for h in _hooks()}
    assert "matchConditions" not in by_name["gtvp-mutate-migration.gtvp.io"]
    assert "matchConditions" not in by_name["gtvp-validate-migration.gtvp.io"]
    for name in ("gtvp-mutate-vm", "gtvp-validate-vm"):
        conditions = [c["name"] for c in by_name[f"{name}.gtvp.io"]["matchConditions"]]
        assert conditions == ["gated-vm", "vm-gating-change"]
    validate_vmi = by_name["gtvp-validate-vmi.gtvp.io"]
    assert validate_vmi["rules"] == [
        {
            "apiGroups": ["kubevirt.io"],
            "apiVersions": ["v1"],
            "resources": ["virtualmachineinstances"],
            "operations": ["CREATE", "UPDATE"],
            "scope": "Namespaced",
        }
    ]
    assert [c["name"] for c in validate_vmi["matchConditions"]] == [
        "gated-vmi",
        "gating-change",
    ]
    assert all(h["failurePolicy"] == "Fail" for h in by_name.values())
    assert by_name["gtvp-validate-vm.gtvp.io"]["clientConfig"] == {
        "url": "https://h:1/gtvp-validate-vm",
        "caBundle": "Y2E=",
    }
