"""Which migrations let a VMI's lingering source pod rest for a moment (`settled_off`)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from gtvp.core.launchers import SETTLE, settled_off

NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)


def _migration(
    vmi: str = "db",
    labels: dict[str, str] | None = None,
    phase: str = "Succeeded",
    ago: dt.timedelta = dt.timedelta(seconds=5),
) -> dict[str, Any]:
    at = (NOW - ago).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "metadata": {"labels": {"gtvp.io/evacuation": "bad"} if labels is None else labels},
        "spec": {"vmiName": vmi},
        "status": {"phase": phase,
                   "phaseTransitionTimestamps": [{"phase": phase, "phaseTransitionTimestamp": at}]},
    }  # fmt: skip


def test_only_gtvps_own_recent_success_off_that_member_counts() -> None:
    assert settled_off([_migration()], "db", "bad", NOW)
    assert settled_off([_migration(labels={"gtvp.io/drain": "bad"})], "db", "bad", NOW)
    # a tenant's migration (no gtvp mark: its source is virt-handler's word), another
    # member's, another VM's, one not Succeeded, one that succeeded too long ago
    assert not settled_off([_migration(labels={})], "db", "bad", NOW)
    assert not settled_off([_migration()], "db", "other", NOW)
    assert not settled_off([_migration(vmi="web")], "db", "bad", NOW)
    assert not settled_off([_migration(phase="Running")], "db", "bad", NOW)
    assert not settled_off([_migration(ago=SETTLE)], "db", "bad", NOW)
    no_time = _migration()
    del no_time["status"]["phaseTransitionTimestamps"]
    assert not settled_off([no_time], "db", "bad", NOW)
