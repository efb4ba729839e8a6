"""Reproducible guest artifacts: same inputs → same bytes → same sha256."""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from gtvp.core.component_signing import ComponentSignatureError, sign, verify
from gtvp_local.guest import build
from gtvp_local.guest.reproducible import (
    Tree,
    cpio_newc,
    gzip_fixed,
    sha256_file,
    squashfs,
    tar_fixed,
)
from tests.catalogue import Publisher


def sample_tree(reverse: bool = False) -> Tree:
    items = [
        ("bin/busybox", b"\x7fELF fake", 0o755),
        ("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644),
        ("opt/gtvp/app/start", b"#!/bin/sh\nexit 0\n", 0o755),
    ]
    tree = Tree()
    for path, data, mode in reversed(items) if reverse else items:
        tree.file(path, data, mode)
    tree.symlink("bin/sh", "busybox")
    tree.dir("tmp", 0o1777)
    return tree


def parse_cpio(data: bytes) -> list[tuple[str, int, int, bytes]]:
    """(name, mode, mtime, content) of every entry of a newc archive."""
    out: list[tuple[str, int, int, bytes]] = []
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        body = name_start + namesize + (-(110 + namesize) % 4)
        content = data[body : body + filesize]
        if name == "TRAILER!!!":
            return out
        assert f[2] == f[3] == 0  # uid, gid
        out.append((name, f[1], f[5], content))
        pos = body + filesize + (-filesize % 4)


def test_cpio_is_the_same_whatever_the_insertion_order() -> None:
    a, b = cpio_newc(sample_tree()), cpio_newc(sample_tree(reverse=True))
    assert a == b
    entries = parse_cpio(a)
    names = [n for n, *_ in entries]
    assert names == sorted(names)
    assert {mtime for _, _, mtime, _ in entries} == {0}
    start = next(e for e in entries if e[0] == "opt/gtvp/app/start")
    assert start[1] == 0o100755
    assert start[3] == b"#!/bin/sh\nexit 0\n"
    assert "opt/gtvp" in names  # parents are declared too


def test_cpio_holds_device_nodes_without_root() -> None:
    tree = Tree()
    tree.chardev("dev/console", 5, 1)
    data = cpio_newc(tree)
    assert parse_cpio(data)[1][1] == 0o020600
    assert b"00000005" + b"00000001" in data  # rdevmajor, rdevminor


def test_gzip_and_tar_are_fixed() -> None:
    data = cpio_newc(sample_tree())
    assert gzip_fixed(data) == gzip_fixed(data)
    assert gzip.decompress(gzip_fixed(data)) == data
    files = {"boot/vmlinuz": b"kernel", "boot/initrd.img": b"initrd"}
    t = tar_fixed(files)
    assert t == tar_fixed(dict(reversed(files.items())))
    with tarfile.open(fileobj=io.BytesIO(t)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["boot", "boot/initrd.img", "boot/vmlinuz"]
        assert {m.mtime for m in members} == {0}


@pytest.mark.skipif(
    shutil.which("mksquashfs") is None and not os.environ.get("CI"),
    reason="mksquashfs (squashfs-tools) is not installed",
)
def test_squashfs_twice_gives_the_same_digest(tmp_path: Path) -> None:
    old = os.umask(0o077)  # a different umask must not leak into the image
    try:
        squashfs(sample_tree(), tmp_path / "a.sqfs")
    finally:
        os.umask(old)
    squashfs(sample_tree(reverse=True), tmp_path / "b.sqfs")
    assert sha256_file(tmp_path / "a.sqfs") == sha256_file(tmp_path / "b.sqfs")
    assert (tmp_path / "a.sqfs").stat().st_size % 4096 == 0
    other = sample_tree()
    other.file("etc/passwd", b"changed\n")
    squashfs(other, tmp_path / "c.sqfs")
    assert sha256_file(tmp_path / "c.sqfs") != sha256_file(tmp_path / "a.sqfs")


# -- the build's pure parts -----------------------------------------------------------------


def fake_module(depends: str) -> bytes:
    return b"\x7fELF....\0license=GPL\0depends=" + depends.encode() + b"\0vermagic=6.1\0"


def test_modules_come_with_their_dependencies_in_load_order(tmp_path: Path) -> None:
    kdir = tmp_path / "lib" / "modules" / "6.1.0-test" / "kernel"
    mods = {
        "drivers/virtio/virtio_ring.ko": fake_module(""),
        "drivers/virtio/virtio.ko": fake_module("virtio_ring"),
        "drivers/virtio/virtio_pci.ko": fake_module("virtio_ring,virtio"),
        "drivers/block/virtio_blk.ko": fake_module("virtio,virtio_ring"),
        "drivers/net/virtio_net.ko": fake_module("virtio_ring,virtio,net_failover"),
        "drivers/net/net_failover.ko": fake_module("failover"),
        "net/core/failover.ko": fake_module(""),
        "fs/overlayfs/overlay.ko": fake_module(""),
        "drivers/virtio/virtio_balloon.ko": fake_module("virtio"),  # not wanted
    }
    for rel, data in mods.items():
        (kdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (kdir / rel).write_bytes(data)
    (kdir / "fs/squashfs").mkdir(parents=True)
    (kdir / "fs/squashfs/squashfs.ko.xz").write_bytes(lzma.compress(fake_module("")))
    order = [name for name, _ in build.kernel_modules(tmp_path)]
    assert order == [
        "virtio_ring", "virtio", "virtio_pci", "virtio_blk", "failover", "net_failover",
        "virtio_net", "squashfs", "overlay",
    ]  # fmt: skip
    loaded = dict(build.kernel_modules(tmp_path))
    assert loaded["squashfs"] == fake_module("")  # decompressed at build time


def test_component_version_reads_debian_versions() -> None:
    assert build.component_version("6.1.192-3") == "6.1.192"
    assert build.component_version("6.12.5-1~bpo12+1") == "6.12.5"


def test_app_tree_names_its_start_and_counter() -> None:
    entries = build.app_tree().entries
    assert entries["opt/gtvp/hello-web/start"].mode == 0o755
    assert b"httpd -p 8080" in entries["opt/gtvp/hello-web/start"].data
    assert b"gtvp-uptime" in entries["opt/gtvp/hello-web/uptime"].data


def test_the_app_versions_differ_only_in_their_version_file() -> None:
    old, new = build.app_tree(build.APP_VERSION).entries, build.app_tree(build.APP_UPGRADE).entries
    assert old.keys() == new.keys()
    differ = sorted(k for k in old if old[k] != new[k])
    assert differ == ["opt/gtvp/hello-web/VERSION"]
    assert new["opt/gtvp/hello-web/VERSION"].data == b"1.1.0\n"
    start = new["opt/gtvp/hello-web/start"].data
    # the application says its own version on the console, read from its VERSION file
    assert b'read -r version <"$here/VERSION"' in start
    assert b'echo "gtvp-app hello-web $version" >/dev/console' in start
    assert b"hello-web $version on" in start  # and on its page


def test_both_app_versions_squash_to_distinct_reproducible_images(tmp_path: Path) -> None:
    if shutil.which("mksquashfs") is None:
        pytest.skip("mksquashfs is not installed")
    digests = {}
    for version in build.APP_VERSIONS:
        a, b = tmp_path / f"{version}-a.sqfs", tmp_path / f"{version}-b.sqfs"
        squashfs(build.app_tree(version), a)
        squashfs(build.app_tree(version), b)
        assert sha256_file(a) == sha256_file(b)
        digests[version] = sha256_file(a)
    assert len(set(digests.values())) == 2


def _art(name: str, version: str, kind: str = "application") -> build.Artifact:
    return build.Artifact(name, version, kind, Path(f"/{name}-{version}"), "0" * 64, 1)


def test_composition_takes_the_newest_of_each_component_unless_told() -> None:
    arts = [
        _art("linux", "6.1.192", "kernel"),
        _art("hello-web", "1.10.0"),
        _art("hello-web", "1.9.0"),
        _art("busybox-base", "1.0.0", "rootfs"),
    ]
    catalogue = {a.key: a for a in arts}
    assert list(catalogue) == ["linux@6.1.192", "hello-web@1.10.0", "hello-web@1.9.0",
                               "busybox-base@1.0.0"]  # fmt: skip
    chosen = build.composition(catalogue)
    assert [a.key for a in chosen] == ["linux@6.1.192", "hello-web@1.10.0", "busybox-base@1.0.0"]
    older = build.composition(catalogue, {"hello-web": "1.9.0"})
    assert [a.key for a in older] == ["linux@6.1.192", "hello-web@1.9.0", "busybox-base@1.0.0"]
    with pytest.raises(build.BuildError, match=r"holds no hello-web 2\.0\.0"):
        build.composition(catalogue, {"hello-web": "2.0.0"})


def test_a_built_artifact_is_signable_and_its_digest_is_covered(tmp_path: Path) -> None:
    path = tmp_path / "app.squashfs"
    path.write_bytes(b"\0" * 4096)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    art = build.Artifact("hello-web", "1.0.0", "application", path, digest, 4096)
    pub = Publisher()
    spec = build.component_spec(art)
    assert spec["image"].endswith("@sha256:" + digest)
    assert spec["digest"] == "sha256:" + digest
    spec["signature"] = sign(spec, pub.private_pem, pub.name)
    verify(spec, pub.keys)
    spec["digest"] = "sha256:" + "0" * 64
    with pytest.raises(ComponentSignatureError, match="BadSignature"):
        verify(spec, pub.keys)
