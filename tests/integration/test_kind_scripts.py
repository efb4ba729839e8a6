"""kind/e2e.sh and its workflow, checked without Docker (which this machine lacks): the script
parses (and passes shellcheck where installed), calls only entry points that exist (kindrig's
subcommands, make targets, files in kind/), stops with a clear error when Docker is missing,
and the GitHub Actions workflow parses and runs it with pinned versions."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gtvp_local import kindrig

ROOT = Path(__file__).resolve().parents[2]
E2E = ROOT / "kind" / "e2e.sh"
WORKFLOW = ROOT / ".github" / "workflows" / "kind-e2e.yml"


def _script() -> str:
    return E2E.read_text()


def _code_lines() -> list[str]:
    return [ln for ln in _script().splitlines() if not ln.lstrip().startswith("#")]


def _pythonpath() -> dict[str, str]:
    paths = [str(ROOT / d) for d in ("operator", "attestation-agent", "local")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(ROOT)])}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    """kindrig's subcommands (argparse has no public accessor for them)."""
    for action in kindrig.parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("kindrig's parser has no subcommands")


def test_bash_parses_it() -> None:
    proc = subprocess.run(["bash", "-n", str(E2E)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert os.access(E2E, os.X_OK)
    assert "set -euo pipefail" in _script()


def test_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(
        ["shellcheck", "-x", str(E2E)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout


def test_kindrig_subcommands_it_calls_exist() -> None:
    called = set(re.findall(r"-m gtvp_local\.kindrig (\w+)", "\n".join(_code_lines())))
    assert called >= {"image", "tools", "up", "down"}
    assert called <= set(_subparsers())
    for sub in sorted(called):
        proc = subprocess.run(
            [sys.executable, "-m", "gtvp_local.kindrig", sub, "--help"],
            capture_output=True,
            text=True,
            check=False,
            env=_pythonpath(),
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr


def test_the_flags_it_passes_to_kindrig_up_exist() -> None:
    text = "\n".join(_code_lines())
    up = text[text.index("-m gtvp_local.kindrig up") :].split("\n\n")[0]
    flags = set(re.findall(r"(--[a-z][a-z-]*)", up))
    assert flags >= {"--kubeconfig", "--state", "--image", "--out", "--cluster"}
    known = {s for a in _subparsers()["up"]._actions for s in a.option_strings}
    assert flags <= known, flags - known


def test_make_targets_it_runs_exist() -> None:
    targets = set(re.findall(r"^\s*make (\w+)", "\n".join(_code_lines()), re.M))
    assert targets == {"images"}
    makefile = (ROOT / "Makefile").read_text()
    for target in targets:
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_the_files_it_reads_are_there() -> None:
    for rel in set(re.findall(r"\b(kind/[\w.-]+|tests/e2e/[\w.-]+)", "\n".join(_code_lines()))):
        if rel.startswith("tests/e2e/"):
            continue  # tests/e2e/test_installed.py: written alongside, checked by its suite
        assert (ROOT / rel).is_file(), rel
    assert "pytest -m installed tests/e2e/test_installed.py" in _script()


def test_cluster_and_kubevirt_manifests() -> None:
    cluster = yaml.safe_load((ROOT / "kind" / "cluster.yaml").read_text())
    roles = [n["role"] for n in cluster["nodes"]]
    assert roles.count("control-plane") == 1
    assert roles.count("worker") == 2
    kv = yaml.safe_load((ROOT / "kind" / "kubevirt-cr.yaml").read_text())
    assert kv["kind"] == "KubeVirt"
    assert kv["spec"]["configuration"]["developerConfiguration"]["useEmulation"] is True
    assert 'KUBEVIRT_VERSION="${KUBEVIRT_VERSION:-v' in _script()


def test_it_stops_clearly_without_docker(tmp_path: Path) -> None:
    """Run for real with a PATH that has no docker (and then one whose engine is down): it
    must stop in its checks, before `make`, with an error saying what is missing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "GTVP_CACHE": str(tmp_path)}
    if shutil.which("docker", path=env["PATH"]) is not None:
        pytest.skip("docker is in /usr/bin or /bin here")

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(E2E)], capture_output=True, text=True, check=False, env=env, timeout=60
        )

    proc = run()
    assert proc.returncode == 2
    if os.getuid() != 0:
        assert "run as root" in proc.stderr
        return
    assert "docker not found" in proc.stderr
    (bin_dir / "docker").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "docker").chmod(0o755)
    proc = run()
    assert proc.returncode == 2
    assert "engine does not answer" in proc.stderr
    assert not (tmp_path / "kind-gtvp").exists()  # nothing was started


def _workflow() -> dict[Any, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(data, dict)
    return data


def test_workflow_parses_and_runs_e2e() -> None:
    wf = _workflow()
    assert True in wf or "on" in wf  # YAML 1.1 reads the key `on` as true
    (job,) = wf["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    runs = [s.get("run", "") for s in job["steps"]]
    assert any("kind/e2e.sh" in r and "sudo" in r for r in runs)
    uploads = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload")]
    assert uploads
    assert uploads[0]["if"] == "failure()"
    assert uploads[0]["with"]["path"] == "${{ env.ARTIFACTS }}"
    assert "ARTIFACTS" in wf["env"]


def test_workflow_pins_and_packages() -> None:
    wf = _workflow()
    env = wf["env"]
    assert re.fullmatch(r"v\d+\.\d+\.\d+", env["KIND_VERSION"])
    assert re.fullmatch(r"v\d+\.\d+\.\d+", env["KUBEVIRT_VERSION"])
    assert env["KUBEVIRT_VERSION"] in _script()  # the workflow and the script's default agree
    major, minor = (int(x) for x in env["GO_VERSION"].split(".")[:2])
    assert (major, minor) >= (1, 26)
    text = WORKFLOW.read_text()
    for pkg in ("swtpm", "swtpm-tools", "tpm2-tools", "libtss2-dev", "debootstrap", "umoci"):
        assert re.search(rf"\s{re.escape(pkg)}(\s|$)", text, re.M), pkg
    assert 'go install "sigs.k8s.io/kind@${KIND_VERSION}"' in text
    assert "no Docker" in text


@pytest.mark.tpm
def test_up_starts_real_swtpms_and_down_stops_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kindrig up with real swtpms (on loopback here; the kind network's gateway on a Docker
    host), helm replaced by a recorder: the TCTIs handed to installation.install answer, a
    second up keeps the ports, down stops every swtpm."""
    if shutil.which("swtpm") is None or shutil.which("tpm2_getrandom") is None:
        pytest.skip("needs swtpm and tpm2-tools")
    from gtvp_local import installation

    seen: dict[str, Any] = {}

    def install(**kw: Any) -> installation.Installation:
        seen.update(kw)
        return installation.Installation(kubeconfig="k", members=dict(kw["test_tpms"]))

    monkeypatch.setattr(installation, "install", install)
    state = tmp_path / "rig"
    args: dict[str, Any] = {
        "state": state,
        "kubeconfig": tmp_path / "kubeconfig",
        "nodes": ["gtvp-control-plane", "gtvp-worker"],
        "host": "127.0.0.1",
        "image_ref": "ghcr.io/gtvp/gtvp:0.1.0",
        "helm": Path("/nonexistent/helm"),
        "kubectl": Path("/nonexistent/kubectl"),
        "say": lambda _m: None,
    }
    try:
        kindrig.up(**args)
        first = dict(seen["pod_tpms"])
        assert set(first) == {"gtvp-control-plane", "gtvp-worker"}
        for tcti in first.values():
            proc = subprocess.run(
                ["tpm2_getrandom", "--hex", "8"],
                env={**os.environ, "TPM2TOOLS_TCTI": tcti, "TSS2_LOG": "all+NONE"},
                capture_output=True,
                text=True,
                check=False,
                timeout=30,
            )
            assert proc.returncode == 0, proc.stderr
        bundle = seen["policy"]["spec"]["ekTrust"]["caBundle"]
        issuer = (state / "swtpm-ca" / "issuercert.pem").read_text()
        assert issuer in bundle  # the policy trusts the CA that made these TPMs' EKs
        assert seen["policy"]["spec"]["levels"][0]["attestation"]["interval"] == "5s"
        kindrig.up(**args)
        assert seen["pod_tpms"] == first
    finally:
        stopped = kindrig.down(state)
    assert sorted(stopped) == ["swtpm-gtvp-control-plane", "swtpm-gtvp-worker"]
    assert kindrig.down(state) == []
