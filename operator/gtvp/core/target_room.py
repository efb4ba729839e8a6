"""Room on migration targets: an evacuation or drain is pinned only where the VMI fits.

gtvp pins each evacuation and drain migration to one member (`kubernetes.io/hostname` in
`addedNodeSelector`), chosen for its cached component bytes and its arrivals. A member that
caches most of a box's bytes but has no room for the VMI's requests would capture it: the
scheduler leaves the target pod Pending, KubeVirt fails the migration, the retry picks the
same member, and after three failures the VMI stays where it is, on the host gtvp is
emptying. So the plans look only at members where the VMI's requests fit in what is not
committed yet: allocatable (`Node.status.allocatable`) less the requests of the VMIs and
boxes placed there (the figure placement and balancing use) and of the VMIs migrating in,
less what the plan itself has already sent there. That count sees VMIs only, not every pod,
so it never says "full" where the scheduler would find room; a member whose allocatable is
unknown is not judged. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gtvp.core.migration_budget import ActiveMigration
from gtvp.core.placement import Host
from gtvp.core.quantity import human_bytes

Key = tuple[str, str]  # namespace, VMI name


@dataclass
class TargetRoom:
    """CPU millicores and memory bytes not committed on each member, as a plan spends them."""

    free: dict[str, list[int]]

    @classmethod
    def of(
        cls,
        hosts: Iterable[Host],
        migrations: Sequence[ActiveMigration],
        requests: Mapping[Key, tuple[int, int]],
        node_of: Mapping[Key, str],
    ) -> TargetRoom:
        """From the members' hosts; each active migration's VMI (`requests`) takes its room
        on the member it goes to, unless it already runs there (`node_of`)."""
        free = {
            h.name: [h.cpu_millis - h.cpu_used, h.memory_bytes - h.memory_used]
            for h in hosts
            if h.cpu_millis > 0 and h.memory_bytes > 0
        }
        room = cls(free)
        for m in migrations:
            key = (m.namespace, m.vmi)
            target = m.inbound_to
            if m.active and target and node_of.get(key) != target:
                room.take(target, *requests.get(key, (0, 0)))
        return room

    def fits(self, name: str, cpu_millis: int, memory_bytes: int) -> bool:
        left = self.free.get(name)
        return left is None or (cpu_millis <= left[0] and memory_bytes <= left[1])

    def take(self, name: str, cpu_millis: int, memory_bytes: int) -> None:
        left = self.free.get(name)
        if left is not None:
            left[0] -= cpu_millis
            left[1] -= memory_bytes

    def shortfall(self, names: Iterable[str], cpu_millis: int, memory_bytes: int) -> str:
        """Why none of `names` has room: what the VMI asks and what the roomiest has left."""
        ask = f"{cpu_millis}m CPU and {human_bytes(memory_bytes)}"
        known = [(n, self.free[n]) for n in sorted(names) if n in self.free]
        if not known:
            return f"no member has room for its requests ({ask})"
        name, (cpu, mem) = max(known, key=lambda kv: (min(kv[1][0], kv[1][1]), kv[0]))
        return (
            f"no member that may take it has room for its requests ({ask}); "
            f"{name} has {max(cpu, 0)}m CPU and {human_bytes(max(mem, 0))} left"
        )
