"""The box's attestation client (`gtvp-box-attest`, Go, go-tpm) on the host, outside a VM:
the same binary the box initramfs carries, on a real swtpm manufactured by a vTPM CA,
against the protocol's reference HTTPS server (`boxattest_reference.py`).

Faster than a VM boot, so the protocol's paths are checked here: measure, enrol, activate,
quote with the nonce, a wrong credential refused, the user data without an attest line.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gtvp.local_state import cache_dir
from gtvp_local import pki
from gtvp_local.guest.build import BuildError, box_attest_binary, guest_cache
from gtvp_local.processes import ProcessTable
from gtvp_local.swtpm import SwtpmCA, manufacture
from tests.integration.boxattest_reference import (
    BoxState,
    Reference,
    Server,
    attest_line,
    fold,
)
from tests.prerequisites import unavailable

pytestmark = [pytest.mark.tpm]
BOX = "default/hostbox"
DIGESTS = [hashlib.sha256(b"busybox-base").hexdigest(), hashlib.sha256(b"hello-web").hexdigest()]


@dataclass
class Guest:
    binary: Path
    env: dict[str, str]
    ca: SwtpmCA
    dir: Path

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Guest]:
    if not shutil.which("swtpm") or not shutil.which("swtpm_setup"):
        unavailable("the vTPM needs swtpm and swtpm-tools (make setup)")
    try:
        binary = box_attest_binary(guest_cache(cache_dir()))
    except BuildError as exc:
        unavailable(str(exc))
    ca = SwtpmCA(tmp_path / "vtpm-ca").ensure()
    state = tmp_path / "tpm"
    manufacture(state, ca, "hostbox")
    sock = tmp_path / "tpm.sock"
    procs = ProcessTable(tmp_path / "procs")
    procs.start(
        "swtpm",
        [
            "swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
            "--server", f"type=unixio,path={sock}",
            "--ctrl", f"type=unixio,path={tmp_path / 'ctrl.sock'}",
            "--flags", "not-need-init,startup-clear",
        ],
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert time.monotonic() < deadline, procs.log_tail("swtpm")
        time.sleep(0.05)
    env = {**os.environ, "GTVP_TPM": f"unix:{sock}"}
    try:
        yield Guest(binary, env, ca, tmp_path)
    finally:
        procs.stop("swtpm")


def _server(guest: Guest, credential: str) -> tuple[Server, BoxState, str]:
    pki_dir = guest.dir / "pki"
    ca = pki.ensure_ca(pki_dir, "boxattest-test-ca")
    cert = pki.issue(ca, pki_dir, "srv", common_name="boxattest", server_ips=("127.0.0.1",))
    box = BoxState(
        box=BOX,
        credential_sha256=hashlib.sha256(credential.encode()).hexdigest(),
        expected=DIGESTS,
        vtpm_ca_pem=guest.ca.bundle_pem(),
    )
    return (
        Server(Reference(box), "127.0.0.1", str(cert.cert), str(cert.key)),
        box,
        ca.cert.read_text(),
    )


def _measure(guest: Guest) -> Path:
    for d in DIGESTS:
        done = guest.run("extend", "13", d)
        assert done.returncode == 0, done.stderr
    log = guest.dir / "measurements"
    log.write_text("".join(f"sha256:{d}\n" for d in DIGESTS))
    return log


def _run_until(
    guest: Guest, user_data: Path, log: Path, marker: str, timeout: float, linger: float = 0
) -> list[str]:
    """Run the client until a console line holds `marker` (and `linger` seconds more); its
    lines (then it is stopped)."""
    out = guest.dir / "console"
    with out.open("w") as console:
        proc = subprocess.Popen(
            [str(guest.binary), "run", "-userdata", str(user_data), "-measurements", str(log)],
            env=guest.env,
            stdout=console,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            lines = out.read_text().splitlines()
            if any(marker in ln for ln in lines):
                time.sleep(linger)
                return out.read_text().splitlines()
            time.sleep(0.1)
        raise AssertionError(f"no {marker!r} within {timeout:.0f}s: {out.read_text()}")
    finally:
        proc.kill()
        proc.wait()


def test_the_client_enrols_and_answers_a_nonce_with_a_quote_of_its_measurements(
    guest: Guest,
) -> None:
    log = _measure(guest)
    pcr = guest.run("pcr", "13")
    assert pcr.stdout.strip() == f"GTVP-PCR13 {fold(DIGESTS)}"
    credential = secrets.token_urlsafe(24)
    server, box, ca_pem = _server(guest, credential)
    user_data = guest.dir / "user-data"
    user_data.write_text(
        "#cloud-config\n"
        + attest_line(url=server.url, box=BOX, credential=credential, ca_pem=ca_pem)
        + "\n"
    )
    try:
        lines = _run_until(guest, user_data, log, "GTVP-ATTEST quoted", 60)
    finally:
        server.close()
    assert "GTVP-ATTEST enrolled" in lines
    assert box.enrolled == 1
    assert box.quotes, lines
    assert box.quotes[-1].verified, box.quotes[-1].reason
    assert box.quotes[-1].pcr13 == fold(DIGESTS)
    quoted = next(ln for ln in lines if "GTVP-ATTEST quoted" in ln)
    assert f"nonce={box.quotes[-1].nonce[:8]} verified=true" in quoted


def test_without_a_pinned_ca_the_client_trusts_the_guests_own_store(guest: Guest) -> None:
    """gtvp-operator run without --key-release-ca writes an empty `caPem`: the client then
    checks the endpoint against the guest's own trust store (here SSL_CERT_FILE, as Go
    reads it on Linux), as the flag's help says. Before, it built an empty pool, which
    trusts no certificate: no box could ever attest. Found by a review."""
    log = _measure(guest)
    credential = secrets.token_urlsafe(24)
    server, box, ca_pem = _server(guest, credential)
    store = guest.dir / "guest-store.pem"
    store.write_text(ca_pem)
    user_data = guest.dir / "user-data"
    user_data.write_text(
        attest_line(url=server.url, box=BOX, credential=credential, ca_pem="") + "\n"
    )
    try:
        refused = _run_until(guest, user_data, log, "unreachable", 30)  # no store: refused
        assert any("certificate" in ln for ln in refused), refused
        guest.env = {**guest.env, "SSL_CERT_FILE": str(store), "SSL_CERT_DIR": str(guest.dir)}
        lines = _run_until(guest, user_data, log, "GTVP-ATTEST quoted", 60)
    finally:
        server.close()
    assert box.quotes, lines
    assert box.quotes[-1].verified, box.quotes[-1].reason


def test_asked_to_enrol_again_straight_after_enrolling_the_client_waits_before_it_does(
    guest: Guest,
) -> None:
    """Replicas that disagree for a moment (one has not seen the enrolment yet) must not
    turn the client into a loop of enrolments: the one after an enrolment waits."""
    log = _measure(guest)
    credential = secrets.token_urlsafe(24)
    server, box, ca_pem = _server(guest, credential)
    box.enrol_again, box.retry_after = True, 4
    user_data = guest.dir / "user-data"
    user_data.write_text(
        attest_line(url=server.url, box=BOX, credential=credential, ca_pem=ca_pem) + "\n"
    )
    try:
        # for less than the 4 s the server asks it to wait
        lines = _run_until(guest, user_data, log, "GTVP-ATTEST enrolled", 30, linger=3)
    finally:
        server.close()
    assert box.enrolled == 1, lines
    assert "GTVP-ATTEST enrolled" in lines


def test_a_wrong_credential_is_refused_and_the_client_says_so(guest: Guest) -> None:
    log = _measure(guest)
    server, box, ca_pem = _server(guest, "the-right-one")
    user_data = guest.dir / "user-data"
    user_data.write_text(
        attest_line(url=server.url, box=BOX, credential="a-wrong-one", ca_pem=ca_pem) + "\n"
    )
    try:
        lines = _run_until(guest, user_data, log, "HTTP 401", 30)
    finally:
        server.close()
    refused = [ln for ln in lines if "HTTP 401" in ln]
    assert refused[0].startswith(f"GTVP-ATTEST refused by {server.url}: HTTP 401 Unauthorized")
    assert box.ak is None
    assert not box.quotes


def test_without_an_attest_line_the_client_stops_and_says_why(guest: Guest) -> None:
    user_data = guest.dir / "user-data"
    user_data.write_text("#cloud-config\n")
    done = guest.run("run", "-userdata", str(user_data), timeout=10)
    assert done.returncode == 0
    assert "GTVP-ATTEST off: no #gtvp-attest line" in done.stdout
