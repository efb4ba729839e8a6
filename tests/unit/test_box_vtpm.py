"""A box VM's vTPM and user data disk, as the runtime lays them out (pure parts), and the
order of the box init's measurements."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gtvp_local.guest.initscript import MEASURED_PCR, init_script
from gtvp_local.vmruntime.launcher import (
    UserDataError,
    cloud_init_file,
    machine_for,
    user_data,
    write_user_data,
)
from gtvp_local.vmruntime.machine import MachineSpec, qemu_argv

KERNEL_IMAGE = "reg/linux@sha256:" + "1" * 64
APP_IMAGE = "reg/app@sha256:" + "2" * 64


def _box(cloud_init: Mapping[str, Any] | None = None, **devices: Any) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [{"name": "app", "containerDisk": {"image": APP_IMAGE}}]
    disks: list[dict[str, Any]] = [{"name": "app", "disk": {"bus": "virtio"}, "serial": "app"}]
    if cloud_init is not None:
        volumes.append({"name": "cloudinit", "cloudInitNoCloud": dict(cloud_init)})
        disks.append({"name": "cloudinit", "disk": {"bus": "virtio"}})
    return {
        "domain": {
            "firmware": {
                "kernelBoot": {
                    "container": {"image": KERNEL_IMAGE, "kernelPath": "/boot/vmlinuz"},
                    "kernelArgs": "console=ttyS0",
                }
            },
            "memory": {"guest": "256Mi"},
            "devices": {"disks": disks, **devices},
        },
        "volumes": volumes,
    }


def _resolve(image: str, path: str | None) -> Path:
    return Path("/files") / image.rsplit(":", 1)[1][:4] / (path or "disk").lstrip("/")


def _argv(spec: MachineSpec, **kw: Any) -> list[str]:
    return qemu_argv(
        spec, name="vm", accel="tcg", qmp=Path("/q"), console=Path("/c"), address="10.77.0.2", **kw
    )


VTPM = {"tpm": {"persistent": True}}  # what gtvp.core.boxattest.with_vtpm asks for


def test_a_composed_box_gets_a_tpm_on_its_swtpm_and_a_nic() -> None:
    spec = machine_for(_box(**VTPM), _resolve, lambda mib: MachineSpec(kernel=Path("/k")))
    assert spec.tpm
    assert spec.nic
    argv = _argv(spec, tpm_socket=Path("/run/x.tpm"))
    joined = " ".join(argv)
    assert "-chardev socket,id=chrtpm,path=/run/x.tpm" in joined
    assert "-tpmdev emulator,id=tpm0,chardev=chrtpm" in joined
    assert "-device tpm-crb,tpmdev=tpm0" in joined
    assert "-device virtio-net-pci,netdev=net0" in joined
    assert "-nic none" not in joined
    with pytest.raises(ValueError, match="control socket"):
        _argv(spec)  # a TPM machine without its swtpm does not start
    assert MachineSpec.from_json(spec.to_json()) == spec  # the record keeps both


def test_the_test_guest_and_a_box_without_pod_interface_get_neither() -> None:
    guest = machine_for({"domain": {}}, None, lambda mib: MachineSpec(kernel=Path("/k")))
    joined = " ".join(_argv(guest))
    assert "tpm" not in joined
    assert "-nic none" in joined
    box = machine_for(_box(autoattachPodInterface=False, **VTPM), _resolve, lambda mib: guest)
    assert not box.nic
    assert box.tpm


def test_a_box_gets_a_vtpm_only_when_its_spec_asks_for_one() -> None:
    """As virt-launcher: `domain.devices.tpm` (gtvp adds it when the policy attests boxes)."""
    make = lambda mib: MachineSpec(kernel=Path("/k"))  # noqa: E731
    assert not machine_for(_box(), _resolve, make).tpm
    assert not machine_for(_box(tpm={"enabled": False}), _resolve, make).tpm
    assert machine_for(_box(tpm={}), _resolve, make).tpm


def test_the_user_data_is_a_raw_disk_with_serial_cloudinit(tmp_path: Path) -> None:
    data = b"#cloud-config\n#gtvp-attest eyJ2IjoxfQ==\n"
    path = write_user_data(tmp_path, data)
    raw = path.read_bytes()
    assert raw.startswith(data)
    assert len(raw) % 512 == 0
    assert raw[len(data) :] == bytes(len(raw) - len(data))
    assert write_user_data(tmp_path, data) == path  # named by its content: a target reopens it
    spec = machine_for(_box({"userData": "x"}), _resolve, lambda mib: MachineSpec(Path("/k")), path)
    joined = " ".join(_argv(spec, tpm_socket=Path("/t")))
    assert f"file={path},if=none,format=raw,readonly=on,id=d-cloudinit-data" in joined
    assert "virtio-blk-pci,drive=d-cloudinit-data,serial=cloudinit" in joined
    assert cloud_init_file(spec.extra) == path
    # without a file, no disk (as before)
    plain = machine_for(_box({"userData": "x"}), _resolve, lambda mib: MachineSpec(Path("/k")))
    assert "serial=cloudinit" not in " ".join(plain.extra)
    assert cloud_init_file(plain.extra) is None


def test_user_data_inline_base64_or_from_the_secret() -> None:
    secrets = {("ns", "box-ci"): {"userdata": b"#from the secret\n"}}

    def read(ns: str, name: str) -> Mapping[str, bytes] | None:
        return secrets.get((ns, name))

    assert user_data(_box({"userData": "#inline\n"}), "ns", read) == b"#inline\n"
    b64 = base64.b64encode(b"#b64\n").decode()
    assert user_data(_box({"userDataBase64": b64}), "ns", read) == b"#b64\n"
    ref = _box({"secretRef": {"name": "box-ci"}})
    assert user_data(ref, "ns", read) == b"#from the secret\n"
    assert user_data(_box(), "ns", read) is None
    with pytest.raises(UserDataError, match="does not exist"):
        user_data(ref, "other", read)
    with pytest.raises(UserDataError, match="no API"):
        user_data(ref, "ns", None)


def test_the_init_measures_each_disk_before_it_checks_and_mounts_it() -> None:
    init = init_script([])
    extend = init.index(f'"$ATTEST" extend {MEASURED_PCR} "$got"')
    check = init.index('if [ "$got" != "$want" ]')
    mount = init.index("mount -t squashfs")
    assert extend < check < mount
    # PCR 13 is printed after the loop; the client starts before the application, which
    # may wait in its start for Secrets released once the vTPM is attested
    assert init.index('"$ATTEST" pcr 13') > mount
    assert init.index("gtvp-box-attest run") < init.index('"/opt/gtvp/$GTVP_APP/start"')
