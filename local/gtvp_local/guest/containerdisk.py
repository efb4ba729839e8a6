"""The guest components as KubeVirt containerDisk OCI images, for real clusters.

    build_layouts(catalogue, out) -> [ContainerDisk]   one OCI image layout per component
                                                       name under `out`, tagged by version
    oscomponent(disk, registry) -> the OSComponent that pins the image as a registry serves it
    run_build(args)                                    `gtvp component build` (gtvp.component_cli)

The local pool keeps the artifacts as files (`gtvp_local.guest.build`), pinned by the file's
sha256. A cluster pulls images from a registry instead, so each artifact is packaged the way
KubeVirt expects (kubevirt.io user guide, "containerDisk"; the Dockerfile it shows is
`FROM scratch` + `ADD --chown=107:107 <disk> /disk/`):

- a rootfs, library or application disk: one layer holding `/disk/<name>.img`, owned by
  107:107 (the qemu user of virt-launcher) with mode 0440, as KubeVirt's own containerdisks
  are built; the image has nothing else (`FROM scratch`);
- the kernel: a kernel-boot container (`spec.domain.firmware.kernelBoot.container`) whose one
  layer is the `linux` artifact itself (the tar with `/boot/vmlinuz` and `/boot/initrd.img`,
  root-owned, world-readable), so that layer's diff_id is the artifact's sha256.

The images are made with umoci (`init`, `new`, `config`, `raw add-layer`, `gc`), which needs
no root and no container engine, and are reproducible: the layers are written here with fixed
owners and mtimes, the image's and history's `created` are fixed, nothing of the build host
goes in, so the same artifacts give the same manifest digest on every build.

A registry pins such an image by its manifest's digest, which is not the digest of the disk
file the VM sees; so the OSComponent for it carries both: `digest` (and the image's
`@sha256:`) = the manifest's digest, which the kubelet checks when it pulls, and
`diskDigest` = the disk file's sha256, which gtvp's box init checks in the guest before it
mounts the disk. Both are signed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gtvp.core.component_signing import ComponentSignatureError, sign
from gtvp.local_state import cache_dir
from gtvp_local.guest.build import (
    IMAGE_REPO,
    Artifact,
    BuildError,
    build_catalogue,
    component_manifest,
    component_spec,
)

Say = Callable[[str], None]

CREATED = "1970-01-01T00:00:00Z"  # the image's and its history's creation time, fixed
ARCHITECTURE = "amd64"  # what the pinned Debian packages are built for, whatever builds them
QEMU_UID = 107  # virt-launcher's qemu user, who reads the disk
DISK_MODE = 0o440
DISK_DIR = "disk"
KERNEL_PATH, INITRD_PATH = "/boot/vmlinuz", "/boot/initrd.img"
HISTORY = "gtvp component build"
LABEL_PREFIX = "io.gtvp.component"
_REGISTRY = re.compile(  # host[:port] and path components, as image references spell them
    r"^[a-zA-Z0-9]([-a-zA-Z0-9.]*[a-zA-Z0-9])?(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*$"
)


class ContainerDiskError(RuntimeError):
    """An image could not be made or read back; the message says what to do."""


@dataclass(frozen=True)
class ContainerDisk:
    """One component packaged as an OCI image: in `layout`, tagged with its version."""

    artifact: Artifact
    layout: Path
    manifest_digest: str

    @property
    def tag(self) -> str:
        return self.artifact.version

    @property
    def is_kernel_boot(self) -> bool:
        return self.artifact.type == "kernel"

    @property
    def disk_path(self) -> str | None:
        """Where the disk is in the image (None for the kernel-boot container)."""
        return None if self.is_kernel_boot else disk_path(self.artifact)

    @property
    def disk_digest(self) -> str | None:
        """`sha256:<hex>` of the disk file the VM sees (None for the kernel)."""
        return None if self.is_kernel_boot else self.artifact.digest


def disk_path(a: Artifact) -> str:
    """The disk's path in a containerDisk image: `/disk/<name>.img`."""
    return f"/{DISK_DIR}/{a.name}.img"


def check_registry(registry: str) -> str:
    """`registry` as image references use it (`host[:port]/path`, no scheme, no trailing
    slash); ContainerDiskError when it is not one."""
    repo = registry.strip().rstrip("/")
    if not _REGISTRY.match(repo):
        raise ContainerDiskError(
            f"--registry {registry!r}: expected a repository like registry.example.com/gtvp "
            "(lower case, no scheme, no tag or digest)"
        )
    return repo


def image_reference(registry: str, name: str, digest: str) -> str:
    return f"{registry}/{name}@{digest}"


def oscomponent(disk: ContainerDisk, registry: str, *, level: int = 3) -> dict[str, Any]:
    """The (unsigned) OSComponent for `disk` as `registry` serves it: image and digest pin
    the manifest, `diskDigest` the disk file (the kernel has no disk, so no diskDigest)."""
    a = disk.artifact
    manifest = component_manifest(a, level=level)
    spec: dict[str, Any] = {}
    pinned = {
        "image": image_reference(registry, a.name, disk.manifest_digest),
        "digest": disk.manifest_digest,
    }
    for key, value in component_spec(a, level=level).items():
        spec[key] = pinned.get(key, value)
        if key == "digest" and disk.disk_digest is not None:
            spec["diskDigest"] = disk.disk_digest
    manifest["spec"] = spec
    return manifest


def push_command(disk: ContainerDisk, registry: str) -> str:
    """The skopeo command that copies `disk` to `registry`, keeping its manifest digest."""
    name, tag = disk.artifact.name, disk.tag
    return (
        f"skopeo copy --preserve-digests oci:{disk.layout}:{tag} docker://{registry}/{name}:{tag}"
    )


def umoci_steps(layout: Path, tag: str, layer: Path, labels: Mapping[str, str]) -> list[list[str]]:
    """The umoci commands that add the image `tag` (one layer, the tar `layer`) to an
    initialised `layout`; every field that would hold the time is fixed."""
    image = f"{layout}:{tag}"
    config = ["umoci", "config", "--image", image, "--no-history", "--created", CREATED]
    config += ["--architecture", ARCHITECTURE, "--os", "linux"]
    for key, value in sorted(labels.items()):
        config += ["--config.label", f"{key}={value}"]
    add = ["umoci", "raw", "add-layer", "--image", image]
    add += ["--history.created", CREATED, f"--history.created_by={HISTORY}", str(layer)]
    return [["umoci", "new", "--image", image], config, add]


def labels_for(a: Artifact) -> dict[str, str]:
    out = {f"{LABEL_PREFIX}.name": a.name, f"{LABEL_PREFIX}.version": a.version}
    out[f"{LABEL_PREFIX}.type"] = a.type
    if a.type != "kernel":
        out[f"{LABEL_PREFIX}.disk-digest"] = a.digest
    return out


def write_disk_layer(a: Artifact, dest: Path, disk: Path | None = None) -> None:
    """The containerDisk layer of `a` at `dest`: `disk/` (root, 0755) and
    `disk/<name>.img` (107:107, 0440) with the bytes of `disk` (default: the artifact's
    file), mtime 0, uncompressed."""
    disk = disk or a.path
    with tarfile.open(dest, "w", format=tarfile.GNU_FORMAT) as tar:
        d = tarfile.TarInfo(DISK_DIR)
        d.type, d.mode, d.mtime, d.uname, d.gname = tarfile.DIRTYPE, 0o755, 0, "root", "root"
        tar.addfile(d)
        f = tarfile.TarInfo(disk_path(a).lstrip("/"))
        f.size, f.mode, f.mtime = disk.stat().st_size, DISK_MODE, 0
        f.uid = f.gid = QEMU_UID
        f.uname = f.gname = ""
        with disk.open("rb") as src:
            tar.addfile(f, src)


def frozen_copy(a: Artifact, work: Path) -> Path:
    """A private copy of `a`'s file, checked against the sha256 the build recorded: the
    image holds exactly the bytes its OSComponent pins, even if the shared cache's file is
    rebuilt meanwhile."""
    copy = work / f"{a.name}-{a.version}{a.path.suffix}"
    h = hashlib.sha256()
    with a.path.open("rb") as src, copy.open("wb") as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            h.update(chunk)
            dst.write(chunk)
    if h.hexdigest() != a.sha256:
        raise ContainerDiskError(
            f"{a.path} changed since it was built (sha256 {h.hexdigest()}, built {a.sha256}): "
            "another build rewrote it; run the build again"
        )
    return copy


def _umoci(cmd: Sequence[str]) -> None:
    out = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise ContainerDiskError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")


def check_tools() -> None:
    if shutil.which("umoci") is None:
        raise ContainerDiskError(
            "umoci not found: install Debian's umoci package (.ci/setup-machine does)"
        )


def read_image(layout: Path, tag: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(manifest digest, manifest, config) of `tag` in an OCI layout; every blob read is
    checked against its digest."""

    def blob(digest: str) -> bytes:
        algo, _, hexd = digest.partition(":")
        data = (layout / "blobs" / algo / hexd).read_bytes()
        if f"{algo}:{hashlib.new(algo, data).hexdigest()}" != digest:
            raise ContainerDiskError(f"{layout}: blob {digest} does not match its digest")
        return data

    index = json.loads((layout / "index.json").read_text())
    for desc in index.get("manifests") or []:
        if (desc.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag:
            manifest = json.loads(blob(desc["digest"]))
            config = json.loads(blob(manifest["config"]["digest"]))
            return str(desc["digest"]), manifest, config
    raise ContainerDiskError(f"{layout} has no image tagged {tag}")


def _pack_name(
    name: str, artifacts: Sequence[Artifact], out: Path, say: Say
) -> list[ContainerDisk]:
    """One layout, `out/<name>`, with an image per version; replaces an older layout."""
    final = out / name
    if final.exists() and not (final / "oci-layout").is_file():
        raise ContainerDiskError(f"{final} exists and is not an OCI layout: choose another --out")
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=out) as tmp:
        layout, work = Path(tmp) / "layout", Path(tmp) / "work"
        work.mkdir()
        _umoci(["umoci", "init", "--layout", str(layout)])
        for a in artifacts:
            say(f"  {a.key}: {'kernel-boot container' if a.type == 'kernel' else disk_path(a)}")
            frozen = frozen_copy(a, work)
            if a.type == "kernel":
                layer = frozen  # the artifact is the layer: /boot/vmlinuz, /boot/initrd.img
            else:
                layer = work / f"{a.name}-{a.version}.layer.tar"
                write_disk_layer(a, layer, frozen)
            for step in umoci_steps(layout, a.version, layer, labels_for(a)):
                _umoci(step)
        _umoci(["umoci", "gc", "--layout", str(layout)])
        digests = {a.version: read_image(layout, a.version)[0] for a in artifacts}
        old = out / f".{name}-old-{os.getpid()}"
        if final.exists():
            final.rename(old)
        layout.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    return [ContainerDisk(a, final, digests[a.version]) for a in artifacts]


def build_layouts(
    catalogue: Mapping[str, Artifact], out: Path, *, say: Say = lambda _m: None
) -> list[ContainerDisk]:
    """Every artifact of the catalogue as an OCI image under `out` (`out/<name>`, tagged
    with the version), in catalogue order."""
    check_tools()
    out.mkdir(parents=True, exist_ok=True)
    by_name: dict[str, list[Artifact]] = {}
    for a in catalogue.values():
        by_name.setdefault(a.name, []).append(a)
    built: dict[str, ContainerDisk] = {}
    for name, artifacts in by_name.items():
        for disk in _pack_name(name, artifacts, out, say):
            built[disk.artifact.key] = disk
    return [built[a.key] for a in catalogue.values()]


def default_out() -> Path:
    return cache_dir() / "guest" / "containerdisks"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_build(args: argparse.Namespace) -> int:
    """`gtvp component build`: build, package, print the OSComponents, say how to push."""
    try:
        registry = check_registry(args.registry or IMAGE_REPO)
        key = Path(args.key).read_bytes() if args.key else None
        out = Path(args.out).resolve() if args.out else default_out()
        check_tools()  # before the long build, not after it
        _say("building the components (the first build downloads the pinned Debian packages)")
        catalogue = build_catalogue(cache_dir())
        _say(f"packaging them as containerDisk images (OCI layouts under {out})")
        disks = build_layouts(catalogue, out, say=_say)
        docs = []
        for disk in disks:
            doc = oscomponent(disk, registry, level=args.level)
            if key is not None:
                doc["spec"]["signature"] = sign(doc["spec"], key, args.publisher)
            docs.append(doc)
    except OSError as exc:
        print(f"gtvp component build: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except (BuildError, ContainerDiskError, ComponentSignatureError) as exc:
        print(f"gtvp component build: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    _say(f"push them to {registry} (skopeo keeps each manifest's digest, which they pin):")
    for disk in disks:
        _say(f"  {push_command(disk, registry)}")
    if key is None:
        _say("the manifests are unsigned: sign them with gtvp component sign FILE --key ...")
    _say("then kubectl apply -f the manifests; boxes compose from them once they are Verified")
    return 0
