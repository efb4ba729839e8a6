"""The node image cache is true: each member's component cache, fetched across its link.

A cold member fetches a box's components from the pool's registry mirror before the box's
VM starts there (over its own veth, into its cache directory), and its Node.status.images
then lists exactly those images with their real sizes; a member warmed beforehand fetches
nothing and boots the box from what it holds; a member that cannot fetch an image does not
start the VM, and the VMI says why.

Real: kube-apiserver + etcd, gtvp-operator, a gtvp-agent per member on its own swtpm, the
box's components built here, qemu in each member's network namespace, the fetch over the
member's link. Simulated: Nodes by kwok; KubeVirt's virt-controller and virt-handler and
the kubelet's image pulls and image report by gtvp's stand-in (`gtvp_local.virtsim --vms
qemu`, `gtvp_local.vmruntime.cache`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gtvp.local_state import cache_dir
from gtvp_local.controlplane import ControlPlane
from gtvp_local.guest.build import build_catalogue
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
FETCHED = re.compile(
    r"\[SIMULATED kubelet\] (\S+) fetched (\S+): (\d+) bytes in .* \((\d+) bytes on"
)


@pytest.fixture(scope="module")
def pool(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with real_vm_pool(
        control_plane, tmp_path_factory.mktemp("cache"), "cache", _signed_catalogue()
    ) as p:
        yield p


def _node_images(pool: Pool, member: str) -> list[dict[str, Any]]:
    node = json.loads(pool.cp.kubectl("get", "node", member, "-o", "json").stdout)
    images: list[dict[str, Any]] = (node.get("status") or {}).get("images") or []
    return sorted(images, key=lambda i: i["names"][0])


def _fetches(pool: Pool) -> list[tuple[str, str, int, int]]:
    """(member, image, bytes, bytes on the link) of each fetch the stand-in logged."""
    log = pool.procs.log_tail("virtsim", 100_000)
    return [(m, i, int(n), int(link)) for m, i, n, link in FETCHED.findall(log)]


def _running(pool: Pool, name: str) -> dict[str, Any]:
    def running() -> dict[str, Any]:
        box = _get(pool, "lazybox", name)
        return box if (box.get("status") or {}).get("phase") == "Running" else {}

    try:
        box: dict[str, Any] = _wait(f"the box {name} Running", running, timeout=180)
    except TimeoutError as exc:
        raise AssertionError(_diagnosis(pool, name)) from exc
    return box


def _files(d: Path) -> dict[str, tuple[int, int]]:
    """The cache's images and records (not its lock), with their inodes and mtimes."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in d.iterdir()
        if p.is_file() and not p.name.startswith(".")
    }


def test_a_cold_member_fetches_the_boxs_components_before_its_vm_starts(pool: Pool) -> None:
    members = pool.members()
    assert all(_node_images(pool, m) == [] for m in members)  # nothing cached, nothing said
    _apply_box(pool, "cold", serve=False)
    box = _running(pool, "cold")
    member = box["status"]["node"]
    vm = _get(pool, "vm", "cold")
    needed = cache.images_of(vm["spec"]["template"]["spec"])
    built = {a.image: a for a in build_catalogue(cache_dir()).values()}
    assert len(needed) == 4  # kernel, base, library, application
    assert set(needed) <= set(built)
    d = cache.member_dir(pool.dir, member)
    for image in needed:  # the bytes are the mirror's, in the member's own directory
        assert (d / cache.digest_hex(image)).read_bytes() == built[image].path.read_bytes()
    assert not list(d.glob("*.part"))
    assert _node_images(pool, member) == [
        {"names": [i], "sizeBytes": built[i].size} for i in sorted(needed)
    ]
    other = next(m for m in members if m != member)
    assert _node_images(pool, other) == []  # it fetched nothing, so it says so
    fetches = _fetches(pool)
    assert sorted((m, i, n) for m, i, n, _ in fetches) == sorted(
        (member, i, built[i].size) for i in needed
    )
    assert all(link >= n for _, _, n, link in fetches)  # the bytes crossed the member's veth
    log = pool.procs.log_tail("virtsim", 100_000)
    starts = log.index(f"VMI {NS}/cold: a VM starts on {member}")
    assert all(log.index(f"{member} fetched {i}") < starts for i in needed)
    console = pool.vm_console(NS, "cold")
    assert "GTVP-READY cold" in console
    for image in needed[1:]:  # the init verified the disks it was given from the cache
        assert f"sha256 {cache.digest_hex(image)}" in console


def test_a_warm_member_fetches_nothing_and_boots_the_box(pool: Pool) -> None:
    cold = _get(pool, "lazybox", "cold")["status"]["node"]
    warm = next(m for m in pool.members() if m != cold)
    needed = cache.images_of(_get(pool, "vm", "cold")["spec"]["template"]["spec"])
    warmed = pool.warm_cache(warm, needed)  # across its link, before the box exists
    assert sorted(r.image for r in warmed) == sorted(needed)
    assert all(r.link_bytes >= r.size_bytes > 0 for r in warmed)
    assert pool.warm_cache(warm, needed) == []  # warm: nothing left to fetch
    said = _node_images(pool, warm)
    assert said == pool.cached_images(warm)
    assert sorted(i["names"][0] for i in said) == sorted(needed)
    d = cache.member_dir(pool.dir, warm)
    before = _files(d)
    fetched_before = _fetches(pool)

    _apply_box(pool, "warm", serve=False)  # the cold member runs a box already: less room
    box = _running(pool, "warm")
    assert box["status"]["node"] == warm
    assert box["status"]["placement"]["cachedBytes"] == sum(i["sizeBytes"] for i in said)
    assert _fetches(pool) == fetched_before  # nobody fetched anything
    assert {k: v for k, v in _files(d).items() if k in before} == before  # the same files
    assert _node_images(pool, warm) == said
    assert "GTVP-READY warm" in pool.vm_console(NS, "warm")
    for name in ("cold", "warm"):
        pool.cp.kubectl("delete", "lazybox", name, "-n", NS, "--wait=false", check=False)


def test_a_member_that_cannot_fetch_an_image_does_not_start_the_vm(pool: Pool) -> None:
    member = pool.members()[0]
    said = _node_images(pool, member)
    image = f"registry.gtvp.local/gtvp-components/nowhere@sha256:{'0' * 64}"
    vm = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "unfetchable"},
        "spec": {
            "runStrategy": "Always",
            "template": {
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": member},
                    "domain": {
                        "firmware": {
                            "kernelBoot": {
                                "container": {"image": image, "kernelPath": "/boot/vmlinuz"}
                            }
                        },
                        "devices": {},
                        "resources": {"requests": {"memory": "128Mi"}},
                    },
                }
            },
        },
    }
    pool.cp.kubectl("apply", "-n", NS, "-f", "-", input_text=json.dumps(vm))
    try:

        def failed() -> dict[str, Any]:
            status: dict[str, Any] = _get(pool, "vmi", "unfetchable").get("status") or {}
            return status if status.get("phase") == "Failed" else {}

        status = _wait("the VMI Failed", failed, timeout=60)
        assert f"{member} could not fetch {image}" in status["reason"]
        assert "404" in status["reason"]
        assert pool.vm_console(NS, "unfetchable") == ""  # no VM ever started
        assert not list(cache.member_dir(pool.dir, member).glob("*.part"))
        assert _node_images(pool, member) == said
    finally:
        pool.cp.kubectl("delete", "vm", "unfetchable", "-n", NS, "--wait=false", check=False)
