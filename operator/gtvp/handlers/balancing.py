"""The balancer's shell: every few seconds plan with `gtvp.core.balance`, start migrations.

Reads only the operator's in-memory view (members, Nodes, boxes, VMIs, migrations); the
cool-down survives a restart because it is read from the balancing migrations themselves
(their creation time), and the overload clock simply starts again. A move waits until its
target has pre-fetched the box's components it lacks (`handlers.prefetch`, bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging

from kubernetes.client.exceptions import ApiException

from gtvp import kube
from gtvp.cluster_view import Key
from gtvp.core.api_resources import LAZY_BOXES, MIGRATIONS
from gtvp.core.balance import BALANCE_LABEL, BalancePlan, Move, PlacedBox, plan_balance
from gtvp.core.boxes import someone_elses
from gtvp.core.evacuation import migration_view
from gtvp.core.policy import Policy
from gtvp.core.timestamps import parse_ts
from gtvp.handlers import prefetch
from gtvp.handlers.box_hosts import box_requests, hosts
from gtvp.handlers.start_each import start_each
from gtvp.handlers.verdict_uses import gated_level
from gtvp.metrics import METRICS
from gtvp.runtime import Runtime

log = logging.getLogger("gtvp.balancing")
PERIOD = 5.0
IDLE_PERIOD = 30.0


def placed_boxes(rt: Runtime) -> list[PlacedBox]:
    """Boxes whose VMI runs on a node, with their requests and resolved components."""
    out = []
    for key, box in list(rt.view.boxes.items()):
        vmi = rt.view.vmis.get(key) or {}
        status = vmi.get("status") or {}
        node = status.get("nodeName")
        if not node or status.get("phase") != "Running":
            continue
        if someone_elses(str(box["metadata"].get("uid", "")), rt.view.vms.get(key), vmi):
            continue  # a VM of the box's name that is not the box's is not moved as one
        cpu, mem = box_requests(rt, key, box)
        resolved = (box.get("status") or {}).get("resolved") or []
        parts = tuple((str(r.get("digest", "")), int(r.get("sizeBytes", 0) or 0)) for r in resolved)
        # the level its VMI was admitted with where that is higher (raised live through its
        # trust selector): a move to a lower member would only be refused by admission
        level = max(int((box.get("spec") or {}).get("level", 1) or 1), gated_level(vmi) or 0)
        out.append(PlacedBox(key[0], key[1], str(node), level, cpu, mem, parts))
    return out


def last_moved(rt: Runtime) -> dict[Key, dt.datetime]:
    """When each box last started a balancing migration (from the migrations themselves)."""
    out: dict[Key, dt.datetime] = {}
    for (ns, _), m in list(rt.view.migrations.items()):
        meta = m.get("metadata") or {}
        if BALANCE_LABEL not in (meta.get("labels") or {}):
            continue
        at = parse_ts(meta.get("creationTimestamp"))
        key = (ns, str((m.get("spec") or {}).get("vmiName", "")))
        if at is not None and (key not in out or at > out[key]):
            out[key] = at
    return out


def plan_now(rt: Runtime, policy: Policy, now: dt.datetime) -> BalancePlan:
    """Plan from the operator's view (blocking: tens of ms at 10,000 members, run in a thread)."""
    return plan_balance(
        hosts=hosts(rt, now),
        boxes=placed_boxes(rt),
        migrations=[migration_view(m) for m in list(rt.view.migrations.values())],
        last_moved=last_moved(rt),
        over_since=rt.balance.over_since,
        settings=policy.balancing,
        limits=policy.migration,
        now=now,
    )


async def balance_once(rt: Runtime, now: dt.datetime | None = None) -> list[Move]:
    policy = rt.view.policy
    if policy is None:
        return []
    now = now or dt.datetime.now(dt.UTC)
    plan = await asyncio.to_thread(plan_now, rt, policy, now)
    rt.balance.over_since = plan.over_since
    METRICS.overloaded.set(len(plan.over_since))
    for source, why in plan.stuck.items():
        if rt.balance.said.get(source) != why:
            log.warning("member %s stays overloaded: %s", source, why)
    rt.balance.said = dict(plan.stuck)
    await start_each(
        plan.moves,
        lambda move: _start(rt, move),
        lambda move: f"balancing move of {move.box.namespace}/{move.box.name}",
    )
    return list(plan.moves)


async def _start(rt: Runtime, move: Move) -> None:
    box = move.box
    fetch = await prefetch.hold(rt, move.migration, "balancing")
    if prefetch.waits(fetch):
        return  # the target fetches the box's components first: the next round looks again
    try:
        created = await asyncio.to_thread(
            kube.create_unless_present, rt.clients, MIGRATIONS, move.migration
        )
    except ApiException as exc:
        log.warning(
            "balancing %s/%s to %s refused: %s %s",
            box.namespace,
            box.name,
            move.target,
            exc.status,
            exc.reason,
        )
        return
    if not created:  # the name exists: a round on a view without it; no move counted twice
        return
    await prefetch.started(rt, move.migration, fetch)
    METRICS.balancing_moves.inc()
    message = f"moving to {move.target}: {move.reason}"
    log.info("LazyBox %s/%s: %s", box.namespace, box.name, message)
    with contextlib.suppress(ApiException):
        await asyncio.to_thread(
            kube.post_object_event,
            rt.clients,
            LAZY_BOXES,
            rt.view.boxes.get((box.namespace, box.name)) or {},
            name=box.name,
            namespace=box.namespace,
            type_="Normal",
            reason="Balancing",
            message=message,
        )


async def balance_loop(rt: Runtime, period: float = PERIOD) -> None:
    """Plan every `period` seconds until `stop` (every IDLE_PERIOD while balancing is off:
    then only `gtvp_members_overloaded` is kept current). A policy that turns balancing on
    is noticed within a second."""
    loop = asyncio.get_running_loop()
    last = loop.time()
    stop = rt.stop
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        if stop.is_set():
            return
        policy = rt.view.policy
        on = policy is not None and policy.balancing.enabled
        if loop.time() - last < (period if on else IDLE_PERIOD) or not rt.coordination.leads():
            continue
        last = loop.time()
        try:
            await balance_once(rt)
        except Exception:  # the next round tries again
            log.exception("balancing round failed")
