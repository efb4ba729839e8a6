"""Benchmark: resolve + compose + place one Lazy Box; and what cache-aware placement buys.

Run: `python -m tests.bench.bench_box_plan [--components 500 --members 1000 --boxes 300]`.

1. Latency of the pure pipeline (resolution with resolvelib over a 500-component
   catalogue, composition of the KubeVirt VM, placement over 1,000 members), median and
   p95 over many boxes; baseline in the same run: the same pipeline for the sample-shaped
   9-component catalogue and 3 members. Target: median < 50 ms.
2. Cached bytes at the chosen member: cache-aware placement against placement on a random
   qualifying member (seeded), same workload (the same boxes, members and caches), same
   run; printed as a ratio.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Sequence

from gtvp.core.components import Component, parse_component
from gtvp.core.compose import BoxRef, compose_vm
from gtvp.core.placement import Host, cached_bytes, place
from gtvp.core.resolve import BoxRequest, resolve
from tests.catalogue import Publisher, synthetic


def hosts_for(catalogue: Sequence[Component], n: int, rnd: random.Random) -> list[Host]:
    digests = [c.digest for c in catalogue]
    out = []
    for i in range(n):
        cache = frozenset(rnd.sample(digests, k=min(len(digests), rnd.randint(0, 40))))
        out.append(
            Host(
                name=f"m-{i:05d}",
                usable=rnd.random() > 0.05,
                phase="Trusted",
                level=rnd.choice((1, 2, 3, 3)),
                cpu_millis=16000,
                memory_bytes=64 * 2**30,
                cpu_used=rnd.randint(0, 15000),
                memory_used=rnd.randint(0, 60) * 2**30,
                images=cache,
            )
        )
    return out


def spec_for(app: str) -> dict[str, object]:
    return {
        "application": {"name": app},
        "level": 2,
        "resources": {"cpu": "1", "memory": "1Gi"},
    }


def pipeline(
    spec: dict[str, object], catalogue: Sequence[Component], hosts: Sequence[Host]
) -> str | None:
    cached = frozenset().union(*(h.images for h in hosts if h.usable))
    comps = resolve(BoxRequest.from_spec(spec), catalogue, cached)
    decision = place(comps, 2, 1000, 2**30, hosts)
    compose_vm(BoxRef("b", "ns", "uid"), spec, comps, decision.node)
    return decision.node


def timed(
    specs: Sequence[dict[str, object]], catalogue: Sequence[Component], hosts: Sequence[Host]
) -> list[float]:
    out = []
    for spec in specs:
        t0 = time.perf_counter()
        pipeline(spec, catalogue, hosts)
        out.append(time.perf_counter() - t0)
    return out


def run(components: int, members: int, boxes: int, seed: int = 11) -> dict[str, float]:
    rnd = random.Random(seed)  # noqa: S311 - reproducible workload, not secrets
    pub = Publisher()
    big = [parse_component(o) for o in synthetic(pub, components, seed)]
    small = [parse_component(o) for o in pub.web_catalogue()]
    apps = sorted({c.name for c in big if c.type == "application"})
    big_hosts = hosts_for(big, members, rnd)
    small_hosts = hosts_for(small, 3, rnd)
    specs = [spec_for(rnd.choice(apps)) for _ in range(boxes)]
    base_specs = [{**spec_for("nginx"), "dependencies": [{"name": "debian-minimal"}]}] * boxes
    timed(specs[:10], big, big_hosts)  # warm-up
    base = timed(base_specs, small, small_hosts)
    lat = timed(specs, big, big_hosts)
    med, p95 = statistics.median(lat), sorted(lat)[int(len(lat) * 0.95)]
    bmed = statistics.median(base)
    print(
        f"bench_box_plan: resolve+compose+place, {len(big)} components, {members} members, "
        f"{boxes} boxes"
    )
    print(f"  median {med * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms (target median < 50 ms)")
    print(
        f"  baseline (9 components, 3 members) median {bmed * 1000:.2f} ms; ratio {med / bmed:.1f}x"
    )
    # cache-aware vs random qualifying member, same boxes and members
    aware = rand = 0
    total = 0
    pick = random.Random(seed + 1)  # noqa: S311 - reproducible baseline choice
    cached = frozenset().union(*(h.images for h in big_hosts if h.usable))
    for spec in specs:
        comps = resolve(BoxRequest.from_spec(spec), big, cached)
        total += sum(c.size for c in comps)
        d = place(comps, 2, 1000, 2**30, big_hosts)
        aware += d.cached_bytes
        ok = [h for h in big_hosts if h.usable and h.level >= 2 and h.fits(1000, 2**30)]
        rand += cached_bytes(comps, pick.choice(ok).images)
    ratio = aware / rand if rand else float("inf")
    print(
        f"  cached bytes at the chosen member: cache-aware {aware / total:.0%} of box bytes, "
        f"random trusted member {rand / total:.0%}; ratio {ratio:.1f}x"
    )
    return {"median": med, "p95": p95, "baseline": bmed, "cache_ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--components", type=int, default=500)
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--boxes", type=int, default=300)
    args = p.parse_args(argv)
    run(args.components, args.members, args.boxes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
