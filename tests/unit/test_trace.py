"""Load traces and the hindsight planner of the balancing benchmark."""

from __future__ import annotations

from gtvp_local.trace import GI, Event, Trace, day, hindsight, synthetic


def _trace(*events: Event, members: tuple[str, ...] = ("m1", "m2")) -> Trace:
    return Trace("t", members, 8000, 32 * GI, events, 60.0)


def _vm(at: float, name: str, member: str, cpu: int) -> Event:
    return Event(at, "create", name, member, cpu * 1000, GI)


def test_an_overload_is_relieved_with_the_fewest_moves_largest_first() -> None:
    t = _trace(*(_vm(0, f"v{i}", "m1", 1) for i in range(6)), _vm(0, "big", "m1", 2),
               _vm(5, "more", "m1", 1))  # fmt: skip
    got = hindsight(t)  # m1 at 9/8: the 2-CPU VM, then one more (7/8 = 87.5 %)
    assert got.migrations == 2
    assert got.bytes_moved == 2 * GI


def test_hindsight_sends_a_vm_where_the_future_leaves_room() -> None:
    """m2 is the least loaded member when m1 overloads, but six VMs will arrive there: a VM
    moved to m2 would overload it then and need a second move; m3 stays quiet."""
    t = _trace(
        *(_vm(0, f"v{i}", "m1", 1) for i in range(7)),  # m1 at 7/8
        _vm(0, "x0", "m3", 1),
        _vm(0, "x1", "m3", 1),
        *(_vm(10, f"w{i}", "m2", 1) for i in range(6)),  # m2 at 6/8, or 7/8 with the VM
        members=("m1", "m2", "m3"),
    )
    got = hindsight(t)
    assert got.migrations == 1
    assert got.bytes_moved == GI


def test_an_overload_that_a_deletion_ends_within_the_sustain_window_needs_no_move() -> None:
    t = _trace(*(_vm(0, f"v{i}", "m1", 1) for i in range(7)), Event(2, "delete", "v0"))
    assert hindsight(t, sustain_for=4.0).migrations == 0
    assert hindsight(t, sustain_for=1.0).migrations == 1


def test_a_leaving_members_vms_are_evacuations_not_balancing() -> None:
    t = _trace(_vm(0, "a", "m1", 1), _vm(0, "b", "m1", 1), Event(3, "leave", member="m1"))
    got = hindsight(t)
    assert (got.migrations, got.evacuations) == (0, 2)


def test_the_recorded_traces_are_reproducible_and_need_balancing() -> None:
    assert day() == day()
    for t in (synthetic(), day()):
        assert {e.kind for e in t.events} >= {"create", "delete", "join", "leave"}
        assert hindsight(t).migrations > 0
