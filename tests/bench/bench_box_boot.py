"""Benchmark: LazyBox created → guest ready, on a warm member and on a cold member, against
the same application as one monolithic VM image.

Run: `python -m tests.bench.bench_box_boot [--runs 3]` (or `make bench`).

Real: kube-apiserver + etcd, gtvp-operator (resolves, composes and places the box), a
gtvp-agent per member on its own swtpm (two members), the box's components built here from
Debian packages and signed here (linux kernel + box init, busybox-base, glibc, hello-web), qemu
(KVM when this machine has it) in each member's network namespace, every image fetched over
the member's own link from the pool's registry mirror into its component cache. Simulated:
Nodes by kwok; virt-controller, virt-handler and the kubelet's image pulls by gtvp's
stand-in (`gtvp_local.virtsim --vms qemu`).

Measured: from the create call until the guest prints `GTVP-READY <name>` on its serial
console (the box init hashed every disk against its pin, mounted the overlay and started
hello-web). Box warm: the members' caches hold the box's components; box cold: both caches
emptied first, so the member fetches kernel, busybox-base, glibc and hello-web before its VM
starts. One VM at a time, 256 MiB of guest memory.

Baseline, same run: the same application as one monolithic VM image
(`gtvp_local.guest.monolithic`: Debian bookworm minbase + busybox-base + glibc + hello-web in one
squashfs, booted by the same kernel and box init), a plain VirtualMachine created on a
member that holds its image (warm) and on one that must fetch it first (cold). It has a
vTPM as the box has (the pool's policy attests boxes, so each box VM gets one), so both
inits measure their disks into it before mounting them: measured boot costs both the same. The box's
figure includes the operator's resolve/compose/placement, the monolithic VM's does not.
Prints medians and the box/monolithic ratios; target: a box boots no slower than the
monolithic image (ratio ≤ 1.0, warm and cold).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gtvp.core import component_signing
from gtvp.local_state import cache_dir
from gtvp_local.controlplane import ephemeral_control_plane
from gtvp_local.guest.build import (
    APP_NAME,
    APP_UPGRADE,
    APP_VERSION,
    BASE_NAME,
    LIB_NAME,
    Artifact,
    build_catalogue,
    component_manifest,
)
from gtvp_local.guest.monolithic import (
    SERIAL,
    MonolithicImage,
    build_monolithic,
    cached_base,
    monolithic_vm,
)
from gtvp_local.pool import Pool, trusted_pool
from gtvp_local.vmruntime import cache
from gtvp_local.vmruntime.launcher import vm_id
from gtvp_local.vmruntime.runtime import Runtime
from tests.catalogue import Publisher

NS = "default"
MEMORY = "256Mi"
READY = "GTVP-READY"
TOOLS = ("qemu-system-x86_64", "busybox", "mksquashfs", "unsquashfs")


def missing_prerequisites() -> list[str]:
    """What this machine lacks for these benchmarks (the smoke test skips, or fails in CI)."""
    out = [f"{t} is not installed" for t in TOOLS if shutil.which(t) is None]
    if cached_base(cache_dir()) is None and (
        shutil.which("debootstrap") is None or os.geteuid() != 0
    ):
        out.append("no cached Debian minbase tree, and no debootstrap as root to make one")
    return out


# --- what is measured against what -----------------------------------------------------------


@dataclass(frozen=True)
class Catalogue:
    """The built components (the box's, one version each) and the monolithic image."""

    kernel: Artifact
    layers: tuple[Artifact, ...]  # the disks, base first, application last
    mono: MonolithicImage
    signed: list[dict[str, Any]]

    @property
    def components(self) -> tuple[Artifact, ...]:
        return (self.kernel, *self.layers)

    @property
    def box_images(self) -> list[str]:
        return [a.image for a in self.components]

    def sizes(self) -> str:
        parts = [f"{a.name} {a.size / 1e6:.2f} MB" for a in self.components]
        return (
            f"components: {', '.join(parts)}; monolithic disk {self.mono.size / 1e6:.1f} MB "
            f"(squashfs xz of {self.mono.tree_bytes / 1e6:.0f} MB of files: "
            f"{self.mono.base.name} + {' + '.join(a.name for a in self.layers)})"
        )


def catalogue(pub: Publisher) -> Catalogue:
    """The box's components (signed by `pub`) and the monolithic image, built here."""
    built = build_catalogue(cache_dir())
    chosen = {k: a for k, a in built.items() if k != f"{APP_NAME}@{APP_UPGRADE}"}
    kernel = next(a for a in chosen.values() if a.type == "kernel")
    base = chosen[f"{BASE_NAME}@1.0.0"]
    lib = next(a for a in chosen.values() if a.name == LIB_NAME)
    app = chosen[f"{APP_NAME}@{APP_VERSION}"]
    signed = []
    for a in (kernel, base, lib, app):
        doc = component_manifest(a)
        doc["spec"]["signature"] = component_signing.sign(doc["spec"], pub.private_pem, pub.name)
        signed.append(doc)
    mono = build_monolithic(cache_dir(), (base, lib, app))
    return Catalogue(kernel, (base, lib, app), mono, signed)


# --- the pool --------------------------------------------------------------------------------


def apply(pool: Pool, obj: dict[str, Any]) -> None:
    pool.cp.kubectl("apply", "-f", "-", input_text=json.dumps(obj))


@contextlib.contextmanager
def box_pool(tag: str) -> Iterator[tuple[Pool, Catalogue]]:
    """A throwaway control plane and two Trusted level-3 members running real VMs, the
    signed components applied and the monolithic image served by the registry mirror."""
    pub = Publisher()
    cat = catalogue(pub)
    prefix = f"{tag}{uuid.uuid4().hex[:4]}"
    members = {f"{prefix}-a": 3, f"{prefix}-b": 3}
    policy = {"interval": "2s", "valid_for": "8s", "max_uses": 1000, "publisher_keys": pub.keys}
    items = {"apiVersion": "v1", "kind": "List", "items": cat.signed}
    with (
        tempfile.TemporaryDirectory() as d,
        ephemeral_control_plane(Path(d) / "cp") as cp,
        trusted_pool(
            cp,
            Path(d) / "pool",
            members,
            policy_name=f"bench-{prefix}",
            policy=policy,
            vms="qemu",
            timeout=120,
            before_start=lambda p: apply(p, items),
        ) as pool,
    ):
        pool.component_store.mkdir(parents=True, exist_ok=True)
        (pool.component_store / cat.mono.sha256).symlink_to(cat.mono.path)
        yield pool, cat


def kubectl_json(pool: Pool, *args: str) -> dict[str, Any]:
    out = pool.cp.kubectl(*args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def create(pool: Pool, obj: dict[str, Any]) -> float:
    """Create `obj` in the namespace; the time of the call's return."""
    pool.cp.kubectl("create", "-n", NS, "-f", "-", input_text=json.dumps(obj))
    return time.monotonic()


def box(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "gtvp.io/v1alpha1",
        "kind": "LazyBox",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "application": {"name": APP_NAME, "versions": ">=1.0"},
            "level": 2,
            "resources": {"cpu": "1", "memory": MEMORY},
        },
    }


def wait_for(what: str, check: Callable[[], Any], timeout: float, step: float = 0.02) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(step)
    raise TimeoutError(f"timed out waiting for {what}")


def wait_ready(pool: Pool, name: str, timeout: float = 240) -> tuple[float, float]:
    """When the VM's qemu was first seen running, and when the guest said
    `GTVP-READY <name>` (both polled every 20 ms)."""
    runtime = Runtime(pool.dir)
    vm = vm_id(NS, name)
    started: list[float] = []

    def ready() -> float | None:
        now = time.monotonic()
        if not started and runtime.running(vm):
            started.append(now)
        return now if f"{READY} {name}" in runtime.console(vm) else None

    try:
        got: float = wait_for(f"{name}'s guest ready", ready, timeout)
    except TimeoutError as exc:
        vmi = kubectl_json(pool, "get", "vmi", name, "-n", NS).get("status")
        raise TimeoutError(
            f"{exc}\nVMI: {json.dumps(vmi)[:600]}\nconsole: {runtime.console(vm)[-800:]}\n"
            f"{pool.procs.log_tail('virtsim', 15)}"
        ) from None
    return (started or [got])[0], got


def node_of(pool: Pool, name: str) -> str:
    node: str = wait_for(
        f"{name}'s VMI placed",
        lambda: (kubectl_json(pool, "get", "vmi", name, "-n", NS).get("status") or {}).get(
            "nodeName"
        ),
        60,
        0.1,
    )
    return node


def remove(pool: Pool, name: str, *, lazybox: bool) -> None:
    """Delete the box (if it is one) and its VM (no garbage collector here), and wait
    until its qemu is gone."""
    if lazybox:
        pool.cp.kubectl("delete", "lazybox", name, "-n", NS, "--wait=false", check=False)
    runtime = Runtime(pool.dir)
    vm = vm_id(NS, name)

    def gone() -> bool:
        pool.cp.kubectl("delete", "vm", name, "-n", NS, "--wait=false", check=False)
        return not kubectl_json(pool, "get", "vmi", name, "-n", NS) and not runtime.running(vm)

    wait_for(f"{name} stopped", gone, 90, 0.5)


def clear_cache(pool: Pool, member: str) -> None:
    """Empty the member's component cache (cold), and say so in its Node's status."""
    d = cache.member_dir(pool.dir, member)
    for p in d.iterdir() if d.is_dir() else ():
        if p.name == ".lock":
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    pool.patch_node_status(member, {"images": cache.listing(pool.dir, member)})


def machine_load() -> str:
    """What else runs on this machine: load averages and the top CPU processes."""
    up = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    ps = subprocess.run(
        ["ps", "aux", "--sort=-%cpu"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:6]
    return "\n".join([f"  uptime: {up}", *(f"  {line[:150]}" for line in ps)])


def accel(pool: Pool) -> str:
    """How the stand-in runs the VMs (qemu's acceleration: kvm, or tcg emulation)."""
    found = re.search(r"VMs run under qemu \((\w+)\)", pool.procs.log_tail("virtsim", 100_000))
    return f"VMs run under qemu ({found.group(1) if found else 'unknown acceleration'})"


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- the runs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Boot:
    seconds: float
    """created → guest ready"""
    guest: float
    """its qemu running → guest ready (the guest's own boot, disks verified)"""
    node: str


def box_boot(pool: Pool, cat: Catalogue, name: str, *, warm: bool) -> Boot:
    members = pool.members()
    for m in members:
        if warm:
            pool.warm_cache(m, cat.box_images)
        else:
            clear_cache(pool, m)
    t0 = create(pool, box(name))
    started, ready = wait_ready(pool, name)
    node = node_of(pool, name)
    remove(pool, name, lazybox=True)
    return Boot(ready - t0, ready - started, node)


def mono_boot(pool: Pool, cat: Catalogue, name: str, *, warm: bool) -> Boot:
    member = pool.members()[0]
    images = [cat.kernel.image, cat.mono.image]
    for m in pool.members():
        clear_cache(pool, m)
    if warm:
        pool.warm_cache(member, images)
    vm = monolithic_vm(name, cat.kernel, cat.mono, memory=MEMORY, node=member, vtpm=True)
    t0 = create(pool, vm)
    started, ready = wait_ready(pool, name)
    node = node_of(pool, name)
    if f"verified and mounted {SERIAL} " not in Runtime(pool.dir).console(vm_id(NS, name)):
        raise RuntimeError(f"{name} did not boot from the monolithic disk")
    remove(pool, name, lazybox=False)
    return Boot(ready - t0, ready - started, node)


def run(runs: int = 1) -> dict[str, float]:
    print("bench_box_boot: LazyBox created -> guest ready (GTVP-READY on its console)")
    print("machine before:\n" + machine_load())
    kinds = ("box warm", "box cold", "mono warm", "mono cold")
    boots: dict[str, list[Boot]] = {k: [] for k in kinds}
    with box_pool("bb") as (pool, cat):
        print(f"  sizes: {cat.sizes()}")
        for i in range(runs):
            for label, warm in (("cold", False), ("warm", True)):
                for kind, boot in (("box", box_boot), ("mono", mono_boot)):
                    got = boot(pool, cat, f"{kind}-{label}-{i}", warm=warm)
                    boots[f"{kind} {label}"].append(got)
                    print(
                        f"  run {i}: {kind:4} {label:4} {got.seconds * 1000:6.0f} ms "
                        f"(guest {got.guest * 1000:5.0f} ms) on {got.node}"
                    )
        print(f"  {accel(pool)}")
    med = {k: median([b.seconds for b in v]) for k, v in boots.items()}
    guest = {k: median([b.guest for b in v]) for k, v in boots.items()}
    print(f"bench_box_boot: {runs} runs each, guest memory {MEMORY}, medians "
          "(guest: from its qemu running):")  # fmt: skip
    for label in ("warm", "cold"):
        box_s, mono_s = med[f"box {label}"], med[f"mono {label}"]
        print(
            f"  {label}: box {box_s * 1000:6.0f} ms (guest {guest[f'box {label}'] * 1000:5.0f})"
            f"   baseline monolithic image {mono_s * 1000:6.0f} ms "
            f"(guest {guest[f'mono {label}'] * 1000:5.0f})   ratio box/monolithic "
            f"{box_s / mono_s:.2f}x (target <= 1.0)"
        )
    print(f"  box cold/warm: {med['box cold'] / med['box warm']:.2f}x")
    print("machine after:\n" + machine_load())
    return med


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    run(args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
