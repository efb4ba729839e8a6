"""The runtime's own tiny test guest, built reproducibly in `<cache>/vmruntime`.

- the Debian cloud kernel the Lazy Box components use (`gtvp_local.guest.build`: fetched
  with `apt-get download`, unpacked with `dpkg-deb -x`; nothing is installed);
- a busybox initramfs whose init prints `GTVP-READY test`, then `gtvp-uptime <seconds>`
  every second on the console (ttyS0), read from /proc/uptime; written with
  `gtvp_local.guest.reproducible` (fixed owners and times, gzip without a time stamp), so
  the same busybox (the pinned busybox-static, `gtvp_local.guest.pins`) gives the same
  bytes.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from gtvp.local_state import cache_dir
from gtvp_local.guest import build
from gtvp_local.guest.reproducible import Tree, cpio_newc, gzip_fixed

READY = "GTVP-READY"
INIT = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
echo "GTVP-READY test"
while true; do
  read up idle < /proc/uptime
  echo "gtvp-uptime $up"
  sleep 1
done
"""
APPLETS = ("sh", "mount", "sleep", "echo", "cat")


def vm_cache() -> Path:
    return cache_dir() / "vmruntime"


def initramfs_tree(busybox: bytes) -> Tree:
    tree = Tree()
    tree.dir("proc")
    tree.chardev("dev/console", 5, 1)
    tree.file("bin/busybox", busybox, 0o755)
    tree.file("init", INIT, 0o755)
    for applet in APPLETS:
        tree.symlink(f"bin/{applet}", "busybox")
    return tree


def build_initramfs(busybox: bytes) -> bytes:
    return gzip_fixed(cpio_newc(initramfs_tree(busybox)))


def ensure_initramfs(cache: Path | None = None) -> Path:
    cache = cache or vm_cache()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "test-initramfs.cpio.gz"
    data = build_initramfs(pinned_busybox().read_bytes())
    if not path.exists() or path.read_bytes() != data:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def pinned_busybox() -> Path:
    """The busybox the Lazy Box components are built with (the pinned busybox-static)."""
    gcache = build.guest_cache(cache_dir())
    with (gcache / "kernel.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build.pinned_busybox(gcache)


def ensure_kernel() -> Path:
    """The cloud kernel's vmlinuz, the one the Lazy Box components are built from (fetched
    and unpacked once; a lock makes concurrent callers take turns)."""
    gcache = build.guest_cache(cache_dir())
    with (gcache / "kernel.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        root = build.extract_deb(build.fetch_kernel(gcache), gcache)
    found = sorted((root / "boot").glob("vmlinuz-*"))
    if not found:
        raise build.BuildError(f"{root} holds no boot/vmlinuz-*")
    return found[-1]


def cached_kernel() -> Path | None:
    found = sorted((build.guest_cache(cache_dir()) / "extracted").glob("*/boot/vmlinuz-*"))
    return found[-1] if found else None
