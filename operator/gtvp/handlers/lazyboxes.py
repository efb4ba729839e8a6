"""Lazy Boxes and OSComponents: the imperative shell around resolve, verify, compose, place.

Every OSComponent is verified by this operator itself (its status is what we wrote, never
what we trust: each component is checked again on start and whenever the policy's
publisher keys change). Boxes are reconciled by one background loop: events mark boxes
dirty (a box changed, a component or policy changed, a member or node changed, the box's
VM/VMI/migration changed) and the loop runs `plan_box` for each, writing only what
changed. Deleting a box deletes its VM (the owner reference lets a cluster's garbage
collector do the same); VMs whose box is gone are swept after confirming with the API
server that the box really is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from gtvp import kube
from gtvp.core.boxes import (
    BOOTED_ANNOTATION,
    HOTPLUGGED_ANNOTATION,
    BoxInput,
    Decision,
    Observed,
    plan_box,
)
from gtvp.core.component_checks import Check, check_component, spend_use, verification_status
from gtvp.core.components import Component, ComponentError, image_digests, parse_component
from gtvp.core.compose import BOOT_ANNOTATION, BOX_LABEL, BoxRef, preferred_node
from gtvp.core.placement import Host
from gtvp.core.quantity import cpu_millis, memory_bytes
from gtvp.core.resolve import BoxRequest, Unresolvable, resolve
from gtvp.core.trust import VM_LEVEL_LABEL, member_view
from gtvp.handlers import kubevirt
from gtvp.metrics import METRICS

log = logging.getLogger("gtvp.lazyboxes")
G, V = "gtvp.io", "v1alpha1"
KV = ("kubevirt.io", "v1")
Key = tuple[str, str]
WAITING_PHASES = (None, "Pending", "Verifying", "Failed", "Resolving")
POOL_CACHE_SECONDS = 2.0
WRITERS = 4  # boxes reconciled at once: planning is serialised, API writes overlap
ACTIVE_MIGRATION = (
    "",
    "Pending",
    "Scheduling",
    "Scheduled",
    "PreparingTarget",
    "TargetReady",
    "Running",
)


@dataclass
class BoxState:
    boxes: dict[Key, dict[str, Any]] = field(default_factory=dict)
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: dict[str, Check] = field(default_factory=dict)
    decided_node: dict[Key, str] = field(default_factory=dict)
    dirty: set[Key] = field(default_factory=set)
    wakeup: asyncio.Event | None = None
    # caches keyed by resourceVersion, so each object is parsed once per change
    parsed: dict[str, tuple[str, Component | None]] = field(default_factory=dict)
    catalogue_version: int = 0
    catalogue_cache: tuple[int, list[Component]] = (-1, [])
    host_cache: dict[str, tuple[tuple[str, str], Any]] = field(default_factory=dict)
    request_cache: dict[Key, tuple[str, tuple[int, int]]] = field(default_factory=dict)
    pool_cache: tuple[dt.datetime | None, frozenset[str]] = (None, frozenset())
    resolutions: dict[tuple[str, int, frozenset[str]], list[Component] | Unresolvable] = field(
        default_factory=dict
    )
    plan_lock: threading.Lock = field(default_factory=threading.Lock)

    def touch(self, *keys: Key) -> None:
        self.dirty.update(keys or self.boxes.keys())
        if self.wakeup is not None:
            self.wakeup.set()


STATE = BoxState()


def _clients() -> kube.Clients:
    from gtvp.handlers.members import STATE as MEMBERS

    if MEMBERS.clients is None:
        raise RuntimeError("no API client")
    return MEMBERS.clients


def _publisher_keys() -> Mapping[str, str] | None:
    from gtvp.handlers.members import STATE as MEMBERS

    return MEMBERS.policy.publisher_keys if MEMBERS.policy is not None else None


def _key(body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


# -- events -------------------------------------------------------------------------------


def observe_box(body: dict[str, Any], event_type: str) -> bool:
    """Record a box event (event loop); True when the box is gone and its VM must go."""
    key = _key(body)
    if event_type == "DELETED":
        STATE.boxes.pop(key, None)
        STATE.decided_node.pop(key, None)
        METRICS.boxes.pop(f"{key[0]}/{key[1]}", None)
        return True
    known = STATE.boxes.get(key)
    rv = (body.get("metadata") or {}).get("resourceVersion")
    STATE.boxes[key] = body
    if known is None or (known.get("metadata") or {}).get("resourceVersion") != rv:
        STATE.touch(key)  # not the echo of our own status write
    return False


def observe_component(body: dict[str, Any], event_type: str) -> str | None:
    """Record a component event (event loop); returns the name to verify, if any."""
    name = str((body.get("metadata") or {}).get("name", ""))
    STATE.catalogue_version += 1
    STATE.touch()
    if event_type == "DELETED":
        STATE.components.pop(name, None)
        STATE.checks.pop(name, None)
        return None
    STATE.components[name] = body
    return name


def verify_all() -> None:
    """Publisher keys may have changed: every component is checked again (blocking)."""
    for name in list(STATE.components):
        verify_component(name)


def touch_waiting() -> None:
    """A member or node changed: boxes that wait for a member are looked at again."""
    waiting = [
        k
        for k, b in list(STATE.boxes.items())
        if (b.get("status") or {}).get("phase") in (None, "Pending")
    ]
    if waiting:
        STATE.touch(*waiting)


def observe_kubevirt(body: Mapping[str, Any]) -> None:
    """A VM, VMI or migration changed: the box it belongs to is looked at again."""
    meta = body.get("metadata") or {}
    ns = str(meta.get("namespace", ""))
    name = (meta.get("labels") or {}).get(BOX_LABEL) or (body.get("spec") or {}).get("vmiName")
    if name and (ns, str(name)) in STATE.boxes:
        STATE.touch((ns, str(name)))


# -- components ---------------------------------------------------------------------------


def verify_component(name: str, *, force_write: bool = False) -> Check:
    """Check one component now; write its status when the outcome changed."""
    body = STATE.components.get(name)
    if body is None:
        return Check("Failed", "Deleted", "the component was deleted")
    keys = _publisher_keys()
    if keys is None:
        check = Check("Failed", "NoPolicy", "no usable SecurityPolicy names publisher keys")
    else:
        check = check_component(body, keys)
    STATE.checks[name] = check
    if check.reason == "NoPolicy":  # the policy is not loaded yet (or gone): no status flaps
        return check
    METRICS.components.labels("verified" if check.ok else "failed", check.reason).inc()
    current = (body.get("status") or {}).get("verification") or {}
    same = (
        current.get("state") == check.state
        and current.get("reason") == check.reason
        and current.get("message") == check.message
    )
    if same and not force_write:
        return check
    try:
        max_uses = parse_component(body).max_uses
    except ComponentError:
        max_uses = None
    status = verification_status(check, max_uses, dt.datetime.now(dt.UTC))
    _write_component_status(name, status)
    if not check.ok:
        log.warning("OSComponent %s failed verification: %s: %s", name, check.reason, check.message)
    return check


def _write_component_status(name: str, verification: dict[str, Any]) -> None:
    c = _clients()
    try:
        out = c.custom.patch_cluster_custom_object_status(
            G, V, "oscomponents", name, {"status": {"verification": verification}}
        )
        STATE.components[name] = out  # a status write changes no resolution input
    except ApiException as exc:
        log.warning("cannot write OSComponent %s status: %s", name, exc.reason)


def spend(names: tuple[str, ...]) -> list[str]:
    """Spend one use of each component; re-verify those with none left. Returns failures."""
    failed = []
    for name in names:
        body = STATE.components.get(name)
        if body is None:
            failed.append(name)
            continue
        try:
            max_uses = parse_component(body).max_uses
        except ComponentError:
            failed.append(name)
            continue
        ver = (body.get("status") or {}).get("verification") or {}
        use = spend_use(ver, max_uses)
        if use.recheck:
            check = verify_component(name, force_write=True)
            if not check.ok:
                failed.append(name)
                continue
            ver = (STATE.components[name].get("status") or {}).get("verification") or {}
            use = spend_use(ver, max_uses)
        if use.status is not None:
            _write_component_status(name, use.status)
    return failed


# -- boxes --------------------------------------------------------------------------------


def _catalogue() -> list[Component]:
    """Every readable component (parsed once per change; unreadable ones are never used)."""
    version, cached = STATE.catalogue_cache
    if version == STATE.catalogue_version:
        return cached
    out = []
    for name, body in list(STATE.components.items()):
        rv = str((body.get("metadata") or {}).get("resourceVersion", ""))
        hit = STATE.parsed.get(name)
        if hit is None or hit[0] != rv:
            try:
                comp: Component | None = parse_component(body)
            except ComponentError:
                comp = None  # its status says why
            hit = (rv, comp)
            STATE.parsed[name] = hit
        if hit[1] is not None:
            out.append(hit[1])
    out.sort(key=lambda c: c.object_name)
    STATE.catalogue_cache = (STATE.catalogue_version, out)
    return out


def box_requests(key: Key, box: Mapping[str, Any]) -> tuple[int, int]:
    rv = str((box.get("metadata") or {}).get("resourceVersion", ""))
    hit = STATE.request_cache.get(key)
    if hit is not None and hit[0] == rv:
        return hit[1]
    res = (box.get("spec") or {}).get("resources") or {}
    try:
        got = cpu_millis(res.get("cpu", "0")), memory_bytes(res.get("memory", "0"))
    except ValueError:
        got = (0, 0)
    STATE.request_cache[key] = (rv, got)
    return got


def _host_base(name: str, body: Mapping[str, Any], node: Mapping[str, Any]) -> Any:
    """Member view, allocatable and image digests of one member (cached per change)."""
    rvs = (
        str((body.get("metadata") or {}).get("resourceVersion", "")),
        str((node.get("metadata") or {}).get("resourceVersion", "")),
    )
    hit = STATE.host_cache.get(name)
    if hit is not None and hit[0] == rvs:
        return hit[1]
    view = member_view(name, body.get("status") or {})
    alloc = (node.get("status") or {}).get("allocatable") or {}
    try:
        cpu, mem = cpu_millis(alloc.get("cpu", "0")), memory_bytes(alloc.get("memory", "0"))
    except ValueError:
        cpu, mem = 0, 0
    base = (view, cpu, mem, image_digests((node.get("status") or {}).get("images")))
    STATE.host_cache[name] = (rvs, base)
    return base


def hosts(now: dt.datetime, exclude: Key | None = None) -> list[Host]:
    """Placement hosts from Members, their Nodes and the boxes already placed."""
    from gtvp.handlers.members import STATE as MEMBERS

    used = {node: [cpu, mem] for node, (cpu, mem) in kubevirt.STATE.foreign_usage().items()}
    for key, box in list(STATE.boxes.items()):
        if key == exclude:
            continue
        node = STATE.decided_node.get(key) or (box.get("status") or {}).get("node")
        if node:
            cpu, mem = box_requests(key, box)
            u = used.setdefault(str(node), [0, 0])
            u[0] += cpu
            u[1] += mem
    out = []
    for name, body in list(MEMBERS.bodies.items()):
        node = MEMBERS.nodes.get(name)
        if node is None:
            continue
        view, cpu, mem, images = _host_base(name, body, node)
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


def pool_cache(now: dt.datetime) -> frozenset[str]:
    """Digests cached on any usable member (resolution prefers them where it is free to);
    recomputed at most every POOL_CACHE_SECONDS."""
    from gtvp.handlers.members import STATE as MEMBERS

    at, union = STATE.pool_cache
    if at is not None and (now - at).total_seconds() < POOL_CACHE_SECONDS:
        return union
    sets = []
    for name, body in list(MEMBERS.bodies.items()):
        node = MEMBERS.nodes.get(name)
        if node is not None:
            view, _cpu, _mem, images = _host_base(name, body, node)
            if view.usable(now, 1):
                sets.append(images)
    union = frozenset().union(*sets)
    STATE.pool_cache = (now, union)
    return union


def resolve_cached(spec: Mapping[str, Any], cached: frozenset[str]) -> list[Component]:
    """`resolve`, remembered per (request, catalogue version, pool cache)."""
    request = BoxRequest.from_spec(spec)
    fields = ("application", "dependencies", "requestedComponents", "level")
    key = (
        json.dumps({f: spec.get(f) for f in fields}, sort_keys=True),
        STATE.catalogue_version,
        cached,
    )
    hit = STATE.resolutions.get(key)
    if hit is None:
        try:
            hit = resolve(request, _catalogue(), cached)
        except Unresolvable as exc:
            hit = exc
        if len(STATE.resolutions) > 4096:
            STATE.resolutions.clear()
        STATE.resolutions[key] = hit
    if isinstance(hit, Unresolvable):
        raise hit
    return list(hit)


def observed(key: Key) -> Observed:
    vm = kubevirt.STATE.vms.get(key)
    if vm is None:
        return Observed()
    ann = (vm.get("metadata") or {}).get("annotations") or {}
    spec = vm.get("spec") or {}
    tmpl = spec.get("template") or {}
    vmi = kubevirt.STATE.vmis.get(key)
    vmi_status = (vmi or {}).get("status") or {}
    migrating = any(
        ns == key[0]
        and (m.get("spec") or {}).get("vmiName") == key[1]
        and (m.get("status") or {}).get("phase", "") in ACTIVE_MIGRATION
        for (ns, _), m in list(kubevirt.STATE.migrations.items())
    )
    return Observed(
        vm_exists=True,
        booted=tuple(n for n in str(ann.get(BOOTED_ANNOTATION, "")).split(",") if n),
        hotplugged=tuple(n for n in str(ann.get(HOTPLUGGED_ANNOTATION, "")).split(",") if n),
        vm_node=preferred_node(tmpl.get("spec") or {}),
        vm_running=spec.get("runStrategy", "Always") != "Halted",
        vmi_phase=vmi_status.get("phase") if vmi else None,
        vmi_node=vmi_status.get("nodeName") if vmi else None,
        migrating=migrating,
        vm_boot=((tmpl.get("metadata") or {}).get("annotations") or {}).get(BOOT_ANNOTATION),
        vmi_boot=(((vmi or {}).get("metadata") or {}).get("annotations") or {}).get(BOOT_ANNOTATION)
        if vmi
        else None,
    )


def box_input(key: Key, now: dt.datetime) -> BoxInput:
    box = STATE.boxes[key]
    meta, spec = box.get("metadata") or {}, box.get("spec") or {}
    ref = BoxRef(key[1], key[0], str(meta.get("uid", "")))
    seen = observed(key)
    common: dict[str, Any] = {
        "ref": ref,
        "spec": spec,
        "generation": int(meta.get("generation", 0) or 0),
        "status": box.get("status") or {},
        # placement hosts matter only before the first placement (the costly part)
        "hosts": [] if seen.vm_exists else hosts(now, exclude=key),
        "observed": seen,
    }
    try:
        comps = resolve_cached(spec, pool_cache(now))
    except Unresolvable as exc:
        return BoxInput(components=None, failure=(exc.reason, exc.message), **common)
    checks = {
        c.object_name: STATE.checks[c.object_name] for c in comps if c.object_name in STATE.checks
    }
    return BoxInput(components=comps, checks=checks, **common)


def reconcile_box(key: Key) -> Decision | None:
    """Plan and carry out one box's next step (blocking: run it in a thread)."""
    if key not in STATE.boxes:
        return None
    with STATE.plan_lock:  # placements see each other's reservations
        now = dt.datetime.now(dt.UTC)
        decision = plan_box(box_input(key, now), now)
        if decision.uses:
            failed = spend(decision.uses)
            if failed:  # a component failed its re-check: plan again, it is now blocked
                decision = plan_box(box_input(key, now), now)
        if decision.placement is not None and decision.placement.node:
            STATE.decided_node[key] = decision.placement.node
    c = _clients()
    if decision.vm is not None and not _write_vm(c, key, decision.vm):
        return decision
    if decision.restart:
        try:
            c.custom.delete_namespaced_custom_object(*KV, key[0], "virtualmachineinstances", key[1])
        except ApiException as exc:
            if exc.status != 404:
                raise
    if decision.placement is not None:
        if decision.placement.node:
            METRICS.placements.labels("placed").inc()
            total = decision.placement.total_bytes or 1
            METRICS.placement_cached_ratio.observe(decision.placement.cached_bytes / total)
        else:
            METRICS.placements.labels("pending").inc()
    _write_status(c, key, decision.status)
    METRICS.boxes[f"{key[0]}/{key[1]}"] = str(decision.status.get("phase"))
    if decision.event is not None:
        box = STATE.boxes.get(key) or {}
        etype, reason, message = decision.event
        kube.post_event(
            c,
            kind="LazyBox",
            name=key[1],
            uid=str((box.get("metadata") or {}).get("uid", "")),
            namespace=key[0],
            type_=etype,
            reason=reason,
            message=message,
        )
    return decision


def _level_label(vm: Mapping[str, Any]) -> int:
    raw = str(((vm.get("metadata") or {}).get("labels") or {}).get(VM_LEVEL_LABEL, "0"))
    return int(raw) if raw.isdigit() else 9


def _write_vm(c: kube.Clients, key: Key, vm: dict[str, Any]) -> bool:
    current = kubevirt.STATE.vms.get(key)
    if current is not None and _level_label(vm) < _level_label(current):
        # the admitted level sticks (the webhooks refuse lowering it on an update): a box
        # whose level went down gets a new VM, which restarts it
        log.info("box %s/%s: level lowered, its VirtualMachine is created anew", *key)
        with contextlib.suppress(ApiException):
            c.custom.delete_namespaced_custom_object(*KV, key[0], "virtualmachines", key[1])
        kubevirt.STATE.vms.pop(key, None)
        current = None
    try:
        if current is None:
            try:
                out = c.custom.create_namespaced_custom_object(*KV, key[0], "virtualmachines", vm)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                current = c.custom.get_namespaced_custom_object(
                    *KV, key[0], "virtualmachines", key[1]
                )
        if current is not None:
            vm["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            try:
                out = c.custom.replace_namespaced_custom_object(
                    *KV, key[0], "virtualmachines", key[1], vm
                )
            except ApiException as exc:
                if exc.status != 409:
                    raise
                fresh = c.custom.get_namespaced_custom_object(
                    *KV, key[0], "virtualmachines", key[1]
                )
                vm["metadata"]["resourceVersion"] = fresh["metadata"]["resourceVersion"]
                out = c.custom.replace_namespaced_custom_object(
                    *KV, key[0], "virtualmachines", key[1], vm
                )
    except ApiException as exc:
        message = f"the API server refused the composed VirtualMachine: {exc.status} {exc.body}"
        log.error("box %s/%s: %s", *key, message)
        _write_status(c, key, {"phase": "Failed", "message": message[:4000]})
        return False
    kubevirt.STATE.vms[key] = out
    return True


def _write_status(c: kube.Clients, key: Key, status: dict[str, Any]) -> None:
    box = STATE.boxes.get(key)
    if box is None:
        return
    patch = kube.merge_patch_for(box.get("status") or {}, status)
    if not patch:
        return
    try:
        out = c.custom.patch_namespaced_custom_object_status(
            G, V, key[0], "lazyboxes", key[1], {"status": patch}
        )
    except ApiException as exc:
        if exc.status == 404:
            STATE.boxes.pop(key, None)
            return
        raise
    STATE.boxes[key] = out


def delete_vm(key: Key) -> None:
    """The box is gone: delete its VM (and nothing else)."""
    vm = kubevirt.STATE.vms.pop(key, None)
    if vm is None:
        return
    owners = (vm.get("metadata") or {}).get("ownerReferences") or []
    if not any(o.get("kind") == "LazyBox" for o in owners):
        return
    try:
        _clients().custom.delete_namespaced_custom_object(*KV, key[0], "virtualmachines", key[1])
        log.info("LazyBox %s/%s deleted: deleted its VirtualMachine", *key)
    except ApiException as exc:
        if exc.status != 404:
            log.warning("cannot delete VM %s/%s: %s", *key, exc.reason)


def sweep_orphans() -> None:
    """Delete VMs of boxes that no longer exist (confirmed with the API server)."""
    c = _clients()
    for key, vm in list(kubevirt.STATE.vms.items()):
        owners = [
            o
            for o in (vm.get("metadata") or {}).get("ownerReferences") or []
            if o.get("kind") == "LazyBox"
        ]
        if not owners or key in STATE.boxes:
            continue
        try:
            box = c.custom.get_namespaced_custom_object(
                G, V, key[0], "lazyboxes", owners[0]["name"]
            )
            if box["metadata"]["uid"] == owners[0].get("uid"):
                continue
        except ApiException as exc:
            if exc.status != 404:
                continue
        delete_vm(key)


async def box_loop(stop: asyncio.Event, period: float = 5.0) -> None:
    """Reconcile dirty boxes; every `period` seconds look at all of them again."""
    STATE.wakeup = asyncio.Event()
    limit = asyncio.Semaphore(WRITERS)
    loop = asyncio.get_running_loop()
    next_full = loop.time() + period
    while not stop.is_set():
        timeout = max(next_full - loop.time(), 0.05)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(STATE.wakeup.wait(), timeout=timeout)
        STATE.wakeup.clear()
        if loop.time() >= next_full:  # time-driven changes matter to boxes still waiting
            STATE.dirty.update(
                k
                for k, b in list(STATE.boxes.items())
                if (b.get("status") or {}).get("phase") in WAITING_PHASES
            )
            next_full = loop.time() + period
            await asyncio.to_thread(_sweep_safely)
        batch = sorted(STATE.dirty)
        STATE.dirty.clear()
        await asyncio.gather(*(_reconcile_safely(key, limit) for key in batch))


async def _reconcile_safely(key: Key, limit: asyncio.Semaphore) -> None:
    async with limit:
        try:
            decision = await asyncio.to_thread(reconcile_box, key)
            if decision is not None and decision.placement is not None:
                node = decision.placement.node
                if node:  # a placement is a decision that relies on the member's verdict
                    from gtvp.handlers.members import spend_use as spend_verdict_use

                    await spend_verdict_use(node)
        except Exception:  # one box must not stop the others
            log.exception("reconciling LazyBox %s/%s failed; retrying", *key)
            STATE.dirty.add(key)


def _sweep_safely() -> None:
    try:
        sweep_orphans()
    except Exception:
        log.exception("sweeping orphan VMs failed")
