"""Shared fixtures: a real local control plane for the whole session, a namespace per test.

The control plane is the same etcd + kube-apiserver that `gtvp local up` runs, started on
free loopback ports in a temporary state directory so that tests never touch a user's
running pool. Binaries come from the cache (`gtvp local build` fills it); a cold cache is
built here, with progress on stderr.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gtvp.localcluster import layout, toolchain
from gtvp.localcluster.controlplane import ControlPlane, Ports
from gtvp.localcluster.processes import free_port


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    bins = toolchain.ensure_all()
    state = tmp_path_factory.mktemp("controlplane")
    ports = Ports(etcd_client=free_port(), etcd_peer=free_port(), apiserver=free_port())
    cp = ControlPlane(state, bins, ports)
    try:
        cp.start()
        cp.apply_crds(layout.gtvp_crds() + layout.kubevirt_crds())
        yield cp
    finally:
        cp.stop()


def _finalize(cp: ControlPlane, ns: str) -> None:
    """Do what the namespace controller would: drop the finalizer of an emptied namespace."""
    got = cp.kubectl("get", "namespace", ns, "-o", "json", check=False)
    if got.returncode != 0:
        return
    obj = json.loads(got.stdout)
    obj.setdefault("spec", {})["finalizers"] = []
    cp.kubectl(
        "replace",
        "--raw",
        f"/api/v1/namespaces/{ns}/finalize",
        "-f",
        "-",
        input_text=json.dumps(obj),
        check=False,
    )


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    """A fresh namespace for one test, emptied and removed afterwards."""
    ns = f"t-{uuid.uuid4().hex[:10]}"
    control_plane.kubectl("create", "namespace", ns)
    try:
        yield ns
    finally:
        for kinds in (
            "lazyboxes.gtvp.io",
            "virtualmachines.kubevirt.io",
            "virtualmachineinstances.kubevirt.io",
            "virtualmachineinstancemigrations.kubevirt.io",
            "configmaps,secrets",
        ):
            control_plane.kubectl("delete", kinds, "--all", "-n", ns, "--wait=false", check=False)
        control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        _finalize(control_plane, ns)


@pytest.fixture
def cluster_names(control_plane: ControlPlane) -> Iterator[list[str]]:
    """Cluster-scoped objects a test creates (`kind/name`), deleted afterwards."""
    names: list[str] = []
    yield names
    for n in names:
        with contextlib.suppress(Exception):
            control_plane.kubectl("delete", n, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture(scope="session")
def repo() -> Path:
    return layout.repo_root()
