"""The real node (`gtvp_local.realnode`): a pod runs on it, and stopping it leaves nothing.

Real: kubelet, kube-proxy, kube-scheduler, kube-controller-manager built from the Kubernetes
module, Debian's containerd + runc + CNI plugins, the pause image compiled here. The node
changes the machine (a bridge, network namespaces, iptables chains, mounts, shim processes):
a user who runs `gtvp local down` expects all of it gone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gtvp_local import pause, realnode
from gtvp_local.controlplane import ControlPlane, ephemeral_control_plane
from gtvp_local.polling import wait_for
from tests.prerequisites import unavailable

pytestmark = [pytest.mark.controlplane, pytest.mark.installed]


def _machine_traces(node: realnode.RealNode) -> dict[str, object]:
    """What the node leaves on the machine, as a user would look for it."""
    links, netns, chains = (
        _out(*c) for c in (("ip", "-o", "link"), ("ip", "netns"), ("iptables-save",))
    )
    mounts = Path("/proc/self/mounts").read_text()
    shims = [
        p.name
        for p in Path("/proc").iterdir()
        if p.name.isdigit()
        and str(node.socket).encode() in _cmdline(p)
        and b"containerd-shim" in _cmdline(p)
    ]
    return {
        "bridge": f" {realnode.BRIDGE}:" in links,
        "cni netns": [ln for ln in netns.splitlines() if ln.startswith("cni-")],
        "kube chains": sorted({ln.split()[0] for ln in chains.splitlines() if "KUBE-" in ln}),
        "mounts": [ln for ln in mounts.splitlines() if str(node.state) in ln],
        "shims": shims,
        "run dir": node.run_dir.exists(),
    }


def _out(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    missing = realnode.missing_programs()
    if missing:
        unavailable("the real node needs: " + "; ".join(missing))
    state = tmp_path_factory.mktemp("realnode")
    with ephemeral_control_plane(
        state / "cp", kubevirt=False, gtvp=False, node_ip=realnode.NODE_IP
    ) as plane:
        yield plane


def test_a_pod_runs_and_stopping_the_node_leaves_nothing_behind(
    cp: ControlPlane, tmp_path: Path
) -> None:
    node = realnode.RealNode(tmp_path / "node", cp)
    try:
        node.start()
        assert pause.PAUSE_REFERENCE in node.images()  # built here, never pulled
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "sleeper", "namespace": "default"},
            "spec": {
                "containers": [
                    {
                        "name": "pause",
                        "image": pause.PAUSE_REFERENCE,
                        "imagePullPolicy": "Never",
                    }
                ],
                "automountServiceAccountToken": False,
            },
        }
        cp.kubectl("apply", "-f", "-", input_text=json.dumps(pod))

        def running() -> dict[str, str] | None:
            got = json.loads(cp.kubectl("get", "pod", "sleeper", "-o", "json").stdout)
            status = got.get("status") or {}
            return status if status.get("phase") == "Running" else None

        status = wait_for("the pod Running on the real node", running, timeout=90)
        assert status["podIP"].startswith("10.244.0.")  # its own address on the bridge
        while_up = _machine_traces(node)
        assert while_up["bridge"]
        assert while_up["cni netns"]
        assert while_up["shims"]
    finally:
        stopped = node.stop()
    assert "kubelet" in stopped
    assert "containerd" in stopped
    assert _machine_traces(node) == {
        "bridge": False,
        "cni netns": [],
        "kube chains": [],
        "mounts": [],
        "shims": [],
        "run dir": False,
    }


def test_the_pause_image_is_the_same_every_build() -> None:
    """Compiled here, packed with fixed timestamps: the sandbox image's digest depends only
    on the compiler's output (what the pod sandbox runs is reviewable)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    archive = pause.ensure_archive()
    binary = b"\x7fELF not really, but bytes"
    assert pause.oci_archive(binary) == pause.oci_archive(binary)
    assert pause.oci_archive(binary) != pause.oci_archive(binary + b"!")

    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        index = json.loads(member.read())
    annotations = index["manifests"][0]["annotations"]
    assert annotations["io.containerd.image.name"] == pause.PAUSE_REFERENCE


def test_a_kubelet_cannot_give_its_node_gtvps_trust_labels_nor_touch_another_node(
    cp: ControlPlane,
) -> None:
    """The real node's kubelet identity (group system:nodes) is bounded by the Node
    authorizer and NodeRestriction: root on a member cannot label itself trusted."""
    for name in (realnode.NODE_NAME, "another-node"):
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}
        cp.kubectl("apply", "-f", "-", input_text=json.dumps(node))

    def as_kubelet(*args: str) -> subprocess.CompletedProcess[str]:
        return cp.kubectl(*args, identity=realnode.KUBELET, check=False)

    own = as_kubelet("label", "node", realnode.NODE_NAME, "gtvp.example/harmless=yes")
    assert own.returncode == 0, own.stderr  # its own Node, a label kubelets may set
    trusted = as_kubelet(
        "label", "node", realnode.NODE_NAME, "node-restriction.kubernetes.io/gtvp-level-3=true"
    )
    assert trusted.returncode != 0
    assert "node-restriction.kubernetes.io" in trusted.stderr
    other = as_kubelet("label", "node", "another-node", "gtvp.example/harmless=yes")
    assert other.returncode != 0
    assert "forbidden" in other.stderr.lower()
