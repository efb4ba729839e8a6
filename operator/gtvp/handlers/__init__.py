"""gtvp-operator's kopf handlers: `register` puts every one of them in a kopf registry.

The one place that knows kopf's decorators. Each event handler here is a few lines that
record the object in the cluster view and hand it to the module owning the logic:

- `attestation`: a Member's next status; `node_trust`: the Node follows its Member;
- `evacuation`: moving gated VMs off members that may no longer hold them, aborting
  migrations to members that lost trust; `verdict_uses`: decisions spending a verdict;
- `policies`: the SecurityPolicy in force; `policy_admission`, `admission`: the webhooks;
- `components`, `lazyboxes` (with `box_hosts`, `box_writes`): OSComponents and Lazy Boxes;
- `balancing`, `drains`: the balancer and KubeVirt's external eviction controller.

Every handler finds the operator's `gtvp.runtime.Runtime` in kopf's memo (`memo.runtime`).
Start-up (`startup`) lists the pool before kopf serves anything and starts the loops.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any, cast

import kopf

from gtvp.cluster_view import key_of
from gtvp.core.api_resources import (
    LAZY_BOXES,
    MEMBERS,
    MIGRATIONS,
    OS_COMPONENTS,
    SECURITY_POLICIES,
    VIRTUAL_MACHINE_INSTANCES,
    VIRTUAL_MACHINES,
)
from gtvp.core.launchers import launcher_pod
from gtvp.core.trust import boot_changed, rule_labels
from gtvp.handlers import (
    admission,
    attestation,
    box_writes,
    components,
    drains,
    evacuation,
    lazyboxes,
    node_trust,
    policies,
    policy_admission,
    startup,
    verdict_uses,
)
from gtvp.runtime import runtime_of
from gtvp.webhook_config import MUTATING, POLICY, VALIDATING, Hook


async def policy_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    rt = runtime_of(memo)
    if await policies.observe(rt, dict(body), type or ""):  # what the pool runs under changed
        await asyncio.to_thread(components.verify_all, rt)
        rt.touch_boxes()


async def node_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    rt = runtime_of(memo)
    name = body.metadata.name or ""
    labels_before = rt.view.node_labels.get(name)
    if not rt.view.observe_node(dict(body), type or ""):
        await node_trust.forget_node(rt, name)
        return
    member = rt.view.members.get(name)
    if member is None or boot_changed(member.get("status") or {}, body):
        # no Member, no verdict: untrusted, its Member made (if the operator makes them),
        # its gated VMs moved by the leader; a Node that reports another boot than its
        # member last saw (a reboot, or the Node made anew) has its verdict spent now
        await attestation.reconcile(rt, name)
    else:
        if labels_before is not None and rule_labels(labels_before) != rule_labels(
            rt.view.node_labels.get(name)
        ):
            # transition rules read Node labels: a new level or class is judged now (gtvp's
            # own label writes, which follow each verdict, are not such a change)
            rt.schedule.schedule(name, dt.timedelta(0))
        await node_trust.sync_node(rt, name)
    lazyboxes.touch_waiting(rt)
    drains.touch(rt)  # a cordon, or a cordoned target freed


async def vmi_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    rt, vmi, event_type = runtime_of(memo), dict(body), type or ""
    for node in rt.view.observe_vmi(vmi, event_type) - {rt.view.node_of.get(key_of(vmi))}:
        rt.schedule.schedule(node, dt.timedelta(0))  # a launcher pod seen before its VMI
    lazyboxes.observe_kubevirt(rt, vmi)
    drains.observe_vmi(rt, vmi, event_type)  # status.evacuationNodeName: a drain
    await verdict_uses.judge_vmi_start(rt, vmi, event_type)


async def migration_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    rt, migration, event_type = runtime_of(memo), dict(body), type or ""
    for node in rt.view.observe_migration(migration, event_type):
        rt.schedule.schedule(node, dt.timedelta(0))  # a pod that ended while it migrates
    lazyboxes.observe_kubevirt(rt, migration)
    drains.observe_migration(rt, migration, event_type)
    if event_type != "DELETED":
        await evacuation.judge_migration(rt, migration)
        source = ((body.get("status") or {}).get("migrationState") or {}).get("sourceNode")
        if source and source in rt.view.members:
            rt.schedule.schedule(str(source), dt.timedelta(0))  # continue an evacuation


async def launcher_pod_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A virt-launcher pod: its node holds its VMI too; a node it adds is looked at now (a
    gated VMI on a member that does not hold its level is moved or stopped). A migration's
    target pod bound to a node gets its migration judged now, by that node (not at the
    migration's next event)."""
    rt = runtime_of(memo)
    for node in rt.view.observe_pod(dict(body), type or ""):
        rt.schedule.schedule(node, dt.timedelta(0))
    pod = launcher_pod(dict(body)) if type != "DELETED" else None
    if pod is not None and pod.migration_uid:
        for migration in list(rt.view.migrations.values()):
            if (migration.get("metadata") or {}).get("uid") == pod.migration_uid:
                await evacuation.judge_migration(rt, migration)


async def member_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    rt = runtime_of(memo)
    present = attestation.observe(rt, dict(body), type or "")
    await attestation.reconcile(rt, body.metadata.name or "")  # gone: its Node is untrusted
    if present:
        lazyboxes.touch_waiting(rt)
        drains.touch(rt)


async def vm_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    rt = runtime_of(memo)
    rt.view.observe_vm(dict(body), type or "")
    lazyboxes.observe_kubevirt(rt, dict(body))


async def component_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    rt = runtime_of(memo)
    name = components.observe(rt, dict(body), type or "")
    if name is not None:
        await asyncio.to_thread(components.verify_component, rt, name)
        rt.touch_boxes()


async def box_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    rt = runtime_of(memo)
    if lazyboxes.observe_box(rt, dict(body), type or ""):
        key = (body.metadata.namespace or "", body.metadata.name or "")
        await asyncio.to_thread(box_writes.delete_vm, rt, key, body.metadata.uid or "")


EVENTS = (
    (SECURITY_POLICIES.coordinates, policy_event),
    (("", "v1", "nodes"), node_event),
    (VIRTUAL_MACHINE_INSTANCES.coordinates, vmi_event),
    (MIGRATIONS.coordinates, migration_event),
    (MEMBERS.coordinates, member_event),
    (VIRTUAL_MACHINES.coordinates, vm_event),
    (OS_COMPONENTS.coordinates, component_event),
    (LAZY_BOXES.coordinates, box_event),
)
"""The watches, in the order they were registered before (kopf starts them in this order)."""


def _operations(hook: Hook) -> list[kopf.Operation]:
    return [cast("kopf.Operation", op) for op in hook.operations]


def register(registry: kopf.OperatorRegistry, *, admission_webhooks: bool) -> None:
    """Every handler of gtvp-operator into `registry`: start-up and clean-up, the watches,
    and, when the operator serves them, the admission webhooks (kopf refuses admission
    handlers without a webhook server)."""
    # kopf's default registry logs in through the kubernetes client (KUBECONFIG, else the
    # service account); an explicit registry says so itself
    kopf.on.login(registry=registry)(kopf.login_via_client)
    kopf.on.startup(registry=registry)(startup.configure)
    for (group, version, plural), on_event in EVENTS:
        kopf.on.event(group, version, plural, registry=registry)(on_event)
    # KubeVirt's virt-launcher pods: the API server selects them (`startup.configure`); no
    # label filter here, which would drop the DELETED a pod that loses the label is sent
    kopf.on.event("", "v1", "pods", registry=registry)(launcher_pod_event)
    kopf.on.startup(registry=registry)(startup.load_pool)
    kopf.on.startup(registry=registry)(startup.start_loops)
    kopf.on.cleanup(registry=registry)(startup.stop_loops)
    if not admission_webhooks:
        return
    hooks = {**admission.HANDLERS, POLICY.id: policy_admission.validate_policy}
    kinds = [(kopf.on.mutate, hook) for hook in MUTATING]
    kinds += [(kopf.on.validate, hook) for hook in (*VALIDATING, POLICY)]
    for decorate, hook in kinds:
        decorate(
            hook.group,
            hook.version,
            hook.resource,
            id=hook.id,
            operations=_operations(hook),
            registry=registry,
        )(hooks[hook.id])
