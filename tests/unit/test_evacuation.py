"""Planning evacuations: limits hold even before KubeVirt records a migration's source,
only gtvp's own migrations count against them, and a failed or squatted name is retried
under another name."""

from __future__ import annotations

import datetime as dt
from typing import Any

from gtvp.core.evacuation import (
    EVACUATION_ATTEMPT_ANNOTATION,
    FOREIGN_HOLD_GRACE,
    MAX_EVACUATION_FAILURES,
    Migration,
    Vmi,
    cannot_migrate,
    drain_history,
    evacuation_stalled,
    foreign_holds,
    is_planned_migration,
    migration_name,
    migration_view,
    plan_evacuation,
    untrusted_actions,
)
from gtvp.core.policy import MigrationLimits

LIMITS = MigrationLimits(max_parallel=5, max_outbound_per_node=2, max_inbound_per_node=2)
ATTEMPT = EVACUATION_ATTEMPT_ANNOTATION


def _vmis(n: int, node: str = "bad") -> list[Vmi]:
    return [Vmi("ns", f"vm{i}", node, 3) for i in range(n)]


def test_outbound_limit_holds_for_migrations_without_a_source_yet() -> None:
    vmis = _vmis(4)
    first = plan_evacuation(member="bad", incident="x", vmis=vmis, migrations=[], limits=LIMITS)
    assert len(first) == 2
    in_flight = [
        Migration("ns", m["metadata"]["name"], m["spec"]["vmiName"], None, None, "Pending")
        for m in first
    ]
    again = plan_evacuation(
        member="bad", incident="x", vmis=vmis, migrations=in_flight, limits=LIMITS
    )
    assert again == []  # not 2 more: the first two still leave this member


def test_names_are_deterministic_per_incident() -> None:
    vmi = _vmis(1)[0]
    assert migration_name(vmi, "PcrMismatch@t1") == migration_name(vmi, "PcrMismatch@t1")
    assert migration_name(vmi, "PcrMismatch@t1") != migration_name(vmi, "PcrMismatch@t2")


def test_finished_migrations_free_the_budget_and_higher_levels_go_first() -> None:
    vmis = [Vmi("ns", "low", "bad", 1), Vmi("ns", "high", "bad", 3), Vmi("ns", "mid", "bad", 2)]
    done = [Migration("ns", "old", "other", "bad", "good", "Succeeded")]
    plan = plan_evacuation(member="bad", incident="x", vmis=vmis, migrations=done, limits=LIMITS)
    assert [m["spec"]["vmiName"] for m in plan] == ["high", "mid"]
    selector = plan[0]["spec"]["addedNodeSelector"]
    assert selector["node-restriction.kubernetes.io/gtvp-level-3"] == "true"


def _body(
    name: str,
    vmi: str,
    *,
    namespace: str = "ns",
    labels: dict[str, str] | None = None,
    phase: str | None = None,
    pinned: str | None = None,
) -> dict[str, Any]:
    """A VirtualMachineInstanceMigration as the API server holds it."""
    spec: dict[str, Any] = {"vmiName": vmi}
    if pinned:
        spec["addedNodeSelector"] = {"kubernetes.io/hostname": pinned}
    obj: dict[str, Any] = {
        "metadata": {"namespace": namespace, "name": name, "labels": labels or {}},
        "spec": spec,
    }
    if phase:
        obj["status"] = {"phase": phase}
    return obj


def _finished(planned: dict[str, Any], phase: str) -> Migration:
    return migration_view({**planned, "status": {"phase": phase}})


def test_cluster_limit_holds() -> None:
    """gtvp's own migrations (evacuation, drain, balancing) fill the cluster limit."""
    kinds = ["gtvp.io/evacuation", "gtvp.io/drain", "gtvp.io/balancing"]
    busy = [
        migration_view(_body(f"m{i}", f"x{i}", labels={kinds[i % 3]: "elsewhere"}, phase="Running"))
        for i in range(5)
    ]
    assert (
        plan_evacuation(member="bad", incident="x", vmis=_vmis(3), migrations=busy, limits=LIMITS)
        == []
    )


def test_foreign_pending_migrations_do_not_block_a_security_evacuation() -> None:
    """A tenant's migrations that never schedule (pinned to a host that does not exist) are
    KubeVirt's to queue: they do not use up the policy's limits for gtvp's evacuations."""
    stuck = [
        migration_view(_body(f"hog{i}", f"tiny{i}", namespace="tenant", pinned="nowhere"))
        for i in range(5)
    ]
    plan = plan_evacuation(
        member="bad",
        incident="x",
        vmis=_vmis(3),
        migrations=stuck,
        limits=LIMITS,
        targets=[("good", 3)],
    )
    assert [m["spec"]["vmiName"] for m in plan] == ["vm0", "vm1"]  # the outbound limit: 2


def test_a_failed_evacuation_is_retried_under_a_new_name() -> None:
    vmis = _vmis(1)
    first = plan_evacuation(member="bad", incident="x", vmis=vmis, migrations=[], limits=LIMITS)
    failed = [_finished(first[0], "Failed")]
    again = plan_evacuation(member="bad", incident="x", vmis=vmis, migrations=failed, limits=LIMITS)
    assert len(again) == 1
    assert again[0]["metadata"]["name"] != first[0]["metadata"]["name"]
    assert again[0]["metadata"]["annotations"][ATTEMPT] == "1"
    # deterministic: an operator restarted now plans the same retry
    assert again == plan_evacuation(
        member="bad", incident="x", vmis=vmis, migrations=failed, limits=LIMITS
    )


def test_an_evacuation_that_succeeded_before_does_not_block_the_next_one() -> None:
    """The VMI came back to the member, which loses its level again (the same incident)."""
    vmis = _vmis(1)
    first = plan_evacuation(
        member="bad", incident="level-2", vmis=vmis, migrations=[], limits=LIMITS
    )
    done = [_finished(first[0], "Succeeded")]
    again = plan_evacuation(
        member="bad", incident="level-2", vmis=vmis, migrations=done, limits=LIMITS
    )
    assert [m["metadata"]["name"] for m in again] != [first[0]["metadata"]["name"]]
    assert len(again) == 1


def test_a_name_held_by_a_migration_gtvp_did_not_start_is_not_read_as_started() -> None:
    vmis = _vmis(1)
    planned = plan_evacuation(member="bad", incident="x", vmis=vmis, migrations=[], limits=LIMITS)
    name = planned[0]["metadata"]["name"]
    squatters = [
        migration_view(_body(name, "decoy", phase="Pending")),  # no label, another VMI
        migration_view(_body(name, "vm0", phase="Succeeded")),  # its VMI, but no gtvp label
        migration_view(  # a gtvp label, but another VMI
            _body(name, "decoy", labels={"gtvp.io/evacuation": "bad"}, phase="Failed")
        ),
    ]
    for squatter in squatters:
        plan = plan_evacuation(
            member="bad", incident="x", vmis=vmis, migrations=[squatter], limits=LIMITS
        )
        assert len(plan) == 1, squatter
        assert plan[0]["metadata"]["name"] != name, squatter
    # several names held: the plan moves on until one is free
    held = [migration_view(_body(name, "decoy"))]
    for _ in range(3):
        nxt = plan_evacuation(
            member="bad", incident="x", vmis=vmis, migrations=held, limits=LIMITS
        )[0]["metadata"]["name"]
        assert nxt not in {m.name for m in held}
        held.append(migration_view(_body(nxt, "decoy")))


def test_an_existing_name_is_read_as_started_only_when_it_is_this_attempt() -> None:
    """On AlreadyExists the handler reads the object holding the name: only gtvp's own
    migration of this VMI, member and attempt is one 'started before'."""
    failed = [
        _finished(
            plan_evacuation(
                member="bad", incident="x", vmis=_vmis(1), migrations=[], limits=LIMITS
            )[0],
            "Failed",
        )
    ]
    planned = plan_evacuation(
        member="bad", incident="x", vmis=_vmis(1), migrations=failed, limits=LIMITS
    )[0]
    name = planned["metadata"]["name"]
    assert is_planned_migration({**planned, "status": {"phase": "Running"}}, planned)
    labels = {"gtvp.io/evacuation": "bad"}
    not_it = [
        _body(name, "vm0"),  # no gtvp label
        _body(name, "vm0", labels={"gtvp.io/drain": "bad"}),
        _body(name, "decoy", labels=labels),  # another VMI
        _body(name, "vm0", labels={"gtvp.io/evacuation": "good"}),  # another member
        _body(name, "vm0", labels=labels),  # attempt 0 (no annotation), not attempt 1
    ]
    for held in not_it:
        assert not is_planned_migration(held, planned), held


def test_a_tenants_attempt_annotation_cannot_break_the_plan() -> None:
    """Annotations are anyone's to write: one int() refuses reads as attempt 0."""
    for raw in ["\u00b2", "9" * 5000, "-1", "1e3", ""]:
        meta = {"annotations": {ATTEMPT: raw, "gtvp.io/drain-attempt": raw}}
        body = {**_body("x", "vm0", labels={"gtvp.io/evacuation": "bad"}), "metadata": meta}
        assert migration_view(body).attempt == 0
        drain = {**body, "metadata": {**meta, "labels": {"gtvp.io/drain": "bad"}}}
        assert drain_history([drain]) == {("", "vm0", "bad"): [(0, "Pending", "", None)]}


def test_after_repeated_failures_the_vmi_waits() -> None:
    """Three failed evacuation migrations in a row: no fourth one a second later."""
    vmis = _vmis(1)
    history: list[Migration] = []
    for attempt in range(MAX_EVACUATION_FAILURES):
        plan = plan_evacuation(
            member="bad", incident="x", vmis=vmis, migrations=history, limits=LIMITS
        )
        assert plan[0]["metadata"]["annotations"][ATTEMPT] == str(attempt)
        history.append(_finished(plan[0], "Failed"))
    assert (
        plan_evacuation(member="bad", incident="x", vmis=vmis, migrations=history, limits=LIMITS)
        == []
    )
    why = evacuation_stalled(member="bad", vmis=vmis, migrations=history)[("ns", "vm0")]
    assert why.startswith("the last 3 evacuation migrations of ns/vm0 off bad failed;")
    # where they went is said when gtvp pinned them (here no targets were given)
    assert all(m.name in why for m in history)  # what to delete to try again
    assert evacuation_stalled(member="bad", vmis=vmis, migrations=history[:2]) == {}
    # a new incident does not reset the count: the host is as untrusted as before
    assert (
        plan_evacuation(member="bad", incident="y", vmis=vmis, migrations=history, limits=LIMITS)
        == []
    )
    # a migration gtvp did not start failing does not count against the VMI
    other = [*history[:2], migration_view(_body("mine", "vm0", phase="Failed"))]
    assert plan_evacuation(member="bad", incident="x", vmis=vmis, migrations=other, limits=LIMITS)


def test_a_retry_goes_where_no_attempt_failed_while_such_a_member_can_take_the_vmi() -> None:
    """The attack: fill the member gtvp pins a sensitive VM's evacuation to with what gtvp
    does not count (plain pods, KubeVirt's per-VM overhead). The scheduler cannot place the
    target pod there, KubeVirt fails the migration, and were every retry pinned to the same
    member, three failures would leave the VM on the untrusted host."""
    targets = [("a-first", 3), ("b-later", 3), ("c-last", 3)]

    def pinned(history: list[Migration]) -> list[str]:
        plan = plan_evacuation(member="bad", incident="x", vmis=_vmis(1), migrations=history,
                               limits=LIMITS, targets=targets)  # fmt: skip
        return [m["spec"]["addedNodeSelector"]["kubernetes.io/hostname"] for m in plan]

    first = plan_evacuation(member="bad", incident="x", vmis=_vmis(1), migrations=[],
                            limits=LIMITS, targets=targets)  # fmt: skip
    assert pinned([]) == ["a-first"]
    history = [_finished(first[0], "Failed")]
    assert pinned(history) == ["b-later"]
    second = plan_evacuation(member="bad", incident="x", vmis=_vmis(1), migrations=history,
                             limits=LIMITS, targets=targets)  # fmt: skip
    history.append(_finished(second[0], "Failed"))
    assert pinned(history) == ["c-last"]
    # where every eligible member failed once, the VMI is still retried (three failures
    # in a row stall it), not left waiting
    two = plan_evacuation(member="bad", incident="x", vmis=_vmis(1), migrations=history,
                          limits=LIMITS, targets=targets[:2])  # fmt: skip
    assert [m["metadata"]["annotations"][ATTEMPT] for m in two] == ["2"]
    assert two[0]["spec"]["addedNodeSelector"]["kubernetes.io/hostname"] == "a-first"
    stalled = evacuation_stalled(member="bad", vmis=_vmis(1),
                                 migrations=[*history, _finished(two[0], "Failed")])  # fmt: skip
    assert "off bad failed (towards a-first, b-later);" in stalled[("ns", "vm0")]
    # the node KubeVirt placed a failed attempt on counts, not only the one gtvp pinned
    elsewhere = {"phase": "Failed", "migrationState": {"targetNode": "c-last"}}
    history[1] = migration_view({**second[0], "status": elsewhere})
    assert pinned(history) == ["b-later"]


def test_inbound_limit_holds_and_targets_are_spread() -> None:
    limits = MigrationLimits(max_parallel=10, max_outbound_per_node=10, max_inbound_per_node=2)
    targets = [("t1", 3), ("t2", 3), ("low", 1)]
    plan = plan_evacuation(
        member="bad", incident="x", vmis=_vmis(6), migrations=[], limits=limits, targets=targets
    )
    pinned = [m["spec"]["addedNodeSelector"]["kubernetes.io/hostname"] for m in plan]
    assert sorted(pinned) == ["t1", "t1", "t2", "t2"]  # 2 each; "low" cannot take level 3
    assert plan[0]["spec"]["addedNodeSelector"]["node-restriction.kubernetes.io/gtvp-level-3"]
    # pinned but not yet Scheduled migrations count as inbound: nothing more goes to t1/t2
    in_flight = [
        Migration("ns", m["metadata"]["name"], m["spec"]["vmiName"], None, None, "Pending", p)
        for m, p in zip(plan, pinned, strict=True)
    ]
    more = plan_evacuation(
        member="bad",
        incident="x",
        vmis=_vmis(6),
        migrations=in_flight,
        limits=limits,
        targets=targets,
    )
    assert more == []
    # a finished migration frees its target's inbound slot
    in_flight[0] = Migration("ns", "done", "vm0", "bad", pinned[0], "Succeeded", pinned[0])
    assert (
        len(
            plan_evacuation(
                member="bad",
                incident="x",
                vmis=_vmis(6),
                migrations=in_flight,
                limits=limits,
                targets=targets,
            )
        )
        == 1
    )


# ----- onUntrusted per VMI ----------------------------------------------------------------

POLICY_ACTIONS = {1: "Keep", 2: "Migrate", 3: "Stop"}


def _names(groups: dict[str, list[Vmi]]) -> dict[str, list[str]]:
    return {action: [v.name for v in vmis] for action, vmis in groups.items()}


def test_the_members_level_decides_for_the_vmis_it_may_hold_unless_theirs_is_stricter() -> None:
    vmis = [Vmi("ns", "low", "bad", 1), Vmi("ns", "mid", "bad", 2)]
    keep_all = {1: "Keep", 2: "Keep", 3: "Keep"}
    assert _names(untrusted_actions(vmis, 2, "Keep", keep_all)) == {"Keep": ["low", "mid"]}
    assert _names(untrusted_actions(vmis, 2, "Stop", keep_all)) == {"Stop": ["low", "mid"]}
    # level 2 says Migrate: its VM does not stay on a member whose level says Keep
    got = _names(untrusted_actions(vmis, 2, "Keep", POLICY_ACTIONS))
    assert got == {"Keep": ["low"], "Migrate": ["mid"]}


def test_a_vm_of_a_level_the_policy_no_longer_defines_stops_whatever_the_member() -> None:
    """Level 2 was removed from between 1 and 3: a level-2 VM on a level-3 member that lost
    trust has no level any member can be judged at, so no target will ever do: stopped."""
    vmis = [Vmi("ns", "orphan", "bad", 2)]
    got = _names(untrusted_actions(vmis, 3, "Migrate", {1: "Keep", 3: "Migrate"}))
    assert got == {"Stop": ["orphan"]}


def test_a_vm_whose_own_level_says_stop_stops_off_a_higher_member_that_says_migrate() -> None:
    """Levels 1 Keep, 2 Stop, 3 Migrate: a level-2 VM on a level-3 member that lost trust
    is not migrated (and left to wait for a target its level never allowed it to wait for):
    its own level says Stop."""
    vmis = [Vmi("ns", "keep", "bad", 1), Vmi("ns", "stop", "bad", 2), Vmi("ns", "go", "bad", 3)]
    actions = {1: "Keep", 2: "Stop", 3: "Migrate"}
    got = _names(untrusted_actions(vmis, 3, "Migrate", actions))
    assert got == {"Migrate": ["keep", "go"], "Stop": ["stop"]}


def test_a_lower_levels_keep_never_keeps_a_vmi_that_needs_more() -> None:
    """A level-3 VM on a member now judged at level 1 (its identity lowered, or its Member
    made again for its Node) does not stay on it untrusted because level 1 says Keep."""
    vmis = [Vmi("ns", "low", "bad", 1), Vmi("ns", "high", "bad", 2), Vmi("ns", "top", "bad", 3)]
    got = _names(untrusted_actions(vmis, 1, "Keep", POLICY_ACTIONS))
    assert got == {"Keep": ["low"], "Migrate": ["high"], "Stop": ["top"]}


def test_a_node_without_a_member_holds_no_gated_vmi() -> None:
    vmis = [Vmi("ns", "low", "bad", 1), Vmi("ns", "top", "bad", 3)]
    # levels the policy does not define (removed by an edit): no member can take them
    assert _names(untrusted_actions(vmis, 0, "Migrate", {})) == {"Stop": ["low", "top"]}
    assert _names(untrusted_actions(vmis, 0, "Migrate", {1: "Migrate", 2: "Migrate"})) == {
        "Migrate": ["low"],
        "Stop": ["top"],
    }
    assert _names(untrusted_actions(vmis, 0, "Migrate", POLICY_ACTIONS)) == {
        "Migrate": ["low"],
        "Stop": ["top"],
    }


def test_the_stricter_action_wins_for_a_vmi_above_the_members_level() -> None:
    vmi = [Vmi("ns", "high", "bad", 3)]
    assert _names(untrusted_actions(vmi, 1, "Stop", {3: "Keep"})) == {"Stop": ["high"]}
    assert _names(untrusted_actions(vmi, 1, "Keep", {3: "Keep"})) == {"Migrate": ["high"]}


def test_kubevirts_word_that_a_vmi_cannot_live_migrate_is_read_from_its_condition() -> None:
    """A VMI KubeVirt says cannot live-migrate would wait for ever on a member it must
    leave (every migration refused): the evacuation stops it instead. Only an explicit
    False counts; no condition (a stand-in, an older KubeVirt) or True is migratable."""

    def vmi(*conds: dict[str, str]) -> dict[str, object]:
        return {"status": {"conditions": list(conds)}}

    now = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
    rwo = {"type": "LiveMigratable", "status": "False", "reason": "DisksNotLiveMigratable",
           "message": "PVC data is not shared"}  # fmt: skip
    assert cannot_migrate(vmi(rwo), now) == "DisksNotLiveMigratable: PVC data is not shared"
    assert cannot_migrate(vmi({"type": "LiveMigratable", "status": "False"}), now) == (
        "not live-migratable"
    )
    assert cannot_migrate(vmi({"type": "LiveMigratable", "status": "True"}), now) is None
    assert cannot_migrate(vmi({"type": "Ready", "status": "False"}), now) is None
    assert cannot_migrate({}, now) is None
    # False for a moment only (KubeVirt could not tell yet): not believed before it settles
    fresh = {**rwo, "lastTransitionTime": "2026-12-04T11:59:30Z"}
    assert cannot_migrate(vmi(fresh), now) is None
    assert cannot_migrate(vmi(fresh), now + dt.timedelta(seconds=31)) is not None


def test_a_tenants_unscheduled_migration_does_not_hold_a_vm_on_a_member_it_must_leave() -> None:
    """A namespace user creates a migration of their gated VM pinned where nothing fits,
    with a long pending timeout: gtvp waits for a VMI's active migration, so the VM would
    stay on a member that lost trust for good. Such a migration, not yet scheduled, is to
    be deleted; one KubeVirt scheduled (running to a gated target), gtvp's own, and those
    of VMIs that need not leave are not."""
    leaving = [Vmi("ns", "db", "bad", 2)]

    def mig(name: str, vmi: str = "db", phase: str = "Scheduling", **kw: Any) -> Migration:
        return Migration("ns", name, vmi, "bad", kw.pop("target", None), phase, **kw)

    held = [
        mig("tenant-hold", foreign=True),
        mig("tenant-pending", phase="Pending", foreign=True),
        mig("tenant-running", phase="Running", target="good", foreign=True),
        mig("tenant-other-vmi", vmi="web", foreign=True),
        mig("tenant-going", foreign=True, deleting=True),
        mig("gtvp-own", evacuates="bad"),
    ]
    now = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
    just_made = mig("tenant-queued", foreign=True, created=now - dt.timedelta(seconds=30))
    got = foreign_holds(leaving, [*held, just_made], now)
    assert sorted(r.name for r in got) == ["tenant-hold", "tenant-pending"]  # not the new one
    later = now + FOREIGN_HOLD_GRACE  # queued by KubeVirt that long: a hold after all
    assert [r.name for r in foreign_holds(leaving, [just_made], later)] == ["tenant-queued"]
    assert all(r.vmi == "db" for r in got)
    assert "did not start" in got[0].why


def test_a_tenants_unscheduled_migrations_of_other_vms_do_not_hold_the_members_slots() -> None:
    """KubeVirt counts an unscheduled migration against its source's outbound limit (2): a
    tenant pins two migrations of small ungated VMs on the member nowhere, so every
    evacuation off it waited until migrateWithin stopped the gated VMs. The member's other
    VMIs' unscheduled migrations gtvp did not start are deleted too; elsewhere, none.
    Found by a review."""
    leaving = [Vmi("ns", "db", "bad", 2)]
    now = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
    old = now - FOREIGN_HOLD_GRACE

    def mig(name: str, vmi: str) -> Migration:
        return Migration("ns", name, vmi, None, None, "Scheduling", foreign=True, created=old)

    migrations = [mig("hold-1", "u1"), mig("hold-2", "u2"), mig("elsewhere", "far")]
    got = foreign_holds(leaving, migrations, now, [("ns", "db"), ("ns", "u1"), ("ns", "u2")])
    assert sorted(r.name for r in got) == ["hold-1", "hold-2"]
    assert all("outbound migration slots" in r.why for r in got)
    assert foreign_holds(leaving, migrations, now) == []
