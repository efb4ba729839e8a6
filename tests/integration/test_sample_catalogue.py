"""The sample catalogue is real: crds/samples/oscomponents.yaml pins, byte for byte, what
this machine builds from the pinned Debian packages, and the build refuses a package whose
bytes are not the pinned ones.

Real: apt-get download from Debian's archive, dpkg-deb, mksquashfs, the reproducible build.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from gtvp.core.component_checks import check_component
from gtvp.local_state import cache_dir
from gtvp_local.guest import pins, samples
from gtvp_local.guest.build import BuildError, guest_cache
from gtvp_local.pool import sample_publisher_keys
from tests.prerequisites import unavailable


@pytest.fixture(scope="module")
def built() -> list[dict[str, object]]:
    missing = [t for t in ("apt-get", "dpkg-deb", "mksquashfs") if not shutil.which(t)]
    if missing:
        unavailable(f"the guest build needs {', '.join(missing)} (make setup)")
    try:
        return samples.built_docs()
    except BuildError as exc:
        unavailable(f"cannot build the guest components: {exc}")


def test_the_samples_pin_exactly_what_the_pinned_packages_build(
    built: list[dict[str, object]],
) -> None:
    on_file = samples.load(samples.samples_path())
    assert samples.differences(built, on_file) == []  # digests, sizes, images, signatures
    assert {d["spec"]["type"] for d in on_file} == {"kernel", "rootfs", "library", "application"}
    keys = sample_publisher_keys()  # the sample policy's demo publisher
    for doc in on_file:
        assert check_component(doc, keys).ok, doc["metadata"]["name"]


def test_a_changed_sample_digest_is_reported_by_name(built: list[dict[str, object]]) -> None:
    on_file = samples.load(samples.samples_path())
    app = next(d for d in on_file if d["spec"]["type"] == "application")
    app["spec"]["digest"] = "sha256:" + "0" * 64
    diff = samples.differences(built, on_file)
    assert len(diff) == 1
    assert diff[0].startswith(f"{app['metadata']['name']}: digest 'sha256:000")


def test_a_cached_package_with_other_bytes_is_refused(
    built: list[dict[str, object]], tmp_path: Path
) -> None:
    """A .deb in the cache (or from a mirror) that is not the pinned file stops the build."""
    cached = guest_cache(cache_dir()) / "debs" / pins.BUSYBOX.filename
    debs = tmp_path / "debs"
    debs.mkdir()
    forged = bytearray(cached.read_bytes())
    forged[len(forged) // 2] ^= 0xFF
    (debs / pins.BUSYBOX.filename).write_bytes(bytes(forged))
    with pytest.raises(
        pins.PinError, match=re.escape(f"pins busybox-static {pins.BUSYBOX.version}")
    ):
        pins.fetch(pins.BUSYBOX, debs)


def test_a_version_debian_does_not_serve_says_how_to_re_pin(tmp_path: Path) -> None:
    if not shutil.which("apt-get"):
        unavailable("apt-get is not installed")
    gone = pins.DebPin("busybox-static", "1:0.0.1-1", "0" * 64)
    with pytest.raises(pins.PinError) as err:
        pins.fetch(gone, tmp_path)
    assert "apt-get download busybox-static=1:0.0.1-1 failed" in str(err.value)
    assert "make samples" in str(err.value)


def _build_digests(_: int) -> list[tuple[str, str]]:
    from gtvp_local.guest.build import build_catalogue

    return sorted((key, a.sha256) for key, a in build_catalogue(cache_dir()).items())


def test_builders_at_the_same_time_take_turns_and_build_the_same_bytes(
    built: list[dict[str, object]],
) -> None:
    """The stand-in, a test and a benchmark may build the catalogue at once (into the one
    cache): none of them fails on another's half-written file."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(3) as workers:
        got = workers.map(_build_digests, range(3))
    assert got[0] == got[1] == got[2]
    pinned = {f"{d['metadata']['name']}": d for d in built}  # type: ignore[index]
    assert len(got[0]) == len(pinned)
