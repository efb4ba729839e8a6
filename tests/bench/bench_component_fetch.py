"""Benchmark: fetching a Lazy Box's components onto a cold member from 1 source, from 3
Trusted peers at once (chunks checked against the signed lists), and from the registry
mirror only (the whole files, one `wget` each: the path without chunk lists).

Run: `python -m tests.bench.bench_component_fetch [--runs 3] [--uplink-mbit 200]`.

Real: the box's components built here (kernel, busybox-base, glibc, hello-web: what the sample
catalogue pins) with their chunk lists, one network namespace and veth per member on the
local pool's bridge, HTTP between the namespaces (`cache.PeerServer`, `cache.fetch_chunked`,
`cache.fetch_missing`), the bytes counted on the fetching member's veth. Not here: the
control plane and VMs (the fetch is what is measured; tests/e2e/test_multisource.py runs the
same code under the stand-in with real VMs).

`--uplink-mbit N` gives every peer and the mirror an uplink of N Mbit/s (tc tbf on the
member's veth inside its namespace, on the bridge for the mirror), as nodes of a cluster
have; 0 leaves the veths unlimited (then one machine's CPU, not the links, is the limit).
Prints the median seconds and bytes per source, the ratios against the mirror path, and
the load average (what else was running).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gtvp.local_state import cache_dir
from gtvp_local.guest.build import build_catalogue, component_spec
from gtvp_local.vmruntime import cache, names, network

PEERS = ("peer-1", "peer-2", "peer-3")


def _tc(args: list[str]) -> None:
    subprocess.run(["tc", *args], check=True, capture_output=True)


def _limit(netns: str | None, dev: str, mbit: int) -> None:
    prefix = ["-n", netns] if netns else []
    _tc([*prefix, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
         "burst", "256kb", "latency", "100ms"])  # fmt: skip


def _unlimit(netns: str | None, dev: str) -> None:
    prefix = ["-n", netns] if netns else []
    subprocess.run(
        ["tc", *prefix, "qdisc", "del", "dev", dev, "root"], check=False, capture_output=True
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--uplink-mbit", type=int, default=200)
    args = p.parse_args(argv)
    arts = [a for a in build_catalogue(cache_dir()).values() if a.name != "hello-web"]
    arts += [a for a in build_catalogue(cache_dir()).values() if a.key == "hello-web@1.0.0"]
    plans = {}
    for a in arts:
        chunks = component_spec(a)["chunks"]
        plans[a.image] = cache.ChunkPlan(
            chunks["sizeBytes"], tuple(chunks["digests"]), a.size, a.digest
        )
    total = sum(a.size for a in arts)
    state = Path(tempfile.mkdtemp(prefix="gtvp-bench-fetch-"))
    servers: dict[str, cache.PeerServer] = {}
    limited: list[tuple[str | None, str]] = []
    rows: dict[str, list[tuple[float, dict[str, int], int]]] = {}
    try:
        for peer in PEERS:
            d = cache.ensure(state, peer)
            for a in arts:
                shutil.copyfile(a.path, d / cache.digest_hex(a.image))
                (d / f"{cache.digest_hex(a.image)}.json").write_text(
                    f'{{"image": "{a.image}", "sizeBytes": {a.size}}}'
                )
            servers[peer] = cache.PeerServer(state, peer, lambda: True)
        by_image = {a.image: a.path for a in arts}
        with cache.Mirror(lambda image: by_image[image]) as mirror:
            if args.uplink_mbit:
                for s in servers.values():
                    limited.append((s.net.netns, s.net.member_veth))
                limited.append((None, names.BRIDGE))
                for netns, dev in limited:
                    _limit(netns, dev, args.uplink_mbit)
            for run in range(args.runs):
                for label, peers in (("1 peer", PEERS[:1]), ("3 peers", PEERS), ("mirror", ())):
                    member = f"cold-{run}-{label.replace(' ', '')}"
                    where = {pr: (servers[pr].net.address, servers[pr].port) for pr in peers}
                    net = network.ensure_member(state, member)
                    _, tx0 = net.link_bytes()
                    t0 = time.monotonic()
                    by_source: dict[str, int] = {}
                    if peers:
                        for a in arts:
                            r = cache.fetch_chunked(
                                state, member, a.image, plans[a.image], where, mirror=mirror
                            )
                            for src, n in r.bytes_by_source.items():
                                by_source[src] = by_source.get(src, 0) + n
                    else:
                        for rep in cache.fetch_missing(
                            state, member, [a.image for a in arts], mirror
                        ):
                            by_source["mirror"] = by_source.get("mirror", 0) + rep.size_bytes
                    seconds = time.monotonic() - t0
                    _, tx1 = net.link_bytes()
                    rows.setdefault(label, []).append((seconds, by_source, tx1 - tx0))
    finally:
        for netns, dev in limited:
            _unlimit(netns, dev)
        for s in servers.values():
            s.close()
        network.teardown(state)
        shutil.rmtree(state, ignore_errors=True)
    load = os.getloadavg()
    print(
        f"components: {', '.join(a.key for a in arts)}: {total} bytes "
        f"({sum(len(pl.digests) for pl in plans.values())} chunks of 1 MiB or less)"
    )
    print(
        f"uplink per source: {args.uplink_mbit or 'unlimited'} Mbit/s; runs: {args.runs}; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs"
    )
    med = {k: statistics.median(s for s, _, _ in v) for k, v in rows.items()}
    print(f"{'source':10} {'seconds':>8} {'MB/s':>7} {'link bytes':>11}  bytes per source")
    for label, v in rows.items():
        link = int(statistics.median(lb for _, _, lb in v))
        per = ", ".join(f"{s} {n}" for s, n in sorted(v[-1][1].items()))
        print(f"{label:10} {med[label]:8.3f} {total / med[label] / 1e6:7.1f} {link:11d}  {per}")
    print(
        f"3 peers / 1 peer time: {med['3 peers'] / med['1 peer']:.2f}; "
        f"3 peers / mirror: {med['3 peers'] / med['mirror']:.2f}; "
        f"1 peer / mirror: {med['1 peer'] / med['mirror']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
