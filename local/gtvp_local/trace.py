"""Load traces for the balancing benchmark, and the hindsight planner (pure).

A trace is a list of timed events on a pool of members (time-compressed: seconds stand for
minutes or hours): a VM created with CPU and memory requests on a chosen member, a VM
deleted, a member joining (Trusted `trust_after` seconds later), a member leaving (drained:
its VMs are evacuated, by KubeVirt or gtvp, whoever balances). `synthetic()` is a small
hand-written one; `day()` is shaped like a day of a VM fleet: a diurnal ramp of VMs created
then deleted, one hot member receiving more than its share, a member joining at midday and
one leaving in the afternoon.

`hindsight(trace)` is the baseline: knowing the whole trace, the fewest balancing
migrations that bring every member back at or under the high watermark after each event
whose overload would outlast the sustain window (an overload that a later deletion ends
within the window needs no move). Per overloaded member it removes the fewest VMs that
suffice (the largest first, which minimises their count), each onto the least loaded member
that stays at or under the high watermark with it; evacuations of a leaving member are
forced and not counted. Member by member this count is minimal; across members it is the
greedy bound (bin packing in general is NP-hard), which is enough for ratios.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

GI = 1024**3


@dataclass(frozen=True)
class Event:
    at: float  # seconds from the trace's start
    kind: str  # create | delete | join | leave
    vm: str = ""
    member: str = ""
    cpu_millis: int = 0
    memory_bytes: int = 0

    @property
    def disturbs(self) -> bool:
        """Whether balancing may be needed after it (deletions only relieve)."""
        return self.kind in ("create", "join", "leave")


@dataclass(frozen=True)
class Trace:
    name: str
    members: tuple[str, ...]  # present (and Trusted) at the start
    cpu_millis: int  # every member's allocatable
    memory_bytes: int
    events: tuple[Event, ...]
    duration: float  # seconds: the replay runs this long after the first event
    trust_after: float = 5.0  # a joining member is Trusted this long after it joins
    extra: Mapping[str, str] = field(default_factory=dict)


def _vm(at: float, vm: str, member: str, cpu: int, mem_gi: int) -> Event:
    return Event(at, "create", vm, member, cpu * 1000, mem_gi * GI)


def synthetic() -> Trace:
    """Four 8-CPU / 32 GiB members; one turns hot, a fifth joins, one leaves."""
    ev: list[Event] = []
    n = 0

    def vms(at: float, member: str, count: int, cpu: int = 1, mem: int = 2) -> None:
        nonlocal n
        for _ in range(count):
            ev.append(_vm(at, f"s{n:02d}", member, cpu, mem))
            n += 1

    vms(0, "m1", 5)
    vms(0, "m2", 3)
    vms(0, "m3", 2)
    vms(0, "m4", 2)
    vms(10, "m1", 3)  # m1 at 8/8 CPUs: hot
    ev.append(Event(35, "join", member="m5"))
    vms(55, "m2", 2, cpu=2, mem=4)  # m2 at 7/8
    ev.append(Event(60, "delete", vm="s00"))
    ev.append(Event(80, "leave", member="m3"))
    return Trace("synthetic", ("m1", "m2", "m3", "m4"), 8000, 32 * GI, tuple(ev), 115.0)


def day(seed: int = 7) -> Trace:
    """A day in about three minutes: 6 members of 8 CPUs / 32 GiB; VMs arrive through the
    morning (m1, the hot member, gets a third of them), half leave in the evening; m7
    joins at noon, m4 leaves in the afternoon."""
    rnd = random.Random(seed)  # noqa: S311 - a reproducible workload
    members = ("m1", "m2", "m3", "m4", "m5", "m6")
    ev: list[Event] = []
    placed: list[tuple[str, str]] = []
    per = dict.fromkeys(members, 0)
    for i in range(28):  # morning ramp, 0-81 s
        at = round(3.0 * i, 1)
        hot = rnd.random() < 0.33
        member = "m1" if hot else min((m for m in members if m != "m1"), key=lambda m: per[m])
        cpu = rnd.choice((1, 1, 1, 2))
        if per[member] + cpu > 8:  # creation never overcommits a member
            member = min(members, key=lambda m: per[m])
        per[member] += cpu
        name = f"d{i:02d}"
        ev.append(_vm(at, name, member, cpu, cpu * 3))
        placed.append((name, member))
    ev.append(Event(90, "join", member="m7"))  # noon
    ev.append(Event(120, "leave", member="m4"))  # afternoon
    evening = rnd.sample([v for v, m in placed if m != "m4"], k=len(placed) // 2)
    for j, vm in enumerate(sorted(evening)):  # evening, 140-170 s
        ev.append(Event(140 + j, "delete", vm=vm))
    ev.sort(key=lambda e: (e.at, e.kind, e.vm))
    return Trace("day", members, 8000, 32 * GI, tuple(ev), 185.0)


def load(vms: Sequence[tuple[int, int]], cpu: int, memory: int) -> float:
    """A member's load: the larger of its CPU and memory commitment, as a fraction."""
    return max(sum(c for c, _ in vms) / cpu, sum(m for _, m in vms) / memory)


@dataclass(frozen=True)
class Hindsight:
    migrations: int
    evacuations: int
    bytes_moved: int


def hindsight(trace: Trace, *, high: float = 0.85, sustain_for: float = 4.0) -> Hindsight:
    """The hindsight baseline (module docstring)."""
    where: dict[str, str] = {}
    size: dict[str, tuple[int, int]] = {}
    members = list(trace.members)
    moves = evacuations = moved_bytes = 0

    def on(member: str) -> list[tuple[int, int]]:
        return [size[v] for v, m in where.items() if m == member]

    def member_load(member: str, extra: tuple[int, int] | None = None) -> float:
        vms = on(member) + ([extra] if extra else [])
        return load(vms, trace.cpu_millis, trace.memory_bytes)

    def target_for(vm: str, exclude: str) -> str | None:
        fits = [m for m in members if m != exclude and member_load(m, size[vm]) <= high]
        return min(fits, key=lambda m: (member_load(m), m)) if fits else None

    def largest_first(member: str) -> list[str]:
        def share(v: str) -> float:
            return max(size[v][0] / trace.cpu_millis, size[v][1] / trace.memory_bytes)

        return sorted((v for v, m in where.items() if m == member), key=lambda v: (-share(v), v))

    def relieve(member: str) -> tuple[int, int]:
        """Fewest moves (largest first) off `member`: (count, bytes)."""
        n = b = 0
        for vm in largest_first(member):
            if member_load(member) <= high:
                break
            target = target_for(vm, member)
            if target is not None:
                where[vm] = target
                n, b = n + 1, b + size[vm][1]
        return n, b

    events = list(trace.events)
    for i, e in enumerate(events):
        if e.kind == "create":
            where[e.vm], size[e.vm] = e.member, (e.cpu_millis, e.memory_bytes)
        elif e.kind == "delete":
            where.pop(e.vm, None)
        elif e.kind == "join":
            members.append(e.member)
        elif e.kind == "leave":
            members.remove(e.member)
            for vm in sorted(v for v, m in where.items() if m == e.member):
                target = target_for(vm, e.member)
                if target is not None:
                    where[vm] = target
                    evacuations += 1
        if i + 1 < len(events) and events[i + 1].at == e.at:
            continue  # a batch: judge after its last event
        for member in sorted(members):
            if member_load(member) > high and not _relieved_soon(
                events, i, where, member, sustain_for
            ):
                n, b = relieve(member)
                moves, moved_bytes = moves + n, moved_bytes + b
    return Hindsight(moves, evacuations, moved_bytes)


def _relieved_soon(
    events: Sequence[Event], i: int, where: Mapping[str, str], member: str, within: float
) -> bool:
    """Whether one of `member`'s VMs is deleted within `within` seconds after event `i`
    (the overload may end before the sustain window does, without a move)."""
    at = events[i].at
    return any(
        e.kind == "delete" and where.get(e.vm) == member and e.at - at < within
        for e in events[i + 1 :]
    )
