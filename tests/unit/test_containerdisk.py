"""containerDisk images of the guest components: the OSComponents that pin them, the disk
layer KubeVirt reads, the umoci steps, and `gtvp component build`'s argument handling."""

from __future__ import annotations

import argparse
import hashlib
import tarfile
from pathlib import Path

import pytest

from gtvp import component_cli
from gtvp.core.components import parse_component
from gtvp_local.guest.build import Artifact, component_spec
from gtvp_local.guest.containerdisk import (
    CREATED,
    QEMU_UID,
    ContainerDisk,
    ContainerDiskError,
    check_registry,
    oscomponent,
    push_command,
    umoci_steps,
    write_disk_layer,
)
from tests.unit.test_cli import run_without_gtvp_local

MANIFEST = "sha256:" + "ab" * 32
REGISTRY = "registry.example.com:5000/gtvp"


def artifact(tmp_path: Path, name: str = "hello-web", kind: str = "application") -> Artifact:
    path = tmp_path / f"{name}.squashfs"
    data = (name.encode() * 4096)[:8192]
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    return Artifact(name, "1.0.0", kind, path, sha, len(data), requires=(("busybox-base", ">=1"),))


def test_the_oscomponent_pins_the_manifest_and_the_disk(tmp_path: Path) -> None:
    a = artifact(tmp_path)
    doc = oscomponent(ContainerDisk(a, tmp_path / "hello-web", MANIFEST), REGISTRY)
    spec = doc["spec"]
    assert spec["image"] == f"{REGISTRY}/hello-web@{MANIFEST}"
    assert spec["digest"] == MANIFEST
    assert spec["diskDigest"] == a.digest != MANIFEST
    assert list(spec)[list(spec).index("digest") + 1] == "diskDigest"  # read together
    local = component_spec(a)  # everything else is what the local pool's component says
    assert {k: v for k, v in spec.items() if k not in ("image", "digest", "diskDigest")} == {
        k: v for k, v in local.items() if k not in ("image", "digest")
    }
    comp = parse_component(doc)
    assert comp.pin == a.digest
    assert comp.image.endswith("@" + comp.digest)  # the CRD's rule and the operator's check


def test_the_kernel_boot_container_has_no_disk_digest(tmp_path: Path) -> None:
    a = artifact(tmp_path, "linux", "kernel")
    spec = oscomponent(ContainerDisk(a, tmp_path / "linux", MANIFEST), REGISTRY)["spec"]
    assert "diskDigest" not in spec
    assert spec["digest"] == MANIFEST


@pytest.mark.parametrize(
    "good", ["registry.example.com/gtvp", "localhost:5000/a/b", "quay.io/org/gtvp-components/"]
)
def test_a_registry_repository_is_accepted(good: str) -> None:
    assert check_registry(good) == good.rstrip("/")


@pytest.mark.parametrize(
    "bad",
    ["", "docker://quay.io/org", "quay.io/Org", "quay.io/org:tag/x", "quay.io/org@sha256:1", "a b"],
)
def test_a_registry_that_is_not_a_repository_is_refused(bad: str) -> None:
    with pytest.raises(ContainerDiskError, match="--registry"):
        check_registry(bad)


def test_push_keeps_the_digest_and_tags_the_version(tmp_path: Path) -> None:
    disk = ContainerDisk(artifact(tmp_path), tmp_path / "out" / "hello-web", MANIFEST)
    assert push_command(disk, REGISTRY) == (
        f"skopeo copy --preserve-digests oci:{tmp_path}/out/hello-web:1.0.0 "
        f"docker://{REGISTRY}/hello-web:1.0.0"
    )


def test_the_umoci_steps_fix_every_time(tmp_path: Path) -> None:
    steps = umoci_steps(tmp_path / "l", "1.0.0", tmp_path / "layer.tar", {"b": "2", "a": "1"})
    assert [s[:3] for s in steps] == [
        ["umoci", "new", "--image"],
        ["umoci", "config", "--image"],
        ["umoci", "raw", "add-layer"],
    ]
    config, add = steps[1], steps[2]
    assert config[config.index("--created") + 1] == CREATED
    assert "--no-history" in config
    assert add[add.index("--history.created") + 1] == CREATED
    labels = [config[i + 1] for i, w in enumerate(config) if w == "--config.label"]
    assert labels == ["a=1", "b=2"]


def test_the_disk_layer_is_what_kubevirt_reads(tmp_path: Path) -> None:
    a = artifact(tmp_path)
    layer = tmp_path / "layer.tar"
    write_disk_layer(a, layer)
    with tarfile.open(layer) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == ["disk", "disk/hello-web.img"]
        disk = members["disk/hello-web.img"]
        assert (disk.uid, disk.gid, disk.mode, disk.mtime) == (QEMU_UID, QEMU_UID, 0o440, 0)
        assert members["disk"].isdir()
        assert members["disk"].uid == 0
        f = tar.extractfile(disk)
        assert f is not None
        assert hashlib.sha256(f.read()).hexdigest() == a.sha256
    again = tmp_path / "again.tar"
    write_disk_layer(a, again)
    assert again.read_bytes() == layer.read_bytes()


def test_build_wants_key_and_publisher_together(capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    component_cli.register(p)
    args = p.parse_args(["build", "--key", "k.pem"])
    assert args.func(args) == 2
    assert "--key and --publisher go together" in capsys.readouterr().err


def test_build_without_gtvp_local_says_how_to_get_it() -> None:
    """The operator's image has no gtvp-local: `gtvp component build` says so, sign and
    verify still work."""
    out = run_without_gtvp_local("component", "build")
    assert out.returncode == 2
    assert out.stderr.strip() == component_cli.BUILD_MISSING
    assert "pip install -e ./local" in out.stderr
