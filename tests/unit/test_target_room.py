"""Evacuations and drains go only where the VMI's requests fit (`core.target_room`).

The attack: fill the member that caches a sensitive box's components (a co-tenant's VMs, or
just a busy pool). Pinned there, the box's evacuation off an untrusted host can never be
scheduled; KubeVirt fails it, the retry picks the same member, and after three failures
the box stays on the host gtvp is emptying.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from gtvp import kube
from gtvp.core.api_resources import MIGRATIONS
from gtvp.core.evacuation import (
    DrainTarget,
    Evacuee,
    Migration,
    Vmi,
    drain_history,
    evacuation_stalled,
    is_planned_migration,
    plan_drains,
    plan_evacuation,
    stale_evacuations,
)
from gtvp.core.footprint import Footprint
from gtvp.core.policy import MigrationLimits
from gtvp.core.target_room import TargetRoom

GI = 2**30
LIMITS = MigrationLimits(max_parallel=5, max_outbound_per_node=4, max_inbound_per_node=4)
PARTS = (("sha256:kernel", 18 * 10**6), ("sha256:app", 4 * 10**6))
HOST = "kubernetes.io/hostname"


@dataclass(frozen=True)
class Member:
    name: str
    cpu_used: int
    mem_used: int = 0
    cpu: int = 8000
    mem: int = 32 * GI


host = Member


def room(
    *members: Member,
    migrations: tuple[Migration, ...] = (),
    placed: dict[tuple[str, str], Footprint] | None = None,
) -> TargetRoom:
    return TargetRoom.of(
        {m.name: (m.cpu, m.mem) for m in members},
        {m.name: (m.cpu_used, m.mem_used) for m in members},
        migrations,
        placed or {},
    )


WARM_BUT_FULL = host("warm", cpu_used=7500)  # caches the box, 500m left
COLD = host("cold", cpu_used=1000)
IMAGES = {"warm": frozenset(d for d, _ in PARTS), "cold": frozenset()}


def box(name: str = "box") -> Vmi:
    return Vmi("ns", name, "bad", 3, PARTS, cpu_millis=2000, memory_bytes=2 * GI)


def evacuate(
    vmis: list[Vmi], r: TargetRoom | None, migrations: tuple[Migration, ...] = ()
) -> list[str]:
    planned = plan_evacuation(
        member="bad",
        incident="i1",
        vmis=vmis,
        migrations=list(migrations),
        limits=LIMITS,
        targets=[("warm", 3), ("cold", 3)],
        images=IMAGES,
        room=r,
    )
    return [f"{m['spec']['vmiName']}>{m['spec']['addedNodeSelector'][HOST]}" for m in planned]


def test_an_evacuation_skips_the_full_member_that_caches_the_box() -> None:
    assert evacuate([box()], None) == ["box>warm"]  # cache first, room unknown: captured
    assert evacuate([box()], room(WARM_BUT_FULL, COLD)) == ["box>cold"]


def test_a_plan_spends_the_room_it_gives_and_a_vmi_that_fits_nowhere_waits() -> None:
    small_room = host("cold", cpu_used=5000)  # 3 CPUs left: one 2-CPU box
    got = evacuate([box("a"), box("b")], room(WARM_BUT_FULL, small_room))
    assert got == ["a>cold"]  # b waits for room rather than being pinned where it cannot run


def test_a_vmi_migrating_in_takes_its_room_before_kubevirt_places_it() -> None:
    other = {("ns", "other"): Footprint("elsewhere", 3000, GI)}
    cold = host("cold", cpu_used=4000)  # 4 CPUs left, 3 of them for the VMI on its way
    arriving = Migration("ns", "m0", "other", "elsewhere", None, "Scheduling", pinned="cold")
    assert evacuate([box()], room(WARM_BUT_FULL, cold, migrations=(arriving,), placed=other)) == []
    arrived = {("ns", "other"): Footprint("cold", 3000, GI)}  # and counted in cold's usage
    done = Migration("ns", "m0", "other", "elsewhere", "cold", "Succeeded")
    got = evacuate([box()], room(WARM_BUT_FULL, cold, migrations=(done,), placed=arrived))
    assert got == ["box>cold"]


def test_a_tenants_pending_migrations_hold_no_room() -> None:
    """Migrations a tenant pins to a member and KubeVirt never schedules (over its parallel
    limits, or a selector no node has) must not keep gtvp's evacuations away from it."""
    big = {("t", f"v{i}"): Footprint("outside", 3000, GI) for i in range(2)}
    pending = tuple(
        Migration("t", f"m{i}", f"v{i}", "outside", None, "Pending", pinned="cold", foreign=True)
        for i in range(2)
    )
    assert evacuate([box()], room(WARM_BUT_FULL, COLD, migrations=pending, placed=big)) == [
        "box>cold"
    ]
    scheduled = tuple(dataclasses.replace(m, target="cold", phase="Running") for m in pending)
    assert evacuate([box()], room(WARM_BUT_FULL, COLD, migrations=scheduled, placed=big)) == []


def test_a_vmi_that_asks_for_nothing_fits_anywhere() -> None:
    over = host("cold", cpu_used=9000)  # overcommitted: free CPU below zero
    nothing = Vmi("ns", "tiny", "bad", 3, (), cpu_millis=0, memory_bytes=GI)
    assert len(evacuate([nothing], room(host("warm", 9000), over))) == 1  # either will do


def test_memory_counts_as_much_as_cpu() -> None:
    r = room(host("warm", cpu_used=0, mem_used=31 * GI), COLD)
    assert evacuate([box()], r) == ["box>cold"]


def test_a_member_whose_allocatable_is_unknown_is_not_judged() -> None:
    unknown = host("warm", cpu_used=0, cpu=0, mem=0)  # a Node without allocatable
    assert evacuate([box()], room(unknown, COLD)) == ["box>warm"]


def test_a_drain_skips_full_members_and_says_why_it_waits() -> None:
    evacuee = Evacuee("ns", "box", "bad", 3, box=True, parts=PARTS, cpu_millis=2000,
                      memory_bytes=2 * GI)  # fmt: skip
    targets = [DrainTarget("warm", 3, True, images=IMAGES["warm"]), DrainTarget("cold", 3, True)]

    def drain(r: TargetRoom) -> tuple[list[str], Mapping[tuple[str, str], str]]:
        got = plan_drains(
            evacuees=[evacuee],
            migrations=[],
            history={},
            node_of={("ns", "box"): "bad"},
            limits=LIMITS,
            targets=targets,
            room=r,
        )
        return [m["spec"]["addedNodeSelector"][HOST] for m in got.migrations], got.waiting

    assert drain(room(WARM_BUT_FULL, COLD)) == (["cold"], {})
    moved, waiting = drain(room(WARM_BUT_FULL, host("cold", cpu_used=7000)))
    assert moved == []
    assert waiting[("ns", "box")] == (
        "no member that may take it has room for what its pod asks (2000m CPU and 2.0 GiB, "
        "KubeVirt's overhead included)"
    )


# A member fills up after gtvp pinned a migration there: the attacker waits for the pin, then
# fills the member (or a busy pool does). Left alone, the target pod waits for room until
# KubeVirt fails the migration; three failures and the VM stays on the untrusted host.


def pinned(name: str, vmi: str, to: str, phase: str = "Pending") -> Migration:
    target = None if phase == "Pending" else to  # scheduled: KubeVirt recorded the target
    return Migration("ns", name, vmi, "bad", target, phase, pinned=to, evacuates="bad")


ON_BAD = {("ns", n): Footprint("bad", 2000, 2 * GI) for n in ("a", "b", "c")}


def stale(r: TargetRoom, migrations: list[Migration], targets: list[tuple[str, int]]) -> list[str]:
    got = stale_evacuations(
        member="bad",
        vmis=[box("a"), box("b"), box("c")],
        migrations=migrations,
        targets=targets,
        room=r,
    )
    return [f"{s.name}: {s.why}" for s in got]


def test_an_evacuation_pinned_to_a_member_that_filled_up_is_taken_back() -> None:
    migrations = [pinned("ev-a", "a", "cold"), pinned("ev-b", "b", "cold")]
    roomy = host("cold", cpu_used=1000)  # 7 CPUs left: both fit
    both = [("cold", 3), ("warm", 3)]
    assert stale(room(roomy, migrations=tuple(migrations), placed=ON_BAD), migrations, both) == []
    filled = host("cold", cpu_used=5000)  # a tenant's 4 CPUs landed: room for one of the two
    got = stale(room(filled, migrations=tuple(migrations), placed=ON_BAD), migrations, both)
    assert got == [  # the last by name goes back; the other still fits
        "ev-b: its target cold has no room for it any more before the migration was scheduled"
    ]


def test_only_gtvps_unscheduled_pins_are_taken_back_and_only_for_what_the_member_lacks() -> None:
    scheduled = pinned("ev-a", "a", "cold", phase="Scheduled")
    pending = pinned("ev-b", "b", "cold")
    migrations = [scheduled, pending]
    over = host("cold", cpu_used=7000, mem_used=0)  # 1 CPU left before either: over by 3
    got = stale(room(over, migrations=tuple(migrations), placed=ON_BAD), migrations, [("cold", 3)])
    assert [g.split(":")[0] for g in got] == ["ev-b"]  # the scheduled one stays: KubeVirt has it
    mem_full = host("cold", cpu_used=0, mem_used=31 * GI)  # memory, not CPU, is what lacks
    got = stale(room(mem_full, migrations=(pending,), placed=ON_BAD), [pending], [("cold", 3)])
    assert [g.split(":")[0] for g in got] == ["ev-b"]


def test_an_evacuation_pinned_to_a_member_that_lost_trust_is_taken_back() -> None:
    migrations = [pinned("ev-a", "a", "cold")]
    r = room(COLD, migrations=tuple(migrations), placed=ON_BAD)
    assert stale(r, migrations, [("cold", 3)]) == []
    assert stale(r, migrations, [("cold", 2)]) == [
        "ev-a: its target cold is no longer a usable member of level 3 before the migration "
        "was scheduled"
    ]
    assert len(stale(r, migrations, [])) == 1  # not usable at all any more


def test_a_drain_pinned_to_a_member_that_filled_up_is_cancelled() -> None:
    evacuee = Evacuee("ns", "a", "bad", 3, cpu_millis=2000, memory_bytes=2 * GI)
    m = Migration("ns", "dr-a", "a", "bad", None, "Pending", pinned="cold", drains="bad")
    targets = [DrainTarget("cold", 3, True), DrainTarget("warm", 3, True)]

    def cancelled(cold: Member) -> list[str]:
        got = plan_drains(
            evacuees=[evacuee],
            migrations=[m],
            history={},
            node_of={("ns", "a"): "bad"},
            limits=LIMITS,
            targets=targets,
            room=room(cold, host("warm", 0), migrations=(m,), placed=ON_BAD),
        )
        return [c.why for c in got.cancel]

    assert cancelled(host("cold", cpu_used=6000)) == []  # exactly full with it: it fits
    assert cancelled(host("cold", cpu_used=6001)) == [
        "its target cold has no room for it any more before the migration was scheduled"
    ]


def test_a_pin_gtvp_may_not_take_back_is_skipped_not_counted_as_taken_back() -> None:
    r = room(host("cold", cpu_used=7000))  # 1 CPU left before any pin
    for name, cpu in (("m-a", 2000), ("m-z", 2000)):  # m-z: a foreign or scheduled one
        r.take("cold", cpu, GI)
        r.inbound.setdefault("cold", []).append((("ns", name), cpu, GI))
    assert r.overcommitted({("ns", "m-a")}) == {("ns", "m-a"): "cold"}  # m-z is not gtvp's
    assert r.overcommitted(set()) == {}


def test_only_pins_that_ask_what_the_member_lacks_go_back() -> None:
    r = room(host("cold", cpu_used=0, mem_used=31 * GI))  # memory is short, CPU is not
    r.take("cold", 1000, 0)
    r.inbound["cold"] = [(("ns", "m-z"), 1000, 0)]  # asks no memory: no help to take back
    r.take("cold", 1000, 2 * GI)
    r.inbound["cold"].append((("ns", "m-a"), 1000, 2 * GI))
    assert r.overcommitted({("ns", "m-a"), ("ns", "m-z")}) == {("ns", "m-a"): "cold"}


def test_a_pin_taken_back_on_the_way_that_fits_after_all_stays() -> None:
    r = room(host("cold", cpu_used=6500))  # 1.5 CPUs left
    for name, cpu in (("m-a", 2000), ("m-b", 1000)):
        r.take("cold", cpu, 0)
        r.inbound.setdefault("cold", []).append((("ns", name), cpu, 0))
    # over by 1.5 CPUs: m-b (last) goes first and is not enough, m-a too; with m-a gone,
    # m-b fits again
    assert r.overcommitted({("ns", "m-a"), ("ns", "m-b")}) == {("ns", "m-a"): "cold"}


def test_a_migration_being_deleted_is_no_failed_attempt_but_numbers_the_next() -> None:
    """KubeVirt marks a migration deleted before its hand-off Failed on its way out: one gtvp
    took back must not count towards the three failures that stall an evacuation, and the
    next attempt must not reuse its name while it is still terminating."""

    def failed(i: int, *, deleting: bool = False) -> Migration:
        return Migration("ns", f"ev-{i}", "a", "bad", None, "Failed", evacuates="bad", attempt=i,
                         deleting=deleting)  # fmt: skip

    gone = [failed(i, deleting=True) for i in range(3)]
    assert evacuation_stalled(member="bad", vmis=[box("a")], migrations=gone) == {}
    again = plan_evacuation(member="bad", incident="i1", vmis=[box("a")], migrations=gone,
                            limits=LIMITS)  # fmt: skip
    assert [m["metadata"]["annotations"]["gtvp.io/evacuation-attempt"] for m in again] == ["3"]
    # failures with a cancelled one in between are still three in a row
    mixed = [failed(0), failed(1, deleting=True), failed(2), failed(3)]
    assert len(evacuation_stalled(member="bad", vmis=[box("a")], migrations=mixed)) == 1
    assert evacuation_stalled(member="bad", vmis=[box("a")], migrations=mixed[1:]) == {}
    drain = {"metadata": {"namespace": "ns", "labels": {"gtvp.io/drain": "bad"},
                          "deletionTimestamp": "2026-12-02T00:00:00Z"},
             "spec": {"vmiName": "a"}, "status": {"phase": "Failed"}}  # fmt: skip
    assert drain_history([drain]) == {("ns", "a", "bad"): [(0, "Cancelled", "", None)]}


def test_a_name_held_by_a_migration_on_its_way_out_is_not_one_started() -> None:
    planned = plan_evacuation(member="bad", incident="i1", vmis=[box("a")], migrations=[],
                              limits=LIMITS)[0]  # fmt: skip
    held = json.loads(json.dumps(planned))
    assert is_planned_migration(held, planned)
    held["metadata"]["deletionTimestamp"] = "2026-12-02T00:00:00Z"  # gtvp took it back
    assert not is_planned_migration(held, planned)


def test_a_delete_is_only_conditional_never_blind() -> None:
    # a copy gtvp wrote itself (no uid, no resourceVersion) cannot make the delete
    # conditional: nothing is deleted, no API call is made (no client is needed)
    assert kube.delete_unchanged(cast(Any, None), MIGRATIONS, {"metadata": {"name": "m"}}) is False


def test_gtvps_own_balancing_move_pinned_where_it_cannot_go_is_taken_back_too() -> None:
    """A balancing (or drain) migration of a VMI on a member that then lost trust, pinned
    to a target that can no longer take it: the VMI counts as busy, so nothing else moves
    it until KubeVirt fails that migration minutes later; taken back like an evacuation
    (found by a review). A tenant's own migration is not gtvp's to take back here."""
    balancing = Migration("ns", "gtvp-balance-a", "a", None, None, "Pending", pinned="drained")
    drain = Migration("ns", "gtvp-drain-b", "b", None, None, "Pending", pinned="gone", drains="bad")
    tenant = Migration("ns", "mine", "c", None, None, "Pending", pinned="gone", foreign=True)
    migrations = [balancing, drain, tenant]
    r = room(host("cold", cpu_used=0), migrations=tuple(migrations), placed=ON_BAD)
    assert stale(r, migrations, [("cold", 3)]) == [
        "gtvp-balance-a: its target drained is no longer a usable member of level 3 before "
        "the migration was scheduled",
        "gtvp-drain-b: its target gone is no longer a usable member of level 3 before the "
        "migration was scheduled",
    ]
