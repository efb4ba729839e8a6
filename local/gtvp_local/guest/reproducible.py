"""Reproducible archives: same inputs → same bytes → same sha256.

A `Tree` is a declared file system (paths → file, directory, symlink or device node, with
modes), never read back from disk with its owners and timestamps. It is written as a cpio
(newc, the initramfs format), a squashfs (mksquashfs with fixed times, sorted, all files
root-owned) or a tar (the layer of a KubeVirt kernel-boot container): every entry has mtime 0,
uid/gid 0 and is written in sorted order.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SQUASHFS_ALIGN = 4096  # a virtio disk's size is whole sectors; mksquashfs pads to 4 KiB


@dataclass(frozen=True)
class Entry:
    kind: str  # "file", "dir", "symlink", "chardev"
    mode: int
    data: bytes = b""  # file content, or the symlink's target
    rdev: tuple[int, int] = (0, 0)


@dataclass
class Tree:
    """A file system to archive: relative POSIX paths (no leading /) → entries."""

    entries: dict[str, Entry] = field(default_factory=dict)

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.entries:
                self.entries[d] = Entry("dir", 0o755)

    def dir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = Entry("dir", mode)

    def file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = Entry("file", mode, data.encode() if isinstance(data, str) else data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = Entry("symlink", 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = Entry("chardev", mode, rdev=(major, minor))

    def sorted_items(self) -> list[tuple[str, Entry]]:
        return sorted(self.entries.items())


_CPIO_TYPE = {"file": 0o100000, "dir": 0o040000, "symlink": 0o120000, "chardev": 0o020000}


def cpio_newc(tree: Tree) -> bytes:
    """The tree as an uncompressed cpio newc archive (inode numbers by sorted position)."""
    out = io.BytesIO()

    def entry(
        name: str, ino: int, mode: int, *, nlink: int, data: bytes, rdev: tuple[int, int]
    ) -> None:
        name_b = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0]
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.write(name_b)
        out.write(b"\0" * (-(110 + len(name_b)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    for ino, (path, e) in enumerate(tree.sorted_items(), start=1):
        data = b"" if e.kind in ("dir", "chardev") else e.data
        mode = _CPIO_TYPE[e.kind] | e.mode
        entry(path, ino, mode, nlink=2 if e.kind == "dir" else 1, data=data, rdev=e.rdev)
    entry("TRAILER!!!", 0, 0, nlink=1, data=b"", rdev=(0, 0))
    return out.getvalue()


def gzip_fixed(data: bytes) -> bytes:
    """gzip with no name and mtime 0 (the kernel unpacks gzip initramfs)."""
    return gzip.compress(data, compresslevel=9, mtime=0)


def tar_fixed(files: dict[str, bytes]) -> bytes:
    """A tar of regular files (and their directories), sorted, root-owned, mtime 0."""
    tree = Tree()
    for path, data in files.items():
        tree.file(path, data)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path, e in tree.sorted_items():
            info = tarfile.TarInfo(path)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = e.mode
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
    return out.getvalue()


def _materialise(tree: Tree, root: Path) -> None:
    for path, e in tree.sorted_items():
        p = root / path
        if e.kind == "dir":
            p.mkdir(parents=True, exist_ok=True)
        elif e.kind == "file":
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(e.data)
        elif e.kind == "symlink":
            p.parent.mkdir(parents=True, exist_ok=True)
            p.symlink_to(e.data.decode())
        else:
            raise ValueError(f"{path}: a squashfs tree holds files, dirs and symlinks only")
    for path, e in tree.sorted_items():  # modes last, so read-only dirs were still writable
        if e.kind != "symlink":
            os.chmod(root / path, e.mode)
    os.chmod(root, 0o755)  # noqa: S103 - the image's / is world-readable, as every root is


def squashfs(tree: Tree, out: Path, *, mksquashfs: str = "mksquashfs") -> None:
    """The tree as a reproducible squashfs image at `out` (a whole number of 4 KiB blocks)."""
    with tempfile.TemporaryDirectory(prefix="gtvp-sqfs-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        _materialise(tree, root)
        squashfs_dir(root, out, mksquashfs=mksquashfs)


def squashfs_dir(
    root: Path, out: Path, *, mksquashfs: str = "mksquashfs", processors: int | None = 1
) -> None:
    """The directory `root` as a reproducible squashfs image at `out` (root-owned, fixed
    times, xz, padded to a whole number of 4 KiB blocks), written through `.part`.
    `processors`: mksquashfs's threads (None: all; the image's bytes do not depend on it)."""
    partial = out.with_name(f"{out.name}.{os.getpid()}.part")
    partial.unlink(missing_ok=True)
    threads = [] if processors is None else ["-processors", str(processors)]
    subprocess.run(
        [
            mksquashfs, str(root), str(partial),
            "-noappend", "-reproducible", "-mkfs-time", "0", "-all-time", "0",
            "-all-root", "-no-xattrs", "-comp", "xz", *threads,
            "-quiet", "-no-progress",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    size = partial.stat().st_size
    if size % SQUASHFS_ALIGN:
        with partial.open("ab") as f:
            f.write(b"\0" * (-size % SQUASHFS_ALIGN))
    partial.replace(out)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
