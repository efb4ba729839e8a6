"""`gtvp status`'s summary (also printed by `gtvp local up` and `tamper`), rendered from objects."""

from __future__ import annotations

import datetime as dt
from typing import Any

from gtvp.core.trust import LEVEL_LABEL, TAINT_KEY, TRUSTED_LABEL
from gtvp.pool_status import render

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _member(name: str, phase: str | None = None, **trust: Any) -> dict[str, Any]:
    status = {"phase": phase, "level": 3 if phase == "Trusted" else 0, "trust": trust}
    return {"metadata": {"name": name}, **({"status": status} if phase else {})}


def test_a_pool_with_a_quarantined_member_reads_at_a_glance() -> None:
    members = [
        _member("b", "Untrusted", reason="PcrMismatch", message="PCR 7 differs"),
        _member("a", "Trusted", reason="QuoteVerified", verifiedAt="2025-12-31T23:59:00Z"),
        _member("c"),
    ]
    nodes = [
        {"metadata": {"name": "a", "labels": {TRUSTED_LABEL: "true", f"{LEVEL_LABEL}3": "true"}}},
        {
            "metadata": {"name": "b"},
            "spec": {"taints": [{"key": TAINT_KEY, "effect": "NoSchedule"}]},
        },
    ]
    vmis = [
        {
            "metadata": {"name": "web", "namespace": "n", "labels": {"gtvp.io/level": "3"}},
            "status": {"phase": "Running", "nodeName": "a"},
        },
        {"metadata": {"name": "ungated", "namespace": "n"}},
    ]
    migrations = [
        {
            "metadata": {"name": "m1", "namespace": "n"},
            "status": {
                "phase": "Running",
                "migrationState": {"sourceNode": "b", "targetNode": "a"},
            },
        },
        {"metadata": {"name": "m0", "namespace": "n"}, "status": {"phase": "Succeeded"}},
    ]
    boxes = [
        {
            "metadata": {"name": "box", "namespace": "s"},
            "spec": {"level": 2},
            "status": {
                "phase": "Running",
                "node": "a",
                "resolved": [{"name": "nginx", "version": "1.26.2"}],
                "placement": {"reason": "a: Trusted at level 3"},
            },
        }
    ]
    out = render(
        members=members,
        nodes=nodes,
        vmis=vmis,
        migrations=migrations,
        lazyboxes=boxes,
        now=NOW,
    ).splitlines()
    assert out[0] == "Members: 1 of 3 trusted"
    assert out[2].split() == ["a", "Trusted", "3", "QuoteVerified", "60s", "ago", "-", "-"]
    assert out[4].split() == ["c", "Pending", "0", "-", "-", "-", "-"]
    assert "  ! b: PCR 7 differs" in out
    assert any(ln.split() == ["a", "trusted,", "level", "3", "-"] for ln in out)
    assert any(ln.split() == ["b", "none", f"{TAINT_KEY}:NoSchedule"] for ln in out)
    assert any(ln.split() == ["n/web", "3", "Running", "a"] for ln in out)
    assert not any("ungated" in ln for ln in out)
    assert any(ln.split() == ["s/box", "2", "Running", "a", "nginx", "1.26.2"] for ln in out)
    assert "  s/box placed on a: Trusted at level 3" in out
    assert out[-2:] == ["Migrations: 1 in flight, 1 finished", "  n/m1: Running b -> a"]


def test_an_empty_cluster_says_none_and_leaves_out_lazy_boxes() -> None:
    out = render(members=[], nodes=[], vmis=[], migrations=[], now=NOW)
    assert out.splitlines() == [
        "Members: 0 of 0 trusted",
        "  (none)",
        "",
        "Nodes:",
        "  (none)",
        "",
        "Gated VMs:",
        "  (none)",
        "",
        "Migrations: 0 in flight, 0 finished",
    ]


def test_the_same_view_as_data_for_gtvp_status_output_json() -> None:
    from gtvp.pool_status import report

    members = [
        _member("b", "Untrusted", reason="PcrMismatch", message="PCR 7 differs"),
        _member("a", "Trusted", reason="QuoteVerified", expiresAt="2026-01-01T00:00:06Z"),
    ]
    nodes = [
        {"metadata": {"name": "a", "labels": {TRUSTED_LABEL: "true", f"{LEVEL_LABEL}3": "true"}}},
        {
            "metadata": {"name": "b"},
            "spec": {"taints": [{"key": TAINT_KEY, "effect": "NoSchedule"}]},
        },
    ]
    vmis = [
        {
            "metadata": {"name": "web", "namespace": "n", "labels": {"gtvp.io/level": "3"}},
            "status": {"phase": "Running", "nodeName": "a"},
        },
        {"metadata": {"name": "ungated", "namespace": "n"}},
    ]
    migrations = [
        {"metadata": {"name": "m0", "namespace": "n"}, "status": {"phase": "Succeeded"}},
        {
            "metadata": {"name": "m1", "namespace": "n"},
            "status": {
                "phase": "Running",
                "migrationState": {"sourceNode": "b", "targetNode": "a"},
            },
        },
    ]
    data = report(members=members, nodes=nodes, vmis=vmis, migrations=migrations)
    assert data["members"] == [
        {
            "name": "a",
            "phase": "Trusted",
            "level": 3,
            "reason": "QuoteVerified",
            "expiresAt": "2026-01-01T00:00:06Z",
        },
        {
            "name": "b",
            "phase": "Untrusted",
            "level": 0,
            "reason": "PcrMismatch",
            "message": "PCR 7 differs",
        },
    ]
    assert data["nodes"] == [
        {"name": "a", "trusted": True, "level": 3, "taint": None},
        {"name": "b", "trusted": False, "level": 0, "taint": f"{TAINT_KEY}:NoSchedule"},
    ]
    assert data["gatedVMs"] == [
        {"namespace": "n", "name": "web", "level": "3", "phase": "Running", "node": "a"}
    ]
    assert data["migrations"] == [
        {"namespace": "n", "name": "m1", "phase": "Running", "sourceNode": "b", "targetNode": "a"}
    ]
    assert data["migrationsFinished"] == 1
    assert data["lazyBoxes"] == []


def test_the_matched_reference_set_shows_only_when_a_member_matched_one() -> None:
    from gtvp.pool_status import report

    members = [
        _member("a", "Trusted", reason="QuoteVerified", referenceSet="fw-2026-11"),
        _member("b", "Untrusted", reason="EventNotAllowed", message="PCR 0: an event"),
    ]
    out = render(members=members, nodes=[], vmis=[], migrations=[], now=NOW).splitlines()
    assert out[1].split()[-2:] == ["REFERENCE", "SET"]
    assert (out[2].split()[0], out[2].split()[-1]) == ("a", "fw-2026-11")
    assert (out[3].split()[0], out[3].split()[-1]) == ("b", "-")
    assert (
        report(members=members, nodes=[], vmis=[], migrations=[])["members"][0]["referenceSet"]
        == "fw-2026-11"
    )
    plain = render(members=members[1:], nodes=[], vmis=[], migrations=[], now=NOW)
    assert "REFERENCE SET" not in plain


def test_attested_boxes_show_where_their_last_quote_was_judged() -> None:
    from gtvp.pool_status import report

    def box(name: str, **att: Any) -> dict[str, Any]:
        status: dict[str, Any] = {"phase": "Running", "node": "a", "resolved": []}
        if att:
            status["attestation"] = att
        return {
            "metadata": {"name": name, "namespace": "s"},
            "spec": {"level": 2},
            "status": status,
        }

    boxes = [
        box("good", state="Verified", member="a", verifiedAt="2025-12-31T23:59:00Z"),
        box("late", state="Overdue", member="a", message="no verified quote of the box's vTPM"),
        box("new", state="Pending"),
    ]
    out = render(members=[], nodes=[], vmis=[], migrations=[], lazyboxes=boxes, now=NOW)
    lines = out.splitlines()
    header = next(ln for ln in lines if ln.split()[:1] == ["BOX"])
    assert header.split() == ["BOX", "LEVEL", "PHASE", "NODE", "ATTESTED", "COMPONENTS"]
    assert any(ln.split()[:5] == ["s/good", "2", "Running", "a", "Verified@a"] for ln in lines)
    assert any(ln.split()[:5] == ["s/late", "2", "Running", "a", "Overdue@a"] for ln in lines)
    assert any(ln.split()[:5] == ["s/new", "2", "Running", "a", "Pending"] for ln in lines)
    assert "  ! s/late: no verified quote of the box's vTPM" in lines
    got = report(members=[], nodes=[], vmis=[], migrations=[], lazyboxes=boxes)
    assert got["lazyBoxes"][0]["attestation"]["state"] == "Verified"
    plain = [box("b")]
    assert "ATTESTED" not in render(
        members=[], nodes=[], vmis=[], migrations=[], lazyboxes=plain, now=NOW
    )
