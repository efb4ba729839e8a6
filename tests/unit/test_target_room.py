"""Evacuations and drains go only where the VMI's requests fit (`core.target_room`).

The attack: fill the member that caches a sensitive box's components (a co-tenant's VMs, or
just a busy pool). Pinned there, the box's evacuation off an untrusted host can never be
scheduled; KubeVirt fails it, the retry picks the same member, and after three failures
the box stays on the host gtvp is emptying.
"""

from __future__ import annotations

from collections.abc import Mapping

from gtvp.core.evacuation import (
    DrainTarget,
    Evacuee,
    Migration,
    Vmi,
    plan_drains,
    plan_evacuation,
)
from gtvp.core.placement import Host
from gtvp.core.policy import MigrationLimits
from gtvp.core.target_room import TargetRoom

GI = 2**30
LIMITS = MigrationLimits(max_parallel=5, max_outbound_per_node=4, max_inbound_per_node=4)
PARTS = (("sha256:kernel", 18 * 10**6), ("sha256:app", 4 * 10**6))
HOST = "kubernetes.io/hostname"


def host(name: str, cpu_used: int, mem_used: int = 0, cpu: int = 8000, mem: int = 32 * GI) -> Host:
    return Host(name, True, "Trusted", 3, cpu, mem, cpu_used, mem_used, frozenset())


def room(
    *hosts: Host,
    migrations: tuple[Migration, ...] = (),
    requests: dict[tuple[str, str], tuple[int, int]] | None = None,
    node_of: dict[tuple[str, str], str] | None = None,
) -> TargetRoom:
    return TargetRoom.of(hosts, migrations, requests or {}, node_of or {})


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
    arriving = Migration("ns", "m0", "other", "elsewhere", None, "Scheduling", pinned="cold")
    r = room(
        WARM_BUT_FULL,
        host("cold", cpu_used=4000),  # 4 CPUs left, 3 of them for the VMI on its way
        migrations=(arriving,),
        requests={("ns", "other"): (3000, GI)},
        node_of={("ns", "other"): "elsewhere"},
    )
    assert evacuate([box()], r) == []
    done = Migration("ns", "m0", "other", "elsewhere", "cold", "Succeeded")
    r = room(WARM_BUT_FULL, host("cold", cpu_used=4000), migrations=(done,),
             requests={("ns", "other"): (3000, GI)}, node_of={("ns", "other"): "cold"})  # fmt: skip
    assert evacuate([box()], r) == ["box>cold"]  # arrived: counted in cpu_used already


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
        "no member that may take it has room for its requests (2000m CPU and 2.0 GiB); "
        "cold has 1000m CPU and 32.0 GiB left"
    )
