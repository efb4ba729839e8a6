"""OSComponents as the core sees them: parsed, typed, with their cache state.

`parse_component` turns one OSComponent object (as the API server returns it) into a
`Component` or raises `ComponentError` naming the field that cannot be read, so a broken
catalogue entry is reported on that entry and never reaches a box.

A component may carry a signed chunk digest list (`spec.chunks`): its artifact's bytes cut
in fixed-size chunks (the last shorter), the sha256 of each. Whoever moves the bytes (a
member fetching them from several peers at once, a peer-to-peer registry mirror) checks
each chunk against the list as it arrives, so one bad source is caught at its first bad
chunk instead of after the whole file. `chunk_ranges`, `chunk_digests` and `Chunks.check`
are the pure parts of that.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gtvp.core.versions import Version, VersionError, VersionRange

TYPES = ("kernel", "initrd", "rootfs", "library", "application")
SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")  # the CRD's pattern for diskDigest


MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 64 << 20
DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNKS = 4096  # the CRD's maxItems: ~290 KiB of digests, far below etcd's object limit


class ComponentError(ValueError):
    """An OSComponent object that cannot be read."""


def chunk_count(total: int, chunk_bytes: int) -> int:
    """How many chunks of `chunk_bytes` cut `total` bytes (the last one shorter)."""
    if chunk_bytes <= 0 or total < 0:
        raise ValueError(f"cannot cut {total} bytes in chunks of {chunk_bytes}")
    return -(-total // chunk_bytes)


def chunk_ranges(total: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(first byte, byte after the last) of each chunk of `total` bytes."""
    return [
        (start, min(start + chunk_bytes, total))
        for start in range(0, chunk_count(total, chunk_bytes) * chunk_bytes, chunk_bytes)
    ]


def sha256_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def chunk_digests(blocks: Iterable[bytes], chunk_bytes: int) -> list[str]:
    """The chunk digest list of the bytes `blocks` yield in order (blocks of any size)."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk size {chunk_bytes} is not positive")
    out: list[str] = []
    h, filled = hashlib.sha256(), 0
    for block in blocks:
        view = memoryview(block)
        while view:
            take = view[: chunk_bytes - filled]
            h.update(take)
            filled += len(take)
            view = view[len(take) :]
            if filled == chunk_bytes:
                out.append(f"sha256:{h.hexdigest()}")
                h, filled = hashlib.sha256(), 0
    if filled:
        out.append(f"sha256:{h.hexdigest()}")
    return out


@dataclass(frozen=True)
class Chunks:
    """A component's signed chunk digest list over its `total` artifact bytes."""

    size_bytes: int
    digests: tuple[str, ...]
    total: int

    def ranges(self) -> list[tuple[int, int]]:
        return chunk_ranges(self.total, self.size_bytes)

    def check(self, index: int, data: bytes) -> bool:
        """True when `data` is chunk `index` exactly (its length and its digest)."""
        if not 0 <= index < len(self.digests):
            return False
        start, end = self.ranges()[index]
        return len(data) == end - start and sha256_of(data) == self.digests[index]

    def to_spec(self) -> dict[str, Any]:
        return {"sizeBytes": self.size_bytes, "digests": list(self.digests)}


def parse_chunks(raw: Any, total: int) -> Chunks:
    """`spec.chunks` of a component whose artifact is `total` bytes; ComponentError naming
    what is wrong (a chunk size out of bounds, a digest that is not sha256:<64 hex>, more
    than MAX_CHUNKS, or a count that does not cut `total` bytes)."""
    if not isinstance(raw, Mapping):
        raise ComponentError("spec.chunks is not an object {sizeBytes, digests}")
    size = raw.get("sizeBytes")
    if isinstance(size, bool) or not isinstance(size, int):
        raise ComponentError(f"spec.chunks.sizeBytes {size!r} is not an integer")
    if not MIN_CHUNK_BYTES <= size <= MAX_CHUNK_BYTES:
        raise ComponentError(
            f"spec.chunks.sizeBytes {size} is outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}"
        )
    digests = raw.get("digests")
    if not isinstance(digests, list):
        raise ComponentError("spec.chunks.digests is not a list")
    if len(digests) > MAX_CHUNKS:
        raise ComponentError(f"spec.chunks.digests has {len(digests)} entries, over {MAX_CHUNKS}")
    for i, d in enumerate(digests):
        if not isinstance(d, str) or not SHA256.match(d):
            raise ComponentError(f"spec.chunks.digests[{i}] {d!r} is not sha256:<64 hex>")
    want = chunk_count(total, size)
    if len(digests) != want:
        raise ComponentError(
            f"spec.chunks.digests has {len(digests)} entries; {total} bytes (spec.sizeBytes) "
            f"in chunks of {size} make {want}"
        )
    return Chunks(size, tuple(digests), total)


@dataclass(frozen=True)
class Dependency:
    """A name (a componentName or a capability some component provides) and a range."""

    name: str
    versions: VersionRange

    def __str__(self) -> str:
        return f"{self.name} {self.versions.text}".strip()


@dataclass(frozen=True)
class Component:
    object_name: str
    name: str
    version: Version
    type: str
    image: str
    digest: str
    size: int
    requires: tuple[Dependency, ...]
    provides: tuple[str, ...]
    conflicts: tuple[Dependency, ...]
    level: int
    max_uses: int | None
    disk_digest: str | None = None
    """`sha256:<hex>` of the disk file the VM sees, when the image's digest is not that
    (a containerDisk in a registry is pinned by its manifest's digest)."""
    chunks: Chunks | None = None
    """The signed chunk digest list of the artifact's bytes, when the publisher gave one."""
    uid: str = ""
    """The OSComponent object's metadata.uid: which object of `object_name` this is."""

    @property
    def pin(self) -> str:
        """The digest the box init checks the component's disk against: `disk_digest`,
        else `digest` (an image that is the disk file itself)."""
        return self.disk_digest or self.digest

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"

    def offers(self, name: str) -> bool:
        """True if this component answers a requirement on `name`."""
        return name == self.name or name in self.provides


def _deps(items: Any, field: str) -> tuple[Dependency, ...]:
    out = []
    for d in items or []:
        try:
            out.append(Dependency(str(d["name"]), VersionRange.parse(d.get("versions"))))
        except VersionError as exc:
            raise ComponentError(f"spec.{field}[{d.get('name')}]: {exc}") from exc
    return tuple(out)


def parse_component(obj: Mapping[str, Any]) -> Component:
    """Read one OSComponent object; raise ComponentError naming the unreadable field."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    try:
        version = Version.parse(str(spec["version"]))
        kind = str(spec["type"])
        if kind not in TYPES:
            raise ComponentError(f"spec.type {kind!r} is not one of {', '.join(TYPES)}")
        max_uses = spec.get("maxUses")
        disk_digest = spec.get("diskDigest")
        if disk_digest is not None and not SHA256.match(str(disk_digest)):
            raise ComponentError(f"spec.diskDigest {disk_digest!r} is not sha256:<64 hex>")
        size = int(spec.get("sizeBytes", 0))
        raw_chunks = spec.get("chunks")
        chunks = parse_chunks(raw_chunks, size) if raw_chunks is not None else None
        return Component(
            object_name=str(meta.get("name", "")),
            uid=str(meta.get("uid") or ""),
            name=str(spec["componentName"]),
            version=version,
            type=kind,
            image=str(spec["image"]),
            digest=str(spec["digest"]),
            size=size,
            requires=_deps(spec.get("requires"), "requires"),
            provides=tuple(str(p) for p in spec.get("provides") or ()),
            conflicts=_deps(spec.get("conflicts"), "conflicts"),
            level=int(spec.get("level", 1)),
            max_uses=int(max_uses) if max_uses is not None else None,
            disk_digest=str(disk_digest) if disk_digest is not None else None,
            chunks=chunks,
        )
    except VersionError as exc:
        raise ComponentError(f"spec.version: {exc}") from exc
    except KeyError as exc:
        raise ComponentError(f"spec.{exc.args[0]} is missing") from exc
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ComponentError):
            raise
        raise ComponentError(f"unreadable field: {exc}") from exc


def image_digests(node_images: Any) -> frozenset[str]:
    """The digests a node's container runtime holds, from `Node.status.images`."""
    out: set[str] = set()
    for img in node_images or []:
        for name in (img or {}).get("names") or []:
            _, sep, digest = str(name).rpartition("@")
            if sep and digest.startswith("sha256:"):
                out.add(digest)
    return frozenset(out)
