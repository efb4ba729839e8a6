"""`gtvp status`: a readable summary of the trusted pool.

Members with their verdicts, what their Nodes carry, the gated VMs and where they run, and
migrations in flight. `render` is a pure function of the objects (tested on its own); `run`
reads them from the cluster in $KUBECONFIG, or from the local pool when that is unset.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gtvp.core.timestamps import parse_ts
from gtvp.core.trust import LEVEL_LABEL, TAINT_KEY, TRUSTED_LABEL, VM_LEVEL_LABEL


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


def render(
    *,
    members: Sequence[Mapping[str, Any]],
    nodes: Sequence[Mapping[str, Any]],
    vmis: Sequence[Mapping[str, Any]],
    migrations: Sequence[Mapping[str, Any]],
    now: dt.datetime,
    lazyboxes: Sequence[Mapping[str, Any]] = (),
) -> str:
    out: list[str] = []
    rows = [["MEMBER", "PHASE", "LEVEL", "REASON", "VERIFIED", "EXPIRES", "USES LEFT"]]
    for m in sorted(members, key=lambda m: m["metadata"]["name"]):
        st = m.get("status") or {}
        trust = st.get("trust") or {}
        rows.append(
            [
                m["metadata"]["name"],
                str(st.get("phase", "Pending")),
                str(st.get("level", 0)),
                str(trust.get("reason", "-")),
                _age(trust.get("verifiedAt"), now),
                _age(trust.get("expiresAt"), now),
                str(trust.get("usesLeft", "-")),
            ]
        )
    trusted = sum(1 for m in members if (m.get("status") or {}).get("phase") == "Trusted")
    out.append(f"Members: {trusted} of {len(members)} trusted")
    out.append(_table(rows) if len(rows) > 1 else "  (none)")
    untrusted = [m for m in members if (m.get("status") or {}).get("phase") == "Untrusted"]
    for m in untrusted:
        trust = (m.get("status") or {}).get("trust") or {}
        out.append(f"  ! {m['metadata']['name']}: {trust.get('message', '')}")
    out.append("")
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
    out.append("Nodes:")
    out.append(_table(rows) if len(rows) > 1 else "  (none)")
    out.append("")
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
    out.append("Gated VMs:")
    out.append(_table(rows) if len(rows) > 1 else "  (none)")
    if lazyboxes:
        out.append("")
        out.append("Lazy Boxes:")
        out.append(_boxes(lazyboxes))
    active = [
        m for m in migrations if (m.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    ]
    done = len(migrations) - len(active)
    out.append("")
    out.append(f"Migrations: {len(active)} in flight, {done} finished")
    for m in active:
        st = m.get("status") or {}
        state = st.get("migrationState") or {}
        out.append(
            f"  {m['metadata']['namespace']}/{m['metadata']['name']}: "
            f"{st.get('phase', 'Pending')} {state.get('sourceNode', '?')} -> "
            f"{state.get('targetNode', '?')}"
        )
    return "\n".join(out)


def _boxes(boxes: Sequence[Mapping[str, Any]]) -> str:
    rows = [["BOX", "LEVEL", "PHASE", "NODE", "COMPONENTS"]]
    notes = []
    for b in sorted(boxes, key=lambda b: (b["metadata"]["namespace"], b["metadata"]["name"])):
        st = b.get("status") or {}
        name = f"{b['metadata']['namespace']}/{b['metadata']['name']}"
        comps = ", ".join(f"{r.get('name')} {r.get('version')}" for r in st.get("resolved") or [])
        rows.append(
            [
                name,
                str((b.get("spec") or {}).get("level", "-")),
                str(st.get("phase", "-")),
                str(st.get("node", "-")),
                comps or "-",
            ]
        )
        if st.get("phase") in ("Pending", "Failed"):
            notes.append(f"  ! {name}: {str(st.get('message', '')).splitlines()[0][:300]}")
        elif (st.get("placement") or {}).get("reason"):
            notes.append(f"  {name} placed on {st['placement']['reason']}")
    return "\n".join([_table(rows), *notes])


def collect(kubeconfig: str) -> dict[str, list[dict[str, Any]]]:
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=kubeconfig)
    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)

    def items(group: str, version: str, plural: str) -> list[dict[str, Any]]:
        try:
            got: list[dict[str, Any]] = custom.list_cluster_custom_object(group, version, plural)[
                "items"
            ]
            return got
        except client.exceptions.ApiException as exc:
            if exc.status == 404:
                return []
            raise

    nodes = [api.sanitize_for_serialization(n) for n in core.list_node().items]
    return {
        "members": items("gtvp.io", "v1alpha1", "members"),
        "nodes": nodes,
        "vmis": items("kubevirt.io", "v1", "virtualmachineinstances"),
        "migrations": items("kubevirt.io", "v1", "virtualmachineinstancemigrations"),
        "lazyboxes": items("gtvp.io", "v1alpha1", "lazyboxes"),
    }


def default_kubeconfig() -> str | None:
    env = os.environ.get("KUBECONFIG")
    if env:
        return env
    from gtvp.localcluster.commands import state_dir

    local = state_dir() / "kubeconfig"
    return str(local) if local.exists() else None


def run(args: argparse.Namespace) -> int:
    kubeconfig = args.kubeconfig or default_kubeconfig()
    if not kubeconfig or not Path(kubeconfig).exists():
        print(
            "gtvp status: no cluster: set KUBECONFIG or start the local pool (gtvp local up)",
            file=sys.stderr,
        )
        return 2
    try:
        objs = collect(kubeconfig)
    except Exception as exc:  # noqa: BLE001 - one line for any connection problem
        print(f"gtvp status: cannot read the cluster ({kubeconfig}): {exc}", file=sys.stderr)
        return 2
    print(render(now=dt.datetime.now(dt.UTC), **objs))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="a readable summary of the trusted pool")
    p.add_argument("--kubeconfig", help="default: $KUBECONFIG, else the local pool's")
    p.set_defaults(func=run)
