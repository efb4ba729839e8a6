"""Admission decisions for KubeVirt objects: pure functions of the object and the members.

- VirtualMachine / VirtualMachineInstance that opt in (label `gtvp.io/level: "N"`, N one
  digit from 1 to 9, nothing else) get the trust selector for level N in their nodeSelector
  (mutation), and are refused when their placement could reach an untrusted node or no
  member could take them (validation). A VM's own label and its template's must agree.
- The level an object was admitted with sticks: an UPDATE may not remove or lower it, nor
  remove or change the trust selector of a VMI (`validate_vm_update`,
  `validate_instance_update`); to run at a lower level or ungated, delete and recreate.
- VirtualMachineInstanceMigration: every migration of a gated VMI gets the trust selector
  in `addedNodeSelector` (mutation), and is refused when no Trusted member of a sufficient
  level other than the source could take it, or when it pins a member that is not trusted.
  A VMI is judged by its admitted level (`admitted_level`: its label, or the level its trust
  selector carries, whichever is higher), so a label lost anyhow does not free it.
Decisions read the members' verdicts (fresh, with uses left), not node labels.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gtvp.core.phases import MemberPhase
from gtvp.core.trust import (
    MAX_LEVEL,
    PREFIX,
    VM_LEVEL_LABEL,
    MemberView,
    highest_level,
    trust_selector,
)

HOSTNAME = "kubernetes.io/hostname"
LEVELS = {str(n): n for n in range(1, MAX_LEVEL + 1)}
"""The only spellings of a level: one ASCII digit, so that every tool reads the same number."""
TRUST_KEYS = f"{PREFIX}gtvp-"
"""Prefix of the nodeSelector entries gtvp's trust selector consists of."""


class GatingError(ValueError):
    """The object's gtvp level label is unusable."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    message: str = ""


def _loose(raw: str) -> int | None:
    """A level written loosely ("03", "+3", " 3"): for hints, and for objects admitted
    before levels were strict; None when no level in range can be read."""
    s = raw.strip().removeprefix("+")
    if not s.isascii() or not s.isdigit() or not 1 <= int(s) <= MAX_LEVEL:
        return None
    return int(s)


def _strict(raw: str, where: str = "") -> int:
    if raw in LEVELS:
        return LEVELS[raw]
    loose = _loose(raw)
    hint = f' (write "{loose}", not {json.dumps(raw)})' if loose is not None else ""
    raise GatingError(
        f"label {VM_LEVEL_LABEL}={json.dumps(raw)}{where} must be a single digit from 1 to "
        f"{MAX_LEVEL}{hint}"
    )


def level_of(labels: Mapping[str, str] | None) -> int | None:
    """The level a VM/VMI asks for, or None when it does not opt in; anything but "1" … "9"
    is refused (GatingError), with the canonical spelling when there is one."""
    if not labels or VM_LEVEL_LABEL not in labels:
        return None
    return _strict(labels[VM_LEVEL_LABEL])


def _old_level(labels: Mapping[str, str] | None) -> int | None:
    """The level an existing object carries, read loosely (it may predate strict levels)."""
    if not labels or VM_LEVEL_LABEL not in labels:
        return None
    return _loose(labels[VM_LEVEL_LABEL])


def selector_level(node_selector: Mapping[str, str] | None) -> int | None:
    """The highest level whose trust label the selector requires, None when it requires none."""
    return highest_level(node_selector)


def admitted_level(
    labels: Mapping[str, str] | None, node_selector: Mapping[str, str] | None
) -> int | None:
    """The level an existing VMI was admitted with: its label (read loosely, it may predate
    strict levels) or the level of the trust selector it carries, whichever is higher.
    GatingError when its label cannot be read as a level at all."""
    if labels and VM_LEVEL_LABEL in labels and _old_level(labels) is None:
        _strict(labels[VM_LEVEL_LABEL])  # raises, with the message
    return _loose_admitted(labels, node_selector)


def _loose_admitted(
    labels: Mapping[str, str] | None, node_selector: Mapping[str, str] | None
) -> int | None:
    """`admitted_level` with an unreadable label read as none (it raises nothing)."""
    found = [n for n in (_old_level(labels), selector_level(node_selector)) if n is not None]
    return max(found) if found else None


def _vm_admitted(vm: Mapping[str, Any]) -> int | None:
    """The level a VM was admitted with: its label's or its template's, the higher (read
    loosely, it may predate strict levels); None: neither."""
    found = [
        n for n in (_old_level(_labels(vm)), _old_level(vm_template_labels(vm))) if n is not None
    ]
    return max(found) if found else None


def selector_patch(current: Mapping[str, str] | None, level: int) -> dict[str, str]:
    """The selector entries to add (empty when all are already there)."""
    current = current or {}
    return {k: v for k, v in trust_selector(level).items() if current.get(k) != v}


def _pairs(selector: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in selector.items())


def _describe(members: Sequence[MemberView], now: dt.datetime) -> str:
    if not members:
        return "there are no members"
    parts = []
    for m in sorted(members, key=lambda m: m.name)[:8]:
        if m.phase != MemberPhase.TRUSTED:
            state = m.phase or MemberPhase.PENDING.value
        elif m.expires_at is None or now >= m.expires_at:
            state = "verdict expired"
        elif m.uses_left <= 0:
            state = "verdict spent (awaiting a fresh quote)"
        else:
            state = f"Trusted, level {m.level}"
        parts.append(f"{m.name}: {state}")
    return "; ".join(parts)


MAX_GRACE_SECONDS = 180
"""The longest a gated VMI may take to shut down (`terminationGracePeriodSeconds`): when gtvp
stops it on a host that lost trust, KubeVirt asks the guest to shut down and waits that long
before it kills it, so the VM's user must not be able to set it to days."""


def grace_cap(asked: Any) -> int | None:
    """What a gated VMI's `terminationGracePeriodSeconds` (`asked`) becomes: MAX_GRACE_SECONDS
    when it asks for more; None when it asks for no more (or sets none: KubeVirt's default
    is 30)."""
    return MAX_GRACE_SECONDS if isinstance(asked, int) and asked > MAX_GRACE_SECONDS else None


def undefined_level(name: str, level: int, levels: Collection[int] | None) -> str | None:
    """Why `level` cannot be asked for under a policy whose levels are `levels` (None: no
    policy known here, nothing said): one it does not define has no `onUntrusted` of its
    own, so its VMs would be stopped, not moved, when their member loses trust, even where
    every level says Migrate (found by a review)."""
    if levels is None or level in levels:
        return None
    defined = ", ".join(str(n) for n in sorted(levels)) or "none"
    return (
        f"{name} needs level {level}, which the SecurityPolicy in force does not define (its "
        f"levels: {defined}): gtvp could only stop it, not move it, when its member loses "
        "trust; label it with a level the policy defines"
    )


def validate_instance(
    *,
    name: str,
    labels: Mapping[str, str] | None,
    node_selector: Mapping[str, str] | None,
    members: Sequence[MemberView],
    now: dt.datetime,
    grace: Any = None,
    levels: Collection[int] | None = None,
) -> Decision:
    """A gated VMI (or VM template) must select trusted nodes, shut down within
    MAX_GRACE_SECONDS (`grace`: its terminationGracePeriodSeconds), ask for a level the
    policy defines (`levels`, when known: `undefined_level`) and have somewhere to go.
    Gated: by its label, or without one by a trust selector (gtvp treats it as gated at
    that level from then on: evacuation, stops)."""
    level = level_of(labels)
    if level is None:
        level = selector_level(node_selector)
    if level is None:
        return Decision(True)
    undefined = undefined_level(name, level, levels)
    if undefined is not None:
        return Decision(False, undefined)
    if grace_cap(grace) is not None:
        return Decision(
            False,
            (
                f"{name} needs level {level} and asks for a terminationGracePeriodSeconds of "
                f"{grace}: a gated VM must shut down within {MAX_GRACE_SECONDS} s when gtvp "
                "stops it on a host that lost trust"
            ),
        )
    missing = selector_patch(node_selector, level)
    if missing:
        return Decision(
            False,
            (
                f"{name} needs level {level} but its nodeSelector does not restrict it to Trusted "
                f"members of that level (missing {_pairs(missing)}); it could be placed on an "
                "untrusted node"
            ),
        )
    pinned = (node_selector or {}).get(HOSTNAME)
    usable = [m for m in members if m.usable(now, level) and (pinned is None or m.name == pinned)]
    if not usable:
        where = f"member {pinned}" if pinned else f"no Trusted member of level >= {level}"
        return Decision(
            False,
            (
                f"{name} needs level {level} and {where} can take it now ("
                f"{_describe([m for m in members if pinned is None or m.name == pinned], now)})"
            ),
        )
    return Decision(True)


def validate_migration(
    *,
    name: str,
    vmi_name: str,
    vmi_labels: Mapping[str, str] | None,
    source: str | None,
    added_selector: Mapping[str, str] | None,
    members: Sequence[MemberView],
    now: dt.datetime,
    vmi_node_selector: Mapping[str, str] | None = None,
    send_to: str | None = None,
) -> Decision:
    """Refuse a migration of a gated VMI that could only land on an untrusted member; the
    VMI is judged by its admitted level (label or trust selector, whichever is higher).
    `send_to` is the connectURL of a decentralized migration (`spec.sendTo`): the state
    leaves for a receiver gtvp cannot judge, so a gated VMI is never sent that way."""
    try:
        level = admitted_level(vmi_labels, vmi_node_selector)
    except GatingError as exc:
        return Decision(False, f"migration {name} of {vmi_name}: {exc}")
    if level is None:
        return Decision(True)
    if send_to is not None:
        return Decision(
            False,
            (
                f"migration {name} of {vmi_name} (level {level}) would send the running VM to "
                f"{send_to or 'a receiver'} (spec.sendTo): gtvp cannot check that the receiver "
                "runs on a Trusted member, so a gated VM migrates only within the pool"
            ),
        )
    missing = selector_patch(added_selector, level)
    if missing:
        return Decision(
            False,
            (
                f"migration {name} of {vmi_name} (level {level}) must restrict its target to "
                f"Trusted members: addedNodeSelector lacks "
                f"{_pairs(missing)}"
            ),
        )
    problem = _migration_target_problem(
        f"migration {name} of {vmi_name}",
        level=level,
        source=source,
        pinned=(added_selector or {}).get(HOSTNAME),
        members=members,
        now=now,
    )
    return Decision(True) if problem is None else Decision(False, problem)


def _migration_target_problem(
    what: str,
    *,
    level: int,
    source: str | None,
    pinned: str | None,
    members: Sequence[MemberView],
    now: dt.datetime,
) -> str | None:
    """Why the migration `what` has nowhere trusted to go (None: it has): the member it pins
    may not receive it, or no Trusted member but its source could."""
    if pinned is not None:
        target = next((m for m in members if m.name == pinned), None)
        if target is None or not target.usable(now, level):
            state = _describe([target], now) if target else f"{pinned}: not a member"
            return (
                f"{what} is aimed at {pinned}, which may not receive a level-{level} VM ({state})"
            )
        return None
    if not any(m.name != source and m.usable(now, level) for m in members):
        return (
            f"{what} has no trusted target of level >= {level} other than its source "
            f"{source or '?'} ({_describe(members, now)})"
        )
    return None


def vm_template_labels(vm: Mapping[str, Any]) -> dict[str, str]:
    spec = vm.get("spec") or {}
    tmpl = spec.get("template") or {}
    return dict((tmpl.get("metadata") or {}).get("labels") or {})


def _labels(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def _node_selector(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("spec") or {}).get("nodeSelector") or {})


def _template_selector(vm: Mapping[str, Any]) -> dict[str, str]:
    tmpl = (vm.get("spec") or {}).get("template") or {}
    return dict((tmpl.get("spec") or {}).get("nodeSelector") or {})


def _title(kind: str, obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{kind} {ns}/{meta.get('name', '')}" if ns else f"{kind} {meta.get('name', '')}"


def box_level(box: Mapping[str, Any] | None) -> int:
    """The security level a LazyBox (or the box-like view of a gated VM) asks for, from
    its `spec.level` (0 when it names none)."""
    return int(((box or {}).get("spec") or {}).get("level", 0) or 0)


def vm_level(vm: Mapping[str, Any]) -> int | None:
    """The level a VirtualMachine asks for: its own label and its template's (what its
    instances get); GatingError when either is not a level or they disagree."""
    title = _title("VirtualMachine", vm)
    meta, tmpl = _labels(vm).get(VM_LEVEL_LABEL), vm_template_labels(vm).get(VM_LEVEL_LABEL)
    try:
        own = None if meta is None else _strict(meta, " on the VirtualMachine")
        inner = None if tmpl is None else _strict(tmpl, " on its template")
    except GatingError as exc:
        raise GatingError(f"{title}: {exc}") from exc
    if own is not None and inner is not None and own != inner:
        raise GatingError(
            f"{title}: label {VM_LEVEL_LABEL} is {json.dumps(meta)} on the VirtualMachine but "
            f"{json.dumps(tmpl)} on its template; they must agree (its instances get the "
            "template's)"
        )
    return own if own is not None else inner


def validate_vm(vm: Mapping[str, Any], levels: Collection[int] | None = None) -> Decision:
    """A gated VM's levels agree, name one the policy defines (`levels`, when known) and its
    template selects only Trusted members of its level."""
    try:
        level = vm_level(vm)
    except GatingError as exc:
        return Decision(False, str(exc))
    if level is None:
        return Decision(True)
    undefined = undefined_level(_title("VirtualMachine", vm), level, levels)
    if undefined is not None:
        return Decision(False, undefined)
    missing = selector_patch(_template_selector(vm), level)
    if missing:
        return Decision(
            False,
            (
                f"{_title('VirtualMachine', vm)} needs level {level} but its template's "
                f"nodeSelector lacks {_pairs(missing)}: it could run on an untrusted node"
            ),
        )
    return Decision(True)


def validate_vm_update(*, old: Mapping[str, Any], new: Mapping[str, Any]) -> Decision:
    """The level a VM was admitted with sticks: not removed, not lowered (raising is fine:
    its next instance is admitted at the new level, its running one keeps its own)."""
    title = _title("VirtualMachine", new)
    old_meta, was = _old_level(_labels(old)), _vm_admitted(old)
    try:
        level = vm_level(new)
    except GatingError as exc:
        return Decision(False, str(exc))
    if was is None:
        return Decision(True)
    instead = (
        "; its running instance keeps the level it was admitted with. To run it {}, delete the "
        "VirtualMachine and create it again {}"
    )
    if level is None or (old_meta is not None and VM_LEVEL_LABEL not in _labels(new)):
        return Decision(
            False,
            f"{title} was admitted at level {was}: {VM_LEVEL_LABEL} cannot be removed from it"
            + instead.format("ungated", "without the label"),
        )
    if level < was:
        return Decision(
            False,
            f"{title} was admitted at level {was}: {VM_LEVEL_LABEL} cannot be lowered (to {level})"
            + instead.format(f"at level {level}", "with that level"),
        )
    return Decision(True)


def vm_raise_warning(*, old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """What to tell whoever adds or raises a VM's level: the running instance keeps the
    level it was admitted with (KubeVirt copies no label to a running VMI), so it is gated
    at the new level only from its next start. None: no raise."""
    was = _vm_admitted(old) or 0
    try:
        level = vm_level(new)
    except GatingError:
        return None
    if level is None or level <= was:
        return None
    before = f"level {was}" if was else "ungated"
    return (
        f"{_title('VirtualMachine', new)} is now at level {level}, but an instance already "
        f"running keeps what it was admitted with ({before}) and stays where it runs (a live "
        "update of its node selector to the new level is refused unless it runs on a node "
        "that holds that level): restart the VirtualMachine to run it gated at the new level"
    )


def _trust_entries(selector: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(selector.items()) if k.startswith(TRUST_KEYS)}


def validate_instance_update(
    *,
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    members: Sequence[MemberView],
    now: dt.datetime,
    levels: Collection[int] | None = None,
) -> Decision:
    """The level a VMI was admitted with sticks: its label may not be removed or lowered, and
    no entry of its trust selector removed or changed; nor may its shutdown grace period be
    raised above MAX_GRACE_SECONDS (KubeVirt's stop endpoint writes the one it is given; a
    VMI admitted with more before the cap may lower it).
    Raising the level (its label, or a
    level's entry added to its trust selector) is allowed only when the VMI selects Trusted
    members of the new level and runs on one now."""
    title = _title("VirtualMachineInstance", new)
    old_labels, new_labels = _labels(old), _labels(new)
    try:
        level = level_of(new_labels)
    except GatingError as exc:
        return Decision(False, f"{title}: {exc}")
    problem = _level_dropped(
        title, old_labels=old_labels, old_selector=_node_selector(old), level=level
    ) or _trust_selector_changed(title, old=_node_selector(old), new=_node_selector(new))
    if problem is not None:
        return Decision(False, problem)
    grace = (new.get("spec") or {}).get("terminationGracePeriodSeconds")
    was = (old.get("spec") or {}).get("terminationGracePeriodSeconds")
    if grace_cap(grace) and not (isinstance(was, int) and isinstance(grace, int) and grace <= was):
        return Decision(
            False,
            f"{title} may not raise its terminationGracePeriodSeconds to {grace}: a gated VM "
            f"must shut down within {MAX_GRACE_SECONDS} s when gtvp stops it on a host that lost "
            f"trust (stop it with a grace period of at most {MAX_GRACE_SECONDS} s)",
        )
    # a raise by the label or by the trust selector (a level's entry added to the VMI's
    # nodeSelector, as KubeVirt's LiveUpdate copies a VM template's): the VMI then counts as
    # needing that level where it runs, so its node must hold it now
    raised = max(level or 0, selector_level(_node_selector(new)) or 0)
    if raised > (_loose_admitted(old_labels, _node_selector(old)) or 0):
        return _validate_raise(title, new, level=raised, members=members, now=now, levels=levels)
    return Decision(True)


def _level_dropped(
    title: str,
    *,
    old_labels: Mapping[str, str],
    old_selector: Mapping[str, str],
    level: int | None,
) -> str | None:
    """Why the VMI's new level label drops the level it was admitted with (None: it keeps
    it): removed, or lowered below its old label or its trust selector's level."""
    was = _loose_admitted(old_labels, old_selector)
    instead = "; to run it {}, delete it (or its VirtualMachine) and create it again {}"
    if VM_LEVEL_LABEL in old_labels and level is None:
        return (
            f"{title} was admitted at level {was}: its label {VM_LEVEL_LABEL} cannot be "
            "removed (it would then migrate ungated)"
            + instead.format("ungated", "without the label")
        )
    if was is not None and level is not None and level < was:
        return (
            f"{title} was admitted at level {was}: its label {VM_LEVEL_LABEL} cannot be "
            f"lowered (to {level})" + instead.format(f"at level {level}", "with that level")
        )
    return None


def _trust_selector_changed(
    title: str, *, old: Mapping[str, str], new: Mapping[str, str]
) -> str | None:
    """Why the VMI's new nodeSelector loses part of its trust selector (None: it keeps it)."""
    kept = _trust_entries(old)
    lost = {k: v for k, v in kept.items() if new.get(k) != v}
    if not lost:
        return None
    return (
        f"{title} was admitted with the trust selector {_pairs(kept)}: removing or "
        f"changing {_pairs(lost)} would let it run on or migrate to untrusted members. "
        "The trust selector of a running VirtualMachineInstance is fixed: delete it and "
        "create it again to change where it may run"
    )


def _validate_raise(
    title: str,
    new: Mapping[str, Any],
    *,
    level: int,
    members: Sequence[MemberView],
    now: dt.datetime,
    levels: Collection[int] | None = None,
) -> Decision:
    """A VMI raising its level must select Trusted members of it and run on one now."""
    undefined = undefined_level(title, level, levels)
    if undefined is not None:
        return Decision(False, undefined)
    decided = validate_instance(
        name=title,
        labels=_labels(new),
        node_selector=_node_selector(new),
        members=members,
        now=now,
        levels=levels,
    )
    if not decided.allowed:
        return decided
    status = new.get("status") or {}
    moving = status.get("migrationState") or {}
    if moving and not (moving.get("completed") or moving.get("failed")):
        # its target pod is bound already, by the admitted selector: the VMI may land on a
        # member below the new level when the migration ends (found by a review)
        return Decision(
            False,
            f"{title} is migrating, and its target was chosen by its admitted selector: its "
            f"level can be raised once the migration has ended, on a member of level {level}",
        )
    node = status.get("nodeName")
    if not node:
        # not running yet, but its launcher pod may be made (and bound anywhere the old
        # selector allows) already: KubeVirt fixes a pod's selector when it makes it, and
        # names the node only once the pod is up; a raise is judged where the VMI runs
        # (found by a review: a stalled image pull held the window open)
        return Decision(
            False,
            f"{title} is not running on a node yet, and its launcher pod may already be "
            f"placed by its admitted selector: its level can be raised once it runs on a "
            f"member of level {level}, or set {VM_LEVEL_LABEL} on its VirtualMachine and "
            "restart it",
        )
    here = [m for m in members if m.name == node]
    if here and here[0].usable(now, level):
        return Decision(True)
    state = _describe(here, now) if here else f"{node}: not a member"
    return Decision(
        False,
        (
            f"{title} runs on {node}, which may not run a level-{level} VM ({state}); "
            f"to raise its level, set {VM_LEVEL_LABEL} on its VirtualMachine and "
            "restart it"
        ),
    )
