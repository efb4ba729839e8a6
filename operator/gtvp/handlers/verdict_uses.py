"""Spending a member's verdict: every decision that relies on it (a gated VMI's start, a
Lazy Box's placement, a migration's arrival) takes one of its `usesLeft`.

A member with none left is looked at again at once (the attestation step asks for fresh
evidence). A VMI's start is counted once; VMIs already Running when the operator starts
spent their use before and are not counted again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Mapping
from typing import Any

from gtvp import kube
from gtvp.core.api_resources import MEMBERS
from gtvp.core.gating import GatingError, admitted_level
from gtvp.core.trust import member_view
from gtvp.runtime import Runtime

log = logging.getLogger("gtvp.verdict_uses")
SPEND_RETRY = dt.timedelta(seconds=2)
"""When a member whose spend failed is looked at again (its owed uses spent then)."""


def gated_level(vmi: Mapping[str, Any]) -> int | None:
    """The level a VMI was admitted with (its label or its trust selector, the higher)."""
    try:
        return admitted_level(
            (vmi.get("metadata") or {}).get("labels") or {},
            (vmi.get("spec") or {}).get("nodeSelector") or {},
        )
    except GatingError:
        return 9  # an unreadable level is treated as the strictest


SPEND_ATTEMPTS = 8


async def spend_use(rt: Runtime, name: str, uses: int = 1) -> None:
    """`uses` decisions backed by this member's verdict: `usesLeft` - `uses` (not below 0),
    written only if `usesLeft` is still as read (a JSON Patch `test`). Another replica's
    spend, or a new verdict, in between makes the write fail; the member is read again and
    the uses spent on what is there now, so no use is spent twice and none is lost. Not
    conditional on the Member's resourceVersion: root on the host rewriting its agent's
    status without pause would otherwise make every spend fail, and its verdict back
    decisions without end. Spends of this replica go one at a time (`spend_lock`: racing
    each other they would run out of attempts), but not under the member's judgement lock:
    the `test` keeps a spend right beside a verdict written meanwhile (whose own write
    tests `usesLeft` too), and a judgement that spends (a migration judged while its
    target is looked at, under that member's lock, or another's) must not wait for a lock
    its own task, or one waiting on it, holds."""
    async with rt.attestation.spend_lock(name):
        left = await _spend_on_latest(rt, name, uses)
    _look_when_spent(rt, name, left)


def _look_when_spent(rt: Runtime, name: str, left: int | None) -> None:
    """A verdict with no use left is looked at again at once (a fresh quote is asked)."""
    if left is not None and left <= 0:
        rt.schedule.schedule(name, dt.timedelta(0))


async def _spend_on_latest(rt: Runtime, name: str, uses: int = 1) -> int | None:
    """The uses left after spending (None: nothing to spend or the member is gone)."""
    body = rt.view.members.get(name)
    for _ in range(SPEND_ATTEMPTS):
        if body is None:
            return None
        left = int((((body.get("status") or {}).get("trust") or {}).get("usesLeft", 0)) or 0)
        if left <= 0:
            return None
        path = "/status/trust/usesLeft"
        ops = [
            {"op": "test", "path": path, "value": left},
            {"op": "replace", "path": path, "value": max(left - uses, 0)},
        ]
        try:
            written = await asyncio.to_thread(
                kube.json_patch_status, rt.clients, MEMBERS, name, ops
            )
        except Exception as exc:
            if not kube.is_failed_test(exc):
                raise
            body = await asyncio.to_thread(kube.get_if_present, rt.clients, MEMBERS, name)
            if body is not None:
                rt.view.remember_member(name, body)
            continue
        rt.view.remember_member(name, dict(written) if isinstance(written, Mapping) else body)
        return max(left - uses, 0)
    return await _spend_all(rt, name)


async def _spend_all(rt: Runtime, name: str) -> int:
    """A spend that lost the race `SPEND_ATTEMPTS` times: its use cannot be counted, so the
    verdict backs nothing more (`usesLeft` 0, unconditional; a verdict written meanwhile
    loses its uses too, which only asks for a fresh quote) and is looked at again at once.
    Fails closed: dropping the spend would let the verdict back one decision more."""
    log.warning(
        "member %s: could not spend a verdict use (its usesLeft changed %d times meanwhile):"
        " the verdict is spent and fresh evidence asked for",
        name,
        SPEND_ATTEMPTS,
    )
    ops = [{"op": "replace", "path": "/status/trust/usesLeft", "value": 0}]
    try:
        written = await asyncio.to_thread(kube.json_patch_status, rt.clients, MEMBERS, name, ops)
    except Exception as exc:  # noqa: BLE001 - no verdict left to spend (or gone): looked at
        log.warning("member %s: spending its whole verdict failed: %s", name, exc)
        return 0
    if isinstance(written, Mapping):
        rt.view.remember_member(name, dict(written))
    return 0


HANDOVER_WINDOW = 30.0
"""Seconds a start seen by a replica that did not hold its member's shard stays owed: a
replica that takes the shard within them spends it (the shard may have had no holder
then: after a crash, about a lease duration; a start the former holder spent too is spent
twice, which only asks for a fresh quote sooner)."""


async def judge_vmi_start(rt: Runtime, body: Mapping[str, Any], event_type: str) -> None:
    """A gated VMI that KubeVirt scheduled onto a member spends one use of its verdict
    (each start is a decision that relies on it); once per VMI, by the replica holding
    the member's shard (every replica marks it, so a later holder does not spend again;
    one that did not hold it keeps it owed for `HANDOVER_WINDOW`: `spend_owed`)."""
    meta = body.get("metadata") or {}
    node = (body.get("status") or {}).get("nodeName")
    uid = str(meta.get("uid", ""))
    if event_type == "DELETED" or not node or not uid or uid in rt.spent_starts:
        return
    level = gated_level(body)
    if level is None:
        return
    rt.spent_starts.add(uid)
    now = dt.datetime.now(dt.UTC)
    if str(node) not in rt.view.members or not member_view(
        str(node), rt.view.verdict_of(str(node)), rt.view.node_boot_id(str(node))
    ).usable(now, level):
        # started where no fresh verdict of its level stands (a Node whose labels outlived
        # its verdict or its Member): its host is looked at now, not at its next turn
        rt.schedule.schedule(str(node), dt.timedelta(0))
    if rt.coordination.holds(str(node)):  # once across replicas: the member's shard holder
        try:
            await spend_use(rt, str(node))
        except Exception as exc:  # noqa: BLE001 - owed, spent at the member's next look
            log.warning("member %s: spending a use for a start failed (%s); owed", node, exc)
            owe(rt, uid, str(node))
        return
    _forget_old_owed(rt)
    rt.unheld_starts[uid] = (str(node), time.monotonic())


def _forget_old_owed(rt: Runtime) -> None:
    """Drop the owed starts seen longer than `HANDOVER_WINDOW` ago (their holder spent
    them); this replica's own failed spends (`failed_spends`) stay until spent."""
    now_m = time.monotonic()
    for owed, (_, seen) in list(rt.unheld_starts.items()):
        if now_m - seen > HANDOVER_WINDOW:
            del rt.unheld_starts[owed]


def owe(rt: Runtime, key: str, name: str) -> None:
    """A use of member `name` this replica failed to spend: owed until spent, at the
    member's next look (soon)."""
    rt.failed_spends[key] = name
    rt.schedule.schedule_by(name, SPEND_RETRY)


def owes(rt: Runtime, name: str) -> bool:
    """Whether this replica failed to spend uses of member `name` (spent at its next look)."""
    return name in rt.failed_spends.values()


async def spend_owed(rt: Runtime, name: str) -> None:
    """Spend the uses of the starts on member `name` that this replica saw, recently, while
    another held (or nobody held) its shard, now that it holds it: a start during a
    handover is spent by someone (still owed if the spend fails: at the next look)."""
    _forget_old_owed(rt)
    owed = [uid for uid, (node, _) in rt.unheld_starts.items() if node == name]
    owed += [key for key, node in rt.failed_spends.items() if node == name]
    if not owed or not rt.coordination.holds(name):
        return
    try:
        await spend_use(rt, name, len(owed))
    except Exception as exc:  # noqa: BLE001 - kept owed; the member's judgement goes on
        log.warning("member %s: spending %d owed use(s) failed: %s", name, len(owed), exc)
        for key in owed:  # now this replica's own failure: owed until spent
            rt.unheld_starts.pop(key, None)
            owe(rt, key, name)
        return
    for key in owed:
        rt.unheld_starts.pop(key, None)
        rt.failed_spends.pop(key, None)


def mark_started(rt: Runtime, bodies: list[dict[str, Any]]) -> None:
    """VMIs already running when the operator starts spent their use before (no recount)."""
    for body in bodies:
        uid = (body.get("metadata") or {}).get("uid")
        if uid and (body.get("status") or {}).get("phase") == "Running":
            rt.spent_starts.add(uid)
