"""The launcher's pure parts: what a VMI runs, why a VM ended, where disk bytes come from."""

from __future__ import annotations

from pathlib import Path

import pytest

from gtvp_local.guest.qemu import TranslationError
from gtvp_local.vmruntime.launcher import (
    forwarded_ports,
    last_words,
    machine_for,
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
    (store / "ab12").write_bytes(b"other bytes")
    resolve_ = with_store(resolve, store)
    assert resolve_("reg/app@sha256:ab12", None) == store / "ab12"
    assert resolve_("reg/app@sha256:cd34", None) == built  # nothing served: the artifact
    assert resolve_("reg/kernel@sha256:ab12", "/boot/vmlinuz") == built  # files in a kernel image


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
