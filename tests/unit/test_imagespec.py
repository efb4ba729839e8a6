"""What gtvp's image is, decided without building it: the cache key, the Debian mirror found in
apt's sources, the umoci config, the runtime spec the checks use, and kind/Dockerfile kept in
step with the daemonless build (the same packages, user, env and entrypoint)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gtvp_local import images, imagespec
from gtvp_local.imagespec import ImageSpec

ROOT = Path(__file__).resolve().parents[2]

DEB822 = """Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""


def test_the_tag_is_the_charts_app_version_and_the_reference_what_the_chart_runs() -> None:
    chart = (ROOT / "charts" / "gtvp" / "Chart.yaml").read_text()
    tag = imagespec.chart_app_version(chart)
    assert tag == "0.1.0"
    values = (ROOT / "charts" / "gtvp" / "values.yaml").read_text()
    assert f"repository: {imagespec.REPOSITORY}" in values
    assert re.search(r'^\s+tag: ""', values, re.MULTILINE)  # the tag defaults to appVersion
    assert ImageSpec(tag=tag).reference == "ghcr.io/gtvp/gtvp:0.1.0"
    assert imagespec.chart_app_version('appVersion: "1.2.3"  # x\n') == "1.2.3"
    with pytest.raises(ValueError, match="appVersion"):
        imagespec.chart_app_version("version: 1\n")


def test_the_mirror_is_the_one_apt_uses_for_the_suite_itself() -> None:
    google = "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n"
    assert imagespec.debian_mirror([google, DEB822]) == "http://deb.debian.org/debian"
    one_line = "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main\n"
    assert imagespec.debian_mirror([one_line]) == "http://mirror.example/debian"
    assert imagespec.debian_mirror(["# deb http://old/debian bookworm main\n"]) is None
    security_only = DEB822.split("\n\n", 1)[1]
    assert imagespec.debian_mirror([security_only]) is None


def test_the_fingerprint_follows_sources_and_spec_and_nothing_else() -> None:
    spec = ImageSpec(tag="0.1.0")
    files = [("operator/gtvp/a.py", b"x = 1\n"), ("pyproject.toml", b"[project]\n")]
    fp = imagespec.fingerprint(spec, files)
    assert fp == imagespec.fingerprint(spec, list(reversed(files)))  # order does not matter
    assert fp != imagespec.fingerprint(spec, [*files[:1], ("pyproject.toml", b"[x]\n")])
    assert fp != imagespec.fingerprint(spec, files[:1])
    assert fp != imagespec.fingerprint(ImageSpec(tag="0.2.0"), files)
    assert fp != imagespec.fingerprint(ImageSpec(tag="0.1.0", suite="trixie"), files)
    assert fp != imagespec.fingerprint(ImageSpec(tag="0.1.0", mirror="http://m/debian"), files)
    base = imagespec.base_fingerprint(spec, "r1")
    assert base == imagespec.base_fingerprint(ImageSpec(tag="0.2.0"), "r1")  # gtvp's side only
    assert base != imagespec.base_fingerprint(spec, "r2")


def test_only_package_sources_go_into_the_image() -> None:
    assert imagespec.is_package_source("operator/gtvp/cli.py")
    assert imagespec.is_package_source("operator/gtvp/manifests/x.yaml")
    assert not imagespec.is_package_source("operator/gtvp/__pycache__/cli.cpython-311.pyc")
    assert not imagespec.is_package_source("operator/gtvp.egg-info/PKG-INFO")
    assert not imagespec.is_package_source("attestation-agent/build/lib/x.py")
    names = {name for name, _ in images.source_files(ROOT)}
    assert {"pyproject.toml", "README.md", "operator/gtvp/operator_main.py"} <= names
    assert "attestation-agent/gtvp_agent/main.py" in names
    assert not any(n.startswith(("local/", "tests/")) for n in names)


def test_umoci_config_sets_user_entrypoint_env_and_labels() -> None:
    spec = ImageSpec(tag="0.1.0")
    args = imagespec.umoci_config_args(spec, "/l:0.1.0", "abc", "2026-01-01T00:00:00Z")
    assert args[:4] == ["umoci", "config", "--image", "/l:0.1.0"]
    assert "--config.user=65532:65532" in args
    assert "--config.entrypoint=/opt/gtvp/bin/gtvp-operator" in args
    assert "--config.env=PYTHONDONTWRITEBYTECODE=1" in args
    assert "--config.label=io.gtvp.entrypoints=gtvp-operator gtvp-agent" in args
    assert "--config.label=io.gtvp.fingerprint=abc" in args
    assert "--config.label=org.opencontainers.image.version=0.1.0" in args
    assert "--architecture=amd64" in args
    arm = imagespec.umoci_config_args(ImageSpec(tag="0.1.0", architecture="arm64"), "i", "f", "c")
    assert "--architecture=arm64" in arm
    assert imagespec.oci_architecture("x86_64") == "amd64"
    assert imagespec.oci_architecture("aarch64") == "arm64"
    with pytest.raises(ValueError, match="s390x"):
        imagespec.oci_architecture("s390x")
    path = next(a for a in args if a.startswith("--config.env=PATH="))
    assert path.split("=", 2)[2].startswith("/opt/gtvp/bin:")


def test_debootstrap_is_minbase_with_the_runtime_packages_only() -> None:
    args = imagespec.debootstrap_args(ImageSpec(tag="0.1.0"), "/r", "/c")
    assert args[:2] == ["debootstrap", "--variant=minbase"]
    included = args[2].removeprefix("--include=").split(",")
    assert "python3" in included
    assert "libtss2-tcti-device0" in included
    assert not set(included) & set(imagespec.BUILD_PACKAGES)  # no compiler in the image
    assert args[-3:] == ["bookworm", "/r", "http://deb.debian.org/debian"]


def test_the_runtime_spec_runs_once_on_a_read_only_root() -> None:
    bundle = {
        "process": {"args": ["/opt/gtvp/bin/gtvp-operator"], "terminal": True},
        "root": {"path": "rootfs", "readonly": False},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]},
    }
    spec = imagespec.runtime_spec(bundle, ["gtvp-operator", "--version"])
    assert spec["process"] == {"args": ["gtvp-operator", "--version"], "terminal": False}
    assert spec["root"]["readonly"] is True
    assert {"type": "network"} in spec["linux"]["namespaces"]
    assert bundle["root"]["readonly"] is False  # the bundle's own spec is left alone
    host = imagespec.runtime_spec(bundle, ["true"], host_network=True)
    assert {"type": "network"} not in host["linux"]["namespaces"]


def test_the_archive_index_names_the_image_for_containerd() -> None:
    index = {
        "schemaVersion": 2,
        "manifests": [
            {"digest": "sha256:aa", "annotations": {"org.opencontainers.image.ref.name": "old"}},
            {"digest": "sha256:bb", "annotations": {"org.opencontainers.image.ref.name": "0.1.0"}},
        ],
    }
    out = imagespec.archive_index(index, "0.1.0", "ghcr.io/gtvp/gtvp:0.1.0")
    assert [m["digest"] for m in out["manifests"]] == ["sha256:bb"]
    assert out["manifests"][0]["annotations"]["io.containerd.image.name"] == (
        "ghcr.io/gtvp/gtvp:0.1.0"
    )
    with pytest.raises(KeyError):
        imagespec.manifest_descriptor(index, "0.2.0")
    assert imagespec.blob_path("sha256:bb") == "blobs/sha256/bb"


def _stage(dockerfile: str, name: str) -> str:
    stages = re.split(r"^FROM ", dockerfile, flags=re.MULTILINE)[1:]
    for s in stages:
        first = s.splitlines()[0]
        if first.endswith(f" AS {name}") or (name == "final" and " AS " not in first):
            return s
    raise AssertionError(f"no stage {name}")


def _installed(stage: str) -> set[str]:
    text = stage.replace("\\\n", " ")
    m = re.search(r"apt-get install -y --no-install-recommends ([^&\n]+)", text)
    assert m, stage
    return set(m.group(1).split())


def test_kind_dockerfile_builds_the_same_image() -> None:
    text = (ROOT / "kind" / "Dockerfile").read_text()
    base, builder, final = (_stage(text, n) for n in ("base", "builder", "final"))
    assert base.startswith(f"debian:{imagespec.SUITE}")
    assert _installed(base) == set(imagespec.RUNTIME_PACKAGES)
    assert _installed(builder) == set(imagespec.BUILD_PACKAGES)
    assert f"python3 -m venv {imagespec.VENV}" in builder
    for name in images.SOURCE_FILES:
        assert name in builder
    for d in images.SOURCE_DIRS:
        assert f"COPY {d} /src/{d}" in builder
    assert f"COPY --from=builder {imagespec.VENV} {imagespec.VENV}" in final
    assert imagespec.PASSWD_LINE in final
    assert imagespec.GROUP_LINE in final
    flat = final.replace("\\\n", " ")
    for env in imagespec.ENV:
        assert env in flat, env
    assert f"USER {imagespec.USER}" in final
    assert f'ENTRYPOINT ["{imagespec.ImageSpec(tag="x").entrypoint[0]}"]' in final
    assert imagespec.ImageSpec(tag="0.1.0").reference in text  # the tag it tells you to use


def test_a_failed_step_says_which_and_shows_the_end_of_its_log(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    said: list[str] = []
    images.run_step("ok step", ["sh", "-c", "echo fine"], log, said.append)
    with pytest.raises(images.ImageError, match=r"bad step failed \(exit 3\)") as err:
        images.run_step("bad step", ["sh", "-c", "echo boom; exit 3"], log, said.append)
    assert "boom" in str(err.value)
    assert str(log) in str(err.value)
    assert said[0] == "  ok step"
    assert said[1].startswith("    done in ")
    assert "$ sh -c echo fine" in log.read_text()


def test_chroot_steps_get_proc_in_a_private_mount_namespace_and_a_clean_environment() -> None:
    cmd = images.chroot_cmd(Path("/r"), "echo hi", ["PIP_CERT=/etc/x.crt"])
    assert cmd[:5] == ["unshare", "--mount", "--propagation", "private", "--"]
    assert "/r" in cmd
    assert "PIP_CERT=/etc/x.crt" in cmd
    assert cmd[-3:] == ["/bin/sh", "-ec", "echo hi"]
    assert not any(c.startswith(("PIP_FIND_LINKS", "VIRTUAL_ENV")) for c in cmd)
