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
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from gtvp import kube
from gtvp_local import layout
from gtvp_local.controlplane import OPERATOR, ControlPlane, ephemeral_control_plane
from gtvp_local.pool import apply_manifests
from gtvp_local.processes import ProcessTable
from gtvp_local.swtpm import Swtpm, SwtpmCA


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with ephemeral_control_plane(tmp_path_factory.mktemp("controlplane")) as cp:
        yield cp


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


@pytest.fixture(scope="module")
def operator_clients(control_plane: ControlPlane) -> kube.Clients:
    """Clients as the operator's identity, with the RBAC the chart and `gtvp local` give it
    (its ClusterRoles and bindings applied)."""
    apply_manifests(control_plane)
    return kube.make_clients(str(control_plane.kubeconfig_for(OPERATOR)))


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


# ----- TPMs: real swtpm emulators with EK certificates from a private swtpm CA ----------------


@pytest.fixture(scope="session")
def tpm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tpms")


@pytest.fixture(scope="session")
def swtpm_ca(tpm_dir: Path) -> SwtpmCA:
    return SwtpmCA(tpm_dir / "ca").ensure()


@pytest.fixture(scope="session")
def make_tpm(tpm_dir: Path, swtpm_ca: SwtpmCA) -> Iterator[Callable[..., Swtpm]]:
    """Manufacture and start a fresh swtpm (EK certificate from `swtpm_ca` unless told)."""
    procs = ProcessTable(tpm_dir)
    made: list[Swtpm] = []

    def make(name: str | None = None, ca: SwtpmCA | None = None) -> Swtpm:
        name = name or f"tpm-{uuid.uuid4().hex[:8]}"
        tpm = Swtpm(name, tpm_dir / "state" / name, procs)
        tpm.manufacture(ca or swtpm_ca)
        tpm.start()
        made.append(tpm)
        return tpm

    yield make
    for tpm in made:
        tpm.stop()


@pytest.fixture(scope="session")
def shared_tpm(make_tpm: Callable[..., Swtpm]) -> Swtpm:
    """One swtpm for tests that only read from it (never extend its PCRs here)."""
    return make_tpm("shared")


# what a failed test's report shows of the pool it ran against: the processes whose logs
# explain most failures (the operator replicas, KubeVirt's stand-in)
FAILURE_LOGS = ("operator", "virtsim")
FAILURE_LOG_LINES = 60


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failure, the tails of the pool's operator and stand-in logs join the report
    (a CI run keeps nothing else of the pool)."""
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for title, text in pool_logs(getattr(item, "funcargs", {}).get("pool")):
            report.sections.append((title, text))
    return report


def pool_logs(pool: object) -> list[tuple[str, str]]:
    """(title, last lines) of each operator and stand-in log of `pool` (a `Pool`, or
    anything with a `procs` ProcessTable); [] for anything else."""
    procs = getattr(pool, "procs", None)
    if not isinstance(procs, ProcessTable):
        return []
    out = []
    for tracked in procs.all():
        if tracked.name.startswith(FAILURE_LOGS):
            tail = procs.log_tail(tracked.name, FAILURE_LOG_LINES)
            out.append((f"pool log: {tracked.name} (last {FAILURE_LOG_LINES} lines)", tail))
    return out
