"""The box init's command line and the VMI → qemu translation (pure)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gtvp.core.components import parse_component
from gtvp.core.compose import BoxRef, compose_vm, kernel_args, overlay_order
from gtvp.core.resolve import BoxRequest, resolve
from gtvp_local.guest.initscript import (
    CmdlineError,
    Module,
    PinnedDisk,
    init_script,
    parse_cmdline,
    parse_disks,
)
from gtvp_local.guest.qemu import (
    QemuOptions,
    TranslationError,
    guest_cpus,
    guest_memory_mib,
    qemu_argv,
)
from tests.catalogue import Publisher

PUB = Publisher()
CAT = [
    parse_component(o)
    for o in [
        *PUB.web_catalogue(),
        PUB.component("linux-initrd", "6.6.0", "kernel", provides=["kernel", "initrd"]),
        PUB.component("curl", "8.0.0", requires=["libc"]),
    ]
]
SPEC: dict[str, Any] = {
    "application": {"name": "nginx"},
    "dependencies": [{"name": "debian-minimal"}, {"name": "linux-initrd"}],
    "level": 2,
    "resources": {"cpu": "500m", "memory": "256Mi"},
}
COMPS = resolve(BoxRequest.from_spec(SPEC), CAT)
VM = compose_vm(BoxRef("web", "apps", "uid-1"), SPEC, COMPS, "node-1")


def by_name(name: str) -> Any:
    return next(c for c in COMPS if c.name == name)


def fake_resolve(image: str, path: str | None) -> Path:
    name = image.rsplit("/", maxsplit=1)[-1].split("@", maxsplit=1)[0]
    return Path("/art") / (f"{name}{path}" if path else f"{name}.squashfs")


# -- the command line -----------------------------------------------------------------------


def test_kernel_args_pin_every_disk_in_overlay_order() -> None:
    words = parse_cmdline(
        VM["spec"]["template"]["spec"]["domain"]["firmware"]["kernelBoot"]["kernelArgs"]
    )
    assert words["console"] == "ttyS0"
    assert (words["gtvp.box"], words["gtvp.app"], words["gtvp.version"]) == (
        "web",
        "nginx",
        "1.26.2",
    )
    disks = parse_disks(words["gtvp.disks"])
    assert [d.serial for d in disks] == ["debian-minimal", "glibc", "openssl", "nginx"]
    for d in disks:
        assert "sha256:" + d.sha256 == by_name(d.serial).digest


def test_every_pinned_disk_is_a_disk_of_the_vm_with_that_serial() -> None:
    tmpl = VM["spec"]["template"]["spec"]
    serials = {d.get("serial") for d in tmpl["domain"]["devices"]["disks"]}
    words = parse_cmdline(tmpl["domain"]["firmware"]["kernelBoot"]["kernelArgs"])
    assert {d.serial for d in parse_disks(words["gtvp.disks"])} <= serials


def test_overlay_order_puts_requirements_first_whatever_the_input_order() -> None:
    order = [c.name for c in overlay_order(list(reversed(COMPS)))]
    assert order == ["debian-minimal", "glibc", "openssl", "nginx"]
    assert "linux-initrd" not in order


def test_kernel_args_without_an_application() -> None:
    comps = [c for c in COMPS if c.type in ("kernel", "rootfs")]
    words = parse_cmdline(kernel_args("bare", comps))
    assert "gtvp.app" not in words
    assert [d.serial for d in parse_disks(words["gtvp.disks"])] == ["debian-minimal"]


@pytest.mark.parametrize(
    "value",
    ["nocolon", "x:abc", "bad serial:" + "0" * 64, "a" * 21 + ":" + "0" * 64, "x:" + "A" * 64],
)
def test_unreadable_disk_lists_are_refused(value: str) -> None:
    with pytest.raises(CmdlineError):
        parse_disks(value)


def test_parse_disks_keeps_order() -> None:
    a, b = "a" * 64, "b" * 64
    assert parse_disks(f"base:{a},app:{b}") == [PinnedDisk("base", a), PinnedDisk("app", b)]


# -- the init script ------------------------------------------------------------------------


def test_init_loads_modules_in_order_and_refuses_mismatches() -> None:
    text = init_script([Module("virtio_ring"), Module("virtio"), Module("virtio_blk")])
    assert text.startswith("#!/bin/sh\n")
    pos = [text.index(f"insmod /lib/gtvp/{m}.ko") for m in ("virtio_ring", "virtio", "virtio_blk")]
    assert pos == sorted(pos)
    assert 'echo "gtvp-init: refused $serial: sha256 $got != pinned $want"' in text
    assert text.index("refused") < text.index("mount -t squashfs")  # hashed before mounted
    assert text.index("mount -t squashfs") < text.index("switch_root")
    assert "GTVP-READY $GTVP_BOX $GTVP_VERSION" in text


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox is not installed")
def test_init_is_valid_busybox_sh(tmp_path: Path) -> None:
    script = tmp_path / "init"
    script.write_text(init_script([Module("squashfs")]))
    out = subprocess.run(
        ["busybox", "sh", "-n", str(script)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr


# -- the VMI → qemu translation -------------------------------------------------------------


def argv(**kw: Any) -> list[str]:
    return qemu_argv(VM, fake_resolve, QemuOptions(console=Path("/tmp/c.log"), **kw))


def value_of(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_translation_boots_the_kernel_and_initrd_of_the_kernel_container() -> None:
    args = argv()
    assert args[0] == "qemu-system-x86_64"
    assert {"-nodefaults", "-no-reboot"} <= set(args)
    assert value_of(args, "-kernel") == ["/art/linux-initrd/boot/vmlinuz"]
    assert value_of(args, "-initrd") == ["/art/linux-initrd/boot/initrd.img"]
    kb = VM["spec"]["template"]["spec"]["domain"]["firmware"]["kernelBoot"]
    assert value_of(args, "-append") == [kb["kernelArgs"]]
    assert value_of(args, "-m") == ["256"]
    assert value_of(args, "-smp") == ["1"]
    assert value_of(args, "-chardev") == ["file,id=console,path=/tmp/c.log,append=on"]
    assert value_of(args, "-machine") == ["q35"]
    assert value_of(args, "-accel") == ["tcg,tb-size=64"]


def test_translation_attaches_each_container_disk_read_only_with_its_serial() -> None:
    args = argv()
    drives = value_of(args, "-drive")
    devices = [d for d in value_of(args, "-device") if d.startswith("virtio-blk-pci")]
    assert len(drives) == len(devices) == 4  # rootfs, glibc, openssl, nginx; no cloud-init
    assert (
        drives[0] == "file=/art/debian-minimal.squashfs,if=none,format=raw,readonly=on,id=d-rootfs"
    )
    assert devices[0] == "virtio-blk-pci,drive=d-rootfs,serial=debian-minimal"
    for drive, device in zip(drives, devices, strict=True):
        assert "readonly=on" in drive
        assert drive.rsplit("id=", 1)[1] == device.split("drive=")[1].split(",")[0]
    assert sorted(d.rsplit("serial=", 1)[1] for d in devices) == sorted(
        ["debian-minimal", "glibc", "openssl", "nginx"]
    )


def test_translation_network_and_port_forwards() -> None:
    args = argv(hostfwd=[(18080, 8080)], accel="kvm")
    assert value_of(args, "-netdev") == ["user,id=net0,hostfwd=tcp:127.0.0.1:18080-:8080"]
    assert "virtio-net-pci,netdev=net0" in value_of(args, "-device")
    assert value_of(args, "-accel") == ["kvm"]
    assert "-netdev" not in argv(network=False)


def test_kernel_without_initrd_gets_no_initrd() -> None:
    """An ordinary VM (not a box) whose kernel boot names no initrd boots without one."""
    vm = compose_vm(BoxRef("w", "a", "u"), SPEC, resolve(BoxRequest.from_spec(SPEC), CAT), None)
    boot = vm["spec"]["template"]["spec"]["domain"]["firmware"]["kernelBoot"]
    del boot["container"]["initrdPath"]
    args = qemu_argv(vm, fake_resolve, QemuOptions(console=Path("/c")))
    assert value_of(args, "-kernel") == ["/art/linux-initrd/boot/vmlinuz"]
    assert "-initrd" not in args


def test_hotplugged_datavolumes_are_not_translated() -> None:
    curl = next(c for c in CAT if c.name == "curl")
    vm = compose_vm(BoxRef("h", "a", "u"), SPEC, COMPS, None, hotplugged=[curl])
    with pytest.raises(TranslationError, match="containerDisk"):
        qemu_argv(vm, fake_resolve, QemuOptions(console=Path("/c")))


@pytest.mark.parametrize(
    ("domain", "mib", "cpus"),
    [
        ({"resources": {"requests": {"memory": "1Gi", "cpu": "2"}}}, 1024, 2),
        ({"resources": {"requests": {"memory": "300M", "cpu": "1500m"}}}, 287, 2),
        ({"memory": {"guest": "128Mi"}, "cpu": {"cores": 2, "sockets": 2}}, 128, 4),
    ],
)
def test_memory_and_cpus(domain: dict[str, Any], mib: int, cpus: int) -> None:
    spec = {"domain": domain}
    assert guest_memory_mib(spec) == mib
    assert guest_cpus(spec) == cpus


def test_a_spec_without_kernel_boot_is_refused() -> None:
    with pytest.raises(TranslationError, match="kernelBoot"):
        qemu_argv(
            {"domain": {"resources": {"requests": {"memory": "1Gi"}}}},
            fake_resolve,
            QemuOptions(console=Path("/c")),
        )
