"""Real Lazy Box components, built reproducibly from Debian packages on this machine.

    build_catalogue(cache) -> {"<name>@<version>": Artifact}
    composition(catalogue, {name: version}) -> one artifact per component (newest by default)

- `linux` (kernel): a KubeVirt kernel-boot container's layer, a tar holding the Debian cloud
  kernel (`/boot/vmlinuz`) and the box init initramfs built for it (`/boot/initrd.img`:
  busybox-static, the generated `/init`, the kernel modules the init needs, and
  `gtvp-box-attest`, the box's vTPM measurement and attestation client: a static Go
  program built here from `boxattest/` with github.com/google/go-tpm). The init
  carries that kernel's modules, so it ships with the kernel; the component provides
  `kernel` and `initrd` and compose passes both to the VM.
- `busybox-base` (rootfs): a squashfs with busybox-static and its applet links, `/etc`
  (passwd, group, hosts) and the network bring-up stage 2 runs.
- `glibc` (library): a squashfs of the GNU C library and its tools exactly as Debian ships
  them (the pinned `libc6` and `libc-bin` packages, their files minus documentation): the
  dynamic loader, libc, libm, gconv and programs such as `getconf`, all dynamically linked
  against the layer itself.
- `hello-web` (application), in two versions (1.0.0 and its upgrade 1.1.0: the same code,
  the version in `/opt/gtvp/hello-web/VERSION`): a squashfs with `/opt/gtvp/hello-web/start`,
  which announces `gtvp-app hello-web <version>` (read from its VERSION file) on the serial
  console, starts busybox httpd on port 8080 (a page naming the box, that version and the C
  library the library layer provides, as its `getconf GNU_LIBC_VERSION` says) and a
  counter that prints `gtvp-uptime <seconds>` on the serial console every second.

Every artifact is a pure function of its inputs (the kernel package, busybox-static, this
code): fixed mtimes, root-owned, sorted entries, so its sha256 (the OSComponent's pinned
digest) is the same on every build. Inputs and outputs live in `<cache>/guest`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gtvp.core.components import DEFAULT_CHUNK_BYTES, chunk_digests
from gtvp.core.versions import Version
from gtvp_local.guest import pins
from gtvp_local.guest.initscript import ATTEST_BINARY, Module, init_script
from gtvp_local.guest.reproducible import (
    Tree,
    cpio_newc,
    gzip_fixed,
    sha256_file,
    squashfs,
    tar_fixed,
)

IMAGE_REPO = "registry.gtvp.local/gtvp-components"
BASE_NAME, BASE_VERSION = "busybox-base", "1.0.0"
LIB_NAME = "glibc"
LIB_SKIPPED = ("usr/share/doc", "usr/share/lintian", "usr/share/man", "usr/share/info")
APP_NAME, APP_VERSION, APP_UPGRADE = "hello-web", "1.0.0", "1.1.0"
APP_VERSIONS = (APP_VERSION, APP_UPGRADE)  # every hello-web built; boxes boot the first
APP_MARKER = "gtvp-app"  # `gtvp-app <name> <version>`: the application says what it is
# what the init needs from the kernel, in load order (dependencies are added before each)
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "squashfs", "overlay")


class BuildError(RuntimeError):
    """An input is missing or a build step failed; the message says which."""


@dataclass(frozen=True)
class Artifact:
    """One built component: the file its OSComponent pins (sha256 = the digest)."""

    name: str
    version: str
    type: str
    path: Path
    sha256: str
    size: int
    provides: tuple[str, ...] = ()
    requires: tuple[tuple[str, str], ...] = ()
    files: Mapping[str, Path] = field(default_factory=dict)  # container path → local file

    @property
    def key(self) -> str:
        """Its key in the catalogue: `<name>@<version>`."""
        return f"{self.name}@{self.version}"

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}"

    @property
    def image(self) -> str:
        return f"{IMAGE_REPO}/{self.name}@{self.digest}"


def guest_cache(cache: Path) -> Path:
    d = cache / "guest"
    d.mkdir(parents=True, exist_ok=True)
    return d


# --- the kernel --------------------------------------------------------------------------


def fetch_kernel(gcache: Path) -> Path:
    """The pinned kernel .deb in the cache (`pins.KERNEL`, downloaded and checked once)."""
    try:
        return pins.fetch(pins.KERNEL, gcache / "debs")
    except pins.PinError as exc:
        raise BuildError(str(exc)) from None


def pinned_busybox(gcache: Path) -> Path:
    """busybox from the pinned busybox-static .deb (`pins.BUSYBOX`), not the host's: the
    components' digests must not move with whatever busybox this machine has installed."""
    try:
        deb = pins.fetch(pins.BUSYBOX, gcache / "debs")
    except pins.PinError as exc:
        raise BuildError(str(exc)) from None
    binary = extract_deb(deb, gcache) / "bin" / "busybox"
    if not binary.is_file():
        raise BuildError(f"{deb.name} holds no bin/busybox")
    return binary


def extract_deb(deb: Path, gcache: Path) -> Path:
    target = gcache / "extracted" / deb.stem
    if not (target / ".done").exists():
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
        (target / ".done").write_text("")
    return target


def deb_version(deb: Path) -> str:
    out = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def component_version(debian_version: str) -> str:
    """`6.1.192-3` → `6.1.192` (gtvp versions read `-x` as a pre-release)."""
    m = re.match(r"^(\d+(?:\.\d+){0,3})", debian_version)
    if not m:
        raise BuildError(f"cannot read a version from {debian_version!r}")
    return m.group(1)


def module_depends(ko: bytes) -> list[str]:
    """The `depends=` of a module's .modinfo."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [d for d in (m.group(1).decode().split(",") if m else []) if d]


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return data


def kernel_modules(root: Path, builtin: set[str] | None = None) -> list[tuple[str, bytes]]:
    """The modules the init loads (WANTED_MODULES and their dependencies), in load order;
    empty for what the kernel has built in."""
    mods_dirs = sorted((root / "lib" / "modules").glob("*"))
    if not mods_dirs:
        raise BuildError(f"no lib/modules in {root}")
    by_name: dict[str, Path] = {}
    for p in sorted(mods_dirs[0].rglob("*.ko*")):
        by_name.setdefault(re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", p.name).replace("-", "_"), p)
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        path = by_name.get(name)
        if path is None:  # built in (or absent: the init says so when it loads nothing)
            return
        data = read_module(path)
        for dep in module_depends(data):
            visit(dep)
        order.append((name, data))

    for name in WANTED_MODULES:
        visit(name)
    return order


# --- trees -------------------------------------------------------------------------------


def busybox_links(tree: Tree, busybox: Path) -> None:
    """busybox at /bin/busybox and one symlink per applet where busybox puts it."""
    tree.file("bin/busybox", busybox.read_bytes(), 0o755)
    out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True)
    for rel in sorted(set(out.stdout.split())):
        if rel == "bin/busybox":
            continue
        depth = rel.count("/")
        tree.symlink(rel, "../" * depth + "bin/busybox")


ATTEST_SOURCE = Path(__file__).with_name("boxattest")
GO = "/usr/local/go/bin/go"
GO_TOOLCHAIN = "go1.26.8"
"""The Go release that builds `gtvp-box-attest` whatever Go is installed (GOTOOLCHAIN: the
go command fetches this release from the module proxy when it is another one), so the
binary, the box initrd and the sample kernel component's pinned digest are the same on
every machine."""


def _go() -> str:
    found = GO if Path(GO).exists() else shutil.which("go")
    if found is None:
        raise BuildError("Go is missing: the box's attestation client is a Go program")
    return found


def box_attest_binary(gcache: Path) -> Path:
    """`gtvp-box-attest` (static, CGO_ENABLED=0) built from `boxattest/`, cached under
    `<cache>/guest/boxattest/<key>` where the key hashes its sources and the Go version:
    built once, and reproducibly (-trimpath, no build id), so the kernel component's digest
    does not move between builds."""
    go = _go()
    files = sorted(p for p in ATTEST_SOURCE.iterdir() if p.name in ("go.mod", "go.sum", "main.go"))
    env = dict(
        os.environ,
        CGO_ENABLED="0",
        GOFLAGS="-buildvcs=false",
        GOOS="linux",
        GOARCH="amd64",
        GOTOOLCHAIN=GO_TOOLCHAIN,
    )
    version = subprocess.run(
        [go, "env", "GOVERSION"], env=env, capture_output=True, text=True, check=False
    )
    if version.returncode != 0:
        raise BuildError(
            f"Go cannot provide {GO_TOOLCHAIN} for the box's attestation client (is the Go "
            f"module proxy reachable?): {version.stderr.strip()[-1500:]}"
        )
    h = hashlib.sha256(version.stdout.strip().encode())
    for f in files:
        h.update(b"\0" + f.name.encode() + b"\0" + f.read_bytes())
    out = gcache / "boxattest" / h.hexdigest()[:16] / "gtvp-box-attest"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f"gtvp-box-attest.{os.getpid()}.part")
    argv = [go, "build", "-mod=readonly", "-trimpath", "-ldflags", "-s -w -buildid="]
    proc = subprocess.run(
        [*argv, "-o", str(part), "."],
        cwd=ATTEST_SOURCE, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise BuildError(
            f"building gtvp-box-attest failed (is the Go module proxy reachable?): "
            f"{proc.stderr.strip()[-1500:]}"
        )
    part.replace(out)
    return out


def initramfs_tree(
    busybox: Path, modules: list[tuple[str, bytes]], attest: Path | None = None
) -> Tree:
    """The box init's initramfs; `attest`: the gtvp-box-attest binary (measured boot)."""
    tree = Tree()
    for d in ("proc", "sys", "dev", "lower", "newroot", "rw", "run", "tmp"):
        tree.dir(d)
    tree.chardev("dev/console", 5, 1)
    tree.chardev("dev/null", 1, 3, 0o666)
    busybox_links(tree, busybox)
    for name, data in modules:
        tree.file(f"lib/gtvp/{name}.ko", data)
    if attest is not None:
        tree.file(ATTEST_BINARY, attest.read_bytes(), 0o755)
    tree.file("init", init_script([Module(n) for n, _ in modules]), 0o755)
    return tree


NET_UP = """#!/bin/sh
# bring up loopback and the first NIC (DHCP, else QEMU user networking's fixed address)
ip link set lo up
for nic in /sys/class/net/eth*; do
  [ -e "$nic" ] || continue
  n="${nic##*/}"
  ip link set "$n" up
  udhcpc -i "$n" -n -q -t 4 -T 1 -s /etc/gtvp/udhcpc.script >/dev/null 2>&1 || {
    ip addr add 10.0.2.15/24 dev "$n"; ip route add default via 10.0.2.2; }
  break
done
"""

UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done ;;
esac
"""


def base_tree(busybox: Path) -> Tree:
    tree = Tree()
    for d in ("proc", "sys", "dev", "run", "root", "var", "etc/gtvp", "opt/gtvp", "usr/bin"):
        tree.dir(d)
    tree.dir("tmp", 0o1777)
    busybox_links(tree, busybox)
    tree.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33:www:/var/www:/bin/false\n")
    tree.file("etc/group", "root:x:0:\nwww:x:33:\n")
    tree.file("etc/hosts", "127.0.0.1 localhost\n")
    tree.file("etc/os-release", f'NAME="gtvp {BASE_NAME}"\nVERSION_ID="{BASE_VERSION}"\n')
    tree.file("etc/gtvp/net-up", NET_UP, 0o755)
    tree.file("etc/gtvp/udhcpc.script", UDHCPC_SCRIPT, 0o755)
    return tree


def library_tree(roots: list[Path]) -> Tree:
    """The files of extracted Debian packages as one tree (documentation left out), with
    their modes and symlinks as the packages declare them (owners and times fixed)."""
    tree = Tree()
    for root in roots:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if rel == ".done" or any(rel == d or rel.startswith(d + "/") for d in LIB_SKIPPED):
                continue
            if path.is_symlink():
                tree.symlink(rel, os.readlink(path))
            elif path.is_dir():
                tree.dir(rel, path.stat().st_mode & 0o7777)
            elif path.is_file():
                tree.file(rel, path.read_bytes(), path.stat().st_mode & 0o7777)
    return tree


def pinned_library(gcache: Path) -> tuple[str, list[Path]]:
    """The C library's version and its extracted packages (`pins.LIBC6`, `pins.LIBC_BIN`)."""
    try:
        debs = [pins.fetch(p, gcache / "debs") for p in (pins.LIBC6, pins.LIBC_BIN)]
    except pins.PinError as exc:
        raise BuildError(str(exc)) from None
    return component_version(deb_version(debs[0])), [extract_deb(d, gcache) for d in debs]


APP_START = """#!/bin/sh
# hello-web: says its version (its own VERSION file) on the console, serves a page naming
# the box and that version on :8080, and prints the guest's uptime every second
. /etc/gtvp-box
here=/opt/gtvp/hello-web
read -r version <"$here/VERSION"
echo "@MARKER@ hello-web $version" >/dev/console
# getconf is the library layer's (dynamically linked against that layer's libc)
libc="$(/usr/bin/getconf GNU_LIBC_VERSION 2>&1)" || libc="no C library ($libc)"
echo "@MARKER@-lib $libc" >/dev/console
mkdir -p /run/hello-web
cat >/run/hello-web/index.html <<EOF
<html><body><h1>gtvp Lazy Box $GTVP_BOX</h1>
<p>hello-web $version on $(uname -r) with $libc</p></body></html>
EOF
httpd -p 8080 -h /run/hello-web || exit 1
"$here/uptime" </dev/null >/dev/console 2>&1 &
exit 0
""".replace("@MARKER@", APP_MARKER)

APP_UPTIME = """#!/bin/sh
# the guest's uptime once a second: a live migration keeps counting, a reboot starts over
while :; do
  read -r up _ </proc/uptime
  echo "gtvp-uptime ${up%.*}"
  sleep 1
done
"""


def app_tree(version: str = APP_VERSION) -> Tree:
    """hello-web at `version`: the versions differ only in their VERSION file."""
    tree = Tree()
    tree.file(f"opt/gtvp/{APP_NAME}/start", APP_START, 0o755)
    tree.file(f"opt/gtvp/{APP_NAME}/uptime", APP_UPTIME, 0o755)
    tree.file(f"opt/gtvp/{APP_NAME}/VERSION", version + "\n")
    return tree


# --- the catalogue -----------------------------------------------------------------------


def _write(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    part.write_bytes(data)
    part.replace(path)


def _artifact(name: str, version: str, kind: str, path: Path, **kw: Any) -> Artifact:
    return Artifact(name, version, kind, path, sha256_file(path), path.stat().st_size, **kw)


def _layer(out: Path, tree: Tree, name: str, version: str, kind: str, **kw: Any) -> Artifact:
    """A file-system component: `tree` as `<out>/<name>-<version>.squashfs`."""
    path = out / f"{name}-{version}.squashfs"
    squashfs(tree, path)
    return _artifact(name, version, kind, path, **kw)


def build_catalogue(cache: Path, *, busybox: Path | None = None) -> dict[str, Artifact]:
    """Build (or rebuild: same bytes) every component version; {`<name>@<version>`:
    artifact} (`Artifact.key`; `composition` picks one per component).
    `busybox`: a binary to build with instead of the pinned one (the digests then differ
    from the sample catalogue's). Concurrent builders (the stand-in starting while a test or
    a benchmark builds) take turns on a lock in the cache; a reader of an artifact always
    sees a whole file (each one is replaced by a rename)."""
    gcache = guest_cache(cache)
    with (gcache / "catalogue.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_catalogue(gcache, busybox)


def _build_catalogue(gcache: Path, busybox: Path | None) -> dict[str, Artifact]:
    if busybox is None:
        busybox = pinned_busybox(gcache)
    elif not busybox.exists():
        raise BuildError(f"{busybox} is missing")
    out = gcache / "artifacts"
    out.mkdir(exist_ok=True)
    deb = fetch_kernel(gcache)
    kroot = extract_deb(deb, gcache)
    vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise BuildError(f"{deb.name} holds no boot/vmlinuz-*")
    kversion = component_version(deb_version(deb))
    attest = box_attest_binary(gcache)
    initrd = gzip_fixed(cpio_newc(initramfs_tree(busybox, kernel_modules(kroot), attest)))
    kernel_files = {"boot/vmlinuz": vmlinuz[0].read_bytes(), "boot/initrd.img": initrd}
    kdir = out / f"linux-{kversion}"
    kdir.mkdir(exist_ok=True)
    for rel, data in kernel_files.items():
        (kdir / rel).parent.mkdir(parents=True, exist_ok=True)
        _write(kdir / rel, data)
    _write(out / f"linux-{kversion}.tar", tar_fixed(kernel_files))
    kernel = _artifact(
        "linux",
        kversion,
        "kernel",
        out / f"linux-{kversion}.tar",
        provides=("kernel", "initrd"),
        files={f"/{rel}": kdir / rel for rel in kernel_files},
    )
    base = _layer(
        out,
        base_tree(busybox),
        BASE_NAME,
        BASE_VERSION,
        "rootfs",
        provides=("rootfs", "busybox"),
        requires=(("kernel", ">=5.10"),),
    )
    lib_version, lib_roots = pinned_library(gcache)
    lib = _layer(
        out,
        library_tree(lib_roots),
        LIB_NAME,
        lib_version,
        "library",
        provides=("libc",),
        requires=((BASE_NAME, ">=1.0"),),
    )
    app_needs = ((BASE_NAME, ">=1.0"), (LIB_NAME, ">=2.36"))
    apps = [
        _layer(out, app_tree(v), APP_NAME, v, "application", requires=app_needs)
        for v in APP_VERSIONS
    ]
    catalogue = {a.key: a for a in (kernel, base, lib, *apps)}
    index = {
        "inputs": {
            "kernelPackage": deb.name,
            "libraryPackages": [p.name for p in lib_roots],
            "busybox": sha256_file(busybox),
            "gtvp-box-attest": sha256_file(attest),
        },
        "artifacts": {
            n: {"path": str(a.path), "sha256": a.sha256, "size": a.size, "image": a.image}
            for n, a in catalogue.items()
        },
    }
    _write(gcache / "catalogue.json", (json.dumps(index, indent=2) + "\n").encode())
    return catalogue


def composition(
    catalogue: Mapping[str, Artifact], versions: Mapping[str, str] = {}
) -> list[Artifact]:
    """One artifact per component name, in catalogue order: the version `versions` names,
    else the newest (as a box whose version ranges are empty resolves)."""
    chosen: dict[str, Artifact] = {}
    for a in catalogue.values():
        if a.name in versions:
            if a.version == versions[a.name]:
                chosen[a.name] = a
            continue
        have = chosen.get(a.name)
        if have is None or Version.parse(a.version) > Version.parse(have.version):
            chosen[a.name] = a
    missing = sorted(f"{n} {v}" for n, v in versions.items() if n not in chosen)
    if missing:
        raise BuildError(f"the catalogue holds no {', '.join(missing)}")
    return list(chosen.values())


def file_chunks(path: Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict[str, Any]:
    """`spec.chunks` for the file at `path`: its chunk digest list (docs/lazyboxes.md,
    "Multi-source transfer")."""
    with path.open("rb") as f:
        digests = chunk_digests(iter(lambda: f.read(1 << 20), b""), chunk_bytes)
    return {"sizeBytes": chunk_bytes, "digests": digests}


def component_spec(a: Artifact, *, level: int = 3) -> dict[str, Any]:
    """The (unsigned) OSComponent spec that pins `a`, with the chunk digest list of its
    bytes; sign it with `gtvp.core.component_signing.sign` or `gtvp component sign`."""
    spec: dict[str, Any] = {
        "componentName": a.name,
        "version": a.version,
        "type": a.type,
        "image": a.image,
        "digest": a.digest,
        "sizeBytes": a.size,
        "chunks": file_chunks(a.path),
        "level": level,
    }
    if a.provides:
        spec["provides"] = list(a.provides)
    if a.requires:
        spec["requires"] = [{"name": n, "versions": v} for n, v in a.requires]
    return spec


def component_manifest(a: Artifact, *, level: int = 3) -> dict[str, Any]:
    return {
        "apiVersion": "gtvp.io/v1alpha1",
        "kind": "OSComponent",
        "metadata": {"name": f"{a.name}-{a.version.replace('.', '-')}"},
        "spec": component_spec(a, level=level),
    }
