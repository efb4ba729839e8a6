"""One real Kubernetes node on this machine, beside (or instead of) the kwok Nodes.

Real programs only: Debian's containerd + runc + CNI plugins (bridge, host-local, loopback),
and a kubelet, kube-proxy (iptables), kube-scheduler and kube-controller-manager built from
the same Kubernetes module as kube-apiserver (`toolchain`, component `kubernetes-node`). Pods
get their own network namespace and an address on the bridge `gtvp0` (10.244.0.0/24); the
bridge's own address, 10.244.0.1, is the node's IP: pods reach the API server (through the
`kubernetes` Service, DNAT by kube-proxy) and the node's swtpm there.

The settings this machine kind needs (../shared/DESIGN.md §8): cgroup v1 allowed
(`failCgroupV1: false`), cgroupfs, no QoS cgroups, containerd's `restrict_oom_score_adj`
(lowering oom_score_adj is denied here), runc, and a sandbox image built here (`pause`).
Images are never pulled: the kubelet runs what `import_image` put into containerd.

Everything runs as tracked processes under `<state>/node` (so `gtvp local down` stops it);
`stop` also removes what the processes leave behind: pod containers and their shims, mounts
under the kubelet's root, CNI network namespaces, kube-proxy's iptables chains, the bridge.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gtvp_local import pause, pki, toolchain
from gtvp_local.controlplane import SERVICE_CIDR, ControlPlane, Identity
from gtvp_local.processes import ProcessTable

NODE_NAME = "gtvp-node"
BRIDGE = "gtvp0"
POD_CIDR = "10.244.0.0/24"
NODE_IP = "10.244.0.1"
"""The bridge's address: the node IP the kubelet reports and pods' gateway to this host."""
CNI_BIN = Path("/usr/lib/cni")
NODE_LABEL = "gtvp.io/real-node"
"""Set on the real node (by the kubelet at registration) so charts can select it."""

KUBELET = Identity(f"system:node:{NODE_NAME}", ("system:nodes",), "kubelet")
KUBE_PROXY = Identity("system:kube-proxy", (), "kube-proxy")
SCHEDULER = Identity("system:kube-scheduler", (), "kube-scheduler")
CONTROLLER_MANAGER = Identity("system:kube-controller-manager", (), "kube-controller-manager")

# what an installed chart needs and nothing that would act on the simulated (kwok) objects:
# no node lifecycle (kwok keeps its own Nodes), no IPAM (the node's podCIDR is fixed)
CONTROLLERS = (
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "deployment-controller",
    "replicaset-controller",
    "daemonset-controller",
    "job-controller",  # the chart's pre-install/pre-upgrade check is a Job
    "disruption-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "pod-garbage-collector-controller",
)

Say = Callable[[str], None]


class NodeError(RuntimeError):
    """The real node could not be started; the message has the component's own words."""


def _quiet(_msg: str) -> None:
    pass


def missing_programs() -> list[str]:
    """What this machine lacks for a real node (Debian package names in the words)."""
    missing = []
    for prog, pkg in (
        ("containerd", "containerd"),
        ("runc", "runc"),
        ("ctr", "containerd"),
        ("iptables", "iptables"),
        ("gcc", "gcc"),
    ):
        if shutil.which(prog) is None:
            missing.append(f"{prog} (Debian package {pkg})")
    if not (CNI_BIN / "bridge").is_file():
        missing.append(f"{CNI_BIN}/bridge (Debian package containernetworking-plugins)")
    if os.geteuid() != 0:
        missing.append("root (a kubelet, containerd and network setup need it)")
    return missing


def _command_lines() -> Iterator[tuple[int, list[bytes]]]:
    """Every process of this machine with its argv (processes that end meanwhile skipped)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                yield int(proc.name), (proc / "cmdline").read_bytes().split(b"\0")


def other_node_kubelet(root: Path) -> int | None:
    """The pid of a kubelet of another real node (another state directory) on this machine:
    the bridge, node IP and kubelet port are the machine's, so only one node can run."""
    for pid, args in _command_lines():
        if (
            args[0].endswith(b"kubelet")
            and f"--node-ip={NODE_IP}".encode() in args
            and f"--root-dir={root}".encode() not in args
        ):
            return pid
    return None


def kubelet_config(node: RealNode, ca: Path) -> dict[str, Any]:
    """The KubeletConfiguration: what this machine kind needs (module docstring)."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "address": NODE_IP,
        "port": node.kubelet_port,
        "readOnlyPort": 0,
        "healthzPort": 0,
        "containerRuntimeEndpoint": f"unix://{node.socket}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "localStorageCapacityIsolation": False,
        "evictionHard": {},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "podCIDR": POD_CIDR,
        "maxPods": 40,
        "podLogsDir": str(node.state / "pod-logs"),
        "registerWithTaints": [],
        "serializeImagePulls": False,
        "resolvConf": str(node.state / "resolv.conf"),
    }


def containerd_config(node: RealNode) -> str:
    """containerd 1.6's config (version 2) with the CRI plugin set for this machine kind."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return "\n".join(
        [
            "version = 2",
            f'root = "{node.state / "containerd" / "root"}"',
            f'state = "{node.run_dir / "state"}"',
            "[grpc]",
            f'  address = "{node.socket}"',
            "[ttrpc]",
            f'  address = "{node.run_dir / "ttrpc.sock"}"',
            "[debug]",
            '  address = ""',
            "[metrics]",
            '  address = ""',
            f"[{cri}]",
            f'  sandbox_image = "{pause.PAUSE_REFERENCE}"',
            "  restrict_oom_score_adj = true",
            "  enable_selinux = false",
            f"[{cri}.containerd]",
            '  default_runtime_name = "runc"',
            f"[{cri}.containerd.runtimes.runc]",
            '  runtime_type = "io.containerd.runc.v2"',
            f"[{cri}.containerd.runtimes.runc.options]",
            "  SystemdCgroup = false",
            f"[{cri}.cni]",
            f'  bin_dir = "{CNI_BIN}"',
            f'  conf_dir = "{node.state / "cni"}"',
            "",
        ]
    )


def cni_config() -> dict[str, Any]:
    """A bridge network with host-local addresses from the node's pod CIDR."""
    return {
        "cniVersion": "1.0.0",
        "name": "gtvp-pods",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "loopback"},
        ],
    }


def kube_proxy_config(kubeconfig: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "clusterCIDR": "10.244.0.0/16",
        "hostnameOverride": NODE_NAME,
        "bindAddress": NODE_IP,
        "healthzBindAddress": "",
        "metricsBindAddress": "",
        # this machine's sysctls are not ours to change: keep the kernel's conntrack settings
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }


def _run(
    cmd: list[str], *, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        raise NodeError(f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()[-600:]}")
    return proc


@dataclass
class RealNode:
    """The real node of one local state directory."""

    state: Path
    cp: ControlPlane
    kubelet_port: int = 10250

    def __post_init__(self) -> None:
        self.procs = ProcessTable(self.state)
        # unix socket paths are limited to 108 bytes: keep the sockets under /run
        key = hashlib.sha256(str(self.state.resolve()).encode()).hexdigest()[:10]
        self.run_dir = Path("/run/gtvp") / key

    @property
    def socket(self) -> Path:
        return self.run_dir / "containerd.sock"

    @property
    def kubelet_root(self) -> Path:
        return self.state / "kubelet"

    # ----- lifecycle -------------------------------------------------------------------------
    def running(self) -> dict[str, bool]:
        names = ("containerd", "kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager")
        return {n: bool((t := self.procs.get(n)) and t.alive()) for n in names}

    def start(self, *, say: Say = _quiet, timeout: float = 120.0) -> None:
        """Start containerd, the control-plane helpers and the kubelet; wait for Ready."""
        missing = missing_programs()
        if missing:
            raise NodeError("a real node needs: " + "; ".join(missing))
        if self.cp.node_ip != NODE_IP:
            raise NodeError(
                f"the control plane must be started with node_ip={NODE_IP} for pods to reach it"
            )
        other = other_node_kubelet(self.kubelet_root)
        if other is not None:
            raise NodeError(
                f"another real node runs on this machine (kubelet pid {other}, node IP "
                f"{NODE_IP}): one per machine. `gtvp local down` stops the local pool's; a "
                "test run's stops when the run ends"
            )
        bins = toolchain.build(toolchain.component("kubernetes-node"))
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        self._bridge()
        say(f"containerd + runc (socket {self.socket})")
        self._containerd()
        self.import_image(pause.ensure_archive())
        say("kube-controller-manager, kube-scheduler, kube-proxy (iptables)")
        self._controllers(bins)
        say(f"kubelet: node {NODE_NAME} ({NODE_IP}), pods on bridge {BRIDGE} ({POD_CIDR})")
        self._kubelet(bins)
        self.wait_ready(timeout)

    def _bridge(self) -> None:
        """The bridge exists before the first pod: the API server advertises its address."""
        if _run(["ip", "link", "show", BRIDGE], check=False).returncode != 0:
            _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        addrs = _run(["ip", "-o", "addr", "show", "dev", BRIDGE]).stdout
        if f" {NODE_IP}/" not in addrs:
            _run(["ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE])
        _run(["ip", "link", "set", BRIDGE, "up"])

    def _containerd(self) -> None:
        t = self.procs.get("containerd")
        if t is not None and t.alive():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cni = self.state / "cni"
        cni.mkdir(parents=True, exist_ok=True)
        (cni / "10-gtvp.conflist").write_text(json.dumps(cni_config(), indent=2))
        conf = self.state / "containerd.toml"
        conf.write_text(containerd_config(self))
        self.procs.start("containerd", ["containerd", "--config", str(conf)])
        self._wait(lambda: self._ctr("version", check=False).returncode == 0, "containerd", 30)

    def _ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["ctr", "--address", str(self.socket), "-n", "k8s.io", *args], check=check)

    def import_image(self, archive: Path) -> None:
        """Put an OCI archive into containerd's Kubernetes namespace (no registry, no pull)."""
        self._ctr("image", "import", str(archive))

    def images(self) -> list[str]:
        out = self._ctr("image", "ls", "-q").stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def _controllers(self, bins: Path) -> None:
        ca = pki.ensure_ca(self.cp.pki_dir, "gtvp-local-ca").cert
        kcm = self.cp.kubeconfig_for(CONTROLLER_MANAGER)
        self._start(
            "kube-controller-manager",
            [
                str(bins / "kube-controller-manager"),
                f"--kubeconfig={kcm}",
                f"--authentication-kubeconfig={kcm}",
                f"--authorization-kubeconfig={kcm}",
                "--use-service-account-credentials=true",
                f"--root-ca-file={ca}",
                f"--controllers={','.join(CONTROLLERS)}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--v=1",
            ],
        )
        sched = self.cp.kubeconfig_for(SCHEDULER)
        self._start(
            "kube-scheduler",
            [
                str(bins / "kube-scheduler"),
                f"--kubeconfig={sched}",
                f"--authentication-kubeconfig={sched}",
                f"--authorization-kubeconfig={sched}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--v=1",
            ],
        )
        proxy_conf = self.state / "kube-proxy.json"
        proxy_conf.write_text(json.dumps(kube_proxy_config(self.cp.kubeconfig_for(KUBE_PROXY))))
        self._start("kube-proxy", [str(bins / "kube-proxy"), f"--config={proxy_conf}", "--v=1"])

    def _kubelet(self, bins: Path) -> None:
        ca = pki.ensure_ca(self.cp.pki_dir, "gtvp-local-ca").cert
        conf = self.state / "kubelet.json"
        conf.write_text(json.dumps(kubelet_config(self, ca), indent=2))
        self.kubelet_root.mkdir(parents=True, exist_ok=True)
        self._start(
            "kubelet",
            [
                str(bins / "kubelet"),
                f"--config={conf}",
                f"--kubeconfig={self.cp.kubeconfig_for(KUBELET)}",
                f"--root-dir={self.kubelet_root}",
                f"--cert-dir={self.state / 'kubelet-pki'}",
                f"--node-ip={NODE_IP}",
                f"--hostname-override={NODE_NAME}",
                f"--node-labels={NODE_LABEL}=true",
                "--v=1",
            ],
        )

    def _start(self, name: str, argv: list[str]) -> None:
        t = self.procs.get(name)
        if t is not None and t.alive():
            return
        self.procs.start(name, argv)

    def _wait(self, probe: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not probe():
            dead = [n for n, up in self.running().items() if not up and self.procs.get(n)]
            if dead:
                raise NodeError(
                    f"{dead[0]} exited while waiting for {what}:\n{self.procs.log_tail(dead[0])}"
                )
            if time.monotonic() > deadline:
                raise NodeError(f"{what} not ready within {timeout:.0f}s")
            time.sleep(0.3)

    def ready(self) -> bool:
        got = self.cp.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        if got.returncode != 0:
            return False
        conds = json.loads(got.stdout).get("status", {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)

    def wait_ready(self, timeout: float) -> None:
        self._wait(self.ready, f"node {NODE_NAME} Ready", timeout)

    def stop(self) -> list[str]:
        """Stop the node and remove what it leaves behind; returns what was running."""
        stopped = [n for n in ("kubelet",) if self.procs.stop(n)]
        if self.socket.exists() and self.procs.get("containerd"):
            self._remove_containers()
        for name in ("kube-proxy", "kube-scheduler", "kube-controller-manager", "containerd"):
            if self.procs.stop(name):
                stopped.append(name)
        self._kill_shims()
        self._unmount()
        self._cleanup_network()
        return stopped

    def _remove_containers(self) -> None:
        tasks = self._ctr("task", "ls", "-q", check=False).stdout.split()
        for task in tasks:
            self._ctr("task", "kill", "-s", "SIGKILL", task, check=False)
        for task in tasks:
            self._ctr("task", "delete", "-f", task, check=False)
        for c in self._ctr("container", "ls", "-q", check=False).stdout.split():
            self._ctr("container", "delete", c, check=False)

    def _kill_shims(self) -> None:
        """containerd's shims outlive it (their own sessions): kill the ones of this node."""
        needle = str(self.socket).encode()
        for pid, args in _command_lines():
            if b"containerd-shim" in args[0] and needle in args:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def _unmount(self) -> None:
        roots = (str(self.kubelet_root), str(self.state / "containerd"), str(self.run_dir))
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f]
        for point in sorted(points, key=len, reverse=True):
            if point.startswith(roots):
                _run(["umount", "-l", point], check=False)

    def _cleanup_network(self) -> None:
        bins = toolchain.component("kubernetes-node").bin_dir()
        if (bins / "kube-proxy").is_file():
            _run([str(bins / "kube-proxy"), "--cleanup"], check=False)
        for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
            ns = line.split()[0] if line.split() else ""
            if ns.startswith("cni-"):
                _run(["ip", "netns", "delete", ns], check=False)
        # the kubelet's own chains (it adds them on start and never removes them)
        for tool in ("iptables", "ip6tables"):
            if shutil.which(tool) is None:
                continue
            for chain in ("INPUT", "OUTPUT"):
                _run([tool, "-D", chain, "-j", "KUBE-FIREWALL"], check=False)
            for table, chain in (
                ("filter", "KUBE-FIREWALL"),
                ("filter", "KUBE-KUBELET-CANARY"),
                ("nat", "KUBE-KUBELET-CANARY"),
                ("mangle", "KUBE-KUBELET-CANARY"),
                ("mangle", "KUBE-IPTABLES-HINT"),
            ):
                _run([tool, "-t", table, "-F", chain], check=False)
                _run([tool, "-t", table, "-X", chain], check=False)
        _run(["ip", "link", "delete", BRIDGE], check=False)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.state / "cni-state", ignore_errors=True)
        shutil.rmtree("/var/lib/cni/networks/gtvp-pods", ignore_errors=True)
