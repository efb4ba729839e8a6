"""Real TPM 2.0 emulators (swtpm, from Debian) for the local pool and the tests.

`SwtpmCA` is a private instance of swtpm's local CA (`swtpm_localca`: a root and an
intermediate "swtpm-localca" that issues EK certificates), kept in its own directory so
that tests and pools never share or touch /var/lib/swtpm-localca. `Swtpm` manufactures one
TPM with `swtpm_setup --create-ek-cert` (EK certificates in NV, issued by that CA) and runs
it as `swtpm socket` on loopback, tracked like every other local process. State paths are
absolute (swtpm leaves its working directory). `manufacture` and `vm_tpm_argv` serve the
VM runtime's vTPMs (one swtpm per box VM on a unix control socket, qemu's tpm-emulator
backend; their EKs certified by a vTPM CA of their own, another `SwtpmCA`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from gtvp_local.processes import ProcessTable, free_port, port_in_use, reserve_port


def _port_pair() -> int:
    """A free port whose successor is free too (command and control channel)."""
    for _ in range(100):
        port = free_port()
        if port < 65535 and not port_in_use(port + 1) and reserve_port(port + 1):
            return port
    raise RuntimeError("no two adjacent free loopback ports found")


class SwtpmError(RuntimeError):
    """swtpm is missing or failed; the message says what to do."""


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise SwtpmError(
            f"{binary} was not found: install Debian's swtpm and swtpm-tools packages "
            "(make setup does)"
        )
    return path


class SwtpmCA:
    """A private swtpm-localca: the EK certificate issuer a test or pool policy trusts."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory.resolve()

    @property
    def setup_config(self) -> Path:
        return self.dir / "swtpm_setup.conf"

    def ensure(self) -> SwtpmCA:
        self.dir.mkdir(parents=True, exist_ok=True)
        localca = self.dir / "swtpm-localca.conf"
        if not localca.exists():
            localca.write_text(
                f"statedir = {self.dir}\n"
                f"signingkey = {self.dir}/signkey.pem\n"
                f"issuercert = {self.dir}/issuercert.pem\n"
                f"certserial = {self.dir}/certserial\n"
            )
            (self.dir / "swtpm-localca.options").write_text(
                "--platform-manufacturer gtvp\n--platform-version 2.1\n--platform-model swtpm\n"
            )
            self.setup_config.write_text(
                f"create_certs_tool = {_require('swtpm_localca')}\n"
                f"create_certs_tool_config = {localca}\n"
                f"create_certs_tool_options = {self.dir}/swtpm-localca.options\n"
                "active_pcr_banks = sha256\n"
            )
        return self

    def bundle_pem(self) -> str:
        """The root and the issuing intermediate, PEM: what a policy's caBundle holds."""
        root = self.dir / "swtpm-localca-rootca-cert.pem"
        issuer = self.dir / "issuercert.pem"
        if not root.exists() or not issuer.exists():
            raise SwtpmError(f"the swtpm CA in {self.dir} has not issued a certificate yet")
        return issuer.read_text() + root.read_text()


class Swtpm:
    """One emulated TPM 2.0 on a TCP port (loopback unless `host` names another address of
    this machine, as the real node's bridge address for an agent running in a pod)."""

    def __init__(
        self,
        name: str,
        state: Path,
        procs: ProcessTable,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
    ) -> None:
        self.name = name
        self.host = host
        self.state = state.resolve()
        self.procs = procs
        self.port = port or _port_pair()
        self.ctrl_port = self.port + 1  # the swtpm TCTI expects the control port next to it

    @property
    def tcti(self) -> str:
        return f"swtpm:host={self.host},port={self.port}"

    @property
    def proc_name(self) -> str:
        return f"swtpm-{self.name}"

    def manufacture(self, ca: SwtpmCA) -> None:
        """Create the TPM's state with RSA and ECC EKs and their certificates (once)."""
        manufacture(self.state, ca, self.name)

    def start(self, *, timeout: float = 10.0) -> None:
        tracked = self.procs.get(self.proc_name)
        if tracked is not None and tracked.alive():
            return
        for attempt in range(5):
            if attempt:  # a port taken between choosing and binding: choose again
                self.port = _port_pair()
                self.ctrl_port = self.port + 1
            if self._start_once(timeout):
                return
        raise SwtpmError(f"swtpm {self.name} did not start: {self.procs.log_tail(self.proc_name)}")

    def _start_once(self, timeout: float) -> bool:
        self.procs.start(
            self.proc_name,
            [
                _require("swtpm"),
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.state}",
                "--server",
                f"type=tcp,port={self.port},bindaddr={self.host}",
                "--ctrl",
                f"type=tcp,port={self.ctrl_port},bindaddr={self.host}",
                "--flags",
                "not-need-init,startup-clear",
            ],
        )
        deadline = time.monotonic() + timeout
        while not port_in_use(self.port, self.host):
            t = self.procs.get(self.proc_name)
            if t is None or not t.alive():
                if "Address already in use" in self.procs.log_tail(self.proc_name, 3):
                    return False
                raise SwtpmError(f"swtpm {self.name} exited: {self.procs.log_tail(self.proc_name)}")
            if time.monotonic() > deadline:
                raise SwtpmError(f"swtpm {self.name} did not listen within {timeout:.0f}s")
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        self.procs.stop(self.proc_name)


def manufacture(state: Path, ca: SwtpmCA, name: str) -> None:
    """Create a TPM's state in `state` (absolute) with RSA and ECC EKs and their
    certificates issued by `ca` (`swtpm_setup --create-ek-cert`); once per state."""
    state = state.resolve()
    if (state / "tpm2-00.permall").exists():
        return
    state.mkdir(parents=True, exist_ok=True)
    ca.ensure()
    proc = subprocess.run(
        [
            _require("swtpm_setup"),
            "--tpm2",
            "--tpmstate",
            str(state),
            "--create-ek-cert",
            "--config",
            str(ca.setup_config),
            "--overwrite",
            "--pcr-banks",
            "sha256",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if proc.returncode != 0:
        raise SwtpmError(f"swtpm_setup for {name} failed: {proc.stderr.strip()[-800:]}")


def vm_tpm_argv(state: Path, ctrl: Path) -> list[str]:
    """`swtpm socket` for a VM's vTPM: qemu's tpm-emulator backend talks to it over the
    unix control socket `ctrl` (commands go over a channel qemu opens through it); the
    guest starts the TPM itself, and a migration moves its state through qemu."""
    return [
        _require("swtpm"),
        "socket",
        "--tpm2",
        "--tpmstate",
        f"dir={state.resolve()}",
        "--ctrl",
        f"type=unixio,path={ctrl}",
    ]


CONNECT_RETRY_S = 15.0
"""How long `extend_pcr` retries a TCTI that cannot connect."""


def extend_pcr(tcti: str, pcr: int, data: bytes, *, retry_s: float = CONNECT_RETRY_S) -> None:
    """Tamper with a TPM: extend one of its sha256 PCRs by sha256(`data`) (as a rogue boot
    component would), with tpm2-tools' tpm2_pcrextend on `tcti`."""
    tool = shutil.which("tpm2_pcrextend")
    if tool is None:
        raise FileNotFoundError("tpm2_pcrextend not found: install Debian's tpm2-tools")
    # A TCTI that cannot connect ("Could not load tcti": the swtpm not listening, for a
    # moment or for good) is retried, only that, for `retry_s`; an extend is never retried
    # once the TPM took it.
    deadline = time.monotonic() + retry_s
    while True:
        out = subprocess.run(
            [tool, f"{pcr}:sha256={hashlib.sha256(data).hexdigest()}"],
            capture_output=True,
            text=True,
            env={**os.environ, "TPM2TOOLS_TCTI": tcti, "TSS2_LOG": "all+NONE"},
            timeout=30,
            check=False,
        )
        if out.returncode == 0:
            return
        if "Could not load tcti" not in out.stderr or time.monotonic() > deadline:
            raise SwtpmError(f"tpm2_pcrextend on {tcti} failed: {out.stderr.strip()}")
        time.sleep(0.2)
