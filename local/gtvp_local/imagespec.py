"""What gtvp's container image is, decided without touching the machine (pure functions).

One image holds both programs (`gtvp-operator`, the default entrypoint, and `gtvp-agent`):
Debian's python3 and TSS libraries in a `debootstrap --variant=minbase` root filesystem, gtvp
and its Python dependencies in a virtualenv at /opt/gtvp, run as uid 65532. `gtvp_local.images`
does the I/O (debootstrap, chroot, pip, umoci, runc); this module decides the package lists,
the cache key (fingerprint), the umoci/debootstrap arguments, the runtime spec patch for the
checks and how to read an OCI image layout. kind/Dockerfile builds the same image with
Docker/Podman/buildah (a unit test keeps the two in step).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
REPOSITORY = "ghcr.io/gtvp/gtvp"  # charts/gtvp/values.yaml image.repository
VENV = "/opt/gtvp"
UID = 65532
USER = f"{UID}:{UID}"

RUNTIME_PACKAGES: tuple[str, ...] = (
    "python3",
    # what tpm2-pytss's extension links (ESAPI, the TCTI loader, marshalling, response codes,
    # FAPI: Debian's libtss2-dev ships it, so tpm2-pytss links it) and the TCTIs the agent
    # loads: device (/dev/tpmrm0) and swtpm (test rigs)
    "libtss2-esys-3.0.2-0",
    "libtss2-fapi1",
    "libtss2-mu0",
    "libtss2-rc0",
    "libtss2-sys1",
    "libtss2-tctildr0",
    "libtss2-tcti-device0",
    "libtss2-tcti-swtpm0",
)
"""Installed by debootstrap into the image's root filesystem (plus minbase's own)."""

BUILD_PACKAGES: tuple[str, ...] = (
    "python3-venv",
    "python3-dev",
    "gcc",
    "libc6-dev",
    "pkg-config",
    "libtss2-dev",
    "libffi-dev",
)
"""Only in the builder stage (a copy of the base): pip builds tpm2-pytss's C extension there."""

ENV: tuple[str, ...] = (
    f"PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    # the root filesystem is read-only: every module is precompiled, Python never tries to write
    "PYTHONDONTWRITEBYTECODE=1",
    "PYTHONUNBUFFERED=1",
    "LANG=C.UTF-8",
)
ENTRYPOINTS: tuple[str, ...] = ("gtvp-operator", "gtvp-agent")
PASSWD_LINE = f"nonroot:x:{UID}:{UID}:gtvp (non-root):/nonexistent:/usr/sbin/nologin"
GROUP_LINE = f"nonroot:x:{UID}:"

_SKIP_PARTS = frozenset({"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", "build"})


@dataclass(frozen=True)
class ImageSpec:
    """Everything the image's content and config follow from, besides the source files."""

    tag: str
    mirror: str = DEFAULT_MIRROR
    suite: str = SUITE
    repository: str = REPOSITORY
    runtime_packages: tuple[str, ...] = RUNTIME_PACKAGES
    build_packages: tuple[str, ...] = BUILD_PACKAGES
    user: str = USER
    env: tuple[str, ...] = ENV
    entrypoint: tuple[str, ...] = (f"{VENV}/bin/{ENTRYPOINTS[0]}",)
    architecture: str = "amd64"
    """The OCI architecture: the build machine's (debootstrap builds for the host)."""

    @property
    def reference(self) -> str:
        """The image reference the chart expects: repository:appVersion."""
        return f"{self.repository}:{self.tag}"

    def labels(self, fingerprint: str) -> dict[str, str]:
        return {
            "org.opencontainers.image.title": "gtvp",
            "org.opencontainers.image.description": "gtvp-operator and gtvp-agent",
            "org.opencontainers.image.version": self.tag,
            "org.opencontainers.image.source": "https://github.com/gtvp/gtvp",
            "org.opencontainers.image.licenses": "Apache-2.0",
            "org.opencontainers.image.base.name": f"debian:{self.suite} (debootstrap minbase)",
            "io.gtvp.entrypoints": " ".join(ENTRYPOINTS),
            "io.gtvp.fingerprint": fingerprint,
        }


def chart_app_version(chart_yaml: str) -> str:
    """appVersion from charts/gtvp/Chart.yaml's text (the tag the chart's image defaults to)."""
    m = re.search(r"^appVersion:\s*[\"']?([^\"'\s#]+)", chart_yaml, re.MULTILINE)
    if not m:
        raise ValueError("Chart.yaml has no appVersion")
    return m.group(1)


def oci_architecture(machine: str) -> str:
    """The OCI/Debian architecture name for `platform.machine()`."""
    names = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64", "amd64": "amd64"}
    try:
        return names[machine.lower()]
    except KeyError:
        raise ValueError(f"no image build for machine type {machine!r}") from None


def debian_mirror(sources: Iterable[str], suite: str = SUITE) -> str | None:
    """The first http(s) URI that serves `suite` itself (not -security/-updates) in apt's
    sources (one-line `deb URI suite ...` or deb822 `URIs:`/`Suites:` stanzas)."""
    for text in sources:
        for uris, suites in _source_entries(text):
            if suite in suites:
                for uri in uris:
                    if uri.startswith(("http://", "https://")):
                        return uri.rstrip("/")
    return None


def _source_entries(text: str) -> list[tuple[list[str], list[str]]]:
    entries: list[tuple[list[str], list[str]]] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for raw in stanza.splitlines():
            line = raw.split("#", 1)[0].strip()
            if line.startswith("deb "):
                words = re.sub(r"\[[^]]*\]", " ", line).split()
                if len(words) >= 3:
                    entries.append(([words[1]], [words[2]]))
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
        if "deb" in fields.get("types", "").split() and "uris" in fields:
            entries.append((fields["uris"].split(), fields.get("suites", "").split()))
    return entries


def is_package_source(rel_path: str) -> bool:
    """Whether a file under the repository goes into the image (and so into its fingerprint)."""
    parts = rel_path.split("/")
    if any(p in _SKIP_PARTS or p.endswith(".egg-info") for p in parts):
        return False
    return not rel_path.endswith((".pyc", ".pyo"))


def fingerprint(spec: ImageSpec, files: Iterable[tuple[str, bytes]]) -> str:
    """The cache key: the spec, and every (path, content) that goes into the image."""
    h = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode())
    for path, content in sorted(files):
        h.update(b"\0" + path.encode() + b"\0" + hashlib.sha256(content).digest())
    return h.hexdigest()[:16]


def base_fingerprint(spec: ImageSpec, recipe: str) -> str:
    """The key of the cached root filesystems (base and builder): Debian's side only."""
    parts = [spec.suite, spec.mirror, *spec.runtime_packages, "|", *spec.build_packages, recipe]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def debootstrap_args(spec: ImageSpec, target: str, cache: str) -> list[str]:
    return [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(spec.runtime_packages)}",
        f"--cache-dir={cache}",
        spec.suite,
        target,
        spec.mirror,
    ]


def umoci_config_args(spec: ImageSpec, image: str, fingerprint: str, created: str) -> list[str]:
    """`umoci config` for the image: user, entrypoint (no cmd), env, labels, workdir."""
    args = [
        "umoci",
        "config",
        "--image",
        image,
        "--no-history",
        f"--config.user={spec.user}",
        "--config.workingdir=/",
        "--clear=config.cmd",
        "--clear=config.entrypoint",
        "--clear=config.env",
        f"--created={created}",
        "--author=gtvp (gtvp local images)",
        "--os=linux",
        f"--architecture={spec.architecture}",
    ]
    args += [f"--config.entrypoint={part}" for part in spec.entrypoint]
    args += [f"--config.env={e}" for e in spec.env]
    args += [f"--config.label={k}={v}" for k, v in spec.labels(fingerprint).items()]
    return args


def runtime_spec(
    bundle_spec: Mapping[str, Any],
    args: Sequence[str],
    *,
    host_network: bool = False,
    mounts: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """umoci's runtime spec for the unpacked image, changed to run `args` once, without a
    terminal, on a read-only root (as the chart runs the operator); `host_network` leaves
    the network namespace out (to reach an swtpm or an API server on the host's loopback);
    `mounts` are read-only binds (host path, path in the container), as a pod's Secrets."""
    spec: dict[str, Any] = json.loads(json.dumps(bundle_spec))
    spec["process"]["args"] = list(args)
    spec["process"]["terminal"] = False
    spec["root"]["readonly"] = True
    spec["mounts"] = [
        *spec.get("mounts", []),
        *(
            {"destination": dest, "type": "bind", "source": src, "options": ["rbind", "ro"]}
            for src, dest in mounts
        ),
    ]
    if host_network:
        linux = spec.setdefault("linux", {})
        linux["namespaces"] = [n for n in linux.get("namespaces", []) if n["type"] != "network"]
    return spec


def manifest_descriptor(index: Mapping[str, Any], tag: str) -> dict[str, Any]:
    """The manifest descriptor tagged `tag` in an OCI image layout's index.json."""
    for m in index.get("manifests", []):
        if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag:
            return dict(m)
    raise KeyError(f"no manifest tagged {tag!r} in the image index")


def archive_index(index: Mapping[str, Any], tag: str, reference: str) -> dict[str, Any]:
    """The index.json written into the archive: only `tag`'s manifest, with the full
    reference as containerd's image-name annotation (`ctr image import` names it so)."""
    desc = manifest_descriptor(index, tag)
    desc["annotations"] = {
        "org.opencontainers.image.ref.name": tag,
        "io.containerd.image.name": reference,
    }
    return {"schemaVersion": 2, "manifests": [desc]}


def blob_path(digest: str) -> str:
    algo, _, hexdigest = digest.partition(":")
    return f"blobs/{algo}/{hexdigest}"
