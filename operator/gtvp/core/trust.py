"""What a member's verdict means for its Node and for the workloads that may land on it.

Pure. Labels live under `node-restriction.kubernetes.io/`, which a node's own kubelet may
not set (the NodeRestriction admission plugin), so a compromised node cannot claim trust.
A Trusted node of level L carries `gtvp-trusted=true` and `gtvp-level-1` … `gtvp-level-L`
(each `true`): a workload of level N selects `gtvp-level-N=true`, which means "level ≥ N"
with a plain nodeSelector. A node that is not Trusted loses them all at once and gets the
`gtvp.io/untrusted:NoSchedule` taint (never NoExecute: that would kill VMs instead of
letting gtvp migrate them).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gtvp.core.phases import MemberPhase
from gtvp.core.timestamps import format_ts, parse_ts

PREFIX = "node-restriction.kubernetes.io/"
TRUSTED_LABEL = f"{PREFIX}gtvp-trusted"
LEVEL_LABEL = f"{PREFIX}gtvp-level-"
TAINT_KEY = "gtvp.io/untrusted"
MAX_LEVEL = 9
VM_LEVEL_LABEL = "gtvp.io/level"
"""Label a KubeVirt VM/VMI carries to opt in to gating; its value is the level it needs."""


def trust_selector(level: int) -> dict[str, str]:
    """The nodeSelector that admits only Trusted nodes of at least `level`."""
    return {TRUSTED_LABEL: "true", f"{LEVEL_LABEL}{max(level, 1)}": "true"}


def desired_labels(phase: str, level: int) -> dict[str, str | None]:
    """gtvp's node labels for a member (None = remove)."""
    trusted = phase == MemberPhase.TRUSTED and level > 0
    out: dict[str, str | None] = {TRUSTED_LABEL: "true" if trusted else None}
    for n in range(1, MAX_LEVEL + 1):
        out[f"{LEVEL_LABEL}{n}"] = "true" if trusted and n <= level else None
    return out


def rule_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """A Node's labels less gtvp's own trust labels: what transition rules may match (the
    policy refuses rules on gtvp's labels), so a change of gtvp's own labels is no reason
    to judge the member again."""
    return {
        k: v
        for k, v in (labels or {}).items()
        if k != TRUSTED_LABEL and not k.startswith(LEVEL_LABEL)
    }


def node_boot_id(node: Mapping[str, Any]) -> str | None:
    """The boot a Node reports: its kubelet's `status.nodeInfo.bootID`, then `@` and the
    Node object's uid (`<bootID>@<uid>`; either part may be empty); None when it tells
    neither. The uid tells a Node made again under the name of one whose member kept its
    verdict (a Member that pins an EK outlives its Node) from the one the verdict was
    judged beside: whoever holds a kubelet credential for the name on another host must
    not find the trust labels put back (found by a review)."""
    boot = ((node.get("status") or {}).get("nodeInfo") or {}).get("bootID")
    uid = (node.get("metadata") or {}).get("uid")
    if not boot and not uid:
        return None
    # the kubelet's word, cut to fit `status.trust.nodeBootID` (128 characters) with a uid
    return f"{str(boot or '')[:90]}@{str(uid or '')[:37]}"


def boot_parts(seen: str) -> tuple[str, str]:
    """(bootID, Node uid) of a recorded boot; a record of an older gtvp has no uid."""
    boot, _, uid = seen.partition("@")
    return boot, uid


def other_boot(seen: str | None, reported: str | None) -> bool:
    """Whether the boot a Node `reported` (`node_boot_id`) is another than the one `seen`:
    another bootID, or another Node object, where both tell it."""
    if not seen or not reported:
        return False
    (seen_boot, seen_uid), (boot, uid) = boot_parts(seen), boot_parts(reported)
    if seen_boot and not seen_uid and not boot and uid:
        # a record of an older gtvp (no uid) against a Node reporting no boot: it cannot
        # be told the same Node, and a kubelet always reports its boot: another
        return True
    return bool(seen_boot and boot and seen_boot != boot) or bool(
        seen_uid and uid and seen_uid != uid
    )


def label_level(status: Mapping[str, Any], boot_id: str | None = None, *, now: dt.datetime) -> int:
    """The level a Node's labels may advertise for new placements: the member's level while
    its verdict is Trusted, unexpired at `now`, with uses left, else 0 (a stored verdict
    past its expiry, which the operator could not replace yet, labels nothing). A spent
    verdict (maxUses decisions made) takes the labels off until the fresh quote it asks for
    verifies, so the scheduler cannot keep placing gated VMs on a member whose agent
    withholds that quote; VMs already there stay (labels only steer scheduling; no taint is
    set for it). So does a Node reporting another boot (`boot_id`) than the one the
    verdict's member last saw (`trust.nodeBootID`): its host rebooted since, and the member
    is judged again."""
    trust = status.get("trust") or {}
    uses = int(trust.get("usesLeft", 0) or 0)
    expires = parse_ts(trust.get("expiresAt"))
    if _another_boot(status, boot_id) or expires is None or expires <= now:
        return 0
    return int(status.get("level", 0) or 0) if uses > 0 else 0


def _another_boot(status: Mapping[str, Any], boot_id: str | None) -> bool:
    """Whether `boot_id` (the boot a Node reports) is another than its member's `status`
    last saw (`trust.nodeBootID`); never when either is unknown."""
    seen = (status.get("trust") or {}).get("nodeBootID")
    return other_boot(seen if isinstance(seen, str) else None, boot_id)


def boot_unquoted(status: Mapping[str, Any], boot_id: str | None) -> bool:
    """Whether the member's host booted again since the quote its verdict rests on: its
    Node reports (`boot_id`) another boot than the operator last saw, or the operator saw
    one since that quote (`trust.bootUnquoted`, until a quote verifies, whatever the Node
    says after: root on the host can write the old bootID back). Nothing may be handed to
    what runs there on that verdict (a reboot spends it for placements, but a key release
    is no placement). Only as good as the kubelet's word: root that keeps its Node
    reporting the old boot is seen by the TPM's counters at the next quote."""
    return bool((status.get("trust") or {}).get("bootUnquoted")) or _another_boot(status, boot_id)


def boot_changed(status: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """Whether `node` reports another boot than its member's `status` last saw."""
    return _another_boot(status, node_boot_id(node))


def node_patch(
    node_labels: Mapping[str, str],
    node_taints: Sequence[Mapping[str, Any]],
    phase: str,
    level: int,
) -> dict[str, Any] | None:
    """A merge patch bringing a Node's gtvp labels and taint in line; None when it already is."""
    labels = {
        k: v
        for k, v in desired_labels(phase, level).items()
        if node_labels.get(k) != v and not (v is None and k not in node_labels)
    }
    want_taint = phase != MemberPhase.TRUSTED
    others = [dict(t) for t in node_taints if t.get("key") != TAINT_KEY]
    has_taint = any(t.get("key") == TAINT_KEY for t in node_taints)
    patch: dict[str, Any] = {}
    if labels:
        patch["metadata"] = {"labels": labels}
    if want_taint != has_taint:
        taints = others + (
            [{"key": TAINT_KEY, "value": phase or "Unknown", "effect": "NoSchedule"}]
            if want_taint
            else []
        )
        patch["spec"] = {"taints": taints}
    return patch or None


@dataclass(frozen=True)
class MemberView:
    """What an admission decision needs to know about one member."""

    name: str
    phase: str
    level: int
    expires_at: dt.datetime | None
    uses_left: int

    def usable(self, now: dt.datetime, level: int) -> bool:
        """Trusted, fresh, with uses left and at least `level`: a new decision may rest on
        the verdict."""
        return self.trusted_at(now, level) and self.uses_left > 0

    def trusted_at(self, now: dt.datetime, level: int) -> bool:
        """Trusted, not expired and at least `level`, whatever uses are left: a decision
        already taken on the verdict (a migration under way) still stands."""
        return (
            self.phase == MemberPhase.TRUSTED
            and self.level >= level
            and self.expires_at is not None
            and now < self.expires_at
        )


def member_view(name: str, status: Mapping[str, Any], boot_id: str | None = None) -> MemberView:
    """The member as admission sees it; `boot_id`: the boot its Node reports. A Node that
    reports another boot than the verdict saw has its verdict spent here already (the
    operator's next look writes it so): no new decision rests on it."""
    trust = status.get("trust") or {}
    rebooted = _another_boot(status, boot_id)
    return MemberView(
        name=name,
        phase=str(status.get("phase", "")),
        level=int(status.get("level", 0) or 0),
        expires_at=parse_ts(trust.get("expiresAt")),
        uses_left=0 if rebooted else int(trust.get("usesLeft", 0) or 0),
    )


def below_since(previous: Mapping[str, Any] | None, held: int, now: dt.datetime) -> dict[str, str]:
    """The member's `status.belowSince`: for every level above the one it holds (`held`: its
    verdict's level while that is Trusted, 0 otherwise; Maintenance does not lower it),
    since when it has held less than that level without a break, kept from `previous` where
    it already held less, `now` where it has just fallen below. A level's `migrateWithin`
    counts from here, so trust going away and coming back lower never restarts the clock of
    a level it did not reach again."""
    prev = previous or {}
    return {
        str(level): str(prev.get(str(level)) or format_ts(now))
        for level in range(max(held, 0) + 1, MAX_LEVEL + 1)
    }


def below_since_times(status: Mapping[str, Any]) -> dict[int, dt.datetime]:
    """`status.belowSince` read back (level -> since when the member holds less)."""
    out = {}
    for key, value in (status.get("belowSince") or {}).items():
        when = parse_ts(value)
        if str(key).isdigit() and when is not None:
            out[int(key)] = when
    return out


def held_level(status: Mapping[str, Any]) -> int:
    """The level a member's status lets it hold: its level while Trusted, else none."""
    if status.get("phase") != MemberPhase.TRUSTED:
        return 0
    return int(status.get("level", 0) or 0)


NOT_STORED = "NotStored"
"""The reason of a stored Trusted verdict held to less by its Node's labels (`as_labelled`)."""
LABEL_LAG = dt.timedelta(seconds=5)
"""How long after a verdict is stored its Node's trust labels may still say less (the
replica holding the member writes them right after the verdict)."""


def highest_level(labels: Mapping[str, str] | None) -> int | None:
    """The highest level whose trust label (`gtvp-level-N: "true"`) a Node's labels or a
    nodeSelector carry; None when they carry none."""
    labels = labels or {}
    return max(
        (n for n in range(1, MAX_LEVEL + 1) if labels.get(f"{LEVEL_LABEL}{n}") == "true"),
        default=None,
    )


def labelled_level(labels: Mapping[str, str] | None) -> int:
    """The level a Node's gtvp trust labels advertise (0: not trusted)."""
    if (labels or {}).get(TRUSTED_LABEL) != "true":
        return 0
    return highest_level(labels) or 0


def as_labelled(
    status: Mapping[str, Any],
    labels: Mapping[str, str] | None,
    boot_id: str | None,
    now: dt.datetime,
) -> Mapping[str, Any]:
    """A stored Trusted `status` no more than its Node's labels say, once they have had
    `LABEL_LAG` to follow it. Only the operator sets those labels (a host may remove them
    from its own Node only), and the replica holding the member takes them off for a verdict
    the API server refused to store (`ClusterView.hold_to`): the other replicas, which
    never saw that verdict, hold the member to what the labels say. A Node saying less
    because its verdict is spent, expired or from another boot changes nothing here
    (`label_level` is 0 for those already)."""
    if status.get("phase") != MemberPhase.TRUSTED:
        return status
    verified = parse_ts((status.get("trust") or {}).get("verifiedAt"))
    if verified is None or now - verified < LABEL_LAG:
        return status
    labelled = labelled_level(labels)
    if labelled >= label_level(status, boot_id, now=now):
        return status
    # its token affirms what the labels no longer say: not served with it
    trust = {k: v for k, v in (status.get("trust") or {}).items() if k != "token"}
    trust["reason"] = NOT_STORED
    if labelled > 0:
        return {**status, "level": labelled, "trust": trust}
    trust["verdict"] = "Untrusted"
    return {**status, "phase": MemberPhase.UNTRUSTED.value, "level": 0, "trust": trust}


def labelled_until(status: Mapping[str, Any], now: dt.datetime) -> dt.datetime | None:
    """Until when `as_labelled(status, labels, boot_id, t)` gives for every `t` from `now`
    what it gives at `now` (the same labels and boot): the next of the instants its answer
    turns on, the end of `LABEL_LAG` after the verdict and its expiry (None: never)."""
    if status.get("phase") != MemberPhase.TRUSTED:
        return None
    trust = status.get("trust") or {}
    verified = parse_ts(trust.get("verifiedAt"))
    turns = [parse_ts(trust.get("expiresAt"))]
    if verified is not None:
        turns.append(verified + LABEL_LAG)
    later = [t for t in turns if t is not None and t > now]
    return min(later, default=None)


def holds_less(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    """Whether status `after` backs less than `before` does in any way: trust taken away
    (`takes_trust_away`), or a Trusted verdict with fewer uses left or an earlier expiry."""
    if after.get("phase") != MemberPhase.TRUSTED or takes_trust_away(before, after):
        return True
    was, now = before.get("trust") or {}, after.get("trust") or {}
    if int(now.get("usesLeft", 0) or 0) < int(was.get("usesLeft", 0) or 0):
        return True
    ends, ended = parse_ts(now.get("expiresAt")), parse_ts(was.get("expiresAt"))
    return ends is None or (ended is not None and ends < ended)


def takes_trust_away(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    """Whether status `after` lets the member hold less than `before` did: it lost its
    verdict, went into Maintenance, or its level dropped."""
    return held_level(after) < held_level(before)
