"""`gtvp component build`: the real guest components as KubeVirt containerDisk OCI images.

Real: the reproducible build from the pinned Debian packages, umoci (init, new, config, raw
add-layer, gc, stat, unpack), the `gtvp` command line, the OSComponent CRD on the real API
server (which keeps `diskDigest` through its schema, so the signature still verifies), and
compose on what the server returns. Booting such a box needs KubeVirt and a registry, which
this machine does not run; the box init's check of the pinned sha256 is tested with the
local pool's boots (tests/integration/test_guest_boot.py).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from gtvp.core.component_checks import check_component
from gtvp.core.components import parse_component
from gtvp.core.compose import BoxRef, compose_vm
from gtvp.core.resolve import BoxRequest, resolve
from gtvp.local_state import cache_dir
from gtvp_local.controlplane import ControlPlane
from gtvp_local.guest.build import Artifact, BuildError, build_catalogue
from gtvp_local.guest.containerdisk import (
    QEMU_UID,
    ContainerDisk,
    build_layouts,
    disk_path,
    read_image,
)
from gtvp_local.guest.samples import DEMO_KEY, DEMO_PUBLISHER
from gtvp_local.pool import sample_publisher_keys
from tests.prerequisites import unavailable

REGISTRY = "registry.example.com/gtvp"


@pytest.fixture(scope="module")
def catalogue() -> dict[str, Artifact]:
    tools = ("apt-get", "dpkg-deb", "mksquashfs", "umoci")
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        unavailable(f"the containerDisk build needs {', '.join(missing)} (make setup)")
    try:
        return build_catalogue(cache_dir())
    except BuildError as exc:
        unavailable(f"cannot build the guest components: {exc}")


@pytest.fixture(scope="module")
def disks(
    catalogue: dict[str, Artifact], tmp_path_factory: pytest.TempPathFactory
) -> list[ContainerDisk]:
    return build_layouts(catalogue, tmp_path_factory.mktemp("oci"))


def layer_tar(disk: ContainerDisk) -> tuple[bytes, dict[str, Any]]:
    """The image's one layer, uncompressed, and its config."""
    _, manifest, config = read_image(disk.layout, disk.tag)
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    algo, _, hexd = layer["digest"].partition(":")
    return gzip.decompress((disk.layout / "blobs" / algo / hexd).read_bytes()), config


def test_every_component_is_an_image_tagged_by_its_version(
    disks: list[ContainerDisk], catalogue: dict[str, Artifact]
) -> None:
    assert [d.artifact.key for d in disks] == list(catalogue)
    assert {d.layout.name for d in disks} == {a.name for a in catalogue.values()}
    for d in disks:
        stat = subprocess.run(
            ["umoci", "stat", "--json", "--image", f"{d.layout}:{d.tag}"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        (entry,) = json.loads(stat.stdout)["history"]
        assert entry["created"] == "1970-01-01T00:00:00Z"
        digest, _, config = read_image(d.layout, d.tag)  # checks every blob's digest
        assert digest == d.manifest_digest
        assert (config["architecture"], config["os"]) == ("amd64", "linux")


def test_each_disk_image_holds_exactly_the_artifact_where_kubevirt_looks(
    disks: list[ContainerDisk],
) -> None:
    for d in (d for d in disks if not d.is_kernel_boot):
        data, config = layer_tar(d)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            files = [m for m in tar.getmembers() if m.isfile()]
            assert [m.name for m in files] == [disk_path(d.artifact).lstrip("/")]
            (m,) = files
            assert (m.uid, m.gid, m.mode) == (QEMU_UID, QEMU_UID, 0o440)
            f = tar.extractfile(m)
            assert f is not None
            assert "sha256:" + hashlib.sha256(f.read()).hexdigest() == d.disk_digest
        assert d.disk_digest == d.artifact.digest
        assert config["config"]["Labels"]["io.gtvp.component.disk-digest"] == d.disk_digest


def test_the_kernel_image_is_the_kernel_artifact(disks: list[ContainerDisk]) -> None:
    """The kernel-boot container's layer is the `linux` tar itself (its diff_id is the
    artifact's sha256), with the kernel and initrd where compose's kernelBoot points."""
    (k,) = [d for d in disks if d.is_kernel_boot]
    data, config = layer_tar(k)
    assert config["rootfs"]["diff_ids"] == [k.artifact.digest]
    assert hashlib.sha256(data).hexdigest() == k.artifact.sha256
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
    assert names == {"boot/vmlinuz", "boot/initrd.img"}
    assert k.disk_digest is None


def test_umoci_unpacks_the_disk_a_runtime_would_mount(
    disks: list[ContainerDisk], tmp_path: Path
) -> None:
    app = next(d for d in disks if d.artifact.type == "application")
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{app.layout}:{app.tag}", str(bundle)],
        capture_output=True, check=True,
    )  # fmt: skip
    unpacked = bundle / "rootfs" / disk_path(app.artifact).lstrip("/")
    assert hashlib.sha256(unpacked.read_bytes()).hexdigest() == app.artifact.sha256


def test_the_build_is_reproducible(
    disks: list[ContainerDisk], catalogue: dict[str, Artifact], tmp_path: Path
) -> None:
    again = build_layouts(catalogue, tmp_path / "again")
    assert [d.manifest_digest for d in again] == [d.manifest_digest for d in disks]
    first = {p.name for d in disks for p in (d.layout / "blobs" / "sha256").iterdir()}
    second = {p.name for d in again for p in (d.layout / "blobs" / "sha256").iterdir()}
    assert first == second
    # building into a directory that already holds the layouts replaces them
    over = build_layouts(catalogue, tmp_path / "again")
    assert [d.manifest_digest for d in over] == [d.manifest_digest for d in disks]
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(
        {d.layout.name for d in disks}
    )


def run_gtvp(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gtvp.cli", *argv],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cli_build(
    catalogue: dict[str, Artifact], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("cli") / "oci"
    run = run_gtvp(
        "component", "build", "--out", str(out), "--registry", REGISTRY,
        "--key", str(DEMO_KEY), "--publisher", DEMO_PUBLISHER,
    )  # fmt: skip
    return out, run


def test_gtvp_component_build_prints_signed_manifests_and_how_to_push(
    cli_build: tuple[Path, subprocess.CompletedProcess[str]],
    catalogue: dict[str, Artifact],
    disks: list[ContainerDisk],
) -> None:
    out, run = cli_build
    assert run.returncode == 0, run.stderr
    docs = [d for d in yaml.safe_load_all(run.stdout) if d]
    assert [(d["spec"]["componentName"], d["spec"]["version"]) for d in docs] == [
        (a.name, a.version) for a in catalogue.values()
    ]
    manifests = {d.artifact.key: d.manifest_digest for d in disks}
    keys = sample_publisher_keys()
    for doc, a in zip(docs, catalogue.values(), strict=True):
        spec = doc["spec"]
        assert check_component(doc, keys).ok, doc["metadata"]["name"]
        assert spec["digest"] == manifests[a.key]  # the same bytes as the other build
        assert spec["image"] == f"{REGISTRY}/{a.name}@{spec['digest']}"
        assert spec.get("diskDigest") == (None if a.type == "kernel" else a.digest)
        assert read_image(out / a.name, a.version)[0] == spec["digest"]
        push = f"skopeo copy --preserve-digests oci:{out}/{a.name}:{a.version} "
        assert push + f"docker://{REGISTRY}/{a.name}:{a.version}" in run.stderr
    verify = subprocess.run(
        [sys.executable, "-m", "gtvp.cli", "component", "verify", "-", "--policy",
         str(Path(__file__).parents[2] / "crds" / "samples" / "securitypolicy.yaml")],
        input=run.stdout, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout


@pytest.mark.controlplane
def test_a_box_of_registry_components_pins_the_disk_files(
    control_plane: ControlPlane,
    cluster_names: list[str],
    cli_build: tuple[Path, subprocess.CompletedProcess[str]],
    catalogue: dict[str, Artifact],
) -> None:
    """The API server takes the manifests as built (diskDigest in its schema: not pruned,
    so the signature still verifies) and the VM composed from them pins each disk file's
    sha256 for the box init, while pulling each image by its manifest digest."""
    _, run = cli_build
    assert run.returncode == 0, run.stderr
    docs = [d for d in yaml.safe_load_all(run.stdout) if d]
    suffix = os.urandom(3).hex()
    for doc in docs:
        doc["metadata"]["name"] += f"-{suffix}"
        control_plane.kubectl("create", "-f", "-", input_text=json.dumps(doc))
        cluster_names.append(f"oscomponent/{doc['metadata']['name']}")
    stored = [
        json.loads(
            control_plane.kubectl("get", "oscomponent", d["metadata"]["name"], "-o", "json").stdout
        )
        for d in docs
    ]
    keys = sample_publisher_keys()
    assert all(check_component(o, keys).ok for o in stored)
    comps = [parse_component(o) for o in stored]
    spec: Mapping[str, Any] = {
        "application": {"name": "hello-web", "versions": "==1.0.0"},
        "level": 3,
        "resources": {"cpu": "250m", "memory": "128Mi"},
    }
    chosen = resolve(BoxRequest.from_spec(spec), comps)
    vm = compose_vm(BoxRef("hello", "apps", "uid-1"), spec, chosen, None)
    template = vm["spec"]["template"]["spec"]
    args = template["domain"]["firmware"]["kernelBoot"]["kernelArgs"].split()
    disks_word = next(w for w in args if w.startswith("gtvp.disks="))
    base = catalogue["busybox-base@1.0.0"]
    lib = next(a for a in catalogue.values() if a.name == "glibc")
    app = catalogue["hello-web@1.0.0"]
    pins = f"busybox-base:{base.sha256},glibc:{lib.sha256},hello-web:{app.sha256}"
    assert disks_word == f"gtvp.disks={pins}"  # base, the library layer, the application
    images = [v["containerDisk"]["image"] for v in template["volumes"] if "containerDisk" in v]
    by_name = {c.name: c for c in chosen}
    assert images == [by_name[n].image for n in ("busybox-base", "glibc", "hello-web")]
    assert all(a.sha256 not in i for a in (base, lib, app) for i in images)


@pytest.mark.controlplane
@pytest.mark.parametrize(
    ("value", "accepted"),
    [("sha256:" + "0" * 64, True), ("sha256:abc", False), ("0" * 64, False)],
)
def test_the_crd_checks_disk_digest(
    control_plane: ControlPlane, cluster_names: list[str], value: str, accepted: bool
) -> None:
    sample = next(
        d
        for d in yaml.safe_load_all(
            (Path(__file__).parents[2] / "crds" / "samples" / "oscomponents.yaml").read_text()
        )
        if d and d["spec"]["type"] == "application"
    )
    sample["metadata"] = {"name": f"disk-digest-{os.urandom(3).hex()}"}
    sample["spec"]["diskDigest"] = value
    out = control_plane.kubectl("create", "-f", "-", input_text=json.dumps(sample), check=False)
    if out.returncode == 0:
        cluster_names.append(f"oscomponent/{sample['metadata']['name']}")
    assert (out.returncode == 0) is accepted, out.stderr
    if not accepted:
        assert "spec.diskDigest" in out.stderr
