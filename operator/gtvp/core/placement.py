"""Placement of a Lazy Box on a member of the trusted pool.

Candidates are members that are Trusted with a fresh verdict and uses left, at a level at
least the box's, with room for the box's CPU and memory requests next to what already runs
there (other boxes and other VMIs). Among them the score is, in order: most bytes of the
box's components already in the node's image cache (`Node.status.images`), then lowest
load after placing, then name, so the decision is deterministic for the same state. Pure;
the shell builds `Host`s from Members, Nodes, boxes and other VMIs (`core.footprint`).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gtvp.core.components import Component
from gtvp.core.quantity import human_bytes


@dataclass(frozen=True)
class Host:
    name: str
    usable: bool  # Trusted, fresh, uses left
    phase: str
    level: int
    cpu_millis: int  # allocatable
    memory_bytes: int
    cpu_used: int
    memory_used: int
    images: frozenset[str]
    cordoned: bool = False  # its Node's spec.unschedulable (kubectl cordon / drain)

    def load_after(self, cpu: int, memory: int) -> float:
        return max(
            (self.cpu_used + cpu) / max(self.cpu_millis, 1),
            (self.memory_used + memory) / max(self.memory_bytes, 1),
        )

    def fits(self, cpu: int, memory: int) -> bool:
        return (
            self.cpu_used + cpu <= self.cpu_millis
            and self.memory_used + memory <= self.memory_bytes
        )


@dataclass(frozen=True)
class Placement:
    node: str | None
    reason: str
    cached_bytes: int = 0
    total_bytes: int = 0


def cached_bytes(components: Sequence[Component], images: frozenset[str]) -> int:
    return sum(c.size for c in components if c.digest in images)


def place(
    components: Sequence[Component],
    level: int,
    cpu: int,
    memory: int,
    hosts: Sequence[Host],
) -> Placement:
    """Choose a member for a box, or say why none qualifies."""
    total = sum(c.size for c in components)
    untrusted: list[Host] = []
    low: list[Host] = []
    full: list[Host] = []
    fit: list[Host] = []
    cordoned: list[Host] = []
    for h in hosts:  # one pass: this runs for every box against every member
        if not h.usable:
            untrusted.append(h)
        elif h.level < level:
            low.append(h)
        elif h.cordoned:  # the scheduler would never start the VM there
            cordoned.append(h)
        elif h.cpu_used + cpu <= h.cpu_millis and h.memory_used + memory <= h.memory_bytes:
            fit.append(h)  # h.fits(cpu, memory), inlined
        else:
            full.append(h)
    if not fit:
        why = _why_none(
            level,
            cpu,
            memory,
            pool=hosts,
            untrusted=untrusted,
            low=low,
            cordoned=cordoned,
            full=full,
        )
        return Placement(None, "no member qualifies: " + "; ".join(why), 0, total)
    sizes = _sizes(components)
    digests = frozenset(sizes)

    def score(i: int) -> tuple[int, float, str, int]:
        h = fit[i]
        cached = sum(sizes[d] for d in digests & h.images)  # C-level intersection
        return (-cached, h.load_after(cpu, memory), h.name, i)

    # the two best (the chosen one and the runner-up), not a sort of the whole pool
    scored = heapq.nsmallest(2, map(score, range(len(fit))))
    best = fit[scored[0][3]]
    cached = -scored[0][0]
    share = f" ({100 * cached // total} %)" if total else ""
    runner = ""
    if len(scored) > 1:
        runner = f"; next best {fit[scored[1][3]].name} caches {human_bytes(-scored[1][0])}"
    reason = (
        f"{best.name}: Trusted at level {best.level} (box needs {level}), caches "
        f"{human_bytes(cached)} of {human_bytes(total)}{share}, load after placing "
        f"{best.load_after(cpu, memory):.0%}; {len(fit)} candidate(s){runner}"
    )
    return Placement(best.name, reason, cached, total)


def _sizes(components: Sequence[Component]) -> dict[str, int]:
    """Bytes per distinct digest (a digest counted once, as `cached_bytes` counts it per
    component: components sharing a digest are summed)."""
    out: dict[str, int] = {}
    for c in components:
        out[c.digest] = out.get(c.digest, 0) + c.size
    return out


def _free(h: Host) -> str:
    return (
        f"{h.cpu_millis - h.cpu_used}m CPU / "
        f"{human_bytes(max(h.memory_bytes - h.memory_used, 0))} free"
    )


def _why_none(
    level: int,
    cpu: int,
    memory: int,
    *,
    pool: Sequence[Host],
    untrusted: Sequence[Host],
    low: Sequence[Host],
    cordoned: Sequence[Host],
    full: Sequence[Host],
) -> list[str]:
    """What keeps each member that does not qualify from taking the box."""
    why = []
    if not pool:
        why.append("the pool has no members")
    if untrusted:
        why.append(f"{len(untrusted)} not Trusted ({_few(untrusted, _phase)})")
    if low:
        why.append(f"{len(low)} below level {level} ({_few(low, lambda h: f'level {h.level}')})")
    if cordoned:
        more = f", +{len(cordoned) - 3} more" if len(cordoned) > 3 else ""
        why.append(f"{len(cordoned)} cordoned ({', '.join(h.name for h in cordoned[:3])}{more})")
    if full:
        why.append(
            f"{len(full)} without room for {cpu}m CPU / {human_bytes(memory)} with "
            f"KubeVirt's overhead ({_few(full, _free)})"
        )
    return why


def _phase(h: Host) -> str:
    return h.phase or "no verdict"


def _few(hosts: Sequence[Host], what: Callable[[Host], str]) -> str:
    shown = [f"{h.name}: {what(h)}" for h in hosts[:3]]
    more = f", +{len(hosts) - 3} more" if len(hosts) > 3 else ""
    return ", ".join(shown) + more
