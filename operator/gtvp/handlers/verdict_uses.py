"""Spending a member's verdict: every decision that relies on it (a gated VMI's start, a
Lazy Box's placement, a migration's arrival) takes one of its `usesLeft`.

A member with none left is looked at again at once (the attestation step asks for fresh
evidence). A VMI's start is counted once; VMIs already Running when the operator starts
spent their use before and are not counted again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping
from typing import Any

from gtvp import kube
from gtvp.core.gating import GatingError, admitted_level
from gtvp.runtime import Runtime


def gated_level(vmi: Mapping[str, Any]) -> int | None:
    """The level a VMI was admitted with (its label or its trust selector, the higher)."""
    try:
        return admitted_level(
            (vmi.get("metadata") or {}).get("labels") or {},
            (vmi.get("spec") or {}).get("nodeSelector") or {},
        )
    except GatingError:
        return 9  # an unreadable level is treated as the strictest


async def spend_use(rt: Runtime, name: str) -> None:
    """One placement or migration decision backed by this member's verdict."""
    async with rt.attestation.lock(name):
        body = rt.view.members.get(name)
        trust = ((body or {}).get("status") or {}).get("trust") or {}
        left = int(trust.get("usesLeft", 0) or 0)
        if body is None or left <= 0:
            return
        result = await asyncio.to_thread(
            kube.patch_member_status, rt.clients, name, {"trust": {"usesLeft": left - 1}}
        )
        rt.view.remember_member(name, dict(result) if isinstance(result, Mapping) else body)
    if left - 1 <= 0:
        rt.schedule.schedule(name, dt.timedelta(0))


async def judge_vmi_start(rt: Runtime, body: Mapping[str, Any], event_type: str) -> None:
    """A gated VMI that KubeVirt scheduled onto a member spends one use of its verdict
    (each start is a decision that relies on it); once per VMI."""
    meta = body.get("metadata") or {}
    node = (body.get("status") or {}).get("nodeName")
    uid = str(meta.get("uid", ""))
    if event_type == "DELETED" or not node or not uid or uid in rt.spent_starts:
        return
    if gated_level(body) is None:
        return
    rt.spent_starts.add(uid)
    await spend_use(rt, str(node))


def mark_started(rt: Runtime, bodies: list[dict[str, Any]]) -> None:
    """VMIs already running when the operator starts spent their use before (no recount)."""
    for body in bodies:
        uid = (body.get("metadata") or {}).get("uid")
        if uid and (body.get("status") or {}).get("phase") == "Running":
            rt.spent_starts.add(uid)
