"""A Lazy Box VM with its own vTPM: measured boot, attestation over HTTPS, a live migration
that carries the vTPM, and a box whose attestation server is unreachable.

Real: the box's components built here (the kernel with gtvp's box init and its Go
attestation client `gtvp-box-attest`, busybox rootfs, hello-web), qemu under the runtime
(`gtvp_local.vmruntime`) in the members' network namespaces, one swtpm per VM process
manufactured by the runtime's vTPM CA, a qemu live migration over the member link, the
protocol's HTTPS server (`tests/integration/boxattest_reference.py`, gtvp.core's own
enrolment and quote checks) on the VM bridge address, and a Secret in the real
kube-apiserver for the user data of the second box.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from gtvp.local_state import cache_dir
from gtvp_local import pki
from gtvp_local.controlplane import ControlPlane
from gtvp_local.guest.box import compose_box, resolver
from gtvp_local.guest.build import Artifact, BuildError, build_catalogue, composition
from gtvp_local.vmruntime import network
from gtvp_local.vmruntime import runtime as rt
from gtvp_local.vmruntime.launcher import (
    STORE,
    Launcher,
    SecretReader,
    secret_reader,
    vm_id,
    with_store,
)
from gtvp_local.vmruntime.names import BRIDGE_ADDRESS
from tests.integration.boxattest_reference import (
    BoxState,
    Reference,
    Server,
    attest_line,
    fold,
)
from tests.prerequisites import unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.tpm]
NS = "default"
PCR_LINE = re.compile(r"^GTVP-PCR13 ([0-9a-f]{64})\s*$", re.M)
QUOTED = re.compile(r"^GTVP-ATTEST quoted nonce=([0-9a-f]{8}) verified=(\w+)", re.M)
UPTIME = re.compile(r"gtvp-uptime (\d+)")


@pytest.fixture(scope="module")
def catalogue() -> dict[str, Artifact]:
    missing = [
        t
        for t in ("qemu-system-x86_64", "mksquashfs", "swtpm", "swtpm_setup")
        if not shutil.which(t)
    ]
    if missing:
        unavailable(f"box VMs with a vTPM need {', '.join(missing)} (make setup)")
    try:
        return build_catalogue(cache_dir())
    except BuildError as exc:
        unavailable(f"cannot build the box components: {exc}")


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("vtpm")
    try:
        yield d
    finally:
        rt.cleanup(d)


def _launcher(state: Path, catalogue: Mapping[str, Artifact], **kw: Any) -> Launcher:
    return Launcher(state, with_store(resolver(catalogue), state / STORE), **kw)


def _measured(catalogue: Mapping[str, Artifact]) -> list[str]:
    """The digests the init extends PCR 13 with: the disks of the newest composition, base
    first (the kernel boots; it is not a disk)."""
    return [a.sha256 for a in composition(catalogue) if a.type != "kernel"]


def _box(catalogue: Mapping[str, Artifact], name: str) -> dict[str, Any]:
    spec: dict[str, Any] = compose_box(catalogue, box=name, memory="256Mi")["spec"]["template"][
        "spec"
    ]
    return spec


def _add_user_data(spec: dict[str, Any], line: str) -> str:
    for v in spec["volumes"]:
        if "cloudInitNoCloud" in v:
            v["cloudInitNoCloud"]["userData"] = f"{v['cloudInitNoCloud']['userData']}\n{line}\n"
            return str(v["cloudInitNoCloud"]["userData"])
    raise AssertionError("the composed box has no cloud-init volume")


def _wait(what: str, cond: Callable[[], bool], timeout: float, diag: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout:.0f}s\n{diag()}")
        time.sleep(0.5)


def _server_cert(directory: Path) -> tuple[pki.KeyPair, str]:
    ca = pki.ensure_ca(directory, "boxattest-test-ca")
    cert = pki.issue(
        ca, directory, "boxattest", common_name="boxattest", server_ips=(BRIDGE_ADDRESS,)
    )
    return cert, ca.cert.read_text()


def test_a_box_measures_its_components_attests_and_keeps_its_vtpm_across_a_migration(
    catalogue: dict[str, Artifact], state: Path, tmp_path: Path
) -> None:
    name = "tpmbox"
    vm = vm_id(NS, name)
    network.ensure_member(state, "m-a")  # the bridge the server listens on
    cert, ca_pem = _server_cert(tmp_path)
    credential = secrets.token_urlsafe(24)
    expected = _measured(catalogue)
    box = BoxState(
        box=f"{NS}/{name}",
        credential_sha256=hashlib.sha256(credential.encode()).hexdigest(),
        expected=expected,
        vtpm_ca_pem=rt.vtpm_ca_pem(state),
    )
    server = Server(Reference(box), BRIDGE_ADDRESS, str(cert.cert), str(cert.key))
    spec = _box(catalogue, name)
    _add_user_data(
        spec, attest_line(url=server.url, box=box.box, credential=credential, ca_pem=ca_pem)
    )
    launcher = _launcher(state, catalogue)
    try:
        launcher.start(NS, name, "m-a", spec)

        def console() -> str:
            return launcher.console(NS, name)

        def diag() -> str:
            return f"server: {server.requests[-8:]} quotes: {box.quotes}\n{console()[-2500:]}"

        # boot: each component disk measured before it is mounted, then a verified quote
        _wait("GTVP-READY", lambda: launcher.ready(NS, name), 180, diag)
        assert launcher.runtime.tpm_running(vm, 0)
        pcrs = PCR_LINE.findall(console())
        assert pcrs, diag()
        assert pcrs[0] == fold(expected), diag()
        _wait("a verified quote after boot", lambda: any(q.verified for q in box.quotes), 120, diag)
        assert box.enrolled == 1
        # the guest prints its line once the server's answer reached it: after the server
        # recorded the quote, so wait for the line before reading it
        _wait("the guest's line on its quote", lambda: bool(QUOTED.findall(console())), 30, diag)
        assert QUOTED.findall(console())[-1][1] == "true"
        quotes_before = len(box.quotes)
        uptime_before = max(int(u) for u in UPTIME.findall(console()))

        # a live migration to m-b: a new swtpm there, qemu carries the TPM state
        result = launcher.migrate(NS, name, "m-b", vmi_spec=spec).result(timeout=240)
        launcher.finish_migration(NS, name)
        assert result.completed, result.reason
        assert launcher.runtime.tpm_running(vm, 1)  # the destination's swtpm
        assert not launcher.runtime.tpm_running(vm, 0)  # the source's is gone
        box.want_quote = True  # gtvp asks again after a move
        _wait(
            "a verified quote after the migration",
            lambda: len(box.quotes) > quotes_before and box.quotes[-1].verified,
            120,
            diag,
        )
        # the same AK (no re-enrolment: the endorsement seed moved) and the same PCR 13
        assert box.enrolled == 1
        assert box.quotes[-1].pcr13 == fold(expected)
        assert PCR_LINE.findall(console())[-1] == fold(expected)
        # the guest kept running through the move (its uptime did not start over)
        _wait(
            "the guest's uptime after the migration",
            lambda: max(int(u) for u in UPTIME.findall(console())) > uptime_before + 1,
            30,
            diag,
        )
    finally:
        launcher.runtime.stop(vm)
        launcher.close()
        server.close()
    assert not launcher.runtime.tpm_running(vm, 1)  # the swtpm stops with its VM


def _secret_reader(cp: ControlPlane) -> SecretReader:
    """The launcher's Secret reader on the real API server (as the stand-in wires it)."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(cp.admin_kubeconfig))
    return secret_reader(client.CoreV1Api(api))


@pytest.mark.controlplane
def test_a_box_whose_attestation_server_is_unreachable_keeps_running_and_says_so(
    catalogue: dict[str, Artifact], state: Path, tmp_path: Path, control_plane: ControlPlane
) -> None:
    name = "lostbox"
    vm = vm_id(NS, name)
    _, ca_pem = _server_cert(tmp_path)
    spec = _box(catalogue, name)
    # nothing listens on this port of the bridge address
    url = f"https://{BRIDGE_ADDRESS}:9"
    user_data = _add_user_data(
        spec, attest_line(url=url, box=f"{NS}/{name}", credential="c", ca_pem=ca_pem)
    )
    secret = f"{name}-cloudinit"
    control_plane.kubectl(
        "create", "secret", "generic", secret, "-n", NS, f"--from-literal=userdata={user_data}"
    )
    for v in spec["volumes"]:
        if "cloudInitNoCloud" in v:
            v["cloudInitNoCloud"] = {"secretRef": {"name": secret}}
    launcher = _launcher(state, catalogue, read_secret=_secret_reader(control_plane))
    try:
        launcher.start(NS, name, "m-a", spec)

        def console() -> str:
            return launcher.console(NS, name)

        def diag() -> str:
            return console()[-2500:]

        _wait("GTVP-READY", lambda: launcher.ready(NS, name), 180, diag)
        _wait(
            "the client saying the server is unreachable",
            lambda: f"GTVP-ATTEST unreachable {url}" in console(),
            90,
            diag,
        )
        said = console().index("GTVP-ATTEST unreachable")
        _wait(
            "the box running on after that",
            lambda: len(UPTIME.findall(console()[said:])) >= 3,
            30,
            diag,
        )
        assert PCR_LINE.findall(console())[0] == fold(_measured(catalogue))
        assert launcher.runtime.running(vm)
    finally:
        launcher.runtime.stop(vm)
        launcher.close()
        control_plane.kubectl("delete", "secret", secret, "-n", NS, check=False)
