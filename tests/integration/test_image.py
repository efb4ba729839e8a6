"""gtvp's container image, built here without a Docker engine (debootstrap, pip, umoci) and
run with runc: the archive is what the cache says, the config runs as uid 65532 with the
operator as entrypoint, and the operator and the agent start inside it on a read-only root.

The first build on a machine takes several minutes (`make test` runs `make images` before
pytest, so it is built once, with progress); with the cache warm this module takes seconds.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gtvp_local import imagecheck, images, imagespec
from gtvp_local.controlplane import ephemeral_control_plane
from gtvp_local.images import BuiltImage
from gtvp_local.processes import free_port
from gtvp_local.swtpm import Swtpm

pytestmark = [
    pytest.mark.images,
    pytest.mark.skipif(os.geteuid() != 0, reason="builds with debootstrap/chroot: needs root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc (Debian's package) runs it"),
]


@pytest.fixture(scope="session")
def image(request: pytest.FixtureRequest, repo: Path) -> BuiltImage:
    """The image for this checkout (from the cache; built with visible progress if cold)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        return images.build(repo, say=lambda m: print(f"[image] {m}", flush=True))


@pytest.fixture(scope="session")
def bundle(image: BuiltImage) -> Path:
    return imagecheck.ensure_bundle(image)


def _run(bundle: Path, *args: str, **kw: bool) -> subprocess.CompletedProcess[str]:
    return imagecheck.run_in_image(bundle, args, **kw)


def test_the_digest_is_stable_for_the_same_inputs(image: BuiltImage, repo: Path) -> None:
    again = images.build(repo)
    assert again.cached
    assert (again.digest, again.archive, again.fingerprint) == (
        image.digest,
        image.archive,
        image.fingerprint,
    )
    digest, _, _ = images.read_archive(image.archive, "0.1.0")  # blobs checked on read
    assert digest == image.digest
    assert image.digest.startswith("sha256:")
    assert image.fingerprint in image.archive.name
    assert not image.archive.is_relative_to(repo)  # cached outside the repository


def test_the_config_runs_the_operator_as_non_root(image: BuiltImage) -> None:
    assert image.reference == "ghcr.io/gtvp/gtvp:0.1.0"  # what the chart's image defaults to
    _, manifest, config = images.read_archive(image.archive, "0.1.0")
    assert manifest["config"]["digest"] == image.config_digest
    assert len(manifest["layers"]) == 1
    c = config["config"]
    assert c["User"] == "65532:65532"
    assert c["Entrypoint"] == ["/opt/gtvp/bin/gtvp-operator"]
    assert not c.get("Cmd")
    assert "PYTHONDONTWRITEBYTECODE=1" in c["Env"]
    assert any(e.startswith("PATH=/opt/gtvp/bin:") for e in c["Env"])
    assert c["Labels"]["io.gtvp.entrypoints"] == "gtvp-operator gtvp-agent"
    assert c["Labels"]["io.gtvp.fingerprint"] == image.fingerprint
    arch = imagespec.oci_architecture(platform.machine())
    assert (config["os"], config["architecture"]) == ("linux", arch)


def test_operator_and_agent_run_inside_it(image: BuiltImage, bundle: Path) -> None:
    version = _run(bundle, "gtvp-operator", "--version")
    assert (version.returncode, version.stdout.strip()) == (0, "gtvp-operator 0.1.0")
    agent = _run(bundle, "gtvp-agent", "--help")
    assert agent.returncode == 0, agent.stderr
    assert agent.stdout.startswith("usage: gtvp-agent")
    lines = imagecheck.check(image)  # start-up imports as uid 65532, root read-only, precompiled
    assert any("uid=65532 root=ro uncompiled=0 write_bytecode=False" in ln for ln in lines)


def test_the_root_is_read_only_and_carries_no_build_tools(bundle: Path) -> None:
    write = _run(bundle, "python3", "-c", "open('/opt/gtvp/x', 'w')")
    assert write.returncode != 0
    assert "Read-only file system" in write.stderr
    rootfs = bundle / "rootfs"
    for absent in ("usr/bin/gcc", "opt/gtvp/bin/pip", "src", "etc/gtvp-build-ca.crt"):
        assert not (rootfs / absent).exists(), absent
    assert (rootfs / "etc" / "resolv.conf").read_text() == ""
    assert imagespec.PASSWD_LINE in (rootfs / "etc" / "passwd").read_text()
    assert list((rootfs / "dev").iterdir()) == []


@pytest.mark.tpm
def test_the_tss_libraries_in_the_image_reach_a_tpm(
    bundle: Path, make_tpm: Callable[..., Swtpm]
) -> None:
    """What the agent needs for a TPM is in the image: tpm2-pytss, the TCTI loader and the
    swtpm TCTI answer a real swtpm (on the host's loopback, so the host's network)."""
    tpm = make_tpm()
    got = _run(
        bundle,
        "python3",
        "-c",
        imagecheck.TPM_CHECK,
        "127.0.0.1",
        str(tpm.port),
        host_network=True,
    )
    assert got.returncode == 0, got.stderr
    assert "TPM answered: 8 random bytes" in got.stdout


@pytest.fixture
def containerd() -> Iterator[str]:
    """A containerd of the test's own (Debian's package; its own root, state and socket, CRI
    off), stopped afterwards: the socket address."""
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.skip("containerd (Debian's package) is not installed: the import is optional")
    d = Path(tempfile.mkdtemp(prefix="gtvp-ctr-"))
    sock = d / "containerd.sock"
    (d / "config.toml").write_text(
        f'version = 2\nroot = "{d}/root"\nstate = "{d}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n'
    )
    log = (d / "containerd.log").open("w")
    proc = subprocess.Popen(
        ["containerd", "--config", str(d / "config.toml")], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, (d / "containerd.log").read_text()
            assert time.monotonic() < deadline, "containerd did not start"
            time.sleep(0.1)
        yield str(sock)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def test_containerd_imports_it_under_the_charts_reference_and_runs_it(
    image: BuiltImage, containerd: str
) -> None:
    said = imagecheck.import_into_containerd(image, containerd)
    assert f"imported as {image.reference}" in said
    again = imagecheck.import_into_containerd(image, containerd)
    assert "already imported" in again
    ctr = ["ctr", "--address", containerd, "-n", "k8s.io"]
    listed = subprocess.run([*ctr, "image", "ls"], capture_output=True, text=True, check=True)
    assert any(
        ln.startswith(f"{image.reference} ") and image.digest in ln
        for ln in listed.stdout.splitlines()
    )
    ran = subprocess.run(
        [
            *ctr,
            "run",
            "--rm",
            image.reference,
            f"gtvp-test-{os.getpid()}",
            "gtvp-operator",
            "--version",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert (ran.returncode, ran.stdout.strip()) == (0, "gtvp-operator 0.1.0"), ran.stderr


def _kubeconfig_for_the_image(admin: Path, creds: Path) -> None:
    """The admin kubeconfig with its CA, certificate and key copied into `creds` (mounted at
    /mnt in the container), readable by uid 65532 only, as a pod's mounted Secret would be."""
    config = json.loads(admin.read_text())
    cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
    for holder, key, name in (
        (cluster, "certificate-authority", "ca.crt"),
        (user, "client-certificate", "client.crt"),
        (user, "client-key", "client.key"),
    ):
        shutil.copy(holder[key], creds / name)
        holder[key] = f"/mnt/{name}"
    (creds / "kubeconfig").write_text(json.dumps(config))
    for path in (creds, *creds.iterdir()):
        os.chown(path, imagespec.UID, imagespec.UID)
        path.chmod(0o500 if path.is_dir() else 0o400)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.mark.controlplane
def test_the_operator_starts_and_becomes_ready_on_a_read_only_root(
    bundle: Path, tmp_path: Path
) -> None:
    """gtvp-operator in the image, as the chart runs it (uid 65532, read-only root, its
    credentials read-only), against a real API server: it loads the pool, serves /readyz and
    /metrics, and nothing it does at start needs to write to its root filesystem."""
    creds = Path(tempfile.mkdtemp(prefix="gtvp-image-creds-"))
    log = tmp_path / "operator.log"
    port = free_port()
    args = [
        "gtvp-operator",
        "--kubeconfig=/mnt/kubeconfig",
        "--no-leases",
        "--webhook-port=0",
        f"--metrics-port={port}",
        "--no-create-members",
        "--shutdown-grace=0",
    ]
    try:
        with ephemeral_control_plane(tmp_path / "cp") as cp:
            _kubeconfig_for_the_image(cp.admin_kubeconfig, creds)
            with imagecheck.running_in_image(
                bundle, args, mounts=[(str(creds), "/mnt")], log=log
            ) as proc:
                deadline = time.monotonic() + 90
                while not _ready(port):
                    assert proc.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.5)
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
                    assert b"gtvp_" in r.read()
    finally:
        shutil.rmtree(creds, ignore_errors=True)
    out = log.read_text()
    assert "gtvp-operator 0.1.0 enforcing SecurityPolicy 'default'" in out
    for bad in ("Read-only file system", "Permission denied", "Traceback"):
        assert bad not in out, out
