"""Every kopf handler of gtvp-operator, registered in this one place.

Each handler is a few lines that hand the object to the module owning its logic
(`members`, ...), which in turn calls the pure core. Importing this module registers the
handlers; `gtvp.operator_main` does that and runs kopf.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

import kopf

from gtvp import kube
from gtvp.handlers import balancing, drains, kubevirt, lazyboxes, members, policies

log = logging.getLogger("gtvp.handlers")
# gtvp.handlers.webhooks registers the admission handlers; gtvp.operator_main imports it
# only when it serves webhooks (kopf refuses admission handlers without a server).
GROUP, VERSION = "gtvp.io", "v1alpha1"


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # gtvp writes its own Events on transitions; kopf's per-handler log events would cost
    # one API write per handler run.
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.error_backoffs = [1, 2, 5, 10]
    # webhook configurations are rendered statically (gtvp.webhook_config, the Helm chart);
    # kopf only serves the handlers, it never rewrites or removes the configurations
    settings.admission.managed = None
    if members.STATE.webhook_server is not None:
        settings.admission.server = members.STATE.webhook_server


@kopf.on.event(GROUP, VERSION, "securitypolicies")
async def policy_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    if await policies.observe(dict(body), type or ""):  # what the pool runs under changed
        await asyncio.to_thread(lazyboxes.verify_all)
        lazyboxes.STATE.touch()


@kopf.on.event("", "v1", "nodes")
async def node_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    name = body.metadata.name or ""
    if type == "DELETED":
        members.STATE.node_labels.pop(name, None)
        members.STATE.nodes.pop(name, None)
        await members.forget_node(name)
        return
    members.STATE.node_labels[name] = dict(body.metadata.labels or {})
    members.STATE.nodes[name] = dict(body)
    if name not in members.STATE.bodies and members.STATE.create_members:
        await members.ensure_member(name)
    await members.sync_node(name)
    lazyboxes.touch_waiting()
    drains.touch()  # a cordon, or a cordoned target freed


@kopf.on.event("kubevirt.io", "v1", "virtualmachineinstances")
async def vmi_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    kubevirt.observe("vmi", dict(body), type or "")
    lazyboxes.observe_kubevirt(dict(body))
    drains.observe_vmi(dict(body), type or "")  # status.evacuationNodeName: a drain
    await kubevirt.judge_vmi_start(dict(body), type or "")


@kopf.on.event("kubevirt.io", "v1", "virtualmachineinstancemigrations")
async def migration_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    kubevirt.observe("migration", dict(body), type or "")
    lazyboxes.observe_kubevirt(dict(body))
    drains.observe_migration(dict(body), type or "")
    if type != "DELETED":
        await kubevirt.judge_migration(dict(body))
        source = ((body.get("status") or {}).get("migrationState") or {}).get("sourceNode")
        if source and source in members.STATE.bodies:
            members.STATE.schedule(str(source), dt.timedelta(0))  # continue an evacuation


@kopf.on.event(GROUP, VERSION, "members")
async def member_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    if members.observe(dict(body), type or ""):
        await members.reconcile(body.metadata.name or "")
        lazyboxes.touch_waiting()
        drains.touch()


@kopf.on.event("kubevirt.io", "v1", "virtualmachines")
async def vm_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    kubevirt.observe("vm", dict(body), type or "")
    lazyboxes.observe_kubevirt(dict(body))


@kopf.on.event(GROUP, VERSION, "oscomponents")
async def component_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    name = lazyboxes.observe_component(dict(body), type or "")
    if name is not None:
        await asyncio.to_thread(lazyboxes.verify_component, name)
        lazyboxes.STATE.touch()


@kopf.on.event(GROUP, VERSION, "lazyboxes")
async def box_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    if lazyboxes.observe_box(dict(body), type or ""):
        key = (body.metadata.namespace or "", body.metadata.name or "")
        await asyncio.to_thread(lazyboxes.delete_vm, key)


_loop_task: asyncio.Task[None] | None = None
_box_tasks: list[asyncio.Task[None]] = []
_stop = asyncio.Event()


@kopf.on.startup()
async def load_caches(**_: Any) -> None:
    """List members, VMs, VMIs and migrations before kopf serves the webhooks.

    kopf starts its watches and the admission server only after every startup handler has
    finished, so the webhooks never judge against an empty view of the pool (which would
    refuse every gated VM with a misleading reason, or, for a migration whose VMI was not
    yet seen, leave out the trust selector). Retries until the API server answers.
    """
    if members.STATE.clients is None:
        members.STATE.clients = kube.make_clients()
    c = members.STATE.clients
    delay = 1.0
    while True:
        try:
            listed = {
                what: await asyncio.to_thread(kube.list_all, c, *api)
                for what, api in LISTED.items()
            }
            break
        except Exception as exc:  # noqa: BLE001 - any failure: say so and try again
            log.warning(
                "loading the pool from the API server failed (%s); retry in %.0fs", exc, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
    for body in listed["secpol"]:  # before any member is judged: no NoPolicy at restart
        await policies.observe(body, "ADDED")
    for body in listed["member"]:
        members.observe(body, "ADDED")
    for kind in ("vm", "vmi", "migration"):
        for body in listed[kind]:
            kubevirt.observe(kind, body, "ADDED")
    kubevirt.mark_started(listed["vmi"])
    members.STATE.loaded = True
    log.info("loaded %s", ", ".join(f"{len(items)} {what}s" for what, items in listed.items()))


LISTED = {
    "secpol": (GROUP, VERSION, "securitypolicies"),
    "member": (GROUP, VERSION, "members"),
    "vm": ("kubevirt.io", "v1", "virtualmachines"),
    "vmi": ("kubevirt.io", "v1", "virtualmachineinstances"),
    "migration": ("kubevirt.io", "v1", "virtualmachineinstancemigrations"),
}


@kopf.on.startup()
async def start_recheck_loop(**_: Any) -> None:
    global _loop_task  # noqa: PLW0603 - one background loop per operator process
    _loop_task = asyncio.create_task(members.recheck_loop(_stop))
    _box_tasks.append(asyncio.create_task(lazyboxes.box_loop(_stop)))
    _box_tasks.append(asyncio.create_task(balancing.balance_loop(_stop)))
    _box_tasks.append(asyncio.create_task(drains.drain_loop(_stop)))


@kopf.on.cleanup()
async def stop_recheck_loop(**_: Any) -> None:
    _stop.set()
    tasks = [t for t in (_loop_task, *_box_tasks) if t is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=5)
