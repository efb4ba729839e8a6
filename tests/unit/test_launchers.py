"""Which pods are a VMI's launchers (`launcher_pod`), and which migrations let a VMI's
lingering source pod rest for a moment (`settled_until`)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from gtvp.core.launchers import SETTLE, launcher_pod, settled_until

NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)


def _migration(
    vmi: str = "db",
    labels: dict[str, str] | None = None,
    phase: str = "Succeeded",
    ago: dt.timedelta = dt.timedelta(seconds=5),
) -> dict[str, Any]:
    at = (NOW - ago).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "metadata": {"labels": {"gtvp.io/evacuation": "bad"} if labels is None else labels,
                     "creationTimestamp": "2026-12-03T11:30:00Z"},
        "spec": {"vmiName": vmi},
        "status": {"phase": phase,
                   "phaseTransitionTimestamps": [{"phase": phase, "phaseTransitionTimestamp": at}]},
    }  # fmt: skip


VMI = {"metadata": {"name": "db", "creationTimestamp": "2026-12-03T11:00:00Z"}}


def _settled(migrations: list[dict[str, Any]], member: str = "bad") -> bool:
    return settled_until(migrations, VMI, member, NOW) is not None


def test_only_gtvps_own_recent_success_off_that_member_counts() -> None:
    assert settled_until([_migration()], VMI, "bad", NOW) == NOW - dt.timedelta(seconds=5) + SETTLE
    assert _settled([_migration(labels={"gtvp.io/drain": "bad"})])
    # a tenant's migration (no gtvp mark: its source is virt-handler's word), another
    # member's, another VM's, one not Succeeded, one that succeeded too long ago
    assert not _settled([_migration(labels={})])
    assert not _settled([_migration()], "other")
    assert not _settled([_migration(vmi="web")])
    assert not _settled([_migration(phase="Running")])
    assert not _settled([_migration(ago=SETTLE)])
    no_time = _migration()
    del no_time["status"]["phaseTransitionTimestamps"]
    assert not _settled([no_time])
    # one of an earlier VMI under the same name
    older = _migration()
    older["metadata"]["creationTimestamp"] = "2026-12-03T10:00:00Z"
    assert not _settled([older])
    # one without a creation time cannot show it was made for this VMI: it loosens nothing
    undated = _migration()
    del undated["metadata"]["creationTimestamp"]
    assert not _settled([undated])


def _pod(labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "virt-launcher-db-x",
            "namespace": "ns",
            "labels": labels,
            "ownerReferences": [
                {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                 "name": "db", "uid": "u1", "controller": True}
            ],
        },
        "spec": {"nodeName": "bad"},
        "status": {"phase": "Running"},
    }  # fmt: skip


def test_a_launcher_is_any_pod_kubevirt_would_take_whatever_its_label_value() -> None:
    """KubeVirt takes any pod carrying the label kubevirt.io that the VMI controls: a value
    changed to hide the pod from gtvp (through pods/status, which host daemons may write)
    still places the VMI on that pod's node."""
    for value in ("virt-launcher", "hidden", ""):
        got = launcher_pod(_pod({"kubevirt.io": value}))
        assert got is not None, value
        assert (got.vmi, got.node) == (("ns", "db"), "bad")
    assert launcher_pod(_pod({"app": "x"})) is None
