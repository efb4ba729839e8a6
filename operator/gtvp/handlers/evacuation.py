"""Evacuation: move gated VMs off members that may no longer hold them, abort migrations to
members that lost trust.

- `evacuate(member)` creates the migrations `plan_evacuation` asks for, or stops the VMs when
  the member's policy says Stop. Names are deterministic: one that exists already is read
  back, and only gtvp's own migration of that VMI, member and attempt counts as started by
  a previous run; anything else holding the name goes into the view, so the next plan (a
  second later) picks another name. A VMI whose last evacuation migrations failed
  (`evacuation_stalled`) waits with a Warning Event instead of a new one every second;
- a migration seen `Scheduled` or later that may be heading for a member that may not hold
  the VMI's level (its recorded target, its pin, or the node of the target launcher pod
  KubeVirt made for it: `core.inflight`) is aborted by deleting it; its first judgement
  spends one use of its target's verdict, which later events do not ask for again;
- an evacuation migration not scheduled yet whose pinned target has since stopped being a
  usable member of the VMI's level or filled up (`stale_evacuations`) is cancelled (Event
  `EvacuationRetarget`) and planned again where the VMI fits: left alone, KubeVirt would fail
  it after minutes, and three failures stall the evacuation;
- a Lazy Box goes to the usable target caching most of its components, and its migration
  waits until that target has pre-fetched the ones it lacks (`handlers.prefetch`, at most
  the bound: the next plan, a second later, looks again);
- a Lazy Box whose own vTPM evidence failed on a trusted member (`evacuate_unattested`) is
  evacuated the same way, alone, until it has left that member.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from kubernetes.client.exceptions import ApiException

from gtvp import kube
from gtvp.box_attestation import where_runs
from gtvp.cluster_view import Key
from gtvp.core.api_resources import MIGRATIONS, VIRTUAL_MACHINE_INSTANCES, VIRTUAL_MACHINES
from gtvp.core.boxattest import Where, acted_this_boot, must_leave
from gtvp.core.components import image_digests
from gtvp.core.compose import BOX_LABEL
from gtvp.core.evacuation import (
    EVACUATION_LABEL,
    Migration,
    Retarget,
    Vmi,
    cannot_migrate,
    controlling_vm,
    cordoned,
    evacuation_bounds,
    evacuation_stalled,
    foreign_holds,
    is_planned_migration,
    migration_view,
    past_deadline,
    plan_evacuation,
    retargeted_from,
    stale_evacuations,
    unscheduled_pin,
    untrusted_actions,
)
from gtvp.core.footprint import FINISHED, vmi_requests
from gtvp.core.gating import box_level
from gtvp.core.inflight import heading_for, judge_in_flight, spend_on
from gtvp.core.launchers import settled_until
from gtvp.core.migration_budget import tenant_share
from gtvp.core.policy import DEFAULT_MIGRATE_WITHIN, Level, MigrationLimits
from gtvp.core.preemption import TENANT_HOLD, preemption
from gtvp.core.target_room import TargetRoom, shortfall
from gtvp.core.timestamps import format_ts, human_duration, parse_ts
from gtvp.core.trust import member_view
from gtvp.handlers import prefetch
from gtvp.handlers.box_hosts import target_room
from gtvp.handlers.start_each import start_each
from gtvp.handlers.verdict_uses import gated_level, owe, spend_use
from gtvp.metrics import METRICS
from gtvp.runtime import Runtime

log = logging.getLogger("gtvp.evacuation")
RUNNING_PHASES = ("Scheduled", "PreparingTarget", "TargetReady", "Running")


def _gated_on(rt: Runtime, member: str, keep_level: int) -> list[Vmi]:
    """The gated VMIs on `member` that need more than `keep_level` (a Lazy Box's with its
    components, so that it goes where they are cached); a VMI that has ended (Succeeded,
    Failed) runs nowhere: nothing to move or stop. A VMI held on `member` only by a launcher
    pod is left alone for a moment after gtvp's own migration brought it away
    (`launchers.settled_until`: its source pod is still ending)."""
    now = dt.datetime.now(dt.UTC)
    return [
        Vmi(ns, name, member, lvl, _parts(rt, ns, name, body), *vmi_requests(body), _uid(body))
        for (ns, name) in sorted(rt.view.on_node.get(member, ()))
        if (lvl := gated_level(body := rt.view.vmis.get((ns, name)) or {})) is not None
        and lvl > keep_level
        and (body.get("status") or {}).get("phase") not in FINISHED
        and not _moved_away(rt, (ns, name), member, now)
    ]


def _uid(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("uid") or "")


def _moved_away(rt: Runtime, key: tuple[str, str], member: str, now: dt.datetime) -> bool:
    """Whether the VMI is on `member` only by a source pod still ending after gtvp's own
    migration brought it away (`launchers.settled_until`); the member is looked at again
    when that ends."""
    if rt.view.node_of.get(key) == member:
        return False  # its status says it runs there
    ns = key[0]
    mine = (m for (mns, _), m in list(rt.view.migrations.items()) if mns == ns)
    until = settled_until(mine, rt.view.vmis.get(key) or {}, member, now)
    if until is None:
        return False
    rt.schedule.schedule_by(member, until - now + dt.timedelta(seconds=1))
    return True


def _parts(rt: Runtime, ns: str, name: str, vmi: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    if BOX_LABEL not in ((vmi.get("metadata") or {}).get("labels") or {}):
        return ()
    return prefetch.box_parts(rt.view.boxes.get((ns, name)) or {})


def node_images(rt: Runtime, names: list[str]) -> dict[str, frozenset[str]]:
    """The digests each named Node's status.images lists."""
    return {
        n: image_digests(((rt.view.nodes.get(n) or {}).get("status") or {}).get("images"))
        for n in names
    }


async def evacuate(
    rt: Runtime,
    member: str,
    incident: str,
    on_untrusted: str,
    keep_level: int = 0,
    *,
    covered_level: int | None = None,
    since: Mapping[int, dt.datetime] | None = None,
    after: str = "it lost trust",
    stop_unmovable: bool = True,
) -> int:
    """Act on the gated VMIs on `member` that need more than `keep_level` (0: the member is
    not trusted, every gated VMI must go): `on_untrusted` for each, or with `covered_level`
    (an untrusted member's policy level) as `untrusted_actions` says; a VMI to migrate
    whose level's `migrateWithin` has passed since the member stopped holding that level
    (`since`: level -> time, its `status.belowSince`) is stopped instead. With no policy in
    force nothing verifies any member: every gated VMI on it is stopped (fail closed).
    Returns how many of them are still on it to be migrated, or to be stopped again (a stop
    that failed): the caller looks again soon while there are any."""
    policy = rt.view.policy
    on_member = _gated_on(rt, member, keep_level)
    if not on_member:
        forget(rt, member)
    if policy is None:
        return await _stop_without_policy(rt, member, on_member, since or {})
    member_level = None
    if covered_level is None:
        actions = {on_untrusted: on_member}
    else:
        own = {lv.level: lv.on_untrusted for lv in policy.levels}
        actions = untrusted_actions(on_member, covered_level, on_untrusted, own)
        member_level = policy.level(covered_level)
    left = 0
    for action, vmis in actions.items():
        left += await _act(
            rt, member, incident, action, vmis, since=since, after=after,
            stop_unmovable=stop_unmovable, member_level=member_level,
        )  # fmt: skip
    return left


async def _stop_without_policy(
    rt: Runtime, member: str, on_member: list[Vmi], since: Mapping[int, dt.datetime]
) -> int:
    """No SecurityPolicy in force (deleted, or none of its generations accepted): every
    member is Untrusted (`NoPolicy`), no level says what to do and nothing can move. Each
    gated VMI on `member` is stopped once `DEFAULT_MIGRATE_WITHIN` has passed since the
    member stopped holding its level (`since`) and since the policy was lost, the later
    (the bound no Migrate level waits past: time to put a policy back after a mistake,
    even for a VM on a member that has held less for long). Its VMI is deleted but its VM
    not halted:
    KubeVirt starts it again, and admission lets it start once a policy is accepted and a
    member of its level is Trusted. How many stops failed."""
    now = dt.datetime.now(dt.UTC)
    if rt.view.policy_lost_at is None:  # none seen lost (started without one): from now
        rt.view.policy_lost_at = now
    lost = rt.view.policy_lost_at
    due = {v: max(since.get(v.level, lost), lost) + DEFAULT_MIGRATE_WITHIN for v in on_member}
    waiting = [v for v in on_member if due[v] > now]
    if waiting:  # looked at again when the first of them is due
        rt.schedule.schedule_by(member, min(due[v] for v in waiting) - now)
    await _say_no_policy(rt, member, waiting, due)
    said = [
        (
            vmi,
            f"on {member}, which nothing verifies: no SecurityPolicy has been in force for "
            f"{human_duration(DEFAULT_MIGRATE_WITHIN)}; gtvp stops it (its VM starts again "
            "once a policy is accepted and a member of its level is Trusted)",
        )
        for vmi in on_member
        if due[vmi] <= now
    ]
    return await _stop_saying_once(
        rt, f"{member}#nopolicy", said, reason="NoPolicy",
        count=lambda: METRICS.evacuation("stopped-no-policy"), why="no policy is in force",
        halt=False,
    )  # fmt: skip


async def _say_no_policy(
    rt: Runtime, member: str, waiting: list[Vmi], due: Mapping[Vmi, dt.datetime]
) -> None:
    """A Warning, once per VMI, that it is stopped at `due` unless a policy is back."""
    newly = _not_said(rt, f"{member}#nopolicy-wait", (f"{v.namespace}/{v.name}" for v in waiting))
    for v in waiting:
        if f"{v.namespace}/{v.name}" not in newly:
            continue
        message = (
            f"on {member}, which nothing verifies: no SecurityPolicy is in force (NoPolicy); "
            f"gtvp stops the VM at {format_ts(due[v])} unless a policy is accepted by then"
        )
        log.warning("%s/%s %s", v.namespace, v.name, message)
        await _vmi_event(rt, (v.namespace, v.name), "Warning", "NoPolicy", message)


def _not_said(rt: Runtime, key: str, names: Iterable[str]) -> set[str]:
    """Say-once bookkeeping: the `names` not among those the last call under `key` had
    (said then); remembers these instead (none: `key` forgotten, a later wait said again)."""
    now = sorted(set(names))
    said = set(rt.evacuation.waiting.pop(key, ()))
    if now:
        rt.evacuation.waiting[key] = now
    return set(now) - said


def forget(rt: Runtime, topic: str) -> None:
    """Nothing waits under `topic` any more (its member is empty, its box left or is gone):
    drop what was said about it, so memory stays bounded and a new wait is said again."""
    for suffix in ("", "#failed", "#full", "#late", "#unmovable"):
        rt.evacuation.waiting.pop(f"{topic}{suffix}", None)


async def evacuate_unattested(rt: Runtime) -> None:
    """Apply its level's onUntrusted to each Lazy Box whose vTPM evidence failed where it
    runs (a mismatch, or overdue: `boxattest.must_leave`), as an evacuation of that one box
    off its member: planned, pre-fetched, its name checked, retried on the next pass until
    the box has left. The leader's box loop calls it on every full pass."""
    policy = rt.view.policy
    if policy is None:
        return
    boxes = {f"{ns}/{name}" for ns, name in rt.view.boxes}
    for topic in [t for t in rt.evacuation.waiting if "/" in t]:
        box_topic = topic.split("#", 1)[0]  # #failed, #full, #late, #unmovable
        if box_topic not in boxes:  # a box's topic; the box is gone
            forget(rt, box_topic)
    leaving: list[tuple[Key, dict[str, Any], Where, dict[str, Any]]] = []
    for (ns, name), box in sorted(rt.view.boxes.items()):
        where = where_runs(rt, (ns, name))
        att = (box.get("status") or {}).get("attestation") or {}
        if where is None or not must_leave(att, where):
            forget(rt, f"{ns}/{name}")
            continue
        leaving.append(((ns, name), box, where, att))
    tenants_moves = tenants_moving(rt) if leaving else frozenset()
    for (ns, name), box, where, att in leaving:
        vmi = rt.view.vmis.get((ns, name)) or {}
        level = gated_level(vmi) or box_level(box)
        lv = policy.level(level)
        action = lv.on_untrusted if lv is not None else "Stop"  # a level no longer defined
        # off the member it failed on, which gtvp still holds it on (`must_leave`), even
        # when its status names another now; not while only the source pod of gtvp's own
        # move off it is still ending (`_moved_away`: looked at again after that)
        member = str(att.get("actedOnMember") or where.member)
        if _moved_away(rt, (ns, name), member, dt.datetime.now(dt.UTC)):
            continue
        parts = _parts(rt, ns, name, vmi)
        uid = _uid(vmi) or where.vmi_uid  # the VMI the evidence failed for
        one = [Vmi(ns, name, member, level, parts, *vmi_requests(vmi), uid)]
        incident = f"attest-{where.vmi_uid[:8]}"
        acted = parse_ts(att.get("actedAt"))  # migrateWithin counts from the mismatch
        since = {level: acted} if acted is not None else {}
        await _act(rt, member, incident, action, one, topic=f"{ns}/{name}",
                   since=since, after="its vTPM evidence failed there",
                   tenants_moves=tenants_moves)  # fmt: skip


def tenants_moving(rt: Runtime) -> frozenset[Key]:
    """The boxes moved (or moving) for their own evidence on this boot: the tenants' doing,
    which shares part of the budget (`tenant_share`), counted whatever its state is now (an
    overdue box that answers once its move began must not free its share while that move
    still runs: found by a review)."""
    return frozenset(_acted_on(rt))


def tenants_own_moves(rt: Runtime) -> dict[Key, str]:
    """Of `tenants_moving`, the boxes whose member (the one their evidence failed on) still
    holds their level, with that member: their evacuation off it is the tenants' doing,
    which gives way to an evacuation of a member that lost trust (`core.preemption`); a box
    whose member lost trust too moves for that member's sake."""
    now = dt.datetime.now(dt.UTC)
    views = {m.name: m for m in rt.view.member_views()}
    return {
        key: member
        for key, (member, level) in _acted_on(rt).items()
        if (view := views.get(member)) is not None and view.usable(now, level)
    }


def _acted_on(rt: Runtime) -> dict[Key, tuple[str, int]]:
    """Box -> (the member its level's onUntrusted was acted on for on this boot, its level)."""
    out = {}
    for key, box in list(rt.view.boxes.items()):
        where = where_runs(rt, key)
        att = (box.get("status") or {}).get("attestation") or {}
        if where is not None and acted_this_boot(att, where):
            level = gated_level(rt.view.vmis.get(key) or {}) or box_level(box)
            out[key] = (str(att.get("actedOnMember") or where.member), level)
    return out


async def _act(
    rt: Runtime,
    member: str,
    incident: str,
    on_untrusted: str,
    on_member: list[Vmi],
    *,
    topic: str | None = None,
    since: Mapping[int, dt.datetime] | None = None,
    after: str = "it lost trust",
    stop_unmovable: bool = True,
    member_level: Level | None = None,
    tenants_moves: frozenset[Key] | None = None,
) -> int:
    """Move, stop or keep `on_member` (gated VMIs on `member`), as `on_untrusted` says;
    `topic`: the key its waiting messages are said once under (default: the member);
    `since`: per level, since when the member has held less (`after` says what happened
    then): a VMI still to move once its level's bound has passed (`migrateWithin`, by
    default `DEFAULT_MIGRATE_WITHIN`) is stopped, and (`stop_unmovable`) one KubeVirt says
    cannot live-migrate whose level sets no `migrateWithin`; `tenants_moves`: the VMIs
    whose own evidence makes them move, which share part of the budget
    (`migration_budget.tenant_share`). Returns how many are still to
    act on: under Migrate all of them (looked at again soon), under Stop those whose stop
    failed."""
    policy = rt.view.policy
    if policy is None or not on_member or on_untrusted == "Keep":
        return 0
    if on_untrusted == "Stop":
        done = [await asyncio.to_thread(_stop_vm, rt, vmi) for vmi in on_member]
        return done.count(False)
    left = len(on_member)
    topic = topic or member
    now = dt.datetime.now(dt.UTC)
    bounds = evacuation_bounds(policy.levels, member_level)
    late = past_deadline(on_member, since=since or {}, now=now, within=bounds.within)
    await _stop_late(rt, member, late, topic, after, source=bounds.source)
    stopped = {v for v, _ in late}
    # a level whose policy chose its migrateWithin waits that long; the default bound is no
    # one's choice, so what cannot move goes now; a member emptied for maintenance while
    # its verdict holds is no VM's danger
    unmovable = [
        (v, why)
        for v in on_member
        if v not in stopped
        and stop_unmovable
        and v.level not in bounds.chosen
        and (why := cannot_migrate(rt.view.vmis.get((v.namespace, v.name)) or {}, now))
    ]
    await _stop_unmovable(rt, member, unmovable, topic, after)
    stopped |= {v for v, _ in unmovable}
    on_member = [v for v in on_member if v not in stopped]
    if not on_member:
        return left
    members = rt.view.member_views()
    targets = [
        (m.name, m.level)
        for m in members
        if m.name != member
        and m.name in rt.view.nodes
        and m.usable(now, 1)
        and not cordoned(rt.view.nodes[m.name])
    ]
    allowed = _own_constraints(rt, on_member, targets)
    movable = [
        v
        for v in on_member
        if any(m.name != member and m.usable(now, v.level) for m in members)
        and allowed.get((v.namespace, v.name)) != frozenset()
    ]
    await _say_stuck(rt, member, topic, [v for v in on_member if v not in movable], allowed)
    migrations = await _release_foreign_holds(rt, member, movable, now)
    await _say_stalled(rt, member, movable, migrations, topic)
    room = await asyncio.to_thread(target_room, rt, migrations)
    for stale in stale_evacuations(
        member=member, vmis=on_member, migrations=migrations, targets=targets, room=room
    ):
        if await cancel_migration(rt, stale, f"evacuation of {member}"):
            METRICS.evacuation("cancelled")
            await _say_retarget(rt, member, stale)
    busy = {(m.namespace, m.vmi) for m in migrations if m.active}
    waiting = [v for v in movable if (v.namespace, v.name) not in busy]
    await _say_full(rt, member, waiting, targets=targets, room=room, topic=topic)
    images, avoid = node_images(rt, [name for name, _ in targets]), avoided(rt)

    def plan(about: Sequence[Migration], limits: MigrationLimits) -> list[dict[str, Any]]:
        return plan_evacuation(member=member, incident=incident, vmis=movable, migrations=about,
                               limits=limits, targets=targets, images=images, room=room.copy(),
                               allowed=allowed, avoid=avoid)  # fmt: skip

    if tenants_moves is None and stop_unmovable and waiting:  # a danger, not maintenance
        migrations = await _preempt(rt, member, plan)
    yielding = time.monotonic() < rt.evacuation.tenants_yield_until
    limits = (
        policy.migration
        if tenants_moves is None
        else tenant_share(policy.migration, migrations, tenants_moves, yielding=yielding)
    )
    await start_each(
        plan(migrations, limits),
        lambda obj: _start(rt, member, obj),
        lambda obj: f"evacuation {obj['metadata']['name']} off {member}",
    )
    return left


async def _preempt(
    rt: Runtime, member: str, plan: Callable[..., list[dict[str, Any]]]
) -> list[Migration]:
    """Give the evacuation of `member` (it lost trust, or its level dropped) the slot of a
    move a box's own evidence caused, when that slot is what holds it back, and keep the
    tenants' new moves back while the cluster limit does (`core.preemption`); the
    migrations the view holds then (without those cancelled earlier in the pass)."""
    policy = rt.view.policy
    migrations = [migration_view(m) for m in list(rt.view.migrations.values())]
    if policy is None:
        return migrations
    got = preemption(
        plan=plan,
        migrations=migrations,
        limits=policy.migration,
        tenants_moves=tenants_own_moves(rt),
    )
    if got.held:
        rt.evacuation.tenants_yield_until = time.monotonic() + TENANT_HOLD
    if got.delete is None or not await _delete_migration(rt, member, got.delete):
        return migrations
    METRICS.evacuation("preempted")
    return [migration_view(m) for m in list(rt.view.migrations.values())]


async def _say_stuck(
    rt: Runtime, member: str, topic: str, stuck: list[Vmi], allowed: Mapping[Key, frozenset[str]]
) -> None:
    """A warning (log, and an Event on each VMI), once per change, for the VMIs no Trusted
    member of their level (that their own constraints allow) can take yet."""
    names = sorted(f"{v.namespace}/{v.name}" for v in stuck)
    said = rt.evacuation.waiting.pop(topic, [])  # stuck again later: said again
    if names:
        rt.evacuation.waiting[topic] = names  # say it once, not every second
    if names and said != names:
        log.warning(
            "evacuation of %s waits: no trusted member of a sufficient level can take %s yet",
            member,
            ", ".join(names),
        )
    newly = set(names) - set(said)
    for v in stuck:
        if f"{v.namespace}/{v.name}" in newly:
            why = f"no Trusted member of level {v.level} or above can take it yet"
            if allowed.get((v.namespace, v.name)) == frozenset():
                why = (
                    f"no Trusted, uncordoned member of level {v.level} or above is one its own "
                    "nodeSelector or node affinity allows"
                )
            await _vmi_event(rt, (v.namespace, v.name), "Warning", "EvacuationWaiting",
                             f"evacuation off {member} waits: {why}")  # fmt: skip


def _own_constraints(
    rt: Runtime, vmis: Sequence[Vmi], targets: Sequence[tuple[str, int]]
) -> dict[Key, frozenset[str]]:
    """For each VMI whose own nodeSelector or required node affinity names nodes, the
    targets of its level those allow (empty: none, it waits unpinned instead of holding a
    migration slot with a pin that can never be scheduled)."""
    pins = {
        (v.namespace, v.name): rt.view.pinnable(
            (v.namespace, v.name), (n for n, level in targets if level >= v.level)
        )
        for v in vmis
    }
    return {key: among for key, among in pins.items() if among is not None}


async def _say_full(
    rt: Runtime,
    member: str,
    vmis: list[Vmi],
    *,
    targets: list[tuple[str, int]],
    room: TargetRoom,
    topic: str,
) -> None:
    """A warning (log, and an Event on the VMI), once per VMI until it no longer waits, for
    the VMIs (not migrating) that a target of their level exists for but none with room:
    they wait for room instead of being pinned where the scheduler cannot place them."""
    key = f"{topic}#full"
    full = sorted(
        f"{v.namespace}/{v.name}"
        for v in vmis
        if any(lvl >= v.level for _, lvl in targets)
        and not any(
            lvl >= v.level and room.fits(n, v.cpu_millis, v.memory_bytes) for n, lvl in targets
        )
    )
    newly = _not_said(rt, key, full)
    for v in vmis:
        if f"{v.namespace}/{v.name}" in newly:
            why = shortfall(v.cpu_millis, v.memory_bytes)
            log.warning("evacuation of %s/%s off %s waits: %s", v.namespace, v.name, member, why)
            await _vmi_event(rt, (v.namespace, v.name), "Warning", "EvacuationWaiting",
                             f"evacuation off {member} waits: {why}")  # fmt: skip


async def cancel_migration(rt: Runtime, stale: Retarget, doing: str) -> bool:
    """Delete a migration of gtvp's whose pinned target can no longer take its VMI, before
    KubeVirt scheduled it (a migration deleted before it completes is aborted: the VM stays
    where it is); the next plan re-targets it. Only the version the view holds now, and only
    while that one is still unscheduled: one KubeVirt scheduled since the plan (or that
    changed on the server meanwhile) is left to the next pass. False when nothing was
    deleted (a failure logged, with `doing`)."""
    key = (stale.namespace, stale.name)
    body = rt.view.migrations.get(key)
    if body is None or not unscheduled_pin(migration_view(body)):
        return False
    try:
        deleted = await asyncio.to_thread(kube.delete_unchanged, rt.clients, MIGRATIONS, body)
    except ApiException as exc:
        log.warning(
            "%s: could not cancel migration %s/%s: %s %s", doing, *key, exc.status, exc.reason
        )
        return False
    if deleted:
        rt.view.observe_migration(body, "DELETED")  # the next plan does not wait for it
        pinned = migration_view(body).pinned
        if pinned:  # tried after the others for a while (`least_failed`)
            memory = rt.evacuation.retargeted
            memory.setdefault((stale.namespace, stale.vmi), {})[pinned] = time.monotonic()
    return deleted


def avoided(rt: Runtime) -> dict[tuple[str, str], frozenset[str]]:
    """The targets each VMI's pinned migrations were cancelled from lately (older records
    forgotten). Called from a drain plan's thread too: works on a copy, and forgets by
    key (the loop may add records meanwhile)."""
    memory = rt.evacuation.retargeted
    copied = {key: dict(targets) for key, targets in list(memory.items())}
    got = retargeted_from(copied, time.monotonic())
    for key in copied.keys() - got.keys():
        memory.pop(key, None)
    return got


async def _release_foreign_holds(
    rt: Runtime, member: str, movable: list[Vmi], now: dt.datetime
) -> list[Migration]:
    """Delete the migrations gtvp did not start that hold `movable` VMIs on `member`, or
    KubeVirt's outbound migration slots of it (`foreign_holds`); the migrations the view
    holds then."""
    migrations = [migration_view(m) for m in list(rt.view.migrations.values())]
    here = list(rt.view.on_node.get(member, ()))  # its VMIs, ungated ones too
    holds = foreign_holds(movable, migrations, now, here)
    for held in holds:
        await _delete_migration(rt, member, held)
    if holds:  # the ones deleted are out of the view now
        migrations = [migration_view(m) for m in list(rt.view.migrations.values())]
    return migrations


async def _delete_migration(rt: Runtime, member: str, held: Retarget) -> bool:
    """Delete a migration that holds back the evacuation of `member`: one gtvp did not
    start that holds a VMI, unscheduled, on `member` which it must leave (`foreign_holds`),
    or a move a box's own evidence caused (`core.preemption`): by uid, whatever its owner
    changed since; the VMI is told why. False when nothing was deleted."""
    key = (held.namespace, held.name)
    body = rt.view.migrations.get(key)
    if body is None:
        return False
    try:
        deleted = await asyncio.to_thread(
            kube.delete_unchanged, rt.clients, MIGRATIONS, body, any_version=True
        )
    except ApiException as exc:
        log.warning("evacuation of %s: could not delete migration %s/%s: %s %s",
                    member, *key, exc.status, exc.reason)  # fmt: skip
        return False
    if not deleted:
        return False
    rt.view.observe_migration(body, "DELETED")
    message = f"evacuation of {member}: deleted migration {held.name}: {held.why}"
    log.warning("%s/%s: %s", held.namespace, held.vmi, message)
    await _vmi_event(rt, (held.namespace, held.vmi), "Warning", "EvacuationPreempted", message)
    return True


async def _say_retarget(rt: Runtime, member: str, stale: Retarget) -> None:
    message = f"evacuation of {member}: cancelled migration {stale.name}, {stale.why}"
    log.warning("%s/%s: %s", stale.namespace, stale.vmi, message)
    await _vmi_event(rt, (stale.namespace, stale.vmi), "Warning", "EvacuationRetarget", message)


async def _vmi_event(
    rt: Runtime, key: tuple[str, str], type_: str, reason: str, message: str
) -> None:
    """An Event on a VMI (best effort: `kube.post_event` logs what it could not record)."""
    await asyncio.to_thread(
        kube.post_object_event,
        rt.clients,
        VIRTUAL_MACHINE_INSTANCES,
        rt.view.vmis.get(key) or {},
        name=key[1],
        namespace=key[0],
        type_=type_,
        reason=reason,
        message=message,
    )


async def _say_stalled(
    rt: Runtime, member: str, vmis: list[Vmi], migrations: list[Migration], topic: str
) -> None:
    """A Warning (log and Event on the VMI) for each VMI whose evacuation migrations off
    `member` kept failing, once per change."""
    stalled = evacuation_stalled(member=member, vmis=vmis, migrations=migrations)
    # kept next to the topic's own entry in `waiting`
    newly = _not_said(rt, f"{topic}#failed", (f"{ns}/{name}" for ns, name in stalled))
    for (ns, name), why in sorted(stalled.items()):
        if f"{ns}/{name}" not in newly:
            continue
        log.warning("evacuation of %s/%s waits: %s", ns, name, why)
        await _vmi_event(rt, (ns, name), "Warning", "EvacuationFailed", why)


async def _start(rt: Runtime, member: str, obj: dict[str, Any]) -> None:
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    fetch = await prefetch.hold(rt, obj, "evacuation")
    if prefetch.waits(fetch):
        return  # the target fetches the box's components first: the next plan looks again
    try:
        started = await asyncio.to_thread(kube.create_unless_present, rt.clients, MIGRATIONS, obj)
        held = (
            None
            if started
            else await asyncio.to_thread(kube.get_if_present, rt.clients, MIGRATIONS, name, ns)
        )
    except ApiException as exc:
        log.warning("could not start migration %s/%s: %s %s", ns, name, exc.status, exc.reason)
        return
    if not started:
        if held is not None and _name_held(rt, member, obj, held):
            await prefetch.started(rt, obj, fetch)
        return  # (gone again: the next plan creates it)
    rt.view.observe_migration(obj, "ADDED")  # a drain planned next sees it at once
    await prefetch.started(rt, obj, fetch)
    METRICS.evacuation("started")
    log.info("evacuating %s/%s from %s: migration %s", ns, obj["spec"]["vmiName"], member, name)


def _name_held(rt: Runtime, member: str, planned: dict[str, Any], held: dict[str, Any]) -> bool:
    """A planned name exists already. gtvp's own migration of this attempt was started
    before (e.g. by this operator before a restart); anything else is not a migration
    started, and once in the view the next plan takes another name. True: it is gtvp's."""
    rt.view.observe_migration(held, "ADDED")
    if is_planned_migration(held, planned):
        return True
    view = migration_view(held)
    log.warning(
        "evacuation of %s/%s off %s: migration name %s is held by a migration gtvp did not "
        "start for it (VMI %r, %s); the next plan uses another name",
        view.namespace,
        planned["spec"]["vmiName"],
        member,
        view.name,
        view.vmi,
        "no gtvp label"
        if view.foreign
        else f"gtvp.io/evacuation={view.evacuates or '-'}, attempt {view.attempt}",
    )
    return False


async def _stop_late(
    rt: Runtime,
    member: str,
    late: list[tuple[Vmi, dt.timedelta]],
    topic: str,
    after: str,
    *,
    source: Mapping[int, str],
) -> None:
    """Stop the VMIs (`past_deadline`) not moved off `member` within their level's bound
    (whose bound it is: `source`, from `evacuation_bounds`): fail closed."""
    policy = rt.view.policy
    said = []
    for vmi, bound in late:
        lv = policy.level(vmi.level) if policy is not None else None
        name = lv.name if lv else vmi.level
        whose = {
            "own": f"level {name}'s migrateWithin",
            "member": f"the migrateWithin of {member}'s level",
        }.get(
            source.get(vmi.level, ""), f"the bound on a level without migrateWithin, such as {name}"
        )
        why = (
            f"still on {member} {human_duration(bound)} after {after} ({whose}): gtvp "
            "stops the VM instead of waiting longer for its migration"
        )
        said.append((vmi, why))
    await _stop_saying_once(
        rt, f"{topic}#late", said, reason="EvacuationDeadline", count=METRICS.deadline_stop,
        why="its level's migrateWithin passed",
    )  # fmt: skip


async def _stop_unmovable(
    rt: Runtime, member: str, unmovable: list[tuple[Vmi, str]], topic: str, after: str
) -> None:
    """Stop the VMIs KubeVirt says cannot live-migrate (`cannot_migrate`) that must leave
    `member`: no migration of theirs would ever start, so waiting (a level without
    `migrateWithin`) would keep them on it for good: fail closed."""
    said = [
        (
            vmi,
            f"must leave {member} ({after}) but cannot live-migrate ({why}): gtvp stops the "
            "VM instead of waiting for a migration that cannot start",
        )
        for vmi, why in unmovable
    ]
    await _stop_saying_once(
        rt, f"{topic}#unmovable", said, reason="EvacuationImpossible",
        count=lambda: METRICS.evacuation("stopped-unmovable"), why="it cannot live-migrate",
    )  # fmt: skip


async def _stop_saying_once(
    rt: Runtime,
    key: str,
    stops: list[tuple[Vmi, str]],
    *,
    reason: str,
    count: Callable[[], None],
    why: str,
    halt: bool = True,
) -> int:
    """Stop each VMI in `stops`, its message said (log, Warning Event `reason` on the VMI)
    and `count`ed once per VMI while it stays under `key`; the stop itself is asked again
    on every pass until the VMI is gone (`halt`: its VM halted too). Returns how many stops
    failed."""
    newly = _not_said(rt, key, (f"{v.namespace}/{v.name}" for v, _ in stops))
    failed = 0
    for vmi, message in stops:
        if f"{vmi.namespace}/{vmi.name}" in newly:
            log.warning("%s/%s %s", vmi.namespace, vmi.name, message)
            count()
            await _vmi_event(rt, (vmi.namespace, vmi.name), "Warning", reason, message)
        failed += not await asyncio.to_thread(_stop_vm, rt, vmi, why, halt=halt)
    return failed


def _stop_vm(rt: Runtime, vmi: Vmi, why: str = "policy: Stop", *, halt: bool = True) -> bool:
    """Halt the VMI's VirtualMachine (only the one that controls it: `controlling_vm`), so
    that KubeVirt does not start it again (unless `halt` is False), and delete the VMI
    itself either way: a VMI whose owner references name a decoy, or whose VM refuses the
    halt (gone, a webhook, a 5xx), is stopped all the same. False: the VMI could not be
    deleted (asked again soon)."""
    if not rt.coordination.leads():  # a leader that lost its Lease mid-pass stops nothing
        return False
    key = (vmi.namespace, vmi.name)
    body = rt.view.vmis.get(key) or {}
    if vmi.uid and _uid(body) != vmi.uid:
        # the view moved on since the decision (stops run one by one): another VMI of its
        # name now, nothing of this decision to stop (nor its VM to halt)
        return True
    owner = controlling_vm(body, rt.view.vms) if halt else None
    if owner is not None:
        vm = rt.view.vms.get((vmi.namespace, owner)) or {}
        # KubeVirt refuses `running` next to `runStrategy` (gtvp composes with the latter)
        halted: dict[str, Any] = (
            {"runStrategy": "Halted"}
            if "runStrategy" in (vm.get("spec") or {})
            else {"running": False}
        )
        try:
            kube.patch_object(rt.clients, VIRTUAL_MACHINES, owner, {"spec": halted}, vmi.namespace)
        except ApiException as exc:  # KubeVirt may start it again: the next pass halts it
            log.warning(
                "could not halt VM %s/%s (its VMI is deleted all the same): %s",
                vmi.namespace, owner, exc.reason,
            )  # fmt: skip
    try:
        meta = body.get("metadata") or {}
        if meta.get("uid") and meta.get("resourceVersion"):  # a copy the server gave
            # the VMI decided on, not one started again under its name meanwhile (uid
            # precondition; gone, or another uid: nothing of this decision left to stop)
            kube.delete_unchanged(rt.clients, VIRTUAL_MACHINE_INSTANCES, body, any_version=True)
        else:
            kube.delete_if_present(rt.clients, VIRTUAL_MACHINE_INSTANCES, vmi.name, vmi.namespace)
    except ApiException as exc:
        log.warning("could not stop %s/%s: %s", vmi.namespace, vmi.name, exc.reason)
        return False
    log.info("stopped %s/%s on untrusted member %s (%s)", vmi.namespace, vmi.name, vmi.node, why)
    return True


async def rejudge_migrations_to(rt: Runtime, member: str) -> None:
    """A member's verdict changed: re-judge the migrations that may be heading there now (an
    in-flight migration to a member that lost trust is aborted at once, not at its next
    event)."""
    for body in list(rt.view.migrations.values()):
        view = migration_view(body)
        if view.phase in RUNNING_PHASES and member in heading_for(view, _target_pods(rt, body)):
            await judge_migration(rt, body)


def _target_pods(rt: Runtime, body: Mapping[str, Any]) -> list[str]:
    """The nodes of the target launcher pods KubeVirt made for migration `body`."""
    uid = str((body.get("metadata") or {}).get("uid", ""))
    spec = body.get("spec") or {}
    key = (str((body.get("metadata") or {}).get("namespace", "")), str(spec.get("vmiName", "")))
    pods = (rt.view.launchers.get(key) or {}).values()
    return [p.node for p in pods if uid and p.migration_uid == uid]


def _count_finished(rt: Runtime, body: dict[str, Any], phase: str) -> None:
    meta = body.get("metadata") or {}
    done = f"{meta.get('uid', '')}/done"
    labels = meta.get("labels") or {}
    if phase == "Succeeded" and labels.get(EVACUATION_LABEL) and done not in rt.evacuation.judged:
        METRICS.evacuation("finished")
        rt.evacuation.judged.add(done)


async def judge_migration(rt: Runtime, body: dict[str, Any]) -> None:
    """Abort a migration that may be heading for a node that may not receive its VMI; spend
    one use of its target's verdict at its first judgement (`gtvp.core.inflight`). This
    replica judges the nodes whose shards it holds (their holders judge the others)."""
    view = migration_view(body)
    uid = str((body.get("metadata") or {}).get("uid", ""))
    if view.phase in ("Succeeded", "Failed"):
        if rt.coordination.leads():  # the leader started the evacuations, it counts them
            _count_finished(rt, body, view.phase)
        return
    if view.phase not in RUNNING_PHASES:
        return
    pods = _target_pods(rt, body)
    heading = [n for n in heading_for(view, pods) if rt.coordination.holds(n)]
    spender = spend_on(view, pods)
    if spender is not None and not rt.coordination.holds(spender):
        spender = None
    if not heading and spender is None:
        return  # the replicas holding its nodes judge it (they wrote their verdicts)
    level = gated_level(rt.view.vmis.get((view.namespace, view.vmi)) or {})
    if level is None:
        return
    now = dt.datetime.now(dt.UTC)
    members = {
        n: member_view(n, rt.view.verdict_of(n), rt.view.node_boot_id(n))
        if n in rt.view.members
        else None
        for n in {*heading, *([spender] if spender else [])}
    }
    first = uid not in rt.evacuation.judged
    decision = judge_in_flight(heading, spender, members, level=level, now=now, first=first)
    if decision.abort is not None:
        log.warning(
            "aborting migration %s/%s: it may be heading for %s, and %s",
            view.namespace,
            view.name,
            decision.abort,
            decision.reason,
        )
        try:
            if await asyncio.to_thread(
                kube.delete_if_present, rt.clients, MIGRATIONS, view.name, view.namespace
            ):
                METRICS.evacuation("aborted")
        except ApiException as exc:
            log.warning("could not abort %s: %s", view.name, exc.reason)
        return
    if decision.spend is not None:
        rt.evacuation.judged.add(uid)  # its own spend never aborts it
        try:
            await spend_use(rt, decision.spend)
        except Exception as exc:  # noqa: BLE001 - owed: spent at the target's next look
            log.warning(
                "migration %s/%s: spending a use of %s's verdict failed (%s); owed",
                view.namespace, view.name, decision.spend, exc,
            )  # fmt: skip
            owe(rt, f"migration:{uid}", decision.spend)
