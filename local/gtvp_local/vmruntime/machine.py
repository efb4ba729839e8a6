"""Pure assembly of a qemu command line for a runtime VM (no side effects)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QEMU = "qemu-system-x86_64"
DEFAULT_APPEND = "console=ttyS0 panic=-1 quiet"
ACCELS = ("kvm", "tcg")


@dataclass(frozen=True)
class MachineSpec:
    """What a VM is made of: the same spec starts its source and any migration target
    (a migration needs the same machine on both sides)."""

    kernel: Path
    initrd: Path | None = None
    append: str = DEFAULT_APPEND
    memory_mib: int = 128
    cpus: int = 1
    machine: str = "pc"
    extra: tuple[str, ...] = field(default_factory=tuple)
    forwards: tuple[int, ...] = ()
    """Guest TCP ports served on the member's address (one virtio NIC on qemu's user
    network, `hostfwd` bound to the address of whichever member runs the VM)."""
    nic: bool = False
    """A virtio NIC on qemu's user network even without forwards (the pod network a
    KubeVirt VMI gets by default): the guest reaches the member's network through it."""
    tpm: bool = False
    """A TPM 2.0 (tpm-crb) on qemu's tpm-emulator backend: the runtime runs one swtpm per
    VM process and passes its control socket (`qemu_argv(tpm_socket=...)`)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel": str(self.kernel),
            "initrd": None if self.initrd is None else str(self.initrd),
            "append": self.append,
            "memory_mib": self.memory_mib,
            "cpus": self.cpus,
            "machine": self.machine,
            "extra": list(self.extra),
            "forwards": list(self.forwards),
            "nic": self.nic,
            "tpm": self.tpm,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MachineSpec:
        initrd = data.get("initrd")
        return cls(
            kernel=Path(data["kernel"]),
            initrd=None if initrd is None else Path(initrd),
            append=str(data.get("append", DEFAULT_APPEND)),
            memory_mib=int(data.get("memory_mib", 128)),
            cpus=int(data.get("cpus", 1)),
            machine=str(data.get("machine", "pc")),
            extra=tuple(str(a) for a in data.get("extra", ())),
            forwards=tuple(int(p) for p in data.get("forwards", ())),
            nic=bool(data.get("nic", False)),
            tpm=bool(data.get("tpm", False)),
        )


def qemu_argv(
    spec: MachineSpec,
    *,
    name: str,
    accel: str,
    qmp: Path,
    console: Path,
    incoming: str | None = None,
    binary: str = QEMU,
    address: str | None = None,
    tpm_socket: Path | None = None,
) -> list[str]:
    """The qemu command line: no default devices, no reboot (a guest that reboots or panics
    ends its qemu), no display, no NIC; the serial console appended to `console` (a
    migration target appends to the same file, so the VM has one console log), QMP on the
    unix socket `qmp`; `incoming="defer"` for a target that waits for `migrate-incoming`;
    the spec's `forwards` served on `address` (the member's: a migration target binds its
    own, so the service answers where the VM runs); a spec with `tpm` gets a tpm-crb device
    on the swtpm whose control socket is `tpm_socket`."""
    if accel not in ACCELS:
        raise ValueError(f"accel {accel!r} is not one of {ACCELS}")
    if spec.memory_mib < 16 or spec.cpus < 1:
        raise ValueError("a VM needs at least 16 MiB and one CPU")
    argv = [
        binary,
        "-name", f"guest={name},debug-threads=on",
        "-machine", spec.machine,
        "-accel", "kvm" if accel == "kvm" else "tcg,tb-size=64",
        "-cpu", "host" if accel == "kvm" else "max",
        "-m", str(spec.memory_mib),
        "-smp", str(spec.cpus),
        "-nodefaults", "-no-reboot", "-no-user-config",
        "-display", "none",
        "-chardev", f"file,id=console,path={console},append=on",
        "-serial", "chardev:console",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-msg", "timestamp=on",
        "-kernel", str(spec.kernel),
    ]  # fmt: skip
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    if spec.append:
        argv += ["-append", spec.append]
    if spec.forwards or spec.nic:
        if spec.forwards and address is None:
            raise ValueError("forwarded ports need the member's address")
        fwd = "".join(f",hostfwd=tcp:{address}:{p}-:{p}" for p in spec.forwards)
        argv += ["-netdev", f"user,id=net0{fwd}", "-device", "virtio-net-pci,netdev=net0"]
    else:
        argv += ["-nic", "none"]
    if spec.tpm:
        if tpm_socket is None:
            raise ValueError("a machine with a TPM needs its swtpm's control socket")
        argv += tpm_args(tpm_socket)
    argv += list(spec.extra)
    if incoming is not None:
        argv += ["-incoming", incoming]
    return argv


def tpm_args(ctrl: Path) -> list[str]:
    """qemu's TPM 2.0 on the tpm-emulator backend: the swtpm at control socket `ctrl`."""
    return [
        "-chardev", f"socket,id=chrtpm,path={ctrl}",
        "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
        "-device", "tpm-crb,tpmdev=tpm0",
    ]  # fmt: skip


def in_netns(netns: str, argv: Sequence[str], *, ip: str = "/usr/sbin/ip") -> list[str]:
    """Run `argv` in a network namespace (`ip netns exec` execs it: same pid)."""
    return [ip, "netns", "exec", netns, *argv]


def tcp_uri(address: str, port: int) -> str:
    return f"tcp:{address}:{port}"
