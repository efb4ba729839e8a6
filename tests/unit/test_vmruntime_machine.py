"""qemu command lines and the test guest's initramfs, assembled without running anything."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from gtvp_local.vmruntime import guest
from gtvp_local.vmruntime.machine import MachineSpec, in_netns, qemu_argv, tcp_uri

SPEC = MachineSpec(kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd"), memory_mib=192)


def _opt(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_tcg_argv() -> None:
    argv = qemu_argv(
        SPEC, name="web", accel="tcg", qmp=Path("/s/web.qmp"), console=Path("/c/web.log")
    )
    assert argv[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-reboot"):
        assert flag in argv
    assert _opt(argv, "-accel").startswith("tcg")
    assert _opt(argv, "-m") == "192"
    assert _opt(argv, "-qmp") == "unix:/s/web.qmp,server=on,wait=off"
    assert _opt(argv, "-chardev") == "file,id=console,path=/c/web.log,append=on"
    assert _opt(argv, "-serial") == "chardev:console"
    assert _opt(argv, "-kernel") == "/k/vmlinuz"
    assert _opt(argv, "-initrd") == "/k/initrd"
    assert "console=ttyS0" in _opt(argv, "-append")
    assert "-incoming" not in argv


def test_target_argv_is_the_source_argv_plus_incoming() -> None:
    kw = {"name": "web", "accel": "kvm", "qmp": Path("/q"), "console": Path("/c")}
    src = qemu_argv(SPEC, **kw)  # type: ignore[arg-type]
    dst = qemu_argv(SPEC, incoming="defer", **kw)  # type: ignore[arg-type]
    assert dst == [*src, "-incoming", "defer"]
    assert _opt(src, "-accel") == "kvm"
    assert _opt(src, "-cpu") == "host"


def test_bad_specs_are_refused() -> None:
    kw = {"name": "x", "qmp": Path("/q"), "console": Path("/c")}
    with pytest.raises(ValueError, match="accel"):
        qemu_argv(SPEC, accel="hvf", **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="16 MiB"):
        qemu_argv(MachineSpec(kernel=Path("/k"), memory_mib=8), accel="tcg", **kw)  # type: ignore[arg-type]


def test_spec_round_trips_through_json() -> None:
    spec = MachineSpec(kernel=Path("/k"), extra=("-device", "virtio-rng-pci"))
    assert MachineSpec.from_json(spec.to_json()) == spec
    assert MachineSpec.from_json(SPEC.to_json()) == SPEC


def test_netns_wrapper_and_uri() -> None:
    assert in_netns("gtvpvm-a", ["qemu", "-m", "1"], ip="/sbin/ip") == [
        "/sbin/ip", "netns", "exec", "gtvpvm-a", "qemu", "-m", "1",
    ]  # fmt: skip
    assert tcp_uri("10.77.0.3", 49200) == "tcp:10.77.0.3:49200"


def _parse_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    out = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = f[1], f[6], (f[9], f[10]), f[11]
        assert f[2] == f[3] == f[5] == 0  # root-owned, time 0
        name_at = pos + 110
        name = data[name_at : name_at + namesize - 1].decode()
        pos = name_at + namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        pos += size + (-size % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body, rdev)


def test_initramfs_is_reproducible_and_complete() -> None:
    fake = b"\x7fELF busybox"
    one, two = guest.build_initramfs(fake), guest.build_initramfs(fake)
    assert one == two
    files = _parse_newc(gzip.decompress(one))
    assert files["bin/busybox"][1] == fake
    assert files["bin/sh"][:2] == (0o120777, b"busybox")
    assert files["dev/console"][2] == (5, 1)
    init = files["init"][1].decode()
    assert files["init"][0] == 0o100755
    assert 'echo "GTVP-READY test"' in init
    assert "gtvp-uptime" in init
    assert "/proc/uptime" in init


def test_qmp_sockets_fit_a_unix_socket_address(tmp_path: Path) -> None:
    from gtvp_local.vmruntime.runtime import SUN_PATH_MAX, socket_dir

    short = socket_dir(Path("/s"))
    assert short == Path("/s/vmruntime/qmp")
    deep = tmp_path / ("d" * 90)
    long_dir = socket_dir(deep)
    assert long_dir.name.startswith("gtvpvm-")
    assert long_dir == socket_dir(deep)  # stable for one state
    assert len(str(long_dir / "gtvpvm-web.0.qmp")) <= SUN_PATH_MAX


def test_forwarded_ports_are_served_on_the_members_address() -> None:
    spec = MachineSpec(kernel=Path("/k"), forwards=(8080, 9090))
    argv = qemu_argv(
        spec, name="web", accel="tcg", qmp=Path("/q"), console=Path("/c"), address="10.77.0.3"
    )
    assert _opt(argv, "-netdev") == (
        "user,id=net0,hostfwd=tcp:10.77.0.3:8080-:8080,hostfwd=tcp:10.77.0.3:9090-:9090"
    )
    assert _opt(argv, "-device") == "virtio-net-pci,netdev=net0"
    assert "-nic" not in argv
    assert MachineSpec.from_json(spec.to_json()) == spec  # a migration target gets them too
    with pytest.raises(ValueError, match="address"):
        qemu_argv(spec, name="web", accel="tcg", qmp=Path("/q"), console=Path("/c"))
    no_ports = qemu_argv(SPEC, name="web", accel="tcg", qmp=Path("/q"), console=Path("/c"))
    assert _opt(no_ports, "-nic") == "none"
