"""gtvp as KubeVirt's external eviction controller: drains finish for gated External VMIs.

On `kubectl drain`, KubeVirt's virt-api refuses to evict the virt-launcher pod of a VMI with
`evictionStrategy: External` (429: drain retries) and sets the VMI's
`status.evacuationNodeName`; KubeVirt itself then does nothing more for it. Lazy Boxes are
composed with External, and gated VMs may choose it, so this module is the controller that
finishes the job: it live-migrates each such VMI (`core.evacuation.plan_drains`: Trusted,
schedulable targets of a sufficient level, the policy's migration limits, deterministic
names) and virt-handler clears the field once the VMI runs on its target, after which the
drain's next eviction attempt succeeds.

Woken by VMI, migration, member and node events, it plans again every PERIOD seconds while a
drain is outstanding (and rescans every VMI every IDLE_PERIOD, which also covers a restart).
A VMI no member can take gets a Warning Event `DrainWaiting` with the reason (on the VMI,
and on its LazyBox), said once per reason, not every round. A box goes to the eligible
member caching most of its components, once that member has pre-fetched the rest
(`handlers.prefetch`). A drain migration KubeVirt has not scheduled yet whose target was
cordoned, lost trust or filled up since gtvp planned it is deleted (Event `DrainRetarget`)
and planned again, rather than left pending on a node that takes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

from kubernetes.client.exceptions import ApiException

from gtvp import kube
from gtvp.cluster_view import Key, key_of
from gtvp.core.api_resources import LAZY_BOXES, MIGRATIONS, VIRTUAL_MACHINE_INSTANCES
from gtvp.core.components import image_digests
from gtvp.core.evacuation import (
    DRAIN_LABEL,
    DrainPlan,
    DrainTarget,
    Evacuee,
    Retarget,
    cordoned,
    drain_evacuee,
    drain_history,
    is_planned_drain,
    migration_view,
    plan_drains,
)
from gtvp.core.trust import member_view
from gtvp.handlers import prefetch
from gtvp.handlers.box_hosts import target_room
from gtvp.handlers.evacuation import avoided, cancel_migration
from gtvp.handlers.start_each import start_each
from gtvp.metrics import METRICS
from gtvp.runtime import Runtime

log = logging.getLogger("gtvp.drains")
PERIOD = 2.0  # plan again this often while a drain is outstanding
DEBOUNCE = 0.5  # at most one event-driven plan per this many seconds
IDLE_PERIOD = 30.0  # rescan every VMI this often (a missed event, a restarted operator)


def observe_vmi(rt: Runtime, body: dict[str, Any], event_type: str) -> None:
    """Track the VMIs KubeVirt marked for evacuation; wake the loop when that changes."""
    key, memory = key_of(body), rt.drains
    marked = event_type != "DELETED" and bool((body.get("status") or {}).get("evacuationNodeName"))
    if marked:
        memory.marked.add(key)
        memory.wake.set()
    elif key in memory.marked:
        memory.marked.discard(key)
        memory.wake.set()


def observe_migration(rt: Runtime, body: dict[str, Any], event_type: str) -> None:
    """Count finished drain migrations; a migration's progress frees limits: plan again."""
    meta = body.get("metadata") or {}
    uid = str(meta.get("uid", ""))
    labels = meta.get("labels") or {}
    phase = (body.get("status") or {}).get("phase")
    finished = rt.drains.finished
    if DRAIN_LABEL in labels and phase == "Succeeded" and uid and uid not in finished:
        finished.add(uid)
        METRICS.drain_migrations.labels("finished").inc()
    if event_type == "DELETED":
        finished.discard(uid)
    touch(rt)


def touch(rt: Runtime) -> None:
    """Something a drain plan depends on changed (a member, a Node, a migration)."""
    if rt.drains.marked:
        rt.drains.wake.set()


def rescan(rt: Runtime) -> None:
    rt.drains.marked = {
        key
        for key, body in list(rt.view.vmis.items())
        if (body.get("status") or {}).get("evacuationNodeName")
    }


def drain_targets(rt: Runtime, now: dt.datetime) -> list[DrainTarget]:
    """Every member with a Node: its level, whether it may receive now, whether cordoned."""
    out = []
    for name in list(rt.view.members):
        node = rt.view.nodes.get(name)
        if node is None:
            continue
        # a new placement: by what its Node's labels say too, as admission judges it
        verdict = rt.view.verdict_of(name, by_labels=True)
        view = member_view(name, verdict, rt.view.node_boot_id(name))
        images = image_digests((node.get("status") or {}).get("images"))
        out.append(DrainTarget(name, view.level, view.usable(now, 1), cordoned(node), images))
    return out


def plan_now(rt: Runtime, now: dt.datetime) -> tuple[DrainPlan, dict[Key, Evacuee]]:
    """Plan from the operator's view (blocking; run it in a thread)."""
    policy = rt.view.policy
    vmis = rt.view.vmis
    found = [
        dataclasses.replace(e, parts=prefetch.box_parts(rt.view.boxes.get(k) or {})) if e.box else e
        for k in list(rt.drains.marked)
        if (e := drain_evacuee(vmis.get(k) or {})) is not None
    ]
    if policy is None or not found:
        return DrainPlan((), {}), {}
    raw = list(rt.view.migrations.values())
    migrations = [migration_view(m) for m in raw]
    node_of = {
        key: str(node)
        for key, body in list(vmis.items())
        if (node := (body.get("status") or {}).get("nodeName"))
    }
    targets = drain_targets(rt, now)
    plan = plan_drains(
        evacuees=found,
        migrations=migrations,
        history=drain_history(raw),
        node_of=node_of,
        limits=policy.migration,
        targets=targets,
        room=target_room(rt, migrations),
        allowed=_own_constraints(rt, found, targets),
        avoid=avoided(rt),
    )
    return plan, {(e.namespace, e.name): e for e in found}


async def drain_once(rt: Runtime, now: dt.datetime | None = None) -> DrainPlan:
    """One round: start the planned migrations, report the VMIs that wait."""
    plan, evacuees = await asyncio.to_thread(plan_now, rt, now or dt.datetime.now(dt.UTC))
    for stale in plan.cancel:
        await _cancel(rt, stale, evacuees[(stale.namespace, stale.vmi)])
    await start_each(
        plan.migrations,
        lambda obj: _start(
            rt, obj, evacuees[(obj["metadata"]["namespace"], obj["spec"]["vmiName"])]
        ),
        lambda obj: f"drain migration {obj['metadata']['name']}",
    )
    for key, why in plan.waiting.items():
        if rt.drains.said.get(key) != why:
            await _say(rt, evacuees[key], "Warning", "DrainWaiting", why)
    rt.drains.said = dict(plan.waiting)
    METRICS.drain_waiting.set(len(plan.waiting))
    return plan


async def _start(rt: Runtime, obj: dict[str, Any], vmi: Evacuee) -> None:
    name = obj["metadata"]["name"]
    target = obj["spec"]["addedNodeSelector"].get("kubernetes.io/hostname")
    fetch = await prefetch.hold(rt, obj, "drain")
    if prefetch.waits(fetch):
        return  # the target fetches the box's components first: the next round looks again
    try:
        started = await asyncio.to_thread(kube.create_unless_present, rt.clients, MIGRATIONS, obj)
        held = (
            None
            if started
            else await asyncio.to_thread(
                kube.get_if_present, rt.clients, MIGRATIONS, name, vmi.namespace
            )
        )
    except ApiException as exc:
        log.warning(
            "drain of %s: could not start migration %s/%s: %s %s",
            vmi.node,
            vmi.namespace,
            name,
            exc.status,
            exc.reason,
        )
        return
    if not started:
        if held is None:
            return  # gone again: the next plan creates it
        rt.view.observe_migration(held, "ADDED")  # the next plan sees the name taken
        if is_planned_drain(held, obj):  # started before (this plan, before a restart)
            await prefetch.started(rt, obj, fetch)
        else:
            log.warning(
                "drain of %s: migration name %s/%s is held by a migration gtvp did not start "
                "for it; the next plan uses another name",
                vmi.node,
                vmi.namespace,
                name,
            )
        return
    rt.view.observe_migration(obj, "ADDED")  # the next plan counts it before its event
    await prefetch.started(rt, obj, fetch)
    METRICS.drain_migrations.labels("started").inc()
    message = f"node {vmi.node} is being drained: live-migrating to {target} (migration {name})"
    await _say(rt, vmi, "Normal", "DrainMigration", message)


async def _cancel(rt: Runtime, stale: Retarget, vmi: Evacuee) -> None:
    """Delete a drain migration whose target can no longer take the VMI (KubeVirt aborts a
    migration deleted before it completes: the VM stays where it is); the next plan picks
    another target or says why the VMI waits."""
    if not await cancel_migration(rt, stale, f"drain of {vmi.node}"):
        return
    METRICS.drain_migrations.labels("cancelled").inc()
    message = f"node {vmi.node} is being drained: cancelled migration {stale.name}, {stale.why}"
    await _say(rt, vmi, "Warning", "DrainRetarget", message)
    rt.drains.wake.set()


async def _say(rt: Runtime, vmi: Evacuee, type_: str, reason: str, message: str) -> None:
    """Log and record an Event on the VMI, and on its LazyBox when it is a box's."""
    logger = log.warning if type_ == "Warning" else log.info
    logger("%s/%s: %s", vmi.namespace, vmi.name, message)
    key = (vmi.namespace, vmi.name)
    about = [(VIRTUAL_MACHINE_INSTANCES, rt.view.vmis.get(key) or {})]
    if vmi.box:
        about.append((LAZY_BOXES, rt.view.boxes.get(key) or {}))
    for res, obj in about:
        with contextlib.suppress(ApiException):
            await asyncio.to_thread(
                kube.post_object_event,
                rt.clients,
                res,
                obj,
                name=vmi.name,
                namespace=vmi.namespace,
                type_=type_,
                reason=reason,
                message=message,
            )


async def drain_loop(rt: Runtime, period: float = PERIOD) -> None:
    """Plan when woken (at most every DEBOUNCE s) and every `period` s while a drain is
    outstanding; rescan every VMI every IDLE_PERIOD s. Notices `stop` within a second."""
    loop = asyncio.get_running_loop()
    memory, stop = rt.drains, rt.stop
    memory.wake = asyncio.Event()  # bound to this loop (events may have set the old one)
    rescan(rt)
    last_plan = last_scan = loop.time()
    pending = bool(memory.marked)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(memory.wake.wait(), timeout=DEBOUNCE)
        pending = pending or memory.wake.is_set()
        memory.wake.clear()
        now = loop.time()
        if now - last_scan >= IDLE_PERIOD:
            rescan(rt)
            last_scan, pending = now, pending or bool(memory.marked)
        due = (pending and now - last_plan >= DEBOUNCE) or (
            memory.marked and now - last_plan >= period
        )
        if not due or stop.is_set() or not rt.coordination.leads():
            continue
        last_plan, pending = now, False
        try:
            await drain_once(rt)
        except Exception:  # the next round tries again
            log.exception("drain round failed")


def _own_constraints(
    rt: Runtime, evacuees: Sequence[Evacuee], targets: Sequence[DrainTarget]
) -> dict[tuple[str, str], frozenset[str]]:
    """For each VMI whose own nodeSelector or required node affinity names nodes, the
    members those allow: a drain pinned elsewhere could never be scheduled."""
    names = [t.name for t in targets]
    pins = {(e.namespace, e.name): rt.view.pinnable((e.namespace, e.name), names) for e in evacuees}
    return {key: among for key, among in pins.items() if among is not None}
