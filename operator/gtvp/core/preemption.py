"""Which move a tenant's own evidence caused gives way to an evacuation that must go.

Moves that a Lazy Box's own vTPM evidence causes (a mismatch, an overdue quote) hold at
most half of `maxParallel` together (`migration_budget.tenant_share`). That left two ways
for a tenant, who can fail its boxes' quotes at will and keep each move long (a guest
dirtying its memory faster than it moves), to hold back the evacuation of a member that
lost trust until `migrateWithin` stopped its VMs: under `maxParallel: 1` the half is the
whole budget, and the moves take `maxInboundPerNode` slots on the targets of their level.

So when the evacuation's own plan (`plan_evacuation`, handed in as `Plan`) starts nothing
now, and would start a VMI with one of the tenants' moves gone, that move is deleted
(KubeVirt aborts it; the box stays on the member its evidence failed on, which still holds
the box's level); and while the cluster limit is what holds such an evacuation back, the
tenants start no new move for `TENANT_HOLD` seconds after it was last seen: a box waits
for the member's evacuation, never the other way round. Asking the plan itself (not a
copy of its rules) keeps what it skips (a VMI whose moves keep failing, one its own node
affinity keeps off every target with room, a target receiving its limit) from costing a
tenant's move for nothing. Pure.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from gtvp.core.evacuation import NOT_SCHEDULED, Migration, Retarget
from gtvp.core.policy import MigrationLimits

TENANT_HOLD = 30.0
"""Seconds the tenants start no move of their own after an evacuation of a member that lost
trust was last held back by the cluster limit (it is looked at again every few seconds)."""

UNBOUNDED = 1 << 30

WHY = (
    "its move, caused by the box's own vTPM evidence, held the migration slot that the "
    "evacuation of a member that lost trust needs; the box stays where it is and moves once "
    "that evacuation has its slots"
)

Plan = Callable[[Sequence[Migration], MigrationLimits], Sequence[object]]
"""What the evacuation would start now with these migrations about and these limits (its
`plan_evacuation`, everything else as the pass has it)."""


@dataclass(frozen=True)
class Preemption:
    held: bool  # the cluster limit alone holds the evacuation back: the tenants yield
    delete: Retarget | None  # the tenants' move to delete so that it can start


def preemption(
    *,
    plan: Plan,
    migrations: Sequence[Migration],
    limits: MigrationLimits,
    tenants_moves: Mapping[tuple[str, str], str],
) -> Preemption:
    """For an evacuation of a member that lost trust whose `plan` starts nothing now:
    whether it would start something without the cluster limit, and the tenants' move
    whose deletion lets it start (the ones KubeVirt has not scheduled first: nothing copied
    yet; then the oldest). `tenants_moves`: (namespace, VMI) -> the member the box's own
    evidence failed on, for boxes whose member still holds their level; a move of theirs
    is gtvp's evacuation off that member, nothing else (not a drain, not balancing, not
    another member's evacuation)."""
    if plan(migrations, limits):
        return Preemption(False, None)  # it starts in this pass
    held = bool(plan(migrations, replace(limits, max_parallel=UNBOUNDED)))
    theirs = [
        m
        for m in migrations
        if m.active
        and not m.foreign
        and not m.deleting
        and m.drains is None
        and m.evacuates is not None
        and tenants_moves.get((m.namespace, m.vmi)) == m.evacuates
    ]
    for m in sorted(theirs, key=_order):
        if plan([o for o in migrations if o is not m], limits):
            return Preemption(held, Retarget(m.namespace, m.name, m.vmi, WHY))
    return Preemption(held, None)


def _order(m: Migration) -> tuple[bool, dt.datetime, str, str]:
    oldest = dt.datetime.min.replace(tzinfo=dt.UTC)
    return m.phase not in NOT_SCHEDULED, m.created or oldest, m.namespace, m.name
