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


def test_two_components_whose_volume_names_collide_are_refused() -> None:
    """`libfoo.so` and `libfoo-so` have distinct serials but one volume name (a '.' is
    written '-'): KubeVirt would refuse the VM, and the local runtime would give both disks
    one image. Found by a review."""
    objs = [
        PUB.component("linux", "6.6.0", "kernel", provides=["kernel", "initrd"]),
        PUB.component("debian-minimal", "12.0", "rootfs", provides=["libc"]),
        PUB.component("libfoo.so", "1.0.0", "library", requires=["libc"]),
        PUB.component("libfoo-so", "1.0.0", "library", requires=["libc"]),
        PUB.component("web-app", "1.0.0", "application", requires=["libfoo.so", "libfoo-so"]),
    ]
    objs[2]["metadata"]["name"] = "libfoo.so-1.0.0"  # object names of its publisher's choice
    comps = resolve(BoxRequest.from_spec(_spec("web-app")), [parse_component(o) for o in objs])
    assert {"libfoo.so", "libfoo-so"} <= {c.name for c in comps}
    with pytest.raises(CompositionError, match="share the volume name 'c-libfoo-so'"):
        compose_vm(BOX, _spec("web-app"), comps, None)


def test_the_box_starts_its_own_application_not_an_application_it_depends_on() -> None:
    """A box whose application `web` requires another application-type component
    (`aaa-agent`, first by name) boots `web`: the init starts it and reports its version.
    Before, the first application by name was started. Found by a review."""
    objs = [
        PUB.component("linux", "6.6.0", "kernel", provides=["kernel", "initrd"]),
        PUB.component("debian-minimal", "12.0", "rootfs", provides=["libc"]),
        PUB.component("aaa-agent", "2.0.0", "application", requires=["libc"]),
        PUB.component("web", "1.0.0", "application", requires=["aaa-agent"]),
    ]
    comps = resolve(BoxRequest.from_spec(_spec("web")), [parse_component(o) for o in objs])
    vm = compose_vm(BOX, _spec("web"), comps, None)
    spec = vm["spec"]["template"]["spec"]
    line = spec["domain"]["firmware"]["kernelBoot"]["kernelArgs"]
    assert "gtvp.app=web gtvp.version=1.0.0" in line
    user_data = next(v for v in spec["volumes"] if v["name"] == "cloudinit")
    assert "/opt/gtvp/web/start" in user_data["cloudInitNoCloud"]["userData"]
    assert "aaa-agent/start" not in user_data["cloudInitNoCloud"]["userData"]


def test_a_hot_plugged_component_whose_volume_name_collides_is_refused() -> None:
    """The volume-name check covers hot-plugged components too (they use the same names).
    Found by a review."""
    comps = _resolved(["libfoo-so"])
    hot = PUB.component("libfoo.so", "1.0.0", "library", requires=["libc"])
    hot["metadata"]["name"] = "libfoo.so-1.0.0"
    with pytest.raises(CompositionError, match="share the volume name 'c-libfoo-so'"):
        compose_vm(BOX, _spec("web-app"), comps, None, hotplugged=[parse_component(hot)])


def test_hot_plugged_components_of_a_long_named_box_get_their_own_data_volumes() -> None:
    """A DataVolume name is cut at 63 characters: two components whose names differ only
    past the cut would have shared one DataVolume, each disk reading the other's bytes.
    Found by a review."""
    box = BoxRef("a-box-whose-name-is-rather-long-for-its-own-good", "apps", "uid-1")
    comps = _resolved([])
    hot = []
    for n in ("libcrypto-extras-one", "libcrypto-extras-two"):
        obj = PUB.component(n, "1.0.0", "library", requires=["libc"])
        hot.append(parse_component(obj))
    vm = compose_vm(box, _spec("web-app"), comps, None, hotplugged=hot)
    names = [t["metadata"]["name"] for t in vm["spec"]["dataVolumeTemplates"]]
    assert len(set(names)) == 2
    assert all(len(n) <= 63 and n.startswith("a-box-whose-name") for n in names)
    volumes = vm["spec"]["template"]["spec"]["volumes"]
    assert sorted(v["dataVolume"]["name"] for v in volumes if "dataVolume" in v) == sorted(names)
    short = compose_vm(BOX, _spec("web-app"), comps, None, hotplugged=hot[:1])
    assert [t["metadata"]["name"] for t in short["spec"]["dataVolumeTemplates"]] == [
        "web-c-libcrypto-extras-one"
    ]
