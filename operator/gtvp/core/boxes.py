"""The Lazy Box lifecycle: from a box, its resolution and what is running, to what to do.

`plan_box` is pure. The shell (gtvp.handlers.lazyboxes) resolves the box, makes sure each
resolved component has a fresh verification check, builds the placement hosts and the
observed VM/VMI state, calls `plan_box`, and carries out the decision: one status write,
at most one VM write, possibly a VMI delete (restart) and an Event.

Phases: Pending (no member qualifies), Resolving/Verifying (a step is waiting),
Placing (VM written, VMI not running yet), Running, Migrating, Failed (cannot resolve, a
component failed verification, the composition is not bootable, or its VM failed: the
VMI's reason, e.g. the box init refusing a disk whose bytes differ from their pin).
Upgrades: when the resolved set differs from the VM's composition, the box rolls onto the
new set as `upgradePolicy` says — Restart rewrites the VM and restarts its VMI; LiveUpdate
rewrites the VM and leaves the running VMI alone with `RestartRequired` (KubeVirt cannot
swap a kernel or container disk in a running VM). A purely additive change of libraries or
applications with `onMissingDependency: HotPlug` is attached as hot-pluggable DataVolumes
(the only disks KubeVirt hot-plugs) without a restart.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gtvp.core.component_checks import Check, revokes
from gtvp.core.components import Component
from gtvp.core.compose import (
    NAMED_DISK_TYPES,
    BootPart,
    BoxRef,
    CompositionError,
    compose_vm,
    composed_boots,
    remember_boot,
    runs_composition,
    template_boots,
    with_cloud_init_secret,
)
from gtvp.core.conditions import merge_conditions
from gtvp.core.footprint import box_asks
from gtvp.core.keyrelease import cloud_init_secret
from gtvp.core.placement import Host, Placement, place
from gtvp.core.quantity import cpu_millis, memory_bytes
from gtvp.core.resolve import describe
from gtvp.core.timestamps import format_ts

BOOTED_ANNOTATION = "gtvp.io/components"
HOTPLUGGED_ANNOTATION = "gtvp.io/hotplugged"


@dataclass(frozen=True)
class Observed:
    """What runs for the box now (from the VM, VMI and migration caches)."""

    vm_exists: bool = False
    booted: tuple[str, ...] = ()  # component object names the VM boots with
    hotplugged: tuple[str, ...] = ()
    vm_node: str | None = None  # the member the VM prefers
    vm_running: bool = True
    vmi_phase: str | None = None
    vmi_reason: str | None = None  # why the VMI failed (its status.reason)
    vmi_node: str | None = None
    vmi_unschedulable: str | None = None  # the scheduler's message while it cannot place it
    migrating: bool = False
    vm_boot: str | None = None  # composition the VM template boots (BOOT_ANNOTATION)
    vmi_boot: str | None = None  # composition the running VMI booted
    vm_boots: str | None = None  # what the VM template boots (`compose.composed_boot`)
    vmi_boots: str | None = None  # what the VMI boots (None: no VMI; "": no kernel)
    vmi_created: str | None = None  # the VMI's creationTimestamp
    someone_elses: str | None = None  # a VM/VMI of the box's name is not its (`someone_elses`)
    vm_parts: tuple[BootPart, ...] = ()  # the component images the VM boots (`vm_parts`)
    vmi_parts: tuple[BootPart, ...] = ()  # ... and its VMI (`compose.boot_parts`)
    vm_level: int | None = None  # the level its template's trust selector keeps it to


@dataclass(frozen=True)
class Decision:
    status: dict[str, Any]
    vm: dict[str, Any] | None = None  # write (create or replace) this VM
    restart: bool = False  # delete the VMI so that the new template boots
    uses: tuple[tuple[str, str], ...] = ()  # components whose use to spend: (name, uid)
    event: tuple[str, str, str] | None = None  # type, reason, message
    placement: Placement | None = None
    forget_boots: bool = False
    """The VM written replaces every composition gtvp vouched for (`status.composedBoots`):
    a component they boot no longer verifies. The shell records what the VM it writes boots
    once armed (`compose.remember_boot`)."""


@dataclass(frozen=True)
class BoxInput:
    ref: BoxRef
    spec: Mapping[str, Any]
    generation: int
    status: Mapping[str, Any]
    components: Sequence[Component] | None  # None: resolution failed
    failure: tuple[str, str] | None = None  # (reason, message) when resolution failed
    checks: Mapping[str, Check] = field(default_factory=dict)
    """The checks of the resolved components and of those the VM boots now."""
    hosts: Sequence[Host] = ()
    observed: Observed = Observed()
    unvouched: Mapping[BootPart, str] = field(default_factory=dict)
    """Of the images the box's VM and VMI boot, those no OSComponent vouches for any more
    in the role they have there (part -> why: `compose.vouches`): every such component
    failed its check (a revocation, a publisher key removed) or none is left (deleted)."""
    armed: bool = False
    """The box's VM is armed before it is written (its cloud-init moved into the box's
    Secret): the box names Secrets, or the policy attests boxes. Such a box gets no
    hot-plugged disk, which the box init neither checks nor measures (and whose source
    `composedBoots` does not cover): missing dependencies are recomposed instead."""


NAME_TAKEN = "VMNameTaken"
STARTING = "the VM is starting"  # a placed box's message until its VMI runs
UNSCHEDULABLE = "the scheduler cannot place the VM"  # ... on MEMBER: its message


def _resolved(components: Sequence[Component]) -> list[dict[str, Any]]:
    return [
        {
            "name": c.name,
            "version": str(c.version),
            "digest": c.digest,
            "type": c.type,
            "sizeBytes": c.size,
            "object": c.object_name,
        }
        for c in components
    ]


def _status(
    inp: BoxInput,
    now: dt.datetime,
    phase: str,
    message: str,
    conditions: dict[str, tuple[bool, str, str]],
    **extra: Any,
) -> dict[str, Any]:
    prev = list(inp.status.get("conditions") or [])
    out: dict[str, Any] = {
        **inp.status,  # what earlier steps recorded (resolved set, placement, upgrade) stays
        "observedGeneration": inp.generation,
        "phase": phase,
        "message": message[:4000],
        "conditions": merge_conditions(prev, now, conditions),
    }
    out.update(extra)
    return out


def _failed(inp: BoxInput, now: dt.datetime, reason: str, message: str, cond: str) -> Decision:
    conds = {cond: (False, reason, message), "Ready": (False, reason, message)}
    status = _status(inp, now, "Failed", message, conds)
    changed = inp.status.get("phase") != "Failed" or inp.status.get("message") != message[:4000]
    return Decision(status, event=("Warning", reason, message) if changed else None)


def _controlled_by(obj: Mapping[str, Any], kind: str, *, uid: str = "", name: str = "") -> bool:
    """Whether `obj`'s controller owner reference is of `kind` with that uid (or name)."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or ():
        if ref.get("kind") != kind or ref.get("controller") is not True:
            continue
        if (uid and ref.get("uid") == uid) or (name and ref.get("name") == name):
            return True
    return False


def someone_elses(
    box_uid: str, vm: Mapping[str, Any] | None, vmi: Mapping[str, Any] | None
) -> str | None:
    """Why the VirtualMachine or VirtualMachineInstance of the box's name is not the box's
    (None: the box's own, or absent). A box's VM is the one gtvp composed, controlled by
    the box (by uid); its VMI is controlled by that VM (by uid), or, while there is none,
    by a VM of the box's name (one being deleted: KubeVirt removes its VMI after it); a
    VMI on its way out (deletionTimestamp) is let be. Anyone who may create LazyBoxes
    could otherwise name one after a colleague's VM and have gtvp replace, restart or
    delete it, or balance and release Secrets against its VMI."""
    if vm is not None and not _controlled_by(vm, "LazyBox", uid=box_uid):
        return "a VirtualMachine of this name exists that this LazyBox does not own"
    if vmi is not None and not (vmi.get("metadata") or {}).get("deletionTimestamp"):
        name = str((vmi.get("metadata") or {}).get("name", ""))
        vm_uid = str(((vm or {}).get("metadata") or {}).get("uid", ""))
        # while the box's VM exists, by its uid (an owner reference naming it is anyone's
        # to write on a VMI they create)
        if not _controlled_by(vmi, "VirtualMachine", uid=vm_uid, name="" if vm_uid else name):
            return "a VirtualMachineInstance of this name exists that the box's VM does not control"
    return None


def plan_box(inp: BoxInput, now: dt.datetime) -> Decision:
    """Decide the box's next status and actions (see the module docstring)."""
    decision = _plan_box(inp, now)
    return _without_unvouched(inp, decision)


def _plan_box(inp: BoxInput, now: dt.datetime) -> Decision:
    if inp.observed.someone_elses:
        message = (
            f"{inp.observed.someone_elses}: gtvp neither replaces nor deletes it; rename "
            "the box or remove that object"
        )
        failed = _failed(inp, now, NAME_TAKEN, message, "Placed")
        # nothing gtvp composed runs under the name: no Secrets, no box attestation for it
        status = {k: v for k, v in failed.status.items() if k != "attestation"}
        return dataclasses.replace(failed, status={**status, "composedBoots": []})
    return _plan_own(inp, now)


def _plan_own(inp: BoxInput, now: dt.datetime) -> Decision:
    """`plan_box` for a box whose VM and VMI, where they exist, are its own."""
    if inp.components is None:
        return _unresolved(inp, now)
    comps = list(inp.components)
    unverified = _unverified(inp, now, comps)
    if unverified is not None:
        return unverified
    try:
        cpu, mem = box_asks(  # as its VM's launcher pod will ask the scheduler
            cpu_millis(inp.spec["resources"]["cpu"]),
            memory_bytes(inp.spec["resources"]["memory"]),
        )
    except (KeyError, ValueError) as exc:
        return _failed(inp, now, "InvalidResources", f"spec.resources: {exc}", "Placed")
    target = {c.object_name for c in comps}
    current = set(inp.observed.booted) | set(inp.observed.hotplugged)
    # an image the VM boots that nothing vouches for any more (its object deleted, or made
    # again under the same name with other bytes), or a level changed: not current,
    # whatever the names say
    stale = bool(_vm_unvouched(inp)) or _relevelled(inp)
    if inp.observed.vm_exists and target == current and not stale:
        return _restored(inp, now, comps) or _observe(inp, now)
    if not inp.observed.vm_exists:
        return _first_placement(inp, now, comps, cpu, mem)
    return _upgrade(inp, now, comps)


def _unresolved(inp: BoxInput, now: dt.datetime) -> Decision:
    """The box cannot be resolved (now)."""
    reason, message = inp.failure or ("Unsatisfiable", "the box cannot be resolved")
    failed = _failed(inp, now, reason, message, "Resolved")
    revoked = _revoked(inp)
    if not revoked or not inp.observed.vm_exists:
        return failed
    # what runs rests on a component that no longer verifies and nothing replaces it: no
    # composition of the box is vouched for (no Secrets, no box attestation)
    why = f"{message}; it runs {', '.join(revoked)}, which no longer verifies"
    # said when it happens, not at every pass while the box stays Failed
    said = not composed_boots(inp.status) and failed.event is None
    event = None if said else ("Warning", "ComponentRevoked", why)
    return Decision({**failed.status, "composedBoots": []}, event=event)


def _revoked(inp: BoxInput) -> list[str]:
    """The components the box's VM boots (or hot-plugged) whose verification now fails: a
    publisher key removed from the policy, a signature that no longer verifies; and the
    images it boots that no component vouches for any more (`BoxInput.unvouched`: also an
    OSComponent deleted, which its annotation, anyone's to edit, may not name)."""
    obs = inp.observed
    named = [
        n for n in (*obs.booted, *obs.hotplugged) if n in inp.checks and revokes(inp.checks[n])
    ]
    return named + [f"{role} {digest}" for role, digest in _vm_unvouched(inp)]


def _vm_unvouched(inp: BoxInput) -> list[BootPart]:
    """The images the box's VM boots that no component vouches for any more."""
    return [i for i in inp.observed.vm_parts if i in inp.unvouched]


def _relevelled(inp: BoxInput) -> bool:
    """Whether the box's VM boots under another level's trust selector than its spec's (its
    level was raised or lowered since)."""
    level = inp.observed.vm_level
    return level is not None and level != int(inp.spec["level"])


def _without_unvouched(inp: BoxInput, d: Decision) -> Decision:
    """`d`, where the box's VMI boots an image no component vouches for any more (a
    LiveUpdate box still on an older composition when a component of it was revoked, or
    its OSComponent deleted): that composition is no longer vouched for (out of
    `status.composedBoots`: no Secrets, no box attestation) and the VMI is restarted onto
    the VM, unless the VM boots such an image too and is not written anew now (a restart
    would boot the same; the box is Failed, `_unresolved`, or upgraded)."""
    obs = inp.observed
    bad = [i for i in obs.vmi_parts if i in inp.unvouched]
    if not bad or obs.vmi_boots is None or "composedBoots" not in d.status:
        return d
    vm_bad = bool(_vm_unvouched(inp))
    known = composed_boots(d.status)
    kept = [b for b in known if b != obs.vmi_boots]
    restart = d.restart or d.vm is not None or (obs.vmi_boots != obs.vm_boots and not vm_bad)
    if kept == known and restart == d.restart:
        return d
    why = "; ".join(f"{i[0]} {i[1]}: {inp.unvouched[i]}" for i in bad)
    then = "restarted onto its VM" if restart else "no longer vouched for"
    event = ("Warning", "ComponentRevoked", f"its VMI boots what no component vouches for "
             f"any more ({why}): {then}")  # fmt: skip
    return dataclasses.replace(
        d, status={**d.status, "composedBoots": kept}, restart=restart, event=event
    )


def _restored(inp: BoxInput, now: dt.datetime, comps: list[Component]) -> Decision | None:
    """None while the box's VM boots the composition gtvp last wrote and its VMI one gtvp
    composed (`status.composedBoots`, `compose.runs_composition`). Else someone who may edit
    VMs in the namespace changed the VM (its kernel, command line, volumes, access
    credentials), or started a VMI of the box's name that boots something else: the VM is
    written again from the composition (the shell arms and records it), and a VMI booting
    what gtvp did not compose is restarted onto it. A VM that boots exactly what gtvp
    composes now (as it writes it: armed when the box is) while the record says otherwise
    is gtvp's own write whose record was lost (a status write that failed), or one recorded
    by an older gtvp: it is recorded anew, older compositions forgotten."""
    obs = inp.observed
    known = composed_boots(inp.status)
    vmi_ok = obs.vmi_boots is None or runs_composition(inp.status, obs.vmi_boots, obs.vmi_created)
    # hot-plugged while the box was not armed, armed since (it names Secrets now, or the
    # policy attests boxes): the disks the init neither checks nor measures are recomposed
    hot_when_armed = inp.armed and bool(obs.hotplugged)
    if known and obs.vm_boots == known[0] and vmi_ok and not hot_when_armed:
        return None
    observed = _observe(inp, now)
    if hot_when_armed:
        return _recompose_hotplugged(inp, now, observed, comps)
    if known and obs.vm_boots == known[0]:
        # the VM is gtvp's; its VMI is not: restart it (no VM write, no new credential)
        message = "its VMI boots what gtvp did not compose for the box: restarted onto it"
        said = inp.status.get("message") == message
        event = None if said else ("Warning", "CompositionRestored", message)
        return Decision({**observed.status, "message": message}, restart=True, event=event)
    # the layout gtvp itself would write: hot-plugged components only where the box may have
    # them (never taken from the VM's annotations alone, which its editor can change)
    booted_set = set(obs.booted)
    booted = [c for c in comps if c.object_name in booted_set] or comps
    if inp.armed or inp.spec.get("onMissingDependency") != "HotPlug":
        booted = comps
    hot = [c for c in comps if c not in booted]
    try:
        vm = compose_vm(inp.ref, inp.spec, booted, obs.vmi_node or obs.vm_node, hotplugged=hot)
    except CompositionError as exc:
        return _failed(inp, now, "NotBootable", str(exc), "Composed")
    _annotate(vm, booted, hot)
    ours = template_boots(vm)
    if inp.armed:
        ours = template_boots(with_cloud_init_secret(vm, cloud_init_secret(inp.ref.name))[0])
    if obs.vm_boots == ours:
        recorded = remember_boot({}, ours, format_ts(now))
        restart = obs.vmi_boots is not None and not runs_composition(
            recorded, obs.vmi_boots, obs.vmi_created
        )
        return Decision({**observed.status, **recorded}, restart=restart, event=observed.event)
    restart = obs.vmi_boots is not None and (not vmi_ok if known else obs.vmi_boots != ours)
    message = (
        "the VM is not what gtvp composed from the box's verified components (changed "
        "outside gtvp): written again"
        + ("; its VMI, booting something else, is restarted onto it" if restart else "")
    )
    return Decision(
        observed.status, vm=vm, restart=restart, event=("Warning", "CompositionRestored", message)
    )


def _recompose_hotplugged(
    inp: BoxInput, now: dt.datetime, observed: Decision, comps: list[Component]
) -> Decision:
    """A box armed since it got hot-plugged components: its VM is written anew booting every
    component from a pinned disk (armed by the shell), its VMI restarted onto it, and the
    hot-plugged composition no longer vouched for (no Secrets, no box attestation for it)."""
    node = inp.observed.vmi_node or inp.observed.vm_node
    try:
        vm = compose_vm(inp.ref, inp.spec, comps, node)
    except CompositionError as exc:
        return _failed(inp, now, "NotBootable", str(exc), "Composed")
    _annotate(vm, comps, ())
    message = (
        "the box is armed now (it names Secrets, or the policy attests boxes): its hot-plugged "
        f"{', '.join(inp.observed.hotplugged)}, which the box init neither checks nor "
        "measures, are recomposed into its boot disks; restarting onto them"
    )
    return Decision(
        observed.status,
        vm=vm,
        restart=inp.observed.vmi_boots is not None,
        event=("Normal", "Recomposed", message),
        forget_boots=True,
    )


def failed_verification(c: Component, chk: Check) -> str:
    """What a box says of a component that failed its check."""
    return (
        f"component {c.label} (OSComponent {c.object_name}) failed verification: "
        f"{chk.reason}: {chk.message}; it is never used"
    )


def _unverified(inp: BoxInput, now: dt.datetime, comps: list[Component]) -> Decision | None:
    """The decision while a component waits for verification or failed it (None: every
    component verified)."""
    missing = [c for c in comps if c.object_name not in inp.checks]
    if missing:
        msg = "waiting for verification of " + describe(missing)
        return Decision(_status(inp, now, "Verifying", msg, {"Verified": (False, "Pending", msg)}))
    bad = [c for c in comps if not inp.checks[c.object_name].ok]
    if not bad:
        return None
    c = bad[0]
    chk = inp.checks[c.object_name]
    message = failed_verification(c, chk)
    if inp.observed.vm_exists:  # keep what runs; the upgrade is blocked
        return _observe(inp, now, blocked=(chk.reason, message))
    return _failed(inp, now, "ComponentFailedVerification", message, "Verified")


def _first_placement(
    inp: BoxInput, now: dt.datetime, comps: list[Component], cpu: int, mem: int
) -> Decision:
    level = int(inp.spec["level"])
    decision = place(comps, level, cpu, mem, inp.hosts)
    resolved = _resolved(comps)
    if decision.node is None:
        msg = f"waiting for a Trusted member of level >= {level}: {decision.reason}"
        conds = {
            "Resolved": (True, "Resolved", describe(comps)),
            "Verified": (True, "Verified", "every component verified"),
            "Placed": (False, "NoQualifiedMember", decision.reason),
            "Ready": (False, "Pending", msg),
        }
        status = _status(inp, now, "Pending", msg, conds, resolved=resolved)
        changed = inp.status.get("phase") != "Pending"
        ev = ("Normal", "Waiting", msg) if changed else None
        return Decision(status, event=ev, placement=decision)
    try:
        vm = compose_vm(inp.ref, inp.spec, comps, decision.node)
    except CompositionError as exc:
        return _failed(inp, now, "NotBootable", str(exc), "Composed")
    _annotate(vm, comps, ())
    conds = {
        "Resolved": (True, "Resolved", describe(comps)),
        "Verified": (True, "Verified", "every component verified"),
        "Placed": (True, "Placed", decision.reason),
        # as `_observe` reports the VM once written: its watch event then writes nothing
        "Ready": (False, "Placing", STARTING),
    }
    status = _status(
        inp,
        now,
        "Placing",
        STARTING,
        conds,
        resolved=resolved,
        vm={"name": inp.ref.name},
        node=decision.node,
        placement={
            "node": decision.node,
            "reason": decision.reason,
            "cachedBytes": decision.cached_bytes,
            "decidedAt": format_ts(now),
        },
    )
    return Decision(
        status,
        vm=vm,
        uses=tuple((c.object_name, c.uid) for c in comps),
        event=("Normal", "Placed", f"composed {describe(comps)}; {decision.reason}"),
        placement=decision,
    )


def _annotate(vm: dict[str, Any], booted: Sequence[Component], hot: Sequence[Component]) -> None:
    ann = vm["metadata"].setdefault("annotations", {})
    ann[BOOTED_ANNOTATION] = ",".join(c.object_name for c in booted)
    if hot:
        ann[HOTPLUGGED_ANNOTATION] = ",".join(c.object_name for c in hot)


@dataclass(frozen=True)
class _Change:
    """An upgrade of a running box: from what, to what, and how it is carried out."""

    old_text: str
    new_text: str
    added: tuple[Component, ...]
    hotplug: bool  # attach the added components to the running VM
    restart: bool  # restart the VMI onto the new composition
    revoked: bool = False  # a component it boots no longer verifies

    @property
    def how(self) -> str:
        if self.hotplug:
            return "hot-plugged " + describe(self.added)
        return "restarting onto it" if self.restart else "the VM boots it on its next restart"


def _change(inp: BoxInput, comps: list[Component]) -> _Change:
    obs = inp.observed
    old_resolved = list(inp.status.get("resolved") or [])
    old_text = ", ".join(f"{r.get('name')} {r.get('version')}" for r in old_resolved) or ", ".join(
        obs.booted
    )
    booted_set = set(obs.booted)
    added = tuple(c for c in comps if c.object_name not in booted_set)
    removed = booted_set - {c.object_name for c in comps}
    # a dependency-missing fault: the box asked for components at run time and nothing
    # goes away; its own policy (HotPlug or Recompose-and-restart) decides, not upgradePolicy
    fault = not removed and bool(inp.spec.get("requestedComponents"))
    hotplug = (
        fault
        and not inp.armed
        and inp.spec.get("onMissingDependency") == "HotPlug"
        and all(c.type in NAMED_DISK_TYPES for c in added)
        and obs.vmi_phase == "Running"
    )
    policy = inp.spec.get("upgradePolicy", "Restart")
    # a booted component that no longer verifies, or a level changed (the VM's trust selector
    # is another level's), is replaced now, whatever upgradePolicy says
    revoked = bool(_revoked(inp)) or _relevelled(inp)
    hotplug = hotplug and not revoked
    restart = (
        not hotplug and (fault or revoked or policy == "Restart") and obs.vmi_phase is not None
    )
    return _Change(old_text, describe(comps), added, hotplug, restart, revoked)


def _upgraded_vm(
    inp: BoxInput, comps: list[Component], change: _Change, node: str | None
) -> dict[str, Any]:
    """The VM for the new composition: booting all of it, or what it booted plus the added
    components hot-plugged."""
    if change.hotplug:
        booted_set = set(inp.observed.booted)
        booted = [c for c in comps if c.object_name in booted_set]
        vm = compose_vm(inp.ref, inp.spec, booted, node, hotplugged=change.added)
        _annotate(vm, booted, change.added)
    else:
        vm = compose_vm(inp.ref, inp.spec, comps, node)
        _annotate(vm, comps, ())
    return vm


def _upgrade(inp: BoxInput, now: dt.datetime, comps: list[Component]) -> Decision:
    obs = inp.observed
    change = _change(inp, comps)
    node = obs.vmi_node or obs.vm_node
    try:
        vm = _upgraded_vm(inp, comps, change, node)
    except CompositionError as exc:
        return _failed(inp, now, "NotBootable", str(exc), "Composed")
    conds: dict[str, tuple[bool, str, str]] = {
        "Resolved": (True, "Resolved", change.new_text),
        "Verified": (True, "Verified", "every component verified"),
        "Placed": (True, "Placed", f"on {node}"),
        "Ready": (False, "Upgrading", f"{change.old_text} -> {change.new_text}"),
    }
    if not change.hotplug and not change.restart:
        conds["RestartRequired"] = (
            True,
            "LiveUpdateNotPossible",
            "KubeVirt cannot swap a kernel or container disk in a running VM; restart the box "
            "to boot the new composition",
        )
    summary = (
        f"{change.old_text} -> {change.new_text}: {change.how}"
        if change.old_text != change.new_text
        else f"{change.new_text} composed anew (what it ran is no longer vouched for, or its "
        f"level changed): {change.how}"
    )
    status = _status(
        inp,
        now,
        "Placing" if change.restart else _running_phase(obs),
        f"upgrade {summary}",
        conds,
        resolved=_resolved(comps),
        vm={"name": inp.ref.name},
        node=node,
        upgrade={"from": change.old_text, "to": change.new_text, "at": format_ts(now)},
    )
    return Decision(
        status,
        vm=vm,
        restart=change.restart,
        uses=tuple((c.object_name, c.uid) for c in change.added),
        event=("Normal", "Upgrading", summary),
        # an older composition with a component that no longer verifies is not vouched for
        forget_boots=change.revoked,
    )


def unschedulable(vmi_status: Mapping[str, Any]) -> str | None:
    """The scheduler's word while it cannot place a VMI's launcher pod (KubeVirt copies the
    pod's `PodScheduled=False` condition onto the VMI), at most 1,000 characters; None once
    it is scheduled or while nothing says so."""
    if vmi_status.get("nodeName"):
        return None
    for cond in vmi_status.get("conditions") or []:
        if not isinstance(cond, Mapping) or cond.get("type") != "PodScheduled":
            continue
        if cond.get("status") == "False":
            return str(cond.get("message") or cond.get("reason") or "Unschedulable")[:1000]
    return None


def _running_phase(obs: Observed) -> str:
    if obs.migrating:
        return "Migrating"
    if obs.vmi_phase == "Running":
        return "Running"
    return "Placing"


def _observe(inp: BoxInput, now: dt.datetime, blocked: tuple[str, str] | None = None) -> Decision:
    """The box's VM matches its resolution: report what runs."""
    obs = inp.observed
    # a halted VM (spec.running false, or stopped by a member's onUntrusted: Stop) waits
    phase = _running_phase(obs) if obs.vm_running else "Pending"
    node = obs.vmi_node or inp.status.get("node")
    if obs.vm_running and obs.vmi_phase == "Failed":
        message = f"the VM failed on {node}: {obs.vmi_reason or 'no reason given'}"
        return _failed(inp, now, "VMFailed", message, "Ready")
    if not obs.vm_running:
        msg = (
            "stopped: the VM is halted (spec.running false, or its member lost trust "
            "under onUntrusted: Stop)"
        )
    elif phase == "Running":
        msg = f"running on {node}"
    elif phase == "Migrating":
        msg = f"live-migrating from {node}"
    elif obs.vmi_unschedulable is not None:
        msg = f"{UNSCHEDULABLE} on {obs.vm_node or node}: {obs.vmi_unschedulable}"
    else:
        msg = STARTING
    prev = {c.get("type"): c for c in inp.status.get("conditions") or []}
    conds: dict[str, tuple[bool, str, str]] = {}
    for t in ("Resolved", "Verified", "Placed"):
        p = prev.get(t)
        conds[t] = (
            (p.get("status") == "True", str(p.get("reason")), str(p.get("message", "")))
            if p
            else (True, t, "")
        )
    if blocked is not None:
        conds["Verified"] = (False, blocked[0], blocked[1])
        msg += f"; upgrade blocked: {blocked[1]}"
    ready = phase in ("Running", "Migrating") and obs.vmi_phase == "Running"
    unschedulable = phase == "Placing" and obs.vmi_unschedulable is not None
    conds["Ready"] = (ready, "Unschedulable" if unschedulable else phase, msg)
    if obs.vmi_boot is not None and obs.vm_boot is not None and obs.vmi_boot != obs.vm_boot:
        conds["RestartRequired"] = (
            True,
            "LiveUpdateNotPossible",
            "the running VM booted an older composition; restart the box to boot "
            + ", ".join(obs.booted),
        )
    extra: dict[str, Any] = {"node": node} if node else {}
    status = _status(inp, now, phase, msg, conds, **extra)
    event = None
    if inp.status.get("phase") != phase or (node and inp.status.get("node") != node):
        event = ("Normal", phase, msg)
    if unschedulable and not str(inp.status.get("message", "")).startswith(UNSCHEDULABLE):
        event = ("Warning", "Unschedulable", msg)  # once, not on each new scheduler count
    return Decision(status, event=event)
