"""Admission decisions for KubeVirt objects: pure functions of the object and the members.

- VirtualMachine / VirtualMachineInstance that opt in (label `gtvp.io/level: "N"`) get the
  trust selector for level N in their nodeSelector (mutation), and are refused when their
  placement could reach an untrusted node or no member could take them (validation).
- VirtualMachineInstanceMigration: every migration of a gated VMI gets the trust selector
  in `addedNodeSelector` (mutation), and is refused when no Trusted member of a sufficient
  level other than the source could take it, or when it pins a member that is not trusted.
Decisions read the members' verdicts (fresh, with uses left), not node labels.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gtvp.core.trust import VM_LEVEL_LABEL, MemberView, trust_selector

HOSTNAME = "kubernetes.io/hostname"


class GatingError(ValueError):
    """The object's gtvp level label is unusable."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    message: str = ""


def level_of(labels: Mapping[str, str] | None) -> int | None:
    """The level a VM/VMI asks for, or None when it does not opt in."""
    if not labels or VM_LEVEL_LABEL not in labels:
        return None
    raw = labels[VM_LEVEL_LABEL]
    if not raw.isdigit() or not 1 <= int(raw) <= 9:
        raise GatingError(f"label {VM_LEVEL_LABEL}={raw!r} must be a level from 1 to 9")
    return int(raw)


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
        if m.phase != "Trusted":
            state = m.phase or "Pending"
        elif m.expires_at is None or now >= m.expires_at:
            state = "verdict expired"
        elif m.uses_left <= 0:
            state = "verdict spent (awaiting a fresh quote)"
        else:
            state = f"Trusted, level {m.level}"
        parts.append(f"{m.name}: {state}")
    return "; ".join(parts)


def validate_instance(
    *,
    name: str,
    labels: Mapping[str, str] | None,
    node_selector: Mapping[str, str] | None,
    members: Sequence[MemberView],
    now: dt.datetime,
) -> Decision:
    """A gated VMI (or VM template) must select trusted nodes and have somewhere to go."""
    level = level_of(labels)
    if level is None:
        return Decision(True)
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
) -> Decision:
    """Refuse a migration of a gated VMI that could only land on an untrusted member."""
    level = level_of(vmi_labels)
    if level is None:
        return Decision(True)
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
    pinned = (added_selector or {}).get(HOSTNAME)
    if pinned is not None:
        target = next((m for m in members if m.name == pinned), None)
        if target is None or not target.usable(now, level):
            state = _describe([target], now) if target else f"{pinned}: not a member"
            return Decision(
                False,
                (
                    f"migration {name} of {vmi_name} is aimed at {pinned}, which may not receive a "
                    f"level-{level} VM ({state})"
                ),
            )
        return Decision(True)
    targets = [m for m in members if m.name != source and m.usable(now, level)]
    if not targets:
        return Decision(
            False,
            (
                f"migration {name} of {vmi_name} has no trusted target of level >= {level} other "
                f"than its source {source or '?'} ({_describe(members, now)})"
            ),
        )
    return Decision(True)


def vm_template_labels(vm: Mapping[str, Any]) -> dict[str, str]:
    spec = vm.get("spec") or {}
    tmpl = spec.get("template") or {}
    return dict((tmpl.get("metadata") or {}).get("labels") or {})
