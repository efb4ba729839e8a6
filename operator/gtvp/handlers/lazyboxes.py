"""Lazy Boxes: the box loop, the imperative shell around resolve, compose and place.

Boxes are reconciled by one background loop: events mark boxes dirty (a box changed, a
component or policy changed, a member or node changed, the box's VM/VMI/migration changed)
and the loop runs `plan_box` for each, writing only what changed (`box_writes`). The parts
it plans from: the verified components (`components`), the placement hosts (`box_hosts`)
and the resolutions, cached per request, catalogue version, pool cache and what the box runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from gtvp import box_attestation, key_release, kube
from gtvp.cluster_view import Key, key_of
from gtvp.core import boxattest as ba
from gtvp.core.api_resources import LAZY_BOXES
from gtvp.core.boxes import (
    BOOTED_ANNOTATION,
    HOTPLUGGED_ANNOTATION,
    BoxInput,
    Decision,
    Observed,
    failed_verification,
    plan_box,
    someone_elses,
    unschedulable,
)
from gtvp.core.component_checks import resolvable, revokes
from gtvp.core.components import Component, ComponentError, parse_component
from gtvp.core.compose import (
    BOOT_ANNOTATION,
    BOX_LABEL,
    BootPart,
    BoxRef,
    boot_parts,
    data_volume_imports,
    preferred_node,
    remember_boot,
    template_boots,
    translate_legacy,
    vm_parts,
    vmi_boots,
    vouches,
)
from gtvp.core.gating import selector_level
from gtvp.core.resolve import BoxRequest, Unresolvable, resolve
from gtvp.core.timestamps import format_ts
from gtvp.handlers import box_writes
from gtvp.handlers.box_hosts import hosts, pool_cache
from gtvp.handlers.components import spend
from gtvp.handlers.evacuation import evacuate_unattested
from gtvp.handlers.verdict_uses import spend_use
from gtvp.metrics import METRICS
from gtvp.runtime import Runtime

log = logging.getLogger("gtvp.lazyboxes")
WAITING_PHASES = (None, "Pending", "Verifying", "Failed", "Resolving")
WRITERS = 8  # boxes reconciled at once: planning is serialised, API writes overlap
ACTIVE_MIGRATION = (
    "",
    "Pending",
    "Scheduling",
    "Scheduled",
    "PreparingTarget",
    "TargetReady",
    "Running",
)


# -- events -------------------------------------------------------------------------------


def observe_box(rt: Runtime, body: dict[str, Any], event_type: str) -> bool:
    """Record a box event (event loop); True when the box is gone and its VM must go."""
    key = key_of(body)
    if event_type == "DELETED":
        rt.view.observe_box(body, event_type)
        rt.boxes.decided_node.pop(key, None)
        METRICS.boxes.pop(f"{key[0]}/{key[1]}", None)
        return True
    if rt.view.observe_box(body, event_type):
        rt.touch_boxes(key)  # not the echo of our own status write
    return False


def touch_waiting(rt: Runtime) -> None:
    """A member or node changed: boxes that wait for a member are looked at again."""
    waiting = [
        k
        for k, b in list(rt.view.boxes.items())
        if (b.get("status") or {}).get("phase") in (None, "Pending")
    ]
    if waiting:
        rt.touch_boxes(*waiting)


def observe_kubevirt(rt: Runtime, body: Mapping[str, Any]) -> None:
    """A VM, VMI or migration changed: the box it belongs to is looked at again."""
    meta = body.get("metadata") or {}
    ns = str(meta.get("namespace", ""))
    name = (meta.get("labels") or {}).get(BOX_LABEL) or (body.get("spec") or {}).get("vmiName")
    if name and (ns, str(name)) in rt.view.boxes:
        rt.touch_boxes((ns, str(name)))


# -- resolution ---------------------------------------------------------------------------


def _catalogue(rt: Runtime) -> list[Component]:
    """Every readable component whose verification did not fail: unreadable ones are never
    used, nor failed ones (a revoked publisher's, an unsigned one), so a box falls back to a
    version that verifies and no failed newer one holds it back."""
    checks = rt.boxes.checks
    return [c for c in _readable(rt) if resolvable(checks.get(c.object_name))]


def _readable(rt: Runtime) -> list[Component]:
    """Every readable component (parsed once per change)."""
    memory = rt.boxes
    version, cached = memory.catalogue_cache
    if version == memory.catalogue_version:
        return cached
    out = []
    for name, body in list(rt.view.components.items()):
        rv = str((body.get("metadata") or {}).get("resourceVersion", ""))
        hit = memory.parsed.get(name)
        if hit is None or hit[0] != rv:
            try:
                comp: Component | None = parse_component(body)
            except ComponentError:
                comp = None  # its status says why
            hit = (rv, comp)
            memory.parsed[name] = hit
        if hit[1] is not None:
            out.append(hit[1])
    out.sort(key=lambda c: c.object_name)
    memory.catalogue_cache = (memory.catalogue_version, out)
    return out


def resolve_cached(
    rt: Runtime,
    spec: Mapping[str, Any],
    cached: frozenset[str],
    *,
    with_failed: bool = False,
    running: frozenset[str] = frozenset(),
) -> list[Component]:
    """`resolve` over the components that did not fail verification (`with_failed`: over
    every readable one), remembered per (request, catalogue version, pool cache, what the
    box runs)."""
    request = BoxRequest.from_spec(spec)
    fields = ("application", "dependencies", "requestedComponents", "level")
    key = (
        json.dumps({f: spec.get(f) for f in fields}, sort_keys=True),
        rt.boxes.catalogue_version,
        cached,
        with_failed,
        running,
    )
    resolutions = rt.boxes.resolutions
    hit = resolutions.get(key)
    if hit is None:
        try:
            catalogue = _readable(rt) if with_failed else _catalogue(rt)
            hit = resolve(request, catalogue, cached, running)
        except Unresolvable as exc:
            hit = exc
        if len(resolutions) > 4096:
            resolutions.clear()
        resolutions[key] = hit
    if isinstance(hit, Unresolvable):
        raise hit
    return list(hit)


# -- planning -----------------------------------------------------------------------------


def _migrating(rt: Runtime, key: Key) -> bool:
    return any(
        ns == key[0]
        and (m.get("spec") or {}).get("vmiName") == key[1]
        and (m.get("status") or {}).get("phase", "") in ACTIVE_MIGRATION
        for (ns, _), m in list(rt.view.migrations.items())
    )


def observed(rt: Runtime, key: Key) -> Observed:
    """What runs for the box: its VM, VMI and migrations, as the planner needs them."""
    vm = rt.view.vms.get(key)
    vmi = rt.view.vmis.get(key)
    box_uid = str(((rt.view.boxes.get(key) or {}).get("metadata") or {}).get("uid", ""))
    foreign = someone_elses(box_uid, vm, vmi)
    if foreign is not None:
        return Observed(someone_elses=foreign)
    if vm is None:
        return Observed()
    ann = (vm.get("metadata") or {}).get("annotations") or {}
    spec = vm.get("spec") or {}
    tmpl = spec.get("template") or {}
    vmi_status = (vmi or {}).get("status") or {}
    vmi_annotations = ((vmi or {}).get("metadata") or {}).get("annotations") or {}
    return Observed(
        vm_exists=True,
        booted=tuple(n for n in str(ann.get(BOOTED_ANNOTATION, "")).split(",") if n),
        hotplugged=tuple(n for n in str(ann.get(HOTPLUGGED_ANNOTATION, "")).split(",") if n),
        vm_node=preferred_node(tmpl.get("spec") or {}),
        vm_running=spec.get("runStrategy", "Always") != "Halted",
        vmi_phase=vmi_status.get("phase") if vmi else None,
        vmi_reason=vmi_status.get("reason") if vmi else None,
        vmi_node=vmi_status.get("nodeName") if vmi else None,
        vmi_unschedulable=unschedulable(vmi_status),
        migrating=_migrating(rt, key),
        vm_boot=((tmpl.get("metadata") or {}).get("annotations") or {}).get(BOOT_ANNOTATION),
        vmi_boot=vmi_annotations.get(BOOT_ANNOTATION) if vmi else None,
        vm_boots=template_boots(vm),
        # a VMI that boots no kernel at all is not the composition either ("")
        vmi_boots=(vmi_boots(vmi) or "") if vmi is not None else None,
        vmi_created=((vmi or {}).get("metadata") or {}).get("creationTimestamp"),
        vm_parts=vm_parts(vm),
        vmi_parts=_vmi_parts(vm, vmi),
        vm_level=selector_level((tmpl.get("spec") or {}).get("nodeSelector")),
    )


def _vmi_parts(vm: Mapping[str, Any], vmi: Mapping[str, Any] | None) -> tuple[BootPart, ...]:
    """`boot_parts` of the box's VMI (its hot-plugged DataVolumes as its VM imports them)."""
    return () if vmi is None else boot_parts(vmi.get("spec"), data_volume_imports(vm))


def unvouched(rt: Runtime, parts: Iterable[BootPart]) -> dict[BootPart, str]:
    """Of `parts` (what a box's VM and VMI boot, `compose.boot_parts`), those no OSComponent
    vouches for now (part -> why): every component of that digest in that role
    (`compose.vouches`) failed its check, or none is left (deleted). Nothing until the pool
    is loaded (the components are listed then, so one not there is gone); a component not
    checked yet vouches (the box waits for its check, as for resolution)."""
    if not rt.view.loaded:
        return {}
    index = _by_digest(rt)
    out = {}
    for part in parts:
        comps = [c for c in index.get(part[1], []) if vouches(c, part)]
        if not comps and any(c.type == "initrd" for c in index.get(part[1], [])):
            out[part] = (
                "a component of type initrd attached as a disk, which nothing checks against "
                "a pinned digest (no longer composed)"
            )
            continue
        if not comps:
            out[part] = "no readable OSComponent of it is left (deleted, or no longer readable)"
            continue
        checks = [rt.boxes.checks.get(c.object_name) for c in comps]
        if not all(revokes(chk) for chk in checks):  # verified, unchecked, or undecided
            continue
        failed = next(chk for chk in checks if chk is not None)
        out[part] = f"{comps[0].label} failed verification: {failed.reason}: {failed.message}"
    return out


def _by_digest(rt: Runtime) -> dict[str, list[Component]]:
    """The readable components by digest (once per catalogue change)."""
    memory = rt.boxes
    version, cached = memory.digest_index
    if version == memory.catalogue_version:
        return cached
    index: dict[str, list[Component]] = {}
    for c in _readable(rt):
        index.setdefault(c.digest, []).append(c)
    memory.digest_index = (memory.catalogue_version, index)
    return index


def _preferred(
    rt: Runtime, box: Mapping[str, Any], seen: Observed, now: dt.datetime
) -> frozenset[str]:
    """The digests whose component names resolution prefers where the choice is free (glibc
    or musl for libc): for a box not placed yet, what the pool's members cache; for a placed
    one, what it was composed of (its `status.resolved`, written by gtvp), so that what a
    member says it caches (its Node's images, which root on it can write) never changes a
    running box's choice and restarts it."""
    resolved = ((box.get("status") or {}).get("resolved")) or []
    if seen.vm_exists and resolved:
        return frozenset(str(r.get("digest")) for r in resolved if isinstance(r, Mapping))
    return pool_cache(rt, now)


def _runs(box: Mapping[str, Any], seen: Observed) -> frozenset[str]:
    """The OSComponent objects a placed box was composed of, as gtvp recorded them
    (`status.resolved[].object`, which only gtvp writes; never the VM's annotation, which
    whoever may edit the VM could point at another build of the same version, nor grow
    without bound in the resolution cache's keys)."""
    resolved = ((box.get("status") or {}).get("resolved")) or []
    if not seen.vm_exists:
        return frozenset()
    return frozenset(
        str(r["object"]) for r in resolved if isinstance(r, Mapping) and r.get("object")
    )


def _failed_instead(rt: Runtime, spec: Mapping[str, Any]) -> tuple[str, str] | None:
    """Why a box that resolves over no verified components would resolve only with a failed
    one: the component, and its check's reason (None when even those would not do)."""
    try:
        comps = resolve_cached(rt, spec, frozenset(), with_failed=True)
    except Unresolvable:
        return None
    checks = rt.boxes.checks
    for c in comps:
        check = checks.get(c.object_name)
        if check is not None and not resolvable(check):
            return "ComponentFailedVerification", failed_verification(c, check)
    return None


def box_input(rt: Runtime, key: Key, now: dt.datetime) -> BoxInput:
    box = rt.view.boxes[key]
    meta, spec = box.get("metadata") or {}, box.get("spec") or {}
    ref = BoxRef(key[1], key[0], str(meta.get("uid", "")))
    seen = observed(rt, key)
    common: dict[str, Any] = {
        "ref": ref,
        "spec": spec,
        "generation": int(meta.get("generation", 0) or 0),
        "status": _translated(rt, key, box),
        # placement hosts matter only before the first placement (the costly part)
        "hosts": [] if seen.vm_exists or seen.someone_elses else hosts(rt, now, exclude=key),
        "observed": seen,
        # armed before it is written: the box names Secrets, or the policy attests boxes
        "armed": ba.attests_boxes(rt.enforced_spec()) or key_release.names_secrets(box),
    }
    checks = rt.boxes.checks
    running = {n: checks[n] for n in (*seen.booted, *seen.hotplugged) if n in checks}
    common["unvouched"] = unvouched(rt, {*seen.vm_parts, *seen.vmi_parts})
    try:
        comps = resolve_cached(rt, spec, _preferred(rt, box, seen, now), running=_runs(box, seen))
    except Unresolvable as exc:
        failure = _failed_instead(rt, spec) or (exc.reason, exc.message)
        return BoxInput(components=None, failure=failure, checks=running, **common)
    found = {c.object_name: checks[c.object_name] for c in comps if c.object_name in checks}
    return BoxInput(components=comps, checks={**running, **found}, **common)


def _translated(rt: Runtime, key: Key, box: Mapping[str, Any]) -> Mapping[str, Any]:
    """The box's status, its compositions recorded by an older gtvp recorded anew for its VM
    and VMI where they are gated as gtvp composes them (`compose.translate_legacy`)."""
    status = box.get("status") or {}
    try:
        level = int((box.get("spec") or {}).get("level", 0))
    except (TypeError, ValueError):
        return status
    vm = rt.view.vms.get(key) or {}
    template = (vm.get("spec") or {}).get("template")
    return translate_legacy(status, level, template, rt.view.vmis.get(key))


def _plan(rt: Runtime, key: Key) -> Decision:
    """The box's next step (placements see each other's reservations: one plan at a time)."""
    with rt.boxes.plan_lock:
        now = dt.datetime.now(dt.UTC)
        decision = plan_box(box_input(rt, key, now), now)
        if decision.uses:
            failed = spend(rt, decision.uses)
            if failed:  # a component failed its re-check: plan again, it is now blocked
                decision = plan_box(box_input(rt, key, now), now)
        if decision.placement is not None and decision.placement.node:
            rt.boxes.decided_node[key] = decision.placement.node
            # a use of the member's verdict, spent after the batch: until then hosts()
            # counts it, so the member is not given more boxes than it has uses left
            rt.boxes.unspent[decision.placement.node] += 1
    return decision


def reconcile_box(rt: Runtime, key: Key) -> Decision | None:
    """Plan and carry out one box's next step (blocking: run it in a thread)."""
    if key not in rt.view.boxes:
        return None
    planned = _plan(rt, key)
    try:
        got = _armed(rt, key, planned)
    except Exception:
        # arming failed in a way no answer names (a timeout, a connection the API server
        # dropped): the VM is not written, so the use counted for it is not spent either
        # (every pass would spend one); the box is looked at again
        _not_placed(rt, planned)
        raise
    if got is None:
        return _not_placed(rt, planned)
    decision, attested = got
    if decision.vm is not None:  # what the armed VM boots is the composition gtvp vouches for
        now = dt.datetime.now(dt.UTC)
        decision = dataclasses.replace(decision, status=recorded(decision, now))
    if decision.vm is not None and not box_writes.write_vm(rt, key, decision.vm):
        return decision
    if decision.restart:
        box_writes.restart_vmi(rt, key)
    if decision.placement is not None:
        if decision.placement.node:
            METRICS.placements.labels("placed").inc()
            total = decision.placement.total_bytes or 1
            METRICS.placement_cached_ratio.observe(decision.placement.cached_bytes / total)
        else:
            METRICS.placements.labels("pending").inc()
    box_writes.write_status(rt, key, decision.status, attestation=_attestation(decision, attested))
    METRICS.boxes[f"{key[0]}/{key[1]}"] = str(decision.status.get("phase"))
    if decision.event is not None:
        etype, reason, message = decision.event
        kube.post_object_event(
            rt.clients,
            LAZY_BOXES,
            rt.view.boxes.get(key) or {},
            name=key[1],
            namespace=key[0],
            type_=etype,
            reason=reason,
            message=message,
        )
    return decision


def _armed(
    rt: Runtime, key: Key, decision: Decision
) -> tuple[Decision, box_attestation.Armed | str | None] | None:
    """The decision with its VM armed (its attestation credential, its key-release
    credential: `box_attestation.arm`, `key_release.arm`), and the attestation arming's
    outcome; None when it cannot be armed (the box Failed, said once)."""
    attested = (
        box_attestation.arm(rt, key, decision.vm, restart=decision.restart)
        if decision.vm is not None
        else None
    )
    if attested is not None:
        armed = _attested(rt, key, decision, attested)
        return None if armed is None else (armed, attested)
    if decision.vm is not None and key_release.names_secrets(rt.view.boxes.get(key) or {}):
        armed = _arm(rt, key, decision)
        return None if armed is None else (armed, attested)
    return decision, attested


def _attestation(
    decision: Decision, attested: box_attestation.Armed | str | None
) -> dict[str, Any] | Literal["keep"] | None:
    """What the status write does with `status.attestation`: put in place the attestation
    of a credential this pass armed anew (`Armed.fresh`), remove it where the plan did
    (None), else keep what the view holds (the endpoint's and the sweep's writes, made
    meanwhile)."""
    if "attestation" not in decision.status:
        return None
    if isinstance(attested, box_attestation.Armed) and attested.fresh:
        return attested.attestation
    return box_writes.KEEP


def recorded(decision: Decision, now: dt.datetime) -> dict[str, Any]:
    """The status to write with the VM about to be written (armed): what it boots first in
    `status.composedBoots` (alone when it replaces them all: `forget_boots`)."""
    status = decision.status
    base = {} if decision.forget_boots else status
    return {**status, **remember_boot(base, template_boots(decision.vm or {}), format_ts(now))}


def _not_placed(rt: Runtime, decision: Decision) -> Decision:
    """A placement whose VM could not be armed (so is not written): the member's verdict
    use `_plan` counted for it is not spent (the box, Failed, is planned again every pass:
    a box that cannot be armed must not drain its member's uses)."""
    node = decision.placement.node if decision.placement is not None else None
    with rt.boxes.plan_lock:  # `_plan` counts placements under it, from other threads
        if node and rt.boxes.unspent.get(node, 0) > 0:
            rt.boxes.unspent[node] -= 1
    return decision


def _attested(
    rt: Runtime, key: Key, decision: Decision, armed: box_attestation.Armed | str
) -> Decision | None:
    """A box under a policy that attests boxes: its VM boots with its attestation
    credential (`gtvp.box_attestation.arm`); None (the box Failed, said once) when it
    cannot."""
    if not isinstance(armed, str):
        status = {**decision.status, "attestation": armed.attestation}
        return dataclasses.replace(decision, vm=armed.vm, status=status)
    _failed(
        rt,
        key,
        decision,
        f"not started: it cannot be attested: {armed}",
        "BoxAttestationUnavailable",
    )
    return None


def _arm(rt: Runtime, key: Key, decision: Decision) -> Decision | None:
    """A box that names Secrets: its VM boots with its key-release credential (fresh, or
    the one its running guest booted with: `gtvp.key_release.arm`); None (the box Failed,
    said once) when it cannot."""
    armed = key_release.arm(rt, key, decision.vm or {}, restart=decision.restart)
    if not isinstance(armed, str):
        return dataclasses.replace(decision, vm=armed)
    message = f"not started: its Secrets could not be released: {armed}"
    _failed(rt, key, decision, message, "KeyReleaseUnavailable")
    return None


def _failed(rt: Runtime, key: Key, decision: Decision, message: str, reason: str) -> None:
    """The box Failed with `message`; a Warning Event `reason` when the message is new."""
    before = (rt.view.boxes.get(key) or {}).get("status") or {}
    box_writes.write_status(rt, key, {**decision.status, "phase": "Failed", "message": message})
    if before.get("message") != message:
        log.warning("box %s/%s: %s", *key, message)
        kube.post_object_event(
            rt.clients,
            LAZY_BOXES,
            rt.view.boxes.get(key) or {},
            name=key[1],
            namespace=key[0],
            type_="Warning",
            reason=reason,
            message=message,
        )


# -- the loop -----------------------------------------------------------------------------


async def box_loop(rt: Runtime, period: float = 5.0) -> None:
    """Reconcile dirty boxes; every `period` seconds look at all of them again."""
    memory = rt.boxes
    memory.wakeup = asyncio.Event()
    limit = asyncio.Semaphore(WRITERS)
    loop = asyncio.get_running_loop()
    next_full = loop.time() + period
    while not rt.stop.is_set():
        timeout = max(next_full - loop.time(), 0.05)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(memory.wakeup.wait(), timeout=timeout)
        memory.wakeup.clear()
        if not rt.coordination.leads():  # the leader places boxes (it is told when it leads)
            memory.dirty.clear()
            continue
        if loop.time() >= next_full:  # time-driven changes matter to boxes still waiting
            memory.dirty.update(
                k
                for k, b in list(rt.view.boxes.items())
                if (b.get("status") or {}).get("phase") in WAITING_PHASES
            )
            next_full = loop.time() + period
            await asyncio.to_thread(_sweep_safely, rt)
            try:
                await evacuate_unattested(rt)  # boxes whose vTPM evidence failed where they run
            except Exception:
                log.exception("evacuating boxes whose attestation failed went wrong; next pass")
        batch = sorted(memory.dirty)
        memory.dirty.clear()
        await asyncio.gather(*(_reconcile_safely(rt, key, limit) for key in batch))
        await _spend_placements(rt)


async def _reconcile_safely(rt: Runtime, key: Key, limit: asyncio.Semaphore) -> None:
    async with limit:
        try:
            await asyncio.to_thread(reconcile_box, rt, key)
        except Exception:  # one box must not stop the others
            log.exception("reconciling LazyBox %s/%s failed; retrying", *key)
            rt.boxes.dirty.add(key)


async def _spend_placements(rt: Runtime) -> None:
    """A placement is a decision that relies on the member's verdict: each spends one use,
    the batch's placements on one member in one write (not one Member write per box), the
    members' writes at once (WRITERS at a time): one after the other, they held the next
    batch back for a round trip per member the batch placed on."""
    unspent = rt.boxes.unspent
    limit = asyncio.Semaphore(WRITERS)

    async def spend(node: str, uses: int) -> None:
        async with limit:
            try:
                await spend_use(rt, node, uses)
            except Exception:  # kept unspent (and counted against the member): next pass
                log.exception("spending %d verdict use(s) of member %s failed", uses, node)
                return
        unspent[node] -= uses
        if unspent[node] <= 0:
            del unspent[node]

    await asyncio.gather(*(spend(node, uses) for node, uses in list(unspent.items())))


def _sweep_safely(rt: Runtime) -> None:
    try:
        box_writes.sweep_orphans(rt)
    except Exception:
        log.exception("sweeping orphan VMs failed")
    try:
        key_release.arm_gated_vms(rt)  # gated VMs that name Secrets get their credential
    except Exception:
        log.exception("arming the key-release credentials of gated VMs failed")
    try:
        box_attestation.sweep_overdue(rt)  # boxes whose guest does not attest in time
    except Exception:
        log.exception("looking for boxes whose attestation is overdue failed")
