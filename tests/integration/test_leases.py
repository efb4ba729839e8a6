"""Replicas sharing the pool through real Leases on the real API server, with a controlled clock.

Each `LeaseKeeper` here is what a gtvp-operator replica runs every retry period; the test
drives the rounds itself and moves each replica's monotonic clock, so a dead replica, a
frozen one and a handover are replayed exactly (the e2e tests kill real processes).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from gtvp import kube
from gtvp.coordination import Coordination
from gtvp.core.shards import SHARDS, LeaseTiming
from gtvp.handlers.leases import LeaseKeeper, lease_name
from gtvp.runtime import OperatorSettings, Runtime
from gtvp_local.controlplane import OPERATOR, ControlPlane, Identity, agent_identity
from gtvp_local.pool import apply_manifests

pytestmark = [pytest.mark.controlplane]

TIMING = LeaseTiming(duration=15, renew_deadline=10, retry_period=2)


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    """A namespace of its own with the operator's Lease rights (as the chart grants them)."""
    apply_manifests(control_plane)
    ns = f"gtvp-leases-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", ns)
    control_plane.kubectl(
        "create",
        "role",
        "leases",
        "-n",
        ns,
        "--verb=get,list,watch,create,update,delete",
        "--resource=leases.coordination.k8s.io",
    )
    control_plane.kubectl(
        "create", "rolebinding", "leases", "-n", ns, "--role=leases", "--group=gtvp:operators"
    )
    yield ns
    control_plane.kubectl("delete", "namespace", ns, "--wait=false")


def _replica(cp: ControlPlane, ns: str, identity: str, *, who: Identity = OPERATOR) -> LeaseKeeper:
    clients = kube.make_clients(
        str(cp.kubeconfig_for(who)), field_manager=f"gtvp-operator/{identity}"
    )
    clock = Clock()  # its wall clock too: the test moves time, not the machine
    co = Coordination(identity, namespace=ns, timing=TIMING, clock=clock, wall=clock)
    rt = Runtime(settings=OperatorSettings(), clients=clients, coordination=co)
    return LeaseKeeper(rt)


def _round(*keepers: LeaseKeeper) -> None:
    for k in keepers:
        asyncio.run(k.round())


def _advance(seconds: float, *keepers: LeaseKeeper) -> None:
    for k in keepers:
        k.co.clock.now += seconds  # type: ignore[attr-defined]


def _holders(k: LeaseKeeper) -> dict[int, str]:
    leases = {i["metadata"]["name"]: i for i in kube.list_leases(k.rt.clients, k.co.namespace)}
    return {
        s: str(
            (leases.get(lease_name("shard", s), {}).get("spec") or {}).get("holderIdentity") or ""
        )
        for s in range(SHARDS)
    }


def _assert_one_writer(*keepers: LeaseKeeper) -> None:
    """No shard is held by two replicas, and each held shard's Lease names its holder."""
    on_server = _holders(keepers[0])
    seen: set[int] = set()
    for k in keepers:
        mine = {s for s in range(SHARDS) if k.co.holds_shard(s)}
        assert not mine & seen, f"{k.co.identity} writes for shards another replica holds"
        seen |= mine
        assert all(on_server[s] == k.co.identity for s in mine)


def test_replicas_share_the_shards_fairly_with_one_writer_each(
    control_plane: ControlPlane, namespace: str
) -> None:
    a, b = _replica(control_plane, namespace, "a"), _replica(control_plane, namespace, "b")
    _round(a)
    assert len(a.co.held) == SHARDS
    assert a.co.leads()
    _round(b)  # b is live now, but a still holds everything: b takes nothing yet
    assert not b.co.held
    assert not b.co.leads()
    _assert_one_writer(a, b)
    _round(a, b)  # a hands back beyond its new fair share, b takes the freed shards
    _assert_one_writer(a, b)
    assert len(a.co.held) == len(b.co.held) == SHARDS // 2
    assert set(_holders(a).values()) == {"a", "b"}


def test_a_dead_replicas_shards_wait_the_lease_duration_then_move(
    control_plane: ControlPlane, namespace: str
) -> None:
    a, b = _replica(control_plane, namespace, "a"), _replica(control_plane, namespace, "b")
    _round(a, b, a, b)
    assert len(b.co.held) == SHARDS // 2
    assert a.co.leads()
    # a dies: it renews no more. b sees a's presence unchanged for 12 s: not yet expired
    for _ in range(6):
        _advance(2, b)
        _round(b)
    assert len(b.co.held) == SHARDS // 2
    assert not b.co.leads()
    for _ in range(2):  # past the 15 s lease duration: b takes a's shards and the leadership
        _advance(2, b)
        _round(b)
    assert len(b.co.held) == SHARDS
    assert b.co.leads()
    _assert_one_writer(b)


def test_a_frozen_replica_is_fenced_and_never_writes_beside_its_successor(
    control_plane: ControlPlane, namespace: str
) -> None:
    a, b = _replica(control_plane, namespace, "a"), _replica(control_plane, namespace, "b")
    _round(a, b, a, b)
    _advance(16, b)  # a frozen (SIGSTOP) for 16 s; b, looking every 2 s, takes over
    _round(b)
    _advance(2, b)
    _round(b)
    assert len(b.co.held) == SHARDS
    assert b.co.leads()
    _advance(20, a)  # a resumes: its renew deadline is long past, so it holds nothing at once
    assert not a.co.held or not any(a.co.holds_shard(s) for s in range(SHARDS))
    assert not a.co.leads()
    _assert_one_writer(a, b)
    for _ in range(3):  # then it rejoins through the normal handover, never beside b
        _round(a)
        _assert_one_writer(a, b)
        _round(b)
        _assert_one_writer(a, b)
    assert len(a.co.held) == len(b.co.held) == SHARDS // 2
    assert b.co.leads()
    assert not a.co.leads()


def test_a_stopping_replica_hands_everything_back_at_once(
    control_plane: ControlPlane, namespace: str
) -> None:
    a, b = _replica(control_plane, namespace, "a"), _replica(control_plane, namespace, "b")
    _round(a, b, a, b)
    asyncio.run(a.hand_back())
    assert not any(a.co.holds_shard(s) for s in range(SHARDS))
    assert not a.co.leads()
    presence = {i["metadata"]["name"] for i in kube.list_leases(b.rt.clients, namespace)}
    assert lease_name("replica", "a") not in presence
    _round(b)  # no lease duration to wait: a said it is gone
    assert len(b.co.held) == SHARDS
    assert b.co.leads()


def test_a_replica_the_api_server_refuses_steps_down_with_the_reason(
    control_plane: ControlPlane, namespace: str
) -> None:
    a = _replica(control_plane, namespace, "a")
    _round(a)
    assert a.co.ready()
    assert len(a.co.held) == SHARDS
    # the same replica with credentials that carry no Lease rights (as after a revocation)
    a.rt.clients = kube.make_clients(str(control_plane.kubeconfig_for(agent_identity("x"))))
    _advance(2, a)
    _round(a)
    assert a.co.refused is not None
    assert "403" in a.co.refused
    _advance(9, a)  # past the renew deadline since the last good renewal: no writes, unready
    assert not a.co.ready()
    assert not a.co.holds_shard(0)
    assert not a.co.leads()


def test_a_slow_renewal_does_not_make_a_live_replica_look_dead(
    control_plane: ControlPlane, namespace: str
) -> None:
    """b lists the Leases while a's renewals have stalled for 8 s, then its own renewal takes
    7.7 s, during which a renews (just after b's list). Aged by b's clock after its renewal,
    b's list would show a unchanged for 15.6 s, past the lease duration: b would take a's
    shards while a, renewed in time, still writes for them. The list is aged when it was
    taken: a is alive, b takes nothing of a's."""
    a, b = _replica(control_plane, namespace, "a"), _replica(control_plane, namespace, "b")
    _round(a, b, a, b)
    assert len(a.co.held) == len(b.co.held) == SHARDS // 2
    for _ in range(3):  # a's renewals stall; b looks every 2 s
        _advance(2, b)
        _round(b)
    _advance(1.9, b)
    renew = b._renew_presence

    async def slow_renewal(lease: Any) -> bool:
        _advance(7.8, a)
        await a.round()  # a renews now, after b's list
        _advance(7.7, b)
        return await renew(lease)

    b._renew_presence = slow_renewal  # type: ignore[method-assign]
    _round(b)
    _assert_one_writer(a, b)
    assert len(a.co.held) == SHARDS // 2
