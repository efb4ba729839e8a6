"""Benchmark: gtvp's balancing planner on many day-shaped traces, in a model of the replay.

Run: `python -m tests.bench.bench_balance_model [--seeds 1-59]`.

`bench_balance_trace` replays four traces on the real API server (a few minutes each), so
its ≤ 1.2x-hindsight verdict rests on four draws. This one asks how typical they are: the
same traces (`gtvp_local.trace`: `synthetic` and `day` drawn with each seed) replayed in a
MODEL of that replay — no API server, no stand-in, no descheduler: a discrete-time loop
(0.1 s steps) that places each created VM on its trace member when it fits (else on the
least allocated member, as the stand-in's scheduling does), evacuates a leaving member the
same way, makes a joining member usable 5 s after it joins, and lands each migration 1 s
after it starts. Every 2 s it calls gtvp's own planner (`gtvp.core.balance.plan_balance`,
the function the operator and `bench_balance_trace` call) with the hosts, boxes, running
migrations and last moves as `bench_balance_trace.gtvp_round` builds them (sustainFor 4 s,
cool-down 60 s, watermarks 85/60 %). Baseline, same run: `gtvp_local.trace.hindsight`.

What the model leaves out (the replay's API latencies, the stand-in's tick) can change a
trace's count by one move: it matches the replay's counts on `synthetic`, `day` and
`day-1` and gives `day-3` 5 where replays gave 4 or 5.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from gtvp.core.balance import PlacedBox, plan_balance
from gtvp.core.evacuation import Migration
from gtvp.core.phases import MemberPhase
from gtvp.core.placement import Host
from gtvp.core.policy import Balancing, MigrationLimits
from gtvp_local.trace import GI, Trace, day, hindsight, load, synthetic

HIGH, LOW = 85, 60
SETTINGS = Balancing(True, HIGH, LOW, dt.timedelta(seconds=4), dt.timedelta(seconds=60))
ROUND = 2.0
STEP = 0.1
MIGRATION = 1.0
TRUST_AFTER = 5.0
NS = "model"
START = dt.datetime(2026, 12, 3, tzinfo=dt.UTC)


@dataclass
class Outcome:
    migrations: int = 0
    bytes_moved: int = 0


@dataclass
class _Flight:
    vm: str
    source: str
    target: str
    lands: float


class _Model:
    def __init__(self, t: Trace) -> None:
        self.t = t
        self.where: dict[str, str] = {}
        self.size: dict[str, tuple[int, int]] = {}
        self.present = list(t.members)
        self.usable = set(t.members)
        self.trusted_at: dict[str, float] = {}
        self.flights: list[_Flight] = []
        self.last_moved: dict[tuple[str, str], dt.datetime] = {}
        self.over_since: dict[str, dt.datetime] = {}
        self.out = Outcome()

    def used(self, member: str) -> tuple[int, int]:
        vms = [self.size[v] for v, m in self.where.items() if m == member]
        vms += [self.size[f.vm] for f in self.flights if f.target == member]
        return sum(c for c, _ in vms), sum(m for _, m in vms)

    def _load_with(self, member: str, vm: str) -> float:
        cpu, mem = self.used(member)
        return load([(cpu, mem), self.size[vm]], self.t.cpu_millis, self.t.memory_bytes)

    def _least_allocated(self, vm: str, exclude: str = "") -> str | None:
        fits = [
            m
            for m in self.present
            if m in self.usable and m != exclude and self._load_with(m, vm) <= 1.0
        ]
        return min(fits, key=lambda m: (self._load_with(m, vm), m), default=None)

    def apply(self, now: float, at_most: float) -> None:
        for e in (e for e in self.t.events if now <= e.at < at_most):
            if e.kind == "create":
                self.size[e.vm] = (e.cpu_millis, e.memory_bytes)
                fits = e.member in self.usable and self._load_with(e.member, e.vm) <= 1.0
                node = e.member if fits else self._least_allocated(e.vm)
                if node is not None:
                    self.where[e.vm] = node
            elif e.kind == "delete":
                self.where.pop(e.vm, None)
            elif e.kind == "join":
                self.present.append(e.member)
                self.trusted_at[e.member] = e.at + TRUST_AFTER
            elif e.kind == "leave":
                self.usable.discard(e.member)
                self.present.remove(e.member)
                for vm in sorted(v for v, m in self.where.items() if m == e.member):
                    node = self._least_allocated(vm, exclude=e.member)
                    if node is not None:
                        self.where[vm] = node

    def tick(self, now: float) -> None:
        for member, at in list(self.trusted_at.items()):
            if now >= at:
                self.usable.add(member)
                del self.trusted_at[member]
        for f in [f for f in self.flights if now >= f.lands]:
            self.flights.remove(f)
            if f.vm in self.where:
                self.where[f.vm] = f.target

    def balance(self, now: float) -> None:
        clock = START + dt.timedelta(seconds=now)
        hosts, boxes = [], []
        for member in self.present:
            cpu, mem = (0, 0)
            for vm, m in self.where.items():
                if m == member:
                    cpu, mem = cpu + self.size[vm][0], mem + self.size[vm][1]
                    boxes.append(PlacedBox(NS, vm, member, 1, *self.size[vm]))
            trusted = member in self.usable
            hosts.append(
                Host(
                    name=member,
                    usable=trusted,
                    phase=MemberPhase.TRUSTED if trusted else MemberPhase.PENDING,
                    level=1 if trusted else 0,
                    cpu_millis=self.t.cpu_millis,
                    memory_bytes=self.t.memory_bytes,
                    cpu_used=cpu,
                    memory_used=mem,
                    images=frozenset(),
                )
            )
        flying = [
            Migration(NS, f"m-{f.vm}", f.vm, f.source, f.target, "Running") for f in self.flights
        ]
        plan = plan_balance(
            hosts=hosts,
            boxes=boxes,
            migrations=flying,
            last_moved=self.last_moved,
            over_since=self.over_since,
            settings=SETTINGS,
            limits=MigrationLimits(),
            now=clock,
        )
        self.over_since = dict(plan.over_since)
        for move in plan.moves:
            vm = move.box.name
            self.flights.append(_Flight(vm, move.box.node, move.target, now + MIGRATION))
            self.last_moved[(NS, vm)] = clock
            self.out.migrations += 1
            self.out.bytes_moved += self.size[vm][1]


def replay(t: Trace) -> Outcome:
    """gtvp's planner on trace `t`, in the model."""
    model = _Model(t)
    steps = int(t.duration / STEP)
    next_round = 0.0
    for i in range(steps + 1):
        now = round(i * STEP, 6)
        model.apply(now, now + STEP)
        model.tick(now)
        if now >= next_round:
            model.balance(now)
            next_round += ROUND
    return model.out


def _seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = text.split("-", 1)
        return list(range(int(first), int(last) + 1))
    return [int(s) for s in text.split(",")]


def run(seeds: Sequence[int]) -> dict[str, float]:
    traces = [synthetic(), *(day(s) for s in seeds)]
    total = [0, 0, 0, 0]  # gtvp moves, bytes; hindsight moves, bytes
    within = 0
    print(f"{'trace':10s} {'gtvp':>5s} {'hindsight':>9s} {'ratio':>6s}  GiB gtvp/hindsight")
    for t in traces:
        got, best = replay(t), hindsight(t, high=HIGH / 100, sustain_for=4.0)
        ratio = got.migrations / best.migrations if best.migrations else float(got.migrations)
        within += ratio <= 1.2
        print(f"{t.name:10s} {got.migrations:5d} {best.migrations:9d} {ratio:5.2f}x  "
              f"{got.bytes_moved // GI}/{best.bytes_moved // GI}")  # fmt: skip
        total = [
            total[0] + got.migrations,
            total[1] + got.bytes_moved,
            total[2] + best.migrations,
            total[3] + best.bytes_moved,
        ]
    overall = total[0] / max(total[2], 1)
    print(
        f"all {len(traces)} traces (MODEL of the replay): gtvp {total[0]} migrations / "
        f"{total[1] // GI} GiB, hindsight {total[2]} / {total[3] // GI} GiB: "
        f"ratio {overall:.2f}x migrations, {total[1] / max(total[3], 1):.2f}x bytes; "
        f"≤ 1.2x hindsight on {within} of {len(traces)}"
    )
    return {"ratio": overall, "within": within, "traces": len(traces)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", default="1-59", help="day seeds: 1-59 or 7,1,3")
    run(_seeds(p.parse_args(argv).seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
