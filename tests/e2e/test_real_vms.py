"""Lazy Boxes as real VMs: a box boots from its components, is live-migrated for real, and
reboots into a new composition when its application is upgraded.

Real: kube-apiserver + etcd, gtvp-operator, a gtvp-agent per member on its own swtpm, the
box's components built here from Debian packages (kernel, gtvp's box init, busybox rootfs,
hello-web application in versions 1.0.0 and 1.1.0; signed in this test), qemu running the
composed VM in its member's network namespace, and a qemu live migration over the link
between two members. Only hello-web 1.0.0 is applied with the pool; the upgrade test, last,
applies 1.1.0 and removes it again.
Simulated: Nodes by kwok; KubeVirt's virt-controller and virt-handler/virt-launcher by
gtvp's stand-in (`gtvp_local.virtsim --vms qemu`, `gtvp_local.vmruntime.launcher`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gtvp.core import component_signing
from gtvp.local_state import cache_dir
from gtvp_local.controlplane import ControlPlane
from gtvp_local.guest.build import (
    APP_MARKER,
    APP_NAME,
    APP_UPGRADE,
    APP_VERSION,
    LIB_NAME,
    BuildError,
    build_catalogue,
    component_manifest,
)
from gtvp_local.pool import Pool
from gtvp_local.processes import ProcessTable
from gtvp_local.virtsim import SLOW_LINK_ANNOTATION
from gtvp_local.vmruntime import cache, names
from gtvp_local.vmruntime.launcher import vm_id
from gtvp_local.vmruntime.network import member_net
from gtvp_local.vmruntime.runtime import Runtime, VmHandle, runtime_dir
from tests.catalogue import Publisher
from tests.pools import trusted_pool
from tests.pools import wait_for as _wait
from tests.prerequisites import unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.controlplane, pytest.mark.tpm]
PUB = Publisher()
NS = "default"
UPTIME = re.compile(r"gtvp-uptime (\d+(?:\.\d+)?)")
APP_SAYS = re.compile(rf"^{APP_MARKER} {APP_NAME} (\S+)\s*$", re.M)
UPGRADE = f"{APP_NAME}@{APP_UPGRADE}"  # built and signed, applied only by the upgrade test


def _signed_catalogue() -> dict[str, dict[str, Any]]:
    """Every component version built here, as signed OSComponents, by `Artifact.key`."""
    missing = [t for t in ("qemu-system-x86_64", "mksquashfs") if not shutil.which(t)]
    if missing:
        unavailable(f"real VMs need {', '.join(missing)} (make setup)")
    try:
        catalogue = build_catalogue(cache_dir())
    except BuildError as exc:
        unavailable(f"cannot build the box components: {exc}")
    docs = {}
    for key, artifact in catalogue.items():
        doc = component_manifest(artifact)
        doc["spec"]["signature"] = component_signing.sign(doc["spec"], PUB.private_pem, PUB.name)
        docs[key] = doc
    return docs


@pytest.fixture(scope="module")
def components() -> dict[str, dict[str, Any]]:
    return _signed_catalogue()


@contextlib.contextmanager
def real_vm_pool(
    control_plane: ControlPlane,
    directory: Path,
    tag: str,
    components: dict[str, dict[str, Any]],
    identities: dict[str, int] | None = None,
) -> Iterator[Pool]:
    """Trusted members (two of level 3 unless `identities` says) whose VMIs are real VMs,
    with every signed component but the hello-web upgrade applied before the operator
    starts; removed afterwards."""
    applied = [doc for key, doc in components.items() if key != UPGRADE]
    policy = {"interval": "2s", "valid_for": "8s", "max_uses": 50, "publisher_keys": PUB.keys}
    try:
        with trusted_pool(
            control_plane,
            directory,
            tag=tag,
            identities=identities or {"a": 3, "b": 3},
            policy=policy,
            vms="qemu",
            before_start=lambda p: p.cp.kubectl(
                "apply",
                "-f",
                "-",
                input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": applied}),
            ),
        ) as p:
            yield p
    finally:
        control_plane.kubectl("delete", "oscomponents", "--all", "--wait=false", check=False)


@pytest.fixture(scope="module")
def pool(
    control_plane: ControlPlane,
    tmp_path_factory: pytest.TempPathFactory,
    components: dict[str, dict[str, Any]],
) -> Iterator[Pool]:
    with real_vm_pool(control_plane, tmp_path_factory.mktemp("realvms"), "vm", components) as p:
        yield p


def _get(pool: Pool, kind: str, name: str) -> dict[str, Any]:
    out = pool.cp.kubectl("get", kind, name, "-n", NS, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def _diagnosis(pool: Pool, name: str) -> str:
    """What a user would look at when a box does not run."""
    return (
        f"box status: {json.dumps(_get(pool, 'lazybox', name).get('status'))[:1500]}\n"
        f"VMI status: {json.dumps(_get(pool, 'vmi', name).get('status'))[:800]}\n"
        f"stand-in log:\n{pool.procs.log_tail('virtsim', 25)}\n"
        f"console:\n{pool.vm_console(NS, name)[-1500:]}"
    )


def _uptimes(console: str) -> list[float]:
    return [float(u) for u in UPTIME.findall(console)]


def _app_says(console: str) -> list[str]:
    """The versions the application announced on the console, in order."""
    return APP_SAYS.findall(console)


def _apply_box(pool: Pool, name: str, *, serve: bool = True) -> None:
    """A box running the hello-web application (versions >=1.0, upgradePolicy Restart) at
    level 2 (the real components), its port 8080 served on its member's address when `serve`
    (one box per member may serve it: the members' addresses stand in for pod IPs)."""
    box = {
        "apiVersion": "gtvp.io/v1alpha1",
        "kind": "LazyBox",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "application": {"name": APP_NAME, "versions": ">=1.0"},
            "level": 2,
            "resources": {"cpu": "1", "memory": "192Mi"},
            "upgradePolicy": "Restart",
            **({"ports": [{"name": "http", "port": 8080}]} if serve else {}),
        },
    }
    pool.cp.kubectl("apply", "-f", "-", input_text=json.dumps(box))


def _page(pool: Pool, member: str, deadline_s: float = 30) -> str:
    """The box's web page, fetched from this host at the member's own address (the VM's
    pod network interface forwards the box's port there)."""
    net = member_net(pool.dir, member)
    assert net is not None, f"{member} has no network namespace"
    end = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(f"http://{net.address}:8080/", timeout=3) as answer:
                return str(answer.read().decode())
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


def _attested_on(pool: Pool, name: str, member: str, timeout: float = 90) -> dict[str, Any]:
    """The box's `status.attestation` once gtvp verified a quote of its vTPM taken on
    `member` (the pool's policy attests boxes: its vTPM CA is the VM runtime's)."""

    def verified() -> dict[str, Any] | None:
        att = (_get(pool, "lazybox", name).get("status") or {}).get("attestation") or {}
        return att if att.get("state") == "Verified" and att.get("member") == member else None

    try:
        got: dict[str, Any] = _wait(f"{name}'s vTPM quote verified on {member}", verified, timeout)
    except TimeoutError as exc:
        raise AssertionError(
            f"{_get(pool, 'lazybox', name).get('status')}\n{pool.vm_console(NS, name)[-3000:]}"
        ) from exc
    return got


@pytest.fixture(scope="module")
def hello(pool: Pool) -> Iterator[str]:
    _apply_box(pool, "hello")
    yield "hello"
    pool.cp.kubectl("delete", "lazybox", "hello", "-n", NS, "--wait=false", check=False)


def test_the_box_boots_from_its_components_and_is_running_only_once_the_guest_says_so(
    pool: Pool, hello: str
) -> None:
    def running() -> tuple[dict[str, Any], str] | None:
        box = _get(pool, "lazybox", hello)
        if (box.get("status") or {}).get("phase") != "Running":
            return None
        return box, pool.vm_console(NS, hello)  # read right when Running is first seen

    try:
        box, console = _wait("the box Running", running, timeout=150)
    except TimeoutError as exc:
        raise AssertionError(_diagnosis(pool, hello)) from exc
    assert f"GTVP-READY {hello}" in console  # the guest said so before the box was Running
    assert "gtvp-init: refused" not in console
    # the init checked every pinned disk before mounting it
    vmi = _get(pool, "vmi", hello)
    disks = vmi["spec"]["domain"]["firmware"]["kernelBoot"]["kernelArgs"]
    for pin in re.findall(r"gtvp\.disks=(\S+)", disks)[0].split(","):
        serial, digest = pin.split(":")
        assert f"gtvp-init: verified and mounted {serial} " in console
        assert f"sha256 {digest}" in console
    assert box["status"]["node"] == vmi["status"]["nodeName"]
    page = _page(pool, vmi["status"]["nodeName"])  # the service answers from the host
    assert f"gtvp Lazy Box {hello}" in page
    assert f"hello-web {APP_VERSION}" in page
    # the library layer is a component of its own, and its program ran in the guest
    lib = next(r for r in box["status"]["resolved"] if r["name"] == LIB_NAME)
    assert f"with glibc {lib['version']}" in page
    assert _app_says(console) == [APP_VERSION]  # the application said so itself
    # its vTPM measured each disk and gtvp verified a fresh quote against the composition
    att = _attested_on(pool, hello, vmi["status"]["nodeName"])
    assert att["vmiUID"] == vmi["metadata"]["uid"]
    # every component disk the init mounted (the kernel is booted directly, not measured)
    pins = re.findall(r"gtvp\.disks=(\S+)", disks)[0].split(",")
    resolved = {f"{r['name']}@{r['version']}" for r in box["status"]["resolved"]}
    assert len(att["components"]) == len(pins)
    assert set(att["components"]) <= resolved
    # the guest prints gtvp's answer once it has it (after gtvp recorded the verdict)
    _wait(
        "the guest to print gtvp's verdict on its quote",
        lambda: re.search(
            r"GTVP-ATTEST quoted nonce=\S+ verified=true", pool.vm_console(NS, hello)
        ),
        timeout=30,
    )


def _migrate(
    pool: Pool, vmi: str, name: str, annotations: dict[str, str] | None = None
) -> tuple[Runtime, str, VmHandle]:
    """A migration `name` of `vmi` made (by a user: no target named); the runtime, the VM
    and its qemu as they were just before."""
    vm = vm_id(NS, vmi)
    runtime = Runtime(pool.dir)
    handle = runtime.handle(vm)
    assert handle is not None
    meta: dict[str, Any] = {"name": name, **({"annotations": annotations} if annotations else {})}
    mig = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": meta,
        "spec": {"vmiName": vmi},
    }
    pool.cp.kubectl("create", "-n", NS, "-f", "-", input_text=json.dumps(mig))
    return runtime, vm, handle


def _failed(pool: Pool, name: str, timeout: float) -> dict[str, Any]:
    """The status of migration `name` once it Failed."""
    failed: dict[str, Any] = _wait(
        "the migration Failed",
        lambda: (m := _get(pool, "vmim", name).get("status") or {}).get("phase") == "Failed" and m,
        timeout=timeout,
    )
    return failed


def _still_where_it_was(
    pool: Pool, vmi: str, source: str, still: VmHandle | None, before: VmHandle
) -> None:
    """The VMI runs on `source` as before a failed migration: never left, the same qemu
    (never restarted), its guest counting on."""
    after = _get(pool, "vmi", vmi)
    assert after["status"]["nodeName"] == source  # it never left
    assert after["status"]["phase"] == "Running"
    assert still is not None
    assert still.process.pid == before.process.pid  # the same qemu, never restarted
    counted = _uptimes(pool.vm_console(NS, vmi))[-1]
    _wait(
        "the guest still counting on the source",
        lambda: _uptimes(pool.vm_console(NS, vmi))[-1] > counted + 1,
        30,
    )


def test_a_migration_whose_target_dies_fails_and_the_box_keeps_running_where_it_was(
    pool: Pool, hello: str
) -> None:
    vmi = _wait(
        "the box's VMI Running",
        lambda: (v := _get(pool, "vmi", hello)).get("status", {}).get("phase") == "Running" and v,
        timeout=150,
    )
    source = vmi["status"]["nodeName"]
    # a slow member link, so the migration is still in flight when its target dies
    runtime, vm, handle = _migrate(
        pool, hello, "slow-move", {SLOW_LINK_ANNOTATION: str(2 * 1024 * 1024)}
    )
    target_process = names.process_name(vm, handle.generation + 1)
    table = ProcessTable(runtime_dir(pool.dir))
    target = _wait(
        "the migration's target qemu",
        lambda: (t := table.get(target_process)) is not None and t.alive() and t,
        timeout=60,
    )
    os.kill(target.pid, signal.SIGKILL)  # the target host dies mid-migration
    failed = _failed(pool, "slow-move", timeout=60)
    assert failed["migrationState"]["failed"] is True
    assert "target" in failed["migrationState"]["failureReason"]
    _still_where_it_was(pool, hello, source, runtime.handle(vm), handle)
    pool.cp.kubectl("delete", "vmim", "slow-move", "-n", NS, check=False)


def test_a_target_whose_copy_of_a_disk_is_not_the_pinned_one_gets_no_migration(
    pool: Pool, hello: str
) -> None:
    """The box init checked every disk at boot, on the source; a live-migrated guest reads
    the blocks it had not read yet from the target's copies. The other member's cache holds
    the application's disk with other bytes under its name (root there, or a cache gone
    bad): the migration fails with the reason, and the box runs on where it was, the same
    qemu, its guest counting on."""
    vmi = _wait(
        "the box's VMI Running",
        lambda: (v := _get(pool, "vmi", hello)).get("status", {}).get("phase") == "Running" and v,
        timeout=150,
    )
    source = vmi["status"]["nodeName"]
    members = json.loads(pool.cp.kubectl("get", "members", "-o", "json").stdout)["items"]
    others = [m["metadata"]["name"] for m in members if m["metadata"]["name"] != source]
    assert others
    volumes = {v["name"]: v for v in vmi["spec"]["volumes"]}
    disk = next(d for d in vmi["spec"]["domain"]["devices"]["disks"] if d.get("serial") == APP_NAME)
    image = volumes[disk["name"]]["containerDisk"]["image"]
    held = cache.member_dir(pool.dir, source) / cache.digest_hex(image)
    planted: list[Path] = []
    try:
        for member in others:
            there = cache.ensure(pool.dir, member) / held.name
            bad = bytearray(held.read_bytes())
            bad[len(bad) // 2] ^= 0xFF  # one byte in a block the guest may not have read
            there.write_bytes(bytes(bad))
            shutil.copy(held.with_name(held.name + ".json"), there.with_name(there.name + ".json"))
            planted += [there, there.with_name(there.name + ".json")]
        runtime, vm, handle = _migrate(pool, hello, "onto-other-bytes")
        failed = _failed(pool, "onto-other-bytes", timeout=90)
        reason = failed["migrationState"]["failureReason"]
        assert f"disk {APP_NAME}" in reason, reason
        assert "not migrated onto other bytes" in reason, reason
        _still_where_it_was(pool, hello, source, runtime.handle(vm), handle)
    finally:
        pool.cp.kubectl("delete", "vmim", "onto-other-bytes", "-n", NS, check=False)
        for path in planted:  # the next move fetches the genuine bytes
            path.unlink(missing_ok=True)


def test_tamper_moves_the_box_by_live_migration_without_a_reboot(pool: Pool, hello: str) -> None:
    vmi = _wait(
        "the box's VMI Running",
        lambda: (v := _get(pool, "vmi", hello)).get("status", {}).get("phase") == "Running" and v,
        timeout=150,
    )
    source = vmi["status"]["nodeName"]
    _wait("the guest counting", lambda: len(_uptimes(pool.vm_console(NS, hello))) >= 2, 30)
    before = _uptimes(pool.vm_console(NS, hello))[-1]
    pool.extend_pcr(source, 7, b"rootkit")
    moved = _wait(
        "the box live-migrated off the tampered member",
        lambda: (
            (v := _get(pool, "vmi", hello)).get("status", {}).get("nodeName") not in (None, source)
            and v
        ),
        timeout=120,
    )
    migs = json.loads(
        pool.cp.kubectl(
            "get", "vmim", "-n", NS, "-l", f"gtvp.io/evacuation={source}", "-o", "json"
        ).stdout
    )["items"]
    assert [m["status"]["phase"] for m in migs] == ["Succeeded"]
    _wait(
        "the guest counting on the target",
        lambda: _uptimes(pool.vm_console(NS, hello))[-1] > before + 2,
        30,
    )
    console = pool.vm_console(NS, hello)
    assert console.count(f"GTVP-READY {hello}") == 1  # never rebooted: one boot, one console
    after = _uptimes(console)
    assert after == sorted(after)  # the guest's clock went on across the move
    assert moved["status"]["phase"] == "Running"
    target = moved["status"]["nodeName"]
    assert f"gtvp Lazy Box {hello}" in _page(pool, target)  # it answers again, where it runs
    # gtvp asked the moved guest for a fresh quote of its vTPM (whose state moved with it)
    att = _attested_on(pool, hello, target)
    assert att["vmiUID"] == moved["metadata"]["uid"]  # the same VMI: no reboot, a new quote
    # the target's qemu reads the disks its own member fetched, never the source's files
    handle = Runtime(pool.dir).handle(vm_id(NS, hello))
    assert handle is not None
    assert handle.member == target
    argv = Path(f"/proc/{handle.process.pid}/cmdline").read_bytes().split(b"\0")
    drives = [a.decode() for a in argv if a.startswith(b"file=")]
    assert drives, argv
    assert all(f"/members/{target}/" in d for d in drives), drives


def test_a_disk_the_mirror_altered_stops_the_box_with_the_inits_reason(pool: Pool) -> None:
    """The pool's registry mirror serves other bytes for the application's image than its
    signed digest: the box init refuses the disk before mounting it, nothing of the box
    runs, and the box says why."""
    vm = _get(pool, "vm", "hello")  # the composition the operator wrote
    volumes = vm["spec"]["template"]["spec"]["volumes"]
    app_image = next(v["containerDisk"]["image"] for v in volumes if APP_NAME in v.get("name", ""))
    digest = app_image.rsplit("@sha256:", 1)[1]
    original = next(a.path for a in build_catalogue(cache_dir()).values() if a.image == app_image)
    pool.component_store.mkdir(parents=True, exist_ok=True)
    altered = bytearray(original.read_bytes())
    altered[100] ^= 0xFF  # one byte: a backdoored start script, as far as sha256 can tell
    (pool.component_store / digest).write_bytes(bytes(altered))
    _apply_box(pool, "altered", serve=False)
    try:
        failed = _wait(
            "the box Failed",
            lambda: (
                (s := _get(pool, "lazybox", "altered").get("status") or {}).get("phase") == "Failed"
                and s
            ),
            timeout=150,
        )
        assert f"gtvp-init: refused {APP_NAME}: sha256 " in failed["message"]
        assert f"!= pinned {digest}" in failed["message"]
        console = pool.vm_console(NS, "altered")
        assert "GTVP-READY" not in console  # the application never started
        assert "gtvp-uptime" not in console
    finally:
        pool.cp.kubectl("delete", "lazybox", "altered", "-n", NS, "--wait=false", check=False)
        (pool.component_store / digest).unlink(missing_ok=True)


def _resolved_app(box: dict[str, Any]) -> str | None:
    """The application version the box's status says it resolved."""
    for r in (box.get("status") or {}).get("resolved") or []:
        if r.get("name") == APP_NAME:
            return str(r.get("version"))
    return None


def _running_on(pool: Pool, name: str, version: str) -> dict[str, Any] | None:
    """The box, once it is Running with the application at `version` resolved."""
    box = _get(pool, "lazybox", name)
    ok = (box.get("status") or {}).get("phase") == "Running" and _resolved_app(box) == version
    return box if ok else None


def test_a_component_upgrade_reboots_the_box_into_the_new_composition(
    pool: Pool, hello: str, components: dict[str, dict[str, Any]]
) -> None:
    """The box (hello-web >=1.0, upgradePolicy Restart) runs 1.0.0; the publisher's signed
    1.1.0 appears: the operator recomposes the box and restarts its VMI, the guest boots the
    new composition (a reboot: its uptime starts over, unlike a migration) and says 1.1.0
    itself, on its console and its page. Last in the module: 1.1.0 would upgrade every box
    here; it is removed afterwards and the box rolls back to 1.0.0."""
    try:
        _wait("the box Running on 1.0.0", lambda: _running_on(pool, hello, APP_VERSION), 150)
        old_vmi = _wait(
            "the box's VMI Running",
            lambda: (
                (v := _get(pool, "vmi", hello)).get("status", {}).get("phase") == "Running" and v
            ),
            timeout=60,
        )
        # counting long enough that a fresh boot's count is clearly lower
        _wait(
            "the guest counting past 20 s",
            lambda: (u := _uptimes(pool.vm_console(NS, hello))) and u[-1] >= 20,
            timeout=60,
        )
    except TimeoutError as exc:
        raise AssertionError(_diagnosis(pool, hello)) from exc
    console = pool.vm_console(NS, hello)
    assert _app_says(console)[-1] == APP_VERSION
    before = _uptimes(console)[-1]
    upgrade = components[UPGRADE]
    pool.cp.kubectl("apply", "-f", "-", input_text=json.dumps(upgrade))
    try:

        def rebooted() -> tuple[dict[str, Any], str] | None:
            vmi = _get(pool, "vmi", hello)
            if vmi.get("metadata", {}).get("uid") in (None, old_vmi["metadata"]["uid"]):
                return None
            if vmi.get("status", {}).get("phase") != "Running":
                return None
            text = pool.vm_console(NS, hello)
            said = _app_says(text)
            if not said or said[-1] != APP_UPGRADE:
                return None
            after = text.rsplit(f"{APP_MARKER} {APP_NAME} {APP_UPGRADE}", 1)[1]
            return (vmi, text) if _uptimes(after) else None

        try:
            vmi, console = _wait("the guest booted into 1.1.0", rebooted, timeout=180)
            box = _wait(
                "the box Running on 1.1.0", lambda: _running_on(pool, hello, APP_UPGRADE), 60
            )
        except TimeoutError as exc:
            raise AssertionError(_diagnosis(pool, hello)) from exc
        # the guest says it runs the new version: on its console and on its page
        new_boot = console.rsplit(f"{APP_MARKER} {APP_NAME} {APP_UPGRADE}", 1)[1]
        assert f"GTVP-READY {hello} {APP_UPGRADE}" in console
        page = _page(pool, vmi["status"]["nodeName"])
        assert f"hello-web {APP_UPGRADE}" in page
        assert f"hello-web {APP_VERSION}" not in page
        # a reboot, not a migration: the guest's uptime started over
        assert _uptimes(new_boot)[0] < before, (before, _uptimes(new_boot))
        # the box records the upgrade, from what to what
        upgraded = box["status"]["upgrade"]
        assert f"{APP_NAME} {APP_VERSION}" in upgraded["from"]
        assert f"{APP_NAME} {APP_UPGRADE}" in upgraded["to"]
        assert box["status"]["node"] == vmi["status"]["nodeName"]
    finally:
        name = upgrade["metadata"]["name"]
        pool.cp.kubectl("delete", "oscomponent", name, "--wait=false", check=False)
        # 1.0.0 is the newest again: the box rolls back; leave the module as it was
        with contextlib.suppress(TimeoutError):
            _wait("the box back on 1.0.0", lambda: _running_on(pool, hello, APP_VERSION), 150)
