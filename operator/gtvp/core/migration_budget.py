"""What the policy's migration limits still allow, shared by evacuations, drains and balancing.

The limits (`spec.migration`): at most `maxParallel` active migrations in the cluster,
`maxOutboundPerNode` leaving any one member and `maxInboundPerNode` arriving at any one.
They bound the migrations gtvp itself starts: only active migrations labelled
`gtvp.io/evacuation`, `gtvp.io/drain` or `gtvp.io/balancing` count. A migration someone
else created (`foreign`) is KubeVirt's to queue under its own `parallelMigrationsPerCluster`
and `parallelOutboundMigrationsPerNode`; counting it here would let any tenant stop every
evacuation by keeping a few migrations pending. A migration leaves the node its caller
says (`source_of`: KubeVirt's `sourceNode`, or the node its VMI runs on before KubeVirt
records one) and arrives at its target, or at the member it is pinned to before KubeVirt
records a target. A plan `take`s a slot for each migration it starts, so the migrations it
plans together keep the limits too. Pure; the only mutable state is the plan's own count.

Moves that a tenant's own evidence causes (a Lazy Box whose vTPM quote failed, or that
stopped quoting) take at most `tenant_share` of `maxParallel`: a tenant can make them at
will and keep each one long (a guest that dirties its memory), and with the whole budget
theirs, a member that lost trust would wait for its evacuation until its VMs are stopped
at `migrateWithin` (found by a review). While such an evacuation is held back by the limits,
they start none, and one of theirs gives way to it (`core.preemption`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from gtvp.core.policy import MigrationLimits


class ActiveMigration(Protocol):
    """A VirtualMachineInstanceMigration as the budget reads it (core.evacuation.Migration)."""

    @property
    def namespace(self) -> str: ...

    @property
    def vmi(self) -> str: ...

    @property
    def source(self) -> str | None: ...

    @property
    def active(self) -> bool: ...

    @property
    def inbound_to(self) -> str | None: ...

    @property
    def foreign(self) -> bool:
        """Not started by gtvp (none of `core.evacuation.GTVP_MIGRATION_LABELS`): the limits
        do not count it."""


SourceOf = Callable[[ActiveMigration], str | None]


def recorded_source(node_of: Mapping[tuple[str, str], str]) -> SourceOf:
    """KubeVirt's sourceNode, else the node the VMI runs on (`node_of`: (namespace, VMI) ->
    node), for a migration KubeVirt has not recorded a source for yet."""

    def source_of(m: ActiveMigration) -> str | None:
        return m.source or node_of.get((m.namespace, m.vmi))

    return source_of


@dataclass
class MigrationBudget:
    """The migrations in flight against the policy's limits; `take` counts a new one."""

    limits: MigrationLimits
    running: int = 0  # gtvp's active migrations in the cluster
    outbound: dict[str, int] = field(default_factory=dict)  # member -> migrations leaving it
    inbound: dict[str, int] = field(default_factory=dict)  # member -> migrations arriving

    @classmethod
    def of(
        cls,
        limits: MigrationLimits,
        migrations: Iterable[ActiveMigration],
        source_of: SourceOf = lambda m: m.source,
    ) -> MigrationBudget:
        """The budget left by gtvp's active ones among `migrations` (finished ones free
        theirs; foreign ones never held any)."""
        budget = cls(limits)
        for m in migrations:
            if m.active and not m.foreign:
                budget.take(source_of(m), m.inbound_to)
        return budget

    def leaving(self, node: str) -> int:
        return self.outbound.get(node, 0)

    def arriving(self, node: str) -> int:
        return self.inbound.get(node, 0)

    def cluster_allows(self) -> bool:
        """gtvp runs fewer migrations in the cluster than maxParallel."""
        return self.running < self.limits.max_parallel

    def sends(self, source: str) -> bool:
        """`source` may send one more (fewer than maxOutboundPerNode leave it)."""
        return self.leaving(source) < self.limits.max_outbound_per_node

    def receives(self, target: str) -> bool:
        """`target` may receive one more (fewer than maxInboundPerNode arrive at it)."""
        return self.arriving(target) < self.limits.max_inbound_per_node

    def allows(self, source: str, target: str | None = None) -> bool:
        """One more migration from `source` (to `target`, when pinned) keeps every limit."""
        return (
            self.cluster_allows()
            and self.sends(source)
            and (target is None or self.receives(target))
        )

    def least_busy(self, targets: Iterable[str]) -> str | None:
        """The target among `targets` that may receive, with the fewest arrivals (then by
        name); None when each is receiving its limit."""
        room = [t for t in targets if self.receives(t)]
        return min(room, key=lambda t: (self.arriving(t), t), default=None)

    def take(self, source: str | None, target: str | None = None) -> None:
        """Count one more migration leaving `source` (if known) for `target` (if pinned)."""
        self.running += 1
        if source:
            self.outbound[source] = self.outbound.get(source, 0) + 1
        if target:
            self.inbound[target] = self.inbound.get(target, 0) + 1


def tenant_share(
    limits: MigrationLimits,
    migrations: Iterable[ActiveMigration],
    tenants_moves: Collection[tuple[str, str]],
    *,
    yielding: bool = False,
) -> MigrationLimits:
    """The limits for starting moves of the VMIs in `tenants_moves` ((namespace, name):
    boxes whose own evidence failed): together they hold at most half of maxParallel (at
    least one), the rest is kept for evacuations of members that lost trust, drains and
    balancing; none more while `yielding` (such an evacuation waits for a slot: under a
    cluster limit of 1 the half is the whole budget)."""
    share = 0 if yielding else max(1, limits.max_parallel // 2)
    active = [m for m in migrations if m.active and not m.foreign]
    theirs = sum(1 for m in active if (m.namespace, m.vmi) in tenants_moves)
    return replace(limits, max_parallel=min(limits.max_parallel, len(active) - theirs + share))
