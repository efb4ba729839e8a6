"""KubeVirt side of trust: evacuate untrusted members, abort migrations to lost targets.

Keeps an in-memory view of VMIs and migrations (kopf watches), and:
- `evacuate(member)` creates the migrations `plan_evacuation` asks for (deterministic names:
  AlreadyExists means a previous run started it), or stops the VMs when the member's policy
  says Stop;
- a migration seen `Scheduled` or later whose target member is not usable for the VMI's
  level is aborted by deleting it; a usable target spends one use of its verdict.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from gtvp import kube
from gtvp.core.evacuation import Vmi, migration_view, plan_evacuation
from gtvp.core.footprint import Footprint, usage_by_node, vmi_footprint
from gtvp.core.gating import GatingError, admitted_level
from gtvp.core.trust import member_view
from gtvp.metrics import METRICS

log = logging.getLogger("gtvp.kubevirt")
KV = ("kubevirt.io", "v1")


@dataclass
class KubeVirtState:
    vms: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    vmis: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    migrations: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    judged: set[str] = field(default_factory=set)  # migration uids whose target was checked
    waiting: dict[str, list[str]] = field(default_factory=dict)  # member -> VMIs with no target
    # room taken by VMIs that are not Lazy Boxes, and its sum per node (None: to recompute)
    footprints: dict[tuple[str, str], Footprint] = field(default_factory=dict)
    usage: dict[str, tuple[int, int]] | None = None
    on_node: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # node -> VMIs
    node_of: dict[tuple[str, str], str] = field(default_factory=dict)

    def place(self, key: tuple[str, str], node: str | None) -> None:
        """Index which VMIs run on which node (evacuation looks at one node's VMIs)."""
        old = self.node_of.get(key)
        if old == node:
            return
        if old is not None:
            self.on_node.get(old, set()).discard(key)
            del self.node_of[key]
        if node:
            self.node_of[key] = node
            self.on_node.setdefault(node, set()).add(key)

    def foreign_usage(self) -> dict[str, tuple[int, int]]:
        """(CPU millicores, memory bytes) per node taken by VMIs that are not boxes."""
        if self.usage is None:
            self.usage = usage_by_node(self.footprints)
        return self.usage


STATE = KubeVirtState()


def observe(kind: str, body: dict[str, Any], event_type: str) -> None:
    meta = body.get("metadata") or {}
    key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
    store = {"vm": STATE.vms, "vmi": STATE.vmis}.get(kind, STATE.migrations)
    if event_type == "DELETED":
        store.pop(key, None)
    else:
        store[key] = body
    if kind == "vmi":
        node = None if event_type == "DELETED" else (body.get("status") or {}).get("nodeName")
        STATE.place(key, str(node) if node else None)
        fp = None if event_type == "DELETED" else vmi_footprint(body)
        if STATE.footprints.get(key) != fp:
            if fp is None:
                del STATE.footprints[key]
            else:
                STATE.footprints[key] = fp
            STATE.usage = None


def gated_level(vmi: dict[str, Any]) -> int | None:
    """The level a VMI was admitted with (its label or its trust selector, the higher)."""
    try:
        return admitted_level(
            (vmi.get("metadata") or {}).get("labels") or {},
            (vmi.get("spec") or {}).get("nodeSelector") or {},
        )
    except GatingError:
        return 9  # an unreadable level is treated as the strictest


def lookup_vmi(namespace: str, name: str) -> dict[str, Any] | None:
    """A VMI from the watch cache, else from the API server (admission must not fail open)."""
    cached = STATE.vmis.get((namespace, name))
    if cached is not None:
        return cached
    from gtvp.handlers.members import STATE as MEMBERS

    if MEMBERS.clients is None:
        raise RuntimeError("no API client")
    try:
        obj: dict[str, Any] = MEMBERS.clients.custom.get_namespaced_custom_object(
            *KV, namespace, "virtualmachineinstances", name
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return obj


async def evacuate(member: str, incident: str, on_untrusted: str, keep_level: int = 0) -> int:
    """Act on the gated VMIs on `member` that need more than `keep_level` (0: the member is
    not trusted, every gated VMI must go); returns how many of them are still on it."""
    from gtvp.handlers.members import STATE as MEMBERS

    c = MEMBERS.clients
    policy = MEMBERS.policy
    if c is None or policy is None:
        return 0
    on_member = [
        Vmi(ns, name, member, lvl)
        for (ns, name) in sorted(STATE.on_node.get(member, ()))
        if (lvl := gated_level(STATE.vmis.get((ns, name)) or {})) is not None and lvl > keep_level
    ]
    if not on_member or on_untrusted == "Keep":
        return len(on_member)
    if on_untrusted == "Stop":
        for vmi in on_member:
            await asyncio.to_thread(_stop_vm, c, vmi)
        return len(on_member)
    views = [migration_view(m) for m in STATE.migrations.values()]
    now = dt.datetime.now(dt.UTC)
    members = [member_view(n, (b.get("status") or {})) for n, b in MEMBERS.bodies.items()]
    movable = [
        v for v in on_member if any(m.name != member and m.usable(now, v.level) for m in members)
    ]
    stuck = sorted(f"{v.namespace}/{v.name}" for v in on_member if v not in movable)
    if stuck and STATE.waiting.get(member) != stuck:
        STATE.waiting[member] = stuck  # say it once, not every second
        log.warning(
            "evacuation of %s waits: no trusted member of a sufficient level can take %s yet",
            member,
            ", ".join(stuck),
        )
    targets = [
        (m.name, m.level)
        for m in members
        if m.name != member and m.name in MEMBERS.nodes and m.usable(now, 1)
    ]
    for obj in plan_evacuation(
        member=member,
        incident=incident,
        vmis=movable,
        migrations=views,
        limits=policy.migration,
        targets=targets,
    ):
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        try:
            await asyncio.to_thread(create_migration, c, ns, obj)
            observe("migration", obj, "ADDED")  # a drain planned next sees it at once
            METRICS.evacuation("started")
            log.info(
                "evacuating %s/%s from %s: migration %s", ns, obj["spec"]["vmiName"], member, name
            )
        except ApiException as exc:
            if exc.status == 409:  # started before (e.g. by this operator before a restart)
                continue
            log.warning("could not start migration %s/%s: %s %s", ns, name, exc.status, exc.reason)
    return len(on_member)


def create_migration(c: kube.Clients, namespace: str, obj: dict[str, Any]) -> None:
    c.custom.create_namespaced_custom_object(
        *KV, namespace, "virtualmachineinstancemigrations", obj
    )


def _delete_migration(c: kube.Clients, namespace: str, name: str) -> None:
    c.custom.delete_namespaced_custom_object(
        *KV, namespace, "virtualmachineinstancemigrations", name
    )


def _stop_vm(c: kube.Clients, vmi: Vmi) -> None:
    body = STATE.vmis.get((vmi.namespace, vmi.name)) or {}
    owners = (body.get("metadata") or {}).get("ownerReferences") or []
    owner = next((o for o in owners if o.get("kind") == "VirtualMachine"), None)
    try:
        if owner:
            vm = STATE.vms.get((vmi.namespace, owner["name"])) or {}
            # KubeVirt refuses `running` next to `runStrategy` (gtvp composes with the latter)
            halt = (
                {"runStrategy": "Halted"}
                if "runStrategy" in (vm.get("spec") or {})
                else {"running": False}
            )
            c.custom.patch_namespaced_custom_object(
                *KV, vmi.namespace, "virtualmachines", owner["name"], {"spec": halt}
            )
        else:
            c.custom.delete_namespaced_custom_object(
                *KV, vmi.namespace, "virtualmachineinstances", vmi.name
            )
        log.info(
            "stopped %s/%s on untrusted member %s (policy: Stop)", vmi.namespace, vmi.name, vmi.node
        )
    except ApiException as exc:
        log.warning("could not stop %s/%s: %s", vmi.namespace, vmi.name, exc.reason)


RUNNING_PHASES = ("Scheduled", "PreparingTarget", "TargetReady", "Running")


async def rejudge_migrations_to(member: str) -> None:
    """A member's verdict changed: re-judge the migrations heading there now (an in-flight
    migration to a member that lost trust is aborted at once, not at its next event)."""
    for body in list(STATE.migrations.values()):
        view = migration_view(body)
        if view.phase in RUNNING_PHASES and member in (view.target, view.pinned):
            await judge_migration(body)


async def judge_vmi_start(body: dict[str, Any], event_type: str) -> None:
    """A gated VMI that KubeVirt scheduled onto a member spends one use of its verdict
    (each start is a decision that relies on it); once per VMI."""
    meta = body.get("metadata") or {}
    node = (body.get("status") or {}).get("nodeName")
    uid = str(meta.get("uid", ""))
    if event_type == "DELETED" or not node or not uid or f"start/{uid}" in STATE.judged:
        return
    if gated_level(body) is None:
        return
    STATE.judged.add(f"start/{uid}")
    from gtvp.handlers.members import spend_use

    await spend_use(str(node))


def mark_started(bodies: list[dict[str, Any]]) -> None:
    """VMIs already running when the operator starts spent their use before (no recount)."""
    for body in bodies:
        uid = (body.get("metadata") or {}).get("uid")
        if uid and (body.get("status") or {}).get("phase") == "Running":
            STATE.judged.add(f"start/{uid}")


async def judge_migration(body: dict[str, Any]) -> None:
    """Abort a migration whose target lost trust; spend one use of a good target's verdict."""
    from gtvp.handlers.members import STATE as MEMBERS
    from gtvp.handlers.members import spend_use

    view = migration_view(body)
    uid = str((body.get("metadata") or {}).get("uid", ""))
    if view.phase in ("Succeeded", "Failed"):
        labels = (body.get("metadata") or {}).get("labels") or {}
        if (
            view.phase == "Succeeded"
            and labels.get("gtvp.io/evacuation")
            and (uid + "/done" not in STATE.judged)
        ):
            METRICS.evacuation("finished")
            STATE.judged.add(uid + "/done")
        return
    if view.target is None or view.phase not in RUNNING_PHASES:
        return
    vmi = STATE.vmis.get((view.namespace, view.vmi)) or {}
    level = gated_level(vmi)
    if level is None:
        return
    target = MEMBERS.bodies.get(view.target)
    now = dt.datetime.now(dt.UTC)
    usable = target is not None and member_view(view.target, target.get("status") or {}).usable(
        now, level
    )
    c = MEMBERS.clients
    if not usable and c is not None:
        log.warning(
            "aborting migration %s/%s: target %s may not receive a level-%d VM",
            view.namespace,
            view.name,
            view.target,
            level,
        )
        try:
            await asyncio.to_thread(_delete_migration, c, view.namespace, view.name)
            METRICS.evacuation("aborted")
        except ApiException as exc:
            if exc.status != 404:
                log.warning("could not abort %s: %s", view.name, exc.reason)
        return
    if uid not in STATE.judged:
        STATE.judged.add(uid)
        await spend_use(view.target)
