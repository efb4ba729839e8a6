"""The generated go.mod that builds kube-apiserver from the release's Go modules."""

from __future__ import annotations

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
