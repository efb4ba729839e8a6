"""Whether this version of gtvp can run a pool under its live SecurityPolicy (pure).

A newer gtvp may refuse a policy an older one accepted (a rule tightened: every selected
PCR must be verified, say). The operator then parses the policy's spec and its
`status.acceptedSpec` with the new rules; when both are refused it has nothing to run
under and every member turns Untrusted (`NoPolicy`, fail closed), and each level's
`onUntrusted` then acts on the whole pool. The same happens when an upgrade points the
operator at another policy (`policyName`) that does not exist or that it refuses.
`judge_upgrade` tells that before the upgrade (`gtvp policy check`, the chart's
pre-install/pre-upgrade hook): it stops the upgrade when the running pool may have a policy
now and would have none after; only a pool whose policy's status shows that no generation
was ever accepted (so it runs under none already) has nothing to lose.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gtvp.core.policy import PolicyError, parse_policy
from gtvp.core.policy_status import last_accepted


@dataclass(frozen=True)
class StoredPolicy:
    """A SecurityPolicy as the API server holds it."""

    name: str
    generation: int
    spec: Mapping[str, Any]
    status: Mapping[str, Any]

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> StoredPolicy:
        meta = obj.get("metadata") or {}
        return cls(
            str(meta.get("name", "")),
            int(meta.get("generation") or 0),
            obj.get("spec") or {},
            obj.get("status") or {},
        )


def runs_under_none_now(running: StoredPolicy) -> bool:
    """Whether the running operator's status says it has no generation of this policy to
    run under: it has looked at the current generation, found it unusable, and has no
    accepted one. Anything less (an older operator that never wrote acceptedGeneration, one
    that has not looked yet) counts as running under it."""
    status = running.status
    if status.get("acceptedGeneration"):
        return False
    if status.get("observedGeneration") != running.generation:
        return False
    conditions = status.get("conditions") or []
    accepted = [c for c in conditions if isinstance(c, Mapping) and c.get("type") == "Accepted"]
    return bool(accepted) and all(c.get("status") == "False" for c in accepted)


@dataclass(frozen=True)
class UpgradeJudgement:
    """What this version would run the pool under, and what it runs under now."""

    name: str
    """The policy this version's operator would enforce."""
    generation: int | None
    """Its current generation (None: it does not exist)."""
    runs_under: int | None
    """The generation of it this version would run under (None: none, all Untrusted)."""
    refused: str | None
    """Why this version refuses its current generation (None: accepted, or absent)."""
    running: str | None
    """The policy the running operator enforces, when it is another one (policyName
    changed by the upgrade)."""
    has_policy_now: bool
    """The running pool may run under a policy now (see `runs_under_none_now`)."""

    @property
    def blocks(self) -> bool:
        """The pool may run under a policy now and would run under none after the upgrade."""
        return self.runs_under is None and self.has_policy_now

    @property
    def message(self) -> str:
        head = f"SecurityPolicy {self.name}"
        if self.generation is not None:
            head += f" (generation {self.generation})"
        if self.running is not None:
            head += f", which the upgrade makes the operator enforce instead of {self.running}"
        if self.generation is None:
            said = f"{head}: does not exist; "
        elif self.refused is None:
            return f"{head}: accepted by this version"
        else:
            said = f"{head}: this version refuses it: {self.refused}; "
        if self.runs_under is not None:
            return said + (
                f"the pool would go on under generation {self.runs_under}, the last one "
                "accepted (status.acceptedSpec), until the policy is fixed"
            )
        if not self.has_policy_now:
            return said + (
                "the pool runs under no policy now either, so it has none to lose (every "
                "member is Untrusted, NoPolicy, until one is usable)"
            )
        fix = (
            "apply it first, or keep policyName"
            if self.generation is None
            else 'fix the policy first (docs/attestation.md, "Upgrading ..."; `gtvp policy '
            "learn` proposes reference sets)"
        )
        return said + (
            "the pool runs under a policy now and would run under none after the upgrade: "
            "every member Untrusted (NoPolicy), and each level's onUntrusted acting on the "
            f"whole pool. To upgrade, {fix}; or upgrade with --set upgradeCheck.enabled=false "
            "to accept that"
        )


def judge_upgrade(
    name: str, target: StoredPolicy | None, running: StoredPolicy | None
) -> UpgradeJudgement:
    """This version's view of the policy `name` it would enforce (`target`, None when it
    does not exist), given the policy the running operator enforces (`running`: the same
    one when policyName stays, None when that does not exist)."""
    has_now = running is not None and not runs_under_none_now(running)
    other = running.name if running is not None and running.name != name else None
    if target is None:
        return UpgradeJudgement(name, None, None, None, other, has_now)
    try:
        parse_policy(name, target.spec)
    except PolicyError as exc:
        last = last_accepted(name, target.status, None)
        runs_under = last.generation if last is not None else None
        return UpgradeJudgement(name, target.generation, runs_under, str(exc), other, has_now)
    return UpgradeJudgement(name, target.generation, target.generation, None, other, has_now)
