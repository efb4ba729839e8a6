"""The hello-web box as one monolithic VM image: the benchmarks' baseline (tests/bench).

A traditional VM ships its whole root file system as one disk. This builds that disk for
the same application the Lazy Box runs: a Debian minbase root file system (`debootstrap
--variant=minbase bookworm`, made once under `<cache>/guest/monolithic/`, root needed, with
apt's package lists and caches removed as an image build does) with the busybox-base, glibc
and hello-web components copied on top (as the box's overlay stacks them: later above
earlier, a directory that is a symlink in the tree below, usrmerge's /bin -> usr/bin, is
followed), packed as one squashfs (xz, as the components are) that gtvp's box init mounts
as the only disk. The image is cached under `<cache>/guest/monolithic/`, named by a
fingerprint of its inputs. The tree is always this one (not, say, gtvp's container image
tree), so the baseline does not depend on what else the cache holds.

`monolithic_vm` writes the VirtualMachine that boots it: the box's kernel component, one
pinned disk (`gtvp.disks=monolithic:<sha256>`), no gtvp level label (it is not a box).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gtvp.core.compose import FREED_PAGES_ZEROED
from gtvp_local.guest.build import (
    APP_NAME,
    APP_VERSION,
    IMAGE_REPO,
    Artifact,
    BuildError,
    guest_cache,
)
from gtvp_local.guest.reproducible import sha256_file, squashfs_dir

SERIAL = "monolithic"
NAME = f"{APP_NAME}-monolithic"
RECIPE = "monolithic-2"
SUITE = "bookworm"
BASE_DIR = f"debian-{SUITE}-minbase"
APT_METADATA = ("var/lib/apt/lists/*_*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb")


@dataclass(frozen=True)
class MonolithicImage:
    """The monolithic disk: its file, sha256, size, and the tree it was made from."""

    path: Path
    sha256: str
    size: int
    base: Path
    tree_bytes: int
    """The bytes of the files in the merged root file system (before compression)."""

    @property
    def image(self) -> str:
        return f"{IMAGE_REPO}/{NAME}@sha256:{self.sha256}"


def monolithic_dir(cache: Path) -> Path:
    d = guest_cache(cache) / "monolithic"
    d.mkdir(parents=True, exist_ok=True)
    return d


def cached_base(cache: Path) -> Path | None:
    """The Debian minbase tree `debootstrap_base` made, if it is complete."""
    own = monolithic_dir(cache) / BASE_DIR
    return own if (own / ".complete").is_file() else None


def debootstrap_base(cache: Path, mirror: str | None = None) -> Path:
    """A Debian minbase tree made here (root, debootstrap and the Debian mirror needed)."""
    made = cached_base(cache)
    if made is not None:
        return made
    target = monolithic_dir(cache) / BASE_DIR
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        raise BuildError("a Debian minbase tree needs debootstrap, run as root")
    shutil.rmtree(target, ignore_errors=True)
    argv = ["debootstrap", "--variant=minbase", SUITE, str(target)]
    done = subprocess.run(
        [*argv, mirror] if mirror else argv, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BuildError(f"debootstrap failed: {done.stderr.strip()[-500:]}")
    for metadata in APT_METADATA:  # what an image build removes (`apt-get clean`, lists)
        for path in sorted(target.glob(metadata)):
            path.unlink()
    (target / ".complete").touch()
    return target


def _resolve_dir(root: Path, rel: Path) -> Path:
    """`rel` inside `root`, following directory symlinks that stay inside `root`."""
    cur = root
    for part in rel.parts:
        nxt = cur / part
        if nxt.is_symlink():
            link = os.readlink(nxt)
            target = root / link.lstrip("/") if link.startswith("/") else cur / link
            nxt = Path(os.path.normpath(target))
            if root not in (nxt, *nxt.parents):
                raise BuildError(f"{rel} leaves the tree through {link}")
        cur = nxt
    return cur


def _replace(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def overlay_copy(upper: Path, lower: Path) -> None:
    """Copy the tree `upper` over `lower`, as an overlay stacks it: files and symlinks
    replace what is there, directories merge (a symlinked directory below is followed)."""
    for dirpath, dirnames, filenames in os.walk(upper):
        src_dir = Path(dirpath)
        dst_dir = _resolve_dir(lower, src_dir.relative_to(upper))
        if dst_dir.exists() and not dst_dir.is_dir():
            _replace(dst_dir)
        dst_dir.mkdir(parents=True, exist_ok=True)
        links = [d for d in dirnames if (src_dir / d).is_symlink()]
        for name in [*filenames, *links]:
            src, dst = src_dir / name, dst_dir / name
            if dst.exists() or dst.is_symlink():
                _replace(dst)
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
            else:
                shutil.copy2(src, dst)


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def build_monolithic(
    cache: Path, layers: Sequence[Artifact], *, tree: Path | None = None
) -> MonolithicImage:
    """The monolithic image of the box's disk `layers` (base first, application last) over
    a Debian minbase tree (`tree`, else the one `debootstrap_base` made or makes); built
    once per fingerprint."""
    tree = tree or debootstrap_base(cache)
    key = hashlib.sha256(
        "\0".join([RECIPE, str(tree), _made(tree), *(a.sha256 for a in layers)]).encode()
    ).hexdigest()[:16]
    out = monolithic_dir(cache) / f"{NAME}-{key}.squashfs"
    if not out.is_file():
        _build(tree, layers, out)
    return MonolithicImage(out, sha256_file(out), out.stat().st_size, tree, _merged_bytes(out))


def _made(tree: Path) -> str:
    """When the tree was completed (a remade tree is another input)."""
    done = tree / ".complete"
    return str(done.stat().st_mtime_ns) if done.is_file() else ""


def _merged_bytes(image: Path) -> int:
    """The uncompressed bytes of the files in the image (recorded beside it at build)."""
    try:
        return int(image.with_suffix(".bytes").read_text())
    except (OSError, ValueError):
        return 0


def _build(tree: Path, layers: Sequence[Artifact], out: Path) -> None:
    for tool in ("mksquashfs", "unsquashfs"):
        if shutil.which(tool) is None:
            raise BuildError(f"the monolithic image needs {tool} (squashfs-tools)")
    with tempfile.TemporaryDirectory(prefix="gtvp-mono-", dir=out.parent) as tmp:
        stage = Path(tmp) / "root"
        subprocess.run(["cp", "-a", f"{tree}/.", str(stage)], check=True)
        (stage / ".complete").unlink(missing_ok=True)
        for layer in layers:
            unpacked = Path(tmp) / layer.name
            subprocess.run(
                ["unsquashfs", "-q", "-n", "-d", str(unpacked), str(layer.path)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            overlay_copy(unpacked, stage)
        app = layers[-1].name
        if not (stage / "opt" / "gtvp" / app / "start").is_file():
            raise BuildError(f"the merged tree holds no /opt/gtvp/{app}/start")
        out.with_suffix(".bytes").write_text(str(_tree_bytes(stage)))
        squashfs_dir(stage, out, processors=None)


def monolithic_vm(
    name: str,
    kernel: Artifact,
    image: MonolithicImage,
    *,
    memory: str = "256Mi",
    node: str | None = None,
    version: str = APP_VERSION,
    vtpm: bool = False,
) -> dict[str, Any]:
    """The VirtualMachine booting the monolithic image with the box's kernel and init (one
    pinned disk); `node`: preferred, as a box's placement is (a migration may move it);
    `vtpm`: a virtual TPM as every attested box has (`domain.devices.tpm`), so the init
    measures the disk into it before mounting it, as it measures a box's disks."""
    args = (
        f"console=ttyS0 {FREED_PAGES_ZEROED} gtvp.box={name} gtvp.app={APP_NAME} "
        f"gtvp.version={version} "
        f"gtvp.disks={SERIAL}:{image.sha256}"
    )
    spec: dict[str, Any] = {
        "domain": {
            "firmware": {
                "kernelBoot": {
                    "container": {
                        "image": kernel.image,
                        "kernelPath": "/boot/vmlinuz",
                        "initrdPath": "/boot/initrd.img",
                        "imagePullPolicy": "IfNotPresent",
                    },
                    "kernelArgs": args,
                }
            },
            "devices": {
                "disks": [
                    {"name": "rootfs", "disk": {"bus": "virtio"}, "bootOrder": 1, "serial": SERIAL}
                ]
            },
            "resources": {"requests": {"cpu": "1", "memory": memory}},
        },
        "volumes": [
            {
                "name": "rootfs",
                "containerDisk": {"image": image.image, "imagePullPolicy": "IfNotPresent"},
            }
        ],
    }
    if vtpm:
        spec["domain"]["devices"]["tpm"] = {}
    if node:
        spec["affinity"] = {
            "nodeAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "preference": {
                            "matchExpressions": [
                                {
                                    "key": "kubernetes.io/hostname",
                                    "operator": "In",
                                    "values": [node],
                                }
                            ]
                        },
                    }
                ]
            }
        }
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"runStrategy": "Always", "template": {"spec": spec}},
    }
