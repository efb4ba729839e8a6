"""Admission webhooks for KubeVirt objects: thin kopf handlers over `gtvp.core.gating`.

The members' verdicts come from the operator's in-memory view (kept current by the Member
watch), so a decision costs no API call. A refusal is raised as `kopf.AdmissionError`,
which reaches the user through kubectl with the message (which member, and why).
On UPDATE (VMs, and VMIs whose level or nodeSelector changes: `gtvp.webhook_config` scopes
what reaches these handlers) the old object is judged too: the admitted level sticks.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import kopf

from gtvp.core.gating import (
    Decision,
    GatingError,
    admitted_level,
    level_of,
    selector_patch,
    validate_instance,
    validate_instance_update,
    validate_migration,
    validate_vm,
    validate_vm_update,
    vm_level,
)
from gtvp.core.trust import VM_LEVEL_LABEL, MemberView, member_view
from gtvp.handlers import kubevirt, members
from gtvp.metrics import METRICS

log = logging.getLogger("gtvp.webhooks")
KV = ("kubevirt.io", "v1")


def _spec(body: kopf.Body) -> dict[str, Any]:
    return dict(body.get("spec") or {})


def _members() -> list[MemberView]:
    return [
        member_view(name, body.get("status") or {}) for name, body in members.STATE.bodies.items()
    ]


def _require_loaded(kind: str) -> None:
    """Refuse (fail closed) while the operator has not yet loaded the members' verdicts."""
    if not members.STATE.loaded:
        METRICS.admission(kind, "denied")
        raise kopf.AdmissionError(
            "gtvp-operator is starting and has not loaded the members' verdicts yet; "
            "retry in a few seconds",
            code=503,
        )


def _vmi(namespace: str, name: str, kind: str) -> dict[str, Any]:
    """The migrated VMI (watch cache, else a GET): a VMI not yet seen must not skip gating."""
    try:
        return kubevirt.lookup_vmi(namespace, name) or {}
    except Exception as exc:
        METRICS.admission(kind, "denied")
        raise kopf.AdmissionError(
            f"cannot read VirtualMachineInstance {namespace}/{name} to judge this migration: {exc}",
            code=503,
        ) from exc


def _decide(kind: str, decision: Decision) -> None:
    METRICS.admission(kind, "allowed" if decision.allowed else "denied")
    if not decision.allowed:
        log.info("denied %s: %s", kind, decision.message)
        raise kopf.AdmissionError(decision.message, code=403)


def _level(labels: Any, what: str) -> int | None:
    try:
        return level_of(dict(labels or {}))
    except GatingError as exc:
        METRICS.admission(what, "denied")
        raise kopf.AdmissionError(str(exc), code=422) from exc


@kopf.on.mutate(*KV, "virtualmachines", id="gtvp-mutate-vm", operations=["CREATE", "UPDATE"])
def mutate_vm(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    try:
        level = vm_level(dict(body))
    except GatingError as exc:
        METRICS.admission("VirtualMachine", "denied")
        raise kopf.AdmissionError(str(exc), code=422) from exc
    if level is None:
        return
    tmpl = _spec(body).get("template") or {}
    selector = ((tmpl.get("spec") or {}).get("nodeSelector")) or {}
    missing = selector_patch(selector, level)
    tmpl_labels = ((tmpl.get("metadata") or {}).get("labels")) or {}
    spec_patch: dict[str, Any] = {}
    if missing:
        spec_patch["spec"] = {"nodeSelector": missing}
    if tmpl_labels.get(VM_LEVEL_LABEL) != str(level):
        spec_patch["metadata"] = {"labels": {VM_LEVEL_LABEL: str(level)}}
    if spec_patch:
        patch.spec["template"] = spec_patch
    METRICS.admission("VirtualMachine", "mutated" if spec_patch else "unchanged")


@kopf.on.mutate(*KV, "virtualmachineinstances", id="gtvp-mutate-vmi", operations=["CREATE"])
def mutate_vmi(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    level = _level(body.metadata.labels, "VirtualMachineInstance")
    if level is None:
        return
    missing = selector_patch(_spec(body).get("nodeSelector"), level)
    if missing:
        patch.spec["nodeSelector"] = missing
    METRICS.admission("VirtualMachineInstance", "mutated" if missing else "unchanged")


def _migrated_level(vmi: dict[str, Any]) -> int | None:
    """The admitted level of the migrated VMI (label or trust selector, the higher)."""
    try:
        return admitted_level(
            (vmi.get("metadata") or {}).get("labels"), (vmi.get("spec") or {}).get("nodeSelector")
        )
    except GatingError as exc:
        METRICS.admission("VirtualMachineInstanceMigration", "denied")
        raise kopf.AdmissionError(str(exc), code=422) from exc


@kopf.on.mutate(
    *KV, "virtualmachineinstancemigrations", id="gtvp-mutate-migration", operations=["CREATE"]
)
def mutate_migration(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    ns = body.metadata.namespace or ""
    vmi = _vmi(ns, str(_spec(body).get("vmiName", "")), "VirtualMachineInstanceMigration")
    level = _migrated_level(vmi)
    if level is None:
        return
    missing = selector_patch(_spec(body).get("addedNodeSelector"), level)
    if missing:
        patch.spec["addedNodeSelector"] = missing
    METRICS.admission("VirtualMachineInstanceMigration", "mutated" if missing else "unchanged")


@kopf.on.validate(*KV, "virtualmachines", id="gtvp-validate-vm", operations=["CREATE", "UPDATE"])
def validate_vm_(body: kopf.Body, **kwargs: Any) -> None:
    vm = dict(body)
    old = kwargs.get("old")  # kopf passes the request's oldObject (None on CREATE)
    if kwargs.get("operation") == "UPDATE" and old is not None:
        sticky = validate_vm_update(old=dict(old), new=vm)
        if not sticky.allowed:
            _decide("VirtualMachine", sticky)
    _decide("VirtualMachine", validate_vm(vm))


@kopf.on.validate(
    *KV, "virtualmachineinstances", id="gtvp-validate-vmi", operations=["CREATE", "UPDATE"]
)
def validate_vmi(body: kopf.Body, **kwargs: Any) -> None:
    old = kwargs.get("old")  # kopf passes the request's oldObject (None on CREATE)
    if kwargs.get("operation") == "UPDATE" and old is not None:
        # only changes of the level or the nodeSelector of a gated VMI get here (matchConditions)
        _require_loaded("VirtualMachineInstance")
        _decide(
            "VirtualMachineInstance",
            validate_instance_update(
                old=dict(old), new=dict(body), members=_members(), now=dt.datetime.now(dt.UTC)
            ),
        )
        return
    if _level(body.metadata.labels, "VirtualMachineInstance") is not None:
        _require_loaded("VirtualMachineInstance")
    _decide(
        "VirtualMachineInstance",
        validate_instance(
            name=f"VirtualMachineInstance {body.metadata.namespace}/{body.metadata.name}",
            labels=dict(body.metadata.labels or {}),
            node_selector=_spec(body).get("nodeSelector"),
            members=_members(),
            now=dt.datetime.now(dt.UTC),
        ),
    )


@kopf.on.validate(
    *KV, "virtualmachineinstancemigrations", id="gtvp-validate-migration", operations=["CREATE"]
)
def validate_migration_(body: kopf.Body, **_: Any) -> None:
    ns = body.metadata.namespace or ""
    vmi_name = str(_spec(body).get("vmiName", ""))
    vmi = _vmi(ns, vmi_name, "VirtualMachineInstanceMigration")
    if _migrated_level(vmi) is not None:
        _require_loaded("VirtualMachineInstanceMigration")
    _decide(
        "VirtualMachineInstanceMigration",
        validate_migration(
            name=str(body.metadata.name),
            vmi_name=f"{ns}/{vmi_name}",
            vmi_labels=(vmi.get("metadata") or {}).get("labels") or {},
            vmi_node_selector=(vmi.get("spec") or {}).get("nodeSelector"),
            source=(vmi.get("status") or {}).get("nodeName"),
            added_selector=_spec(body).get("addedNodeSelector"),
            members=_members(),
            now=dt.datetime.now(dt.UTC),
        ),
    )
