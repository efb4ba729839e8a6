"""What gtvp does about a migration of a gated VMI that is under way: abort it when a node it
may be bringing the VM to may not hold the VM's level, else spend one use of its target's
verdict, once.

Where a migration goes is read from every source that could tell, because some of them a
host can write: KubeVirt copies the VMI's `status.migrationState.targetNode` (written by the
hosts' virt-handler, so root on the source or the target can name another member there) into
the migration's status; gtvp pins its own migrations with a hostname selector; and
virt-controller creates the target's launcher pod labelled `kubevirt.io/migrationJobUID`
with the migration's uid, bound by the scheduler to a node it can no longer change. A
migration is aborted when any of those nodes may not receive the VM (fail closed: a forged
target adds a node, it never hides the real one).

A use is a decision: the migration spends one use of its target's verdict the first time
this process judges it (the real target: its launcher pod's node, else the recorded target,
else the pin). After that, a verdict whose uses ran out (other decisions, or this very
spend) does not abort it: the decision was taken while uses were left. Only what takes
trust away does: the phase, the level, the expiry. A migration this process sees first on
a verdict with no use left is not aborted either: after a restart or a shard handover its
use may well have been spent by the process that judged it before (a new decision on a
spent verdict cannot reach the node anyway: the trust labels come off with the last use,
and admission refuses a migration pinned there; what is left is the moment the labels take
to go, as for VMI starts). Pure.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gtvp.core.evacuation import Migration
from gtvp.core.trust import MemberView


def heading_for(migration: Migration, target_pod_nodes: Iterable[str]) -> frozenset[str]:
    """Every node `migration` may be bringing its VMI to: the nodes of the target launcher
    pods made for it and its pin; while no such pod is known, its recorded target and its
    pin. A VM runs only where a launcher pod of it runs, so once the pod is known the
    recorded target (which root on the source may also write, naming an untrusted node to
    abort every move off its host) is not read."""
    pods = frozenset(target_pod_nodes)
    named = (*pods, migration.pinned) if pods else (migration.target, migration.pinned)
    return frozenset(n for n in named if n)


def spend_on(migration: Migration, target_pod_nodes: Iterable[str]) -> str | None:
    """The node whose verdict the migration's decision spends: the node its target launcher
    pod is bound to (one pod: KubeVirt makes one per migration), else the recorded target,
    else the pin."""
    pods = sorted(set(target_pod_nodes))
    if len(pods) == 1:
        return pods[0]
    return migration.target or migration.pinned


@dataclass(frozen=True)
class InFlight:
    """`abort`: a node the migration may be heading for that may not receive the VM (why in
    `reason`); else `spend`: the node whose verdict spends one use now (None: nothing to
    spend, judged before)."""

    abort: str | None = None
    reason: str = ""
    spend: str | None = None


def judge_in_flight(
    heading: Iterable[str],
    spender: str | None,
    members: Mapping[str, MemberView | None],
    *,
    level: int,
    now: dt.datetime,
    first: bool,
) -> InFlight:
    """The decision on a migration under way of a level-`level` VMI heading for `heading`
    (the nodes this replica judges: `members` maps each to its member's view, None: no
    Member). `first`: the migration was not judged before (its use not spent yet);
    `spender`: `spend_on`'s node, when this replica judges it."""
    for node in sorted(set(heading)):
        member = members.get(node)
        if member is None:
            return InFlight(abort=node, reason="it is no member")
        if not member.trusted_at(now, level):
            return InFlight(abort=node, reason=f"it may not receive a level-{level} VM")
    if not first or spender is None:
        return InFlight()
    member = members.get(spender)
    if member is None:
        return InFlight(abort=spender, reason="it is no member")
    if member.uses_left <= 0:
        return InFlight()  # spent before this process saw it, or in the labels' last moment
    return InFlight(spend=spender)
