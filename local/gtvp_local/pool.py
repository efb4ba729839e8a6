"""A local trusted pool on a running control plane: policy, members, swtpms, agents, operator.

Used by `gtvp local up`, the tests and the benchmarks. Each member gets its own swtpm (EK
certificate from the pool's private swtpm CA), its own client identity and its own
`gtvp-agent` process; the operator runs as a `gtvp-operator` process with the operator
identity. The pool's policy trusts the swtpm CA and pins PCRs 0-7 to the values a fresh swtpm
has (no firmware runs in an emulator, so they are all zero): extending one of them is the
"tamper" of the demo.

`Pool.start_trusted` is the one recipe for a whole pool (every member Trusted); `trusted_pool`
runs it for as long as a `with` block lasts and removes the pool afterwards.

The operator runs as `replicas` processes (`gtvp_local.replicas`: each with its own identity,
ports and ServiceAccount token), sharing the members through Leases. With more than one, a
SIMULATION of a Service (`gtvp_local.frontend`) listens on the pool's webhook port and sends
each connection to a ready replica; a single replica serves that port itself, as before.

Key release (docs/keyrelease.md, "On the local pool"): each replica also serves
`POST /keyrelease/v1/release` and the verdict tokens' public documents on its own HTTPS port
(`--key-release-port`; its metrics stay plain HTTP on loopback), with a certificate from the
pool's CA whose SANs are 127.0.0.1 and the VM bridge's 10.77.0.1, listening where the
members reach it: 127.0.0.1, or 10.77.0.1 with real VMs (`vms="qemu"`). The URL and that
CA go into the boxes' cloud-init.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from gtvp import webhook_config
from gtvp.core.api_resources import GTVP_API_VERSION
from gtvp.core.phases import MemberPhase
from gtvp_local import layout, pki
from gtvp_local import replicas as rep
from gtvp_local.controlplane import WEBHOOK_CLIENT_NAME, ControlPlane, agent_identity
from gtvp_local.polling import wait_for
from gtvp_local.processes import ProcessTable, Tracked, free_port
from gtvp_local.replicas import LeaseTable, LeaseTimings, Replica
from gtvp_local.swtpm import Swtpm, SwtpmCA, SwtpmError, extend_pcr

if TYPE_CHECKING:
    from gtvp_local.vmruntime.cache import FetchReport


class PoolError(RuntimeError):
    """The local pool could not do what was asked (the message says what and why)."""


GOLDEN_PCRS = tuple(range(8))
ZERO = "00" * 32


def manifests() -> list[Path]:
    base = resources.files("gtvp") / "manifests"
    return [
        Path(str(base / n))
        for n in (
            "rbac.yaml",
            "agent-vap.yaml",
            "migration-labels-vap.yaml",
            "migration-deletion-vap.yaml",
            "node-trust-labels-vap.yaml",
            "launcher-pods-vap.yaml",
            "vmi-status-vap.yaml",
            "status-writes-vap.yaml",
            "local-bindings.yaml",
        )
    ]


def apply_manifests(cp: ControlPlane) -> None:
    """gtvp's RBAC and admission policies (`manifests()`), applied: a rerun changes nothing."""
    for m in manifests():
        cp.kubectl("apply", "-f", str(m))


def pool_policy(
    ca: SwtpmCA,
    *,
    name: str = "default",
    interval: str = "5s",
    valid_for: str = "15s",
    max_uses: int = 50,
    publisher_keys: Mapping[str, str] | None = None,
    allow_shared_ek: bool = False,
    on_untrusted: Mapping[int, str] | None = None,
    migrate_within: Mapping[int, str] | None = None,
    balancing: Mapping[str, Any] | None = None,
    box_attestation_ca: str | None = None,
) -> dict[str, Any]:
    """A SecurityPolicy for a pool of swtpm members.

    Component publishers: `publisher_keys` (name -> PEM public key), by default those of
    the sample policy, so the signed sample catalogue verifies in the local pool.
    `box_attestation_ca`: the CA of the boxes' vTPMs (PEM): boxes attest (docs/boxattest.md).
    `on_untrusted`, `migrate_within`: per level number, its onUntrusted and migrateWithin.
    """
    if publisher_keys is None:
        publisher_keys = sample_publisher_keys()

    def level(n: int, lname: str, default: str) -> dict[str, Any]:
        return {
            "level": n,
            "name": lname,
            "onUntrusted": (on_untrusted or {}).get(n, default),
            "attestation": {"interval": interval, "validFor": valid_for, "maxUses": max_uses},
            **({"migrateWithin": within} if (within := (migrate_within or {}).get(n)) else {}),
        }

    return {
        "apiVersion": GTVP_API_VERSION,
        "kind": "SecurityPolicy",
        "metadata": {"name": name},
        "spec": {
            "levels": [
                level(1, "standard", "Keep"),
                level(2, "sensitive", "Migrate"),
                level(3, "restricted", "Migrate"),
            ],
            "pcrSelection": {"hashAlgorithm": "sha256", "pcrs": list(GOLDEN_PCRS)},
            "memberClasses": [{"name": "swtpm", "goldenPCRs": {str(p): ZERO for p in GOLDEN_PCRS}}],
            "defaultMemberClass": "swtpm",
            # every member may carry up to its identity (the administrator's ceiling)
            "transitions": [{"matchLabels": {}, "level": 3}],
            "ekTrust": {"caBundle": ca.bundle_pem(), "allowSharedEk": allow_shared_ek},
            "publisherKeys": [
                {"name": n, "publicKey": pem} for n, pem in sorted(publisher_keys.items())
            ],
            **({"balancing": dict(balancing)} if balancing else {}),
            **(
                {"boxAttestation": {"caBundle": box_attestation_ca, "pcr": 13}}
                if box_attestation_ca
                else {}
            ),
        },
    }


def sample_publisher_keys() -> dict[str, str]:
    """The publisher keys of crds/samples/securitypolicy.yaml (they sign the sample catalogue)."""
    path = layout.repo_root() / "crds" / "samples" / "securitypolicy.yaml"
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "SecurityPolicy":
            return {k["name"]: k["publicKey"] for k in doc["spec"].get("publisherKeys") or []}
    return {}


FRONTEND = "webhook-frontend"
KEY_RELEASE_FRONTEND = "key-release-frontend"
"""The process name of the SIMULATED Service in front of the replicas' webhooks."""


def _ha_args(replica: Replica, timings: LeaseTimings) -> list[str]:
    """The replica's identity and lease settings on gtvp-operator's command line."""
    return ["--identity", replica.identity, *timings.args()]


def _quiet(_line: str) -> None:
    """Narration nobody reads (tests and benchmarks)."""


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    found = str(exe) if exe.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed in this environment (pip install -e .)")
    return found


class Pool:
    """Members, their swtpms and agents, and the operator, on one control plane."""

    def __init__(
        self,
        cp: ControlPlane,
        directory: Path,
        *,
        policy: str = "default",
        replicas: int | None = None,
        identity_prefix: str = "local",
        timings: LeaseTimings | None = None,
        vms: str | None = None,
    ) -> None:
        """`replicas` operator processes (None: as many as the pool saved in `directory`
        was started with, else one), identities `<identity_prefix>-N`. `vms`: "phases"
        (the stand-in only moves VMIs through their phases) or "qemu" (each VMI a real VM
        in its member's network namespace: gtvp_local.vmruntime.launcher); None: as saved,
        else phases."""
        if replicas is not None and replicas < 1:
            raise PoolError("a pool runs at least one operator replica")
        if vms not in (None, "phases", "qemu"):
            raise PoolError(f"vms must be phases or qemu, not {vms!r}")
        self.vms = "phases"
        self.cp = cp
        self.policy_name = policy
        self.dir = directory.resolve()
        self.procs = ProcessTable(self.dir)
        self.ca = SwtpmCA(self.dir / "swtpm-ca")
        self.tpms: dict[str, Swtpm] = {}
        self.webhook_port: int | None = None
        self.key_release_front_port = 0
        """With several replicas: the port of the SIMULATED Service in front of their
        key-release ports (0: none; a single replica is reached on its own port)."""
        self.timings = timings or LeaseTimings()
        self.replica_count = replicas or 1
        self.identity_prefix = identity_prefix
        self.replicas: list[Replica] = []
        self._load()
        if replicas is not None:
            self.replica_count = replicas
        if vms is not None:
            self.vms = vms

    @property
    def metrics_port(self) -> int | None:
        """Replica 0's metrics port (what callers from before replicas read)."""
        return self.replicas[0].metrics_port if self.replicas else None

    # ----- persisted layout (so `gtvp local tamper` finds a member's swtpm later) -----------
    def _state_file(self) -> Path:
        return self.dir / "pool.json"

    def _load(self) -> None:
        try:
            data = json.loads(self._state_file().read_text())
        except (OSError, ValueError):
            return
        for name, port in (data.get("tpms") or {}).items():
            self.tpms[name] = Swtpm(name, self.dir / "tpm" / name, self.procs, port=int(port))
        self.webhook_port = data.get("webhookPort")
        self.key_release_front_port = int(data.get("keyReleaseFrontPort") or 0)
        self.policy_name = data.get("policy", self.policy_name)
        self.vms = data.get("vms", self.vms)
        self.replicas = [Replica.from_json(r) for r in data.get("replicas") or []]
        if self.replicas:
            self.replica_count = len(self.replicas)
            self.identity_prefix = data.get("identityPrefix", self.identity_prefix)

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._state_file().write_text(
            json.dumps(
                {
                    "tpms": {n: t.port for n, t in self.tpms.items()},
                    "webhookPort": self.webhook_port,
                    "keyReleaseFrontPort": self.key_release_front_port,
                    "policy": self.policy_name,
                    "replicas": [r.to_json() for r in self.replicas],
                    "identityPrefix": self.identity_prefix,
                    "vms": self.vms,
                }
            )
        )

    # ----- cluster objects ------------------------------------------------------------------
    def install_access(self) -> None:
        """The lease namespace, RBAC for the operator and agents, and the admission policies."""
        rep.ensure_namespace(self.cp)
        apply_manifests(self.cp)

    def apply(self, obj: dict[str, Any]) -> None:
        self.cp.apply(obj)

    def put(self, obj: dict[str, Any]) -> None:
        """Create or replace an object whole (no fields left over from another writer)."""
        text = json.dumps(obj)
        out = self.cp.kubectl("create", "-f", "-", input_text=text, check=False)
        if out.returncode != 0:
            if "AlreadyExists" not in out.stderr:
                raise RuntimeError(out.stderr.strip())
            current = json.loads(
                self.cp.kubectl("get", "-f", "-", "-o", "json", input_text=text).stdout
            )
            obj = {
                **obj,
                "metadata": {
                    **obj["metadata"],
                    "resourceVersion": current["metadata"]["resourceVersion"],
                },
            }
            self.cp.kubectl("replace", "-f", "-", input_text=json.dumps(obj))

    def apply_policy(self, **kwargs: Any) -> None:
        """The pool's SecurityPolicy; with real VMs its boxes attest their vTPMs, whose CA
        is the VM runtime's (gtvp_local.vmruntime.runtime.vtpm_ca_pem)."""
        self.ca.ensure()
        if self.vms == "qemu" and "box_attestation_ca" not in kwargs:
            from gtvp_local.vmruntime import runtime

            kwargs["box_attestation_ca"] = runtime.vtpm_ca_pem(self.dir)
        self.put(pool_policy(self.ca, name=self.policy_name, **kwargs))

    # ----- members --------------------------------------------------------------------------
    def tpm(self, name: str) -> Swtpm:
        if name not in self.tpms:
            self.tpms[name] = Swtpm(name, self.dir / "tpm" / name, self.procs)
        return self.tpms[name]

    def members(self) -> list[str]:
        return sorted(self.tpms)

    def start_kwok(self) -> None:
        """SIMULATION: kwok (upstream's Node simulator) keeps the pool's Nodes Ready."""
        stages = Path(str(resources.files("gtvp_local") / "stages" / "kwok-node-stages.yaml"))
        self.procs.start(
            "kwok",
            [
                str(self.cp.bin.kwok),
                f"--kubeconfig={self.cp.admin_kubeconfig}",
                "--manage-nodes-with-label-selector=gtvp.io/simulated-node=kwok",
                f"--config={stages}",
                "--node-ip=127.0.0.1",
                "--server-address=127.0.0.1:0",
            ],
        )

    def start_virtsim(self) -> None:
        """SIMULATION: the stand-in for KubeVirt's virt-controller (see virtsim.py), and with
        `vms="qemu"` for virt-handler/virt-launcher (real VMs, real live migrations)."""
        real = ["--vms", "qemu", "--state", str(self.dir)] if self.vms == "qemu" else []
        self.procs.start(
            "virtsim",
            [
                sys.executable,
                "-m",
                "gtvp_local.virtsim",
                "--kubeconfig",
                str(self.cp.admin_kubeconfig),
                *real,
            ],
        )

    @property
    def component_store(self) -> Path:
        """With `vms="qemu"`: what the pool's registry mirror serves for an image, by its
        digest's hex (a file here replaces the built artifact: a test's lying mirror)."""
        from gtvp_local.vmruntime.launcher import STORE

        return self.dir / STORE

    def vm_console(self, namespace: str, name: str) -> str:
        """The serial console of a VMI's VM (with `vms="qemu"`; empty otherwise)."""
        from gtvp_local.vmruntime.launcher import vm_id
        from gtvp_local.vmruntime.runtime import Runtime

        return Runtime(self.dir).console(vm_id(namespace, name))

    def install_webhooks(self) -> None:
        """gtvp's admission webhooks, served by the operator on a loopback port."""
        self.webhook_port = self.webhook_port or free_port()
        ca = self._local_ca()
        for obj in webhook_config.webhook_configurations(
            f"https://127.0.0.1:{self.webhook_port}", ca.cert.read_bytes()
        ):
            self.put(obj)
        self.save()

    @property
    def key_release_address(self) -> str:
        """Where members (and their VMs) reach the replicas' key-release ports: the VM
        bridge's host address with real VMs, else loopback (the members are processes here)."""
        if self.vms == "qemu":
            from gtvp_local.vmruntime.names import BRIDGE_ADDRESS

            return BRIDGE_ADDRESS
        return "127.0.0.1"

    def key_release_url(self, index: int = 0) -> str:
        """The HTTPS URL the boxes' cloud-init names for key release: with several replicas
        the SIMULATED Service in front of their key-release ports (a box composed by a
        replica that died must still reach one that lives), else replica `index`'s port."""
        port = self.key_release_front_port or self.replicas[index].key_release_port
        return f"https://{self.key_release_address}:{port}"

    def _local_ca(self) -> pki.KeyPair:
        """The pool's CA: it signs the webhook and the key-release certificates."""
        return pki.ensure_ca(self.cp.pki_dir, "gtvp-local-ca")

    @property
    def key_release_ca(self) -> Path:
        """The CA certificate (PEM) that signs the key-release certificate."""
        return self._local_ca().cert

    def key_release_cert(self) -> pki.KeyPair:
        """The replicas' key-release serving certificate: SANs loopback and the VM bridge."""
        from gtvp_local.vmruntime.names import BRIDGE_ADDRESS

        return pki.issue(
            self._local_ca(),
            self.dir / "pki",
            "key-release",
            common_name="gtvp-key-release",
            server_ips=("127.0.0.1", BRIDGE_ADDRESS),
            server_dns=("localhost",),
        )

    def webhook_cert(self) -> pki.KeyPair:
        return pki.issue(
            self._local_ca(),
            self.dir / "pki",
            "webhook",
            common_name="gtvp-webhooks",
            server_ips=("127.0.0.1",),
            server_dns=("localhost",),
        )

    def add_node(self, name: str, *, cpu: str = "16", memory: str = "64Gi") -> None:
        """SIMULATION: a Node object kwok keeps Ready (there is no kubelet here), with the
        capacity a kubelet would report."""
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {"kubernetes.io/hostname": name, "gtvp.io/simulated-node": "kwok"},
                    "annotations": {"kwok.x-k8s.io/node": "fake"},
                },
            }
        )
        room = {"cpu": cpu, "memory": memory, "pods": "110"}
        self.patch_node_status(name, {"allocatable": room, "capacity": room})
        if self.vms == "qemu":  # its (empty) component cache: status.images comes from it
            from gtvp_local.vmruntime import cache

            cache.ensure(self.dir, name)

    def patch_node_status(self, name: str, status: Mapping[str, Any]) -> None:
        self.cp.kubectl(
            "patch",
            "node",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": status}),
        )

    def set_node_images(self, name: str, images: Sequence[str], size: int = 1) -> None:
        """SIMULATION (`vms="phases"` pools only): the node's image cache, written as its
        kubelet would report it (`status.images`); kwok nodes have no container runtime.
        A `vms="qemu"` pool's members have real component caches: `warm_cache`."""
        if self.vms == "qemu":
            raise PoolError(
                f"{name} has a real component cache (vms=qemu): fill it with warm_cache, "
                "its status.images follows"
            )
        self.patch_node_status(
            name, {"images": [{"names": [ref], "sizeBytes": size} for ref in images]}
        )

    def warm_cache(self, name: str, images: Sequence[str]) -> list[FetchReport]:
        """With `vms="qemu"`: the member fetches the `images` its component cache lacks
        from the pool's registry mirror, across its own link (`vmruntime.cache`), as if it
        had run them before; then its `status.images` is written from what the cache
        holds (in place of a kubelet, truthfully). Returns what was fetched."""
        from gtvp_local.vmruntime import cache
        from gtvp_local.vmruntime.launcher import pool_mirror

        if self.vms != "qemu":
            raise PoolError("only a vms=qemu pool has component caches (else set_node_images)")
        resolve = pool_mirror(self.dir)
        with cache.Mirror(lambda image: resolve(image, None)) as mirror:
            fetched = cache.fetch_missing(self.dir, name, images, mirror)
        self.patch_node_status(name, {"images": cache.listing(self.dir, name)})
        return fetched

    def cached_images(self, name: str) -> list[dict[str, Any]]:
        """With `vms="qemu"`: what the member's component cache holds, as status.images."""
        from gtvp_local.vmruntime import cache

        return cache.listing(self.dir, name)

    def add_member(
        self, name: str, *, identity: int = 3, start_agent: bool = True, node: bool = False
    ) -> Swtpm:
        tpm = self.tpm(name)
        tpm.manufacture(self.ca.ensure())
        tpm.start()
        self.apply(
            {
                "apiVersion": GTVP_API_VERSION,
                "kind": "Member",
                "metadata": {"name": name},
                "spec": {"identity": identity},
            }
        )
        if node:
            self.add_node(name)
        self.save()
        if start_agent:
            self.start_agent(name)
        return tpm

    def start_agent(self, name: str) -> None:
        tpm = self.tpm(name)
        kubeconfig = self.cp.kubeconfig_for(agent_identity(name))
        self.procs.start(
            f"agent-{name}",
            [
                _bin("gtvp-agent"),
                "--node",
                name,
                "--tpm",
                tpm.tcti,
                "--kubeconfig",
                str(kubeconfig),
                "--state-dir",
                str(self.dir / "agent-state"),
                "--no-event-log",
            ],
        )

    def stop_agent(self, name: str) -> None:
        self.procs.stop(f"agent-{name}")

    # ----- operator replicas ----------------------------------------------------------------
    def _plan_replicas(self, metrics_port: int | None) -> None:
        """Ports and identities, chosen once and kept across restarts (saved in pool.json)."""
        n = self.replica_count
        serving = bool(self.webhook_port)
        planned = (
            len(self.replicas) == n
            and all(bool(r.webhook_port) == serving and r.key_release_port for r in self.replicas)
            and bool(self.key_release_front_port) == (n > 1)
        )
        if planned and not (metrics_port and metrics_port != self.metrics_port):
            return

        def webhook(i: int) -> int:
            if not self.webhook_port:
                return 0
            return self.webhook_port if n == 1 else free_port()

        self.replicas = [
            Replica(
                i,
                f"{self.identity_prefix}-{i}",
                rep.process_name(i, n),
                (metrics_port if i == 0 and metrics_port else free_port()),
                webhook(i),
                free_port(),
            )
            for i in range(n)
        ]
        self.key_release_front_port = free_port() if n > 1 else 0
        self.save()

    def _webhook_args(self, replica: Replica) -> list[str]:
        if not replica.webhook_port:
            return ["--webhook-port", "0"]
        cert = self.webhook_cert()
        return [
            "--webhook-port",
            str(replica.webhook_port),
            "--webhook-cert",
            str(cert.cert),
            "--webhook-key",
            str(cert.key),
            # only the API server may call them (its admission configuration's certificate)
            "--webhook-client-ca",
            str(self.cp.webhook_client_ca),
            "--webhook-client-name",
            WEBHOOK_CLIENT_NAME,
        ]

    def _key_release_args(self, replica: Replica) -> list[str]:
        """Key release on the replica's own HTTPS port (docs/keyrelease.md)."""
        if not replica.key_release_port:
            return []
        if self.vms == "qemu":
            from gtvp_local.vmruntime import network

            network.ensure_bridge()  # its address must exist before the replica binds it
        cert = self.key_release_cert()
        return [
            "--key-release-port",
            str(replica.key_release_port),
            "--key-release-address",
            self.key_release_address,
            "--key-release-url",
            self.key_release_url(replica.index),
            "--key-release-ca",
            str(self.key_release_ca),
            "--key-release-cert",
            str(cert.cert),
            "--key-release-key",
            str(cert.key),
        ]

    def start_replica(self, index: int, *, wait: float = 60.0) -> Replica:
        """Start one replica with a fresh credential (a new ServiceAccount token; a revoked
        replica gets its ServiceAccount back); wait (`wait` s, 0: not) for its /readyz."""
        replica = self.replicas[index]
        kubeconfig = rep.issue_credential(self.cp, replica, self.dir)
        self.procs.start(
            replica.process,
            [
                _bin("gtvp-operator"),
                "--kubeconfig",
                str(kubeconfig),
                "--metrics-port",
                str(replica.metrics_port),
                "--policy",
                self.policy_name,
                *_ha_args(replica, self.timings),
                *self._webhook_args(replica),
                *self._key_release_args(replica),
            ],
        )
        if wait:
            self.wait_replica_ready(index, wait)
        return replica

    def start_frontend(self) -> None:
        """SIMULATION of a Service in front of the replicas' webhooks (gtvp_local.frontend),
        and one in front of their key-release ports; only with more than one replica (a
        single one serves the pool's webhook port, and key release on its own port)."""
        if self.replica_count == 1:
            return
        if self.webhook_port:
            self._front(FRONTEND, "127.0.0.1", self.webhook_port, "webhook_port")
        if self.key_release_front_port:
            self._front(
                KEY_RELEASE_FRONTEND,
                self.key_release_address,
                self.key_release_front_port,
                "key_release_port",
            )

    def _front(self, name: str, address: str, port: int, backend_port: str) -> None:
        backends = [f"{getattr(r, backend_port)}:{r.metrics_port}" for r in self.replicas]
        self.procs.start(
            name,
            [
                sys.executable,
                "-m",
                "gtvp_local.frontend",
                "--listen",
                str(port),
                "--address",
                address,
                *(a for b in backends for a in ("--backend", b)),
            ],
        )

    def start_operator(self, *, metrics_port: int | None = None, wait: float = 60.0) -> None:
        """Start every replica (and the SIMULATED Service in front of them) and wait (up to
        `wait` s, 0: not) until each one's /readyz says ready. `metrics_port`: replica 0's."""
        self._plan_replicas(metrics_port)
        for replica in self.replicas:
            self.start_replica(replica.index, wait=0)
        self.start_frontend()
        if wait:
            self.wait_operator_ready(wait)

    def replica_ready(self, index: int) -> bool:
        """The replica's /readyz answers 200."""
        url = f"http://127.0.0.1:{self.replicas[index].metrics_port}/readyz"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
        return False

    def wait_replica_ready(self, index: int, timeout: float, *, ready: bool = True) -> None:
        """Until the replica's /readyz says ready (or, `ready=False`, no longer does)."""
        replica = self.replicas[index]

        def check() -> bool:
            tracked = self.procs.get(replica.process)
            if ready and (tracked is None or not tracked.alive()):
                raise PoolError(
                    f"gtvp-operator {replica.identity} exited while starting; its log ends "
                    f"with:\n{self.procs.log_tail(replica.process)}"
                )
            return self.replica_ready(index) == ready

        what = f"gtvp-operator {replica.identity} to {'be' if ready else 'stop being'} ready"
        try:
            wait_for(f"{what} (127.0.0.1:{replica.metrics_port}/readyz)", check, timeout, 0.1)
        except TimeoutError as exc:
            raise PoolError(
                f"{exc}; its log ends with:\n{self.procs.log_tail(replica.process)}"
            ) from exc

    def wait_operator_ready(self, timeout: float) -> None:
        """Until every replica has loaded the pool and serves its webhooks (its /readyz)."""
        deadline = time.monotonic() + timeout
        for replica in self.replicas:
            self.wait_replica_ready(replica.index, max(deadline - time.monotonic(), 0.1))

    def stop_replica(self, index: int) -> None:
        """SIGTERM (its /readyz turns 503, webhooks answer for the shutdown grace, it hands
        its Leases back), SIGKILL if it is still there after the grace and 10 s more."""
        self.procs.stop(self.replicas[index].process, timeout=self.timings.shutdown_grace + 10.0)

    def _signal(self, index: int, sig: signal.Signals) -> Tracked:
        tracked = self.procs.get(self.replicas[index].process)
        if tracked is None or not tracked.alive():
            raise PoolError(f"gtvp-operator {self.replicas[index].identity} is not running")
        rep.signal_process(tracked.pid, sig)
        return tracked

    def kill_replica(self, index: int) -> None:
        """`kill -9`: no goodbye, its Leases stay until they expire."""
        tracked = self._signal(index, signal.SIGKILL)
        wait_for("the killed replica to be gone", lambda: not tracked.alive(), 10, 0.05)

    def freeze_replica(self, index: int) -> None:
        """SIGSTOP: the process keeps its sockets and memory but runs no code."""
        self._signal(index, signal.SIGSTOP)

    def thaw_replica(self, index: int) -> None:
        """SIGCONT after freeze_replica."""
        self._signal(index, signal.SIGCONT)

    def rolling_restart(self, *, timeout: float = 60.0) -> None:
        """Each replica in turn: SIGTERM, wait until it exited, start its replacement, wait
        until that one is ready; then the next."""
        for replica in self.replicas:
            self.stop_replica(replica.index)
            self.start_replica(replica.index, wait=timeout)

    def bind_key_release(self, namespace: str) -> None:
        """Opt `namespace` in to key release and box attestation for every replica (as the
        chart's keyRelease.namespaces does): the namespace, and a RoleBinding per replica."""
        self.cp.kubectl("create", "namespace", namespace, check=False)
        for replica in self.replicas:
            self.cp.apply(rep.key_release_binding(replica, namespace))

    def revoke_replica(self, index: int) -> None:
        """Revoke one replica's credential (its ServiceAccount is deleted: 401 from then on)."""
        rep.revoke_credential(self.cp, self.replicas[index])

    def stop_operator(self) -> None:
        """Stop every replica at once (each hands its Leases back), then the SIMULATED
        Service in front of them."""
        with ThreadPoolExecutor(max_workers=max(len(self.replicas), 1)) as ex:
            list(ex.map(self.stop_replica, [r.index for r in self.replicas]))
        self.procs.stop(FRONTEND)
        self.procs.stop(KEY_RELEASE_FRONTEND)

    def operator_logs(self, lines: int = 10) -> str:
        return "\n".join(
            f"[{r.identity}]\n{self.procs.log_tail(r.process, lines)}" for r in self.replicas
        )

    def describe_operator(self) -> list[str]:
        """What `gtvp local up` says about the operator: its replicas and how they are reached."""
        lines = [
            f"  gtvp-operator {r.identity} (process {r.process}, metrics on "
            f"127.0.0.1:{r.metrics_port}/metrics"
            + (
                f", webhooks on 127.0.0.1:{r.webhook_port} for the API server's client "
                f"certificate only ({WEBHOOK_CLIENT_NAME})"
                if r.webhook_port
                else ""
            )
            + (
                f", key release on {self.key_release_url(r.index)} (CA {self.key_release_ca})"
                if r.key_release_port
                else ""
            )
            + f", ServiceAccount {rep.LEASE_NAMESPACE}/{r.service_account})"
            for r in self.replicas
        ]
        if self.replica_count > 1 and self.webhook_port:
            lines.append(
                f"  SIMULATION: a Service (gtvp_local.frontend) on 127.0.0.1:{self.webhook_port} "
                f"sends each webhook connection to a ready replica (no kube-proxy here)"
            )
        if self.replica_count > 1 and self.key_release_front_port:
            lines.append(
                f"  SIMULATION: a Service (gtvp_local.frontend) on {self.key_release_url()} "
                "sends each key-release connection to a ready replica"
            )
        lines.append(
            f"  {self.replica_count} replica(s) share the members through Leases in "
            f"{rep.LEASE_NAMESPACE} ({self.timings.shards} shards, lease "
            f"{self.timings.duration}s, renew deadline {self.timings.renew_deadline}s, retry "
            f"{self.timings.retry_period}s)"
        )
        return lines

    # ----- leases ------------------------------------------------------------------------------
    def leases(self) -> LeaseTable:
        """The replicas' Leases as they are now."""
        return LeaseTable.read(self.cp)

    def shard_holders(self, *, live_only: bool = True) -> dict[int, str | None]:
        """Shard -> the identity holding it (None: nobody); see LeaseTable.shard_holders."""
        return self.leases().shard_holders(live_only=live_only, shards=self.timings.shards)

    def leader(self) -> str | None:
        return self.leases().leader()

    def replica_index(self, identity: str) -> int:
        return next(r.index for r in self.replicas if r.identity == identity)

    def _remove_replicas(self) -> None:
        """The replicas' ServiceAccounts and bindings, and the Leases they held."""
        ours = {r.identity for r in self.replicas}
        presence = {f"gtvp-replica-{i}" for i in ours}
        names = [
            name
            for name, lease in self.leases().by_name.items()
            if lease.holder in ours or name in presence
        ]
        if names:
            self.cp.kubectl(
                "delete",
                "lease",
                *names,
                "-n",
                rep.LEASE_NAMESPACE,
                "--ignore-not-found",
                check=False,
            )
        for replica in self.replicas:
            rep.remove_credential(self.cp, replica)

    # ----- observation ----------------------------------------------------------------------
    def member(self, name: str) -> dict[str, Any]:
        out = self.cp.kubectl("get", "member", name, "-o", "json")
        obj: dict[str, Any] = json.loads(out.stdout)
        return obj

    def wait_phase(
        self, name: str, phases: set[str] | str, *, timeout: float = 60.0, reason: str | None = None
    ) -> dict[str, Any]:
        """Wait until the member's phase (and optionally trust.reason) is as asked."""
        want = {phases} if isinstance(phases, str) else phases
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.member(name)
            status = last.get("status") or {}
            trust = status.get("trust") or {}
            if status.get("phase") in want and (reason is None or trust.get("reason") == reason):
                return last
            time.sleep(0.2)
        status = last.get("status") or {}
        raise TimeoutError(
            f"member {name} did not reach {sorted(want)}"
            f"{' with reason ' + reason if reason else ''} in {timeout:.0f}s: phase "
            f"{status.get('phase')}, trust {json.dumps(status.get('trust'))[:400]}; "
            f"operator log:\n{self.operator_logs(10)}\nagent log:\n"
            f"{self.procs.log_tail('agent-' + name, 10)}"
        )

    def extend_pcr(self, name: str, pcr: int, data: bytes) -> None:
        """Tamper with a member: extend one of its PCRs (`swtpm.extend_pcr`)."""
        tpm = self.tpm(name)
        try:
            extend_pcr(tpm.tcti, pcr, data)
        except SwtpmError as exc:
            tracked = self.procs.get(tpm.proc_name)
            state = "running" if tracked is not None and tracked.alive() else "not running"
            raise SwtpmError(
                f"{exc}; swtpm of {name} is {state}, its log:\n"
                f"{self.procs.log_tail(tpm.proc_name, 10)}"
            ) from exc

    def delete_members(self) -> None:
        for name in self.tpms:
            self.cp.kubectl(
                "delete", "member", name, "--ignore-not-found", "--wait=false", check=False
            )

    def stop(self) -> None:
        """Stop every process of the pool, the operator's replicas first, then its VMs and
        their member namespaces (with `vms="qemu"`)."""
        self.stop_operator()
        for t in self.procs.all():
            self.procs.stop(t.name)
        if self.vms == "qemu":
            from gtvp_local.vmruntime import runtime

            runtime.cleanup(self.dir)

    # ----- the whole pool -------------------------------------------------------------------
    def start_trusted(
        self,
        members: Mapping[str, int],
        *,
        policy: Mapping[str, Any] | None = None,
        before_start: Callable[[Pool], None] | None = None,
        timeout: float = 60.0,
        say: Callable[[str], None] = _quiet,
    ) -> None:
        """Start a trusted pool and wait until every member (name -> identity) is Trusted.

        In order: access rules and webhooks; each member with its own swtpm and a Node; the
        policy (`policy`: `apply_policy`'s settings); `before_start` (anything the operator
        should find when it starts); then, SIMULATED, kwok and the virt-controller stand-in;
        the operator; the agents. `say` narrates each step (`gtvp local up` prints it).
        """
        self.install_access()
        self.install_webhooks()
        for name, identity in members.items():
            say(
                f"  member {name}: swtpm with an EK certificate from the pool's swtpm CA, "
                f"identity {identity}"
            )
            self.add_member(name, identity=identity, start_agent=False, node=True)
        self.apply_policy(**(policy or {}))
        if before_start is not None:
            before_start(self)
        say("  SIMULATION: kwok keeps the Nodes Ready (no kubelet here)")
        self.start_kwok()
        say("  SIMULATION: a stand-in for KubeVirt's virt-controller runs VMIs and migrations")
        if self.vms == "qemu":
            say(
                "  SIMULATION of virt-handler/virt-launcher (gtvp_local.vmruntime): each VMI is a "
                "real qemu VM in its member's network namespace, each migration a real qemu "
                "live migration between members"
            )
        self.start_virtsim()
        self.start_operator()
        for line in self.describe_operator():
            say(line)
        for name in members:
            self.start_agent(name)
        started = time.monotonic()
        for name in members:
            self.wait_phase(name, MemberPhase.TRUSTED, timeout=timeout)
            say(
                f"  {name}: Trusted after {time.monotonic() - started:.1f}s "
                "(EK certificate checked, AK bound by credential activation, quote verified)"
            )

    def uninstall(self) -> None:
        """Stop the pool's processes and remove what it put in the cluster: its members and
        their Nodes, the webhook configurations and its policy (the control plane may serve
        others next: a Node left behind would still carry the trust labels this pool's
        operator wrote, and nobody would run its VMs)."""
        self.stop()
        self.delete_members()
        for name in self.tpms:
            self.cp.kubectl("delete", "node", name, "--ignore-not-found", "--wait=false")
        self._remove_replicas()
        for kind, name in (
            ("mutatingwebhookconfiguration", "gtvp"),
            ("validatingwebhookconfiguration", "gtvp"),
            ("validatingwebhookconfiguration", webhook_config.POLICY_CONFIGURATION),
        ):
            self.cp.kubectl("delete", kind, name, "--ignore-not-found")
        self.cp.kubectl("delete", "securitypolicy", self.policy_name, "--ignore-not-found")


@contextlib.contextmanager
def trusted_pool(
    cp: ControlPlane,
    directory: Path,
    members: Mapping[str, int],
    *,
    policy_name: str = "default",
    policy: Mapping[str, Any] | None = None,
    before_start: Callable[[Pool], None] | None = None,
    timeout: float = 60.0,
    replicas: int | None = None,
    identity_prefix: str = "local",
    timings: LeaseTimings | None = None,
    vms: str | None = None,
) -> Iterator[Pool]:
    """A pool started by `Pool.start_trusted` (every member Trusted) for the `with` block;
    stopped and removed from the cluster afterwards, also when it failed to start.
    `replicas`, `identity_prefix`, `timings`: the operator's replicas (see Pool)."""
    pool = Pool(
        cp,
        directory,
        policy=policy_name,
        replicas=replicas,
        identity_prefix=identity_prefix,
        timings=timings,
        vms=vms,
    )
    try:
        pool.start_trusted(members, policy=policy, before_start=before_start, timeout=timeout)
        yield pool
    finally:
        pool.uninstall()
