"""A real etcd + kube-apiserver on loopback, with client-certificate users and gtvp's CRDs.

This is the control plane behind `gtvp local up` and the test suite. It is a real
Kubernetes API server (built from the release's Go modules by `toolchain`), never a mock:
RBAC is on, users are client certificates (admin in `system:masters`, the operator and one
agent per node each with its own identity), service-account tokens are signed.

There is no kube-controller-manager: no garbage collection and no namespace finalization
(the test fixtures finalize their namespaces themselves).

The API server authenticates itself to admission webhooks, as docs/chart.md asks of a real
cluster: its admission configuration gives it a client certificate (common name
`WEBHOOK_CLIENT_NAME`) from a CA of its own (`webhook_client_ca`), which gtvp's operators are
told to require. It is presented to every webhook here ('*'): gtvp's, and the SIMULATED
virt-api eviction webhook of the stand-in, which does not ask for it.

`ephemeral_control_plane` is the throwaway one the tests and benchmarks run on: free ports,
its own state directory, gtvp's and KubeVirt's CRDs, stopped when the `with` block ends.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gtvp_local import layout, pki, toolchain
from gtvp_local.processes import ProcessTable, free_port, port_in_use
from gtvp_local.toolchain import Binaries

ADMIN_USER = "gtvp:admin"
OPERATOR_USER = "gtvp:operator"
OPERATOR_GROUP = "gtvp:operators"
AGENT_GROUP = "gtvp:agents"
AGENT_USER_PREFIX = "gtvp:agent:"
WEBHOOK_CLIENT_NAME = "kube-apiserver-webhook-client"
"""Common name of the client certificate the API server presents to admission webhooks."""
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"


class ControlPlaneError(RuntimeError):
    """The control plane could not be started or reached; the message says what to do."""


@dataclass(frozen=True)
class Ports:
    """Loopback ports of one control plane."""

    etcd_client: int = 22379
    etcd_peer: int = 22380
    apiserver: int = 26443


@dataclass(frozen=True)
class Identity:
    """A client-certificate user of the API server."""

    user: str
    groups: tuple[str, ...]
    stem: str


def agent_identity(node: str) -> Identity:
    """The identity the agent on `node` uses; the VAP keys its rights on this user name."""
    return Identity(f"{AGENT_USER_PREFIX}{node}", (AGENT_GROUP,), f"agent-{node}")


ADMIN = Identity(ADMIN_USER, ("system:masters",), "admin")
OPERATOR = Identity(OPERATOR_USER, (OPERATOR_GROUP,), "operator")


class ControlPlane:
    """One local control plane rooted at a state directory."""

    def __init__(
        self,
        state: Path,
        binaries: Binaries,
        ports: Ports | None = None,
        *,
        node_ip: str | None = None,
    ) -> None:
        self.state = state
        self.bin = binaries
        self.ports = ports or Ports()
        self.node_ip = node_ip
        """When set, pods on a real node (`gtvp_local.realnode`) reach this API server: it
        listens on every address, advertises `node_ip` for the `kubernetes` Service, and calls
        webhooks at their endpoints (pod IPs) instead of Service IPs."""
        self.procs = ProcessTable(state)
        self.pki_dir = state / "pki"

    # ----- paths -----------------------------------------------------------------------------
    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def webhook_client_ca(self) -> Path:
        """The CA (PEM) that signs the API server's webhook client certificate: a CA of its
        own, not the cluster's (whose client certificates other users hold)."""
        return pki.ensure_ca(self.pki_dir / "webhook-client", "gtvp-local-webhook-client-ca").cert

    def _admission_config(self) -> Path:
        """The --admission-control-config-file giving the API server its webhook client
        certificate (kubeconfig user '*': every webhook of this control plane is gtvp's)."""
        directory = self.pki_dir / "webhook-client"
        ca = pki.ensure_ca(directory, "gtvp-local-webhook-client-ca")
        client = pki.issue(ca, directory, "apiserver", common_name=WEBHOOK_CLIENT_NAME)
        kubeconfig = self.state / "admission-kubeconfig.json"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "users": [
                        {
                            "name": "*",
                            "user": {
                                "client-certificate": str(client.cert.resolve()),
                                "client-key": str(client.key.resolve()),
                            },
                        }
                    ],
                },
                indent=2,
            )
        )
        webhook = {
            "apiVersion": "apiserver.config.k8s.io/v1",
            "kind": "WebhookAdmissionConfiguration",
            "kubeConfigFile": str(kubeconfig.resolve()),
        }
        config = self.state / "admission.json"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "apiserver.config.k8s.io/v1",
                    "kind": "AdmissionConfiguration",
                    "plugins": [
                        {"name": plugin, "configuration": webhook}
                        for plugin in ("ValidatingAdmissionWebhook", "MutatingAdmissionWebhook")
                    ],
                },
                indent=2,
            )
        )
        return config.resolve()

    @property
    def admin_kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    def write_kubeconfig(self, path: Path, user_name: str, user: dict[str, str]) -> None:
        """A kubeconfig (mode 0600) for this API server, as `user_name` with credentials
        `user` (client certificate and key, or a token)."""
        ca = pki.ensure_ca(self.pki_dir, "gtvp-local-ca")
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "gtvp-local",
                    "cluster": {"server": self.server, "certificate-authority": str(ca.cert)},
                }
            ],
            "users": [{"name": user_name, "user": user}],
            "contexts": [
                {"name": "gtvp-local", "context": {"cluster": "gtvp-local", "user": user_name}}
            ],
            "current-context": "gtvp-local",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(json.dumps(config, indent=2))

    def apply(self, obj: dict[str, Any]) -> None:
        """Server-side apply of one object as gtvp-local (its fields, nobody else's)."""
        self.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=gtvp-local",
            "-f",
            "-",
            input_text=json.dumps(obj),
        )

    def kubeconfig_for(self, identity: Identity) -> Path:
        """Write (once) and return a kubeconfig for a client-certificate identity."""
        if identity.stem == ADMIN.stem:
            path = self.admin_kubeconfig
        else:
            path = self.state / "kubeconfigs" / f"{identity.stem}.kubeconfig"
        if path.exists():
            return path
        ca = pki.ensure_ca(self.pki_dir, "gtvp-local-ca")
        pair = pki.issue(
            ca,
            self.pki_dir / "users",
            identity.stem,
            common_name=identity.user,
            organizations=identity.groups,
        )
        user = {"client-certificate": str(pair.cert), "client-key": str(pair.key)}
        self.write_kubeconfig(path, identity.user, user)
        return path

    # ----- lifecycle -------------------------------------------------------------------------
    def running(self) -> dict[str, bool]:
        return {
            name: bool(t and t.alive())
            for name, t in (
                ("etcd", self.procs.get("etcd")),
                ("kube-apiserver", self.procs.get("kube-apiserver")),
            )
        }

    def start(self, *, timeout: float = 90.0) -> None:
        """Start etcd and kube-apiserver (cleaning a half-started previous run) and wait."""
        state = self.running()
        current = (self.state / "admission.json").exists()  # else started by an older gtvp
        if all(state.values()) and self.ready() and current:
            return
        if any(state.values()):
            # half-started (or without the webhook client certificate): stop what is left
            # before starting afresh
            self.stop()
        for name, port in asdict(self.ports).items():
            if port_in_use(port):
                raise ControlPlaneError(
                    f"port {port} ({name}) on 127.0.0.1 is in use by another program. "
                    f"Stop it, or run `gtvp local down` if it is a previous gtvp control plane "
                    f"started from another state directory, or pick other ports."
                )
        self.state.mkdir(parents=True, exist_ok=True)
        ca = pki.ensure_ca(self.pki_dir, "gtvp-local-ca")
        node_ips = (self.node_ip, KUBERNETES_SERVICE_IP) if self.node_ip else ()
        serving = pki.issue(
            ca,
            self.pki_dir,
            f"apiserver-{self.node_ip}" if self.node_ip else "apiserver",
            common_name="kube-apiserver",
            server_ips=("127.0.0.1", *node_ips),
            server_dns=("localhost", "kubernetes", "kubernetes.default.svc"),
        )
        if self.node_ip:
            # the API server's client certificate at kubelets (logs, exec, port-forward)
            kubelet_client = pki.issue(
                ca,
                self.pki_dir,
                "apiserver-kubelet-client",
                common_name="kube-apiserver-kubelet-client",
                organizations=("system:masters",),
            )
            network = [
                "--bind-address=0.0.0.0",
                f"--advertise-address={self.node_ip}",
                "--enable-aggregator-routing=true",
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={kubelet_client.cert}",
                f"--kubelet-client-key={kubelet_client.key}",
            ]
        else:
            network = ["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"]
        sa_key = pki.ensure_service_account_key(self.pki_dir)
        admission = self._admission_config()
        self.kubeconfig_for(ADMIN)
        self._start_etcd()
        self._wait(self._etcd_healthy, "etcd", "etcd", timeout)
        self.procs.start(
            "kube-apiserver",
            [
                str(self.bin.kube_apiserver),
                f"--etcd-servers=http://127.0.0.1:{self.ports.etcd_client}",
                *network,
                f"--secure-port={self.ports.apiserver}",
                f"--cert-dir={self.pki_dir}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={ca.cert}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={sa_key.cert}",
                f"--service-account-signing-key-file={sa_key.key}",
                # the Node authorizer and NodeRestriction bound what a kubelet (group
                # system:nodes) may write: never another node, never node-restriction labels
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                f"--admission-control-config-file={admission}",
                # no kube-controller-manager removes the not-ready taint this plugin puts on
                # new Nodes, so simulated Nodes would never take a VM; gtvp's own taint is
                # what matters here
                "--disable-admission-plugins=TaintNodesByCondition",
                "--allow-privileged=true",
                "--enable-priority-and-fairness=false",
                "--max-requests-inflight=2000",
                "--max-mutating-requests-inflight=1000",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._wait(self.ready, "kube-apiserver", "kube-apiserver", timeout)

    def _start_etcd(self) -> None:
        data = self.state / "etcd-data"
        data.mkdir(parents=True, exist_ok=True)
        data.chmod(0o700)
        c, p = self.ports.etcd_client, self.ports.etcd_peer
        self.procs.start(
            "etcd",
            [
                str(self.bin.etcd),
                "--name=gtvp-local",
                f"--data-dir={data}",
                f"--listen-client-urls=http://127.0.0.1:{c}",
                f"--advertise-client-urls=http://127.0.0.1:{c}",
                f"--listen-peer-urls=http://127.0.0.1:{p}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{p}",
                f"--initial-cluster=gtvp-local=http://127.0.0.1:{p}",
                "--listen-metrics-urls=",
                "--unsafe-no-fsync",
                "--log-level=warn",
                "--quota-backend-bytes=8589934592",
            ],
        )

    def _wait(self, probe: Callable[[], bool], what: str, proc: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if probe():
                return
            tracked = self.procs.get(proc)
            if tracked is None or not tracked.alive():
                raise ControlPlaneError(
                    f"{what} exited while starting. Last lines of "
                    f"{self.procs.logs / (proc + '.log')}:\n{self.procs.log_tail(proc)}"
                )
            time.sleep(0.2)
        raise ControlPlaneError(
            f"{what} did not become ready within {timeout:.0f}s. Last lines of its log:\n"
            f"{self.procs.log_tail(proc)}"
        )

    def _etcd_healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.ports.etcd_client}/health"
            with urllib.request.urlopen(url, timeout=1) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt"))
        admin = self.pki_dir / "users"
        ctx.load_cert_chain(str(admin / "admin.crt"), str(admin / "admin.key"))
        return ctx

    def ready(self) -> bool:
        """True when kube-apiserver answers /readyz for the admin."""
        try:
            req = urllib.request.Request(f"{self.server}/readyz")  # noqa: S310
            with urllib.request.urlopen(req, timeout=2, context=self._ssl_context()) as r:  # noqa: S310
                return bool(r.status == 200)
        except (OSError, ValueError, ssl.SSLError, urllib.error.URLError):
            return False

    def stop(self) -> list[str]:
        """Stop everything this state directory started; return the names that were running."""
        stopped = []
        for name in ("kube-apiserver", "etcd"):
            if self.procs.stop(name):
                stopped.append(name)
        for t in self.procs.all():
            if self.procs.stop(t.name):
                stopped.append(t.name)
        return stopped

    # ----- kubectl ---------------------------------------------------------------------------
    def kubectl(
        self,
        *args: str,
        identity: Identity = ADMIN,
        input_text: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against this control plane as `identity`."""
        cmd = [str(self.bin.kubectl), f"--kubeconfig={self.kubeconfig_for(identity)}", *args]
        proc = subprocess.run(
            cmd, input=input_text, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def apply_crds(self, paths: Sequence[Path], *, timeout: float = 60.0) -> list[str]:
        """Server-side apply CRD files and wait until every one is Established."""
        names: list[str] = []
        for path in paths:
            out = self.kubectl(
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=gtvp-local",
                "-o",
                "name",
                "-f",
                str(path),
            )
            names += [n for n in out.stdout.split() if n]
        if names:
            self.kubectl(
                "wait", "--for=condition=Established", f"--timeout={int(timeout)}s", *names
            )
        return names


@contextlib.contextmanager
def ephemeral_control_plane(
    state: Path, *, kubevirt: bool = True, gtvp: bool = True, node_ip: str | None = None
) -> Iterator[ControlPlane]:
    """A control plane for one `with` block: built programs (a cold cache builds them, with
    progress), free loopback ports, state under `state`, gtvp's CRDs (unless `gtvp` is false:
    a chart brings them) and KubeVirt's (unless `kubevirt` is false) installed and
    Established; `node_ip`: reachable by a real node's pods (ControlPlane); stopped after."""
    ports = Ports(etcd_client=free_port(), etcd_peer=free_port(), apiserver=free_port())
    cp = ControlPlane(state, toolchain.ensure_all(), ports, node_ip=node_ip)
    try:
        cp.start()
        cp.apply_crds(
            (layout.gtvp_crds() if gtvp else []) + (layout.kubevirt_crds() if kubevirt else [])
        )
        yield cp
    finally:
        cp.stop()
