"""The generated go.mod that builds kube-apiserver from the release's Go modules."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gtvp_local.toolchain import ToolchainError, kubernetes_gomod

KK_GOMOD = """module k8s.io/kubernetes

go 1.26.0

require (
\tk8s.io/api v0.0.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tgithub.com/other/thing => github.com/fork/thing v1.0.0
)
"""


def test_every_staging_module_is_replaced_by_its_published_version() -> None:
    text = kubernetes_gomod(KK_GOMOD, version="v1.36.3")
    assert "require k8s.io/kubernetes v1.36.3" in text
    assert "\tk8s.io/api => k8s.io/api v0.36.3" in text
    assert "\tk8s.io/client-go => k8s.io/client-go v0.36.3" in text
    assert "github.com/fork/thing" not in text  # only staging replaces are carried over


def test_a_gomod_without_staging_replaces_is_an_error() -> None:
    with pytest.raises(ToolchainError, match="staging"):
        kubernetes_gomod("module x\n", version="v1.36.3")


def test_committed_kubernetes_gomod_matches_the_generator() -> None:
    from importlib import resources

    committed = resources.files("gtvp_local") / "gobuild" / "kubernetes" / "go.mod"
    text = committed.read_text()
    replaces = [ln.strip() for ln in text.splitlines() if "=> k8s.io/" in ln]
    assert len(replaces) == 33
    assert all(ln.endswith(" v0.36.3") for ln in replaces)


def test_a_second_build_waits_for_the_first_and_finds_it_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `gtvp local build` at once: the second waits on the component's lock without
    touching the build directory, then finds the binaries the first one put in place."""
    from gtvp_local import toolchain

    monkeypatch.setenv("GTVP_CACHE", str(tmp_path))
    env = dict(os.environ)
    comp = toolchain.component("kwok")
    with toolchain.build_lock(comp):  # the first build, running
        second = subprocess.Popen(
            [sys.executable, "-c", SECOND_BUILD],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            time.sleep(2.0)
            assert second.poll() is None, second.communicate()[0]  # still waiting
            assert not (toolchain.work_dir(comp) / "go.mod").exists()
            comp.bin_dir().mkdir(parents=True)
            for b in comp.binaries:  # what the first build leaves
                (comp.bin_dir() / b).write_text("#!/bin/sh\n")
        except BaseException:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait()
            raise
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 0, out
    assert "waiting for another build of kwok" in out
    assert out.strip().endswith(str(comp.bin_dir()))
    assert not (toolchain.work_dir(comp) / "go.mod").exists()  # it never built


SECOND_BUILD = (
    "from gtvp_local import toolchain\n"
    "print(toolchain.build(toolchain.component('kwok')), flush=True)\n"
)
