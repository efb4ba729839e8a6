"""A composed Lazy Box really boots: real components under qemu (TCG unless KVM works).

The components are built reproducibly from this machine's Debian packages (the cloud
kernel is downloaded once into `<cache>/guest`); the VM is what the operator composes for
the box, translated to qemu as virt-launcher would (the newest hello-web, 1.1.0; the
tampered box runs 1.0.0). One VM at a time, 256 MiB, 1 vCPU.
Skipped when qemu, busybox-static, squashfs-tools or the kernel package are unavailable,
except under CI, where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import pytest

from gtvp.core.component_signing import sign
from gtvp.local_state import cache_dir
from gtvp_local.controlplane import ControlPlane
from gtvp_local.guest.box import compose_box, resolver
from gtvp_local.guest.build import (
    APP_MARKER,
    APP_NAME,
    APP_UPGRADE,
    APP_VERSION,
    LIB_NAME,
    Artifact,
    BuildError,
    build_catalogue,
    component_manifest,
    guest_cache,
)
from gtvp_local.guest.initscript import READY_MARKER, REFUSED_MARKER
from gtvp_local.guest.qemu import QEMU, Boot, QemuOptions, probe_accel, qemu_argv
from tests.catalogue import Publisher
from tests.prerequisites import unavailable

TOOLS = (QEMU, "busybox", "mksquashfs", "dpkg-deb", "apt-get")
BOOT_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def catalogue() -> dict[str, Artifact]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        unavailable(
            f"booting a box needs {', '.join(missing)} "
            "(Debian: qemu-system-x86, busybox-static, squashfs-tools)"
        )
    try:
        return build_catalogue(cache_dir())
    except BuildError as exc:
        unavailable(f"cannot build the guest components: {exc}")


@pytest.fixture(scope="module")
def accel(catalogue: Mapping[str, Artifact]) -> str:
    return probe_accel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, deadline_s: float) -> str:
    end = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3) as r:
                return str(r.read().decode())
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


def uptimes(console: str) -> list[int]:
    return [int(n) for n in re.findall(r"^gtvp-uptime (\d+)\s*$", console, re.M)]


def test_rebuilding_gives_the_same_digests(
    catalogue: Mapping[str, Artifact], tmp_path: Path
) -> None:
    debs = tmp_path / "guest" / "debs"
    debs.mkdir(parents=True)
    for deb in (guest_cache(cache_dir()) / "debs").glob("*.deb"):
        os.link(deb, debs / deb.name) if deb.stat().st_dev == debs.stat().st_dev else shutil.copy(
            deb, debs
        )
    again = build_catalogue(tmp_path)
    assert {n: a.sha256 for n, a in again.items()} == {n: a.sha256 for n, a in catalogue.items()}


def test_the_composed_box_boots_serves_and_counts(
    catalogue: Mapping[str, Artifact], accel: str, tmp_path: Path
) -> None:
    port = free_port()
    console = tmp_path / "console.log"
    vm = compose_box(catalogue, box="hello", memory="256Mi")
    argv = qemu_argv(
        vm, resolver(catalogue), QemuOptions(console=console, accel=accel, hostfwd=[(port, 8080)])
    )
    with Boot(argv, console) as boot:
        ready = boot.wait_for(f"{READY_MARKER} hello {APP_UPGRADE}", BOOT_TIMEOUT_S)
        assert ready is not None, (
            f"no {READY_MARKER} within {BOOT_TIMEOUT_S}s ({accel}):\n"
            f"{boot.text()[-3000:]}\n{boot.qemu_output()}"
        )
        print(f"{READY_MARKER} after {ready:.1f}s under {accel}")
        page = http_get(port, 20)
        assert "gtvp Lazy Box hello" in page
        assert f"hello-web {APP_UPGRADE}" in page
        # a program of the library layer, linked against that layer's C library, ran
        lib = next(a for a in catalogue.values() if a.name == LIB_NAME)
        assert f"with glibc {lib.version}" in page
        end = time.monotonic() + 15
        while time.monotonic() < end and len(uptimes(boot.text())) < 3:
            time.sleep(0.5)
        counted = uptimes(boot.text())
        assert len(counted) >= 3, counted
        assert counted == sorted(counted), counted  # one boot: the uptime only grows
        assert counted[-1] > counted[0], counted
        text = boot.text()
    assert f"{APP_MARKER} {APP_NAME} {APP_UPGRADE}" in text  # the application, in its words
    assert f"{APP_MARKER}-lib glibc {lib.version}" in text
    for serial in ("busybox-base", LIB_NAME, "hello-web"):
        assert f"gtvp-init: verified and mounted {serial}" in text
    assert REFUSED_MARKER not in text


def test_a_disk_that_differs_from_its_pin_is_refused(
    catalogue: Mapping[str, Artifact], accel: str, tmp_path: Path
) -> None:
    app = catalogue[f"{APP_NAME}@{APP_VERSION}"]
    tampered = tmp_path / "hello-web.squashfs"
    data = bytearray(app.path.read_bytes())
    data[100] ^= 0xFF
    tampered.write_bytes(bytes(data))
    console = tmp_path / "console.log"
    vm = compose_box(catalogue, box="tampered", memory="256Mi", app_version=APP_VERSION)
    argv = qemu_argv(
        vm, resolver(catalogue, {app.image: tampered}), QemuOptions(console=console, accel=accel)
    )
    with Boot(argv, console) as boot:
        refused = boot.wait_for(f"{REFUSED_MARKER} hello-web: sha256 ", BOOT_TIMEOUT_S)
        assert refused is not None, boot.text()[-3000:]
        exit_code = boot.wait_exit(20)  # the init powers the box off
        text = boot.text()
    assert exit_code is not None, "the refused box kept running"
    assert f"!= pinned {app.sha256}" in text
    assert "gtvp-init: verified and mounted busybox-base" in text  # the base was fine
    assert READY_MARKER not in text
    assert "gtvp-uptime" not in text


@pytest.mark.controlplane
def test_the_real_components_and_their_box_pass_the_crds_strictly(
    catalogue: Mapping[str, Artifact], control_plane: ControlPlane, namespace: str
) -> None:
    pub = Publisher()
    for a in catalogue.values():
        obj = component_manifest(a)
        obj["metadata"]["name"] = f"{namespace}-{obj['metadata']['name']}"  # cluster-scoped
        obj["spec"]["signature"] = sign(obj["spec"], pub.private_pem, pub.name)
        out = control_plane.kubectl(
            "create", "--validate=strict", "-f", "-", input_text=json.dumps(obj), check=False
        )
        assert out.returncode == 0, (a.name, out.stderr)
        control_plane.kubectl("delete", "osc", obj["metadata"]["name"], check=False)
    vm = compose_box(catalogue, box="hello")
    vm["metadata"]["namespace"] = namespace
    out = control_plane.kubectl(
        "create", "--validate=strict", "-f", "-", input_text=json.dumps(vm), check=False
    )
    assert out.returncode == 0, out.stderr
