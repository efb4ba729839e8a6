"""Benchmark: failover. Time from `kill -9` of a shard holder until each of its members has a
verdict written by another replica (1,000 members, two replicas).

Run: `python -m tests.bench.bench_failover --members 1000 [--interval 30]`. The members are
the load generator's of `bench_scale` (gtvp-agent's own decision code over software-held
keys, `tests/softtpm.py`); the two `gtvp-operator` replicas, the API server and etcd are
real. Lease timing is the operator's default (duration 15 s, renew deadline 10 s, retry
2 s) unless `--lease-duration`/`--renew-deadline`/`--retry-period` say otherwise.

Measured, once every member is Trusted and both replicas hold their fair share:
- baseline: from a moment t0 (nothing broken) until every member has a verdict newer than
  t0: one attestation interval and the judging, the floor any failover is measured against;
- failover: from the `kill -9` of the replica holding more members until every one of its
  members has a verdict newer than the kill (written by the survivor: the killed one is
  gone), and until the survivor holds every shard; members that went Untrusted meanwhile.
Printed as a ratio to the baseline and against the target (< lease duration + one interval).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from gtvp.core.shards import shard_of
from gtvp_local.pool import Pool
from gtvp_local.replicas import LeaseTimings
from tests.bench.bench_scale import _api, _load, answer, create_members, load_generator_pool

POLL = 0.2


class Verdicts:
    """Per member, from the load generator's watch: the latest verdict time and phase."""

    def __init__(self) -> None:
        self.verified: dict[str, float] = {}
        self.untrusted: set[str] = set()
        self.lock = threading.Lock()

    def record(self, member: Mapping[str, Any]) -> None:
        status = member.get("status") or {}
        at = (status.get("trust") or {}).get("verifiedAt")
        name = str(member["metadata"]["name"])
        with self.lock:
            if at:
                self.verified[name] = dt.datetime.fromisoformat(str(at)).timestamp()
            if status.get("phase") == "Untrusted":
                self.untrusted.add(name)

    def newer_than(self, names: list[str], t: float) -> int:
        with self.lock:
            return sum(1 for n in names if self.verified.get(n, 0.0) > t)


def _until(what: str, done: Callable[[], bool], timeout: float) -> float:
    """Seconds until `done()` (TimeoutError after `timeout`)."""
    start = time.time()
    while not done():
        if time.time() - start > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(POLL)
    return time.time() - start


def _settled(pool: Pool, members: int, trusted: Callable[[], int]) -> bool:
    holders = pool.shard_holders()
    share = pool.timings.shards // len(pool.replicas)
    per = [sum(1 for h in holders.values() if h == r.identity) for r in pool.replicas]
    return trusted() >= members and min(per) >= share - 1


def _measure(pool: Pool, verdicts: Verdicts, names: list[str], interval: int) -> dict[str, Any]:
    t0 = time.time()
    baseline = _until(
        "every member's next verdict",
        lambda: verdicts.newer_than(names, t0) == len(names),
        3 * interval,
    )
    holders = pool.shard_holders()
    counts = {
        r.index: sum(1 for n in names if holders[shard_of(n)] == r.identity) for r in pool.replicas
    }
    victim = pool.replicas[max(counts, key=lambda i: counts[i])]
    survivor = next(r for r in pool.replicas if r is not victim)
    orphans = [n for n in names if holders[shard_of(n)] == victim.identity]
    shards = {s for s, h in holders.items() if h == victim.identity}
    before = set(verdicts.untrusted)
    pool.kill_replica(victim.index)
    killed = time.time()
    timeout = 3 * (pool.timings.duration + interval)
    takeover = _until(
        "the survivor holding every shard",
        lambda: shards <= {s for s, h in pool.shard_holders().items() if h == survivor.identity},
        timeout,
    )
    _until(
        "a new verdict for every orphaned member",
        lambda: verdicts.newer_than(orphans, killed) == len(orphans),
        timeout,
    )
    failover = time.time() - killed
    return {
        "baseline": baseline,
        "takeover": takeover,
        "failover": failover,
        "orphans": len(orphans),
        "untrusted": sorted(verdicts.untrusted - before),
    }


def run(
    members: int, interval: int = 30, timings: LeaseTimings | None = None, real: int = 2
) -> dict[str, Any]:
    timings = timings or LeaseTimings(duration=15, renew_deadline=10, retry_period=2)
    load_before = _load()
    print(f"bench_failover: load average before (1/5/15 min): {load_before}", flush=True)
    with load_generator_pool(
        real, kubevirt=False, interval=f"{interval}s", valid_for=f"{interval * 3}s", max_uses=100
    ) as (pool, lg):
        pool.replica_count, pool.timings = 2, timings
        api = _api(pool)
        create_members(api, lg, members)
        names = sorted(lg.agents)
        verdicts = Verdicts()
        observe = lg.observe

        def observing(member: Mapping[str, Any]) -> None:
            verdicts.record(member)
            observe(member)

        lg.observe = observing  # type: ignore[method-assign]
        pool.start_operator()
        stop = threading.Event()
        watcher = threading.Thread(target=answer, args=(lg, api, stop), daemon=True)
        with lg.running():
            watcher.start()
            try:
                ramp = _until(
                    f"{members} members Trusted, shards shared by 2 replicas",
                    lambda: _settled(pool, members, lg.trusted),
                    max(600.0, members * 0.3),
                )
                print(f"  all {members} Trusted after {ramp:.0f}s (enrolment included)", flush=True)
                got = _measure(pool, verdicts, names, interval)
            finally:
                stop.set()
                watcher.join(timeout=10)
    got.update(members=members, interval=interval, timings=timings, loads=(load_before, _load()))
    _report(got)
    return got


def _report(got: Mapping[str, Any]) -> None:
    t: LeaseTimings = got["timings"]
    target = t.duration + got["interval"]
    print(
        f"bench_failover: {got['members']} members, interval {got['interval']} s, 2 replicas, "
        f"lease duration {t.duration:g} s / renew deadline {t.renew_deadline:g} s / retry "
        f"{t.retry_period:g} s\n"
        f"  baseline (every member's next verdict, nothing broken): {got['baseline']:.1f} s\n"
        f"  kill -9 of the replica writing for {got['orphans']} members: the survivor held "
        f"its shards after {got['takeover']:.1f} s (bound duration + 2 x retry = "
        f"{t.failover_bound():g} s)\n"
        f"  every orphaned member re-verified by the survivor after {got['failover']:.1f} s: "
        f"ratio failover/baseline {got['failover'] / got['baseline']:.2f}x "
        f"(target < lease duration + one interval = {target:g} s: "
        f"{'met' if got['failover'] < target else 'MISSED'})\n"
        f"  members that went Untrusted meanwhile: {len(got['untrusted'])} "
        f"{got['untrusted'][:5]}\n"
        f"  load average before/after (1/5/15 min): {got['loads'][0]} / {got['loads'][1]}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_failover", description=__doc__)
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--interval", type=int, default=30)
    p.add_argument("--lease-duration", type=float, default=15.0)
    p.add_argument("--renew-deadline", type=float, default=10.0)
    p.add_argument("--retry-period", type=float, default=2.0)
    a = p.parse_args(argv)
    timings = LeaseTimings(
        duration=a.lease_duration, renew_deadline=a.renew_deadline, retry_period=a.retry_period
    )
    run(a.members, a.interval, timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
