"""Balancing: live-migrate Lazy Boxes off members that stay overloaded.

A member's load is the larger of its CPU and memory commitment (requests of the boxes and of
every other VMI on it, over `Node.status.allocatable`): the figure placement uses, computed
from objects the API server holds, never from what a node says about itself. A member above
the policy's high watermark for `sustainFor` is a source; boxes move from it, one at a time
and smallest first among those whose move alone brings it back under the high watermark
(else the largest), onto a Trusted member of a sufficient level that stays at or under the
low watermark with the box, preferring the one that caches most of the box's components,
then the least loaded, then by name. A box already on its way (an active migration) counts
at its target and as gone from its source, so a move outlasting a planning pass is not
planned twice. The gap between the watermarks, the sustain window
and a per-box cool-down keep the pool from oscillating; the policy's migration limits
(cluster, outbound, inbound) are shared with evacuations. Pure and deterministic.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gtvp.core.evacuation import HOSTNAME_LABEL, Migration, migration_object
from gtvp.core.migration_budget import MigrationBudget, recorded_source
from gtvp.core.phases import MemberPhase
from gtvp.core.placement import Host
from gtvp.core.policy import Balancing, MigrationLimits
from gtvp.core.quantity import human_bytes
from gtvp.core.trust import trust_selector

BALANCE_LABEL = "gtvp.io/balancing"

Key = tuple[str, str]  # namespace, name


@dataclass(frozen=True)
class PlacedBox:
    """A running box as the balancer sees it (its VMI has the box's name)."""

    namespace: str
    name: str
    node: str
    level: int
    cpu_millis: int
    memory_bytes: int
    parts: tuple[tuple[str, int], ...] = ()  # (digest, size) of its resolved components

    def cached_on(self, images: frozenset[str]) -> int:
        return sum(size for digest, size in self.parts if digest in images)


@dataclass(frozen=True)
class Move:
    box: PlacedBox
    target: str
    reason: str
    migration: dict[str, Any]


@dataclass(frozen=True)
class BalancePlan:
    moves: tuple[Move, ...]
    over_since: dict[str, dt.datetime]  # members above the high watermark, and since when
    stuck: dict[str, str]  # sustained sources nothing could be moved off, and why


def load(cpu_used: int, memory_used: int, host: Host) -> float:
    """Commitment as a fraction: the larger of CPU and memory (1.0 when nothing allocatable)."""
    if host.cpu_millis <= 0 or host.memory_bytes <= 0:
        return 1.0
    return max(cpu_used / host.cpu_millis, memory_used / host.memory_bytes)


def migration_name(
    box: PlacedBox, target: str, since: dt.datetime, previous: dt.datetime | None = None
) -> str:
    """One name per attempt: the box, its move, the overload's start and when the box's
    `previous` balancing migration was made. Without the last, a move that failed was
    planned again under its old name once the cooldown passed, met the Failed migration
    (409), and was counted as started every round without ever moving (found by a
    review)."""
    attempt = "" if previous is None else f"^{previous.isoformat()}"
    digest = hashlib.sha256(
        f"{box.namespace}/{box.name}@{box.node}>{target}#{since.isoformat()}{attempt}".encode()
    )
    return f"gtvp-balance-{box.name[:34]}-{digest.hexdigest()[:8]}"


def plan_balance(
    *,
    hosts: Sequence[Host],
    boxes: Sequence[PlacedBox],
    migrations: Sequence[Migration],
    last_moved: Mapping[Key, dt.datetime],
    over_since: Mapping[str, dt.datetime],
    settings: Balancing,
    limits: MigrationLimits,
    now: dt.datetime,
) -> BalancePlan:
    """The migrations to start now, and the overload bookkeeping for the next call."""
    high = settings.high_watermark / 100
    since = {
        h.name: over_since.get(h.name, now)
        for h in hosts
        # members that are not Trusted are emptied by evacuation, not balanced (a Trusted
        # member waiting for a fresh quote after spending its uses keeps its clock); a box
        # on its way out still counts here until it has left (a failed move keeps the clock)
        if h.phase == MemberPhase.TRUSTED
        and h.cpu_millis > 0
        and load(h.cpu_used, h.memory_used, h) > high
    }
    if not settings.enabled:
        return BalancePlan((), since, {})
    loads = _Loads.of(hosts)
    active = [m for m in migrations if m.active]
    loads.count_moving(active, {(b.namespace, b.name): b for b in boxes})
    balancer = _Balancer(
        settings=settings,
        now=now,
        since=since,
        loads=loads,
        budget=MigrationBudget.of(
            limits, active, recorded_source({(b.namespace, b.name): b.node for b in boxes})
        ),
        boxes=boxes,
        busy=frozenset((m.namespace, m.vmi) for m in active),
        last_moved=last_moved,
    )
    sources = sorted(
        (n for n, t in since.items() if now - t >= settings.sustain_for),
        key=lambda n: (-loads.load(n), n),
    )
    stuck: dict[str, str] = {}
    for source in sources:
        why = balancer.relieve(source)
        if loads.load(source) > high and not any(m.box.node == source for m in balancer.moves):
            stuck[source] = why
    return BalancePlan(tuple(balancer.moves), since, stuck)


@dataclass
class _Loads:
    """What each member commits (CPU millis, memory bytes), as the plan moves boxes.

    A box on its way (an active migration) counts at its target already and, for whether its
    source still needs relief (`load`), as gone from there: a live migration outlasts a
    planning period, and a second box must not leave a member the first one relieves. As
    room on its source (`room_for`), it stays until it has left: a member is judged as a
    target by what it holds now, so a move that fails leaves nothing overloaded. Only gtvp's
    own migrations, or one KubeVirt has found a target for, count as leaving: a tenant's
    migration pinned nowhere must not hide an overload."""

    hosts: Mapping[str, Host]
    used: dict[str, list[int]]
    leaving: dict[str, list[int]]

    @classmethod
    def of(cls, hosts: Sequence[Host]) -> _Loads:
        return cls(
            {h.name: h for h in hosts},
            {h.name: [h.cpu_used, h.memory_used] for h in hosts},
            {h.name: [0, 0] for h in hosts},
        )

    def load(self, name: str, without: PlacedBox | None = None) -> float:
        """What `name` commits once the boxes leaving it (and `without`) have left."""
        (cpu, mem), (cpu_out, mem_out) = self.used[name], self.leaving[name]
        if without is not None:
            cpu_out, mem_out = cpu_out + without.cpu_millis, mem_out + without.memory_bytes
        return load(cpu - cpu_out, mem - mem_out, self.hosts[name])

    def room_for(self, name: str, box: PlacedBox) -> tuple[float, bool]:
        """`name`'s load with `box` arriving (the boxes leaving it still there), and whether
        it fits at all."""
        h = self.hosts[name]
        cpu, mem = self.used[name][0] + box.cpu_millis, self.used[name][1] + box.memory_bytes
        return load(cpu, mem, h), cpu <= h.cpu_millis and mem <= h.memory_bytes

    def add(self, name: str, box: PlacedBox, sign: int = 1) -> None:
        self.used[name][0] += sign * box.cpu_millis
        self.used[name][1] += sign * box.memory_bytes

    def count_moving(self, active: Sequence[Migration], boxes: Mapping[Key, PlacedBox]) -> None:
        """Each box on its way: at its target, and as leaving the member it still runs on."""
        for m in active:
            moving = boxes.get((m.namespace, m.vmi))
            target = m.inbound_to
            if moving is None or target == moving.node:
                continue  # gone, or already where it was going
            if target in self.used:
                self.add(target, moving)
            if moving.node in self.leaving and (not m.foreign or m.target):
                self.leaving[moving.node][0] += moving.cpu_millis
                self.leaving[moving.node][1] += moving.memory_bytes


class _Balancer:
    """One plan's state: the loads and migration budget as moves are decided, the moves."""

    def __init__(
        self,
        *,
        settings: Balancing,
        now: dt.datetime,
        since: Mapping[str, dt.datetime],
        loads: _Loads,
        budget: MigrationBudget,
        boxes: Sequence[PlacedBox],
        busy: frozenset[Key],
        last_moved: Mapping[Key, dt.datetime],
    ) -> None:
        self.settings, self.now, self.since = settings, now, since
        self.loads, self.budget = loads, budget
        self.boxes, self.busy, self.last_moved = boxes, busy, last_moved
        self.high = settings.high_watermark / 100
        self.low = settings.low_watermark / 100
        self.moves: list[Move] = []

    def movable(self, source: str) -> list[PlacedBox]:
        """The boxes on `source` that may move: not migrating, not moved within cooldown."""
        never = dt.datetime.min.replace(tzinfo=dt.UTC)
        return [
            b
            for b in self.boxes
            if b.node == source
            and (b.namespace, b.name) not in self.busy
            and self.now - self.last_moved.get((b.namespace, b.name), never)
            >= self.settings.cooldown
        ]

    def relieve(self, source: str) -> str:
        """Move boxes off `source` until it is at or under the high watermark; returns why
        it may stay above (what held the last move back)."""
        movable = self.movable(source)
        while self.loads.load(source) > self.high and movable:
            held = self._held_back(source)
            picked = (
                None
                if held
                else _pick(
                    source=source,
                    movable=movable,
                    loads=self.loads,
                    high=self.high,
                    low=self.low,
                    budget=self.budget,
                )
            )
            if picked is None:
                return held or (
                    f"no Trusted member of a sufficient level stays at or under "
                    f"{self.settings.low_watermark} % with any of its {len(movable)} movable "
                    "boxes"
                )
            self._move(source, *picked)
            movable.remove(picked[0])
        if any(b.node == source for b in self.boxes):
            return (
                f"no box on {source} may move now (migrating, or moved less than "
                f"{_human(self.settings.cooldown)} ago)"
            )
        return f"no Lazy Box runs on {source} (gtvp moves only boxes)"

    def _held_back(self, source: str) -> str | None:
        """Why the migration limits allow no move off `source` now (None: they allow one)."""
        limits = self.budget.limits
        if not self.budget.cluster_allows():
            return f"the cluster runs {limits.max_parallel} migrations already"
        if not self.budget.sends(source):
            return f"{source} already sends {limits.max_outbound_per_node} migrations"
        return None

    def _move(self, source: str, box: PlacedBox, target: str, cached: int) -> None:
        before = self.loads.load(source)
        self.loads.add(source, box, -1)
        self.loads.add(target, box)
        self.budget.take(source, target)
        reason = (
            f"{source} at {before:.1%} (> {self.settings.high_watermark} % for "
            f"{_human(self.now - self.since[source])}); {target} at "
            f"{self.loads.load(target):.1%} with the box, "
            f"{human_bytes(cached)} of its components cached"
        )
        previous = self.last_moved.get((box.namespace, box.name))
        migration = _migration(box, target, self.since[source], reason, previous)
        self.moves.append(Move(box, target, reason, migration))


def _pick(
    *,
    source: str,
    movable: Sequence[PlacedBox],
    loads: _Loads,
    high: float,
    low: float,
    budget: MigrationBudget,
) -> tuple[PlacedBox, str, int] | None:
    """The box to move off `source` and where: smallest that suffices, else the largest."""
    host = loads.hosts[source]

    def size(b: PlacedBox) -> float:
        return load(b.cpu_millis, b.memory_bytes, host)

    def relieves(b: PlacedBox) -> bool:
        return loads.load(source, without=b) <= high

    enough = sorted((b for b in movable if relieves(b)), key=lambda b: (size(b), b.name))
    rest = sorted((b for b in movable if not relieves(b)), key=lambda b: (-size(b), b.name))
    for box in (*enough, *rest):
        best: tuple[int, float, str] | None = None
        for name, h in loads.hosts.items():
            if name == source or not h.usable or h.cordoned or h.level < box.level:
                continue  # a cordoned member: the scheduler would never start it there
            if not budget.receives(name):
                continue
            after, fits = loads.room_for(name, box)
            if after > low or not fits:
                continue
            score = (-box.cached_on(h.images), after, name)
            if best is None or score < best:
                best = score
        if best is not None:
            return box, best[2], -best[0]
    return None


def _migration(
    box: PlacedBox, target: str, since: dt.datetime, reason: str, previous: dt.datetime | None
) -> dict[str, Any]:
    return migration_object(
        name=migration_name(box, target, since, previous),
        namespace=box.namespace,
        vmi=box.name,
        label=(BALANCE_LABEL, box.node),
        reason=f"balancing: {reason}",
        selector={**trust_selector(box.level), HOSTNAME_LABEL: target},
    )


def _human(d: dt.timedelta) -> str:
    s = int(d.total_seconds())
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
