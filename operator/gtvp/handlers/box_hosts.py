"""Placement hosts from the cluster view: each member's verdict, room and image cache.

Shared by the box loop (where to place a box) and the balancer (where boxes may go). Each
member's and box's parsed values are cached by resourceVersion, so a pool of 10,000 members
is parsed once per change, not once per decision.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from gtvp.cluster_view import Key
from gtvp.core.components import image_digests
from gtvp.core.placement import Host
from gtvp.core.quantity import cpu_millis, memory_bytes
from gtvp.core.trust import member_view
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
        got = cpu_millis(res.get("cpu", "0")), memory_bytes(res.get("memory", "0"))
    except ValueError:
        got = (0, 0)
    rt.boxes.request_cache[key] = (rv, got)
    return got


def _host_base(rt: Runtime, name: str, body: Mapping[str, Any], node: Mapping[str, Any]) -> Any:
    """Member view, allocatable and image digests of one member (cached per change)."""
    rvs = (
        str((body.get("metadata") or {}).get("resourceVersion", "")),
        str((node.get("metadata") or {}).get("resourceVersion", "")),
    )
    hit = rt.boxes.host_cache.get(name)
    if hit is not None and hit[0] == rvs:
        return hit[1]
    view = member_view(name, body.get("status") or {})
    alloc = (node.get("status") or {}).get("allocatable") or {}
    try:
        cpu, mem = cpu_millis(alloc.get("cpu", "0")), memory_bytes(alloc.get("memory", "0"))
    except ValueError:
        cpu, mem = 0, 0
    base = (view, cpu, mem, image_digests((node.get("status") or {}).get("images")))
    rt.boxes.host_cache[name] = (rvs, base)
    return base


def _used(rt: Runtime, exclude: Key | None) -> dict[str, list[int]]:
    """Room taken per node: VMIs that are not boxes, and the boxes placed there."""
    used = {node: [cpu, mem] for node, (cpu, mem) in rt.view.foreign_usage().items()}
    for key, box in list(rt.view.boxes.items()):
        if key == exclude:
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
    out = []
    for name, body in list(rt.view.members.items()):
        node = rt.view.nodes.get(name)
        if node is None:
            continue
        view, cpu, mem, images = _host_base(rt, name, body, node)
        u = used.get(name, [0, 0])
        out.append(
            Host(
                name=name,
                usable=view.usable(now, 1),
                phase=view.phase,
                level=view.level,
                cpu_millis=cpu,
                memory_bytes=mem,
                cpu_used=u[0],
                memory_used=u[1],
                images=images,
            )
        )
    return out


def pool_cache(rt: Runtime, now: dt.datetime) -> frozenset[str]:
    """Digests cached on any usable member (resolution prefers them where it is free to);
    recomputed at most every POOL_CACHE_SECONDS."""
    at, union = rt.boxes.pool_cache
    if at is not None and (now - at).total_seconds() < POOL_CACHE_SECONDS:
        return union
    sets = []
    for name, body in list(rt.view.members.items()):
        node = rt.view.nodes.get(name)
        if node is not None:
            view, _cpu, _mem, images = _host_base(rt, name, body, node)
            if view.usable(now, 1):
                sets.append(images)
    union = frozenset().union(*sets)
    rt.boxes.pool_cache = (now, union)
    return union
