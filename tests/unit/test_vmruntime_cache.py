"""A member's component cache (`gtvp_local.vmruntime.cache`): what a box needs, what the
cache holds and reports as Node.status.images, where a VM's files come from, and the
registry mirror's HTTP side (on loopback here; the member-side fetch is in
tests/e2e/test_component_cache.py)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gtvp_local.vmruntime import cache

REPO = "registry.gtvp.local/gtvp-components"
KERNEL = f"{REPO}/linux@sha256:{'a1' * 32}"
BASE = f"{REPO}/busybox-base@sha256:{'b2' * 32}"
APP = f"{REPO}/hello-web@sha256:{'c3' * 32}"


def _box_spec() -> dict[str, object]:
    return {
        "domain": {
            "firmware": {
                "kernelBoot": {
                    "container": {"image": KERNEL, "kernelPath": "/boot/vmlinuz"},
                    "kernelArgs": "console=ttyS0",
                }
            },
            "devices": {"disks": [{"name": "base"}, {"name": "app"}, {"name": "again"}]},
        },
        "volumes": [
            {"name": "base", "containerDisk": {"image": BASE}},
            {"name": "app", "containerDisk": {"image": APP}},
            {"name": "again", "containerDisk": {"image": BASE}},
            {"name": "cloudinit", "cloudInitNoCloud": {"userData": "x"}},
        ],
    }


def _put(state: Path, member: str, image: str, data: bytes) -> None:
    """What a completed fetch leaves behind."""
    d = cache.ensure(state, member)
    hexpart = cache.digest_hex(image)
    (d / hexpart).write_bytes(data)
    (d / f"{hexpart}.json").write_text(json.dumps({"image": image, "sizeBytes": 1}))


def test_a_box_needs_its_kernel_image_and_each_disk_image_once() -> None:
    assert cache.images_of(_box_spec()) == [KERNEL, BASE, APP]
    assert cache.images_of({"domain": {}}) == []


def test_an_image_is_named_in_the_cache_by_its_pinned_digest_only() -> None:
    assert cache.digest_hex(APP) == "c3" * 32
    short = f"{REPO}/x@sha256:{'c3' * 4}"  # a prefix could name another image's file
    for unpinned in (f"{REPO}/hello-web:1.0", f"{REPO}/x@sha256:../../etc", "x@sha256:", short):
        with pytest.raises(ValueError, match="pins no sha256"):
            cache.digest_hex(unpinned)


def test_what_is_missing_is_decided_by_digest() -> None:
    held = [cache.Record(f"elsewhere/busybox-base@sha256:{'b2' * 32}", 10)]
    assert cache.missing([KERNEL, BASE, APP, KERNEL], held) == [KERNEL, APP]
    assert cache.missing([BASE], held) == []


def test_bytes_the_mirror_changed_since_they_were_fetched_are_fetched_again() -> None:
    held = [cache.Record(BASE, 10, etag='"v1"'), cache.Record(APP, 3, etag='"v1"')]
    now = {BASE: '"v1"', APP: '"v2"'}
    assert cache.missing([BASE, APP], held, now.get) == [APP]
    assert cache.missing([BASE, APP], held, lambda _image: None) == []  # cannot tell: kept


def test_status_images_lists_what_the_cache_holds_with_the_real_sizes(tmp_path: Path) -> None:
    assert cache.listing(tmp_path, "m1") == []  # no cache yet: nothing
    _put(tmp_path, "m1", APP, b"x" * 4096)
    _put(tmp_path, "m1", BASE, b"y" * 123)
    d = cache.member_dir(tmp_path, "m1")
    (d / f"{cache.digest_hex(KERNEL)}.part").write_bytes(b"half a download")  # no record
    (d / f"{'d4' * 32}.json").write_text(json.dumps({"image": f"{REPO}/gone@sha256:{'d4' * 32}",
                                                     "sizeBytes": 9}))  # fmt: skip
    assert cache.listing(tmp_path, "m1") == [
        {"names": [BASE], "sizeBytes": 123},  # the file's size, not the record's
        {"names": [APP], "sizeBytes": 4096},
    ]
    assert cache.listing(tmp_path, "m2") == []
    assert cache.members(tmp_path) == ["m1"]


def test_a_vms_files_come_from_the_members_cache(tmp_path: Path) -> None:
    vmlinuz = b"\x7fkernel bytes" * 100
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("boot/vmlinuz")
        info.size = len(vmlinuz)
        tar.addfile(info, io.BytesIO(vmlinuz))
    _put(tmp_path, "m1", KERNEL, buf.getvalue())
    _put(tmp_path, "m1", APP, b"app")
    resolve = cache.resolver(tmp_path, "m1")
    d = cache.member_dir(tmp_path, "m1")
    assert resolve(APP, None) == d / cache.digest_hex(APP)
    kernel = resolve(KERNEL, "/boot/vmlinuz")
    assert kernel.parent.parent == d
    assert kernel.read_bytes() == vmlinuz
    with pytest.raises(FileNotFoundError, match=r"holds no /boot/initrd\.img"):
        resolve(KERNEL, "/boot/initrd.img")
    with pytest.raises(FileNotFoundError, match="m1's component cache holds no"):
        resolve(BASE, None)  # not fetched: no shared path to fall back on
    with pytest.raises(FileNotFoundError):
        cache.resolver(tmp_path, "m2")(APP, None)


def test_the_mirror_serves_what_its_source_says_an_image_is(tmp_path: Path) -> None:
    served = tmp_path / "app.squashfs"
    served.write_bytes(b"the mirror's bytes")

    def source(image: str) -> Path:
        if image != APP:
            raise LookupError(f"no artifact for image {image}")
        return served

    assert cache.image_of_path(cache.mirror_url("h", 1, APP).split("h:1", 1)[1]) == APP
    with cache.Mirror(source, host="127.0.0.1") as mirror:
        with urllib.request.urlopen(mirror.url(APP), timeout=5) as answer:  # noqa: S310
            assert answer.read() == b"the mirror's bytes"
            assert answer.headers["ETag"] == mirror.etag(APP)
        assert mirror.etag(APP) == cache.etag_of(hashlib.sha256(b"the mirror's bytes").hexdigest())
        assert mirror.etag(BASE) is None
        served.write_bytes(b"a lie")
        assert mirror.etag(APP) == cache.etag_of(hashlib.sha256(b"a lie").hexdigest())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(mirror.url(BASE), timeout=5)  # noqa: S310
        assert err.value.code == 404


def test_a_kernel_path_never_leaves_the_cache_directory() -> None:
    assert "/" not in cache.file_name("/../../etc/passwd")
