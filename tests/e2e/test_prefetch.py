"""Pre-fetch, then migrate: a box evacuated to a cold member is fetched there first.

A box runs on one member; the other is Trusted but its component cache is empty. Tampering
the box's member makes gtvp evacuate the box; before it creates the migration it asks the
cold target to fetch the box's components (`gtvp.io/prefetch` on the target Node), the
target fetches them over its own link and lists them in `Node.status.images`, and only then
does the migration exist: a real live migration (the guest never reboots). The operator's
metrics show the bytes fetched ahead and the wait.

Real: kube-apiserver + etcd, gtvp-operator, a gtvp-agent per member on its own swtpm, the
box's components built here and signed, qemu in each member's network namespace, the fetch
across the target's link, the qemu live migration. Simulated: Nodes by kwok; KubeVirt's
virt-controller/virt-handler and the kubelet's image pulls and image report by gtvp's
stand-in (`gtvp_local.virtsim --vms qemu`, `gtvp_local.vmruntime`).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gtvp.core.prefetch import ANNOTATION
from gtvp_local.controlplane import ControlPlane
from gtvp_local.pool import Pool
from gtvp_local.vmruntime import cache
from tests.e2e.test_real_vms import (
    NS,
    _apply_box,
    _diagnosis,
    _get,
    _signed_catalogue,
    real_vm_pool,
)
from tests.pools import wait_for as _wait

pytestmark = [pytest.mark.e2e, pytest.mark.controlplane, pytest.mark.tpm]
PREFETCHED = re.compile(
    r"\[SIMULATED kubelet\] (\S+) pre-fetched (\d+) image\(s\) for (\S+): (\d+) bytes, "
    r"done at (\S+)"
)
FETCHED = re.compile(r"\[SIMULATED kubelet\] (\S+) fetched (\S+): (\d+) bytes")


@pytest.fixture(scope="module")
def pool(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with real_vm_pool(
        control_plane, tmp_path_factory.mktemp("prefetch"), "prefetch", _signed_catalogue()
    ) as p:
        yield p


def _node(pool: Pool, name: str) -> dict[str, Any]:
    node: dict[str, Any] = json.loads(pool.cp.kubectl("get", "node", name, "-o", "json").stdout)
    return node


def _metrics(pool: Pool) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of every replica's /metrics, summed over replicas."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for replica in pool.replicas:
        url = f"http://127.0.0.1:{replica.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                out[key] = out.get(key, 0.0) + s.value
    return out


def _sample(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return metrics.get((name, (("reason", "evacuation"),)), 0.0)


def test_the_cold_target_fetches_first_then_the_box_live_migrates(pool: Pool) -> None:
    _apply_box(pool, "mover", serve=False)

    def running() -> dict[str, Any]:
        v = _get(pool, "vmi", "mover")
        return v if (v.get("status") or {}).get("phase") == "Running" else {}

    try:
        vmi = _wait("the box's VMI Running", running, timeout=180)
    except TimeoutError as exc:
        raise AssertionError(_diagnosis(pool, "mover")) from exc
    source = vmi["status"]["nodeName"]
    cold = next(m for m in pool.members() if m != source)
    assert (_node(pool, cold).get("status") or {}).get("images") in (None, [])  # cold
    needed = cache.images_of(vmi["spec"])
    box = _get(pool, "lazybox", "mover")
    missing_bytes = sum(int(r["sizeBytes"]) for r in box["status"]["resolved"])
    before = _metrics(pool)

    pool.extend_pcr(source, 7, b"rootkit")
    try:
        moved = _wait(
            "the box live-migrated to the cold member",
            lambda: (
                (v := _get(pool, "vmi", "mover")).get("status", {}).get("nodeName") == cold and v
            ),
            timeout=180,
        )
    except TimeoutError as exc:
        raise AssertionError(_diagnosis(pool, "mover")) from exc

    [mig] = json.loads(
        pool.cp.kubectl(
            "get", "vmim", "-n", NS, "-l", f"gtvp.io/evacuation={source}", "-o", "json"
        ).stdout
    )["items"]
    created = dt.datetime.fromisoformat(mig["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
    log = pool.procs.log_tail("virtsim", 100_000)
    # (the source's own fetch, before the box first started, is logged the same way)
    [(count, fetched_bytes, done_at)] = [
        (n, b, at) for m, n, v, b, at in PREFETCHED.findall(log) if m == cold
    ]
    assert int(count) == len(needed)
    done = dt.datetime.fromisoformat(done_at)
    # the images were in the target's cache before the migration object existed (the API
    # server's creationTimestamp is to the second)
    assert done.replace(microsecond=0) <= created, (done_at, created)
    d = cache.member_dir(pool.dir, cold)
    for image in needed:
        landed = dt.datetime.fromtimestamp((d / cache.digest_hex(image)).stat().st_mtime, dt.UTC)
        assert landed.replace(microsecond=0) <= created, (image, landed, created)
    # fetched once, ahead: the migration itself fetched nothing more
    fetches = [(m, i) for m, i, _ in FETCHED.findall(log) if m == cold]
    assert sorted(fetches) == sorted((cold, i) for i in needed)
    assert int(fetched_bytes) == sum((d / cache.digest_hex(i)).stat().st_size for i in needed)
    assert log.index(f"{cold} pre-fetched") < log.index(f"migration {NS}/{mig['metadata']['name']}")

    # a real live migration: it Succeeded and the guest never rebooted
    assert mig["status"]["phase"] == "Succeeded" or _wait(
        "the migration Succeeded",
        lambda: (
            _get(pool, "vmim", mig["metadata"]["name"]).get("status", {}).get("phase")
            == "Succeeded"
        ),
        timeout=60,
    )
    assert moved["status"]["phase"] == "Running"
    assert pool.vm_console(NS, "mover").count("GTVP-READY mover") == 1

    # the request is gone from the Node once the migration exists
    _wait(
        "the pre-fetch request removed",
        lambda: ANNOTATION not in (_node(pool, cold)["metadata"].get("annotations") or {}),
        timeout=30,
    )
    events = pool.cp.kubectl(
        "get", "events", "-n", NS, "--field-selector", "reason=Prefetching", "-o", "json"
    ).stdout
    assert any(cold in e["message"] for e in json.loads(events)["items"])

    after = _metrics(pool)
    delta = {
        name: _sample(after, name) - _sample(before, name)
        for name in (
            "gtvp_prefetch_requests_total",
            "gtvp_prefetch_bytes_total",
            "gtvp_prefetch_timeouts_total",
            "gtvp_prefetch_wait_seconds_count",
            "gtvp_prefetch_wait_seconds_sum",
        )
    }
    assert delta["gtvp_prefetch_requests_total"] == 1
    assert delta["gtvp_prefetch_bytes_total"] == missing_bytes  # every component was missing
    assert delta["gtvp_prefetch_timeouts_total"] == 0
    assert delta["gtvp_prefetch_wait_seconds_count"] == 1
    assert 0 < delta["gtvp_prefetch_wait_seconds_sum"] < 120
    pool.cp.kubectl("delete", "lazybox", "mover", "-n", NS, "--wait=false", check=False)
