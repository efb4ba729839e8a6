"""The Debian packages the guest components are built from, pinned by version and sha256.

The sample catalogue (`crds/samples/oscomponents.yaml`) pins the digests of the components
built from exactly these packages, so a build on any machine must start from the same
bytes: `fetch` downloads the pinned version with `apt-get download PACKAGE=VERSION` into
`<cache>/guest/debs` and refuses a file whose sha256 differs from the pin.

The pins name versions of Debian's bookworm *point release* (the `bookworm` suite), which
stay served until the next point release; `bookworm-security` versions are replaced within
weeks. When Debian stops serving a pinned version, the build stops with the exact apt
error and what to do: pin the version Debian serves now (`python -m gtvp_local.guest.samples
--candidates` prints it with its sha256), then `make samples` re-signs the sample
catalogue with the new digests.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gtvp_local.guest.reproducible import sha256_file

PINS_FILE = "local/gtvp_local/guest/pins.py"


@dataclass(frozen=True)
class DebPin:
    """A Debian binary package at one version, with the sha256 of its .deb."""

    package: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        """The name the cache keeps the .deb under (no epoch colon in file names)."""
        return f"{self.package}_{self.version.replace(':', '%3a')}_amd64.deb"


KERNEL = DebPin(
    "linux-image-6.1.0-50-cloud-amd64",
    "6.1.176-1",
    "efe19f605b6f54a8352e68d85a629abb2d30b72a085faef603a9152590baa791",
)
BUSYBOX = DebPin(
    "busybox-static",
    "1:1.35.0-4+deb12u1+b1",
    "3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744",
)

# the library layer (`glibc`): the C library and its tools, exactly as Debian ships them
LIBC6 = DebPin(
    "libc6",
    "2.36-9+deb12u14",
    "ba4f88f73dbc3ae9055f3c20f4523bfdbaf1ad13ff95e258924f77d20b4fbedf",
)
LIBC_BIN = DebPin(
    "libc-bin",
    "2.36-9+deb12u14",
    "e667401af91fad95f15b3ebd25d1abd8373fd18b00dc32219678413170544e84",
)


class PinError(RuntimeError):
    """A pinned package cannot be had, or its bytes are not the pinned ones."""


def check(pin: DebPin, path: Path) -> None:
    """Raise PinError unless `path` holds the pinned bytes."""
    got = sha256_file(path)
    if got != pin.sha256:
        raise PinError(
            f"{path.name}: sha256 {got}, but {PINS_FILE} pins {pin.package} {pin.version} "
            f"at {pin.sha256}: not the pinned file (altered, or rebuilt under the same version)"
        )


def fetch(pin: DebPin, debs: Path) -> Path:
    """The pinned .deb in `debs`: the cached file when its sha256 matches, else
    `apt-get download PACKAGE=VERSION` (checked before it is kept)."""
    debs.mkdir(parents=True, exist_ok=True)
    target = debs / pin.filename
    if target.is_file():
        check(pin, target)
        return target
    with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
        # apt's sandbox user cannot write into a root-only temporary directory
        Path(tmp).chmod(0o755)
        out = subprocess.run(
            ["apt-get", "download", f"{pin.package}={pin.version}"],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
        )
        got = sorted(Path(tmp).glob("*.deb"))
        if out.returncode != 0 or len(got) != 1:
            raise PinError(
                f"apt-get download {pin.package}={pin.version} failed: "
                f"{out.stderr.strip()[-400:] or out.stdout.strip()[-400:]}\n"
                f"If Debian no longer serves this version, pin the one it serves now in "
                f"{PINS_FILE} (python -m gtvp_local.guest.samples --candidates prints it) "
                "and run `make samples` to re-sign the sample catalogue."
            )
        check(pin, got[0])
        got[0].replace(target)
    return target


def candidates() -> list[str]:
    """What Debian serves now for the pinned packages (`apt-cache madison`), to re-pin."""
    lines = []
    for pin in (KERNEL, BUSYBOX, LIBC6, LIBC_BIN):
        meta = "linux-image-cloud-amd64" if pin is KERNEL else pin.package
        out = subprocess.run(
            ["apt-cache", "madison", meta], capture_output=True, text=True, check=False
        )
        lines.append(f"{pin.package} pinned {pin.version}; Debian serves for {meta}:")
        lines.extend(f"  {ln.strip()}" for ln in out.stdout.splitlines())
    return lines
