"""The local pool's gtvp-operator replicas: their credentials, processes, faults and Leases.

Each replica is a `gtvp-operator` process with its own identity (its name in the Leases), its
own metrics, webhook and key-release ports and its own credential: a ServiceAccount
`gtvp-operator-<identity>` in the lease namespace, bound to the `gtvp-operator` ClusterRole,
the `gtvp-operator-leases` Role and, in the namespaces that opted in to key release
(KEY_RELEASE_NAMESPACES, docs/keyrelease.md), the `gtvp-key-release` ClusterRole, whose
token (TokenRequest API, signed by the local API server) is written into that replica's
kubeconfig. Deleting the ServiceAccount revokes that
replica alone: the API server answers its next request with 401.

The replicas share the members through Leases in the lease namespace (see
docs/ha-local.md): `gtvp-replica-<identity>` (presence), `gtvp-shard-NN` (one writer per
shard) and `gtvp-leader` (the singleton loops). `LeaseTable` reads them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gtvp.core.shards import SHARDS, LeaseTiming, shard_of
from gtvp_local.controlplane import ControlPlane

LEASE_NAMESPACE = "gtvp-system"
TOKEN_DURATION = "8760h"  # noqa: S105 (a duration, not a secret)
KEY_RELEASE_NAMESPACES = ("default",)
"""Where the local pool's replicas may read Secrets to release them (and write the boxes'
cloud-init Secrets, with the box-attestation credential); `gtvp local up` opts the sample
box's namespace in too (`key_release_binding`)."""


@dataclass(frozen=True)
class LeaseTimings:
    """The replicas' lease settings (seconds). Short in the local pool so faults show fast.

    The bound: a member never expires during a failover when the policy's
    validFor - interval > duration + 2 x retry_period (the survivor sees the last renewal up
    to one retry late and takes over in its next round) + the agent's quote and the
    judgement (about 2 s on a loaded 2-core machine); the pool's policy (interval 5 s,
    validFor 15 s) leaves 10 s against 4 + 1 + 2. (6 s Leases left 1 s and members expired
    under load.)
    """

    duration: float = 4.0
    renew_deadline: float = 2.5
    retry_period: float = 0.5
    shutdown_grace: float = 3.0
    shards: int = SHARDS

    def args(self) -> list[str]:
        return [
            "--lease-namespace",
            LEASE_NAMESPACE,
            "--lease-duration",
            str(self.duration),
            "--renew-deadline",
            str(self.renew_deadline),
            "--retry-period",
            str(self.retry_period),
            "--shards",
            str(self.shards),
            "--shutdown-grace",
            str(self.shutdown_grace),
        ]

    def failover_bound(self) -> float:
        """How long a dead replica's shards may stay without a writer: the operator's own
        `LeaseTiming.failover_bound` for these settings."""
        return LeaseTiming(self.duration, self.renew_deadline, self.retry_period).failover_bound()


@dataclass(frozen=True)
class Replica:
    """One operator replica of the pool."""

    index: int
    identity: str
    process: str
    metrics_port: int
    webhook_port: int
    key_release_port: int = 0
    """Its HTTPS port for key release (0: none; a pool.json from before it had none)."""

    @property
    def service_account(self) -> str:
        return f"gtvp-operator-{self.identity}"

    @property
    def field_manager(self) -> str:
        return f"gtvp-operator/{self.identity}"

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "identity": self.identity,
            "process": self.process,
            "metricsPort": self.metrics_port,
            "webhookPort": self.webhook_port,
            "keyReleasePort": self.key_release_port,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Replica:
        return cls(
            int(data["index"]),
            str(data["identity"]),
            str(data["process"]),
            int(data["metricsPort"]),
            int(data["webhookPort"]),
            int(data.get("keyReleasePort") or 0),
        )


def process_name(index: int, replicas: int) -> str:
    """`operator` for a single replica (as before replicas existed), else `operator-N`."""
    return "operator" if replicas == 1 else f"operator-{index}"


# ----- credentials ----------------------------------------------------------------------------
def ensure_namespace(cp: ControlPlane) -> None:
    got = cp.kubectl("get", "namespace", LEASE_NAMESPACE, check=False)
    if got.returncode != 0:
        cp.kubectl("create", "namespace", LEASE_NAMESPACE, check=False)


def _bindings(replica: Replica) -> list[dict[str, Any]]:
    subject = [
        {"kind": "ServiceAccount", "name": replica.service_account, "namespace": LEASE_NAMESPACE}
    ]
    rbac = "rbac.authorization.k8s.io"
    return [
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": replica.service_account},
            "subjects": subject,
            "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": "gtvp-operator"},
        },
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "RoleBinding",
            "metadata": {"name": replica.service_account, "namespace": LEASE_NAMESPACE},
            "subjects": subject,
            "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "gtvp-operator-leases"},
        },
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "RoleBinding",
            "metadata": {"name": _keys_binding(replica), "namespace": LEASE_NAMESPACE},
            "subjects": subject,
            "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "gtvp-operator-verdict-keys"},
        },
        *(key_release_binding(replica, ns) for ns in KEY_RELEASE_NAMESPACES),
    ]


def key_release_binding(replica: Replica, namespace: str) -> dict[str, Any]:
    """The RoleBinding of the replica's ServiceAccount to `gtvp-key-release` in `namespace`
    (reading the Secrets a box may be given, writing its cloud-init Secret)."""
    rbac = "rbac.authorization.k8s.io"
    return {
        "apiVersion": f"{rbac}/v1",
        "kind": "RoleBinding",
        "metadata": {"name": _key_release_binding(replica), "namespace": namespace},
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": replica.service_account,
                "namespace": LEASE_NAMESPACE,
            }
        ],
        "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": "gtvp-key-release"},
    }


def _keys_binding(replica: Replica) -> str:
    """The RoleBinding to the verdict-token keys' Role (docs/tokens.md)."""
    return f"{replica.service_account}-verdict-keys"


def _key_release_binding(replica: Replica) -> str:
    """The RoleBinding to `gtvp-key-release` in each of KEY_RELEASE_NAMESPACES."""
    return f"{replica.service_account}-key-release"


def issue_credential(cp: ControlPlane, replica: Replica, directory: Path) -> Path:
    """The replica's ServiceAccount, its bindings and a kubeconfig with a fresh token."""
    sa = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": replica.service_account, "namespace": LEASE_NAMESPACE},
    }
    for obj in (sa, *_bindings(replica)):
        cp.apply(obj)
    token = cp.kubectl(
        "create",
        "token",
        replica.service_account,
        "-n",
        LEASE_NAMESPACE,
        f"--duration={TOKEN_DURATION}",
    ).stdout.strip()
    user = f"system:serviceaccount:{LEASE_NAMESPACE}:{replica.service_account}"
    path = directory / "kubeconfigs" / f"{replica.process}.kubeconfig"
    cp.write_kubeconfig(path, user, {"token": token})
    return path


def revoke_credential(cp: ControlPlane, replica: Replica) -> None:
    """Delete the replica's ServiceAccount: its token is refused (401) from then on."""
    cp.kubectl(
        "delete", "serviceaccount", replica.service_account, "-n", LEASE_NAMESPACE, "--wait=false"
    )


def remove_credential(cp: ControlPlane, replica: Replica) -> None:
    for kind, name in (
        ("serviceaccount", replica.service_account),
        ("rolebinding", replica.service_account),
        ("rolebinding", _keys_binding(replica)),
    ):
        cp.kubectl("delete", kind, name, "-n", LEASE_NAMESPACE, "--ignore-not-found", check=False)
    for ns in KEY_RELEASE_NAMESPACES:
        cp.kubectl(
            "delete",
            "rolebinding",
            _key_release_binding(replica),
            "-n",
            ns,
            "--ignore-not-found",
            check=False,
        )
    cp.kubectl(
        "delete", "clusterrolebinding", replica.service_account, "--ignore-not-found", check=False
    )


# ----- faults -------------------------------------------------------------------------------
def signal_process(pid: int, sig: signal.Signals) -> None:
    """Send `sig` to the replica's process group (it was started in its own session)."""
    os.killpg(pid, sig)


# ----- the Leases ---------------------------------------------------------------------------
def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC).timestamp()


@dataclass(frozen=True)
class Lease:
    """One Lease as read: its holder and until when the holder has it."""

    name: str
    holder: str | None
    renewed: float | None
    duration: int

    def live(self, now: float) -> bool:
        return bool(self.holder) and self.renewed is not None and now < self.renewed + self.duration


class LeaseTable:
    """The replicas' Leases in the lease namespace, read in one list."""

    def __init__(self, leases: list[dict[str, Any]], now: float | None = None) -> None:
        self.now = time.time() if now is None else now
        self.by_name: dict[str, Lease] = {}
        for obj in leases:
            spec = obj.get("spec") or {}
            name = obj["metadata"]["name"]
            self.by_name[name] = Lease(
                name,
                spec.get("holderIdentity") or None,
                _parse_time(spec.get("renewTime") or spec.get("acquireTime")),
                int(spec.get("leaseDurationSeconds") or 0),
            )

    @classmethod
    def read(cls, cp: ControlPlane) -> LeaseTable:
        out = cp.kubectl(
            "get",
            "leases",
            "-n",
            LEASE_NAMESPACE,
            "-l",
            "gtvp.io/lease",
            "-o",
            "json",
            check=False,
        )
        items = json.loads(out.stdout).get("items", []) if out.returncode == 0 else []
        return cls(items)

    def present(self, identity: str) -> bool:
        """The replica's presence lease is live."""
        lease = self.by_name.get(f"gtvp-replica-{identity}")
        return lease is not None and lease.live(self.now)

    def shard_holders(
        self, *, live_only: bool = True, shards: int = SHARDS
    ) -> dict[int, str | None]:
        """Shard -> the replica holding it (None: nobody). `live_only`: a holder counts only
        while its presence lease is live, as the replicas themselves judge it."""
        out: dict[int, str | None] = {}
        for n in range(shards):
            lease = self.by_name.get(f"gtvp-shard-{n:02d}")
            holder = lease.holder if lease is not None else None
            if holder and live_only and not self.present(holder):
                holder = None
            out[n] = holder
        return out

    def leader(self) -> str | None:
        """The replica running the singleton loops: the leader Lease's holder, while that
        replica's presence lease is live (as for a shard)."""
        lease = self.by_name.get("gtvp-leader")
        if lease is None or not lease.holder or not self.present(lease.holder):
            return None
        return lease.holder

    def names(self) -> list[str]:
        return sorted(self.by_name)


# ----- what `gtvp local status` shows -----------------------------------------------------------
def shard_ranges(shards: list[int]) -> str:
    """`0-3,7,9-10` for [0, 1, 2, 3, 7, 9, 10]."""
    parts: list[str] = []
    for s in sorted(shards):
        if parts and s == int(parts[-1].rsplit("-", 1)[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{s}"
        else:
            parts.append(str(s))
    return ",".join(parts) or "none"


def report(
    table: LeaseTable,
    replicas: list[Replica],
    *,
    running: Mapping[str, bool],
    ready: Mapping[str, bool],
    members: list[str],
    shards: int = SHARDS,
) -> list[str]:
    """One line per replica: process, readiness, the shards it holds (live), how many
    members it writes for, and whether it leads the singleton loops."""
    holders = table.shard_holders(shards=shards)
    writes: dict[str | None, int] = {}
    for name in members:
        holder = holders[shard_of(name, shards)]
        writes[holder] = writes.get(holder, 0) + 1
    leader = table.leader()
    lines = [f"operator replicas (Leases in {LEASE_NAMESPACE}, {shards} shards):"]
    for r in replicas:
        held = [s for s, h in holders.items() if h == r.identity]
        state = (
            ("ready" if ready.get(r.identity) else "NOT ready")
            if running.get(r.identity)
            else "NOT RUNNING"
        )
        lines.append(
            f"  {r.identity:12} {r.process:12} {state:11} "
            f"{len(held):2} shards, writes for {writes.get(r.identity, 0)} member(s)"
            + (
                "; leader (evacuation, boxes, balancing, drains, status)"
                if leader == r.identity
                else ""
            )
            + f"\n    shards {shard_ranges(held)}"
        )
    unheld = [s for s, h in holders.items() if h is None]
    if unheld:
        lines.append(
            f"  no writer: {len(unheld)} shard(s) ({shard_ranges(unheld)}), "
            f"{writes.get(None, 0)} member(s)"
        )
    others = sorted({h for h in holders.values() if h} - {r.identity for r in replicas})
    if others:
        lines.append(f"  other holders: {', '.join(others)}")
    if leader is None:
        lines.append("  leader: none right now")
    return lines
