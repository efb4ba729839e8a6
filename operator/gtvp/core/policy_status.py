"""A SecurityPolicy's status, and which generation of it the pool runs under.

Pure. `assess_policy` takes one SecurityPolicy as the API server holds it and decides:

- the generation to run under: the current one when `parse_policy` accepts it; otherwise the
  last accepted one, so an unusable policy that got past the API server (the operator's
  webhook was not installed or not reachable, or an administrator bypassed it) never
  quarantines the pool. Only when no generation of it was ever accepted is there nothing to
  run under: every member is Untrusted (`NoPolicy`), fail closed;
- the operator's part of its status: `observedGeneration`, `levelCount` (levels in the
  spec), the `Accepted` condition (`Valid`, or `Invalid` with the field, the reason and
  what the pool runs under instead, and its own observedGeneration), and
  `acceptedGeneration` + `acceptedSpec`: the last accepted spec itself, so that a restarted
  operator can go on under it (only the operator may write `securitypolicies/status`, and
  `acceptedSpec` is parsed again, like any spec, before it is used);
- an Event when the verdict for a generation changes (a Warning for an unusable one);
- the `BootChain` condition: False (`Weak`) with what an accepted generation leaves
  unappraised (`policy_weaknesses`: a boot-chain PCR not quoted, reset values pinned), and
  a `PolicyWeak` Warning when that changes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gtvp.core.conditions import merge_conditions
from gtvp.core.policy import Policy, PolicyError, parse_policy, policy_weaknesses

# the fields of SecurityPolicy.status the operator owns (and compares before writing)
STATUS_FIELDS = (
    "observedGeneration",
    "levelCount",
    "acceptedGeneration",
    "acceptedSpec",
    "conditions",
)


@dataclass(frozen=True)
class Accepted:
    """A generation of a policy that parsed, with its spec (kept in status.acceptedSpec)."""

    generation: int
    spec: Mapping[str, Any]
    policy: Policy


@dataclass(frozen=True)
class PolicyEvent:
    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class PolicyAssessment:
    generation: int
    accepted: Accepted | None  # what to run under: this generation, or the last accepted
    error: PolicyError | None  # why this generation is unusable (None: it is accepted)
    status: dict[str, Any]  # the operator's fields of the next status (STATUS_FIELDS)
    event: PolicyEvent | None  # when the verdict for this generation changed
    message: str  # the Accepted condition's message
    weak_event: PolicyEvent | None = None  # when what it leaves unappraised changed

    @property
    def policy(self) -> Policy | None:
        return self.accepted.policy if self.accepted else None

    @property
    def enforcement_error(self) -> str | None:
        """Why there is no policy to run under (None: there is one)."""
        return None if self.accepted else self.message


def _summary(policy: Policy) -> str:
    levels = ", ".join(lv.name for lv in policy.levels)
    pcrs = ",".join(str(p) for p in policy.pcrs)
    return (
        f"{len(policy.levels)} levels ({levels}), PCRs {policy.pcr_bank}:{pcrs}, "
        f"{len(policy.member_classes)} member classes, "
        f"{len(policy.publisher_keys)} publisher keys"
    )


def last_accepted(
    name: str, status: Mapping[str, Any], remembered: Accepted | None
) -> Accepted | None:
    """The newest accepted generation known: in memory, or in status.acceptedSpec."""
    found: list[Accepted] = [remembered] if remembered is not None else []
    spec = status.get("acceptedSpec")
    if isinstance(spec, Mapping):
        # one this operator no longer accepts (an older, laxer version wrote it) is not used
        with contextlib.suppress(PolicyError, TypeError, ValueError, KeyError, AttributeError):
            generation = int(status.get("acceptedGeneration") or 0)
            found.append(Accepted(generation, spec, parse_policy(name, spec)))
    return max(found, key=lambda a: a.generation, default=None)


def assess_policy(
    name: str,
    *,
    generation: int,
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    now: dt.datetime,
    remembered: Accepted | None = None,
    enforced: bool = True,
) -> PolicyAssessment:
    """Judge one SecurityPolicy: what to run under, its next status, and an Event if due.

    `remembered`: the last generation this process accepted (the same object), used when
    newer than status.acceptedSpec (a status write that failed). `enforced`: the operator
    enforces this policy (its --policy), which only changes what the message says.
    """
    error: PolicyError | None = None
    try:
        accepted: Accepted | None = Accepted(generation, spec, parse_policy(name, spec))
    except PolicyError as exc:
        error = exc
        accepted = last_accepted(name, status, remembered)
    ok = error is None and accepted is not None
    message = _message(generation, accepted, error, enforced=enforced)
    previous = [c for c in (status.get("conditions") or []) if isinstance(c, Mapping)]
    before = next((c for c in previous if c.get("type") == "Accepted"), None)
    wanted = {"Accepted": (ok, "Valid" if ok else "Invalid", message)}
    weak_event = None
    if ok and accepted is not None:
        weak = policy_weaknesses(accepted.policy)
        said = "; ".join(weak) if weak else "it appraises the whole static boot chain"
        wanted["BootChain"] = (not weak, "Weak" if weak else "Appraised", said)
        was = next((c for c in previous if c.get("type") == "BootChain"), None)
        if weak and (was is None or was.get("message") != said):
            weak_event = PolicyEvent("Warning", "PolicyWeak", f"generation {generation}: {said}")
    conditions = merge_conditions([dict(c) for c in previous], now, wanted)
    for c in conditions:
        c["observedGeneration"] = generation
    new: dict[str, Any] = {
        "observedGeneration": generation,
        "levelCount": len(spec.get("levels") or []),
        "conditions": conditions,
    }
    if accepted is not None:
        new["acceptedGeneration"] = accepted.generation
        new["acceptedSpec"] = dict(accepted.spec)
    event = None
    now_accepted = next(c for c in conditions if c.get("type") == "Accepted")
    if (
        before is None
        or before.get("status") != now_accepted["status"]
        or before.get("observedGeneration") != generation
    ):
        event = PolicyEvent(
            "Normal" if ok else "Warning", "PolicyAccepted" if ok else "PolicyInvalid", message
        )
    return PolicyAssessment(generation, accepted, error, new, event, message, weak_event)


def _message(
    generation: int, accepted: Accepted | None, error: PolicyError | None, *, enforced: bool
) -> str:
    """The Accepted condition's message: usable (with a summary), or why not and what the
    pool runs under instead."""
    if error is None and accepted is not None:
        return f"generation {generation} is usable: {_summary(accepted.policy)}"
    message = f"generation {generation} is unusable: {error}; "
    if accepted is not None:
        where = "the pool goes on" if enforced else "an operator enforcing it goes on"
        return message + (
            f"{where} under generation {accepted.generation}, the last one accepted "
            "(status.acceptedSpec)"
        )
    message += "no generation of it was accepted before"
    if enforced:
        message += ", so every member is Untrusted (NoPolicy) until it is fixed"
    return message
