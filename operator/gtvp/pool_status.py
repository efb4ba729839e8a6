"""The trusted pool at a glance: what `gtvp status` prints, and `gtvp local` after up and tamper.

Members with their verdicts, what their Nodes carry, the gated VMs and where they run, the
Lazy Boxes, and migrations in flight. `collect` reads the objects from a cluster; `render` is a
pure function of them (tested on its own); `summary` is both. `report` is the same view as
data (`gtvp status -o json|yaml`), also pure.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from gtvp.core.api_resources import (
    LAZY_BOXES,
    MEMBERS,
    MIGRATIONS,
    VIRTUAL_MACHINE_INSTANCES,
    ApiResource,
)
from gtvp.core.phases import MemberPhase
from gtvp.core.timestamps import parse_ts
from gtvp.core.trust import LEVEL_LABEL, TAINT_KEY, TRUSTED_LABEL, VM_LEVEL_LABEL

Objects = Sequence[Mapping[str, Any]]


def _age(ts: Any, now: dt.datetime) -> str:
    t = parse_ts(ts)
    if t is None:
        return "-"
    secs = int((now - t).total_seconds())
    sign = "" if secs >= 0 else "in "
    secs = abs(secs)
    text = f"{secs}s" if secs < 120 else f"{secs // 60}m" if secs < 7200 else f"{secs // 3600}h"
    return f"{sign}{text}" + (" ago" if not sign else "")


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _table_or_none(rows: Sequence[Sequence[str]]) -> str:
    """The table, or `(none)` when it has only its header."""
    return _table(rows) if len(rows) > 1 else "  (none)"


def _phase(obj: Mapping[str, Any]) -> Any:
    return (obj.get("status") or {}).get("phase")


def _members(members: Objects, now: dt.datetime) -> list[str]:
    """One row per member; a REFERENCE SET column (the set of the member class's
    `referenceSets` its verdict's event log matched) only when some member matched one."""
    sets = any(((m.get("status") or {}).get("trust") or {}).get("referenceSet") for m in members)
    header = ["MEMBER", "PHASE", "LEVEL", "REASON", "VERIFIED", "EXPIRES", "USES LEFT"]
    rows = [header + (["REFERENCE SET"] if sets else [])]
    for m in sorted(members, key=lambda m: m["metadata"]["name"]):
        st = m.get("status") or {}
        trust = st.get("trust") or {}
        row = [
            m["metadata"]["name"],
            str(st.get("phase", MemberPhase.PENDING.value)),
            str(st.get("level", 0)),
            str(trust.get("reason", "-")),
            _age(trust.get("verifiedAt"), now),
            _age(trust.get("expiresAt"), now),
            str(trust.get("usesLeft", "-")),
        ]
        rows.append(row + ([str(trust.get("referenceSet", "-"))] if sets else []))
    trusted = sum(1 for m in members if _phase(m) == MemberPhase.TRUSTED)
    out = [f"Members: {trusted} of {len(members)} trusted", _table_or_none(rows)]
    for m in members:
        if _phase(m) == MemberPhase.UNTRUSTED:
            trust = (m.get("status") or {}).get("trust") or {}
            out.append(f"  ! {m['metadata']['name']}: {trust.get('message', '')}")
    return out


def _nodes(nodes: Objects) -> list[str]:
    rows = [["NODE", "TRUST LABELS", "TAINT"]]
    for n in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        labels = n["metadata"].get("labels") or {}
        levels = sorted(int(k[len(LEVEL_LABEL) :]) for k in labels if k.startswith(LEVEL_LABEL))
        label_text = (
            f"trusted, level {max(levels)}"
            if labels.get(TRUSTED_LABEL) == "true" and levels
            else "none"
        )
        taints = [t for t in (n.get("spec") or {}).get("taints") or [] if t.get("key") == TAINT_KEY]
        rows.append(
            [
                n["metadata"]["name"],
                label_text,
                f"{TAINT_KEY}:{taints[0].get('effect')}" if taints else "-",
            ]
        )
    return ["Nodes:", _table_or_none(rows)]


def _gated_vms(vmis: Objects) -> list[str]:
    rows = [["VM", "LEVEL", "PHASE", "NODE"]]
    for v in sorted(vmis, key=lambda v: (v["metadata"]["namespace"], v["metadata"]["name"])):
        labels = v["metadata"].get("labels") or {}
        if VM_LEVEL_LABEL not in labels:
            continue
        st = v.get("status") or {}
        rows.append(
            [
                f"{v['metadata']['namespace']}/{v['metadata']['name']}",
                labels[VM_LEVEL_LABEL],
                str(st.get("phase", "-")),
                str(st.get("nodeName", "-")),
            ]
        )
    return ["Gated VMs:", _table_or_none(rows)]


def _boxes(boxes: Objects) -> str:
    rows = [["BOX", "LEVEL", "PHASE", "NODE", "COMPONENTS"]]
    notes = []
    attested = any((b.get("status") or {}).get("attestation") for b in boxes)
    if attested:  # the policy attests boxes (docs/boxattest.md): where the last quote was
        rows[0].insert(4, "ATTESTED")
    for b in sorted(boxes, key=lambda b: (b["metadata"]["namespace"], b["metadata"]["name"])):
        st = b.get("status") or {}
        name = f"{b['metadata']['namespace']}/{b['metadata']['name']}"
        comps = ", ".join(f"{r.get('name')} {r.get('version')}" for r in st.get("resolved") or [])
        row = [
            name,
            str((b.get("spec") or {}).get("level", "-")),
            str(st.get("phase", "-")),
            str(st.get("node", "-")),
            comps or "-",
        ]
        if attested:
            row.insert(4, _attested(st.get("attestation") or {}))
        rows.append(row)
        att = st.get("attestation") or {}
        if att.get("state") in ("Mismatch", "Overdue"):
            notes.append(f"  ! {name}: {str(att.get('message', ''))[:300]}")
        if st.get("phase") in ("Pending", "Failed"):
            notes.append(f"  ! {name}: {str(st.get('message', '')).splitlines()[0][:300]}")
        elif (st.get("placement") or {}).get("reason"):
            notes.append(f"  {name} placed on {st['placement']['reason']}")
    return "\n".join([_table(rows), *notes])


def _attested(att: Mapping[str, Any]) -> str:
    """`Verified@member`, `Mismatch@member`, `Overdue@member`, or the state alone."""
    state = str(att.get("state") or "Pending")
    member = att.get("member")
    return f"{state}@{member}" if member and state != "Pending" else state


def _migrations(migrations: Objects) -> list[str]:
    active = [m for m in migrations if _phase(m) not in ("Succeeded", "Failed")]
    done = len(migrations) - len(active)
    out = [f"Migrations: {len(active)} in flight, {done} finished"]
    for m in active:
        st = m.get("status") or {}
        state = st.get("migrationState") or {}
        out.append(
            f"  {m['metadata']['namespace']}/{m['metadata']['name']}: "
            f"{st.get('phase', 'Pending')} {state.get('sourceNode', '?')} -> "
            f"{state.get('targetNode', '?')}"
        )
    return out


def render(
    *,
    members: Objects,
    nodes: Objects,
    vmis: Objects,
    migrations: Objects,
    now: dt.datetime,
    lazyboxes: Objects = (),
) -> str:
    out = [*_members(members, now), "", *_nodes(nodes), "", *_gated_vms(vmis)]
    if lazyboxes:
        out += ["", "Lazy Boxes:", _boxes(lazyboxes)]
    out += ["", *_migrations(migrations)]
    return "\n".join(out)


def _node_report(n: Mapping[str, Any]) -> dict[str, Any]:
    labels = n["metadata"].get("labels") or {}
    levels = sorted(int(k[len(LEVEL_LABEL) :]) for k in labels if k.startswith(LEVEL_LABEL))
    taints = [t for t in (n.get("spec") or {}).get("taints") or [] if t.get("key") == TAINT_KEY]
    trusted = labels.get(TRUSTED_LABEL) == "true" and bool(levels)
    return {
        "name": n["metadata"]["name"],
        "trusted": trusted,
        "level": max(levels) if trusted else 0,
        "taint": f"{TAINT_KEY}:{taints[0].get('effect')}" if taints else None,
    }


def _ref(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {"namespace": obj["metadata"].get("namespace"), "name": obj["metadata"]["name"]}


def _member_report(m: Mapping[str, Any]) -> dict[str, Any]:
    st = m.get("status") or {}
    trust = st.get("trust") or {}
    keep = ("reason", "message", "verifiedAt", "expiresAt", "usesLeft", "referenceSet")
    return {
        "name": m["metadata"]["name"],
        "phase": str(st.get("phase", MemberPhase.PENDING.value)),
        "level": int(st.get("level", 0) or 0),
        **{k: trust[k] for k in keep if k in trust},
    }


def _vm_report(v: Mapping[str, Any]) -> dict[str, Any]:
    st = v.get("status") or {}
    level = v["metadata"]["labels"][VM_LEVEL_LABEL]
    return {**_ref(v), "level": level, "phase": st.get("phase"), "node": st.get("nodeName")}


def _box_report(b: Mapping[str, Any]) -> dict[str, Any]:
    st = b.get("status") or {}
    return {
        **_ref(b),
        "level": (b.get("spec") or {}).get("level"),
        "phase": st.get("phase"),
        "node": st.get("node"),
        "components": [f"{r.get('name')} {r.get('version')}" for r in st.get("resolved") or []],
        "message": st.get("message"),
        **(
            {
                "attestation": {
                    k: att[k] for k in ("state", "member", "verifiedAt", "reason") if k in att
                }
            }
            if (att := st.get("attestation"))
            else {}
        ),
    }


def _migration_report(m: Mapping[str, Any]) -> dict[str, Any]:
    st = m.get("status") or {}
    state = st.get("migrationState") or {}
    return {
        **_ref(m),
        "phase": st.get("phase", "Pending"),
        "sourceNode": state.get("sourceNode"),
        "targetNode": state.get("targetNode"),
    }


def report(
    *,
    members: Objects,
    nodes: Objects,
    vmis: Objects,
    migrations: Objects,
    lazyboxes: Objects = (),
) -> dict[str, Any]:
    """What `render` shows, as data for scripts: members with their verdicts, Nodes with
    their trust labels and taint, gated VMs, Lazy Boxes and migrations in flight."""
    by_name = sorted(members, key=lambda m: m["metadata"]["name"])
    done = [m for m in migrations if _phase(m) in ("Succeeded", "Failed")]
    return {
        "members": [_member_report(m) for m in by_name],
        "nodes": [_node_report(n) for n in sorted(nodes, key=lambda n: n["metadata"]["name"])],
        "gatedVMs": [
            _vm_report(v) for v in vmis if VM_LEVEL_LABEL in (v["metadata"].get("labels") or {})
        ],
        "lazyBoxes": [_box_report(b) for b in lazyboxes],
        "migrations": [_migration_report(m) for m in migrations if m not in done],
        "migrationsFinished": len(done),
    }


def collect(kubeconfig: str) -> dict[str, list[dict[str, Any]]]:
    """The objects `render` shows, read from the cluster in `kubeconfig`; a resource whose
    CRD is not installed reads as none."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=kubeconfig)
    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)

    def items(resource: ApiResource) -> list[dict[str, Any]]:
        try:
            got: list[dict[str, Any]] = custom.list_cluster_custom_object(*resource.coordinates)[
                "items"
            ]
            return got
        except client.exceptions.ApiException as exc:
            if exc.status == 404:
                return []
            raise

    nodes = [api.sanitize_for_serialization(n) for n in core.list_node().items]
    return {
        "members": items(MEMBERS),
        "nodes": nodes,
        "vmis": items(VIRTUAL_MACHINE_INSTANCES),
        "migrations": items(MIGRATIONS),
        "lazyboxes": items(LAZY_BOXES),
    }


def summary(kubeconfig: str) -> str:
    """The pool in the cluster at `kubeconfig`, rendered as of the moment it was read."""
    objs = collect(kubeconfig)
    return render(now=dt.datetime.now(dt.UTC), **objs)
