"""Admission decisions (gtvp.core.gating): levels, selectors, VMs, VMIs, migrations, and the
level an object was admitted with sticking to it (issue #10: removing the label escaped)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gtvp.core.gating import (
    GatingError,
    admitted_level,
    level_of,
    selector_level,
    selector_patch,
    validate_instance,
    validate_instance_update,
    validate_migration,
    validate_vm,
    validate_vm_update,
    vm_level,
    vm_raise_warning,
    vm_template_labels,
)
from gtvp.core.trust import MemberView, trust_selector

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(seconds=30)
T = "node-restriction.kubernetes.io/gtvp-trusted"
L = "node-restriction.kubernetes.io/gtvp-level-"


def _member(name: str, level: int = 3, phase: str = "Trusted", uses: int = 5) -> MemberView:
    return MemberView(name, phase, level, LATER if phase == "Trusted" else None, uses)


POOL = [_member("a", 3), _member("b", 3), _member("low", 1), _member("bad", 3, "Untrusted")]


def _vm(meta: str | None = "3", tmpl: str | None = "3", selector: int | None = 3) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "web",
            "namespace": "ns",
            "labels": {} if meta is None else {"gtvp.io/level": meta},
        },
        "spec": {
            "template": {
                "metadata": {"labels": {} if tmpl is None else {"gtvp.io/level": tmpl}},
                "spec": {"nodeSelector": {} if selector is None else trust_selector(selector)},
            }
        },
    }


def _vmi(
    level: str | None = "3",
    selector: dict[str, str] | None = None,
    node: str | None = "a",
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "web",
            "namespace": "ns",
            "labels": {} if level is None else {"gtvp.io/level": level, "app": "web"},
        },
        "spec": {"nodeSelector": trust_selector(3) if selector is None else selector},
        "status": {"nodeName": node} if node else {},
    }


# ----- levels -----------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [str(n) for n in range(1, 10)])
def test_canonical_levels_are_read(raw: str) -> None:
    assert level_of({"gtvp.io/level": raw}) == int(raw)


def test_no_label_means_not_gated() -> None:
    assert level_of(None) is None
    assert level_of({}) is None
    assert level_of({"app": "web"}) is None


@pytest.mark.parametrize(
    ("raw", "hint"),
    [("03", '(write "3", not "03")'), ("+3", '(write "3", not "+3")'), (" 3", '(write "3"')],
)
def test_noncanonical_levels_are_refused_with_the_canonical_spelling(raw: str, hint: str) -> None:
    with pytest.raises(GatingError) as err:
        level_of({"gtvp.io/level": raw})
    assert "must be a single digit from 1 to 9" in str(err.value)
    assert hint in str(err.value)


# "\uff13" is a fullwidth 3, which str.isdigit() and int() accept
@pytest.mark.parametrize("raw", ["0", "10", "", "high", "\uff13", "3.0", "-1"])
def test_levels_out_of_range_or_unreadable_are_refused(raw: str) -> None:
    with pytest.raises(GatingError, match="must be a single digit from 1 to 9"):
        level_of({"gtvp.io/level": raw})


@given(st.text(max_size=4))
def test_only_the_nine_canonical_spellings_are_levels(raw: str) -> None:
    if raw in {str(n) for n in range(1, 10)}:
        assert level_of({"gtvp.io/level": raw}) == int(raw)
    else:
        with pytest.raises(GatingError):
            level_of({"gtvp.io/level": raw})


def test_selector_level_is_the_highest_trusted_level_selected() -> None:
    assert selector_level(None) is None
    assert selector_level({"kubernetes.io/hostname": "a"}) is None
    assert selector_level(trust_selector(2)) == 2
    assert selector_level({**trust_selector(2), f"{L}5": "true", f"{L}7": "false"}) == 5


def test_admitted_level_is_the_label_or_the_selector_whichever_is_higher() -> None:
    assert admitted_level({"gtvp.io/level": "2"}, None) == 2
    assert admitted_level({}, trust_selector(3)) == 3  # label gone, selector remembers
    assert admitted_level({"gtvp.io/level": "1"}, trust_selector(3)) == 3
    assert admitted_level({"gtvp.io/level": "03"}, None) == 3  # admitted before levels were strict
    assert admitted_level(None, None) is None
    with pytest.raises(GatingError):
        admitted_level({"gtvp.io/level": "high"}, None)


def test_selector_patch_adds_only_what_is_missing() -> None:
    assert selector_patch(None, 2) == trust_selector(2)
    assert selector_patch(trust_selector(2), 2) == {}
    assert selector_patch({T: "true", f"{L}2": "false"}, 2) == {f"{L}2": "true"}


# ----- VirtualMachines --------------------------------------------------------------------


def test_vm_level_reads_metadata_and_template() -> None:
    assert vm_level(_vm("3", "3")) == 3
    assert vm_level(_vm("2", None)) == 2
    assert vm_level(_vm(None, "2")) == 2
    assert vm_level(_vm(None, None)) is None
    assert vm_template_labels(_vm(None, "2")) == {"gtvp.io/level": "2"}


def test_vm_with_disagreeing_levels_is_refused() -> None:
    with pytest.raises(GatingError) as err:
        vm_level(_vm("3", "1"))
    assert str(err.value) == (
        'VirtualMachine ns/web: label gtvp.io/level is "3" on the VirtualMachine but "1" on its '
        "template; they must agree (its instances get the template's)"
    )
    decision = validate_vm(_vm("3", "1"))
    assert not decision.allowed
    assert "they must agree" in decision.message


def test_vm_with_a_noncanonical_level_is_refused_naming_where() -> None:
    decision = validate_vm(_vm("3", "03"))
    assert not decision.allowed
    assert decision.message.startswith('VirtualMachine ns/web: label gtvp.io/level="03" on its')
    assert '(write "3", not "03")' in decision.message


def test_vm_template_without_the_trust_selector_is_refused() -> None:
    decision = validate_vm(_vm("3", "3", selector=1))
    assert not decision.allowed
    assert decision.message == (
        f"VirtualMachine ns/web needs level 3 but its template's nodeSelector lacks {L}3=true: "
        "it could run on an untrusted node"
    )
    assert validate_vm(_vm("3", "3")).allowed
    assert validate_vm(_vm(None, None, None)).allowed


def test_removing_the_level_from_a_vm_is_refused() -> None:
    decision = validate_vm_update(old=_vm("3", "3"), new=_vm(None, None))
    assert not decision.allowed
    assert decision.message.startswith(
        "VirtualMachine ns/web was admitted at level 3: gtvp.io/level cannot be removed"
    )
    assert "delete the VirtualMachine and create it again" in decision.message


def test_removing_the_level_from_a_vms_metadata_only_is_refused() -> None:
    decision = validate_vm_update(old=_vm("3", "3"), new=_vm(None, "3"))
    assert not decision.allowed
    assert "cannot be removed" in decision.message


def test_lowering_a_vms_level_is_refused_and_raising_it_is_not() -> None:
    lowered = validate_vm_update(old=_vm("3", "3"), new=_vm("1", "1", 1))
    assert not lowered.allowed
    assert "cannot be lowered (to 1)" in lowered.message
    assert validate_vm_update(old=_vm("1", "1", 1), new=_vm("3", "3")).allowed
    assert validate_vm_update(old=_vm("3", "3"), new=_vm("3", "3")).allowed
    assert validate_vm_update(old=_vm(None, None, None), new=_vm("2", "2", 2)).allowed
    assert validate_vm_update(old=_vm(None, None, None), new=_vm(None, None, None)).allowed


def test_a_vm_admitted_with_a_noncanonical_level_can_be_corrected() -> None:
    assert validate_vm_update(old=_vm("03", "03"), new=_vm("3", "3")).allowed
    refused = validate_vm_update(old=_vm("03", "03"), new=_vm("03", "03"))
    assert not refused.allowed
    assert '(write "3", not "03")' in refused.message


def test_an_update_into_disagreement_is_refused() -> None:
    decision = validate_vm_update(old=_vm("3", "3"), new=_vm("3", "5", 5))
    assert not decision.allowed
    assert "they must agree" in decision.message


# ----- VirtualMachineInstances ------------------------------------------------------------


def test_instance_needs_the_selector_and_a_usable_member() -> None:
    ok = validate_instance(
        name="vmi ns/web",
        labels={"gtvp.io/level": "3"},
        node_selector=trust_selector(3),
        members=POOL,
        now=NOW,
    )
    assert ok.allowed
    bare = validate_instance(
        name="vmi ns/web", labels={"gtvp.io/level": "3"}, node_selector={}, members=POOL, now=NOW
    )
    assert not bare.allowed
    assert "it could be placed on an untrusted node" in bare.message
    none = validate_instance(
        name="vmi ns/web",
        labels={"gtvp.io/level": "5"},
        node_selector=trust_selector(5),
        members=POOL,
        now=NOW,
    )
    assert not none.allowed
    assert "needs level 5 and no Trusted member of level >= 5 can take it now" in none.message
    assert "bad: Untrusted" in none.message
    pinned = validate_instance(
        name="vmi ns/web",
        labels={"gtvp.io/level": "3"},
        node_selector={**trust_selector(3), "kubernetes.io/hostname": "bad"},
        members=POOL,
        now=NOW,
    )
    assert not pinned.allowed
    assert "member bad can take it now (bad: Untrusted)" in pinned.message
    ungated = validate_instance(
        name="vmi ns/web", labels={}, node_selector=None, members=[], now=NOW
    )
    assert ungated.allowed


def test_an_instance_of_a_level_the_policy_does_not_define_is_refused() -> None:
    """Levels 1 and 3 defined: a level-3 member could hold a level-2 VMI, but level 2 has no
    onUntrusted, so gtvp would stop it rather than move it. Refused, naming the levels."""
    decided = validate_instance(
        name="vmi ns/web",
        labels={"gtvp.io/level": "2"},
        node_selector=trust_selector(2),
        members=POOL,
        now=NOW,
        levels={1, 3},
    )
    assert not decided.allowed
    assert "does not define (its levels: 1, 3)" in decided.message
    assert not validate_vm(_vm("2", "2", 2), levels={1, 3}).allowed
    assert validate_vm(_vm("3", "3"), levels={1, 3}).allowed


def test_expired_and_spent_verdicts_are_described() -> None:
    members = [
        MemberView("old", "Trusted", 3, NOW - dt.timedelta(seconds=1), 5),
        MemberView("spent", "Trusted", 3, LATER, 0),
    ]
    decision = validate_instance(
        name="vmi",
        labels={"gtvp.io/level": "1"},
        node_selector=trust_selector(1),
        members=members,
        now=NOW,
    )
    assert not decision.allowed
    assert "old: verdict expired; spent: verdict spent (awaiting a fresh quote)" in decision.message


def _update(old: dict[str, Any], new: dict[str, Any]) -> Any:
    return validate_instance_update(old=old, new=new, members=POOL, now=NOW)


def test_removing_the_level_label_from_a_running_vmi_is_refused() -> None:
    decision = _update(_vmi("3"), _vmi(None))
    assert not decision.allowed
    assert decision.message.startswith(
        "VirtualMachineInstance ns/web was admitted at level 3: its label gtvp.io/level cannot "
        "be removed"
    )
    assert decision.message.endswith(
        "to run it ungated, delete it (or its VirtualMachine) and create it again without the label"
    )


def test_lowering_a_vmis_level_is_refused() -> None:
    decision = _update(_vmi("3"), _vmi("1"))
    assert not decision.allowed
    assert "cannot be lowered (to 1)" in decision.message


def test_dropping_the_trust_selector_from_a_vmi_is_refused() -> None:
    decision = _update(_vmi("3"), _vmi("3", selector={}))
    assert not decision.allowed
    assert decision.message.startswith(
        f"VirtualMachineInstance ns/web was admitted with the trust selector {L}3=true, {T}=true"
    )
    assert "would let it run on or migrate to untrusted members" in decision.message
    changed = _update(_vmi("3"), _vmi("3", selector={T: "true", f"{L}3": "false"}))
    assert not changed.allowed


def test_dropping_the_selector_of_a_vmi_whose_label_is_already_gone_is_refused() -> None:
    decision = _update(_vmi(None), _vmi(None, selector={}))
    assert not decision.allowed
    assert "trust selector" in decision.message


def test_a_vmi_gated_by_its_trust_selector_alone_is_held_to_the_grace_cap() -> None:
    """No level label, a trust selector: gtvp treats it as gated at that level (it is
    evacuated and stopped as one), so it must shut down within the cap like any (found by
    a review)."""
    decision = validate_instance(
        name="vmi",
        labels={},
        node_selector=trust_selector(2),
        members=POOL,
        now=NOW,
        grace=10_000_000,
    )
    assert not decision.allowed
    assert "needs level 2 and asks for a terminationGracePeriodSeconds of 10000000" in (
        decision.message
    )
    plain = validate_instance(name="vmi", labels={}, node_selector={}, members=[], now=NOW,
                              grace=10_000_000)  # fmt: skip
    assert plain.allowed


def test_raising_a_gated_vmis_shutdown_grace_after_admission_is_refused() -> None:
    """KubeVirt's stop endpoint writes the grace it is given into the VMI: a guest that then
    ignores the shutdown would run on for that long after gtvp stops it."""

    def grace(seconds: int | None) -> dict[str, Any]:
        vmi = _vmi("3")
        if seconds is not None:
            vmi["spec"]["terminationGracePeriodSeconds"] = seconds
        return vmi

    decision = _update(grace(30), grace(10_000_000))
    assert not decision.allowed
    assert decision.message == (
        "VirtualMachineInstance ns/web may not raise its terminationGracePeriodSeconds to "
        "10000000: a gated VM must shut down within 180 s when gtvp stops it on a host that "
        "lost trust (stop it with a grace period of at most 180 s)"
    )
    assert not _update(grace(None), grace(181)).allowed
    assert _update(grace(30), grace(180)).allowed
    assert _update(grace(30), grace(0)).allowed
    assert _update(grace(1000), grace(1000)).allowed  # admitted before the cap: left alone
    assert _update(grace(1000), grace(600)).allowed  # and it may come down
    assert not _update(grace(1000), grace(2000)).allowed


def test_other_vmi_updates_are_allowed() -> None:
    assert _update(_vmi("3"), _vmi("3")).allowed
    moved = _vmi("3", selector={**trust_selector(3), "kubernetes.io/hostname": "b"})
    assert _update(_vmi("3"), moved).allowed  # selector entries added, none removed
    assert _update(_vmi(None, selector={}), _vmi(None, selector={"disk": "ssd"})).allowed


def test_a_vmi_not_running_yet_may_not_raise_its_level() -> None:
    """Its launcher pod may be bound already, by the admitted selector, to a node of a lower
    level (KubeVirt names the node only once the pod is up: a stalled image pull keeps the
    window open as long as the tenant likes): a raise then, by the label or by KubeVirt's
    LiveUpdate of the selector, made a level-3 VM of it on that node (found by a review)."""
    both = {**trust_selector(1), **trust_selector(3)}
    scheduling = _vmi("1", selector=trust_selector(1), node=None)
    by_selector = _update(scheduling, _vmi("1", selector=both, node=None))
    assert not by_selector.allowed
    assert "is not running on a node yet" in by_selector.message
    assert "gtvp.io/level on its VirtualMachine and restart it" in by_selector.message
    assert not _update(_vmi(None, selector={}, node=None), _vmi("3", node=None)).allowed
    # once it runs on a member of the level, the raise goes through
    assert _update(_vmi("1", selector=trust_selector(1), node="a"),
                   _vmi("3", selector=both, node="a")).allowed  # fmt: skip


def test_a_migrating_vmi_may_not_raise_its_level() -> None:
    """Its target pod is bound already, by the admitted selector: raised while its source
    qualifies, it landed on a member below the new level (found by a review)."""
    both = {**trust_selector(1), **trust_selector(3)}
    on_a = _vmi("1", selector=trust_selector(1), node="a")
    moving = _vmi("3", selector=both, node="a")
    moving["status"]["migrationState"] = {"targetNode": "low", "completed": False}
    refused = _update(on_a, moving)
    assert not refused.allowed
    assert "is migrating" in refused.message
    moving["status"]["migrationState"] = {"targetNode": "b", "completed": True}
    assert _update(on_a, moving).allowed  # ended: judged where it runs (a qualifies)


def test_raising_a_vmis_level_needs_its_node_to_qualify() -> None:
    both = {**trust_selector(1), **trust_selector(3)}  # entries are added, never removed
    on_low = _vmi("1", selector=trust_selector(1), node="low")
    raised = _update(on_low, _vmi("3", selector=both, node="low"))
    assert not raised.allowed
    assert raised.message == (
        "VirtualMachineInstance ns/web runs on low, which may not run a level-3 VM (low: Trusted, "
        "level 1); to raise its level, set gtvp.io/level on its VirtualMachine and restart it"
    )
    on_a = _vmi("1", selector=trust_selector(1), node="a")
    assert _update(on_a, _vmi("3", selector=both, node="a")).allowed
    no_selector = _update(on_a, _vmi("3", selector=trust_selector(1), node="a"))
    assert not no_selector.allowed
    assert f"(missing {L}3=true)" in no_selector.message
    gone = _update(_vmi("1", selector=trust_selector(1), node="x"), _vmi("3", both, node="x"))
    assert "runs on x, which may not run a level-3 VM (x: not a member)" in gone.message


def test_adding_or_raising_a_vms_level_warns_that_the_running_vmi_keeps_its_own() -> None:
    """A user labels a running, ungated VM `gtvp.io/level: "3"`: the VM is gated from its
    next start, but its running instance keeps no label and may stay on an untrusted
    host; kubectl shows the admission warning saying so."""
    added = vm_raise_warning(old=_vm(None, None, None), new=_vm("3", "3"))
    assert added is not None
    assert "ns/web is now at level 3" in added
    assert "(ungated)" in added
    assert "restart the VirtualMachine" in added
    raised = vm_raise_warning(old=_vm("1", "1", 1), new=_vm("3", "3"))
    assert raised is not None
    assert "(level 1)" in raised
    assert vm_raise_warning(old=_vm("3", "3"), new=_vm("3", "3")) is None
    assert vm_raise_warning(old=_vm(None, None, None), new=_vm(None, None, None)) is None


def test_raising_a_vmis_level_through_its_selector_needs_its_node_to_qualify() -> None:
    """Attacker: a VM user adds a higher level's entry to a running VMI's trust selector
    (KubeVirt's LiveUpdate copies a VM template's nodeSelector), its label unchanged: the VMI
    then counts as needing that level where it runs, and gtvp starts evacuations for it that
    fill the migration budget ahead of the moves a lost verdict calls for."""
    on_low = _vmi("1", selector=trust_selector(1), node="low")
    higher = {**trust_selector(1), **trust_selector(3)}
    raised = _update(on_low, _vmi("1", selector=higher, node="low"))
    assert not raised.allowed
    assert "runs on low, which may not run a level-3 VM (low: Trusted, level 1)" in raised.message
    on_a = _vmi("1", selector=trust_selector(1), node="a")
    assert _update(on_a, _vmi("1", selector=higher, node="a")).allowed  # a holds level 3
    assert _update(on_low, _vmi("1", selector=trust_selector(1), node="low")).allowed


def test_vmi_update_to_a_noncanonical_level_is_refused() -> None:
    decision = _update(_vmi("3"), _vmi("03"))
    assert not decision.allowed
    assert '(write "3", not "03")' in decision.message


# ----- migrations -------------------------------------------------------------------------


def _migration(**kw: Any) -> Any:
    args: dict[str, Any] = {
        "name": "m",
        "vmi_name": "ns/web",
        "vmi_labels": {"gtvp.io/level": "3"},
        "source": "a",
        "added_selector": trust_selector(3),
        "members": POOL,
        "now": NOW,
    }
    return validate_migration(**{**args, **kw})


def test_migration_needs_the_selector_and_a_trusted_target() -> None:
    assert _migration().allowed
    assert not _migration(added_selector={}).allowed
    assert "addedNodeSelector lacks" in _migration(added_selector={}).message
    pinned = _migration(added_selector={**trust_selector(3), "kubernetes.io/hostname": "bad"})
    assert not pinned.allowed
    assert "is aimed at bad, which may not receive a level-3 VM (bad: Untrusted)" in pinned.message
    nowhere = _migration(added_selector={**trust_selector(3), "kubernetes.io/hostname": "x"})
    assert "x: not a member" in nowhere.message
    alone = _migration(members=[_member("a", 3), _member("low", 1)])
    assert not alone.allowed
    assert "no trusted target of level >= 3 other than its source a" in alone.message
    assert _migration(vmi_labels={}, added_selector=None).allowed


def test_migration_of_an_unlabelled_vmi_keeps_its_admitted_level() -> None:
    """The label is gone (removed before gtvp refused it), the trust selector remembers."""
    decision = _migration(
        vmi_labels={},
        vmi_node_selector=trust_selector(3),
        added_selector={"kubernetes.io/hostname": "bad"},
    )
    assert not decision.allowed
    assert "(level 3) must restrict its target to Trusted members" in decision.message


def test_migration_of_a_vmi_with_an_unreadable_level_is_refused() -> None:
    decision = _migration(vmi_labels={"gtvp.io/level": "high"})
    assert not decision.allowed
    assert "must be a single digit from 1 to 9" in decision.message


def test_a_gated_vm_is_never_sent_out_of_the_pool_by_a_decentralized_migration() -> None:
    """spec.sendTo moves the running VM to a receiver gtvp cannot judge (another cluster or
    namespace, an ungated VM waiting with spec.receive)."""
    out = _migration(send_to="https://receiver.example:443")
    assert not out.allowed
    assert "would send the running VM to https://receiver.example:443 (spec.sendTo)" in (
        out.message
    )
    assert "only within the pool" in out.message
    assert _migration(vmi_labels={}, added_selector=None, send_to="https://x").allowed
