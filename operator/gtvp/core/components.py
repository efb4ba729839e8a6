"""OSComponents as the core sees them: parsed, typed, with their cache state.

`parse_component` turns one OSComponent object (as the API server returns it) into a
`Component` or raises `ComponentError` naming the field that cannot be read, so a broken
catalogue entry is reported on that entry and never reaches a box.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gtvp.core.versions import Version, VersionError, VersionRange

TYPES = ("kernel", "initrd", "rootfs", "library", "application")
SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")  # the CRD's pattern for diskDigest


class ComponentError(ValueError):
    """An OSComponent object that cannot be read."""


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
        return Component(
            object_name=str(meta.get("name", "")),
            name=str(spec["componentName"]),
            version=version,
            type=kind,
            image=str(spec["image"]),
            digest=str(spec["digest"]),
            size=int(spec.get("sizeBytes", 0)),
            requires=_deps(spec.get("requires"), "requires"),
            provides=tuple(str(p) for p in spec.get("provides") or ()),
            conflicts=_deps(spec.get("conflicts"), "conflicts"),
            level=int(spec.get("level", 1)),
            max_uses=int(max_uses) if max_uses is not None else None,
            disk_digest=str(disk_digest) if disk_digest is not None else None,
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
