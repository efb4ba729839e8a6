"""`diskDigest`: a component whose image a registry pins by its manifest's digest tells the
box init the digest of the disk file itself; it is signed, and compose pins it (pure)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from gtvp.core.component_checks import check_component
from gtvp.core.component_signing import canonical_bytes, sign
from gtvp.core.components import ComponentError, parse_component
from gtvp.core.compose import BoxRef, compose_vm, kernel_args
from gtvp.core.resolve import BoxRequest, resolve
from tests.catalogue import Publisher

PUB = Publisher()


def disk_sha(name: str) -> str:
    return hashlib.sha256(f"disk of {name}".encode()).hexdigest()


def with_disk_digest(obj: dict[str, Any], publisher: Publisher = PUB) -> dict[str, Any]:
    """`obj` re-published as a containerDisk: diskDigest set, signed again."""
    spec = {k: v for k, v in obj["spec"].items() if k != "signature"}
    spec["diskDigest"] = "sha256:" + disk_sha(spec["componentName"])
    spec["signature"] = sign(spec, publisher.private_pem, publisher.name)
    return {**obj, "spec": spec}


def catalogue(disk_digests: bool) -> list[dict[str, Any]]:
    objs = [
        PUB.component("linux", "6.6.0", "kernel", provides=["kernel", "initrd"]),
        PUB.component("debian-minimal", "12.0", "rootfs", provides=["libc"]),
        PUB.component("nginx", "1.25.0", "application", requires=["libc"]),
    ]
    if disk_digests:
        objs = [o if o["spec"]["type"] == "kernel" else with_disk_digest(o) for o in objs]
    return objs


SPEC: dict[str, Any] = {
    "application": {"name": "nginx"},
    "dependencies": [{"name": "linux"}],
    "level": 2,
    "resources": {"cpu": "500m", "memory": "256Mi"},
}


def pins(cmdline: str) -> dict[str, str]:
    word = next(w for w in cmdline.split() if w.startswith("gtvp.disks="))
    return dict(item.split(":", 1) for item in word.removeprefix("gtvp.disks=").split(","))


def test_the_init_pins_the_disk_file_not_the_registry_manifest() -> None:
    comps = resolve(BoxRequest.from_spec(SPEC), [parse_component(o) for o in catalogue(True)])
    vm = compose_vm(BoxRef("web", "apps", "uid-1"), SPEC, comps, None)
    boot = vm["spec"]["template"]["spec"]["domain"]["firmware"]["kernelBoot"]
    assert pins(boot["kernelArgs"]) == {
        "debian-minimal": disk_sha("debian-minimal"),
        "nginx": disk_sha("nginx"),
    }
    # the VM still pulls each image by the manifest digest the kubelet checks
    images = {v["containerDisk"]["image"] for v in vm["spec"]["template"]["spec"]["volumes"]
              if "containerDisk" in v}  # fmt: skip
    assert images == {c.image for c in comps if c.type != "kernel"}
    assert all(c.image.endswith("@" + c.digest) for c in comps)
    assert not any(disk_sha(c.name) in c.image for c in comps)


def test_without_disk_digest_the_init_pins_the_image_digest_as_before() -> None:
    comps = resolve(BoxRequest.from_spec(SPEC), [parse_component(o) for o in catalogue(False)])
    assert all(c.disk_digest is None for c in comps)
    assert pins(kernel_args("web", comps)) == {
        c.name: c.digest.removeprefix("sha256:") for c in comps if c.type != "kernel"
    }


def test_a_mixed_composition_pins_each_disk_by_what_its_component_says() -> None:
    objs = catalogue(False)
    objs[2] = with_disk_digest(objs[2])  # only the application is a registry containerDisk
    comps = resolve(BoxRequest.from_spec(SPEC), [parse_component(o) for o in objs])
    root = next(c for c in comps if c.type == "rootfs")
    assert pins(kernel_args("web", comps)) == {
        "debian-minimal": root.digest.removeprefix("sha256:"),
        "nginx": disk_sha("nginx"),
    }


def test_disk_digest_is_signed() -> None:
    obj = with_disk_digest(PUB.component("nginx", "1.25.0", "application"))
    assert check_component(obj, PUB.keys).ok
    forged = {**obj, "spec": {**obj["spec"], "diskDigest": "sha256:" + "0" * 64}}
    check = check_component(forged, PUB.keys)
    assert (check.state, check.reason) == ("Failed", "BadSignature")
    dropped = {**obj, "spec": {k: v for k, v in obj["spec"].items() if k != "diskDigest"}}
    assert check_component(dropped, PUB.keys).reason == "BadSignature"


def test_a_component_without_disk_digest_signs_the_same_bytes_as_before() -> None:
    """Signatures made before the field existed (the sample catalogue's) stay valid."""
    spec = PUB.component("nginx", "1.25.0", "application")["spec"]
    assert b"diskDigest" not in canonical_bytes(spec)
    assert canonical_bytes(spec) == canonical_bytes({**spec, "diskDigest": None})
    assert check_component(PUB.component("nginx", "1.25.0", "application"), PUB.keys).ok


@pytest.mark.parametrize("bad", ["sha256:abc", "md5:" + "0" * 64, "sha256:" + "A" * 64])
def test_an_unreadable_disk_digest_is_reported_on_the_component(bad: str) -> None:
    obj = PUB.component("nginx", "1.25.0", "application")
    obj["spec"]["diskDigest"] = bad
    with pytest.raises(ComponentError, match=r"spec\.diskDigest"):
        parse_component(obj)
