"""`gtvp local images`: build gtvp's container image here, without a Docker engine.

debootstrap (Debian's packages from the machine's Debian mirror) makes a minbase root
filesystem with python3 and the TSS libraries; a copy of it with the build packages is the
builder, where pip installs gtvp (from the repository) and its dependencies (from the
package index, tpm2-pytss built against Debian's libtss2) into a virtualenv at /opt/gtvp;
that virtualenv is copied into a fresh copy of the base, and umoci turns the result into an
OCI image (`umoci init/new/insert/config`). Nothing is pulled from a registry.

The image is cached as an OCI archive in `<cache>/images/`, named by a fingerprint of its
inputs (the package sources, pyproject.toml, this recipe, the Debian suite and packages), so
an unchanged tree returns at once. The image's programs are then run from the unpacked
bundle with runc (read-only root, uid 65532); when containerd runs, the archive is imported
into its k8s.io namespace. What is decided (packages, fingerprint, config) is in
`gtvp_local.imagespec`; this module does the I/O.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gtvp.local_state import cache_dir
from gtvp_local import imagespec
from gtvp_local.imagespec import ImageSpec

Say = Callable[[str], None]
SOURCE_DIRS = ("operator", "attestation-agent")
SOURCE_FILES = ("pyproject.toml", "README.md")
RECIPE = Path(__file__)
KEEP_ARCHIVES = 3
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
_BUILD_CA = "etc/gtvp-build-ca.crt"  # the host's CA bundle, in the builder only (pip's TLS)
_PASS_ENV = (
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_DEFAULT_TIMEOUT",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)


class ImageError(RuntimeError):
    """The image could not be built or checked; the message says what to do."""


@dataclass(frozen=True)
class BuiltImage:
    """An image in the cache: its OCI archive and what identifies it."""

    reference: str
    archive: Path
    digest: str
    """The manifest's digest (what `ctr image ls` and the kubelet show)."""
    config_digest: str
    fingerprint: str
    size: int
    seconds: float
    cached: bool = False


def images_dir() -> Path:
    return cache_dir() / "images"


def say_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def spec_for(repo: Path) -> ImageSpec:
    """The spec for this checkout: the chart's appVersion, this machine's Debian mirror
    (`GTVP_DEBIAN_MIRROR` overrides)."""
    tag = imagespec.chart_app_version((repo / "charts" / "gtvp" / "Chart.yaml").read_text())
    mirror = os.environ.get("GTVP_DEBIAN_MIRROR") or _apt_mirror() or imagespec.DEFAULT_MIRROR
    arch = imagespec.oci_architecture(platform.machine())
    return ImageSpec(tag=tag, mirror=mirror, architecture=arch)


def _apt_mirror() -> str | None:
    paths = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        paths += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    texts = [p.read_text(errors="replace") for p in paths if p.is_file()]
    return imagespec.debian_mirror(texts)


def source_files(repo: Path) -> list[tuple[str, bytes]]:
    """(path, content) of every file that goes into the image, relative to `repo`."""
    out = [(name, (repo / name).read_bytes()) for name in SOURCE_FILES]
    for top in SOURCE_DIRS:
        for path in sorted((repo / top).rglob("*")):
            rel = path.relative_to(repo).as_posix()
            if path.is_file() and imagespec.is_package_source(rel):
                out.append((rel, path.read_bytes()))
    out.append(("recipe/images.py", RECIPE.read_bytes()))
    out.append(("recipe/imagespec.py", Path(imagespec.__file__).read_bytes()))
    return out


def archive_path(spec: ImageSpec, fingerprint: str) -> Path:
    return images_dir() / f"gtvp-{spec.tag}-{fingerprint}.oci.tar"


def bundle_path(fingerprint: str) -> Path:
    """The unpacked image (runtime bundle: config.json + rootfs) the checks run."""
    return images_dir() / f"bundle-{fingerprint}"


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    images_dir().mkdir(parents=True, exist_ok=True)
    with (images_dir() / ".lock").open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say_stderr("waiting for another image build to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ticker(label: str, stop: threading.Event, say: Say) -> None:
    start = time.monotonic()
    while not stop.wait(20.0):
        mins, secs = divmod(int(time.monotonic() - start), 60)
        say(f"  ... still {label} ({mins}m{secs:02d}s)")


def run_step(label: str, cmd: Sequence[str], log: Path, say: Say = say_stderr) -> None:
    """Run one long step, its output appended to `log`, a progress line every 20 s."""
    say(f"  {label}")
    started = time.monotonic()
    stop = threading.Event()
    ticker = threading.Thread(target=_ticker, args=(label, stop, say), daemon=True)
    ticker.start()
    try:
        with log.open("a") as out:
            out.write(f"\n$ {' '.join(cmd)}\n")
            out.flush()
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    finally:
        stop.set()
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise ImageError(f"{label} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    say(f"    done in {time.monotonic() - started:.0f}s")


def chroot_cmd(root: Path, script: str, env: Sequence[str] = ()) -> list[str]:
    """Run a shell script in `root` with /proc mounted in a private mount namespace (gone
    with the process, nothing to unmount) and a clean environment."""
    base_env = [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/root",
        "LANG=C.UTF-8",
        "DEBIAN_FRONTEND=noninteractive",
    ]
    inner = 'mount -t proc proc "$0/proc" && exec chroot "$0" /usr/bin/env -i "$@"'
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        inner,
        str(root),
        *base_env,
        *env,
        "/bin/sh",
        "-ec",
        script,
    ]


def check_tools(*, need_runc: bool) -> None:
    if os.geteuid() != 0:
        raise ImageError(
            "building the image needs root (debootstrap, chroot and runc); run it as root "
            "(e.g. sudo -E make images)"
        )
    tools = ["debootstrap", "umoci", "unshare", *(["runc"] if need_runc else [])]
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ImageError(
            f"{', '.join(missing)} not found: install Debian's packages ({' '.join(missing)}; "
            ".ci/setup-machine does) and run it again"
        )


def build(
    repo: Path, *, refresh: bool = False, say: Say = say_stderr, spec: ImageSpec | None = None
) -> BuiltImage:
    """The image for this checkout: from the cache when its fingerprint is there, else built
    (several minutes the first time, progress through `say`)."""
    spec = spec or spec_for(repo)
    fp = imagespec.fingerprint(spec, source_files(repo))
    with _lock():
        meta = archive_path(spec, fp).with_suffix(".json")
        if meta.is_file() and archive_path(spec, fp).is_file() and not refresh:
            cached = BuiltImage(**{**json.loads(meta.read_text()), "cached": True})
            return BuiltImage(**{**asdict(cached), "archive": Path(cached.archive)})
        check_tools(need_runc=False)
        return _build_locked(repo, spec, fp, refresh=refresh, say=say)


def _build_locked(repo: Path, spec: ImageSpec, fp: str, *, refresh: bool, say: Say) -> BuiltImage:
    started = time.monotonic()
    say(
        f"building image {spec.reference} (fingerprint {fp}; Debian {spec.suite} from "
        f"{spec.mirror}; the first build takes several minutes)"
    )
    work = images_dir() / f"work-{fp}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "build.log"
    say(f"  log: {log}")
    base, builder = _stages(spec, refresh=refresh, log=log, say=say)
    _install_gtvp(repo, builder, log, say)
    rootfs = work / "rootfs"
    _runtime_rootfs(base, builder, rootfs, log, say)
    layout = work / "layout"
    _pack(spec, fp, rootfs, layout, log=log, say=say)
    image = _archive(spec, fp, layout, seconds=time.monotonic() - started)
    _unpack(spec, layout, bundle_path(fp), log, say)
    shutil.copy(builder / "opt" / "gtvp-freeze.txt", image.archive.with_suffix(".freeze.txt"))
    shutil.rmtree(work, ignore_errors=True)
    _prune(keep=fp, key=base.name.removeprefix("base-"))
    say(f"built {spec.reference} in {image.seconds:.0f}s: {image.digest}")
    return image


def _stages(spec: ImageSpec, *, refresh: bool, log: Path, say: Say) -> tuple[Path, Path]:
    """The cached base root filesystem (minbase + runtime packages) and the builder (a copy
    with the build packages); made once per Debian-side fingerprint."""
    key = imagespec.base_fingerprint(spec, "recipe-2")
    base, builder = images_dir() / f"base-{key}", images_dir() / f"builder-{key}"
    if refresh:
        for d in (base, builder):
            shutil.rmtree(d, ignore_errors=True)
    if not (base / ".complete").is_file():
        _make_base(spec, base, log, say)
    if not (builder / ".complete").is_file():
        shutil.rmtree(builder, ignore_errors=True)
        copy = ["cp", "-a", str(base), str(builder)]
        run_step("copying the base into the builder", copy, log, say)
        (builder / ".complete").unlink()
        _network_files(builder)
        pkgs = " ".join(spec.build_packages)
        script = f"apt-get update -qq && apt-get install -y -qq --no-install-recommends {pkgs}"
        run_step(f"builder: apt-get install {pkgs}", chroot_cmd(builder, script), log, say)
        (builder / ".complete").touch()
    return base, builder


def _make_base(spec: ImageSpec, base: Path, log: Path, say: Say) -> None:
    shutil.rmtree(base, ignore_errors=True)
    debs = images_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    args = imagespec.debootstrap_args(spec, str(base), str(debs))
    run_step(f"debootstrap --variant=minbase {spec.suite} (python3, libtss2)", args, log, say)
    _slim(base)
    (base / ".complete").touch()


_SLIM = (
    "var/lib/apt/lists/*",
    "var/cache/apt/archives/*.deb",
    "var/cache/apt/*.bin",
    "var/log/*.log",
    "var/log/apt/*",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/locale/*",
)


def _slim(root: Path) -> None:
    """What debian:bookworm-slim leaves out too: apt's lists and downloaded packages, logs,
    manuals, translations, documentation other than the copyright files."""
    for pattern in _SLIM:
        for path in root.glob(pattern):
            _remove(path)
    for path in root.glob("usr/share/doc/*/*"):
        if path.name != "copyright":
            _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _network_files(root: Path) -> None:
    """What pip and apt in the builder need from the host: DNS and its CA bundle (an
    egress proxy's CA included)."""
    shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if ca.is_file():
        shutil.copy(ca, root / _BUILD_CA)


def _install_gtvp(repo: Path, builder: Path, log: Path, say: Say) -> None:
    src, venv = builder / "src", builder / imagespec.VENV.lstrip("/")
    for d in (src, venv):
        shutil.rmtree(d, ignore_errors=True)
    src.mkdir()
    for rel, content in source_files(repo):
        if not rel.startswith("recipe/"):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(content)
    _network_files(builder)
    env = [f"{k}={os.environ[k]}" for k in _PASS_ENV if k in os.environ]
    if (builder / _BUILD_CA).is_file():
        env.append(f"PIP_CERT=/{_BUILD_CA}")
    v = imagespec.VENV
    script = (
        f"python3 -m venv {v}\n"
        f"{v}/bin/pip install --disable-pip-version-check /src\n"
        f"{v}/bin/pip freeze --all > /opt/gtvp-freeze.txt\n"
        f"{v}/bin/pip uninstall -y -q pip setuptools\n"
        f"{v}/bin/python -m compileall -q {v}/lib\n"
    )
    run_step(
        "pip install gtvp and its dependencies (builder)",
        chroot_cmd(builder, script, env),
        log,
        say,
    )


def _runtime_rootfs(base: Path, builder: Path, rootfs: Path, log: Path, say: Say) -> None:
    """A copy of the base with the builder's virtualenv, a passwd entry for uid 65532 and
    nothing of the build host (resolv.conf, hostname, device nodes)."""
    run_step(
        "assembling the image's root filesystem", ["cp", "-a", str(base), str(rootfs)], log, say
    )
    (rootfs / ".complete").unlink()
    venv = imagespec.VENV.lstrip("/")
    subprocess.run(["cp", "-a", str(builder / venv), str(rootfs / venv)], check=True)
    with (rootfs / "etc" / "passwd").open("a") as f:
        f.write(imagespec.PASSWD_LINE + "\n")
    with (rootfs / "etc" / "group").open("a") as f:
        f.write(imagespec.GROUP_LINE + "\n")
    for name in ("resolv.conf", "hostname"):
        (rootfs / "etc" / name).write_text("")
    for dev in (rootfs / "dev").iterdir():
        _remove(dev)


def _pack(spec: ImageSpec, fp: str, rootfs: Path, layout: Path, *, log: Path, say: Say) -> None:
    image = f"{layout}:{spec.tag}"
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    run_step("umoci: init, new", ["umoci", "init", "--layout", str(layout)], log, say)
    run_step("umoci new", ["umoci", "new", "--image", image], log, lambda _m: None)
    packages = " ".join(spec.runtime_packages)
    history = (
        f"debootstrap --variant=minbase {spec.suite} + {packages}; "
        f"pip install gtvp into {imagespec.VENV}"
    )
    insert = [
        "umoci",
        "insert",
        "--image",
        image,
        f"--history.created_by={history}",
        f"--history.created={created}",
        str(rootfs),
        "/",
    ]
    run_step("umoci insert (one layer: the root filesystem)", insert, log, say)
    run_step("umoci config", imagespec.umoci_config_args(spec, image, fp, created), log, say)
    run_step("umoci gc", ["umoci", "gc", "--layout", str(layout)], log, lambda _m: None)


def _archive(spec: ImageSpec, fp: str, layout: Path, *, seconds: float) -> BuiltImage:
    """Tar the layout (only this tag, its full reference annotated for containerd) into the
    cache; the metadata beside it makes the next call instant."""
    index = json.loads((layout / "index.json").read_text())
    out_index = imagespec.archive_index(index, spec.tag, spec.reference)
    desc = out_index["manifests"][0]
    manifest = json.loads((layout / imagespec.blob_path(desc["digest"])).read_text())
    dest = archive_path(spec, fp)
    tmp = dest.with_suffix(f".tmp-{os.getpid()}")
    with tarfile.open(tmp, "w") as tar:
        _add_bytes(tar, "oci-layout", (layout / "oci-layout").read_bytes())
        _add_bytes(tar, "index.json", json.dumps(out_index, indent=2).encode())
        for blob in sorted((layout / "blobs").rglob("*")):
            if blob.is_file():
                _add_bytes(tar, blob.relative_to(layout).as_posix(), blob.read_bytes())
    os.replace(tmp, dest)
    image = BuiltImage(
        reference=spec.reference,
        archive=dest,
        digest=desc["digest"],
        config_digest=manifest["config"]["digest"],
        fingerprint=fp,
        size=dest.stat().st_size,
        seconds=seconds,
    )
    meta = {**asdict(image), "archive": str(dest)}
    dest.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return image


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _unpack(spec: ImageSpec, layout: Path, bundle: Path, log: Path, say: Say) -> None:
    shutil.rmtree(bundle, ignore_errors=True)
    cmd = ["umoci", "unpack", "--image", f"{layout}:{spec.tag}", str(bundle)]
    run_step("umoci unpack (the bundle the checks run)", cmd, log, say)


def _prune(keep: str, key: str) -> None:
    """Drop other fingerprints' bundles, root filesystems of another Debian-side key, and
    archives but the newest few (KEEP_ARCHIVES)."""
    for d in images_dir().iterdir():
        stale_dir = d.name.startswith(("bundle-", "base-", "builder-")) and d.name not in (
            f"bundle-{keep}",
            f"base-{key}",
            f"builder-{key}",
        )
        if stale_dir and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
    archives = sorted(images_dir().glob("gtvp-*.oci.tar"), key=lambda p: p.stat().st_mtime)
    for old in archives[:-KEEP_ARCHIVES]:
        for suffix in (".tar", ".json", ".freeze.txt"):
            old.with_suffix(suffix).unlink(missing_ok=True)


def read_archive(archive: Path, tag: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(manifest digest, manifest, image config) read back from an OCI archive; the blobs'
    digests are checked against their content."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> bytes:
            f = tar.extractfile(imagespec.blob_path(digest))
            data = f.read() if f else b""
            if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
                raise ImageError(f"{archive}: blob {digest} does not match its digest")
            return data

        f = tar.extractfile("index.json")
        index = json.loads(f.read() if f else b"{}")
        digest = imagespec.manifest_descriptor(index, tag)["digest"]
        manifest = json.loads(blob(digest))
        config = json.loads(blob(manifest["config"]["digest"]))
    return digest, manifest, config
