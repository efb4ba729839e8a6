"""Shards, fair shares and fencing: who may write for a member, decided without I/O."""

from __future__ import annotations

import collections
import random

import pytest

from gtvp.coordination import Coordination
from gtvp.core.shards import (
    SHARDS,
    LeaseTiming,
    Observed,
    fair_share,
    live,
    observe,
    plan_claims,
    shard_of,
)


def test_a_member_has_the_same_shard_on_every_replica_and_shards_are_evenly_filled() -> None:
    names = [f"host-{i}" for i in range(10_000)]
    assert [shard_of(n) for n in names] == [shard_of(n) for n in names]
    counts = collections.Counter(shard_of(n) for n in names)
    assert set(counts) == set(range(SHARDS))
    mean = len(names) / SHARDS
    assert max(counts.values()) < 1.4 * mean
    assert min(counts.values()) > 0.6 * mean


@pytest.mark.parametrize(
    ("duration", "deadline", "retry"), [(10, 10, 2), (10, 12, 2), (10, 5, 5), (10, 5, 0)]
)
def test_lease_timing_that_cannot_fence_is_refused(
    duration: float, deadline: float, retry: float
) -> None:
    with pytest.raises(ValueError, match="retry period < renew deadline < lease duration"):
        LeaseTiming(duration, deadline, retry)


def test_a_lease_expires_by_local_observation_not_by_its_writers_clock() -> None:
    first = observe(None, "a", "2020-01-01T00:00:00Z", now=100.0)  # a clock far behind
    assert live(first, 110.0, duration=15)
    same = observe(first, "a", "2020-01-01T00:00:00Z", now=116.0)
    assert same.since == 100.0
    assert not live(same, 116.0, duration=15)
    renewed = observe(same, "a", "2020-01-01T00:00:02Z", now=117.0)
    assert live(renewed, 117.0, duration=15)
    assert not live(Observed("", "x", 117.0), 117.0, duration=15)  # nobody holds it


def _settle(replicas: list[str], holders: dict[int, str | None], rounds: int = 6) -> None:
    """Run claim rounds (each replica in turn, writes always succeeding)."""
    for _ in range(rounds):
        for me in replicas:
            claims = plan_claims(me, replicas, holders, SHARDS)
            for s in claims.release:
                holders[s] = None
            for s in claims.take:
                assert holders.get(s) is None  # only free shards are taken
                holders[s] = me


def test_a_lone_replica_takes_every_shard() -> None:
    holders: dict[int, str | None] = {}
    _settle(["a"], holders, rounds=1)
    assert holders == dict.fromkeys(range(SHARDS), "a")


def test_a_new_replica_gets_its_fair_share_handed_over() -> None:
    holders: dict[int, str | None] = dict.fromkeys(range(SHARDS), "a")
    _settle(["a", "b", "c"], holders)
    counts = collections.Counter(holders.values())
    assert None not in counts
    assert max(counts.values()) <= fair_share(SHARDS, 3) == 22
    assert sum(counts.values()) == SHARDS


def test_a_dead_replicas_shards_are_taken_by_the_survivors() -> None:
    holders: dict[int, str | None] = {}
    _settle(["a", "b"], holders)
    dead = {s: (None if h == "b" else h) for s, h in holders.items()}  # b's presence expired
    _settle(["a"], dead, rounds=1)
    assert set(dead.values()) == {"a"}


def test_random_joins_and_leaves_always_settle_to_every_shard_held_within_fair_share() -> None:
    rng = random.Random(7)  # noqa: S311 - a repeatable schedule, not a secret
    pool = [f"r{i}" for i in range(6)]
    replicas = ["r0"]
    holders: dict[int, str | None] = {}
    for _ in range(40):
        if rng.random() < 0.5 and len(replicas) < len(pool):
            replicas.append(rng.choice([p for p in pool if p not in replicas]))
        elif len(replicas) > 1:
            gone = replicas.pop(rng.randrange(len(replicas)))
            holders = {s: (None if h == gone else h) for s, h in holders.items()}
        _settle(replicas, holders)
        counts = collections.Counter(holders.values())
        assert None not in counts
        assert sum(counts.values()) == SHARDS
        assert max(counts.values()) <= fair_share(SHARDS, len(replicas))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_replica_that_missed_its_renew_deadline_writes_nothing_and_starts_over() -> None:
    clock = Clock()
    co = Coordination("a", timing=LeaseTiming(15, 10, 2), clock=clock)
    member = "host-1"
    assert not co.holds(member)
    assert not co.ready()
    co.renewed(clock.now)
    co.held.add(shard_of(member))
    co.leading = True
    assert co.holds(member)
    assert co.leads()
    assert co.ready()
    clock.now += 9.9
    assert co.holds(member)
    clock.now += 0.2  # past the renew deadline: fenced (the others wait the full 15 s)
    assert not co.holds(member)
    assert not co.leads()
    assert not co.ready()
    assert co.renewed(clock.now) is True  # the lapse is noticed: everything claimed afresh
    assert not co.held
    assert not co.leading
    assert not co.holds(member)


def test_a_replica_whose_machine_was_paused_is_fenced_though_its_clock_stood_still() -> None:
    """A hypervisor pauses the replica's VM for a minute: its monotonic (and boot) clock
    does not see the time go by, the others took its shards and leadership meanwhile; once
    the guest's wall clock is set forward it must write nothing as holder or leader until
    it has renewed, and then claim afresh (found by a review)."""
    clock, wall = Clock(), Clock()
    co = Coordination("a", timing=LeaseTiming(15, 10, 2), clock=clock, wall=wall)
    co.renewed(clock.now)
    co.held.add(shard_of("host-1"))
    co.leading = True
    assert co.holds("host-1")
    wall.now += 60  # paused for a minute
    clock.now += 0.001
    assert not co.holds("host-1")
    assert not co.leads()
    assert co.renewed(clock.now) is True  # the lapse is noticed: claimed afresh
    assert not co.held


def test_a_stopping_replica_writes_nothing_and_a_sole_replica_holds_everything() -> None:
    clock = Clock()
    co = Coordination("a", clock=clock)
    co.renewed(clock.now)
    co.held.add(shard_of("x"))
    co.stopping = True
    assert not co.holds("x")
    assert not co.ready()
    sole = Coordination.sole()
    assert sole.holds("anything")
    assert sole.leads()
    assert sole.ready()
