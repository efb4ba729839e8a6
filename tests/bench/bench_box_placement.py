"""Benchmark: place 1,000 Lazy Boxes on 1,000 members through the real API server.

Run: `python -m tests.bench.bench_box_placement [--members 1000 --boxes 1000]`.

Real: kube-apiserver + etcd, KubeVirt's CRDs, gtvp-operator, a 500-component signed
catalogue verified by the operator; members attested for real by the scale benchmark's load
generator (4 members on a swtpm each, the others on software-held TPM keys, all through
gtvp-agent's own code and the operator's full enrolment). Nodes are plain Node objects
with allocatable room and a random image cache (no kubelet, no kwok: nothing runs the VMs).

Measured: from the first LazyBox created until every box has a VM written and
`status.node` set (phase Placing; no VMI runs here). Baseline, same run: the same number
of composed VirtualMachines created directly through the same API server (the bare cost
of the writes). Target: < 60 s for 1,000 boxes.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from typing import Any

from gtvp.core.components import parse_component
from gtvp.core.compose import BoxRef, compose_vm
from gtvp.core.resolve import BoxRequest, resolve
from gtvp_local.pool import Pool
from tests.bench.bench_scale import _api, answer, create_members, load_generator_pool
from tests.catalogue import Publisher, synthetic

G, V = "gtvp.io", "v1alpha1"


def _nodes(pool: Pool, members: int, images: list[str], rnd: random.Random) -> None:
    from kubernetes import client

    core = client.CoreV1Api(_api(pool).api_client)
    room = {"cpu": "16", "memory": "64Gi", "pods": "110"}
    for i in range(members):
        name = f"m-{i}"
        core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
        cache = rnd.sample(images, k=rnd.randint(0, 30))
        core.patch_node_status(
            name,
            {
                "status": {
                    "allocatable": room,
                    "capacity": room,
                    "images": [{"names": [ref], "sizeBytes": 1} for ref in cache],
                }
            },
        )


def _box(name: str, app: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "LazyBox",
        "metadata": {"name": name},
        "spec": {
            "application": {"name": app},
            "level": 2,
            "resources": {"cpu": "1", "memory": "1Gi"},
        },
    }


def _placed(api: Any, ns: str) -> int:
    items = api.list_namespaced_custom_object(G, V, ns, "lazyboxes")["items"]
    return sum(1 for b in items if (b.get("status") or {}).get("node"))


def run(members: int, boxes: int, components: int = 500, seed: int = 5) -> dict[str, float]:
    rnd = random.Random(seed)  # noqa: S311 - reproducible workload, not secrets
    pub = Publisher()
    catalogue = synthetic(pub, components, seed)
    parsed = [parse_component(o) for o in catalogue]
    apps = sorted({c.name for c in parsed if c.type == "application"})
    stop = threading.Event()
    with load_generator_pool(
        4,  # members with a swtpm each
        kubevirt=True,
        interval="60s",
        valid_for="180s",
        max_uses=100000,
        publisher_keys=pub.keys,
    ) as (pool, lg):
        cp = pool.cp
        try:
            api = _api(pool)
            for obj in catalogue:
                api.create_cluster_custom_object(G, V, "oscomponents", obj)
            create_members(api, lg, members)
            _nodes(pool, members, [c.image for c in parsed], rnd)
            cp.kubectl("create", "namespace", "boxes")
            cp.kubectl("create", "namespace", "baseline")
            pool.start_operator()
            t0 = time.perf_counter()
            with lg.running():
                answerer = threading.Thread(target=answer, args=(lg, api, stop), daemon=True)
                answerer.start()
                while lg.trusted() < members:
                    time.sleep(1)
                took = time.perf_counter() - t0
                print(f"bench_box_placement: {members} members Trusted after {took:.0f}s")
                # baseline: the same number of composed VMs written directly
                spec = _box("x", apps[0])["spec"]
                comps = resolve(BoxRequest.from_spec(spec), parsed)
                b0 = time.perf_counter()
                for i in range(boxes):
                    vm = compose_vm(
                        BoxRef(f"vm-{i}", "baseline", "00000000-0000-4000-8000-000000000000"),
                        spec,
                        comps,
                        "m-0",
                    )
                    del vm["metadata"]["ownerReferences"]
                    api.create_namespaced_custom_object(
                        "kubevirt.io", "v1", "baseline", "virtualmachines", vm
                    )
                baseline = time.perf_counter() - b0
                load_before = os.getloadavg()[0]
                s0 = time.perf_counter()
                for i in range(boxes):
                    api.create_namespaced_custom_object(
                        G, V, "boxes", "lazyboxes", _box(f"box-{i}", rnd.choice(apps))
                    )
                created = time.perf_counter() - s0
                placed = 0
                while placed < boxes and time.perf_counter() - s0 < 600:
                    time.sleep(1)
                    placed = _placed(api, "boxes")
                elapsed = time.perf_counter() - s0
                load_after = os.getloadavg()[0]
                stop.set()
                answerer.join(timeout=10)
            items = api.list_namespaced_custom_object(G, V, "boxes", "lazyboxes")["items"]
            nodes = {(b.get("status") or {}).get("node") for b in items}
            cached = [
                (b.get("status") or {}).get("placement", {}).get("cachedBytes", 0) for b in items
            ]
        finally:
            stop.set()
    print(
        f"  {placed} of {boxes} boxes placed in {elapsed:.1f}s "
        f"(creating them took {created:.1f}s); target < 60 s"
    )
    print(
        f"  baseline, same run: {boxes} composed VMs created directly in {baseline:.1f}s; "
        f"ratio {elapsed / baseline:.1f}x"
    )
    print(f"  load average (1 min) {load_before:.1f} before placing, {load_after:.1f} after")
    mean = sum(cached) / max(len(cached), 1) / 2**20
    print(
        f"  boxes spread over {len(nodes - {None})} members; "
        f"mean cached bytes at the chosen member {mean:.0f} MiB"
    )
    return {"elapsed": elapsed, "baseline": baseline, "placed": placed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--boxes", type=int, default=1000)
    p.add_argument("--components", type=int, default=500)
    args = p.parse_args(argv)
    run(args.members, args.boxes, args.components)
    return 0


if __name__ == "__main__":
    sys.exit(main())
