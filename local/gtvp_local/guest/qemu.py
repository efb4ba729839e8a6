"""A composed box's VMI spec → a qemu command line, the way virt-launcher translates a VMI.

`qemu_argv` is pure: it reads what compose writes (the kernel-boot container with its kernel
and initrd paths and kernelArgs, virtio disks with serials backed by containerDisk volumes,
CPU and memory) and asks `resolve(image, path)` for the local file behind an image (`path`
is a file inside a kernel-boot container, or None for a containerDisk's disk image).
The gtvp init reads its instructions from the kernel command line, not from cloud-init; the
cloudInitNoCloud volume's user data is attached only when the caller wrote it to a file
(`cloud_init`: a raw read-only virtio disk with serial `cloudinit`, where the box's
attestation client finds its `#gtvp-attest` line). The pod network becomes one virtio NIC
on QEMU user networking (with host port forwards for tests).

`probe_accel` and `Boot` (below) are the test harness: start one VM, watch its serial console.
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gtvp.core.quantity import cpu_millis, memory_bytes
from gtvp_local.vmruntime import machine
from gtvp_local.vmruntime.machine import MachineSpec

Resolver = Callable[[str, "str | None"], Path]
QEMU = "qemu-system-x86_64"
MiB = 1024 * 1024


class TranslationError(ValueError):
    """A VMI spec this translation cannot run; the message names the field."""


@dataclass(frozen=True)
class QemuOptions:
    console: Path  # the serial console is written to this file
    accel: str = "tcg"
    hostfwd: Sequence[tuple[int, int]] = ()  # (127.0.0.1 port, guest port)
    network: bool = True
    qemu: str = QEMU
    extra_kernel_args: str = ""


def vmi_spec_of(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The VMI spec of a VirtualMachine, a VMI template, a VMI or a bare VMI spec."""
    spec: Mapping[str, Any] = obj.get("spec", obj)
    if "template" in spec:
        spec = spec["template"].get("spec", {})
    if "domain" not in spec:
        raise TranslationError("no spec.domain: not a VirtualMachine or VMI")
    return spec


def guest_memory_mib(spec: Mapping[str, Any]) -> int:
    domain = spec["domain"]
    res = domain.get("resources") or {}
    text = (
        (domain.get("memory") or {}).get("guest")
        or (res.get("limits") or {}).get("memory")
        or (res.get("requests") or {}).get("memory")
    )
    if not text:
        raise TranslationError("spec.domain has neither memory.guest nor a memory request")
    return max(1, math.ceil(memory_bytes(text) / MiB))


def guest_cpus(spec: Mapping[str, Any]) -> int:
    domain = spec["domain"]
    cpu = domain.get("cpu") or {}
    if cpu.get("cores") or cpu.get("sockets") or cpu.get("threads"):
        return int(cpu.get("cores", 1)) * int(cpu.get("sockets", 1)) * int(cpu.get("threads", 1))
    res = domain.get("resources") or {}
    text = (res.get("limits") or {}).get("cpu") or (res.get("requests") or {}).get("cpu")
    return max(1, math.ceil(cpu_millis(text) / 1000)) if text else 1


def _drive_id(name: str) -> str:
    return "d-" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)


def machine_spec(
    vm_or_spec: Mapping[str, Any],
    resolve: Resolver,
    *,
    network: bool = True,
    hostfwd: Sequence[tuple[int, int]] = (),
    extra_kernel_args: str = "",
    cloud_init: Path | None = None,
) -> MachineSpec:
    """What qemu runs for a composed VM/VMI (see the module docstring): the runtime
    (`gtvp_local.vmruntime`) adds the console, QMP, acceleration and, for a migration
    target, `-incoming`. `hostfwd`: (127.0.0.1 port, guest port) forwards on the user
    network (the test harness's; the runtime's VMs run in their member's namespace)."""
    spec = vmi_spec_of(vm_or_spec)
    domain = spec["domain"]
    kb = (domain.get("firmware") or {}).get("kernelBoot") or {}
    container = kb.get("container") or {}
    if not container.get("image") or not container.get("kernelPath"):
        raise TranslationError(
            "spec.domain.firmware.kernelBoot.container needs image and kernelPath"
        )
    initrd = (
        resolve(container["image"], container["initrdPath"])
        if container.get("initrdPath")
        else None
    )
    extra: list[str] = []
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    disks = (domain.get("devices") or {}).get("disks") or []
    for disk in sorted(disks, key=lambda d: d.get("bootOrder", 1 << 30)):
        vol = volumes.get(disk["name"])
        if vol is None:
            raise TranslationError(f"disk {disk['name']} has no volume")
        if "cloudInitNoCloud" in vol:
            if cloud_init is not None:
                extra += user_data_disk(cloud_init)
            continue
        if "containerDisk" not in vol:
            raise TranslationError(
                f"volume {disk['name']}: only containerDisk volumes run here "
                f"(got {', '.join(k for k in vol if k != 'name')})"
            )
        bus = (disk.get("disk") or {}).get("bus", "virtio")
        if bus != "virtio":
            raise TranslationError(f"disk {disk['name']}: bus {bus!r} (virtio only)")
        drive = _drive_id(disk["name"])
        path = resolve(vol["containerDisk"]["image"], None)
        extra += ["-drive", f"file={path},if=none,format=raw,readonly=on,id={drive}"]
        device = f"virtio-blk-pci,drive={drive}"
        if disk.get("serial"):
            device += f",serial={disk['serial']}"
        extra += ["-device", device]
    if network:
        netdev = "user,id=net0" + "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in hostfwd)
        extra += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0"]
    return MachineSpec(
        kernel=resolve(container["image"], container["kernelPath"]),
        initrd=initrd,
        append=" ".join(w for w in (kb.get("kernelArgs", ""), extra_kernel_args) if w),
        memory_mib=guest_memory_mib(spec),
        cpus=guest_cpus(spec),
        machine="q35",
        extra=tuple(extra),
    )


USER_DATA_SERIAL = "cloudinit"


def user_data_disk(path: Path) -> list[str]:
    """The user data file as a raw read-only virtio disk with serial `cloudinit`."""
    return [
        "-drive", f"file={path},if=none,format=raw,readonly=on,id=d-cloudinit-data",
        "-device", f"virtio-blk-pci,drive=d-cloudinit-data,serial={USER_DATA_SERIAL}",
    ]  # fmt: skip


def qemu_argv(vm_or_spec: Mapping[str, Any], resolve: Resolver, options: QemuOptions) -> list[str]:
    """The whole qemu argv for a composed VM/VMI in the test harness: `machine_spec`, as the
    runtime's assembler (`vmruntime.machine.qemu_argv`) lays it out, QMP beside the
    console."""
    spec = machine_spec(
        vm_or_spec,
        resolve,
        network=options.network,
        hostfwd=options.hostfwd,
        extra_kernel_args=options.extra_kernel_args,
    )
    return machine.qemu_argv(
        spec,
        name="gtvp-box",
        accel=options.accel,
        qmp=options.console.with_suffix(".qmp"),
        console=options.console,
        binary=options.qemu,
    )


# --- the harness: one VM at a time, its console in a file ----------------------------------


class Boot:
    """A running qemu whose serial console is read from `options.console`."""

    def __init__(self, argv: Sequence[str], console: Path) -> None:
        console.unlink(missing_ok=True)
        console.touch()
        self.console = console
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    def text(self) -> str:
        return self.console.read_text(errors="replace")

    def wait_for(self, marker: str, timeout_s: float) -> float | None:
        """Seconds since start when `marker` appeared on the console; None on timeout or
        when qemu exited without it."""
        deadline = self.started + timeout_s
        while time.monotonic() < deadline:
            if marker in self.text():
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                return time.monotonic() - self.started if marker in self.text() else None
            time.sleep(0.1)
        return None

    def wait_exit(self, timeout_s: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def qemu_output(self) -> str:
        if self.proc.poll() is None or self.proc.stdout is None:
            return ""
        return self.proc.stdout.read().decode(errors="replace")

    def __enter__(self) -> Boot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def probe_accel() -> str:
    """ "kvm" when KVM works on this machine, else "tcg" (`vmruntime.runtime.probe_accel`,
    cached per boot; `GTVP_VM_ACCEL` forces one)."""
    from gtvp_local.vmruntime import runtime

    return runtime.probe_accel(runtime.guest_spec())
