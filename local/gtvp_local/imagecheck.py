"""Run gtvp's image here: its programs from the unpacked bundle, and containerd's import.

Each check runs one command in the image with runc, as the chart runs the operator: the
image's own user (uid 65532), a read-only root filesystem, no capabilities beyond runc's
defaults. Every run gets its own bundle directory (a config.json pointing at the shared,
read-only rootfs), so two checks at once never step on each other. Without runc, the
command runs under chroot as uid 65532 instead (root not read-only), and says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gtvp_local import images, imagespec
from gtvp_local.images import BuiltImage, ImageError

STARTUP_CHECK = """
import os, sys
import kopf, kubernetes, prometheus_client, tpm2_pytss
from tpm2_pytss import ESAPI, TCTILdr
import gtvp.operator_main, gtvp.handlers, gtvp.runtime, gtvp_agent.agent, gtvp_agent.main
root = [m.split()[3] for m in open("/proc/self/mounts") if m.split()[1] == "/"][-1]
stale = [n for n, m in list(sys.modules.items())
         if getattr(m, "__cached__", None) and not os.path.exists(m.__cached__)]
print(f"imports ok, uid={os.getuid()} root={root.split(',')[0]} "
      f"uncompiled={len(stale)} write_bytecode={not sys.dont_write_bytecode}")
"""

TPM_CHECK = """
import sys
from tpm2_pytss import ESAPI, TCTILdr
with ESAPI(TCTILdr("swtpm", f"host={sys.argv[1]},port={sys.argv[2]}")) as e:
    print("TPM answered:", len(bytes(e.get_random(8))), "random bytes")
"""


@dataclass(frozen=True)
class Check:
    """One command run in the image and the text its output must contain."""

    name: str
    args: tuple[str, ...]
    expect: str


def standard_checks(version: str) -> tuple[Check, ...]:
    return (
        Check(
            "gtvp-operator --version", ("gtvp-operator", "--version"), f"gtvp-operator {version}"
        ),
        Check("gtvp-agent --help", ("gtvp-agent", "--help"), "usage: gtvp-agent"),
        Check(
            "start-up imports",
            ("python3", "-c", STARTUP_CHECK),
            f"uid={imagespec.UID} root=ro uncompiled=0 write_bytecode=False",
        ),
    )


def _extract_layout(archive: Path, dest: Path) -> None:
    """The OCI layout back out of an archive gtvp wrote (regular files under plain names)."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if not member.isfile() or name.is_absolute() or ".." in name.parts:
                raise ImageError(f"{archive}: unexpected member {member.name!r}")
            src = tar.extractfile(member)
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read() if src else b"")


def ensure_bundle(image: BuiltImage, say: images.Say = images.say_stderr) -> Path:
    """The unpacked image for `image` (unpacked again from its archive when pruned)."""
    bundle = images.bundle_path(image.fingerprint)
    if (bundle / "config.json").is_file():
        return bundle
    say(f"  unpacking {image.archive.name} for the checks (umoci unpack)")
    tag = image.reference.rsplit(":", 1)[1]
    with tempfile.TemporaryDirectory(dir=images.images_dir()) as tmp:
        _extract_layout(image.archive, Path(tmp))
        staging = Path(tmp) / "bundle"
        subprocess.run(
            ["umoci", "unpack", "--image", f"{tmp}:{tag}", str(staging)],
            check=True,
            capture_output=True,
        )
        shutil.rmtree(bundle, ignore_errors=True)
        os.replace(staging, bundle)
    return bundle


@contextlib.contextmanager
def _runc_bundle(
    bundle: Path,
    args: Sequence[str],
    *,
    host_network: bool = False,
    mounts: Sequence[tuple[str, str]] = (),
) -> Iterator[list[str]]:
    """A one-run bundle (its own config.json, the shared rootfs read-only); yields the
    `runc run` command line."""
    spec = json.loads((bundle / "config.json").read_text())
    run_spec = imagespec.runtime_spec(spec, args, host_network=host_network, mounts=mounts)
    run_spec["root"]["path"] = str((bundle / "rootfs").resolve())
    with tempfile.TemporaryDirectory(prefix="gtvp-image-run-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(run_spec))
        name = f"gtvp-image-check-{os.getpid()}-{Path(tmp).name[-8:]}"
        yield ["runc", "run", "--bundle", tmp, name]


def run_in_image(
    bundle: Path, args: Sequence[str], *, host_network: bool = False, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `args` in the image (runc; chroot as uid 65532 when runc is missing)."""
    if shutil.which("runc") is None:
        env = list(imagespec.ENV)
        cmd = [
            "chroot",
            f"--userspec={imagespec.USER}",
            str(bundle / "rootfs"),
            "/usr/bin/env",
            "-i",
            *env,
            *args,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    with _runc_bundle(bundle, args, host_network=host_network) as runc:
        return subprocess.run(
            runc,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )


@contextlib.contextmanager
def running_in_image(
    bundle: Path, args: Sequence[str], *, mounts: Sequence[tuple[str, str]], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A long-running program in the image (runc, the host's network, read-only `mounts`),
    its output in `log`; SIGTERM (runc passes it on) and waited for on leaving."""
    with (
        _runc_bundle(bundle, args, host_network=True, mounts=mounts) as runc,
        log.open("wb") as out,
    ):
        proc = subprocess.Popen(
            runc, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def runner_name() -> str:
    if shutil.which("runc"):
        return f"runc, uid {imagespec.UID}, read-only root"
    return f"chroot as uid {imagespec.UID} (runc not installed: root not read-only here)"


def check(image: BuiltImage) -> list[str]:
    """Run the standard checks in the image; a line per check, ImageError on a failure."""
    bundle = ensure_bundle(image)
    version = image.reference.rsplit(":", 1)[1]
    lines = []
    for c in standard_checks(version):
        proc = run_in_image(bundle, c.args)
        out = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0 or c.expect not in out:
            raise ImageError(
                f"in the image, `{c.name}` gave exit {proc.returncode}, expected {c.expect!r}:\n"
                + "\n".join(out.splitlines()[-20:])
            )
        first = next((ln for ln in out.splitlines() if c.expect in ln), out.splitlines()[0])
        lines.append(f"{c.name}: {first.strip()}")
    return lines


def import_into_containerd(image: BuiltImage, address: str = images.CONTAINERD_SOCKET) -> str:
    """`ctr -n k8s.io image import` of the archive when containerd runs; else why not."""
    ctr = shutil.which("ctr")
    if ctr is None:
        return "containerd: ctr is not installed, import skipped (optional)"
    if not Path(address).exists():
        return f"containerd: not running (no socket {address}), import skipped (optional)"
    base = [ctr, "--address", address, "-n", "k8s.io"]
    listed = subprocess.run(
        [*base, "image", "ls"], capture_output=True, text=True, check=False, timeout=60
    )
    for line in listed.stdout.splitlines():
        if line.split()[:1] == [image.reference] and image.digest in line:
            return f"containerd ({address}): {image.reference} already imported ({image.digest})"
    proc = subprocess.run(
        [*base, "image", "import", str(image.archive)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if proc.returncode != 0:
        raise ImageError(f"ctr image import failed: {(proc.stderr or proc.stdout).strip()}")
    return f"containerd ({address}): imported as {image.reference} in namespace k8s.io"
