"""Admission webhooks for KubeVirt objects: thin handlers over `gtvp.core.gating`.

The members' verdicts come from the operator's in-memory view (kept current by the Member
watch), so a decision costs no API call. A refusal is raised as `kopf.AdmissionError`,
which reaches the user through kubectl with the message (which member, and why).
On UPDATE (VMs, and VMIs whose level or nodeSelector changes: `gtvp.webhook_config` scopes
what reaches these handlers) the old object is judged too: the admitted level sticks.
`gtvp.handlers.register` registers them (`HANDLERS`, by the hook ids of
`gtvp.webhook_config`) when the operator serves webhooks; a test calls them directly with a
body and a memo.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from gtvp import kube
from gtvp.core.api_resources import VIRTUAL_MACHINE_INSTANCES
from gtvp.core.gating import (
    MAX_GRACE_SECONDS,
    Decision,
    GatingError,
    admitted_level,
    grace_cap,
    level_of,
    selector_level,
    selector_patch,
    validate_vm_update,
    vm_level,
    vm_raise_warning,
)
from gtvp.core.gating import (
    validate_instance as judge_instance,
)
from gtvp.core.gating import (
    validate_instance_update as judge_instance_update,
)
from gtvp.core.gating import (
    validate_migration as judge_migration,
)
from gtvp.core.gating import (
    validate_vm as judge_vm,
)
from gtvp.core.trust import VM_LEVEL_LABEL
from gtvp.http_endpoints import error_line
from gtvp.metrics import METRICS
from gtvp.runtime import Runtime, runtime_of

log = logging.getLogger("gtvp.webhooks")


def _spec(body: kopf.Body) -> dict[str, Any]:
    return dict(body.get("spec") or {})


def _require_loaded(rt: Runtime, kind: str) -> None:
    """Refuse (fail closed) while the operator has not yet loaded the members' verdicts."""
    if not rt.view.loaded:
        METRICS.admission(kind, "denied")
        raise kopf.AdmissionError(
            "gtvp-operator is starting and has not loaded the members' verdicts yet; "
            "retry in a few seconds",
            code=503,
        )


def _vmi(rt: Runtime, namespace: str, name: str, kind: str) -> dict[str, Any]:
    """The migrated VMI, read from the API server (migrations are rare): the watch cache
    may not have seen it yet, or may still hold a namesake deleted while it was away (a
    migration names its VMI by name only), and neither may decide how it is gated."""
    try:
        return kube.get_if_present(rt.clients, VIRTUAL_MACHINE_INSTANCES, name, namespace) or {}
    except Exception as exc:
        METRICS.admission(kind, "denied")
        raise kopf.AdmissionError(
            f"cannot read VirtualMachineInstance {namespace}/{name} to judge this migration "
            f"({error_line(exc)}): retry",  # the API's status, never its headers or body
            code=503,
        ) from exc


def _decide(kind: str, decision: Decision) -> None:
    METRICS.admission(kind, "allowed" if decision.allowed else "denied")
    if not decision.allowed:
        # one bounded line: the message names objects a forged review may have named
        log.info("denied %s: %s", kind, " ".join(decision.message.split())[:500])
        raise kopf.AdmissionError(decision.message, code=403)


def _level(labels: Any, what: str) -> int | None:
    try:
        return level_of(dict(labels or {}))
    except GatingError as exc:
        METRICS.admission(what, "denied")
        raise kopf.AdmissionError(str(exc), code=422) from exc


def mutate_vm(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """Add the trust selector and the level label to a gated VM's template."""
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


def mutate_vmi(
    body: kopf.Body, patch: kopf.Patch, warnings: list[str] | None = None, **_: Any
) -> None:
    """Add the trust selector of a gated VMI's level; bring its shutdown grace period down
    to MAX_GRACE_SECONDS (with a warning to whoever created it)."""
    level = _level(body.metadata.labels, "VirtualMachineInstance")
    if level is None and selector_level(_spec(body).get("nodeSelector")) is None:
        return  # ungated (one with a trust selector alone is gated at its level: capped)
    missing = selector_patch(_spec(body).get("nodeSelector"), level) if level else {}
    if missing:
        patch.spec["nodeSelector"] = missing
    cap = grace_cap(_spec(body).get("terminationGracePeriodSeconds"))
    if cap is not None:
        patch.spec["terminationGracePeriodSeconds"] = cap
        if warnings is not None:
            warnings.append(
                f"terminationGracePeriodSeconds lowered to {cap}: a gated VM must shut down "
                f"within {MAX_GRACE_SECONDS} s when gtvp stops it on a host that lost trust"
            )
    changed = bool(missing) or cap is not None
    METRICS.admission("VirtualMachineInstance", "mutated" if changed else "unchanged")


def _migrated_level(vmi: dict[str, Any]) -> int | None:
    """The admitted level of the migrated VMI (label or trust selector, the higher)."""
    try:
        return admitted_level(
            (vmi.get("metadata") or {}).get("labels"), (vmi.get("spec") or {}).get("nodeSelector")
        )
    except GatingError as exc:
        METRICS.admission("VirtualMachineInstanceMigration", "denied")
        raise kopf.AdmissionError(str(exc), code=422) from exc


def mutate_migration(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Add the trust selector of the migrated VMI's admitted level to the target's."""
    ns = body.metadata.namespace or ""
    vmi = _vmi(
        runtime_of(memo), ns, str(_spec(body).get("vmiName", "")), "VirtualMachineInstanceMigration"
    )
    level = _migrated_level(vmi)
    if level is None:
        return
    missing = selector_patch(_spec(body).get("addedNodeSelector"), level)
    if missing:
        patch.spec["addedNodeSelector"] = missing
    METRICS.admission("VirtualMachineInstanceMigration", "mutated" if missing else "unchanged")


def validate_vm(
    body: kopf.Body, memo: kopf.Memo, warnings: list[str] | None = None, **kwargs: Any
) -> None:
    """A gated VM's level is one digit the policy defines, its template's agrees, and it
    sticks on UPDATE; a level added or raised warns that the running instance keeps its own
    until a restart."""
    vm = dict(body)
    old = kwargs.get("old")  # kopf passes the request's oldObject (None on CREATE)
    levels = _levels(runtime_of(memo))
    if kwargs.get("operation") == "UPDATE" and old is not None:
        sticky = validate_vm_update(old=dict(old), new=vm)
        if not sticky.allowed:
            _decide("VirtualMachine", sticky)
        with contextlib.suppress(GatingError):
            if vm_level(dict(old)) == vm_level(vm):
                levels = None  # a level a policy edit removed does not lock the VM's edits
    _decide("VirtualMachine", judge_vm(vm, levels))
    if kwargs.get("operation") == "UPDATE" and old is not None and warnings is not None:
        said = vm_raise_warning(old=dict(old), new=vm)
        if said is not None:
            warnings.append(said)


def validate_vmi(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    """A gated VMI may start only where a member of its level is trusted; on UPDATE its
    admitted level and trust selector stick."""
    rt = runtime_of(memo)
    old = kwargs.get("old")  # kopf passes the request's oldObject (None on CREATE)
    if kwargs.get("operation") == "UPDATE" and old is not None:
        # only changes of the level or the nodeSelector of a gated VMI, or a raise of its
        # shutdown grace period, get here (matchConditions)
        _require_loaded(rt, "VirtualMachineInstance")
        _decide(
            "VirtualMachineInstance",
            judge_instance_update(
                old=dict(old),
                new=dict(body),
                members=rt.view.member_views(),
                now=dt.datetime.now(dt.UTC),
                levels=_levels(rt),
            ),
        )
        return
    if (
        _level(body.metadata.labels, "VirtualMachineInstance") is not None
        or selector_level(_spec(body).get("nodeSelector")) is not None
    ):
        _require_loaded(rt, "VirtualMachineInstance")
    _decide(
        "VirtualMachineInstance",
        judge_instance(
            name=f"VirtualMachineInstance {body.metadata.namespace}/{body.metadata.name}",
            labels=dict(body.metadata.labels or {}),
            node_selector=_spec(body).get("nodeSelector"),
            members=rt.view.member_views(),
            now=dt.datetime.now(dt.UTC),
            grace=_spec(body).get("terminationGracePeriodSeconds"),
            levels=_levels(rt),
        ),
    )


def _levels(rt: Runtime) -> frozenset[int] | None:
    """The levels the policy in force defines (None: no policy loaded yet)."""
    policy = rt.view.policy
    return None if policy is None else frozenset(lv.level for lv in policy.levels)


def _send_to(spec: Mapping[str, Any]) -> str | None:
    """The receiver of a decentralized migration (`spec.sendTo`), None for an ordinary one."""
    send_to = spec.get("sendTo")
    if send_to is None:
        return None
    return str(send_to.get("connectURL", "")) if isinstance(send_to, Mapping) else ""


def validate_migration(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A migration of a gated VMI may only target members trusted at its admitted level."""
    rt = runtime_of(memo)
    ns = body.metadata.namespace or ""
    vmi_name = str(_spec(body).get("vmiName", ""))
    vmi = _vmi(rt, ns, vmi_name, "VirtualMachineInstanceMigration")
    if _migrated_level(vmi) is not None:
        _require_loaded(rt, "VirtualMachineInstanceMigration")
    _decide(
        "VirtualMachineInstanceMigration",
        judge_migration(
            name=str(body.metadata.name),
            vmi_name=f"{ns}/{vmi_name}",
            vmi_labels=(vmi.get("metadata") or {}).get("labels") or {},
            vmi_node_selector=(vmi.get("spec") or {}).get("nodeSelector"),
            source=(vmi.get("status") or {}).get("nodeName"),
            added_selector=_spec(body).get("addedNodeSelector"),
            send_to=_send_to(_spec(body)),
            members=rt.view.member_views(),
            now=dt.datetime.now(dt.UTC),
        ),
    )


HANDLERS: dict[str, Callable[..., None]] = {
    "gtvp-mutate-vm": mutate_vm,
    "gtvp-mutate-vmi": mutate_vmi,
    "gtvp-mutate-migration": mutate_migration,
    "gtvp-validate-vm": validate_vm,
    "gtvp-validate-vmi": validate_vmi,
    "gtvp-validate-migration": validate_migration,
}
"""The handler of each hook of `gtvp.webhook_config` (which says what reaches it)."""
