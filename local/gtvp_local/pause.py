"""The pod sandbox ("pause") image for the real node, built here: nothing is pulled.

A five-line C program compiled with `gcc -static`, packed by hand into a one-layer OCI
archive (uncompressed layer, fixed timestamps, so the same compiler output gives the same
digest) and tagged with the reference containerd's CRI plugin is configured to use.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

from gtvp.local_state import cache_dir

PAUSE_REFERENCE = "registry.k8s.io/pause:3.10"

PAUSE_C = r"""
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void quit(int s) { (void)s; _exit(0); }
static void reap(int s) { (void)s; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  signal(SIGINT, quit); signal(SIGTERM, quit); signal(SIGCHLD, reap);
  for (;;) pause();
}
"""


class PauseError(RuntimeError):
    """The pause image could not be built; the message says what is missing."""


def _tar_bytes(members: list[tuple[str, bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_archive(binary: bytes, reference: str = PAUSE_REFERENCE) -> bytes:
    """A one-layer OCI image archive holding `/pause`, named `reference` for containerd."""
    layer = _tar_bytes([("pause", binary, 0o755)])
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": _digest(layer),
                    "size": len(layer),
                }
            ],
        },
        sort_keys=True,
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "annotations": {
                        "io.containerd.image.name": reference,
                        "org.opencontainers.image.ref.name": reference.rsplit(":", 1)[-1],
                    },
                }
            ],
        },
        sort_keys=True,
    ).encode()
    blobs = [
        (f"blobs/sha256/{_digest(b).split(':', 1)[1]}", b, 0o644) for b in (layer, config, manifest)
    ]
    layout = b'{"imageLayoutVersion":"1.0.0"}'
    return _tar_bytes([("oci-layout", layout, 0o644), ("index.json", index, 0o644), *blobs])


def ensure_archive() -> Path:
    """Build (once, cached by the source's hash) and return the pause image's OCI archive."""
    key = hashlib.sha256(PAUSE_C.encode()).hexdigest()[:12]
    out = cache_dir() / "images" / f"pause-{key}.oci.tar"
    if out.is_file():
        return out
    gcc = shutil.which("gcc")
    if gcc is None:
        raise PauseError("gcc is not installed: the pause image is compiled here (make setup)")
    work = out.parent / f"pause-{key}.build"
    work.mkdir(parents=True, exist_ok=True)
    (work / "pause.c").write_text(PAUSE_C)
    proc = subprocess.run(
        [gcc, "-static", "-Os", "-s", "-o", str(work / "pause"), str(work / "pause.c")],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise PauseError(
            f"compiling the pause program failed (static libc missing? install libc6-dev):\n"
            f"{proc.stderr.strip()[-800:]}"
        )
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(oci_archive((work / "pause").read_bytes()))
    tmp.replace(out)
    shutil.rmtree(work, ignore_errors=True)
    return out
