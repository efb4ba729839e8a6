"""The operator's handlers driven in-process against the real API server (no operator process).

A `Runtime` with the operator's own client identity and a cluster view filled by the test
stands in for what `gtvp-operator` builds and its watches keep; the handlers are called
directly, as kopf would call them, and what they decide is read back from the API server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import kopf
import pytest

from gtvp import kube
from gtvp.coordination import Coordination
from gtvp.core.api_resources import MEMBERS, VIRTUAL_MACHINES
from gtvp.core.compose import BOX_LABEL
from gtvp.core.evacuation import EVACUATION_LABEL, HOSTNAME_LABEL
from gtvp.core.policy import DEFAULT_MIGRATE_WITHIN, parse_policy
from gtvp.core.prefetch import ANNOTATION, Request, render_requests, requests_on
from gtvp.core.shards import SHARDS, shard_of
from gtvp.core.timestamps import format_ts
from gtvp.core.trust import (
    TAINT_KEY,
    TRUSTED_LABEL,
    below_since,
    desired_labels,
    trust_selector,
)
from gtvp.handlers import (
    admission,
    attestation,
    box_hosts,
    evacuation,
    launcher_pod_event,
    member_event,
    node_event,
    node_trust,
    policies,
    prefetch,
    startup,
    verdict_uses,
    vmi_event,
)
from gtvp.handlers.leases import LeaseKeeper
from gtvp.runtime import OperatorSettings, Runtime
from gtvp_local.controlplane import ControlPlane, Identity
from gtvp_local.pool import pool_policy
from gtvp_local.swtpm import Swtpm, SwtpmCA
from tests.launcher_pods import create_launcher_pod
from tests.samples import sample_policy_spec

pytestmark = [pytest.mark.controlplane]

POLICY = "inprocess"
NOBODY = Identity("gtvp-test-nobody", (), "nobody")
"""A client the API server knows but no RBAC rule grants anything."""


@pytest.fixture
def rt(operator_clients: kube.Clients) -> Runtime:
    """A fresh runtime per test (its locks and events belong to that test's event loop)."""
    runtime = Runtime(settings=OperatorSettings(policy_name=POLICY), clients=operator_clients)
    runtime.view.loaded = True
    return runtime


def _memo(rt: Runtime) -> kopf.Memo:
    return kopf.Memo(runtime=rt)


def _trusted(name: str, level: int, *, uses: int = 5) -> dict[str, Any]:
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    return {
        "metadata": {"name": name},
        "status": {
            "phase": "Trusted",
            "level": level,
            "trust": {"expiresAt": expires.strftime("%Y-%m-%dT%H:%M:%SZ"), "usesLeft": uses},
        },
    }


def _vmi(name: str, level: int, *, selector: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": "ns", "labels": {"gtvp.io/level": str(level)}},
        "spec": {
            "domain": {"devices": {}, "memory": {"guest": "64Mi"}},
            **({"nodeSelector": trust_selector(level)} if selector else {}),
        },
    }


def _admit_vmi(rt: Runtime, vmi: dict[str, Any]) -> dict[str, Any]:
    """Run the mutating then the validating hook, as the API server does; the admitted VMI."""
    patch = kopf.Patch()
    admission.mutate_vmi(body=kopf.Body(vmi), patch=patch, memo=_memo(rt))
    admitted = json.loads(json.dumps(vmi))
    admitted["spec"].setdefault("nodeSelector", {}).update(
        patch.get("spec", {}).get("nodeSelector", {})
    )
    admission.validate_vmi(body=kopf.Body(admitted), memo=_memo(rt), operation="CREATE", old=None)
    return admitted


# ----- webhook decisions --------------------------------------------------------------------


def test_gated_vmi_gets_the_trust_selector_and_is_admitted_where_its_level_is_trusted(
    rt: Runtime,
) -> None:
    rt.view.observe_member(_trusted("high", 3), "ADDED")
    admitted = _admit_vmi(rt, _vmi("web", 3))
    assert admitted["spec"]["nodeSelector"] == trust_selector(3)


def test_gated_vmi_is_refused_when_no_member_of_its_level_is_trusted(rt: Runtime) -> None:
    rt.view.observe_member(_trusted("low", 1), "ADDED")
    with pytest.raises(kopf.AdmissionError) as refused:
        _admit_vmi(rt, _vmi("secret", 3))
    assert refused.value.code == 403
    assert "needs level 3 and no Trusted member of level >= 3 can take it now" in str(refused.value)
    assert "low: Trusted, level 1" in str(refused.value)


def test_a_spent_verdict_admits_nothing(rt: Runtime) -> None:
    rt.view.observe_member(_trusted("spent", 3, uses=0), "ADDED")
    with pytest.raises(kopf.AdmissionError, match="verdict spent"):
        _admit_vmi(rt, _vmi("web", 2))


def test_an_operator_still_loading_refuses_gated_vmis_but_not_others(rt: Runtime) -> None:
    rt.view.loaded = False
    with pytest.raises(kopf.AdmissionError) as refused:
        _admit_vmi(rt, _vmi("web", 1))
    assert refused.value.code == 503
    ungated = _vmi("plain", 1)
    del ungated["metadata"]["labels"]
    _admit_vmi(rt, ungated)  # no level: nothing to judge, admitted


def _gated_vm(level: int, **spec: Any) -> dict[str, Any]:
    """A VM `db` of `level`, its template labelled and selecting that level's members."""
    return {
        "metadata": {"name": "db", "labels": {"gtvp.io/level": str(level)}},
        "spec": {
            **spec,
            "template": {
                "metadata": {"labels": {"gtvp.io/level": str(level)}},
                "spec": {"nodeSelector": trust_selector(level)},
            },
        },
    }


def test_lowering_a_vms_level_is_refused(rt: Runtime) -> None:
    vm = _gated_vm
    memo = _memo(rt)
    with pytest.raises(kopf.AdmissionError, match="delete"):
        admission.validate_vm(body=kopf.Body(vm(1)), memo=memo, operation="UPDATE", old=vm(3))
    admission.validate_vm(body=kopf.Body(vm(3)), memo=memo, operation="UPDATE", old=vm(1))


def test_a_level_the_policy_does_not_define_is_refused_at_admission(rt: Runtime) -> None:
    """Under a policy with levels 1 and 3, a VM or VMI labelled 2 was admitted (a level-3
    member may hold it) and then stopped, not moved, when its member lost trust (level 2
    has no onUntrusted). It is refused, naming the levels; a VM already at a level a policy
    edit removed can still be edited (halted, say). Found by a review."""
    policy = parse_policy(POLICY, sample_policy_spec())
    levels = tuple(lv for lv in policy.levels if lv.level != 2)
    assert len(levels) >= 2
    rt.view.policy = dataclasses.replace(policy, levels=levels)
    rt.view.observe_member(_trusted("m3", 3), "ADDED")
    defined = ", ".join(str(lv.level) for lv in levels)
    vm = _gated_vm
    memo = _memo(rt)
    with pytest.raises(kopf.AdmissionError, match=f"does not define \\(its levels: {defined}\\)"):
        admission.validate_vm(body=kopf.Body(vm(2)), memo=memo, operation="CREATE", old=None)
    with pytest.raises(kopf.AdmissionError, match="does not define"):
        _admit_vmi(rt, _vmi("web", 2))
    halted = vm(2, runStrategy="Halted")
    admission.validate_vm(body=kopf.Body(halted), memo=memo, operation="UPDATE", old=vm(2))


def test_migration_of_a_vmi_the_watch_has_not_delivered_is_judged_on_a_get(
    rt: Runtime, control_plane: ControlPlane, namespace: str
) -> None:
    vmi = _vmi("db", 2, selector=True)
    vmi["metadata"]["namespace"] = namespace
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(vmi))
    assert not rt.view.vmis  # the view has never seen it
    migration = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": "move-db", "namespace": namespace},
        "spec": {"vmiName": "db"},
    }
    patch = kopf.Patch()
    admission.mutate_migration(body=kopf.Body(migration), patch=patch, memo=_memo(rt))
    assert patch["spec"]["addedNodeSelector"] == trust_selector(2)
    migration["spec"]["addedNodeSelector"] = patch["spec"]["addedNodeSelector"]
    with pytest.raises(kopf.AdmissionError) as refused:  # no member of level 2 is trusted
        admission.validate_migration(body=kopf.Body(migration), memo=_memo(rt))
    assert refused.value.code == 403
    rt.view.observe_member(_trusted("target", 2), "ADDED")
    admission.validate_migration(body=kopf.Body(migration), memo=_memo(rt))


def test_migration_is_judged_on_the_servers_vmi_not_a_namesake_in_the_cache(
    rt: Runtime, control_plane: ControlPlane, namespace: str
) -> None:
    """The watch missed a deletion: the view still holds an ungated `db` while a gated `db`
    runs now. A migration names its VMI by name only; it is gated as the server's VMI is
    (here: sent out of the pool, which no gated VM may be)."""
    gated = _vmi("db", 2, selector=True)
    gated["metadata"]["namespace"] = namespace
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(gated))
    ghost = _vmi("db", 0)
    ghost["metadata"].update(namespace=namespace, labels={})
    rt.view.observe_vmi(ghost, "ADDED")
    rt.view.observe_member(_trusted("target", 2), "ADDED")
    migration = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": "away", "namespace": namespace},
        "spec": {"vmiName": "db", "sendTo": {"connectURL": "https://elsewhere:443"}},
    }
    with pytest.raises(kopf.AdmissionError) as refused:
        admission.validate_migration(body=kopf.Body(migration), memo=_memo(rt))
    assert refused.value.code == 403


def test_migration_of_a_vmi_that_does_not_exist_is_not_gated(rt: Runtime, namespace: str) -> None:
    migration = {
        "metadata": {"name": "m", "namespace": namespace},
        "spec": {"vmiName": "nowhere"},
    }
    patch = kopf.Patch()
    admission.mutate_migration(body=kopf.Body(migration), patch=patch, memo=_memo(rt))
    assert TRUSTED_LABEL not in json.dumps(dict(patch))
    admission.validate_migration(body=kopf.Body(migration), memo=_memo(rt))


def test_a_gated_vmi_asking_for_more_than_the_grace_cap_is_refused_if_not_lowered(
    rt: Runtime,
) -> None:
    """The validating hook does not rely on the mutating one having run (webhooks may be
    reordered or one may be missing): a gated VMI with a longer grace is refused, named."""
    rt.view.observe_member(_trusted("high", 3), "ADDED")
    vmi = _vmi("slow", 3, selector=True)
    vmi["spec"]["terminationGracePeriodSeconds"] = 181
    with pytest.raises(kopf.AdmissionError) as refused:
        admission.validate_vmi(body=kopf.Body(vmi), memo=_memo(rt), operation="CREATE", old=None)
    assert "asks for a terminationGracePeriodSeconds of 181" in str(refused.value)
    assert "must shut down within 180 s" in str(refused.value)
    vmi["spec"]["terminationGracePeriodSeconds"] = 180
    admission.validate_vmi(body=kopf.Body(vmi), memo=_memo(rt), operation="CREATE", old=None)


# ----- member reconcile ---------------------------------------------------------------------


def _create_member(
    control_plane: ControlPlane,
    rt: Runtime,
    name: str,
    identity: int,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Create a Member (no agent) on the API server; what the operator's client reads back."""
    body = {
        "apiVersion": MEMBERS.api_version,
        "kind": MEMBERS.kind,
        "metadata": {"name": name, **({"labels": labels} if labels else {})},
        "spec": {"identity": identity},
    }
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(body))
    got = kube.get_if_present(rt.clients, MEMBERS, name)
    assert got is not None
    return got


@pytest.fixture
def under_pool_policy(rt: Runtime, swtpm_ca: SwtpmCA, shared_tpm: Swtpm) -> None:
    """The runtime judges under the local pool's policy, which trusts the swtpm CA (made
    with `shared_tpm`, so the CA has issued its certificates)."""
    del shared_tpm
    rt.view.policy = parse_policy(POLICY, pool_policy(swtpm_ca, name=POLICY)["spec"])


@pytest.fixture
def member(control_plane: ControlPlane, rt: Runtime) -> Iterator[str]:
    """A Member on the API server (no agent, no Node), in the runtime's view."""
    name = f"inproc-{uuid.uuid4().hex[:6]}"
    try:
        attestation.observe(rt, _create_member(control_plane, rt, name, 2), "ADDED")
        yield name
    finally:
        control_plane.kubectl("delete", "member", name, "--ignore-not-found", "--wait=false")


def _patch_status(control_plane: ControlPlane, member: str, status: dict[str, Any]) -> None:
    """Merge `status` into the Member's status on the server (as an administrator)."""
    control_plane.kubectl("patch", "member", member, "--subresource=status", "--type=merge",
                          "-p", json.dumps({"status": status}))  # fmt: skip


def _status(rt: Runtime, name: str) -> dict[str, Any]:
    got = kube.get_if_present(rt.clients, MEMBERS, name)
    assert got is not None
    status: dict[str, Any] = got.get("status") or {}
    return status


@pytest.mark.tpm
def test_a_lost_trust_is_written_even_when_the_member_changed_since_it_was_judged(
    control_plane: ControlPlane, rt: Runtime, member: str, under_pool_policy: None
) -> None:
    """Root on the node can have its agent rewrite the Member's status without pause: every
    write is a new resourceVersion, so a verdict written only at the version judged would
    never land, and the member would stay Trusted on the server (no clock for migrateWithin,
    Nodes and other replicas reading Trusted). A verdict withdrawing trust lands anyway."""
    past = format_ts(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    trust = {"verdict": "Trusted", "reason": "QuoteVerified", "verifiedAt": past,
             "expiresAt": past}  # fmt: skip
    _patch_status(control_plane, member, {"phase": "Trusted", "level": 2, "trust": trust})
    judged = kube.get_if_present(rt.clients, MEMBERS, member)
    assert judged is not None
    attestation.observe(rt, judged, "MODIFIED")  # what the operator judges: this version
    heartbeat = {"agent": {"heartbeatTime": past, "error": "still here"}}
    _patch_status(control_plane, member, heartbeat)  # the agent's newer write
    asyncio.run(attestation.reconcile(rt, member))
    status = _status(rt, member)
    assert status["phase"] == "Untrusted"
    assert status["agent"]["error"] == "still here"  # the operator's fields only
    assert status["trust"]["reason"] == "VerdictExpired"


def test_without_a_policy_the_reconcile_writes_untrusted_no_policy(
    rt: Runtime, member: str
) -> None:
    asyncio.run(attestation.reconcile(rt, member))
    status = _status(rt, member)
    assert status["phase"] == "Untrusted"
    assert status["level"] == 0
    assert status["trust"]["reason"] == "NoPolicy"
    assert f"SecurityPolicy {POLICY!r} not seen yet" in status["trust"]["message"]
    assert member in rt.schedule.next_due  # looked at again (in 30 s)


@pytest.mark.tpm
def test_under_a_policy_a_new_member_is_asked_to_enrol(
    rt: Runtime, member: str, swtpm_ca: SwtpmCA, shared_tpm: Swtpm
) -> None:
    del shared_tpm  # made, so the CA has issued its certificates (the policy trusts them)
    spec = pool_policy(swtpm_ca, name=POLICY)["spec"]
    assert policies.set_policy(rt, POLICY, parse_policy(POLICY, spec))
    asyncio.run(attestation.reconcile(rt, member))
    status = _status(rt, member)
    assert status["phase"] == "Pending"
    assert status.get("level", 0) == 0
    assert rt.view.members[member]["status"] == status  # the view holds what was written
    # a second run with nothing new writes nothing (no new resourceVersion)
    before = rt.view.members[member]["metadata"]["resourceVersion"]
    asyncio.run(attestation.reconcile(rt, member))
    got = kube.get_if_present(rt.clients, MEMBERS, member)
    assert got is not None
    assert got["metadata"]["resourceVersion"] == before


@pytest.mark.tpm
def test_a_member_is_judged_off_the_event_loop(
    rt: Runtime,
    member: str,
    swtpm_ca: SwtpmCA,
    shared_tpm: Swtpm,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Judging evidence (an agent's event log of up to 4 MiB to parse, certificate paths,
    signatures) runs on a thread: the event loop goes on serving admission, the Leases and
    the other members meanwhile. The judgement here waits for the loop to run something
    else; on the loop itself it would wait in vain."""
    del shared_tpm
    spec = pool_policy(swtpm_ca, name=POLICY)["spec"]
    assert policies.set_policy(rt, POLICY, parse_policy(POLICY, spec))
    loop_ran = threading.Event()
    judge = attestation.attestation_step

    def waiting_for_the_loop(**kwargs: Any) -> Any:
        assert loop_ran.wait(10), "the event loop stood still while a member was judged"
        return judge(**kwargs)

    monkeypatch.setattr(attestation, "attestation_step", waiting_for_the_loop)

    async def meanwhile() -> None:
        await asyncio.sleep(0.05)
        loop_ran.set()

    async def both() -> None:
        await asyncio.gather(attestation.reconcile(rt, member), meanwhile())

    asyncio.run(both())
    assert _status(rt, member)["phase"] == "Pending"


def test_a_policy_for_another_name_changes_nothing(rt: Runtime) -> None:
    assert not policies.set_policy(rt, "someone-else", None, "gone")
    assert rt.view.policy_error == f"SecurityPolicy {POLICY!r} not seen yet"


# ----- the write adapters every handler goes through ----------------------------------------


def test_writes_are_idempotent_create_replace_and_delete(rt: Runtime, namespace: str) -> None:
    def vm(label: str) -> dict[str, Any]:
        return {
            "apiVersion": VIRTUAL_MACHINES.api_version,
            "kind": VIRTUAL_MACHINES.kind,
            "metadata": {"name": "box", "namespace": namespace, "labels": {"v": label}},
            "spec": {
                "runStrategy": "Halted",
                "template": {"spec": {"domain": {"devices": {}, "memory": {"guest": "64Mi"}}}},
            },
        }

    c = rt.clients
    first = kube.create_or_replace(c, VIRTUAL_MACHINES, vm("1"))
    # it exists (409): read and replaced, though the caller knew no version
    second = kube.create_or_replace(c, VIRTUAL_MACHINES, vm("2"))
    assert second["metadata"]["labels"]["v"] == "2"
    # a stale version (409 Conflict): read again and replaced once
    stale = first["metadata"]["resourceVersion"]
    third = kube.create_or_replace(c, VIRTUAL_MACHINES, vm("3"), resource_version=stale)
    assert third["metadata"]["labels"]["v"] == "3"
    assert not kube.create_unless_present(c, VIRTUAL_MACHINES, vm("4"))  # left as it is
    got = kube.get_if_present(c, VIRTUAL_MACHINES, "box", namespace)
    assert got is not None
    assert got["metadata"]["labels"]["v"] == "3"
    assert kube.delete_if_present(c, VIRTUAL_MACHINES, "box", namespace)
    assert not kube.delete_if_present(c, VIRTUAL_MACHINES, "box", namespace)
    assert kube.get_if_present(c, VIRTUAL_MACHINES, "box", namespace) is None


# ----- verdict uses, spent by two replicas at once --------------------------------------------


def test_two_replicas_spending_at_once_lose_no_use_and_spend_none_twice(
    control_plane: ControlPlane, operator_clients: kube.Clients, member: str
) -> None:
    # the member holds a verdict with 20 uses; two operator replicas both saw it that way
    _patch_status(control_plane, member, _trusted(member, 2, uses=20)["status"])
    seen = kube.get_if_present(operator_clients, MEMBERS, member)
    assert seen is not None
    replicas = []
    for _ in range(2):
        replica = Runtime(settings=OperatorSettings(policy_name=POLICY), clients=operator_clients)
        replica.view.remember_member(member, json.loads(json.dumps(seen)))
        replicas.append(replica)

    async def both_spend() -> None:
        # each replica decides 6 times (VMI starts, placements) on its own, stale view
        await asyncio.gather(
            *(verdict_uses.spend_use(r, member) for r in replicas for _ in range(6))
        )

    asyncio.run(both_spend())
    got = kube.get_if_present(operator_clients, MEMBERS, member)
    assert got is not None
    assert got["status"]["trust"]["usesLeft"] == 20 - 12


def test_a_start_during_a_shard_handover_is_spent_by_the_next_holder(
    control_plane: ControlPlane, rt: Runtime, member: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gated VMI starts on the member while this replica does not hold its shard (nobody
    may: the former holder crashed): the replica that takes the shard soon after spends
    that start's use; a start seen long before the handover is not spent again."""
    _patch_status(control_plane, member, _trusted(member, 2, uses=20)["status"])
    got = kube.get_if_present(rt.clients, MEMBERS, member)
    assert got is not None
    rt.view.remember_member(member, got)
    co = _replica_holding(rt, shards=set(range(SHARDS)) - {shard_of(member)})

    def start(uid: str) -> None:
        vmi = {"metadata": {"uid": uid, "labels": {"gtvp.io/level": "2"}},
               "status": {"nodeName": member, "phase": "Scheduled"}}  # fmt: skip
        asyncio.run(verdict_uses.judge_vmi_start(rt, vmi, "ADDED"))

    start("long-ago")
    rt.unheld_starts["long-ago"] = (member, time.monotonic() - verdict_uses.HANDOVER_WINDOW - 1)
    start("during-handover")
    assert _status(rt, member)["trust"]["usesLeft"] == 20  # not this replica's to spend
    co.held.add(shard_of(member))

    async def judged(*_: Any) -> None:  # this Member has no agent: its judgement is not here
        return None

    monkeypatch.setattr(attestation, "_judge", judged)

    def look() -> None:  # the new holder's first look at the member (under its lock)
        async def bounded() -> None:
            await asyncio.wait_for(attestation.reconcile(rt, member), timeout=20)

        asyncio.run(bounded())

    look()
    assert _status(rt, member)["trust"]["usesLeft"] == 19
    look()  # owed once
    assert _status(rt, member)["trust"]["usesLeft"] == 19


def test_a_start_whose_spend_the_api_server_refuses_is_spent_at_the_members_next_look(
    control_plane: ControlPlane, rt: Runtime, member: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder's spend for a start fails (here refused, 403; a restarting API server or
    throttling fail alike): the start was marked seen, and kopf does not call an event
    handler again, so the use was never spent and maxUses could be exceeded (found by a
    review). It stays owed and is spent at the member's next look."""
    _patch_status(control_plane, member, _trusted(member, 2, uses=20)["status"])
    got = kube.get_if_present(rt.clients, MEMBERS, member)
    assert got is not None
    rt.view.remember_member(member, got)
    allowed = rt.clients
    nobody = kube.make_clients(str(control_plane.kubeconfig_for(NOBODY)))
    rt.clients = dataclasses.replace(rt.clients, custom=nobody.custom)
    vmi = {"metadata": {"uid": "refused", "labels": {"gtvp.io/level": "2"}},
           "status": {"nodeName": member, "phase": "Scheduled"}}  # fmt: skip
    asyncio.run(verdict_uses.judge_vmi_start(rt, vmi, "ADDED"))  # must not raise
    rt.clients = allowed
    assert _status(rt, member)["trust"]["usesLeft"] == 20
    assert member in rt.schedule.next_due  # looked at again soon

    async def judged(*_: Any) -> None:  # this Member has no agent: its judgement is not here
        return None

    monkeypatch.setattr(attestation, "_judge", judged)
    # its next look may come later than the handover window: a use this replica failed to
    # spend is not dropped with age
    assert rt.failed_spends == {"refused": member}
    asyncio.run(attestation.reconcile(rt, member))
    assert _status(rt, member)["trust"]["usesLeft"] == 19
    asyncio.run(verdict_uses.judge_vmi_start(rt, vmi, "MODIFIED"))  # spent once
    asyncio.run(attestation.reconcile(rt, member))
    assert _status(rt, member)["trust"]["usesLeft"] == 19


def test_a_judgement_that_spends_a_use_of_the_member_it_holds_does_not_wait_for_itself(
    control_plane: ControlPlane, rt: Runtime, member: str
) -> None:
    """A look at a member (under its lock) may spend one of its uses (a migration to it
    judged when its level changes): the spend neither waits for that lock nor loses a use."""
    _patch_status(control_plane, member, _trusted(member, 2, uses=20)["status"])
    got = kube.get_if_present(rt.clients, MEMBERS, member)
    assert got is not None
    rt.view.remember_member(member, got)

    async def spend_while_looking() -> None:
        async with rt.attestation.lock(member):
            await asyncio.wait_for(verdict_uses.spend_use(rt, member), timeout=10)

    asyncio.run(spend_while_looking())
    assert _status(rt, member)["trust"]["usesLeft"] == 19


def test_a_spend_after_a_new_verdict_counts_on_the_new_verdict(
    control_plane: ControlPlane, rt: Runtime, member: str
) -> None:
    stale = {"status": _trusted(member, 2, uses=3)["status"]}
    control_plane.kubectl(
        "patch", "member", member, "--subresource=status", "--type=merge", "-p", json.dumps(stale)
    )
    got = kube.get_if_present(rt.clients, MEMBERS, member)
    assert got is not None
    rt.view.remember_member(member, got)  # the replica's view: 3 uses left
    fresh = {"status": _trusted(member, 2, uses=50)["status"]}  # meanwhile, a new verdict
    control_plane.kubectl(
        "patch", "member", member, "--subresource=status", "--type=merge", "-p", json.dumps(fresh)
    )
    asyncio.run(verdict_uses.spend_use(rt, member))
    assert _status(rt, member)["trust"]["usesLeft"] == 49  # not 2 written over the new 50


def test_a_spend_that_keeps_losing_the_race_spends_the_whole_verdict(
    control_plane: ControlPlane, rt: Runtime, member: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spend whose `usesLeft` changes under it at every attempt cannot count its use: the
    verdict backs nothing more and fresh evidence is asked for at once (dropping the spend
    would let it back one decision more than its maxUses)."""
    _patch_status(control_plane, member, _trusted(member, 2, uses=3)["status"])
    got = kube.get_if_present(rt.clients, MEMBERS, member)
    assert got is not None
    rt.view.remember_member(member, got)  # the replica's view: 3 uses left
    _patch_status(control_plane, member, _trusted(member, 2, uses=50)["status"])
    monkeypatch.setattr(verdict_uses, "SPEND_ATTEMPTS", 1)  # the one attempt loses
    rt.schedule.forget(member)
    asyncio.run(verdict_uses.spend_use(rt, member))
    assert _status(rt, member)["trust"]["usesLeft"] == 0
    assert rt.schedule.next_due[member] <= time.monotonic() + 1  # looked at again now


def test_spends_land_while_the_agent_rewrites_its_status_without_pause(
    control_plane: ControlPlane, rt: Runtime, member: str
) -> None:
    """Root on the host rewrites `status.agent` as fast as it can (each write a new
    resourceVersion): every decision still spends its use, so the verdict does not back
    decisions without end."""
    _patch_status(control_plane, member, _trusted(member, 2, uses=20)["status"])
    got = kube.get_if_present(rt.clients, MEMBERS, member)
    assert got is not None
    rt.view.remember_member(member, got)
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            beat = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            kube.patch_status(rt.clients, MEMBERS, member, {"agent": {"heartbeatTime": beat}})

    writers = [threading.Thread(target=flood, daemon=True) for _ in range(3)]
    for w in writers:
        w.start()
    try:
        for _ in range(6):
            asyncio.run(verdict_uses.spend_use(rt, member))
        assert _status(rt, member)["trust"]["usesLeft"] == 20 - 6
        # a revocation (the standing verdict's uses spent at once) lands too, judged on a
        # body the agent has long since rewritten
        judged = kube.get_if_present(rt.clients, MEMBERS, member)
        assert judged is not None
        cut = {k: judged["status"][k] for k in attestation.OPERATOR_FIELDS if k in judged["status"]}
        cut["trust"] = {**cut["trust"], "usesLeft": 0, "reason": "ReferencesChanged"}
        time.sleep(0.5)  # the agent writes on meanwhile
        assert asyncio.run(attestation._write(rt, member, judged, cut)) is True
    finally:
        stop.set()
        for w in writers:
            w.join(timeout=10)
    trust = _status(rt, member)["trust"]
    assert (trust["usesLeft"], trust["reason"]) == (0, "ReferencesChanged")


# ----- a verdict the API server will not take ------------------------------------------------


@pytest.fixture
def expired_on_trusted_node(
    control_plane: ControlPlane,
    cluster_names: list[str],
    rt: Runtime,
    swtpm_ca: SwtpmCA,
    shared_tpm: Swtpm,
) -> str:
    """A level-2 trust-labelled Node whose member's verdict (in the view) has expired."""
    del shared_tpm  # made, so the CA has issued its certificates (the policy trusts them)
    name = f"unwritten-{uuid.uuid4().hex[:6]}"
    labels = dict.fromkeys(trust_selector(2), "true") | {
        "node-restriction.kubernetes.io/gtvp-level-1": "true"
    }
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(node))
    cluster_names.extend([f"node/{name}", f"member/{name}"])
    rt.view.nodes[name] = _node(control_plane, name)
    expired = _trusted(name, 2)
    expired["status"]["trust"]["expiresAt"] = "2020-01-01T00:00:00Z"
    rt.view.observe_member(expired, "ADDED")
    spec = pool_policy(swtpm_ca, name=POLICY)["spec"]
    assert policies.set_policy(rt, POLICY, parse_policy(POLICY, spec))
    return name


@pytest.mark.tpm
def test_a_refused_verdict_write_still_untrusts_the_node_and_is_retried(
    control_plane: ControlPlane, rt: Runtime, expired_on_trusted_node: str
) -> None:
    """The write of an Untrusted verdict fails (here: refused, 403; an API server restart
    or an oversized object fail alike): the Node must not keep its trust labels, and the
    member must be looked at again (not dropped from the loop)."""
    name = expired_on_trusted_node
    got = _create_member(control_plane, rt, name, 2)
    rt.view.remember_member(name, {**got, "status": rt.view.members[name]["status"]})
    nobody = kube.make_clients(str(control_plane.kubeconfig_for(NOBODY)))
    allowed = rt.clients
    rt.clients = dataclasses.replace(rt.clients, custom=nobody.custom)  # Member writes: 403
    asyncio.run(attestation.reconcile(rt, name))  # must not raise
    assert _says_untrusted(_node(control_plane, name))
    assert name in rt.schedule.next_due  # retried soon, not forgotten
    # and the pool is held to it, not to the stored Trusted verdict: the Node's next event
    # (its kubelet's, or root's) puts no label back, admission and the leader's moves see
    # the verdict reached
    rt.view.nodes[name] = _node(control_plane, name)
    asyncio.run(node_trust.sync_node(rt, name))
    assert _says_untrusted(_node(control_plane, name))
    assert not any(m.usable(dt.datetime.now(dt.UTC), 1) for m in rt.view.member_views()
                   if m.name == name)  # fmt: skip
    held = attestation._status_for_moves(rt, name)
    assert held is not None
    assert held["phase"] != "Trusted"
    rt.clients = allowed
    asyncio.run(attestation.reconcile(rt, name))  # stored at last: the hold ends
    assert name not in rt.view.unwritten
    assert _status(rt, name)["phase"] == held["phase"]


@pytest.mark.tpm
def test_a_verdict_for_a_member_gone_on_the_server_untrusts_its_node_at_once(
    control_plane: ControlPlane, rt: Runtime, expired_on_trusted_node: str
) -> None:
    """The Member was deleted and the watch has not said so (or lost the event): the write
    answers 404, and the Node is judged as having no Member at once."""
    name = expired_on_trusted_node
    asyncio.run(attestation.reconcile(rt, name))  # must not raise
    assert _says_untrusted(_node(control_plane, name))
    assert name not in rt.view.members  # forgotten: the next look finds no Member
    made = kube.get_if_present(rt.clients, MEMBERS, name)
    assert made is not None  # made again for its Node: it must enrol afresh
    assert made["metadata"]["labels"][node_trust.NODE_MEMBER_LABEL] == "true"


def test_start_up_loads_the_nodes_before_any_member_is_judged(
    control_plane: ControlPlane, cluster_names: list[str], rt: Runtime
) -> None:
    """Transition rules read Node labels: a restarted operator must know them before its
    first verdict, or a label-raised level would drop and flap (and start evacuations)."""
    name = f"listed-{uuid.uuid4().hex[:6]}"
    label = "node-restriction.kubernetes.io/hardware"
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {label: "tdx"}},
    }
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(node))
    cluster_names.append(f"node/{name}")
    rt.view.loaded = False
    asyncio.run(startup.load_pool(memo=_memo(rt)))
    assert rt.view.loaded
    assert rt.view.node_labels[name][label] == "tdx"
    assert rt.view.nodes[name]["metadata"]["name"] == name


def test_a_deleted_node_does_not_take_along_the_member_that_pins_its_ek(
    control_plane: ControlPlane, rt: Runtime
) -> None:
    """Deleting the Node must not reset the EK pin: a host returning under that name with
    another TPM would otherwise be enrolled afresh."""
    name = f"pinned-{uuid.uuid4().hex[:6]}"
    _create_member(control_plane, rt, name, 1, {node_trust.NODE_MEMBER_LABEL: "true"})
    try:
        pin = {"status": {"trust": {"ekSHA256": "ab" * 32, "verdict": "Trusted"}}}
        control_plane.kubectl(
            "patch", "member", name, "--subresource=status", "--type=merge", "-p", json.dumps(pin)
        )
        got = kube.get_if_present(rt.clients, MEMBERS, name)
        assert got is not None
        rt.view.remember_member(name, got)
        asyncio.run(node_trust.forget_node(rt, name))
        assert kube.get_if_present(rt.clients, MEMBERS, name) is not None
        events = json.loads(
            control_plane.kubectl(
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                f"involvedObject.name={name},reason=NodeGone",
                "-o",
                "json",
            ).stdout
        )["items"]
        assert "it pins EK abababababababab" in events[0]["message"]
    finally:
        control_plane.kubectl("delete", "member", name, "--ignore-not-found", "--wait=false")


def _replica_holding(rt: Runtime, *, shards: set[int]) -> Coordination:
    """`rt` as one replica among several, holding `shards` (renewed just now)."""
    co = Coordination("replica-under-test")
    co.renewed(co.clock())
    co.held |= shards
    rt.coordination = co
    return co


def test_a_replica_writes_only_for_the_members_whose_shard_it_holds(
    rt: Runtime, member: str
) -> None:
    co = _replica_holding(rt, shards=set(range(SHARDS)) - {shard_of(member)})
    asyncio.run(attestation.reconcile(rt, member))
    assert _status(rt, member) == {}  # another replica holds this member: nothing written
    co.held.add(shard_of(member))
    asyncio.run(attestation.reconcile(rt, member))
    assert _status(rt, member)["trust"]["reason"] == "NoPolicy"
    got = kube.get_if_present(rt.clients, MEMBERS, member)
    assert got is not None
    managers = {f.get("manager") for f in got["metadata"].get("managedFields") or []}
    assert "gtvp-operator" in managers  # the replica's field manager names the writer


def test_a_verdict_judged_on_a_stale_body_never_overwrites_a_newer_one(
    rt: Runtime, member: str, control_plane: ControlPlane
) -> None:
    stale = rt.view.members[member]  # what this replica judged
    newer = {"status": {"phase": "Trusted", "trust": {"reason": "WrittenByTheNewHolder"}}}
    control_plane.kubectl(
        "patch", "member", member, "--subresource=status", "--type=merge",
        "-p", json.dumps(newer),
    )  # fmt: skip
    rt.view.members[member] = stale  # the watch has not delivered the newer body yet
    asyncio.run(attestation.reconcile(rt, member))
    status = _status(rt, member)
    assert status["trust"]["reason"] == "WrittenByTheNewHolder"  # 409: not overwritten
    assert status["phase"] == "Trusted"
    assert member in rt.schedule.next_due  # judged again once the newer body arrives


def test_an_evacuation_that_waits_is_said_once_and_again_after_it_could_move(
    rt: Runtime, swtpm_ca: SwtpmCA, shared_tpm: Swtpm, caplog: pytest.LogCaptureFixture
) -> None:
    del shared_tpm  # made, so the CA has issued its certificates (the policy trusts them)
    rt.view.policy = parse_policy(POLICY, pool_policy(swtpm_ca, name=POLICY)["spec"])
    rt.view.observe_vmi({**_vmi("db", 3), "status": {"nodeName": "bad"}}, "ADDED")
    rt.view.observe_member(_trusted("low", 1), "ADDED")

    def said() -> int:
        return sum("evacuation of bad waits" in r.getMessage() for r in caplog.records)

    with caplog.at_level("WARNING", logger="gtvp.evacuation"):
        for _ in range(3):  # every pass while nothing can take it: said once
            asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Migrate"))
        assert said() == 1
        assert rt.evacuation.waiting["bad"] == ["ns/db"]
        rt.view.observe_member(_trusted("low", 3), "ADDED")  # a target of its level
        asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Migrate"))
        assert "bad" not in rt.evacuation.waiting
        rt.view.observe_member(_trusted("low", 1), "ADDED")  # and gone again before it moved
        asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Migrate"))
        assert said() == 2  # a new wait is said again
        rt.view.observe_vmi({**_vmi("db", 3), "status": {"nodeName": "bad"}}, "DELETED")
        asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Migrate"))
    assert rt.evacuation.waiting == {}  # nothing kept for a member with nothing on it


# ----- a Node that says it is trusted, with no Member behind it ----------------------------


def _trust_labelled_node(control_plane: ControlPlane, cluster_names: list[str]) -> str:
    """A Node carrying gtvp's level-3 trust labels, untainted, and no Member: what is left
    when its Member is deleted while no replica writes its Node (the operator down, or its
    shard between holders)."""
    name = f"orphan-{uuid.uuid4().hex[:6]}"
    labels = {k: v for k, v in desired_labels("Trusted", 3).items() if v is not None}
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(node))
    cluster_names.extend([f"node/{name}", f"member/{name}"])
    return name


def _node(control_plane: ControlPlane, name: str) -> dict[str, Any]:
    got: dict[str, Any] = json.loads(
        control_plane.kubectl("get", "node", name, "-o", "json").stdout
    )
    return got


def _says_untrusted(node: dict[str, Any]) -> bool:
    labels = node["metadata"].get("labels") or {}
    taints = (node.get("spec") or {}).get("taints") or []
    return TRUSTED_LABEL not in labels and any(t["key"] == TAINT_KEY for t in taints)


def test_a_trust_labelled_node_without_a_member_is_untrusted_once_its_shard_is_taken(
    control_plane: ControlPlane, cluster_names: list[str], rt: Runtime
) -> None:
    """The CI run of 1641298 found a gated VM started on such a Node: the replica that
    started saw it before it held any shard, and taking the shards looked at Members only."""
    name = _trust_labelled_node(control_plane, cluster_names)
    co = _replica_holding(rt, shards=set(range(SHARDS)) - {shard_of(name)})
    node = _node(control_plane, name)
    asyncio.run(node_event(body=kopf.Body(node), type=None, memo=_memo(rt)))
    assert not _says_untrusted(_node(control_plane, name))  # not this replica's to write yet
    co.held.add(shard_of(name))
    LeaseKeeper(rt)._gained({shard_of(name)})
    assert name in rt.schedule.next_due
    asyncio.run(attestation.reconcile(rt, name))
    assert _says_untrusted(_node(control_plane, name))
    member = kube.get_if_present(rt.clients, MEMBERS, name)
    assert member is not None  # every Node is a member: it must enrol to be trusted again
    assert member["metadata"]["labels"][node_trust.NODE_MEMBER_LABEL] == "true"


def test_a_node_write_built_on_an_old_read_does_not_land(
    control_plane: ControlPlane,
    cluster_names: list[str],
    rt: Runtime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gtvp replaces a Node's taint list whole. An administrator quarantines the host
    (a NoExecute taint) after the replica read the Node: the patch built from that read
    does not land; the Node is read again and both taints are written. A replica that no
    longer holds the member's shard when its patch conflicts writes nothing (another took
    the shard and wrote the Node)."""
    name = _trust_labelled_node(control_plane, cluster_names)
    rt.view.observe_node(_node(control_plane, name), "ADDED")
    quarantine = {"key": "example.com/quarantine", "value": "ir-42", "effect": "NoExecute"}
    rt.clients.core.patch_node(name, {"spec": {"taints": [quarantine]}})
    untrusted = {"phase": "Untrusted", "level": 0}
    assert asyncio.run(node_trust.sync_node(rt, name, status_override=untrusted))
    after = _node(control_plane, name)
    assert _says_untrusted(after)
    assert quarantine in after["spec"]["taints"]
    # a replica whose view is older than the Node, and that has lost the shard by the time
    # its patch conflicts, leaves the Node as the new holder wrote it
    stale = _node(control_plane, name)
    stale["metadata"]["resourceVersion"] = "1"
    rt.view.observe_node(stale, "MODIFIED")
    co = _replica_holding(rt, shards=set(range(SHARDS)))
    real_read = node_trust._read_again

    def read_after_losing_the_shard(runtime: Runtime, node: str) -> None:
        co.held.discard(shard_of(node))
        real_read(runtime, node)

    monkeypatch.setattr(node_trust, "_read_again", read_after_losing_the_shard)
    trusted = _trusted(name, 3)["status"]
    assert asyncio.run(node_trust.sync_node(rt, name, status_override=trusted))
    assert _says_untrusted(_node(control_plane, name))


def test_a_node_rewritten_without_pause_still_loses_its_trust(
    control_plane: ControlPlane,
    cluster_names: list[str],
    rt: Runtime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Root on the host patches its Node without pause (a token that may patch Nodes, such
    as KubeVirt's virt-handler's), so that every conditional write of gtvp's conflicts:
    the write that takes trust away lands anyway, at its last attempt."""
    name = _trust_labelled_node(control_plane, cluster_names)
    rt.view.observe_node(_node(control_plane, name), "ADDED")
    real_read = node_trust._read_again
    beats = iter(range(100))

    def read_then_rewritten(runtime: Runtime, node: str) -> None:
        real_read(runtime, node)  # the replica reads the Node; the host rewrites it at once
        runtime.clients.core.patch_node(
            node, {"metadata": {"annotations": {"example.com/beat": str(next(beats))}}}
        )

    monkeypatch.setattr(node_trust, "_read_again", read_then_rewritten)
    rt.clients.core.patch_node(name, {"metadata": {"annotations": {"example.com/beat": "x"}}})
    untrusted = {"phase": "Untrusted", "level": 0}
    assert asyncio.run(node_trust.sync_node(rt, name, status_override=untrusted))
    assert _says_untrusted(_node(control_plane, name))


def test_deleting_a_member_under_a_running_operator_untrusts_its_node_at_once(
    control_plane: ControlPlane, cluster_names: list[str], rt: Runtime
) -> None:
    name = _trust_labelled_node(control_plane, cluster_names)
    got = _create_member(control_plane, rt, name, 3)
    trusted = _trusted(name, 3)
    rt.view.observe_member({**got, "status": trusted["status"]}, "ADDED")
    rt.view.observe_node(_node(control_plane, name), "ADDED")
    control_plane.kubectl("delete", "member", name)
    asyncio.run(member_event(body=kopf.Body(got), type="DELETED", memo=_memo(rt)))
    assert _says_untrusted(_node(control_plane, name))
    again = kube.get_if_present(rt.clients, MEMBERS, name)
    assert again is not None  # made again for its Node: it must enrol afresh
    assert again["metadata"]["uid"] != got["metadata"]["uid"]


def _trusted_member_judged_by_a_failing_step(
    control_plane: ControlPlane,
    cluster_names: list[str],
    rt: Runtime,
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    """A Trusted level-3 member on a trust-labelled Node, in the view, whose next judgement
    raises (as a parser fault would)."""
    name = _trust_labelled_node(control_plane, cluster_names)
    _create_member(control_plane, rt, name, 3)
    _patch_status(control_plane, name, _trusted(name, 3)["status"])
    got = kube.get_if_present(rt.clients, MEMBERS, name)
    assert got is not None
    rt.view.observe_member(got, "ADDED")
    rt.view.observe_node(_node(control_plane, name), "ADDED")
    rt.view.policy = parse_policy(POLICY, sample_policy_spec())

    def broken(**_: Any) -> Any:
        raise ValueError("error parsing asn1 value")

    monkeypatch.setattr(attestation, "attestation_step", broken)
    return name


def test_a_member_the_operator_fails_to_judge_loses_its_verdict_and_its_nodes_trust(
    control_plane: ControlPlane,
    cluster_names: list[str],
    rt: Runtime,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever makes judging a member fail (here the judgement itself raises, as a parser
    fault would), its Trusted verdict does not stand until a later judgement succeeds: the
    Member is written Untrusted and its Node loses its trust labels at once."""
    name = _trusted_member_judged_by_a_failing_step(control_plane, cluster_names, rt, monkeypatch)
    asyncio.run(attestation.reconcile(rt, name))
    status = _status(rt, name)
    assert (status["phase"], status["level"]) == ("Untrusted", 0)
    assert status["trust"]["reason"] == "JudgementFailed"
    assert "expiresAt" not in status["trust"]
    assert status["trust"]["usesLeft"] == 0
    assert _says_untrusted(_node(control_plane, name))
    assert "could not be judged" in caplog.text
    assert "error parsing asn1 value" in caplog.text  # its traceback


def test_a_node_whose_trust_write_failed_is_looked_at_again_soon(
    control_plane: ControlPlane,
    cluster_names: list[str],
    rt: Runtime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The verdict takes trust away and is written, but the Node patch fails (an API server
    restarting): the Node still carries trust labels, so the member is looked at again in
    seconds, not at its next turn (30 s after a failed judgement, a level's interval after
    a quote)."""
    name = _trusted_member_judged_by_a_failing_step(control_plane, cluster_names, rt, monkeypatch)

    async def node_write_fails(*_: Any, **__: Any) -> bool:
        return False

    monkeypatch.setattr(attestation, "sync_node", node_write_fails)
    asyncio.run(attestation.reconcile(rt, name))
    assert _status(rt, name)["phase"] == "Untrusted"
    assert not _says_untrusted(_node(control_plane, name))  # the Node write failed
    soon = time.monotonic() + attestation.WRITE_RETRY.total_seconds() + 1
    assert rt.schedule.next_due[name] <= soon


def test_a_gated_vmi_started_on_a_node_without_a_member_gets_that_node_looked_at_now(
    control_plane: ControlPlane, cluster_names: list[str], rt: Runtime
) -> None:
    """KubeVirt may place a VM in the moment before stale labels go: its start makes the
    operator look at that Node at once (untrusted, so the VM is moved off it)."""
    name = _trust_labelled_node(control_plane, cluster_names)
    rt.view.observe_node(_node(control_plane, name), "ADDED")
    vmi = {**_vmi("early", 3, selector=True), "status": {"nodeName": name}}
    vmi["metadata"]["uid"] = str(uuid.uuid4())
    asyncio.run(vmi_event(body=kopf.Body(vmi), type="ADDED", memo=_memo(rt)))
    for due in rt.schedule.pop_due(time.monotonic() + 1):  # due now (0.05 s at least)
        asyncio.run(attestation.reconcile(rt, due))
    assert _says_untrusted(_node(control_plane, name))


def test_a_prefetch_request_on_a_target_no_longer_chosen_is_withdrawn(
    control_plane: ControlPlane, cluster_names: list[str], rt: Runtime
) -> None:
    """A box's evacuation first asked one member to pre-fetch, then chose another (the
    first lost trust or filled up): the first is not left fetching for nothing."""
    asked = Request(("i@sha256:" + "a" * 64,), 1, dt.datetime.now(dt.UTC), "evacuation")
    names = []
    for keys in (("apps/web", "apps/db"), ("apps/web",)):
        name = f"fetcher-{uuid.uuid4().hex[:6]}"
        value = render_requests(dict.fromkeys(keys, asked))
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "annotations": {ANNOTATION: value}}}  # fmt: skip
        control_plane.kubectl("create", "-f", "-", input_text=json.dumps(node))
        cluster_names.append(f"node/{name}")
        rt.view.observe_node(_node(control_plane, name), "ADDED")
        names.append(name)
    old, chosen = names
    asyncio.run(prefetch.withdraw_elsewhere(rt, "apps/web", chosen))
    assert set(requests_on(_node(control_plane, old))) == {"apps/db"}  # another box's stays
    assert set(requests_on(_node(control_plane, chosen))) == {"apps/web"}


@pytest.fixture
def beside_good(operator_clients: kube.Clients, swtpm_ca: SwtpmCA, shared_tpm: Swtpm) -> Runtime:
    """One replica that does not make Members, under the pool's policy, that knows one
    Trusted level-3 member `good` (a target)."""
    del shared_tpm  # made, so the CA has issued its certificates (the policy trusts them)
    settings = OperatorSettings(policy_name=POLICY, create_members=False)
    rt = Runtime(settings=settings, clients=operator_clients)
    rt.view.loaded = True
    rt.view.policy = parse_policy(POLICY, pool_policy(swtpm_ca, name=POLICY)["spec"])
    rt.view.observe_member(_trusted("good", 3), "ADDED")
    rt.view.observe_node({"metadata": {"name": "good"}}, "ADDED")
    return rt


def _evacuations(control_plane: ControlPlane, namespace: str) -> list[tuple[str, str]]:
    """(VMI, member it leaves) of every evacuation migration in `namespace`."""
    got = control_plane.kubectl("get", "vmim", "-n", namespace, "-o", "json").stdout
    return [
        (m["spec"]["vmiName"], m["metadata"]["labels"][EVACUATION_LABEL])
        for m in json.loads(got)["items"]
    ]


@pytest.mark.tpm
def test_a_gated_vm_on_a_node_without_a_member_is_moved_off_it(
    control_plane: ControlPlane, cluster_names: list[str], namespace: str, beside_good: Runtime
) -> None:
    """One replica that does not make Members (`--no-create-members`): a Node whose Member
    was deleted while it was down is judged at its next event, and the gated VM there goes."""
    rt = beside_good
    name = _trust_labelled_node(control_plane, cluster_names)
    vmi = {**_vmi("db", 3, selector=True), "status": {"nodeName": name}}
    vmi["metadata"]["namespace"] = namespace
    rt.view.observe_vmi(vmi, "ADDED")
    asyncio.run(node_event(body=kopf.Body(_node(control_plane, name)), type=None, memo=_memo(rt)))
    assert _says_untrusted(_node(control_plane, name))
    assert kube.get_if_present(rt.clients, MEMBERS, name) is None  # not made: not asked to
    assert _evacuations(control_plane, namespace) == [("db", name)]


@pytest.mark.tpm
def test_a_gated_vm_whose_status_names_a_trusted_node_is_moved_off_its_launcher_pods_node(
    control_plane: ControlPlane, cluster_names: list[str], namespace: str, beside_good: Runtime
) -> None:
    """Root on an untrusted host rewrites its VM's status.nodeName (virt-handler's token
    can) to a trusted member's: the VM's launcher pod is still bound to the host, and the
    operator, reading launcher pods with its own RBAC, moves the VM off it."""
    rt = beside_good
    bad = _trust_labelled_node(control_plane, cluster_names)
    vmi = {**_vmi("db", 3, selector=True), "status": {"nodeName": "good", "phase": "Running"}}
    vmi["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()))
    rt.view.observe_vmi(vmi, "ADDED")  # the status as rewritten

    def judge_bad() -> None:
        body = kopf.Body(_node(control_plane, bad))
        asyncio.run(node_event(body=body, type=None, memo=_memo(rt)))

    judge_bad()
    assert _evacuations(control_plane, namespace) == []  # the status alone hides it
    create_launcher_pod(control_plane, namespace, vmi, bad)
    for pod in kube.list_launcher_pods(rt.clients):  # what a (re)started operator lists
        asyncio.run(launcher_pod_event(body=kopf.Body(pod), type="ADDED", memo=_memo(rt)))
    assert (namespace, "db") in rt.view.on_node[bad]
    judge_bad()
    assert _evacuations(control_plane, namespace) == [("db", bad)]


def test_the_resync_loop_lists_pods_and_migrations_with_the_operators_rights(
    control_plane: ControlPlane, namespace: str, rt: Runtime
) -> None:
    """What the watch missed (deleted or made while it was reconnecting) is put right by the
    loop's next listing, read with the operator's own RBAC."""
    vmi = {**_vmi("db", 3), "status": {"nodeName": "good", "phase": "Running"}}
    vmi["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()))
    rt.view.observe_vmi(vmi, "ADDED")
    gone_pod = create_launcher_pod(control_plane, namespace, vmi, "old")
    rt.view.observe_pod(gone_pod, "ADDED")
    control_plane.kubectl("delete", "pod", gone_pod["metadata"]["name"], "-n", namespace,
                          "--grace-period=0", "--force")  # fmt: skip
    gone_migration = {"metadata": {"namespace": namespace, "name": "gone", "resourceVersion": "1"},
                      "spec": {"vmiName": "db"}, "status": {"phase": "Running"}}  # fmt: skip
    rt.view.observe_migration(gone_migration, "ADDED")
    create_launcher_pod(control_plane, namespace, vmi, "missed")

    async def one_pass() -> None:
        loop = asyncio.create_task(startup.resync_loop(rt, period=0.05))
        await asyncio.sleep(1.5)
        rt.stop.set()
        await loop

    asyncio.run(one_pass())
    assert rt.view.nodes_of[(namespace, "db")] == {"good", "missed"}
    assert (namespace, "gone") not in rt.view.migrations
    assert (namespace, "db") not in rt.view.migrating


@pytest.mark.tpm
def test_a_vmi_pinned_to_its_host_takes_no_evacuation_slot_from_the_others(
    control_plane: ControlPlane, rt: Runtime, namespace: str, under_pool_policy: None
) -> None:
    """A tenant pins gated VMs to a host (nodeSelector kubernetes.io/hostname, which
    admission allows): when it loses trust, an evacuation pinned to another member could
    never be scheduled, and would hold the host's outbound slots until KubeVirt failed it,
    three times, while the other tenants' VMs waited (found by a review). Such a VM waits,
    unpinned, and says why; the others move."""
    allocatable = {"cpu": "8", "memory": "32Gi", "pods": "110"}
    for name in ("t1", "t2"):
        rt.view.observe_member(_trusted(name, 3), "ADDED")
        rt.view.observe_node({"metadata": {"name": name, "labels": {HOSTNAME_LABEL: name}},
                              "status": {"allocatable": allocatable}}, "ADDED")  # fmt: skip
    for name in ("aaa-1", "aaa-2", "zzz-victim"):
        vmi = _vmi(name, 3, selector=True)
        vmi["metadata"]["namespace"] = namespace
        if name.startswith("aaa"):
            vmi["spec"]["nodeSelector"][HOSTNAME_LABEL] = "bad"
        rt.view.observe_vmi({**vmi, "status": {"nodeName": "bad", "phase": "Running"}}, "ADDED")

    asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Migrate"))
    moved = [m["spec"]["vmiName"] for m in _migrations_seen(control_plane, rt, namespace)]
    assert moved == ["zzz-victim"]
    said = _event_messages(control_plane, namespace, "EvacuationWaiting")
    assert (
        "evacuation off bad waits: no Trusted, uncordoned member of level 3 or above is one "
        "its own nodeSelector or node affinity allows"
    ) in said


@pytest.mark.tpm
def test_an_evacuation_is_pinned_where_the_vmi_fits_not_to_a_full_member(
    control_plane: ControlPlane,
    rt: Runtime,
    namespace: str,
    under_pool_policy: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A member filled by someone else's VMs would capture the evacuation (first by name
    among equals): the scheduler could never place the VM there, KubeVirt fails the
    migration, and after three such failures the VM stays on the untrusted host. The filler
    wears a Lazy Box's label, which anyone can write: it still counts by its requests."""
    allocatable = {"cpu": "8", "memory": "32Gi", "pods": "110"}
    for name in ("a-full", "b-roomy"):
        rt.view.observe_member(_trusted(name, 3), "ADDED")
        rt.view.observe_node({"metadata": {"name": name}, "status": {"allocatable": allocatable}},
                             "ADDED")  # fmt: skip
    filler = _vmi("filler", 0)
    filler["metadata"].update(namespace="tenant", labels={BOX_LABEL: "not-a-box"})
    filler["spec"]["domain"]["resources"] = {"requests": {"cpu": "7", "memory": "4Gi"}}
    rt.view.observe_vmi({**filler, "status": {"nodeName": "a-full", "phase": "Running"}}, "ADDED")
    db = _vmi("db", 3, selector=True)
    db["metadata"]["namespace"] = namespace
    db["spec"]["domain"]["resources"] = {"requests": {"cpu": "2", "memory": "2Gi"}}
    rt.view.observe_vmi({**db, "status": {"nodeName": "bad", "phase": "Running"}}, "ADDED")

    def pinned() -> list[str]:
        moves = _migrations_seen(control_plane, rt, namespace)
        return [m["spec"]["addedNodeSelector"][HOSTNAME_LABEL] for m in moves]

    asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Migrate"))
    assert pinned() == ["b-roomy"]

    more = json.loads(json.dumps(filler))
    more["metadata"]["name"] = "filler2"
    more["spec"]["domain"]["resources"] = {"requests": {"cpu": "5", "memory": "4Gi"}}
    rt.view.observe_vmi({**more, "status": {"nodeName": "b-roomy", "phase": "Running"}}, "ADDED")
    rt.view.observe_vmi({**db, "metadata": {**db["metadata"], "name": "db2"},
                         "status": {"nodeName": "bad", "phase": "Running"}}, "ADDED")  # fmt: skip
    with caplog.at_level("WARNING", logger="gtvp.evacuation"):
        asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Migrate"))
    assert pinned() == ["b-roomy"]  # db2 fits nowhere now: it waits, and says why
    assert any(
        f"evacuation of {namespace}/db2 off bad waits: no member that may take it has room"
        in r.getMessage()
        for r in caplog.records
    )
    asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Migrate"))  # said once, not per pass
    said = control_plane.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "reason=EvacuationWaiting",
        "-o", "json",
    )  # fmt: skip
    events = json.loads(said.stdout)["items"]
    assert [(e["involvedObject"]["name"], e["type"], e["message"], e.get("count", 1))
            for e in events] == [
        ("db2", "Warning", "evacuation off bad waits: no member that may take it has room for "
         "what its pod asks (2000m CPU and 2.3 GiB, KubeVirt's overhead included)", 1)
    ]  # fmt: skip


@pytest.mark.tpm
def test_an_evacuation_is_never_pinned_to_a_cordoned_member(
    control_plane: ControlPlane, rt: Runtime, namespace: str, under_pool_policy: None
) -> None:
    """A cordoned member (first by name, caching as much) would take the evacuation's
    pin: the scheduler never places the target pod there, KubeVirt fails the migration
    after minutes, and three such failures leave the VM on the untrusted host."""
    allocatable = {"cpu": "8", "memory": "32Gi", "pods": "110"}
    for name, cordoned in (("a-cordoned", True), ("b-open", False)):
        rt.view.observe_member(_trusted(name, 3), "ADDED")
        rt.view.observe_node({"metadata": {"name": name}, "spec": {"unschedulable": cordoned},
                              "status": {"allocatable": allocatable}}, "ADDED")  # fmt: skip
    db = _vmi("db", 3, selector=True)
    db["metadata"]["namespace"] = namespace
    rt.view.observe_vmi({**db, "status": {"nodeName": "bad", "phase": "Running"}}, "ADDED")
    asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Migrate"))
    moves = _migrations_seen(control_plane, rt, namespace)
    assert [m["spec"]["addedNodeSelector"][HOSTNAME_LABEL] for m in moves] == ["b-open"]


def _migrations_seen(
    control_plane: ControlPlane, rt: Runtime, namespace: str
) -> list[dict[str, Any]]:
    """The namespace's migrations on the server, fed to the view as the operator's watch would."""
    out = control_plane.kubectl("get", "vmim", "-n", namespace, "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    for m in items:
        rt.view.observe_migration(m, "ADDED")
    return items


@pytest.mark.tpm
def test_an_evacuation_pinned_to_a_member_that_then_fills_up_is_cancelled_and_moved(
    control_plane: ControlPlane,
    rt: Runtime,
    namespace: str,
    under_pool_policy: None,
) -> None:
    """The attack waits for the pin: once gtvp has pinned the evacuation to a member, a
    tenant fills that member. KubeVirt would keep the target pod Pending, then fail the
    migration; three such failures and the VM stays on the untrusted host. gtvp cancels the
    pin before KubeVirt schedules it and pins the VM where it fits."""
    allocatable = {"cpu": "8", "memory": "32Gi", "pods": "110"}

    def member(name: str) -> None:
        rt.view.observe_member(_trusted(name, 3), "ADDED")
        rt.view.observe_node({"metadata": {"name": name}, "status": {"allocatable": allocatable}},
                             "ADDED")  # fmt: skip

    member("a-first")
    db = _vmi("db", 3, selector=True)
    db["metadata"]["namespace"] = namespace
    db["spec"]["domain"]["resources"] = {"requests": {"cpu": "2", "memory": "2Gi"}}
    rt.view.observe_vmi({**db, "status": {"nodeName": "bad", "phase": "Running"}}, "ADDED")

    def moves() -> list[dict[str, Any]]:
        return _migrations_seen(control_plane, rt, namespace)

    asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Migrate"))
    first = moves()
    assert [m["spec"]["addedNodeSelector"][HOSTNAME_LABEL] for m in first] == ["a-first"]
    filler = _vmi("filler", 0)
    filler["metadata"]["namespace"] = "tenant"
    filler["spec"]["domain"]["resources"] = {"requests": {"cpu": "7", "memory": "4Gi"}}
    rt.view.observe_vmi({**filler, "status": {"nodeName": "a-first", "phase": "Running"}},
                        "ADDED")  # fmt: skip
    member("b-later")
    asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Migrate"))
    assert moves() == []  # taken back before KubeVirt scheduled it: no failure counted
    said = control_plane.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "reason=EvacuationRetarget",
        "-o", "json",
    )  # fmt: skip
    events = json.loads(said.stdout)["items"]
    assert [e["message"] for e in events] == [
        f"evacuation of bad: cancelled migration {first[0]['metadata']['name']}, its target "
        "a-first has no room for it any more before the migration was scheduled"
    ]
    asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Migrate"))
    assert [m["spec"]["addedNodeSelector"][HOSTNAME_LABEL] for m in moves()] == ["b-later"]


@pytest.mark.tpm
def test_an_evacuation_that_failed_on_a_member_is_retried_on_another(
    control_plane: ControlPlane,
    rt: Runtime,
    namespace: str,
    under_pool_policy: None,
) -> None:
    """The attack fills the member gtvp pins the evacuation to with what gtvp does not count
    (plain pods): gtvp sees room, the scheduler does not, KubeVirt fails the migration. A
    retry pinned to the same member would fail too, and three failures leave the VM on the
    untrusted host; the retry goes to a member where no attempt failed."""
    for name in ("a-first", "b-later"):
        rt.view.observe_member(_trusted(name, 3), "ADDED")
        rt.view.observe_node({"metadata": {"name": name},
                              "status": {"allocatable": {"cpu": "8", "memory": "32Gi"}}},
                             "ADDED")  # fmt: skip
    db = _vmi("db", 3, selector=True)
    db["metadata"]["namespace"] = namespace
    rt.view.observe_vmi({**db, "status": {"nodeName": "bad", "phase": "Running"}}, "ADDED")

    def moves() -> list[dict[str, Any]]:
        return _migrations_seen(control_plane, rt, namespace)

    asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Migrate"))
    (first,) = moves()
    assert first["spec"]["addedNodeSelector"][HOSTNAME_LABEL] == "a-first"
    control_plane.kubectl(
        "patch",
        "vmim",
        "-n",
        namespace,
        first["metadata"]["name"],
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"phase": "Failed"}}),
    )  # fmt: skip  (KubeVirt's pending timeout: the target pod was never scheduled)
    moves()
    asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Migrate"))
    retry = [m for m in moves() if m["metadata"]["name"] != first["metadata"]["name"]]
    assert [m["spec"]["addedNodeSelector"][HOSTNAME_LABEL] for m in retry] == ["b-later"]
    assert retry[0]["metadata"]["annotations"]["gtvp.io/evacuation-attempt"] == "1"


@pytest.mark.tpm
@pytest.mark.parametrize("with_controller", [True, False])
def test_a_stop_ends_the_vmi_whatever_its_owner_references_say(
    control_plane: ControlPlane,
    rt: Runtime,
    namespace: str,
    under_pool_policy: None,
    with_controller: bool,
) -> None:
    """The VM's user may add owner references to the VMI: one naming a halted decoy VM
    (not the controller, another uid) must not be what gtvp "stops" while the VMI runs on.
    The VM that really controls it is halted (KubeVirt would start it again otherwise) and
    the VMI deleted either way."""

    def create(obj: dict[str, Any]) -> dict[str, Any]:
        out = control_plane.kubectl("create", "-n", namespace, "-o", "json", "-f", "-",
                                    input_text=json.dumps(obj))  # fmt: skip
        made: dict[str, Any] = json.loads(out.stdout)
        return made

    def vm(name: str, running: bool) -> dict[str, Any]:
        return create({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": name, "labels": {"gtvp.io/level": "3"}},
            "spec": {"running": running, "template": {
                "metadata": {"labels": {"gtvp.io/level": "3"}},
                "spec": {"domain": {"devices": {}, "memory": {"guest": "64Mi"}}}}},
        })  # fmt: skip

    real, decoy = vm("db", True), vm("decoy", False)
    refs = [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "decoy",
             "uid": decoy["metadata"]["uid"]}]  # fmt: skip
    if with_controller:
        refs.append({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "db",
                     "uid": real["metadata"]["uid"], "controller": True})  # fmt: skip
    body = _vmi("db", 3, selector=True)
    body["metadata"].update(namespace=namespace, ownerReferences=refs)
    vmi = create(body)
    for obj in (real, decoy):
        rt.view.observe_vm(obj, "ADDED")
    rt.view.observe_vmi({**vmi, "status": {"nodeName": "bad", "phase": "Running"}}, "ADDED")

    asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Stop"))

    def get(kind: str, name: str) -> dict[str, Any]:
        out = control_plane.kubectl("get", kind, name, "-n", namespace, "-o", "json",
                                    check=False)  # fmt: skip
        return json.loads(out.stdout) if out.returncode == 0 else {}

    gone = get("vmi", "db")
    assert not gone or gone["metadata"].get("deletionTimestamp")
    assert get("vm", "decoy")["metadata"]["resourceVersion"] == decoy["metadata"]["resourceVersion"]
    assert get("vm", "db")["spec"]["running"] is (not with_controller)


def _kubectl_json(control_plane: ControlPlane, namespace: str, *args: str) -> dict[str, Any]:
    out = control_plane.kubectl(*args, "-n", namespace, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def _gated_vm_with_vmi(
    control_plane: ControlPlane,
    rt: Runtime,
    namespace: str,
    name: str,
    node: str,
    *,
    vm_on_server: bool = True,
) -> None:
    """A running level-3 VM and the VMI it controls, in the view (on `node`) and on the
    server (the VM only in the view unless `vm_on_server`)."""
    vm = {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name, "labels": {"gtvp.io/level": "3"}},
        "spec": {"running": True, "template": {
            "metadata": {"labels": {"gtvp.io/level": "3"}},
            "spec": {"domain": {"devices": {}, "memory": {"guest": "64Mi"}}}}},
    }  # fmt: skip
    if vm_on_server:
        made = json.loads(control_plane.kubectl(
            "create", "-n", namespace, "-o", "json", "-f", "-", input_text=json.dumps(vm)
        ).stdout)  # fmt: skip
    else:
        made = {**vm, "metadata": {**vm["metadata"], "namespace": namespace, "uid": "gone"}}
    rt.view.observe_vm(made, "ADDED")
    body = _vmi(name, 3, selector=True)
    body["metadata"].update(namespace=namespace, ownerReferences=[{
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": name,
        "uid": made["metadata"]["uid"], "controller": True}])  # fmt: skip
    vmi = json.loads(control_plane.kubectl(
        "create", "-n", namespace, "-o", "json", "-f", "-", input_text=json.dumps(body)
    ).stdout)  # fmt: skip
    rt.view.observe_vmi({**vmi, "status": {"nodeName": node, "phase": "Running"}}, "ADDED")


def test_without_a_policy_a_gated_vm_on_an_untrusted_member_is_stopped_past_the_bound(
    control_plane: ControlPlane, rt: Runtime, namespace: str
) -> None:
    """The enforced SecurityPolicy deleted (or none of its generations accepted): every
    member is Untrusted (NoPolicy), nothing verifies any host and nothing can move. A gated
    VM does not run on for good (found by a review): it is told when it will be stopped,
    and stopped once the default migrateWithin (1h) has passed since its member lost its
    level; its VMI is deleted but its VM not halted, so that it starts again by itself
    once a policy is back (found by a second review: an accidental deletion stopped every
    VM at once, for good)."""
    assert rt.view.policy is None
    _gated_vm_with_vmi(control_plane, rt, namespace, "db", "bad")
    now = dt.datetime.now(dt.UTC)
    trust = {"verdict": "Untrusted", "reason": "NoPolicy", "verifiedAt": "t"}
    status = {"phase": "Untrusted", "level": 0, "trust": trust,
              "belowSince": below_since(None, 0, now - dt.timedelta(minutes=5))}  # fmt: skip
    rt.view.observe_member({"metadata": {"name": "bad"}, "status": status}, "ADDED")

    rt.view.policy_lost_at = now - dt.timedelta(minutes=5)
    asyncio.run(attestation._move_vms_off(rt, "bad", status))
    assert _vmi_present(control_plane, namespace, "db")  # 55 minutes left
    said = _event_messages(control_plane, namespace, "NoPolicy")
    assert "no SecurityPolicy is in force (NoPolicy); gtvp stops the VM at " in said
    assert "bad" in rt.schedule.next_due  # looked at again when it is due
    # a member that has held less for days: the hour counts from the policy's loss
    long_ago = {**status, "belowSince": below_since(None, 0, now - dt.timedelta(days=3))}
    asyncio.run(attestation._move_vms_off(rt, "bad", long_ago))
    assert _vmi_present(control_plane, namespace, "db")

    rt.view.policy_lost_at = now - dt.timedelta(hours=2)
    late = {**status, "belowSince": below_since(None, 0, now - dt.timedelta(hours=2))}
    assert asyncio.run(attestation._move_vms_off(rt, "bad", late)) is False  # nothing left
    assert not _vmi_present(control_plane, namespace, "db")
    assert _kubectl_json(control_plane, namespace, "get", "vm", "db")["spec"]["running"] is True
    said = _event_messages(control_plane, namespace, "NoPolicy")
    assert "no SecurityPolicy has been in force for 1h" in said


def test_a_stop_whose_halt_is_refused_still_deletes_the_vmi(
    control_plane: ControlPlane, rt: Runtime, namespace: str, under_pool_policy: None
) -> None:
    """Halting the VM can fail (gone already, a webhook, a 5xx): the VMI, what runs on the
    untrusted host, is deleted all the same."""
    # the VM gone from the server (its VMI orphaned) while the view still has it: a 404
    _gated_vm_with_vmi(control_plane, rt, namespace, "db", "bad", vm_on_server=False)

    asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Stop"))
    assert not _vmi_present(control_plane, namespace, "db")


def test_a_stop_deletes_only_the_vmi_it_decided_on(
    control_plane: ControlPlane, rt: Runtime, namespace: str, under_pool_policy: None
) -> None:
    """A leader decided to stop `db` on a host that lost trust, on a view the watch has
    not brought up to date: the VMI was since deleted and started again under its name
    (another uid, elsewhere). The delete carries the uid decided on: the new one stays
    (found by a review)."""
    _gated_vm_with_vmi(control_plane, rt, namespace, "db", "bad", vm_on_server=False)
    control_plane.kubectl("delete", "vmi", "db", "-n", namespace, "--wait=false")
    again = _vmi("db", 3, selector=True)
    again["metadata"]["namespace"] = namespace
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(again))
    asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Stop"))
    assert _vmi_present(control_plane, namespace, "db")


def test_a_stop_decided_before_the_view_moved_on_touches_neither_the_new_vmi_nor_its_vm(
    control_plane: ControlPlane, rt: Runtime, namespace: str, under_pool_policy: None
) -> None:
    """Stops run one by one: by the time one is carried out the watch may have brought the
    VMI started again under the name (another uid). Neither it nor its VM is touched (a
    halt would have KubeVirt stop it); found by a review."""
    _gated_vm_with_vmi(control_plane, rt, namespace, "db", "bad")
    (decided,) = evacuation._gated_on(rt, "bad", 0)
    old = _kubectl_json(control_plane, namespace, "get", "vmi", "db")
    control_plane.kubectl("delete", "vmi", "db", "-n", namespace, "--wait=false")
    server_set = ("uid", "resourceVersion", "creationTimestamp")
    meta = {k: v for k, v in old["metadata"].items() if k not in server_set}
    again = {**old, "metadata": meta}
    made = json.loads(control_plane.kubectl(
        "create", "-n", namespace, "-o", "json", "-f", "-", input_text=json.dumps(again)
    ).stdout)  # fmt: skip
    rt.view.observe_vmi({**made, "status": {"nodeName": "good", "phase": "Running"}}, "MODIFIED")
    assert evacuation._stop_vm(rt, decided) is True
    assert _vmi_present(control_plane, namespace, "db")
    assert _kubectl_json(control_plane, namespace, "get", "vm", "db")["spec"]["running"] is True


def test_a_stop_the_api_server_refuses_is_looked_at_again_soon(
    control_plane: ControlPlane, rt: Runtime, namespace: str, under_pool_policy: None
) -> None:
    """A Stop that did not land (here the API server refuses the operator's identity) is
    not forgotten until the member's next event: the caller is told to look again soon."""
    _gated_vm_with_vmi(control_plane, rt, namespace, "db", "bad")
    nobody = Runtime(
        settings=rt.settings,
        clients=kube.make_clients(str(control_plane.kubeconfig_for(NOBODY))),
    )
    nobody.view = rt.view
    status = {"phase": "Untrusted", "level": 0,
              "trust": {"verdict": "Untrusted", "reason": "PcrMismatch", "verifiedAt": "t"},
              "effectivePolicy": {"level": 3, "onUntrusted": "Stop"}}  # fmt: skip
    assert asyncio.run(attestation._move_vms_off(nobody, "bad", status)) is True
    assert _vmi_present(control_plane, namespace, "db")
    assert asyncio.run(attestation._move_vms_off(rt, "bad", status)) is False
    assert not _vmi_present(control_plane, namespace, "db")


def _running_vmi(
    control_plane: ControlPlane,
    rt: Runtime,
    namespace: str,
    name: str,
    level: int,
    node: str,
    **status: Any,
) -> dict[str, Any]:
    """A gated VMI made on the server, in the runtime's view as on `node` (Running unless
    `status` says otherwise)."""
    body = _vmi(name, level, selector=True)
    body["metadata"]["namespace"] = namespace
    out = control_plane.kubectl("create", "-n", namespace, "-o", "json", "-f", "-",
                                input_text=json.dumps(body))  # fmt: skip
    made: dict[str, Any] = json.loads(out.stdout)
    rt.view.observe_vmi(
        {**made, "status": {"nodeName": node, "phase": "Running", **status}}, "ADDED"
    )
    return made


def _event_messages(control_plane: ControlPlane, namespace: str, reason: str) -> str:
    """The messages of the namespace's Events of `reason`, space-separated."""
    return control_plane.kubectl(
        "get", "events", "-n", namespace, "--field-selector", f"reason={reason}",
        "-o", "jsonpath={.items[*].message}",
    ).stdout  # fmt: skip


def _vmi_present(control_plane: ControlPlane, namespace: str, name: str) -> bool:
    """The VMI exists on the server and is not being deleted."""
    out = control_plane.kubectl("get", "vmi", name, "-n", namespace, "-o", "json",
                                check=False)  # fmt: skip
    return out.returncode == 0 and not json.loads(out.stdout)["metadata"].get("deletionTimestamp")


@pytest.mark.tpm
def test_a_vm_left_on_a_member_whose_level_dropped_is_stopped_past_its_bound(
    control_plane: ControlPlane, rt: Runtime, namespace: str, swtpm_ca: SwtpmCA, shared_tpm: Swtpm
) -> None:
    """The member still attests, but at level 2 since 11 s: a level-3 VM there is out of
    place, and its level's migrateWithin (10 s) bounds that as for a member that lost its
    verdict; a level-2 VM on it stays, and so does a level-3 VMI that has ended."""
    del shared_tpm  # the CA has issued its certificates
    spec = pool_policy(swtpm_ca, name=POLICY, migrate_within={2: "10s", 3: "10s"})["spec"]
    rt.view.policy = parse_policy(POLICY, spec)
    ago = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=11)
    status = {"phase": "Trusted", "level": 2, "belowSince": below_since(None, 2, ago)}
    for name, level, phase in (("db", 3, "Running"), ("web", 2, "Running"),
                               ("done", 3, "Succeeded")):  # fmt: skip
        _running_vmi(control_plane, rt, namespace, name, level, "lower", phase=phase)
    rt.view.observe_member({"metadata": {"name": "lower"}, "status": status}, "ADDED")
    asyncio.run(attestation._move_vms_off(rt, "lower", status))

    def present(name: str) -> bool:
        return _vmi_present(control_plane, namespace, name)

    assert not present("db")
    assert present("web")
    assert present("done")  # it ended: it runs nowhere, nothing to stop
    said = _event_messages(control_plane, namespace, "EvacuationDeadline")
    assert said.startswith("still on lower 10s after its level dropped below theirs")


def _left_on_bad(
    control_plane: ControlPlane,
    rt: Runtime,
    namespace: str,
    ca: SwtpmCA,
    migrate_within: dict[int, str],
    status: dict[str, Any],
    vmis: dict[str, int],
) -> None:
    """Under the pool's policy (with `migrate_within`), gated VMIs (name -> level) running on
    member `bad`, whose `status` the leader acts on now."""
    spec = pool_policy(ca, name=POLICY, migrate_within=migrate_within)["spec"]
    rt.view.policy = parse_policy(POLICY, spec)
    for name, level in vmis.items():
        _running_vmi(control_plane, rt, namespace, name, level, "bad")
    rt.view.observe_member({"metadata": {"name": "bad"}, "status": status}, "ADDED")
    asyncio.run(attestation._move_vms_off(rt, "bad", status))


@pytest.mark.tpm
def test_a_level_without_migrate_within_still_bounds_the_wait_for_a_move(
    control_plane: ControlPlane, rt: Runtime, namespace: str, swtpm_ca: SwtpmCA, shared_tpm: Swtpm
) -> None:
    """No level of the policy sets migrateWithin, yet a Migrate level's VM does not wait for
    good on a member that lost trust (a tenant deleting each target pod, a pool with no
    room): past the default bound it is stopped, and the Event says the bound was gtvp's,
    not the level's. A VM of a level whose migrateWithin is longer still waits."""
    del shared_tpm  # the CA has issued its certificates
    ago = dt.datetime.now(dt.UTC) - DEFAULT_MIGRATE_WITHIN - dt.timedelta(seconds=5)
    status = {"phase": "Untrusted", "level": 0, "belowSince": below_since(None, 0, ago)}
    _left_on_bad(control_plane, rt, namespace, swtpm_ca, {3: "3h"}, status, {"db": 2, "vault": 3})

    assert not _vmi_present(control_plane, namespace, "db")
    assert _vmi_present(control_plane, namespace, "vault")
    said = _event_messages(control_plane, namespace, "EvacuationDeadline")
    assert said.startswith("still on bad 1h after it lost trust (the bound on a level without")


@pytest.mark.tpm
@pytest.mark.parametrize(
    ("within", "waited", "said"),
    [("10s", dt.timedelta(seconds=11), "10s"), ("1h", dt.timedelta(hours=1, seconds=5), "1h")],
)
def test_a_keep_level_vm_moved_by_its_members_level_is_bound_by_that_levels_wait(
    control_plane: ControlPlane,
    rt: Runtime,
    namespace: str,
    swtpm_ca: SwtpmCA,
    shared_tpm: Swtpm,
    within: str,
    waited: dt.timedelta,
    said: str,
) -> None:
    """Level 1 says Keep, level 3 Migrate within `within`: a level-1 VM on a level-3 member
    that lost trust is migrated by the member's level, and that level's bound stops it when
    its move does not happen, as it stops the member's own level-3 VMs. The Event names
    that level's choice, also when it chose 1h, the length of gtvp's default (an
    administrator looking for why the VM stopped looks at the right policy field)."""
    del shared_tpm  # the CA has issued its certificates
    ago = dt.datetime.now(dt.UTC) - waited
    status = {
        "phase": "Untrusted", "level": 0, "belowSince": below_since(None, 0, ago),
        "trust": {"verdict": "Untrusted", "reason": "PcrMismatch", "verifiedAt": "t"},
        "effectivePolicy": {"level": 3, "onUntrusted": "Migrate"},
    }  # fmt: skip
    _left_on_bad(control_plane, rt, namespace, swtpm_ca, {3: within}, status, {"low": 1})
    assert not _vmi_present(control_plane, namespace, "low")
    message = _event_messages(control_plane, namespace, "EvacuationDeadline")
    assert message.startswith(
        f"still on bad {said} after it lost trust (the migrateWithin of bad's level)"
    )


@pytest.mark.tpm
@pytest.mark.parametrize("phase", ["Trusted", "Maintenance"])
def test_a_vm_whose_level_says_stop_is_stopped_off_a_lowered_or_failed_member(
    control_plane: ControlPlane,
    rt: Runtime,
    namespace: str,
    swtpm_ca: SwtpmCA,
    shared_tpm: Swtpm,
    phase: str,
) -> None:
    """Level 3 says Stop: its VMs must not be moved off a host that still attests, but
    at level 2 now (an administrator lowered it), nor off a host in Maintenance whose
    verdict then failed: stopped at once, as off a host that lost trust (no migrateWithin
    bounds a Stop level). A level-2 VM on the lowered host stays."""
    del shared_tpm  # the CA has issued its certificates
    spec = pool_policy(swtpm_ca, name=POLICY, on_untrusted={2: "Migrate", 3: "Stop"})["spec"]
    rt.view.policy = parse_policy(POLICY, spec)
    if phase == "Trusted":
        status: dict[str, Any] = {"phase": "Trusted", "level": 2}
    else:
        status = {
            "phase": "Maintenance",
            "level": 0,
            "trust": {"verdict": "Untrusted", "reason": "PcrMismatch", "verifiedAt": "t"},
            "effectivePolicy": {"level": 3, "onUntrusted": "Stop"},
        }
    for name, level in (("db", 3), ("web", 2)):
        _running_vmi(control_plane, rt, namespace, name, level, "lower")
    rt.view.observe_member({"metadata": {"name": "lower"}, "status": status}, "ADDED")
    asyncio.run(attestation._move_vms_off(rt, "lower", status))

    def present(name: str) -> bool:
        return _vmi_present(control_plane, namespace, name)

    assert not present("db")
    moved = control_plane.kubectl("get", "vmim", "-n", namespace, "-o", "name").stdout
    assert "db" not in moved  # stopped, not migrated
    if phase == "Trusted":
        assert present("web")


def test_a_vm_that_cannot_live_migrate_is_stopped_off_a_member_that_lost_trust(
    control_plane: ControlPlane, rt: Runtime, namespace: str
) -> None:
    """A gated VM with a ReadWriteOnce volume (KubeVirt: LiveMigratable False) on a member
    that lost trust, under a level that says Migrate without migrateWithin: KubeVirt would
    refuse every migration, so waiting would keep it there for good. It is stopped, with
    an EvacuationImpossible Event saying why; a migratable VM beside it is migrated."""
    rt.view.policy = parse_policy(POLICY, sample_policy_spec())
    rt.view.observe_member(_trusted("good", 3), "ADDED")
    room = {"allocatable": {"cpu": "8", "memory": "32Gi"}}
    rt.view.observe_node({"metadata": {"name": "good"}, "status": room}, "ADDED")
    for name, migratable in (("db", False), ("web", True)):
        cond = {"type": "LiveMigratable", "status": str(migratable)}
        if not migratable:
            cond.update(
                reason="DisksNotLiveMigratable",
                message="cannot migrate VMI: PVC data is not shared, live migration requires "
                "that all PVCs must be shared (using ReadWriteMany access mode)",
            )
        # level 1: the sample policy sets it no migrateWithin, which would bound the wait
        _running_vmi(control_plane, rt, namespace, name, 1, "bad", conditions=[cond])
    asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Migrate"))

    def present(name: str) -> bool:
        return _vmi_present(control_plane, namespace, name)

    assert not present("db")
    assert present("web")
    migrations = json.loads(
        control_plane.kubectl("get", "vmim", "-n", namespace, "-o", "json").stdout
    )["items"]
    assert [m["spec"]["vmiName"] for m in migrations] == ["web"]
    said = _event_messages(control_plane, namespace, "EvacuationImpossible")
    assert "cannot live-migrate (DisksNotLiveMigratable: cannot migrate VMI" in said


def test_a_tenants_unscheduled_migration_does_not_hold_a_vm_on_a_member_that_lost_trust(
    control_plane: ControlPlane, rt: Runtime, namespace: str
) -> None:
    """The VM's user migrates it first, pinned where nothing fits, with a pending timeout
    of a day: gtvp waits for a VMI's active migration, so the VM would stay on the member
    that lost trust. gtvp deletes that migration (an EvacuationPreempted Event says so) and
    starts its own."""
    rt.view.policy = parse_policy(POLICY, sample_policy_spec())
    rt.view.observe_member(_trusted("good", 3), "ADDED")
    room = {"allocatable": {"cpu": "8", "memory": "32Gi"}}
    rt.view.observe_node({"metadata": {"name": "good"}, "status": room}, "ADDED")
    _running_vmi(control_plane, rt, namespace, "db", 2, "bad")
    hold = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {
            "name": "mine",
            "namespace": namespace,
            "annotations": {"kubevirt.io/migrationPendingPodTimeoutSeconds": "86400"},
        },
        "spec": {"vmiName": "db", "addedNodeSelector": {"nowhere": "true"}},
    }
    out = control_plane.kubectl("create", "-n", namespace, "-o", "json", "-f", "-",
                                input_text=json.dumps(hold))  # fmt: skip
    made = json.loads(out.stdout)
    # as the view would hold it past the grace gtvp gives KubeVirt's own queued migrations
    made["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    rt.view.observe_migration(made, "ADDED")
    asyncio.run(evacuation.evacuate(rt, "bad", "inc", "Migrate"))
    left = json.loads(control_plane.kubectl("get", "vmim", "-n", namespace, "-o", "json").stdout)
    names = [m["metadata"]["name"] for m in left["items"]]
    assert "mine" not in names
    assert [n for n in names if n.startswith("gtvp-evac-db-")], names
    said = _event_messages(control_plane, namespace, "EvacuationPreempted")
    assert "deleted migration mine" in said


def test_a_box_takes_room_where_its_vmi_runs_and_a_box_label_hides_no_vm(
    rt: Runtime,
) -> None:
    """Placement and balancing count a box on its member; after a live migration that is
    the member its VMI runs on, not the one the box loop chose when it placed it."""
    for name in ("a", "b"):
        rt.view.observe_member(_trusted(name, 3), "ADDED")
        rt.view.observe_node({"metadata": {"name": name},
                              "status": {"allocatable": {"cpu": "8", "memory": "32Gi"}}},
                             "ADDED")  # fmt: skip
    box = {
        "metadata": {"namespace": "ns", "name": "web", "resourceVersion": "1"},
        "spec": {"resources": {"cpu": "6", "memory": "1Gi"}},
        "status": {"node": "a"},
    }
    rt.view.observe_box(box, "ADDED")
    rt.boxes.decided_node[("ns", "web")] = "a"  # where the box loop placed it
    vmi = _vmi("web", 3)
    vmi["metadata"]["labels"][BOX_LABEL] = "web"
    vmi["spec"]["domain"]["resources"] = {"requests": {"cpu": "6", "memory": "1Gi"}}
    rt.view.observe_vmi({**vmi, "status": {"nodeName": "b", "phase": "Running"}}, "ADDED")
    now = dt.datetime.now(dt.UTC)
    used = {h.name: h.cpu_used for h in box_hosts.hosts(rt, now)}
    assert used == {"a": 0, "b": 6000}
    fake = _vmi("not-a-box", 0)  # a tenant's VM wearing a box's label still takes its room
    fake["metadata"]["labels"] = {BOX_LABEL: "web"}
    fake["spec"]["domain"]["resources"] = {"requests": {"cpu": "1", "memory": "1Gi"}}
    rt.view.observe_vmi({**fake, "status": {"nodeName": "a", "phase": "Running"}}, "ADDED")
    used = {h.name: h.cpu_used for h in box_hosts.hosts(rt, now)}
    assert used == {"a": 1000, "b": 6000}
