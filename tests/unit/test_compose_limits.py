"""What a composition cannot carry is refused with its reason, never composed half-pinned:
a kernel command line longer than an x86 kernel keeps, two disks the box init could not
tell apart, a kernel without the box init (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from gtvp.core.components import Component, parse_component
from gtvp.core.compose import CMDLINE_MAX, BoxRef, CompositionError, compose_vm
from gtvp.core.resolve import BoxRequest, resolve
from tests.catalogue import Publisher

PUB = Publisher()
BOX = BoxRef("web", "apps", "uid-1")


def _spec(app: str) -> dict[str, Any]:
    return {"application": {"name": app}, "level": 2, "resources": {"cpu": "1", "memory": "256Mi"}}


def _resolved(
    libraries: list[str], app: str = "web-app", kernel: tuple[str, ...] = ("kernel", "initrd")
) -> list[Component]:
    objs = [
        PUB.component("linux", "6.6.0", "kernel", provides=list(kernel)),
        PUB.component("debian-minimal", "12.0", "rootfs", provides=["libc"]),
        *(PUB.component(n, "1.0.0", "library", requires=["libc"]) for n in libraries),
        PUB.component(app, "1.0.0", "application", requires=libraries or ["libc"]),
    ]
    return resolve(BoxRequest.from_spec(_spec(app)), [parse_component(o) for o in objs])


def test_a_box_of_many_components_fits_until_the_command_line_is_full() -> None:
    fits = _resolved([f"lib-{i:02d}" for i in range(15)])
    vm = compose_vm(BOX, _spec("web-app"), fits, None)
    line = vm["spec"]["template"]["spec"]["domain"]["firmware"]["kernelBoot"]["kernelArgs"]
    assert len(line) <= CMDLINE_MAX
    assert line.count(":") == 17  # every disk pinned: rootfs, 15 libraries, the application

    too_many = _resolved([f"library-number-{i:02d}" for i in range(30)])
    with pytest.raises(CompositionError, match=r"kernel command line would be \d+ bytes"):
        compose_vm(BOX, _spec("web-app"), too_many, None)


def test_two_components_whose_disk_serials_collide_are_refused() -> None:
    comps = _resolved(["observability-agent-a", "observability-agent-b"])
    with pytest.raises(CompositionError) as err:
        compose_vm(BOX, _spec("web-app"), comps, None)
    assert "observability-agent-a and observability-agent-b" in str(err.value)
    assert "'observability-agent-'" in str(err.value)


def test_a_kernel_that_brings_no_box_init_is_not_composed() -> None:
    """Without its initrd (gtvp's box init) the kernel would mount the rootfs itself, and no
    component disk would be checked against its pinned digest: refused, with why."""
    comps = _resolved([], kernel=("kernel",))
    with pytest.raises(CompositionError) as err:
        compose_vm(BOX, _spec("web-app"), comps, None)
    assert "kernel component linux 6.6.0 does not provide initrd" in str(err.value)
    assert compose_vm(BOX, _spec("web-app"), _resolved([]), None)["kind"] == "VirtualMachine"
