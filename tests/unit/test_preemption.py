"""A move a tenant's own evidence caused gives way to the evacuation of a member that lost
trust when it is what holds that evacuation back: under maxParallel 1 the tenants' half of
the budget was all of it, and their moves held the targets' inbound slots (both were left
open by the tenants' share). Nothing else of gtvp's is ever deleted for it, and nothing is
deleted that would not let the evacuation start."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from gtvp.core.evacuation import Migration, Vmi, migration_view, plan_evacuation
from gtvp.core.migration_budget import tenant_share
from gtvp.core.policy import MigrationLimits
from gtvp.core.preemption import preemption
from gtvp.core.target_room import TargetRoom

T0 = dt.datetime(2026, 12, 6, tzinfo=dt.UTC)
TARGETS = [("t1", 2), ("t2", 2)]
LOST = [Vmi("ns", "vm1", "b", 2, (), 1000, 2**30)]  # on member b, which lost trust
TENANTS = {("ns", "box0"): "a", ("ns", "box1"): "a"}  # boxes whose evidence failed on a


def roomy() -> TargetRoom:
    return TargetRoom.of({"t1": (8000, 2**35), "t2": (8000, 2**35)}, {}, [], {})


def box_move(
    box: str, *, target: str = "t1", phase: str = "Running", age: int = 60, off: str = "a"
) -> Migration:
    """gtvp's evacuation of box `box` off member `off`."""
    (obj,) = plan_evacuation(
        member=off,
        incident="attest-1",
        vmis=[Vmi("ns", box, off, 2)],
        migrations=[],
        limits=MigrationLimits(),
        targets=[(target, 2)],
    )
    m = migration_view(obj)
    return Migration(m.namespace, m.name, m.vmi, off, target, phase, m.pinned, m.evacuates,
                     created=T0 - dt.timedelta(seconds=age))  # fmt: skip


def evacuation_of_b(
    room: TargetRoom,
    *,
    vmis: Sequence[Vmi] = LOST,
    allowed: dict[Any, frozenset[str]] | None = None,
) -> Any:
    def plan(about: Sequence[Migration], limits: MigrationLimits) -> list[dict[str, Any]]:
        return plan_evacuation(member="b", incident="lost", vmis=vmis, migrations=about,
                               limits=limits, targets=TARGETS, room=room.copy(),
                               allowed=allowed)  # fmt: skip

    return plan


def ask(
    migrations: list[Migration],
    limits: MigrationLimits,
    *,
    room: TargetRoom | None = None,
    vmis: Sequence[Vmi] = LOST,
    allowed: dict[Any, frozenset[str]] | None = None,
    tenants: dict[tuple[str, str], str] = TENANTS,
) -> tuple[bool, str | None]:
    plan = evacuation_of_b(room or roomy(), vmis=vmis, allowed=allowed)
    got = preemption(plan=plan, migrations=migrations, limits=limits, tenants_moves=tenants)
    if got.delete is not None:  # whatever it deletes lets the evacuation start
        assert plan([m for m in migrations if m.name != got.delete.name], limits)
    return got.held, None if got.delete is None else got.delete.vmi


def test_under_max_parallel_one_the_tenants_move_gives_way() -> None:
    one = MigrationLimits(max_parallel=1)
    moves = [box_move("box0")]
    # before: the tenants' share of a cluster limit of 1 is that one slot, and the member's
    # evacuation plans nothing while the box's move runs
    assert evacuation_of_b(roomy())(moves, one) == []
    assert ask(moves, one) == (True, "box0")
    # while it waits, the tenants start nothing
    held = tenant_share(one, [], {("ns", "box0")}, yielding=True)
    assert plan_evacuation(member="a", incident="attest-2", vmis=[Vmi("ns", "box0", "a", 2)],
                           migrations=[], limits=held, targets=TARGETS) == []  # fmt: skip


def test_a_tenants_move_holding_the_only_open_targets_inbound_slot_gives_way() -> None:
    limits = MigrationLimits(max_parallel=5, max_inbound_per_node=1)
    moves = [box_move("box0", target="t1"), box_move("box1", target="t2")]
    # the cluster limit does not hold it back: a move gives way, the tenants do not yield
    held, deleted = ask(moves, limits)
    assert not held
    assert deleted in {"box0", "box1"}
    # only t2 has room for the VM: the move into t2 gives way, not the one into t1
    small = TargetRoom.of({"t1": (500, 2**35), "t2": (8000, 2**35)}, {}, [], {})
    assert ask(moves, limits, room=small) == (False, "box1")


def test_the_move_not_yet_scheduled_gives_way_before_one_under_way_then_the_oldest() -> None:
    limits = MigrationLimits(max_parallel=2)
    running = box_move("box0", age=300)
    pending = box_move("box1", phase="Scheduling", age=5)
    assert ask([running, pending], limits) == (True, "box1")
    older = box_move("box1", age=600)
    assert ask([running, older], limits) == (True, "box1")


def test_only_a_boxs_move_off_the_member_its_evidence_failed_on_gives_way() -> None:
    """Not a drain, not balancing, not another member's evacuation of the same box (that
    member lost trust too: the box moves for its sake), and nothing not gtvp's."""
    one = MigrationLimits(max_parallel=1)
    base = box_move("box0")
    drain = Migration("ns", "d", "box0", "a", "t1", "Running", "t1", drains="a")
    balancing = Migration("ns", "bal", "box0", "a", "t1", "Running", "t1")
    other = box_move("box0", off="c")  # member c lost trust, and the box runs on it
    foreign = Migration("ns", "f", "box0", "a", "t1", "Running", foreign=True)
    for m in (drain, balancing, other):
        assert ask([m], one) == (True, None), m
    assert ask([foreign], one) == (False, None)  # not gtvp's: no limit counts it
    # the box's member no longer holds its level: not in the tenants' moves at all
    assert ask([base], one, tenants={}) == (True, None)


def test_nothing_gives_way_when_that_would_not_let_the_evacuation_start() -> None:
    limits = MigrationLimits(max_parallel=2)
    moves = [box_move("box0")]
    # a slot is free: the evacuation starts in this pass
    assert ask(moves, limits) == (False, None)
    one = MigrationLimits(max_parallel=1)
    # no target has room for the VM: a slot would not move it (it waits for room)
    full = TargetRoom.of({"t1": (500, 2**35), "t2": (500, 2**35)}, {}, [], {})
    assert ask(moves, one, room=full) == (False, None)
    # its own node affinity allows no target with room
    assert ask(moves, one, allowed={("ns", "vm1"): frozenset({"t9"})}) == (False, None)
    # the member's own moves fill its outbound slots (KubeVirt has recorded no source yet:
    # the plan counts them by the VMI on the member)
    own = [Vmi("ns", f"v{i}", "b", 2) for i in range(2)]
    out = [Migration("ns", f"out{i}", f"v{i}", None, None, "Pending", "t2", evacuates="b")
           for i in range(2)]  # fmt: skip
    assert ask([*out, *moves], MigrationLimits(max_parallel=3), vmis=[*own, *LOST]) == (
        False,
        None,
    )
    # nothing waits
    assert ask(moves, one, vmis=[]) == (False, None)
