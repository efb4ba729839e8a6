"""gtvp installed by its Helm chart, and the description the installed-mode e2e tests read.

One code path for every rig: `gtvp local up --install helm` and the installed-mode e2e tests
on this machine's real node (`realpool`), and kind/e2e.sh on Docker hosts (`kindrig`) all
call `install` here, which returns the `Installation` they save; the tests in
tests/e2e/test_installed.py read that file (`GTVP_E2E_INSTALLATION`) and only talk to the
cluster through its kubeconfig and to the members' TPMs through their TCTI.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gtvp.core.api_resources import GTVP_API_VERSION
from gtvp.core.phases import MemberPhase
from gtvp_local import layout
from gtvp_local.polling import wait_for

RELEASE = "gtvp"
NAMESPACE = "gtvp-system"
ENV = "GTVP_E2E_INSTALLATION"
"""Names the Installation file the installed-mode e2e tests run against."""

Say = Callable[[str], None]


class InstallError(RuntimeError):
    """helm failed; the message has helm's own words."""


@dataclass(frozen=True)
class Installation:
    """What a test needs to know of a cluster where gtvp was installed with the chart."""

    kubeconfig: str
    members: dict[str, str]
    """Node name -> the TCTI of that node's TPM, reachable from where the tests run (tamper)."""
    namespace: str = NAMESPACE
    release: str = RELEASE
    policy: str = "default"
    rig: str = "local-real-node"
    """Who made it: `local-real-node` (this machine) or `kind`."""
    notes: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Installation:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InstallError(f"cannot read the installation description {path}: {exc}") from exc
        missing = [k for k in ("kubeconfig", "members") if k not in data]
        if missing:
            raise InstallError(f"{path} lacks {', '.join(missing)} (written by installation.py?)")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def image_values(reference: str) -> dict[str, Any]:
    """`image.*` values for an image reference `repo:tag` already on the nodes (never pulled)."""
    repo, _, tag = reference.rpartition(":")
    if not repo or "/" in tag:
        raise InstallError(f"image reference {reference!r} has no tag")
    return {"repository": repo, "tag": tag, "pullPolicy": "Never"}


@dataclass(frozen=True)
class WebhookClient:
    """The certificate a rig's API server presents to webhooks: its CA (PEM) and names."""

    ca_pem: str
    names: tuple[str, ...]


def chart_values(
    *,
    image: str,
    tpm_per_node: Mapping[str, str],
    node_selector: Mapping[str, str] | None = None,
    replicas: int = 2,
    policy: str = "default",
    state_host_path: str | None = None,
    webhook_client: WebhookClient | None = None,
) -> dict[str, Any]:
    """The chart values of a test rig: local images (never pulled), the agent on each node's
    swtpm over TCP (test rigs only: the chart's default is the node's /dev/tpmrm0; with no
    device fallback the agent runs unprivileged), and, when `node_selector` is given, the
    operator and agent pods on those nodes instead of the control plane. Everything else is
    the chart's default, but for `webhook_client`: when the rig's API server presents a
    webhook client certificate, the operator requires it (webhooks.clientAuth)."""
    values: dict[str, Any] = {
        "image": image_values(image),
        "policyName": policy,
        "operator": {"replicas": replicas},
        "agent": {"tpmPerNode": dict(tpm_per_node), "tpmDevice": ""},
    }
    if node_selector is not None:
        # null drops the chart's default selector (control-plane nodes) instead of adding to it
        values["operator"]["nodeSelector"] = {
            "node-role.kubernetes.io/control-plane": None,
            **node_selector,
        }
        values["agent"]["nodeSelector"] = dict(node_selector)
    if state_host_path is not None:
        values["agent"]["stateHostPath"] = state_host_path
    if replicas < 3:
        # the default budget (minAvailable 2) must stay below replicas (the render checks)
        values["operator"]["podDisruptionBudget"] = {"minAvailable": 1}
    if webhook_client is not None:
        values["webhooks"] = {
            "clientAuth": {
                "enabled": True,
                "caBundle": webhook_client.ca_pem,
                "commonNames": list(webhook_client.names),
            }
        }
    return values


def kubectl_apply(kubectl: Path, kubeconfig: Path, obj: Mapping[str, Any]) -> None:
    """Server-side apply of one object as `gtvp-rig` (the rig's fields, nobody else's)."""
    proc = subprocess.run(
        [
            str(kubectl),
            "--kubeconfig",
            str(kubeconfig),
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=gtvp-rig",
            "-f",
            "-",
        ],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise InstallError(f"kubectl apply failed: {proc.stderr.strip()[-1000:]}")


def member_phase(kubectl: Path, kubeconfig: Path, member: str) -> str | None:
    proc = subprocess.run(
        [str(kubectl), "--kubeconfig", str(kubeconfig), "get", "member", member, "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return None
    phase = (json.loads(proc.stdout).get("status") or {}).get("phase")
    return str(phase) if phase else None


def install(
    *,
    helm: Path,
    kubectl: Path,
    kubeconfig: Path,
    image: str,
    pod_tpms: Mapping[str, str],
    test_tpms: Mapping[str, str],
    policy: Mapping[str, Any],
    identity: int = 3,
    replicas: int = 2,
    node_selector: Mapping[str, str] | None = None,
    state_host_path: str | None = None,
    rig: str,
    webhook_client: WebhookClient | None = None,
    timeout: float = 180.0,
    say: Say = lambda _m: None,
) -> Installation:
    """gtvp by its chart on a cluster whose nodes already hold `image` and each run an swtpm:
    helm install, each node's Member at `identity` and the SecurityPolicy `policy` (after the
    chart: its CRDs are the chart's), then wait until every member is Trusted through its
    agent pod. `pod_tpms`: node -> TCTI as the agent pods reach it; `test_tpms`: as the tests
    reach it (tamper). The one path of every rig (module docstring)."""
    values = chart_values(
        image=image,
        tpm_per_node=pod_tpms,
        node_selector=node_selector,
        replicas=replicas,
        policy=str(policy["metadata"]["name"]),
        state_host_path=state_host_path,
        webhook_client=webhook_client,
    )
    helm_install(helm, kubeconfig, values, say=say)
    for node in pod_tpms:
        kubectl_apply(
            kubectl,
            kubeconfig,
            {
                "apiVersion": GTVP_API_VERSION,
                "kind": "Member",
                "metadata": {"name": node},
                "spec": {"identity": identity},
            },
        )
    kubectl_apply(kubectl, kubeconfig, policy)
    for node in pod_tpms:

        def trusted(node: str = node) -> bool:
            return member_phase(kubectl, kubeconfig, node) == MemberPhase.TRUSTED

        wait_for(
            f"member {node} Trusted through its agent pod (see `kubectl -n {NAMESPACE} logs "
            f"ds/{RELEASE}-agent`)",
            trusted,
            timeout=timeout,
            every=1.0,
        )
        say(f"  member {node}: Trusted (EK certificate, AK activation, quote) via its agent pod")
    return Installation(
        kubeconfig=str(kubeconfig.resolve()),
        members=dict(test_tpms),
        policy=str(policy["metadata"]["name"]),
        rig=rig,
        notes=[f"image {image}"],
    )


def helm_install(
    helm: Path,
    kubeconfig: Path,
    values: Mapping[str, Any],
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    chart: Path | None = None,
    timeout: str = "5m",
    extra: Sequence[str] = (),
    say: Say | None = None,
) -> str:
    """`helm upgrade --install --wait` of the repository's chart; returns helm's output."""
    chart = chart or layout.repo_root() / "charts" / "gtvp"
    values_file = kubeconfig.parent / f"{release}-values.json"
    values_file.write_text(json.dumps(values, indent=2))
    cmd = [
        str(helm),
        "upgrade",
        "--install",
        release,
        str(chart),
        "--namespace",
        namespace,
        "--create-namespace",
        "--kubeconfig",
        str(kubeconfig),
        "--values",
        str(values_file),
        "--wait",
        "--timeout",
        timeout,
        *extra,
    ]
    if say is not None:
        say(f"  helm upgrade --install {release} charts/gtvp -n {namespace} --wait")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise InstallError(
            f"helm install of {release} failed (exit {proc.returncode}):\n"
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return proc.stdout


def helm_uninstall(
    helm: Path, kubeconfig: Path, *, release: str = RELEASE, namespace: str = NAMESPACE
) -> str:
    proc = subprocess.run(
        [
            str(helm),
            "uninstall",
            release,
            "--namespace",
            namespace,
            "--kubeconfig",
            str(kubeconfig),
            "--wait",
            "--timeout",
            "3m",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise InstallError(f"helm uninstall of {release} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout
