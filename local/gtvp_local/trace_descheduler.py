"""Run the real Kubernetes descheduler (built by `toolchain.descheduler()`) against a pool.

A DeschedulerPolicy with the LowNodeUtilization balance plugin on cpu, memory and pods
(request-based, as the descheduler computes utilisation without a metrics source), the
DefaultEvictor allowing the pods virt-launcher pods have (local storage: KubeVirt's
launcher pods carry emptyDirs; nodeFit so a pod is evicted only if another node could take
it), limited to the pool's Nodes (a node label selector) and to virt-launcher pods (a pod
label selector: LowNodeUtilization only excludes namespaces, it cannot include one). The
`EvictionsInBackground` feature gate is on, as KubeVirt's documentation asks: an eviction
that virt-api refused with "Eviction triggered evacuation" counts as one in progress.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Thresholds:
    """LowNodeUtilization's percentages: under `low` on every resource a node is
    underutilised (a target), over `high` on any it is overutilised (a source)."""

    low: int = 40
    high: int = 85


def policy(node_selector: str, thresholds: Thresholds) -> dict[str, Any]:
    low = dict.fromkeys(("cpu", "memory", "pods"), thresholds.low)
    high = dict.fromkeys(("cpu", "memory", "pods"), thresholds.high)
    return {
        "apiVersion": "descheduler/v1alpha2",
        "kind": "DeschedulerPolicy",
        "nodeSelector": node_selector,
        "profiles": [
            {
                "name": "gtvp-bench",
                "pluginConfig": [
                    {
                        "name": "DefaultEvictor",
                        "args": {
                            "evictLocalStoragePods": True,
                            "nodeFit": True,
                            "labelSelector": {"matchLabels": {"kubevirt.io": "virt-launcher"}},
                        },
                    },
                    {
                        "name": "LowNodeUtilization",
                        "args": {"thresholds": low, "targetThresholds": high},
                    },
                ],
                "plugins": {"balance": {"enabled": ["LowNodeUtilization"]}},
            }
        ],
    }


def command(
    binary: Path, kubeconfig: Path, policy_file: Path, *, interval_s: float | None
) -> list[str]:
    """The descheduler's command line: once (`interval_s` None) or every `interval_s`."""
    cmd = [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--policy-config-file={policy_file}",
        "--feature-gates=EvictionsInBackground=true",
        "--secure-port=0",
        "--disable-metrics",
        "--v=3",
    ]
    if interval_s is not None:
        cmd.append(f"--descheduling-interval={interval_s:g}s")
    return cmd


def write_policy(directory: Path, body: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "descheduler-policy.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def run_once(
    binary: Path, kubeconfig: Path, policy_file: Path, *, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """One descheduling pass (the descheduler exits after it)."""
    return subprocess.run(
        command(binary, kubeconfig, policy_file, interval_s=None),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
