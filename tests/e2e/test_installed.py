"""gtvp installed by its Helm chart, its pods running on a real kubelet: the trust gate end to end.

Real: kube-apiserver + etcd, a kubelet + containerd + runc + CNI node with kube-proxy,
kube-scheduler and kube-controller-manager (all built here), gtvp's image built here and
never pulled, the chart installed by helm, the operator's pods serving the admission webhooks
through their Service, the agent DaemonSet's pod attesting its node through an swtpm over
TCP. Nothing is simulated in this module: no kwok, no stand-in operator or agent.

Two rigs run these same tests (`gtvp_local.installation`):
- by default the tests make their own installation on this machine's real node
  (`gtvp_local.realpool`, what `gtvp local up --install helm` runs);
- with `GTVP_E2E_INSTALLATION=<file>` they run against the installation that file describes,
  made by kind/e2e.sh on a Docker host (external-cluster mode).
Ordered: the tests that only look come first, then helm upgrade and rollback, tamper, helm
uninstall.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gtvp.core.trust import TAINT_KEY, TRUSTED_LABEL
from gtvp_local import installation, realnode, realpool, toolchain
from gtvp_local.controlplane import ephemeral_control_plane
from gtvp_local.installation import Installation
from gtvp_local.polling import wait_for
from gtvp_local.swtpm import extend_pcr
from tests.prerequisites import unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.installed]

LEVEL_3 = "node-restriction.kubernetes.io/gtvp-level-3"


class Cluster:
    """kubectl and helm against the installation's kubeconfig."""

    def __init__(self, inst: Installation) -> None:
        self.inst = inst
        self.kubeconfig = Path(inst.kubeconfig)
        self.bins = toolchain.binaries()

    def kubectl(
        self, *args: str, input_text: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.bins.kubectl), "--kubeconfig", str(self.kubeconfig), *args],
            input=input_text,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def get(self, *args: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.kubectl("get", *args, "-o", "json").stdout)
        return out

    def pods(self, component: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.get(
            "pods",
            "-n",
            self.inst.namespace,
            "-l",
            f"app.kubernetes.io/component={component},app.kubernetes.io/instance={self.inst.release}",
        )["items"]
        return items

    def create(self, ns: str, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return self.kubectl("create", "-n", ns, "-f", "-", input_text=json.dumps(obj), check=False)

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(self.bins.helm),
                "--kubeconfig",
                str(self.kubeconfig),
                "--namespace",
                self.inst.namespace,
                *args,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )


def _prerequisites() -> list[str]:
    return realnode.missing_programs() + [
        f"{p} (Debian package {pkg})"
        for p, pkg in (("swtpm", "swtpm"), ("tpm2_pcrextend", "tpm2-tools"))
        if shutil.which(p) is None
    ]


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    described = os.environ.get(installation.ENV)
    if described:
        yield Installation.load(Path(described))
        return
    missing = _prerequisites()
    if missing:
        unavailable("the real-node installation needs: " + "; ".join(missing))
    state = tmp_path_factory.mktemp("installed")
    with ephemeral_control_plane(
        state / "cp", gtvp=False, node_ip=realnode.NODE_IP
    ) as cp:  # gtvp's CRDs come with the chart
        try:
            yield realpool.install(
                cp,
                state,
                replicas=2,
                policy={"interval": "2s", "valid_for": "8s", "max_uses": 50},
                say=print,
            )
        finally:
            realpool.stop(cp, state)


@pytest.fixture(scope="module")
def cluster(inst: Installation) -> Cluster:
    return Cluster(inst)


@pytest.fixture
def ns(cluster: Cluster) -> Iterator[str]:
    name = f"inst-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _vm(name: str, level: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "labels": {"gtvp.io/level": str(level)}},
        "spec": {
            "runStrategy": "Halted",
            "template": {
                "metadata": {"labels": {"gtvp.io/level": str(level)}},
                "spec": {"domain": {"devices": {}, "memory": {"guest": "64Mi"}}},
            },
        },
    }


def _vmi(name: str, level: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "labels": {"gtvp.io/level": str(level)}},
        "spec": {"domain": {"devices": {}, "memory": {"guest": "64Mi"}}},
    }


def _ready(pod: dict[str, Any]) -> bool:
    conds = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


# ----- the chart's pods, for real --------------------------------------------------------------
def test_operator_and_agent_pods_run_from_the_local_image(cluster: Cluster) -> None:
    operators = wait_for(
        "operator pods Ready",
        lambda: (p := cluster.pods("operator")) and all(_ready(x) for x in p) and p,
        timeout=60,
    )
    assert len(operators) == 2 if cluster.inst.rig == "local-real-node" else len(operators) >= 1
    agents = cluster.pods("agent")
    assert {a["spec"]["nodeName"] for a in agents} >= set(cluster.inst.members)
    for pod in operators + agents:
        status = pod["status"]["containerStatuses"][0]
        assert status["ready"], pod["metadata"]["name"]
        assert status["imageID"], "the kubelet reports the image it runs"
        assert pod["spec"]["containers"][0]["imagePullPolicy"] == "Never"  # built, not pulled
    if cluster.inst.rig == "local-real-node":
        node = cluster.get("node", realnode.NODE_NAME)
        info = node["status"]["nodeInfo"]
        assert info["kubeletVersion"] == toolchain.KUBERNETES_VERSION
        assert info["containerRuntimeVersion"].startswith("containerd://")
        assert all(p["status"]["podIP"].startswith("10.244.0.") for p in operators + agents)


def test_member_trusted_through_its_agent_pod(cluster: Cluster) -> None:
    for member in cluster.inst.members:
        got = cluster.get("member", member)
        assert got["status"]["phase"] == "Trusted", got["status"]
        node = cluster.get("node", member)
        assert node["metadata"]["labels"].get(TRUSTED_LABEL) == "true"
        assert node["metadata"]["labels"].get(LEVEL_3) == "true"
        assert not any(t["key"] == TAINT_KEY for t in node["spec"].get("taints") or [])
    # the agent that attests is the pod's: its logs show the TPM it was given by the chart
    agent = next(p for p in cluster.pods("agent") if p["spec"]["nodeName"] in cluster.inst.members)
    logs = cluster.kubectl(
        "logs", "-n", cluster.inst.namespace, agent["metadata"]["name"], "--tail=200"
    ).stdout
    assert "swtpm:host=" in logs


def test_webhooks_are_served_by_the_pods_through_their_service(cluster: Cluster) -> None:
    for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
        items = cluster.get(kind, "-l", f"app.kubernetes.io/instance={cluster.inst.release}")
        hooks = [h for item in items["items"] for h in item["webhooks"]]
        assert hooks, kind
        for hook in hooks:
            assert hook["clientConfig"]["service"]["namespace"] == cluster.inst.namespace
            # the gates fail closed (the SecurityPolicy check is advisory: the operator
            # refuses an unusable policy itself, and must never block its own repair)
            if "securitypolicy" not in hook["name"]:
                assert hook["failurePolicy"] == "Fail", hook["name"]
    endpoints = cluster.get(
        "endpointslices",
        "-n",
        cluster.inst.namespace,
        "-l",
        f"kubernetes.io/service-name={cluster.inst.release}-webhooks",
    )
    ips = {a for s in endpoints["items"] for e in s["endpoints"] or [] for a in e["addresses"]}
    pod_ips = {p["status"]["podIP"] for p in cluster.pods("operator")}
    assert ips
    assert ips <= pod_ips


def test_gated_vm_is_admitted_with_the_trust_selector(cluster: Cluster, ns: str) -> None:
    out = cluster.create(ns, _vm("web", 3))
    assert out.returncode == 0, out.stderr
    vm = cluster.get("vm", "web", "-n", ns)
    assert vm["spec"]["template"]["spec"]["nodeSelector"] == {
        TRUSTED_LABEL: "true",
        LEVEL_3: "true",
    }
    # a VMI of a level no member has is refused by the pods' validating webhook
    out = cluster.create(ns, _vmi("secret", 5))
    assert out.returncode != 0
    # no policy level 5 either: refused as a level the policy does not define
    assert "needs level 5, which the SecurityPolicy in force does not define" in out.stderr


def test_metrics_need_a_token_allowed_to_read_them(cluster: Cluster) -> None:
    if cluster.inst.rig != "local-real-node":
        pytest.skip("pod IPs are reachable from the tests only on the local real node")
    pod = cluster.pods("operator")[0]
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    url = f"https://{pod['status']['podIP']}:9090/metrics"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, context=ctx, timeout=10)
    assert refused.value.code == 401


def test_only_the_api_server_gets_an_answer_from_the_webhook_pods(cluster: Cluster) -> None:
    """A forged review posted straight to an operator pod (as any pod could) fails in the TLS
    handshake, with no certificate or with a certificate of the cluster's CA; gated VMs are
    still admitted through the API server (test_gated_vm_is_admitted_with_the_trust_selector)."""
    if cluster.inst.rig != "local-real-node":
        pytest.skip("pod IPs are reachable from the tests only on the local real node")
    operator = cluster.get("deployment", "gtvp-operator", "-n", cluster.inst.namespace)
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--webhook-client-ca=/webhook-client/ca.crt" in args
    pod_ip = cluster.pods("operator")[0]["status"]["podIP"]
    admin = Path(cluster.inst.kubeconfig).parent / "pki" / "users"
    for cert in (None, (str(admin / "admin.crt"), str(admin / "admin.key"))):
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        if cert is not None:
            ctx.load_cert_chain(*cert)
        request = urllib.request.Request(
            f"https://{pod_ip}:9443/gtvp-validate-vm",
            data=b"{}",
            headers={"Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(request, context=ctx, timeout=10)  # noqa: S310
        except urllib.error.HTTPError as answered:  # an HTTP answer: the handshake passed
            pytest.fail(f"a forged review got through the handshake ({answered.code})")
        except (ssl.SSLError, urllib.error.URLError, ConnectionError):
            continue  # refused in the TLS handshake
        pytest.fail("a forged review was answered")


# ----- helm upgrade: a rolling restart with no admission gap, the webhook CA kept -------------
def _ca_bundles(cluster: Cluster) -> set[str]:
    items = cluster.get(
        "validatingwebhookconfiguration", "-l", f"app.kubernetes.io/instance={cluster.inst.release}"
    )["items"]
    return {h["clientConfig"]["caBundle"] for i in items for h in i["webhooks"]}


def _why_the_check_failed(cluster: Cluster) -> str:
    """The upgrade check's pods and Events, for a failed upgrade's message."""
    ns = cluster.inst.namespace
    pods = cluster.kubectl(
        "get", "pods", "-n", ns, "-l", "app.kubernetes.io/component=upgrade-check", "-o", "wide",
        check=False,
    )  # fmt: skip
    logs = cluster.kubectl(
        "logs", "-n", ns, "-l", "app.kubernetes.io/component=upgrade-check", "--tail=20",
        check=False,
    )  # fmt: skip
    events = cluster.kubectl(
        "get", "events", "-n", ns, "--sort-by=.lastTimestamp", check=False
    ).stdout.splitlines()[-25:]
    return "\n".join(["", pods.stdout, pods.stderr, logs.stdout, logs.stderr, *events])


def _checks_completed(cluster: Cluster) -> int:
    """How many runs of the chart's upgrade check Job completed (its Events outlive it)."""
    said = cluster.get(
        "events", "-n", cluster.inst.namespace, "--field-selector",
        f"involvedObject.kind=Job,involvedObject.name={cluster.inst.release}-upgrade-check",
    )["items"]  # fmt: skip
    return sum(int(e.get("count") or 1) for e in said if e["reason"] == "Completed")


def test_helm_upgrade_rolls_the_operator_without_an_admission_gap(
    cluster: Cluster, ns: str
) -> None:
    checks_before = _checks_completed(cluster)  # the install's (and any earlier upgrade's)
    before_ca = _ca_bundles(cluster)
    before_pods = {p["metadata"]["name"] for p in cluster.pods("operator")}
    failures: list[str] = []
    admitted = 0
    stop = threading.Event()

    def client() -> None:
        nonlocal admitted
        i = 0
        while not stop.is_set():
            i += 1
            out = cluster.create(ns, _vm(f"loop-{i}", 3))
            if out.returncode == 0:
                admitted += 1
            else:
                failures.append(out.stderr.strip())
            time.sleep(0.2)

    worker = threading.Thread(target=client, daemon=True)
    worker.start()
    try:
        out = cluster.helm(
            "upgrade",
            cluster.inst.release,
            str(Path(__file__).resolve().parents[2] / "charts" / "gtvp"),
            "--reuse-values",
            "--set-string",
            f"operator.podAnnotations.gtvp-e2e/rolled={time.time_ns()}",
            "--wait",
            "--timeout",
            "5m",
        )
        assert out.returncode == 0, out.stderr + _why_the_check_failed(cluster)
        wait_for(
            "the new operator pods Ready",
            lambda: (
                (p := cluster.pods("operator"))
                and not {x["metadata"]["name"] for x in p} & before_pods
                and all(_ready(x) for x in p)
            ),
            timeout=120,
        )
        time.sleep(2)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert admitted > 10
    assert failures == [], f"{len(failures)} of {admitted + len(failures)} refused: {failures[:3]}"
    assert _ca_bundles(cluster) == before_ca  # the webhook CA outlives the upgrade
    # the pre-upgrade check ran once more on this kubelet, with the new image and its own
    # account, found the pool's policy accepted by this version, and was deleted as it passed
    assert _checks_completed(cluster) == checks_before + 1
    left = cluster.kubectl(
        "get", "job", f"{cluster.inst.release}-upgrade-check", "-n", cluster.inst.namespace,
        check=False,
    )  # fmt: skip
    assert left.returncode != 0  # deleted once it passed (hook-succeeded)


def test_helm_rollback_runs_the_check_before_the_older_revision_returns(cluster: Cluster) -> None:
    checks_before = _checks_completed(cluster)
    out = cluster.helm("rollback", cluster.inst.release, "--wait", "--timeout", "5m")
    assert out.returncode == 0, out.stderr + _why_the_check_failed(cluster)
    # the revision rolled back to brought its own check (stored with it at install), which
    # judged the pool's policy with that revision's image before anything was rolled back
    assert _checks_completed(cluster) == checks_before + 1
    status = json.loads(cluster.helm("status", cluster.inst.release, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    assert "rollback" in status["info"]["description"].lower()


# ----- tamper: the member quarantined, its level gone ---------------------------------------
def test_tampered_member_is_quarantined(cluster: Cluster, ns: str) -> None:
    member, tcti = sorted(cluster.inst.members.items())[0]
    extend_pcr(tcti, 7, b"rootkit in the boot chain")
    wait_for(
        f"{member} Untrusted",
        lambda: (cluster.get("member", member).get("status") or {}).get("phase") == "Untrusted",
        timeout=60,
    )
    status = cluster.get("member", member)["status"]
    assert status["trust"]["reason"] == "PcrMismatch"
    node = wait_for(
        "the gtvp taint on the node",
        lambda: (
            (n := cluster.get("node", member))
            and any(t["key"] == TAINT_KEY for t in n["spec"].get("taints") or [])
            and n
        ),
        timeout=30,
    )
    assert TRUSTED_LABEL not in node["metadata"]["labels"]
    assert LEVEL_3 not in node["metadata"]["labels"]
    if len(cluster.inst.members) == 1:
        out = cluster.create(ns, _vmi("after-tamper", 3))
        assert out.returncode != 0
        assert "no Trusted member of level >= 3" in out.stderr


# ----- helm uninstall: gtvp gone, its CRDs and members kept ------------------------------------
def test_helm_uninstall_removes_gtvp_and_keeps_its_crds(cluster: Cluster) -> None:
    out = cluster.helm("uninstall", cluster.inst.release, "--wait", "--timeout", "3m")
    assert out.returncode == 0, out.stderr
    wait_for("operator and agent pods gone", lambda: not cluster.pods("operator"), timeout=90)
    crds = cluster.kubectl("get", "crd", "-o", "name").stdout
    for crd in ("members.gtvp.io", "securitypolicies.gtvp.io", "oscomponents.gtvp.io"):
        assert crd in crds  # helm.sh/resource-policy: keep
    assert set(cluster.inst.members) <= {
        m["metadata"]["name"] for m in cluster.get("members")["items"]
    }
    hooks = cluster.get(
        "validatingwebhookconfiguration", "-l", f"app.kubernetes.io/instance={cluster.inst.release}"
    )["items"]
    assert hooks == []  # no webhook left to refuse everything (fail closed) with no server
