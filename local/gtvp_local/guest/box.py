"""Compose a box from the built catalogue and boot it under qemu (the test harness).

The composed VirtualMachine is exactly what the operator writes (`compose_vm` over the
components parsed from the artifacts' OSComponent manifests: one version of each, the
newest unless told otherwise); `resolver` maps the image references of every artifact built
(every version) back to their local files, as a container runtime would pull them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gtvp.core.boxattest import with_vtpm
from gtvp.core.components import parse_component
from gtvp.core.compose import BoxRef, compose_vm
from gtvp_local.guest.build import APP_NAME, Artifact, component_manifest, composition
from gtvp_local.guest.qemu import Resolver


class UnknownImage(LookupError):
    """An image reference (or a path in it) that no built artifact answers."""


def resolver(catalogue: Mapping[str, Artifact], overrides: Mapping[str, Path] = {}) -> Resolver:
    """image (+ path inside a kernel-boot container) → local file. `overrides` replaces the
    file behind an image (a test's tampered copy)."""
    by_image = {a.image: a for a in catalogue.values()}

    def resolve(image: str, path: str | None) -> Path:
        a = by_image.get(image)
        if a is None:
            raise UnknownImage(f"no artifact for image {image}")
        if path is None:
            return overrides.get(image, a.path)
        try:
            return a.files[path]
        except KeyError:
            raise UnknownImage(f"{image} holds no {path}") from None

    return resolve


def compose_box(
    catalogue: Mapping[str, Artifact],
    *,
    box: str = "hello",
    memory: str = "256Mi",
    cpu: str = "1",
    app_version: str | None = None,
    vtpm: bool = True,
) -> dict[str, Any]:
    """The VirtualMachine the operator would compose for a box running the application (at
    `app_version`, else its newest), with the newest of every other component; `vtpm`: with
    the vTPM gtvp asks for when its policy attests boxes (`gtvp.core.boxattest.with_vtpm`)."""
    pinned = {} if app_version is None else {APP_NAME: app_version}
    comps = [parse_component(component_manifest(a)) for a in composition(catalogue, pinned)]
    spec = {
        "application": {"name": APP_NAME},
        "level": 3,
        "resources": {"cpu": cpu, "memory": memory},
    }
    vm = compose_vm(
        BoxRef(box, "default", "00000000-0000-4000-8000-000000000000"), spec, comps, None
    )
    return with_vtpm(vm) if vtpm else vm
