"""The VM runtime (`gtvp_local.vmruntime`): real qemu in member namespaces, real migration.

A VM boots in member A's network namespace; it live-migrates to B across the member link
without rebooting (its console's uptime keeps growing) and the bytes show on the veths; a
migration whose target dies midway fails and leaves the VM running where it was. At the end
nothing the runtime created is left (namespaces, veths, bridge, qemu processes).

Needs root, qemu-system-x86_64, busybox-static and the Debian cloud kernel (fetched into the
cache with apt-get download on first use). Skipped when they are missing, failed under CI.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gtvp_local.processes import owned_by
from gtvp_local.vmruntime import MachineSpec, Runtime, cleanup, guest_spec, names, network
from tests.prerequisites import unavailable

MEMORY_MIB = 256
UPTIME = re.compile(r"^gtvp-uptime (\d+(?:\.\d+)?)\s*$", re.MULTILINE)


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, veths, a bridge)"
    for tool in ("qemu-system-x86_64", "ip", "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@dataclass
class Pool:
    state: Path
    rt: Runtime
    spec: MachineSpec
    a: str
    b: str


def _leftovers(state: Path) -> list[str]:
    """Every `gtvpvm` namespace and link on the machine, and every process of `state`."""
    found: list[str] = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    found += [f"netns {n}" for n in re.findall(r"^(gtvpvm\S*)", netns.stdout, re.MULTILINE)]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    found += [f"link {n}" for n in re.findall(r"^\d+: (gtvpvm[^:@]*)", links.stdout, re.MULTILINE)]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if owned_by(state, environ) or (b"qemu" in cmdline and str(state).encode() in cmdline):
            found.append(f"process {proc.name}: {cmdline[:80]!r}")
    return found


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    reason = _missing()
    if reason:
        unavailable(reason)
    try:
        spec = guest_spec(MEMORY_MIB)
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        unavailable(f"the test guest could not be built (kernel or initramfs): {exc}")
    state = tmp_path_factory.mktemp("vmruntime")
    tag = uuid.uuid4().hex[:6]
    a, b = f"t{tag}-a", f"t{tag}-b"
    try:
        yield Pool(state, Runtime(state), spec, a, b)
    finally:
        cleanup(state)
        assert _leftovers(state) == []


def _uptimes(text: str) -> list[float]:
    return [float(v) for v in UPTIME.findall(text)]


def _wait_uptimes(rt: Runtime, vm: str, more_than: int, timeout: float = 20.0) -> list[float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = _uptimes(rt.console(vm))
        if len(got) > more_than:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{vm}: no new uptime line after {more_than}:\n{rt.console(vm)[-500:]}")


def _netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _netns_inode(netns: str) -> int:
    return os.stat(f"/run/netns/{netns}").st_ino


def test_network_is_idempotent(pool: Pool) -> None:
    one = network.ensure_member(pool.state, pool.a)
    two = network.ensure_member(pool.state, pool.a)
    other = network.ensure_member(pool.state, pool.b)
    assert one == two
    assert one.address != other.address
    assert one.address.startswith("10.77.0.")
    assert Path(f"/sys/class/net/{one.host_veth}/master").resolve().name == names.BRIDGE
    inside = subprocess.run(
        ["ip", "-n", one.netns, "-o", "addr", "show", "dev", one.member_veth],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f" {one.address}/24" in inside


def test_a_namespace_left_by_an_earlier_run_loses_its_stale_link(
    pool: Pool, tmp_path: Path
) -> None:
    """A run killed without teardown leaves the member's namespace with its old veth (and
    address); a new run of the same member must not route through it, or the traffic it
    counts on the member's link goes elsewhere."""
    first = network.ensure_member(tmp_path / "earlier", pool.a + "x")
    try:
        (tmp_path / "earlier" / "vmruntime" / "network.json").unlink()  # state lost
        again = network.ensure_member(pool.state, pool.a + "x")
        assert again.netns == first.netns
        links = subprocess.run(
            ["ip", "-n", again.netns, "-o", "link", "show"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert again.member_veth != first.member_veth  # the old octet's link still existed
        assert first.member_veth not in links
        assert not Path(f"/sys/class/net/{first.host_veth}").exists()
        assert again.member_veth in links
    finally:
        network.teardown(pool.state)


def test_vm_boots_in_member_namespace(pool: Pool) -> None:
    vm = "gtvpvm-boot"
    try:
        t0 = time.monotonic()
        handle = pool.rt.start(vm, pool.a, pool.spec)
        boot = pool.rt.wait_ready(vm, timeout=90)
        print(f"boot to GTVP-READY: {time.monotonic() - t0:.1f}s ({boot:.1f}s after QMP)")
        assert _netns_of(handle.process.pid) == _netns_inode(names.netns_name(pool.a))
        assert "GTVP-READY test" in pool.rt.console(vm)
        with pool.rt.qmp(vm) as q:
            assert q.execute("query-status")["status"] == "running"
    finally:
        assert pool.rt.stop(vm)
    assert pool.rt.handle(vm) is None


def test_live_migration_moves_the_running_guest(pool: Pool) -> None:
    vm = "gtvpvm-move"
    rt = pool.rt
    try:
        rt.start(vm, pool.a, pool.spec)
        rt.wait_ready(vm, timeout=90)
        source = rt.handle(vm)
        assert source is not None
        before = _wait_uptimes(rt, vm, 2)
        target_net = network.ensure_member(pool.state, pool.b)
        source_net = network.ensure_member(pool.state, pool.a)
        src_rx0, _ = source_net.link_bytes()
        _, dst_tx0 = target_net.link_bytes()
        result = rt.migrate(vm, pool.b, timeout=120)
        src_rx1, _ = source_net.link_bytes()
        _, dst_tx1 = target_net.link_bytes()
        print(
            f"migration {MEMORY_MIB} MiB: {result.status} total {result.total_ms:.0f} ms, "
            f"downtime {result.downtime_ms} ms, ram {result.ram_bytes} B, "
            f"link {result.link_bytes} B"
        )
        assert result.completed, result.reason
        assert result.downtime_ms is not None
        assert result.ram_bytes > 0
        # the stream crossed A's veth, the bridge and B's veth: about the RAM sent (qemu
        # counts a few % more than the veths see at the moment it reports completion)
        for grown in (result.link_bytes, src_rx1 - src_rx0, dst_tx1 - dst_tx0):
            assert grown >= 0.9 * result.ram_bytes
        assert not source.process.alive(), "the source qemu is still running"
        moved = rt.handle(vm)
        assert moved is not None
        assert moved.member == pool.b
        assert moved.generation == source.generation + 1
        assert _netns_of(moved.process.pid) == _netns_inode(names.netns_name(pool.b))
        after = _wait_uptimes(rt, vm, len(_uptimes(rt.console(vm))) + 1)
        last_before = max(before)
        first_after = after[len(before) :]
        assert first_after, "no uptime after the move"
        assert all(u > last_before for u in first_after), (last_before, first_after)
        assert after == sorted(after), "the guest's uptime went back: it rebooted"
        assert rt.console(vm).count("GTVP-READY") == 1
    finally:
        rt.stop(vm)


def test_migration_fails_when_target_dies_and_vm_keeps_running(pool: Pool) -> None:
    vm = "gtvpvm-fail"
    rt = pool.rt
    killed: list[int] = []

    def kill_target(info: Mapping[str, Any]) -> None:
        transferred = (info.get("ram") or {}).get("transferred", 0)
        if killed or info.get("status") != "active" or transferred < 2 << 20:
            return
        h = rt.handle(vm)
        assert h is not None
        target = rt.table.get(names.process_name(vm, h.generation + 1))
        assert target is not None
        assert target.alive()
        os.kill(target.pid, signal.SIGKILL)
        killed.append(target.pid)

    try:
        rt.start(vm, pool.a, pool.spec)
        rt.wait_ready(vm, timeout=90)
        source = rt.handle(vm)
        assert source is not None
        t0 = time.monotonic()
        result = rt.migrate(vm, pool.b, timeout=120, max_bandwidth=4 << 20, on_progress=kill_target)
        print(f"failed migration after {time.monotonic() - t0:.1f}s: {result.reason}")
        assert killed, "the migration ended before the target could be killed"
        assert result.status == "failed"
        assert result.reason
        assert rt.table.get(names.process_name(vm, source.generation + 1)) is None
        still = rt.handle(vm)
        assert still is not None
        assert still.member == pool.a
        assert still.process == source.process
        assert still.process.alive()
        with rt.qmp(vm) as q:
            assert q.execute("query-status")["status"] == "running"
            limit = q.execute("query-migrate-parameters")["max-bandwidth"]
            assert limit != 4 << 20, "the migration's bandwidth limit stayed on the VM"
        count = len(_uptimes(rt.console(vm)))
        _wait_uptimes(rt, vm, count + 1)
        assert rt.console(vm).count("GTVP-READY") == 1
    finally:
        rt.stop(vm)


def test_migration_timeout_cancels_and_cleanup_finds_strays(pool: Pool) -> None:
    """Runs last: a migration that outlasts its timeout is cancelled (the VM stays); then
    a VM whose pid file was lost is still found by `cleanup` through its process mark."""
    vm = "gtvpvm-slow"
    rt = pool.rt
    rt.start(vm, pool.a, pool.spec)
    rt.wait_ready(vm, timeout=90)
    result = rt.migrate(vm, pool.b, timeout=1.0, max_bandwidth=1 << 20)
    assert result.status == "failed"
    assert "timed out" in result.reason
    handle = rt.handle(vm)
    assert handle is not None
    assert handle.member == pool.a
    assert handle.process.alive()
    assert rt.table.get(names.process_name(vm, handle.generation + 1)) is None
    # lose the pid file: the qemu is now a stray, found by the mark in its environment
    (rt.table.dir / f"{names.process_name(vm, handle.generation)}.pid").unlink()
    removed = cleanup(pool.state)
    assert f"stray pid {handle.process.pid}" in removed
    assert not handle.process.alive()
    assert _leftovers(pool.state) == []
