"""Placement hosts from the cluster view: each member's verdict, room and image cache.

Shared by the box loop (where to place a box), the balancer (where boxes may go), and
evacuations and drains (`target_room`: where a VMI's requests fit). Each
member's and box's parsed values are cached by resourceVersion, so a pool of 10,000 members
is parsed once per change, not once per decision.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from gtvp.cluster_view import Key
from gtvp.core.components import image_digests
from gtvp.core.evacuation import Migration, cordoned
from gtvp.core.footprint import box_asks
from gtvp.core.placement import Host
from gtvp.core.quantity import cpu_millis, memory_bytes
from gtvp.core.target_room import TargetRoom
from gtvp.core.trust import MemberView, member_view
from gtvp.runtime import Runtime

POOL_CACHE_SECONDS = 2.0


def box_requests(rt: Runtime, key: Key, box: Mapping[str, Any]) -> tuple[int, int]:
    """(CPU millicores, memory bytes) a box asks for (0, 0 when unreadable)."""
    rv = str((box.get("metadata") or {}).get("resourceVersion", ""))
    hit = rt.boxes.request_cache.get(key)
    if hit is not None and hit[0] == rv:
        return hit[1]
    res = (box.get("spec") or {}).get("resources") or {}
    try:
        got = box_asks(cpu_millis(res.get("cpu", "0")), memory_bytes(res.get("memory", "0")))
    except ValueError:
        got = (0, 0)
    rt.boxes.request_cache[key] = (rv, got)
    return got


class HostBase(NamedTuple):
    """What placement reads of one member, parsed from its Member and Node objects."""

    view: MemberView
    cpu: int
    mem: int
    images: frozenset[str]
    body: Mapping[str, Any]  # the objects parsed: the same objects need no parsing again
    node: Mapping[str, Any]


def _host_base(
    rt: Runtime, name: str, body: Mapping[str, Any], node: Mapping[str, Any]
) -> HostBase:
    """Member view, allocatable and image digests of one member (cached per change)."""
    hit = rt.boxes.host_cache.get(name)
    last: HostBase | None = None if hit is None else hit[1]
    if last is not None and last.body is body and last.node is node:
        return last  # the very objects parsed last time (the view replaces, never edits)
    rvs = (
        str((body.get("metadata") or {}).get("resourceVersion", "")),
        str((node.get("metadata") or {}).get("resourceVersion", "")),
        str(body.get("status") is not (rt.view.members.get(name) or {}).get("status")),
    )
    if hit is not None and last is not None and hit[0] == rvs:
        base = last._replace(body=body, node=node)
        rt.boxes.host_cache[name] = (rvs, base)
        return base
    view = member_view(name, body.get("status") or {}, rt.view.node_boot_id(name))
    alloc = (node.get("status") or {}).get("allocatable") or {}
    try:
        cpu, mem = cpu_millis(alloc.get("cpu", "0")), memory_bytes(alloc.get("memory", "0"))
    except ValueError:
        cpu, mem = 0, 0
    images = image_digests((node.get("status") or {}).get("images"))
    base = HostBase(view, cpu, mem, images, body, node)
    rt.boxes.host_cache[name] = (rvs, base)
    return base


def _used(rt: Runtime, exclude: Key | None) -> dict[str, list[int]]:
    """Room taken per node: every placed VMI by its own requests (a box's VMI where it runs
    now, after any migration), and the boxes placed there whose VMI is not placed yet; the
    box `exclude` (being placed again) not at all."""
    used = {node: [cpu, mem] for node, (cpu, mem) in rt.view.vmi_usage().items()}
    placed = rt.view.placed
    own = placed.get(exclude) if exclude is not None else None
    if own is not None:
        used[own.node] = [used[own.node][0] - own.cpu_millis, used[own.node][1] - own.memory_bytes]
    for key, box in list(rt.view.boxes.items()):
        if key == exclude or key in placed:
            continue
        node = rt.boxes.decided_node.get(key) or (box.get("status") or {}).get("node")
        if node:
            cpu, mem = box_requests(rt, key, box)
            u = used.setdefault(str(node), [0, 0])
            u[0] += cpu
            u[1] += mem
    return used


def hosts(rt: Runtime, now: dt.datetime, exclude: Key | None = None) -> list[Host]:
    """Placement hosts from Members, their Nodes and the boxes already placed."""
    used = _used(rt, exclude)
    unspent = rt.boxes.unspent  # placements whose verdict use is not written yet
    memo = rt.boxes.host_memo
    nodes = rt.view.nodes
    none = [0, 0]
    out = []
    for name, stored in list(rt.view.members.items()):
        node = nodes.get(name)
        if node is None:
            continue
        held = rt.view.held_body(name, stored, by_labels=True, now=now)
        base = _host_base(rt, name, held or stored, node)
        u = used.get(name, none)
        usable = base.view.usable(now, 1) and base.view.uses_left > unspent.get(name, 0)
        last = memo.get(name)
        if (
            last is not None
            and last[0] is base
            and last[1] == usable
            and last[2] == u[0]
            and last[3] == u[1]
        ):
            out.append(last[4])
            continue
        host = Host(
            name=name,
            usable=usable,
            phase=base.view.phase,
            level=base.view.level,
            cpu_millis=base.cpu,
            memory_bytes=base.mem,
            cpu_used=u[0],
            memory_used=u[1],
            images=base.images,
            cordoned=cordoned(node),
        )
        memo[name] = (base, usable, u[0], u[1], host)
        out.append(host)
    return out


def pool_cache(rt: Runtime, now: dt.datetime) -> frozenset[str]:
    """Digests cached on any usable member (resolution prefers them where it is free to);
    recomputed at most every POOL_CACHE_SECONDS."""
    at, union = rt.boxes.pool_cache
    if at is not None and (now - at).total_seconds() < POOL_CACHE_SECONDS:
        return union
    sets = []
    for name, stored in list(rt.view.members.items()):
        node = rt.view.nodes.get(name)
        if node is not None:
            base = _host_base(
                rt, name, rt.view.held_body(name, stored, by_labels=True) or stored, node
            )
            if base.view.usable(now, 1):
                sets.append(base.images)
    union = frozenset().union(*sets)
    rt.boxes.pool_cache = (now, union)
    return union


def target_room(rt: Runtime, migrations: Sequence[Migration]) -> TargetRoom:
    """What each member has not committed (`core.target_room`): its Node's allocatable less
    every VMI placed there and the VMIs on their way to it (`migrations`: the caller's view
    of every migration)."""
    allocatable = {}
    for name, body in list(rt.view.members.items()):
        node = rt.view.nodes.get(name)
        if node is not None:
            base = _host_base(rt, name, body, node)
            allocatable[name] = (base.cpu, base.mem)
    return TargetRoom.of(allocatable, rt.view.vmi_usage(), migrations, rt.view.placed)
