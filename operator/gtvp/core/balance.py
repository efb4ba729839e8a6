"""Balancing: live-migrate Lazy Boxes off members that stay overloaded.

A member's load is the larger of its CPU and memory commitment (requests of the boxes and of
every other VMI on it, over `Node.status.allocatable`): the figure placement uses, computed
from objects the API server holds, never from what a node says about itself. A member above
the policy's high watermark for `sustainFor` is a source; boxes move from it, one at a time
and smallest first among those whose move alone brings it back under the high watermark
(else the largest), onto a Trusted member of a sufficient level that stays at or under the
low watermark with the box, preferring the one that caches most of the box's components,
then the least loaded, then by name. The gap between the watermarks, the sustain window
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


def migration_name(box: PlacedBox, target: str, since: dt.datetime) -> str:
    digest = hashlib.sha256(
        f"{box.namespace}/{box.name}@{box.node}>{target}#{since.isoformat()}".encode()
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
    high, low = settings.high_watermark / 100, settings.low_watermark / 100
    used = {h.name: [h.cpu_used, h.memory_used] for h in hosts}
    by_name = {h.name: h for h in hosts}

    def now_load(name: str) -> float:
        return load(used[name][0], used[name][1], by_name[name])

    since = {
        h.name: over_since.get(h.name, now)
        for h in hosts
        # members that are not Trusted are emptied by evacuation, not balanced (a Trusted
        # member waiting for a fresh quote after spending its uses keeps its clock)
        if h.phase == "Trusted" and h.cpu_millis > 0 and now_load(h.name) > high
    }
    if not settings.enabled:
        return BalancePlan((), since, {})

    active = [m for m in migrations if m.active]
    busy = {(m.namespace, m.vmi) for m in active}
    by_key = {(b.namespace, b.name): b for b in boxes}
    budget = limits.max_parallel - len(active)
    outbound: dict[str, int] = {}
    inbound: dict[str, int] = {}
    for m in active:
        moving = by_key.get((m.namespace, m.vmi))
        src = m.source or (moving.node if moving else None)
        if src:
            outbound[src] = outbound.get(src, 0) + 1
        if m.inbound_to:
            inbound[m.inbound_to] = inbound.get(m.inbound_to, 0) + 1
            if moving is not None and m.inbound_to in used and m.inbound_to != moving.node:
                # a box on its way counts at its target too (and at its source until it left)
                used[m.inbound_to][0] += moving.cpu_millis
                used[m.inbound_to][1] += moving.memory_bytes

    sources = sorted(
        (n for n, t in since.items() if now - t >= settings.sustain_for),
        key=lambda n: (-now_load(n), n),
    )
    moves: list[Move] = []
    stuck: dict[str, str] = {}
    for source in sources:
        host = by_name[source]
        movable = [
            b
            for b in boxes
            if b.node == source
            and (b.namespace, b.name) not in busy
            and now - last_moved.get((b.namespace, b.name), dt.datetime.min.replace(tzinfo=dt.UTC))
            >= settings.cooldown
        ]
        why = (
            f"no box on {source} may move now (migrating, or moved less than "
            f"{_human(settings.cooldown)} ago)"
            if any(b.node == source for b in boxes)
            else f"no Lazy Box runs on {source} (gtvp moves only boxes)"
        )
        while now_load(source) > high and movable:
            if budget <= 0:
                why = f"the cluster runs {limits.max_parallel} migrations already"
                break
            if outbound.get(source, 0) >= limits.max_outbound_per_node:
                why = f"{source} already sends {limits.max_outbound_per_node} migrations"
                break
            picked = _pick(
                source=source,
                movable=movable,
                used=used,
                host=host,
                high=high,
                low=low,
                hosts=by_name,
                inbound=inbound,
                limits=limits,
            )
            if picked is None:
                why = (
                    f"no Trusted member of a sufficient level stays at or under "
                    f"{settings.low_watermark} % with any of its {len(movable)} movable boxes"
                )
                break
            box, target, cached = picked
            before = now_load(source)
            used[source][0] -= box.cpu_millis
            used[source][1] -= box.memory_bytes
            used[target][0] += box.cpu_millis
            used[target][1] += box.memory_bytes
            movable.remove(box)
            budget -= 1
            outbound[source] = outbound.get(source, 0) + 1
            inbound[target] = inbound.get(target, 0) + 1
            reason = (
                f"{source} at {before:.1%} (> {settings.high_watermark} % for "
                f"{_human(now - since[source])}); {target} at {now_load(target):.1%} with the box, "
                f"{human_bytes(cached)} of its components cached"
            )
            moves.append(Move(box, target, reason, _migration(box, target, since[source], reason)))
        if now_load(source) > high and not any(m.box.node == source for m in moves):
            stuck[source] = why
    return BalancePlan(tuple(moves), since, stuck)


def _pick(
    *,
    source: str,
    movable: Sequence[PlacedBox],
    used: Mapping[str, list[int]],
    host: Host,
    high: float,
    low: float,
    hosts: Mapping[str, Host],
    inbound: Mapping[str, int],
    limits: MigrationLimits,
) -> tuple[PlacedBox, str, int] | None:
    """The box to move off `source` and where: smallest that suffices, else the largest."""

    def size(b: PlacedBox) -> float:
        return load(b.cpu_millis, b.memory_bytes, host)

    def relieves(b: PlacedBox) -> bool:
        cpu, mem = used[source]
        return load(cpu - b.cpu_millis, mem - b.memory_bytes, host) <= high

    enough = sorted((b for b in movable if relieves(b)), key=lambda b: (size(b), b.name))
    rest = sorted((b for b in movable if not relieves(b)), key=lambda b: (-size(b), b.name))
    for box in (*enough, *rest):
        best: tuple[int, float, str] | None = None
        for name, h in hosts.items():
            if name == source or not h.usable or h.level < box.level:
                continue
            if inbound.get(name, 0) >= limits.max_inbound_per_node:
                continue
            cpu, mem = used[name][0] + box.cpu_millis, used[name][1] + box.memory_bytes
            after = load(cpu, mem, h)
            if after > low or cpu > h.cpu_millis or mem > h.memory_bytes:
                continue
            score = (-box.cached_on(h.images), after, name)
            if best is None or score < best:
                best = score
        if best is not None:
            return box, best[2], -best[0]
    return None


def _migration(box: PlacedBox, target: str, since: dt.datetime, reason: str) -> dict[str, Any]:
    return migration_object(
        name=migration_name(box, target, since),
        namespace=box.namespace,
        vmi=box.name,
        label=(BALANCE_LABEL, box.node),
        reason=f"balancing: {reason}",
        selector={**trust_selector(box.level), HOSTNAME_LABEL: target},
    )


def _human(d: dt.timedelta) -> str:
    s = int(d.total_seconds())
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
