"""The launcher's pure parts: what a VMI runs, why a VM ended, where disk bytes come from."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gtvp_local.guest.qemu import TranslationError
from gtvp_local.vmruntime.launcher import (
    forwarded_ports,
    last_words,
    machine_for,
    pins_not_held,
    vm_id,
    with_store,
)
from gtvp_local.vmruntime.machine import MachineSpec

REFUSED = "gtvp-init: refused hello-web: sha256 00ff != pinned 4a1b"


def test_the_refusal_is_the_reason_even_when_the_init_says_more_after_it() -> None:
    console = "\n".join(
        [
            "[    1.2] Run /init as init process",
            "gtvp-init: verified and mounted busybox-base (/dev/vda) sha256 c172",
            REFUSED,
            "gtvp-init: halting: disk hello-web does not match its pin; nothing was started",
            "[    3.4] reboot: Power down",
        ]
    )
    assert last_words(console) == REFUSED


def test_a_panic_or_the_last_line_otherwise() -> None:
    assert last_words("boot\nKernel panic - not syncing: VFS\n") == (
        "Kernel panic - not syncing: VFS"
    )
    assert last_words("a\nb\n") == "b"
    assert last_words("") == "the VM ended before its console said anything"


def test_the_store_serves_a_disk_by_its_image_digest_before_the_built_artifact(
    tmp_path: Path,
) -> None:
    built = tmp_path / "built.squashfs"

    def resolve(image: str, path: str | None) -> Path:
        return built

    store = tmp_path / "store"
    store.mkdir()
    ab, cd = "ab" * 32, "cd" * 32
    (store / ab).write_bytes(b"other bytes")
    resolve_ = with_store(resolve, store)
    assert resolve_(f"reg/app@sha256:{ab}", None) == store / ab
    assert resolve_(f"reg/app@sha256:{cd}", None) == built  # nothing served: the artifact
    assert resolve_(f"reg/kernel@sha256:{ab}", "/boot/vmlinuz") == built  # a kernel's files


def test_the_store_reads_no_file_a_digest_does_not_name(tmp_path: Path) -> None:
    """The mirror passes any path it is asked for: a "digest" that is a path must not
    reach a file outside the store (the pool's keys, the host's /etc). Found by a review."""

    def resolve(image: str, path: str | None) -> Path:
        raise LookupError(f"no artifact for {image}")

    store = tmp_path / "store"
    store.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("the pool's CA key")
    resolve_ = with_store(resolve, store)
    for image in (f"x@sha256:{secret}", "x@sha256:../secret", f"x@sha256:{'ab' * 32}/../../secret"):
        with pytest.raises(LookupError):
            resolve_(image, None)


def test_an_ordinary_vmi_runs_the_test_guest_with_at_least_128_mib() -> None:
    asked: list[int] = []

    def guest(mib: int) -> MachineSpec:
        asked.append(mib)
        return MachineSpec(kernel=Path("/k"), memory_mib=mib)

    machine_for({"domain": {"memory": {"guest": "64Mi"}}}, None, guest)
    machine_for({"domain": {"resources": {"requests": {"memory": "512Mi"}}}}, None, guest)
    assert asked == [128, 512]


def test_a_composed_box_without_a_component_store_is_refused() -> None:
    box = {"domain": {"firmware": {"kernelBoot": {"container": {"image": "reg/k@sha256:1"}}}}}
    with pytest.raises(TranslationError, match="no component store"):
        machine_for(box, None, lambda mib: MachineSpec(kernel=Path("/k")))


def _box_spec(pins: dict[str, bytes]) -> dict[str, object]:
    """A composed box's VMI spec pinning each disk (serial -> the bytes it pins)."""
    words = ",".join(f"{s}:{hashlib.sha256(b).hexdigest()}" for s, b in pins.items())
    return {
        "domain": {
            "firmware": {"kernelBoot": {"kernelArgs": f"console=ttyS0 gtvp.disks={words}"}},
            "devices": {"disks": [{"name": f"c-{s}", "serial": s} for s in pins]},
        },
        "volumes": [
            {"name": f"c-{s}", "containerDisk": {"image": f"reg/{s}@sha256:{s}"}} for s in pins
        ],
    }


def test_a_migration_target_whose_copy_of_a_disk_is_not_its_pin_is_refused(
    tmp_path: Path,
) -> None:
    """The box init checked every disk at boot, on the source; after a live migration the
    guest reads the blocks it had not read yet from the target's files, which no init
    checks: the target's copies must be the pinned bytes (as a container runtime pulling
    by digest refuses others), or the VM is not migrated there."""
    genuine = {"busybox-base": b"rootfs" * 1000, "hello-web": b"app" * 1000}
    files = {}
    for serial, data in genuine.items():
        files[f"reg/{serial}@sha256:{serial}"] = tmp_path / serial
        (tmp_path / serial).write_bytes(data)

    def resolve(image: str, path: str | None) -> Path:
        assert path is None
        if image not in files:
            raise FileNotFoundError(f"node-2's component cache holds no {image}")
        return files[image]

    spec = _box_spec(genuine)
    assert pins_not_held(spec, resolve) is None
    (tmp_path / "hello-web").write_bytes(b"app" * 999 + b"evil")
    refused = pins_not_held(spec, resolve)
    assert refused is not None
    assert "disk hello-web" in refused
    assert f"pins sha256:{hashlib.sha256(genuine['hello-web']).hexdigest()}" in refused
    del files["reg/hello-web@sha256:hello-web"]
    assert "holds no reg/hello-web" in str(pins_not_held(spec, resolve))


def test_vm_names_keep_namespace_and_name() -> None:
    assert vm_id("default", "hello") == "default.hello"


def test_the_masquerade_interfaces_tcp_ports_are_forwarded() -> None:
    spec = {
        "domain": {
            "devices": {
                "interfaces": [
                    {"name": "default", "masquerade": {}, "ports": [{"port": 8080}]},
                    {"name": "udp", "masquerade": {}, "ports": [{"port": 53, "protocol": "UDP"}]},
                    {"name": "br", "bridge": {}, "ports": [{"port": 22}]},
                ]
            }
        }
    }
    assert forwarded_ports(spec) == [8080]
    assert forwarded_ports({"domain": {}}) == []
