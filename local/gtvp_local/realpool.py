"""gtvp installed by Helm on the real node: `gtvp local up --install helm` and the e2e tests.

On a control plane started with the real node's address (`ControlPlane(node_ip=...)`):
the real node (`realnode`), gtvp's image built here and imported into its containerd, an
swtpm for the node listening on the node's address (the agent pod reaches it over TCP: a
test-rig chart value, the default being /dev/tpmrm0), the node's Member and a
SecurityPolicy for the pool's swtpm CA, then the chart (`installation.helm_install`) with
the operator and agent pods on the real node. Returns the `Installation` the installed-mode
e2e tests read. No simulated component is involved: no kwok, no stand-in operator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gtvp_local import images, installation, layout, realnode, toolchain
from gtvp_local.controlplane import WEBHOOK_CLIENT_NAME, ControlPlane
from gtvp_local.pool import pool_policy
from gtvp_local.processes import ProcessTable
from gtvp_local.swtpm import Swtpm, SwtpmCA

Say = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def node_tpm(directory: Path) -> Swtpm:
    """The real node's swtpm, on the node's address (reachable from its pods)."""
    saved = directory / "tpm-port"
    return Swtpm(
        realnode.NODE_NAME,
        directory / "tpms" / realnode.NODE_NAME,
        ProcessTable(directory),
        int(saved.read_text()) if saved.is_file() else None,  # the port of the last start
        host=realnode.NODE_IP,
    )


def install(
    cp: ControlPlane,
    directory: Path,
    *,
    replicas: int = 2,
    identity: int = 3,
    policy: Mapping[str, Any] | None = None,
    say: Say = _quiet,
) -> installation.Installation:
    """Everything in the module docstring, in order; waits until the node's Member is
    Trusted through the agent pod. Idempotent: a second call finds what runs."""
    directory.mkdir(parents=True, exist_ok=True)
    say("gtvp's image (debootstrap + pip + umoci, cached)")
    image = images.build(layout.repo_root(), say=lambda m: say(f"  {m}"))
    node = realnode.RealNode(directory / "node", cp)
    say("a real node: containerd + runc + CNI bridge, kubelet, kube-proxy, scheduler, controllers")
    node.start(say=lambda m: say(f"  {m}"))
    node.import_image(image.archive)
    say(f"  image {image.reference} imported into the node's containerd (never pulled)")
    ca = SwtpmCA(directory / "swtpm-ca").ensure()
    tpm = node_tpm(directory)
    tpm.manufacture(ca)
    tpm.start()
    (directory / "tpm-port").write_text(str(tpm.port))
    say(f"  {realnode.NODE_NAME}'s swtpm on {tpm.tcti} (EK certificate from the pool's swtpm CA)")
    found = installation.install(
        helm=toolchain.binaries().helm,
        kubectl=toolchain.binaries().kubectl,
        kubeconfig=cp.admin_kubeconfig,
        image=image.reference,
        pod_tpms={realnode.NODE_NAME: tpm.tcti},
        test_tpms={realnode.NODE_NAME: tpm.tcti},
        policy=pool_policy(ca, **(policy or {})),
        identity=identity,
        replicas=replicas,
        node_selector={realnode.NODE_LABEL: "true"},
        state_host_path=str(directory / "agent-state"),
        rig="local-real-node",
        # the control plane presents its webhook client certificate: the operator requires it
        webhook_client=installation.WebhookClient(
            cp.webhook_client_ca.read_text(), (WEBHOOK_CLIENT_NAME,)
        ),
        say=say,
    )
    found.save(directory / "installation.json")
    return found


def uninstall(cp: ControlPlane, directory: Path) -> None:
    """helm uninstall, then stop the node and its swtpm (the control plane stays)."""
    helm = toolchain.binaries().helm
    installation.helm_uninstall(helm, cp.admin_kubeconfig)
    stop(cp, directory)


def stop(cp: ControlPlane, directory: Path) -> list[str]:
    stopped = realnode.RealNode(directory / "node", cp).stop()
    procs = ProcessTable(directory)
    stopped += [t.name for t in procs.all() if procs.stop(t.name)]
    return stopped
