"""`.ci/setup-machine` on a bare Debian machine: it asks apt for everything gtvp's build
needs (python3-venv, a C toolchain and python3-dev for tpm2-pytss's source build), and with
a Go older than 1.26 it stops saying exactly how to install one.

The machine's tools are stood in for by scripts first on PATH (dpkg-query answers that
nothing is installed, apt-get records what it is asked for, go reports an old version), so
nothing is installed here and no virtualenv is touched."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tool(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _setup_machine(tmp_path: Path, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    """.ci/setup-machine with the stand-in tools first on PATH and a scratch cache."""
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:/usr/bin:/bin",
        GTVP_CACHE=str(tmp_path / "cache"),
        GTVP_VENV=str(tmp_path / "venv"),
    )
    return subprocess.run(
        [str(ROOT / ".ci" / "setup-machine")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_bare_debian_gets_venv_toolchain_and_headers_and_go_instructions(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt_log = tmp_path / "apt.log"
    _tool(bin_dir, "dpkg-query", "exit 1")  # nothing is installed
    _tool(bin_dir, "dpkg", 'test "$1" = --print-architecture && echo arm64')
    _tool(bin_dir, "apt-get", f'echo "$@" >> {apt_log}')
    _tool(bin_dir, "sudo", 'exec "$@"')
    _tool(bin_dir, "go", 'test "$1 $2" = "env GOVERSION" && echo go1.22.5')
    _tool(bin_dir, "python3", "exit 3")  # never reached: no virtualenv is made here
    run = _setup_machine(tmp_path, bin_dir)
    assert run.returncode == 2, run.stdout + run.stderr
    install = next(ln.split() for ln in apt_log.read_text().splitlines() if "install" in ln)
    for package in ("python3-venv", "python3-dev", "gcc", "libc6-dev", "libtss2-dev", "swtpm"):
        assert package in install
    for package in ("debootstrap", "umoci", "runc", "containerd"):  # `make images`
        assert package in install
    for package in ("iptables", "containernetworking-plugins"):  # the real node
        assert package in install
    assert f"Go 1.22.5 at {bin_dir}/go is too old" in run.stderr
    assert "curl -fsSLO https://go.dev/dl/go1.26.8.linux-arm64.tar.gz" in run.stderr
    assert "sudo tar -C /usr/local -xzf go1.26.8.linux-arm64.tar.gz" in run.stderr
    assert not (tmp_path / "venv").exists()


def test_a_docker_host_keeps_dockers_containerd_and_runc(tmp_path: Path) -> None:
    """Docker's containerd.io provides containerd and runc: asking apt for Debian's would
    replace it and remove Docker (kind/e2e.sh runs make images on Docker hosts)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt_log = tmp_path / "apt.log"
    _tool(
        bin_dir,
        "dpkg-query",
        'for p in "$@"; do case "$p" in containerd.io) echo "install ok installed";; esac; done\n'
        "exit 1",
    )
    _tool(bin_dir, "dpkg", "echo amd64")
    _tool(bin_dir, "apt-get", f'echo "$@" >> {apt_log}')
    _tool(bin_dir, "go", 'test "$1 $2" = "env GOVERSION" && echo go1.22.5')
    run = _setup_machine(tmp_path, bin_dir)
    assert run.returncode == 2, run.stdout + run.stderr  # stops at the old Go
    install = next(ln.split() for ln in apt_log.read_text().splitlines() if "install" in ln)
    assert "swtpm" in install
    assert "debootstrap" in install
    assert "containerd" not in install
    assert "runc" not in install
