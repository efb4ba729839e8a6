"""Room on migration targets: an evacuation or drain is pinned only where the VMI fits.

gtvp pins each evacuation and drain migration to one member (`kubernetes.io/hostname` in
`addedNodeSelector`), chosen for its cached component bytes and its arrivals. A member that
caches most of a box's bytes but has no room for the VMI's requests would capture it: the
scheduler leaves the target pod Pending, KubeVirt fails the migration, the retry picks the
same member, and after three failures the VMI stays where it is, on the host gtvp is
emptying. So the plans look only at members where the VMI's requests fit in what is not
committed yet: allocatable (`Node.status.allocatable`) less the requests of every VMI placed
there (each by its own spec, whatever its labels say: a label cannot hide a VM), of the VMIs
migrating in, and of what the plan itself has already sent there.

A migration migrating in counts when gtvp started it or once KubeVirt has recorded its
target: a tenant's own migration pinned to a member but never scheduled holds no room there
(as the migration limits ignore it), so a tenant cannot fill a member with pending migrations
to keep gtvp's evacuations away. A member whose allocatable is unknown is not judged, and a
VMI that asks for nothing fits anywhere.

A member can fill up after gtvp pinned a migration there (a tenant's VMs land on it in the
meantime): the target pod would wait for room until KubeVirt fails the migration, and three
failures in a row leave the VMI where it is. `overcommitted` names the pinned migrations to
take back from a member committed beyond its allocatable, so the next plan sends them where
they fit. Pure.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from gtvp.core.footprint import Footprint
from gtvp.core.migration_budget import ActiveMigration
from gtvp.core.quantity import human_bytes

Key = tuple[str, str]  # namespace, name (of a VMI, or of a migration in `inbound`)


class Inbound(ActiveMigration, Protocol):
    """A VirtualMachineInstanceMigration as the room reads it (core.evacuation.Migration):
    what the migration budget reads, and the target KubeVirt recorded and the deletion."""

    @property
    def name(self) -> str: ...
    @property
    def target(self) -> str | None: ...
    @property
    def deleting(self) -> bool: ...


@dataclass
class TargetRoom:
    """CPU millicores and memory bytes not committed on each member, as a plan spends them."""

    free: dict[str, list[int]]
    inbound: dict[str, list[tuple[Key, int, int]]] = field(default_factory=dict)
    """Per member, the migrations counted there: (namespace, migration name), CPU, memory."""

    @classmethod
    def of(
        cls,
        allocatable: Mapping[str, tuple[int, int]],
        used: Mapping[str, tuple[int, int]],
        migrations: Iterable[Inbound],
        placed: Mapping[Key, Footprint],
    ) -> TargetRoom:
        """`allocatable` and `used` (every placed VMI's requests) per member; `placed`: each
        VMI's node and requests, for the migrations on their way."""
        free = {
            name: [cpu - used.get(name, (0, 0))[0], mem - used.get(name, (0, 0))[1]]
            for name, (cpu, mem) in allocatable.items()
            if cpu > 0 and mem > 0
        }
        room = cls(free)
        for m in migrations:
            target = m.inbound_to
            if not m.active or m.deleting or not target or (m.foreign and not m.target):
                continue
            on = placed.get((m.namespace, m.vmi))
            if on is not None and on.node != target:
                room.take(target, on.cpu_millis, on.memory_bytes)
                room.inbound.setdefault(target, []).append(
                    ((m.namespace, m.name), on.cpu_millis, on.memory_bytes)
                )
        return room

    def fits(self, name: str, cpu_millis: int, memory_bytes: int) -> bool:
        left = self.free.get(name)
        if left is None:
            return True
        return (cpu_millis <= 0 or cpu_millis <= left[0]) and (
            memory_bytes <= 0 or memory_bytes <= left[1]
        )

    def overcommitted(self, cancellable: Collection[Key]) -> dict[Key, str]:
        """(namespace, migration) -> the member it is pinned to, for the `cancellable`
        migrations (gtvp's own, not scheduled yet) to take back from members committed
        beyond their allocatable: on each, the last by name first, each asking what the
        member lacks, until the rest fits; then any of those that fits again after all stays
        (the first by name first). Nothing else there is moved to make room."""
        out: dict[Key, str] = {}
        for member, left in sorted(self.free.items()):
            cpu, mem = left
            back = []
            for pin in sorted(self.inbound.get(member, ()), reverse=True):
                key, cpu_asks, mem_asks = pin
                if cpu >= 0 and mem >= 0:
                    break
                if key in cancellable and ((cpu < 0 < cpu_asks) or (mem < 0 < mem_asks)):
                    cpu, mem = cpu + cpu_asks, mem + mem_asks
                    back.append(pin)
            for key, cpu_asks, mem_asks in sorted(back):
                if cpu_asks <= cpu and mem_asks <= mem:
                    cpu, mem = cpu - cpu_asks, mem - mem_asks  # it fits after all: it stays
                else:
                    out[key] = member
        return out

    def copy(self) -> TargetRoom:
        """The same room, to plan against without spending this one."""
        return TargetRoom(
            {name: list(left) for name, left in self.free.items()},
            {name: list(counted) for name, counted in self.inbound.items()},
        )

    def take(self, name: str, cpu_millis: int, memory_bytes: int) -> None:
        left = self.free.get(name)
        if left is not None:
            left[0] -= cpu_millis
            left[1] -= memory_bytes


def shortfall(cpu_millis: int, memory_bytes: int) -> str:
    """Why a VMI waits when no member that may take it has room (the same words while it
    asks the same, so a reason said once per change is not said again as room shifts)."""
    return (
        f"no member that may take it has room for what its pod asks ({cpu_millis}m CPU and "
        f"{human_bytes(memory_bytes)}, KubeVirt's overhead included)"
    )
