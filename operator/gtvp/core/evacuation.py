"""Plan the migrations that empty a member that is no longer trusted.

Pure. Given the VMIs on the member, the migrations the operator sees and the policy's
limits, returns the VirtualMachineInstanceMigrations to create now. Names are
deterministic, derived from what is seen: VMI, source member, the incident and the attempt
(gtvp's finished evacuation migrations of that VMI from that member, labelled
`gtvp.io/evacuation` and annotated `gtvp.io/evacuation-attempt`, plus one), so an operator
restarted halfway never starts the same migration twice (creating it again answers
AlreadyExists, and `is_planned_migration` tells the one gtvp started), while a failed
migration is retried under a new name, three times in a row at most
(`evacuation_stalled` says why a VMI then waits), and on a member where no attempt of that
run failed while one can take the VMI (`least_failed`). A name held by an object gtvp did not
start (a co-tenant's, which could be created in advance: the names are predictable) is
skipped for the next spare name of the same attempt. KubeVirt limits
parallel migrations per cluster and outbound per node but not inbound, so when the
caller names the usable targets the plan picks, for each VMI, the eligible target with the
most bytes of its components already cached (a Lazy Box's, by `Node.status.images` as
placement counts them; 0 for other VMIs), then the one with the fewest inbound
migrations, and pins it (`kubernetes.io/hostname` in `addedNodeSelector`,
next to the trust selector); a VMI whose every eligible target is full waits for the next
plan. A pinned target counts as inbound before KubeVirt records it. The limits are counted
by `core.migration_budget.MigrationBudget`, which drains and balancing share; they bound
gtvp's own migrations only (others are KubeVirt's to queue).

Drains (`plan_drains`): gtvp is the external eviction controller for the gated VMIs with
`evictionStrategy: External` (Lazy Boxes among them) that KubeVirt marks with
`status.evacuationNodeName` when `kubectl drain` evicts their virt-launcher pod; the same
limits and pinning apply, cordoned members receive nothing, and a VMI no member can take
gets a reason instead of a migration.

Deadlines (`past_deadline`): a level's `migrateWithin` bounds how long its VMIs may wait to be
moved off a member that lost trust; past it they are stopped instead.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

from gtvp.core.api_resources import MIGRATIONS
from gtvp.core.compose import BOX_LABEL
from gtvp.core.footprint import vmi_requests
from gtvp.core.gating import GatingError, admitted_level
from gtvp.core.migration_budget import ActiveMigration, MigrationBudget, recorded_source
from gtvp.core.policy import Level, MigrationLimits
from gtvp.core.prefetch import Part, cached_bytes
from gtvp.core.target_room import TargetRoom, shortfall
from gtvp.core.timestamps import parse_ts
from gtvp.core.trust import trust_selector

EVACUATION_LABEL = "gtvp.io/evacuation"  # value: the member gtvp empties
DRAIN_LABEL = "gtvp.io/drain"  # value: the node being drained
BALANCING_LABEL = "gtvp.io/balancing"  # core.balance.BALANCE_LABEL (it imports this module)
GTVP_MIGRATION_LABELS = (EVACUATION_LABEL, DRAIN_LABEL, BALANCING_LABEL)
"""The labels on the migrations gtvp starts; a migration without any of them is foreign,
and the policy's migration limits do not count it."""
EVACUATION_ATTEMPT_ANNOTATION = "gtvp.io/evacuation-attempt"
MAX_EVACUATION_FAILURES = 3  # failed evacuation migrations of a VMI in a row before it waits
HOSTNAME_LABEL = "kubernetes.io/hostname"
FINISHED = {"Succeeded", "Failed"}
NOT_SCHEDULED = frozenset({"", "Pending", "Scheduling"})  # no target pod placed yet
CANCELLED = "Cancelled"  # in the histories: a migration being deleted (no KubeVirt phase)


@dataclass(frozen=True)
class Vmi:
    namespace: str
    name: str
    node: str
    level: int
    parts: tuple[Part, ...] = ()  # a Lazy Box's components (digest, size); () otherwise
    cpu_millis: int = 0  # its requests: it goes only where they fit (`core.target_room`)
    memory_bytes: int = 0
    uid: str = ""  # the VMI decided on (a stop touches no other of its name)


ON_UNTRUSTED = ("Keep", "Migrate", "Stop")
"""A level's `onUntrusted` actions, the weakest first."""


def untrusted_actions(
    vmis: Sequence[Vmi], member_level: int, member_action: str, level_actions: Mapping[int, str]
) -> dict[str, list[Vmi]]:
    """What happens to each gated VMI on a member that is not trusted (action -> VMIs).

    The member's level's `onUntrusted` (`member_action`) covers the VMIs that level may hold,
    unless their own level (`level_actions`) says something stricter: a level-1 VM whose
    level says Stop stops off a level-3 member whose level says Keep or Migrate. A VMI that
    needs more (`member_level`: the level the member's policy was judged at, 0 when it has
    none, as a Node without a Member) was out of place there already: it moves, or stops
    when its own level says Stop or is not in the policy any more; a lower level's `Keep`
    never keeps it.
    """
    out: dict[str, list[Vmi]] = {}
    for vmi in vmis:
        # a level the policy no longer defines stops (no member can be judged at it)
        action = max((member_action, level_actions.get(vmi.level, "Stop")), key=_strength)
        if vmi.level > member_level:
            # a level the policy no longer defines: no member can reach it, so waiting for a
            # target would keep the VMI here for good (and it has no migrateWithin): stopped
            own = level_actions.get(vmi.level, "Stop")
            action = max(("Migrate", own, member_action), key=_strength)
        out.setdefault(action, []).append(vmi)
    return out


def past_deadline(
    vmis: Sequence[Vmi],
    *,
    since: Mapping[int, dt.datetime],
    now: dt.datetime,
    within: Mapping[int, dt.timedelta],
) -> list[tuple[Vmi, dt.timedelta]]:
    """The VMIs to stop instead of migrate, each with its bound: those whose own level bounds
    how long its VMs may wait to be moved off a member that cannot hold them (`within`:
    level -> its `migrateWithin`) and for which that long has passed since the member
    stopped holding their level (`since`: level -> time, the member's `status.belowSince`;
    a level absent, unknown: no VMI of it). Whatever held the migration back (no room,
    failed or deleted migrations, no trusted member at all) does not matter: the bound is on
    time."""
    out = []
    for vmi in vmis:
        bound, start = within.get(vmi.level), since.get(vmi.level)
        if bound is not None and start is not None and now - start >= bound:
            out.append((vmi, bound))
    return out


class Bounds(NamedTuple):
    """How long the VMIs of each level may wait to be moved off a member (`within`), the
    levels whose bound is a `migrateWithin` someone chose (`chosen`), and whose bound each
    is (`source`: `own` the VMI's level's, `member` the member's level's, `default`
    `DEFAULT_MIGRATE_WITHIN`, nobody's choice)."""

    within: dict[int, dt.timedelta]
    chosen: set[int]
    source: dict[int, str]


def evacuation_bounds(levels: Sequence[Level], member_level: Level | None) -> Bounds:
    """Per VMI level, how long its VMIs may wait to be moved off (the shorter of its own
    level's bound and, for the levels the member's level covers, whose `onUntrusted` may
    be what moves them, that level's: a Keep-level VM on a member whose level says
    Migrate); and the levels whose bound so found is a `migrateWithin` someone chose (a
    VMI that cannot live-migrate waits that long; under the default bound it stops at
    once). Of two equal bounds, a chosen one wins, then the VMI's own level's."""
    out = Bounds({}, set(), {})
    for lv in levels:
        options = [(lv.evacuation_bound, lv.migrate_within is not None, "own")]
        if member_level is not None and lv.level <= member_level.level:
            member_explicit = member_level.migrate_within is not None
            options.append((member_level.evacuation_bound, member_explicit, "member"))
        found = [(bound, explicit, src) for bound, explicit, src in options if bound is not None]
        if not found:
            continue
        bound, explicit, src = min(found, key=lambda o: (o[0], not o[1]))
        out.within[lv.level] = bound
        out.source[lv.level] = src if explicit else "default"
        if explicit:
            out.chosen.add(lv.level)
    return out


LIVE_MIGRATABLE_SETTLE = dt.timedelta(seconds=60)
"""How long `LiveMigratable` must have been False before gtvp believes it: KubeVirt reports
it False for a while when it cannot tell yet (a hot-plugged volume's claim not yet read)."""


def cannot_migrate(vmi: Mapping[str, Any], now: dt.datetime) -> str | None:
    """KubeVirt's word that `vmi` cannot live-migrate at all: its `LiveMigratable` condition
    False (a ReadWriteOnce volume, a bridge on the pod network, a host device) since
    `LIVE_MIGRATABLE_SETTLE` at least, as reason and message; None otherwise. KubeVirt
    refuses every migration of such a VMI, so waiting for one would keep it on a member
    that cannot hold it for good."""
    for cond in (vmi.get("status") or {}).get("conditions") or ():
        if cond.get("type") != "LiveMigratable" or str(cond.get("status")) != "False":
            continue
        since = parse_ts(cond.get("lastTransitionTime"))
        if since is not None and now - since < LIVE_MIGRATABLE_SETTLE:
            return None
        reason, message = str(cond.get("reason") or ""), str(cond.get("message") or "")
        return ": ".join(p for p in (reason, message) if p) or "not live-migratable"
    return None


def controlling_vm(vmi: Mapping[str, Any], vms: Mapping[tuple[str, str], Any]) -> str | None:
    """The VirtualMachine that controls `vmi`: its controller owner reference (as KubeVirt
    writes it), naming a VM `vms` holds with that very uid; None otherwise. Anyone who may
    update the VMI can add owner references, so a plain one (or one naming a decoy VM by
    another uid) is never taken for the VMI's VM."""
    meta = vmi.get("metadata") or {}
    ns = str(meta.get("namespace", ""))
    for ref in meta.get("ownerReferences") or ():
        if ref.get("kind") != "VirtualMachine" or ref.get("controller") is not True:
            continue
        vm = vms.get((ns, str(ref.get("name", ""))))
        uid = ((vm or {}).get("metadata") or {}).get("uid")
        if uid and uid == ref.get("uid"):
            return str(ref["name"])
    return None


def _strength(action: str) -> int:
    return ON_UNTRUSTED.index(action) if action in ON_UNTRUSTED else len(ON_UNTRUSTED)


@dataclass(frozen=True)
class Migration:
    namespace: str
    name: str
    vmi: str
    source: str | None
    target: str | None
    phase: str
    pinned: str | None = None  # the target named in addedNodeSelector, if any
    evacuates: str | None = None  # gtvp.io/evacuation: the member gtvp empties with it
    attempt: int = 0  # gtvp.io/evacuation-attempt (0 when absent)
    foreign: bool = False  # none of gtvp's labels: gtvp did not start it
    drains: str | None = None  # gtvp.io/drain: the drained node gtvp moves the VMI off
    deleting: bool = False  # deletionTimestamp set (KubeVirt's finalizer not done yet)
    created: dt.datetime | None = None  # its creationTimestamp

    @property
    def active(self) -> bool:
        return self.phase not in FINISHED

    @property
    def inbound_to(self) -> str | None:
        return self.target or self.pinned


def best_target(
    budget: MigrationBudget,
    eligible: Iterable[str],
    parts: Sequence[Part],
    images: Mapping[str, frozenset[str]],
) -> str | None:
    """Among the eligible targets that may receive: the one caching most of the bytes of
    `parts` (a box's components), then the one with the fewest arrivals, then by name."""
    by_bytes: dict[int, list[str]] = {}
    for name in eligible:
        held = cached_bytes(parts, images.get(name, frozenset())) if parts else 0
        by_bytes.setdefault(held, []).append(name)
    for held in sorted(by_bytes, reverse=True):
        target = budget.least_busy(by_bytes[held])
        if target is not None:
            return target
    return None


def migration_name(vmi: Vmi, incident: str, attempt: int = 0, spare: int = 0) -> str:
    """The name of `vmi`'s evacuation off its node: the first attempt's (0) is the name gtvp
    gave before it counted attempts; `spare` numbers the names tried while another object
    holds the name."""
    key = f"{vmi.namespace}/{vmi.name}@{vmi.node}#{incident}"
    if attempt or spare:
        key += f"#attempt{attempt}.{spare}"
    digest = hashlib.sha256(key.encode())
    return f"gtvp-evac-{vmi.name[:36]}-{digest.hexdigest()[:8]}"


class Attempt(NamedTuple):
    """One of gtvp's finished (or cancelled) evacuation or drain migrations of a VMI off a
    member, as the histories list them."""

    number: int  # gtvp.io/evacuation-attempt or gtvp.io/drain-attempt
    phase: str  # Succeeded, Failed, or CANCELLED (being deleted)
    name: str
    target: str | None  # where KubeVirt placed it, else where gtvp pinned it


History = Mapping[tuple[str, str, str], Sequence[Attempt]]
"""(namespace, VMI, member) -> gtvp's finished evacuation (or drain) attempts, oldest first."""


def evacuation_history(migrations: Iterable[Migration]) -> History:
    """(namespace, VMI, member) -> gtvp's finished evacuation migrations of that VMI off that
    member, oldest attempt first. One being deleted counts as `CANCELLED`, whatever its
    phase: KubeVirt marks a migration deleted before its hand-off Failed on its way out, and
    one gtvp took back (`stale_evacuations`) is no failed attempt; it still numbers the
    attempts, so the next one has a name of its own."""
    out: dict[tuple[str, str, str], list[Attempt]] = {}
    for m in migrations:
        if m.evacuates and (m.deleting or not m.active):
            phase = CANCELLED if m.deleting else m.phase
            out.setdefault((m.namespace, m.vmi, m.evacuates), []).append(
                Attempt(m.attempt, phase, m.name, m.inbound_to)
            )
    return {key: sorted(past, key=_order) for key, past in out.items()}


def _order(a: Attempt) -> tuple[int, str, str]:
    """Attempts by number; at an equal number (two names of one attempt while another object
    held the first) by phase, Cancelled < Failed < Succeeded, so a success ends a run."""
    return a.number, a.phase, a.name


def _failed_in_a_row(past: Sequence[Attempt]) -> list[Attempt]:
    """The failed attempts at the end of `past` (cancelled ones in between are neither
    failures nor successes), the latest first."""
    failed: list[Attempt] = []
    for attempt in reversed(past):
        if attempt.phase == CANCELLED:
            continue
        if attempt.phase != "Failed":
            break
        failed.append(attempt)
    return failed


def _towards(failed: Sequence[Attempt]) -> str:
    """' (towards a, b)': where the failed attempts went, for the reason a VMI waits."""
    targets = sorted({a.target for a in failed if a.target})
    return f" (towards {', '.join(targets)})" if targets else ""


RETARGET_MEMORY = 600.0
"""Seconds for which a target a VMI's pinned migration was cancelled from (`Retarget`) is
tried after the others."""


def retargeted_from(
    cancelled: Mapping[tuple[str, str], Mapping[str, float]], now: float
) -> dict[tuple[str, str], frozenset[str]]:
    """(namespace, VMI) -> the targets its migrations were cancelled from (`Retarget`)
    within `RETARGET_MEMORY` before `now` (monotonic seconds, as `cancelled` records)."""
    out = {
        key: frozenset(t for t, at in targets.items() if now - at < RETARGET_MEMORY)
        for key, targets in cancelled.items()
    }
    return {key: targets for key, targets in out.items() if targets}


def least_failed(
    eligible: Sequence[str], past: Sequence[Attempt], avoid: Collection[str] = ()
) -> list[str]:
    """The eligible targets on which the fewest of the VMI's failed attempts in a row went.

    A retry must not go where the last one failed while another member could take the VMI:
    a target the scheduler cannot use (pods gtvp does not count fill it, say) would fail
    every retry, and after three failures the VMI stays where it must not run. A target
    that failed before is tried again only when every eligible one did. Likewise a target
    in `avoid` (one a pinned migration of the VMI was cancelled from lately, as full or no
    longer usable): root on a Trusted member that claims every image and room, then fills
    itself once pinned, would otherwise be pinned again every pass, the move cancelled
    each time (a cancel is no failure) until the VM is stopped (found by a review)."""
    failures = Counter(a.target for a in _failed_in_a_row(past) if a.target)
    fewest = min((failures[name] for name in eligible), default=0)
    least = [name for name in eligible if failures[name] == fewest]
    return [name for name in least if name not in avoid] or least


def free_name(namespace: str, taken: set[tuple[str, str]], name_of: Callable[[int], str]) -> str:
    """An attempt's name (`name_of(0)`), or its next spare one (`name_of(1)`, ...) while an
    object of that name exists in `namespace` (one gtvp did not start: gtvp's own of this
    attempt would have ended it or made it busy). Anyone can compute the first and create
    an object under it first."""
    spare = 0
    while (namespace, name_of(spare)) in taken:
        spare += 1
    return name_of(spare)


def evacuation_stalled(
    *, member: str, vmis: Sequence[Vmi], migrations: Sequence[Migration]
) -> dict[tuple[str, str], str]:
    """(namespace, VMI) -> why gtvp starts no more evacuation migrations for it off `member`:
    the last MAX_EVACUATION_FAILURES of them failed. Deleting those retries."""
    return _stalled(member, vmis, evacuation_history(migrations))


def _stalled(member: str, vmis: Sequence[Vmi], history: History) -> dict[tuple[str, str], str]:
    out: dict[tuple[str, str], str] = {}
    for vmi in vmis:
        failed = _failed_in_a_row(history.get((vmi.namespace, vmi.name, member), ()))
        if vmi.node == member and len(failed) >= MAX_EVACUATION_FAILURES:
            names = " ".join(sorted(a.name for a in failed))
            out[(vmi.namespace, vmi.name)] = (
                f"the last {len(failed)} evacuation migrations of {vmi.namespace}/{vmi.name} "
                f"off {member} failed{_towards(failed)}; gtvp tries again once a cluster "
                f"administrator deletes them (group system:masters: kubectl delete vmim -n "
                f"{vmi.namespace} {names})"
            )
    return out


def plan_evacuation(
    *,
    member: str,
    incident: str,
    vmis: Sequence[Vmi],
    migrations: Sequence[Migration],
    limits: MigrationLimits,
    targets: Sequence[tuple[str, int]] | None = None,
    images: Mapping[str, frozenset[str]] | None = None,
    room: TargetRoom | None = None,
    allowed: Mapping[tuple[str, str], frozenset[str]] | None = None,
    avoid: Mapping[tuple[str, str], frozenset[str]] | None = None,
) -> list[dict[str, Any]]:
    """The VirtualMachineInstanceMigration objects to create now for `member`.

    `migrations`: every migration the operator sees (active ones make their VMI busy,
    gtvp's own count against the limits, finished ones of gtvp's number the next attempt,
    and every name is taken). `targets`: the usable members (name, level) that may receive
    VMIs; with them the inbound limit holds and each migration is pinned to one target.
    `images`: the digests each target's Node lists (`Node.status.images`): a box goes to
    the eligible target caching most of its bytes. `room`: what each target has not
    committed; a VMI goes only where its requests fit, and waits when they fit nowhere.
    `allowed`: for a VMI whose own nodeSelector or node affinity names nodes, the targets
    those allow (`core.node_affinity`); a pin elsewhere could never be scheduled.
    `avoid`: for a VMI, targets tried after the others (`least_failed`).
    """
    active = [m for m in migrations if m.active]
    busy_vmis = {(m.namespace, m.vmi) for m in active}
    here = {(v.namespace, v.name) for v in vmis if v.node == member}
    taken = {(m.namespace, m.name) for m in migrations}
    history = evacuation_history(migrations)
    stalled = _stalled(member, vmis, history)

    def source_of(m: ActiveMigration) -> str | None:
        # a migration leaves this member if its VMI runs here: KubeVirt may not have
        # recorded a sourceNode yet, so the VMI's node, not the migration's state, decides
        return member if m.source == member or (m.namespace, m.vmi) in here else m.source

    budget = MigrationBudget.of(limits, active, source_of)
    out: list[dict[str, Any]] = []
    for vmi in sorted(vmis, key=lambda v: (-v.level, v.namespace, v.name)):
        key = (vmi.namespace, vmi.name)
        if vmi.node != member or key in busy_vmis or key in stalled:
            continue
        if not budget.allows(member):
            break
        selector = trust_selector(vmi.level)
        past = history.get((vmi.namespace, vmi.name, member), ())
        target = None
        if targets is not None:
            eligible = [
                name
                for name, level in targets
                if name != member
                and level >= vmi.level
                and (allowed is None or key not in allowed or name in allowed[key])
                and (room is None or room.fits(name, vmi.cpu_millis, vmi.memory_bytes))
            ]
            fewest = least_failed(eligible, past, (avoid or {}).get(key, frozenset()))
            target = best_target(budget, fewest, vmi.parts, images or {})
            if target is None:
                continue  # every eligible target is full or receiving its limit: wait
            if room is not None:
                room.take(target, vmi.cpu_millis, vmi.memory_bytes)
            selector = {**selector, HOSTNAME_LABEL: target}
        attempt = max((a.number for a in past), default=-1) + 1
        name = free_name(vmi.namespace, taken, partial(migration_name, vmi, incident, attempt))
        out.append(_evacuation_migration(vmi, name, attempt, selector))
        budget.take(member, target)
    return out


def stale_evacuations(
    *,
    member: str,
    vmis: Sequence[Vmi],
    migrations: Sequence[Migration],
    targets: Sequence[tuple[str, int]],
    room: TargetRoom | None = None,
) -> list[Retarget]:
    """gtvp's migrations of VMIs on `member` (its evacuations off it, and its balancing and
    drain moves of them), pinned and not scheduled yet, whose target can no longer take the
    VMI: no longer a usable member (`targets`, name and level) of its level, or committed
    beyond its allocatable since (`TargetRoom.overcommitted`). KubeVirt would keep the
    target pod Pending and then fail the migration (while it lasts, the VMI counts as busy
    and no evacuation of it starts), and three failures leave the VMI on the member being
    emptied; deleted now, it is no failure, and the next plan pins it where it fits."""
    levels = {(v.namespace, v.name): v.level for v in vmis if v.node == member}
    pending = [
        m
        for m in migrations
        if (m.evacuates == member or (m.evacuates is None and not m.foreign))
        and unscheduled_pin(m)
        and (m.namespace, m.vmi) in levels
    ]
    full = room.overcommitted({(m.namespace, m.name) for m in pending}) if room else {}
    usable = dict(targets)
    out = []
    for m in pending:
        level = levels[(m.namespace, m.vmi)]
        if usable.get(m.pinned or "", 0) < level:
            why = f"is no longer a usable member of level {level}"
        elif (m.namespace, m.name) in full:
            why = _OBSTACLE_PHRASES["full"]
        else:
            continue
        out.append(_retarget(m, why))
    return out


FOREIGN_HOLD_GRACE = dt.timedelta(minutes=2)
"""How long a migration gtvp did not start may stay unscheduled before gtvp deletes it to
move the VM itself (KubeVirt queues its own under its parallel-migration limits)."""


def foreign_holds(
    vmis: Sequence[Vmi],
    migrations: Sequence[Migration],
    now: dt.datetime,
    also_on_member: Collection[tuple[str, str]] = (),
) -> list[Retarget]:
    """Migrations gtvp did not start, not scheduled by KubeVirt for `FOREIGN_HOLD_GRACE`
    since they were made, of VMIs that must leave a member: to delete. Anyone who may create
    migrations in the namespace could otherwise hold their VM on a member that lost trust
    for good (gtvp waits for a VMI's active migration): one pinned where nothing fits, with
    a long pending timeout. One KubeVirt scheduled runs on (its target is gated like any).
    Likewise those of the member's other VMIs (`also_on_member`, ungated ones too): KubeVirt
    counts an unscheduled migration against its source's outbound limit (2 by default), so
    two pinned nowhere on small VMs of one's own held every evacuation off the member until
    `migrateWithin` stopped the gated VMs (found by a review)."""
    leaving = {(v.namespace, v.name) for v in vmis}
    held = leaving | set(also_on_member)
    why = "a migration gtvp did not start held the VM, unscheduled, on a member it must leave"
    slot = (
        "a migration gtvp did not start, unscheduled, held one of KubeVirt's outbound "
        "migration slots of a member gtvp must empty"
    )
    return [
        Retarget(m.namespace, m.name, m.vmi, why if (m.namespace, m.vmi) in leaving else slot)
        for m in migrations
        if m.foreign
        and m.phase in NOT_SCHEDULED
        and not m.target
        and not m.deleting
        and (m.namespace, m.vmi) in held
        and (m.created is None or now - m.created >= FOREIGN_HOLD_GRACE)
    ]


def unscheduled_pin(m: Migration) -> bool:
    """Pinned by gtvp, not scheduled by KubeVirt yet, not being deleted: one gtvp may take
    back (the handler checks again on the latest copy before it deletes)."""
    return m.phase in NOT_SCHEDULED and not m.target and bool(m.pinned) and not m.deleting


def _retarget(m: Migration, why: str) -> Retarget:
    why = f"its target {m.pinned} {why} before the migration was scheduled"
    return Retarget(m.namespace, m.name, m.vmi, why)


def _evacuation_migration(
    vmi: Vmi, name: str, attempt: int, selector: Mapping[str, str]
) -> dict[str, Any]:
    obj = migration_object(
        name=name,
        namespace=vmi.namespace,
        vmi=vmi.name,
        label=(EVACUATION_LABEL, vmi.node),
        reason=f"member {vmi.node} is no longer trusted",
        selector=selector,
    )
    obj["metadata"]["annotations"][EVACUATION_ATTEMPT_ANNOTATION] = str(attempt)
    return obj


def is_planned_migration(held: Mapping[str, Any], planned: Mapping[str, Any]) -> bool:
    """Whether `held`, the object found under a planned evacuation migration's name
    (AlreadyExists), is that migration started before (by this operator before a restart,
    or by a plan whose result the watch had not delivered yet): a migration of the same VMI
    labelled for the same member and attempt. Anything else holding the name was not started
    by gtvp for this VMI and must not pass for it; seen by the next plan, it takes another
    name."""
    h, p = migration_view(held), migration_view(planned)
    if h.deleting:
        return False  # one gtvp took back, on its way out: not a migration started
    return h.evacuates is not None and (h.namespace, h.vmi, h.evacuates, h.attempt) == (
        p.namespace,
        p.vmi,
        p.evacuates,
        p.attempt,
    )


def migration_object(
    *,
    name: str,
    namespace: str,
    vmi: str,
    label: tuple[str, str],
    reason: str,
    selector: Mapping[str, str],
) -> dict[str, Any]:
    """A VirtualMachineInstanceMigration gtvp starts: labelled with why (evacuation or
    balancing, and the source member), its reason annotated, its targets restricted."""
    return {
        "apiVersion": MIGRATIONS.api_version,
        "kind": MIGRATIONS.kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {label[0]: label[1]},
            "annotations": {"gtvp.io/reason": reason},
        },
        "spec": {"vmiName": vmi, "addedNodeSelector": dict(selector)},
    }


def attempt_of(meta: Mapping[str, Any], annotation: str) -> int:
    """The attempt number in `annotation` (0 when absent or not a plain number: anyone who
    may create a migration writes its annotations, and `int()` refuses "²" or 5000 digits)."""
    raw = str((meta.get("annotations") or {}).get(annotation, "0"))
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 9 else 0


def migration_view(obj: Mapping[str, Any]) -> Migration:
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    state = status.get("migrationState") or {}
    return Migration(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        vmi=str(spec.get("vmiName", "")),
        source=state.get("sourceNode"),
        target=state.get("targetNode"),
        phase=str(status.get("phase", "Pending")),
        pinned=(spec.get("addedNodeSelector") or {}).get(HOSTNAME_LABEL),
        evacuates=str(labels[EVACUATION_LABEL]) if labels.get(EVACUATION_LABEL) else None,
        attempt=attempt_of(meta, EVACUATION_ATTEMPT_ANNOTATION),
        foreign=not any(label in labels for label in GTVP_MIGRATION_LABELS),
        drains=str(labels[DRAIN_LABEL]) if labels.get(DRAIN_LABEL) else None,
        deleting=bool(meta.get("deletionTimestamp")),
        created=parse_ts(meta.get("creationTimestamp")),
    )


# ----- drains: gtvp is the external eviction controller ---------------------------------
#
# On `kubectl drain`, KubeVirt's virt-api refuses the eviction of a virt-launcher pod whose
# VMI has `evictionStrategy: External` (429, so drain retries) and only sets the VMI's
# `status.evacuationNodeName` to the pod's node; KubeVirt's own evacuation controller
# migrates LiveMigrate VMIs but leaves External ones to an external controller. For the VMIs
# gtvp gates (Lazy Boxes always are), gtvp is that controller: it live-migrates them to a
# usable target, and virt-handler clears the field once the VMI runs on the target, so the
# drain's next eviction attempt succeeds. Ungated VMIs with External belong to whoever chose
# External (cluster-api-provider-kubevirt tears such VMs down): gtvp leaves them alone.

DRAIN_ATTEMPT_ANNOTATION = "gtvp.io/drain-attempt"
MAX_DRAIN_FAILURES = 3  # consecutive failed drain migrations of one VMI before gtvp waits
_STRICTEST = 9  # an unreadable level label is treated as the strictest level


@dataclass(frozen=True)
class Evacuee:
    """A gated VMI that KubeVirt marked for evacuation from the node it runs on."""

    namespace: str
    name: str
    node: str
    level: int
    box: bool = False  # a Lazy Box's VMI
    parts: tuple[Part, ...] = ()  # a box's components (digest, size), from its LazyBox
    cpu_millis: int = 0  # its requests: it goes only where they fit (`core.target_room`)
    memory_bytes: int = 0


def cordoned(node: Mapping[str, Any]) -> bool:
    """Whether a Node is cordoned (`spec.unschedulable`: kubectl cordon / drain): the
    scheduler places nothing there, a target pod pinned to it included."""
    return bool((node.get("spec") or {}).get("unschedulable"))


@dataclass(frozen=True)
class DrainTarget:
    """A member that might receive a VMI: its level, verdict and whether it is cordoned."""

    name: str
    level: int
    trusted: bool  # Trusted with a fresh verdict that has uses left
    cordoned: bool = False  # Node.spec.unschedulable (kubectl cordon / drain)
    images: frozenset[str] = frozenset()  # digests its Node.status.images lists


@dataclass(frozen=True)
class Retarget:
    """A drain or evacuation migration of gtvp's to cancel: its pinned target can no longer
    take the VMI and KubeVirt has not scheduled it there yet (it would wait for that node for
    minutes)."""

    namespace: str
    name: str  # the migration
    vmi: str
    why: str


@dataclass(frozen=True)
class DrainPlan:
    migrations: tuple[dict[str, Any], ...]
    waiting: Mapping[tuple[str, str], str]  # (namespace, VMI) -> why it cannot move yet
    cancel: tuple[Retarget, ...] = ()


def drain_evacuee(vmi: Mapping[str, Any]) -> Evacuee | None:
    """The VMI as an Evacuee if gtvp must move it off a node being drained, else None.

    gtvp's: a running VMI with `spec.evictionStrategy: External` that is gated (admitted at a
    level: `gtvp.io/level` or its trust selector, the higher; every Lazy Box is) and whose
    `status.evacuationNodeName` names the node it runs on. Once it runs elsewhere the mark
    is history (KubeVirt clears it)."""
    meta = vmi.get("metadata") or {}
    spec = vmi.get("spec") or {}
    status = vmi.get("status") or {}
    node = status.get("nodeName")
    if not node or status.get("evacuationNodeName") != node:
        return None
    if spec.get("evictionStrategy") != "External" or status.get("phase") != "Running":
        return None
    if meta.get("deletionTimestamp"):
        return None
    labels = meta.get("labels") or {}
    try:  # the level it was admitted with: a raise through its trust selector counts too
        level = admitted_level(labels, spec.get("nodeSelector"))
    except GatingError:
        level = _STRICTEST
    if level is None:
        return None
    cpu, memory = vmi_requests(vmi)
    return Evacuee(
        str(meta.get("namespace", "")),
        str(meta.get("name", "")),
        str(node),
        level,
        box=BOX_LABEL in labels,
        cpu_millis=cpu,
        memory_bytes=memory,
    )


def drain_history(
    migrations: Iterable[Mapping[str, Any]],
) -> dict[tuple[str, str, str], list[Attempt]]:
    """(namespace, VMI, drained node) -> gtvp's drain migrations of that VMI off that node;
    one being deleted counts as `CANCELLED` (no failed attempt: `evacuation_history`)."""
    out: dict[tuple[str, str, str], list[Attempt]] = {}
    for obj in migrations:
        meta = obj.get("metadata") or {}
        node = (meta.get("labels") or {}).get(DRAIN_LABEL)
        if not node:
            continue
        m = migration_view(obj)
        attempt = attempt_of(meta, DRAIN_ATTEMPT_ANNOTATION)
        phase = CANCELLED if m.deleting else m.phase
        key = (m.namespace, m.vmi, str(node))
        out.setdefault(key, []).append(Attempt(attempt, phase, m.name, m.inbound_to))
    return out


def drain_migration_name(vmi: Evacuee, attempt: int, spare: int = 0) -> str:
    """The drain attempt's migration name (`spare` > 0: its spare names, while an object
    gtvp did not start holds the first: anyone can compute it and create one first)."""
    extra = f".{spare}" if spare else ""
    digest = hashlib.sha256(f"{vmi.namespace}/{vmi.name}@{vmi.node}#drain{attempt}{extra}".encode())
    return f"gtvp-drain-{vmi.name[:36]}-{digest.hexdigest()[:8]}"


def is_planned_drain(held: Mapping[str, Any], planned: Mapping[str, Any]) -> bool:
    """Whether `held`, found under a planned drain migration's name, is that migration
    started before (the same VMI, node drained and attempt); anything else holding the name
    must not pass for it (the next plan takes a spare name)."""
    h, p = migration_view(held), migration_view(planned)
    h_attempt = attempt_of(held.get("metadata") or {}, DRAIN_ATTEMPT_ANNOTATION)
    p_attempt = attempt_of(planned.get("metadata") or {}, DRAIN_ATTEMPT_ANNOTATION)
    return (
        not h.deleting
        and h.drains is not None
        and (h.namespace, h.vmi, h.drains, h_attempt) == (p.namespace, p.vmi, p.drains, p_attempt)
    )


def plan_drains(
    *,
    evacuees: Sequence[Evacuee],
    migrations: Sequence[Migration],
    history: History,
    node_of: Mapping[tuple[str, str], str],
    limits: MigrationLimits,
    targets: Sequence[DrainTarget],
    room: TargetRoom | None = None,
    allowed: Mapping[tuple[str, str], frozenset[str]] | None = None,
    avoid: Mapping[tuple[str, str], frozenset[str]] | None = None,
) -> DrainPlan:
    """The drain migrations to create now, and why the VMIs that cannot move yet wait.

    `node_of`: where each VMI runs (a migration whose source KubeVirt has not recorded yet
    leaves its VMI's node). Each migration is pinned to the eligible target (Trusted, level
    at least the VMI's, not cordoned, not the drained node) caching most of a box's
    component bytes, then with the fewest arrivals; the policy's cluster, outbound and
    inbound limits hold, counting gtvp's active migrations (evacuations, drains,
    balancing; others are KubeVirt's to queue).
    With `room` (what each member has not committed), a VMI goes only where its requests
    fit; one that fits on no eligible member waits, with what it asks and what is left.
    A VMI that only the limits hold back is not 'waiting': the next plan moves it.
    A retry goes to an eligible member on which no failed attempt of the run went, while
    there is one (`least_failed`).
    A drain migration not yet scheduled whose target can no longer take the VMI (cordoned,
    no longer Trusted since it was planned, or, with `room`, committed beyond its
    allocatable since) is to be cancelled: the next plan re-targets it.
    `allowed`: for a VMI whose own nodeSelector or node affinity names nodes, the members
    those allow (`core.node_affinity`); one they allow nowhere waits and says why.
    `avoid`: for a VMI, targets tried after the others (`least_failed`).
    """
    busy = {(m.namespace, m.vmi) for m in migrations if m.active}
    taken = {(m.namespace, m.name) for m in migrations}
    budget = MigrationBudget.of(limits, migrations, recorded_source(node_of))
    images = {t.name: t.images for t in targets}
    out: list[dict[str, Any]] = []
    waiting: dict[tuple[str, str], str] = {}
    cancel: list[Retarget] = []
    full = (
        room.overcommitted(
            {(m.namespace, m.name) for m in migrations if m.drains and unscheduled_pin(m)}
        )
        if room is not None
        else {}
    )
    for vmi in sorted(evacuees, key=lambda v: (-v.level, v.namespace, v.name)):
        if (vmi.namespace, vmi.name) in busy:
            cancel.extend(_unschedulable_drains(vmi, migrations, targets, full))
            continue
        past = sorted(history.get((vmi.namespace, vmi.name, vmi.node), ()), key=_order)
        own = (allowed or {}).get((vmi.namespace, vmi.name))
        eligible = [t.name for t in targets if _can_take(t, vmi) and (own is None or t.name in own)]
        roomy = [n for n in eligible if room is None or room.fits(n, *_asks(vmi))]
        why = _failed_too_often(vmi, past)
        if why is None and not eligible:
            why = _no_target(vmi, targets)
            if own is not None and any(_can_take(t, vmi) for t in targets):
                why = (
                    f"no Trusted, uncordoned member of level {vmi.level} or above is one its "
                    "own nodeSelector or node affinity allows"
                )
        elif why is None and not roomy:
            why = shortfall(*_asks(vmi))
        if why is not None:
            waiting[(vmi.namespace, vmi.name)] = why
            continue
        shunned = (avoid or {}).get((vmi.namespace, vmi.name), frozenset())
        target = best_target(budget, least_failed(roomy, past, shunned), vmi.parts, images)
        if target is None or not budget.allows(vmi.node):
            continue  # the limits hold it back: the next plan
        budget.take(vmi.node, target)
        if room is not None:
            room.take(target, *_asks(vmi))
        attempt = max((a.number for a in past), default=-1) + 1
        out.append(_drain_migration(vmi, target, attempt, taken))
    return DrainPlan(tuple(out), waiting, tuple(cancel))


def _unschedulable_drains(
    vmi: Evacuee,
    migrations: Sequence[Migration],
    targets: Sequence[DrainTarget],
    full: Mapping[tuple[str, str], str],
) -> list[Retarget]:
    """gtvp's drain migrations of `vmi` off its node, not scheduled yet, whose pinned target
    can no longer take it (KubeVirt would keep the target pod pending for minutes); `full`:
    the migrations whose target is committed beyond its allocatable."""
    by_name = {t.name: t for t in targets}
    out = []
    for m in migrations:
        if (m.namespace, m.vmi) != (vmi.namespace, vmi.name) or m.drains != vmi.node:
            continue
        if not unscheduled_pin(m):
            continue  # scheduled, or already being deleted (cancelled once is enough)
        target = by_name.get(m.pinned or "")
        kind = "no Node" if target is None else _obstacle(target, vmi)
        if kind is None and (m.namespace, m.name) in full:
            kind = "full"
        if kind is not None:
            out.append(_retarget(m, _OBSTACLE_PHRASES[kind].format(level=vmi.level)))
    return out


_OBSTACLE_PHRASES = {
    "no Node": "has no Node",
    "drained": "is the drained node",
    "not Trusted": "is not Trusted",
    "below": "is below level {level}",
    "cordoned": "was cordoned",
    "full": "has no room for it any more",
}


def _obstacle(target: DrainTarget, vmi: Evacuee) -> str | None:
    """What keeps `target` from taking `vmi` (`drained`, `not Trusted`, `below`,
    `cordoned`, in that order), or None when it can."""
    if target.name == vmi.node:
        return "drained"
    if not target.trusted:
        return "not Trusted"
    if target.level < vmi.level:
        return "below"
    if target.cordoned:
        return "cordoned"
    return None


def _asks(vmi: Evacuee) -> tuple[int, int]:
    return vmi.cpu_millis, vmi.memory_bytes


def _can_take(target: DrainTarget, vmi: Evacuee) -> bool:
    return _obstacle(target, vmi) is None


def _failed_too_often(vmi: Evacuee, past: Sequence[Attempt]) -> str | None:
    failed = _failed_in_a_row(past)
    if len(failed) < MAX_DRAIN_FAILURES:
        return None
    return (
        f"the last {len(failed)} drain migrations off {vmi.node} failed{_towards(failed)}; "
        f"gtvp tries again once a cluster administrator deletes them (group system:masters: "
        f"kubectl delete vmim -n {vmi.namespace} -l {DRAIN_LABEL}={vmi.node})"
    )


def _no_target(vmi: Evacuee, targets: Sequence[DrainTarget]) -> str:
    """Why no member can take `vmi`, one clause per obstacle (names, at most 3 each)."""
    obstacles: dict[str, list[str]] = {"cordoned": [], "not Trusted": [], "below": []}
    for t in sorted(targets, key=lambda t: t.name):
        kind = _obstacle(t, vmi)
        if kind in obstacles:
            obstacles[kind].append(f"{t.name}: level {t.level}" if kind == "below" else t.name)
    clauses = []
    for what, names in obstacles.items():
        if names:
            label = f"below level {vmi.level}" if what == "below" else what
            shown = ", ".join(names[:3]) + (f", {len(names) - 3} more" if len(names) > 3 else "")
            clauses.append(f"{len(names)} {label} ({shown})")
    why = "; ".join(clauses) if clauses else "no other member"
    return (
        f"node {vmi.node} is being drained, but no Trusted, schedulable member of level >= "
        f"{vmi.level} can take the VM: {why}"
    )


def _drain_migration(
    vmi: Evacuee, target: str, attempt: int, taken: set[tuple[str, str]]
) -> dict[str, Any]:
    obj = migration_object(
        name=free_name(vmi.namespace, taken, partial(drain_migration_name, vmi, attempt)),
        namespace=vmi.namespace,
        vmi=vmi.name,
        label=(DRAIN_LABEL, vmi.node),
        reason=f"node {vmi.node} is being drained (evacuationNodeName, evictionStrategy External)",
        selector={**trust_selector(vmi.level), HOSTNAME_LABEL: target},
    )
    obj["metadata"]["annotations"][DRAIN_ATTEMPT_ANNOTATION] = str(attempt)
    return obj
