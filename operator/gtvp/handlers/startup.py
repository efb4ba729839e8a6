"""Start-up and clean-up: kopf's settings, the pool listed before anything is served, and the
background loops (recheck, boxes, balancing, drains) started and stopped."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from typing import Any, cast

import kopf

from gtvp import gc_pauses, kube
from gtvp.core import launchers
from gtvp.core.api_resources import (
    MEMBERS,
    MIGRATIONS,
    OS_COMPONENTS,
    SECURITY_POLICIES,
    VIRTUAL_MACHINE_INSTANCES,
    VIRTUAL_MACHINES,
    ApiResource,
)
from gtvp.handlers import (
    attestation,
    balancing,
    components,
    drains,
    lazyboxes,
    leases,
    policies,
    verdict_uses,
)
from gtvp.runtime import Runtime, runtime_of

log = logging.getLogger("gtvp.handlers")


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: kopf builds one (a deep copy of each object's spec, labels and
    annotations) on every watch event, to tell what changed for `on.create`/`on.update`/
    `on.field` handlers and daemons. gtvp registers only `on.event` handlers (they get the
    whole body and keep their own view; `gtvp.handlers.register` and a test hold this), so
    the copy served nothing and was about a tenth of the operator's CPU at scale."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


LISTED: dict[str, ApiResource] = {
    "secpol": SECURITY_POLICIES,
    "member": MEMBERS,
    "vm": VIRTUAL_MACHINES,
    "vmi": VIRTUAL_MACHINE_INSTANCES,
    "migration": MIGRATIONS,
    "component": OS_COMPONENTS,
}


async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # gtvp writes its own Events on transitions; kopf's per-handler log events would cost
    # one API write per handler run.
    settings.posting.enabled = False
    gc_pauses.watch()
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.error_backoffs = [1, 2, 5, 10]
    # webhook configurations are rendered statically (gtvp.webhook_config, the Helm chart);
    # kopf only serves the handlers, it never rewrites or removes the configurations
    settings.admission.managed = None
    # only KubeVirt's launcher pods, selected by the API server (a pod that loses the label
    # is then DELETED for the watch; no other pod reaches the operator)
    settings.watching.label_selectors["", "v1", "pods"] = launchers.SELECTOR
    server = runtime_of(memo).webhook_server
    if server is not None:
        settings.admission.server = server


async def _list_pool(rt: Runtime) -> dict[str, list[dict[str, Any]]]:
    """Every listed kind, retrying until the API server answers."""
    delay = 1.0
    while True:
        try:
            listed = {
                what: await asyncio.to_thread(
                    kube.list_all, rt.clients, res, missing_ok=res is not OS_COMPONENTS
                )
                for what, res in LISTED.items()
            }
            listed["node"] = await asyncio.to_thread(kube.list_nodes, rt.clients)
            listed["launcher pod"] = await asyncio.to_thread(kube.list_launcher_pods, rt.clients)
            return listed
        except Exception as exc:  # noqa: BLE001 - any failure: say so and try again
            log.warning(
                "loading the pool from the API server failed (%s); retry in %.0fs", exc, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


async def load_pool(memo: kopf.Memo, **_: Any) -> None:
    """List policies, Nodes, members, VMs, VMIs, migrations, launcher pods and OSComponents
    before kopf serves the webhooks.

    kopf starts its watches and the admission server only after every startup handler has
    finished, so the webhooks never judge against an empty view of the pool (which would
    refuse every gated VM with a misleading reason, or, for a migration whose VMI was not
    yet seen, leave out the trust selector). Retries until the API server answers.
    """
    rt = runtime_of(memo)
    listed = await _list_pool(rt)
    for body in listed["secpol"]:  # before any member is judged: no NoPolicy at restart
        await policies.observe(rt, body, "ADDED")
    for body in listed["node"]:  # their labels decide transitions: no level flaps at restart
        rt.view.observe_node(body, "ADDED")
    for body in listed["member"]:
        attestation.observe(rt, body, "ADDED")
    for body in listed["vm"]:
        rt.view.observe_vm(body, "ADDED")
    for body in listed["vmi"]:
        rt.view.observe_vmi(body, "ADDED")
    # where VMIs run, whatever their status says; before the migrations, so that a pod
    # already ended counts as ended before an unfinished migration began
    for body in listed["launcher pod"]:
        rt.view.observe_pod(body, "ADDED")
    for body in listed["migration"]:
        rt.view.observe_migration(body, "ADDED")
    # every OSComponent, so that one a running box boots and the view lacks is gone
    # (`lazyboxes.unvouched`); their watch events check them
    for body in listed["component"]:
        rt.view.observe_component(body, "ADDED")
    rt.boxes.catalogue_version += 1
    verdict_uses.mark_started(rt, listed["vmi"])
    rt.view.loaded = True
    log.info("loaded %s", ", ".join(f"{len(items)} {what}s" for what, items in listed.items()))


async def start_loops(memo: kopf.Memo, **_: Any) -> None:
    """The Lease rounds, one recheck loop for the pool, the box loop, the balancer and the
    drain loop; SIGTERM from now on goes through the graceful stop (kopf installed its own
    signal handlers before the startup handlers ran: these replace them)."""
    rt = runtime_of(memo)
    if rt.stop_flag is not None:
        leases.install_graceful_stop(rt, rt.stop_flag)
    for loop in (
        leases.lease_loop,
        attestation.recheck_loop,
        lazyboxes.box_loop,
        balancing.balance_loop,
        drains.drain_loop,
        resync_loop,
    ):
        rt.tasks.append(asyncio.create_task(loop(rt)))


RESYNC = 300.0
"""Seconds between two listings of the launcher pods, migrations (`ClusterView.resync_*`) and
OSComponents (`components.resync`)."""


async def resync_loop(rt: Runtime, period: float = RESYNC) -> None:
    """List the launcher pods, the migrations and the OSComponents every `period` s: one
    deleted while the watch was reconnecting is forgotten (kopf's re-listing delivers no
    DELETED), one missed is seen. The event loop applies each listing (no other thread
    changes the view)."""
    while not rt.stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(rt.stop.wait(), timeout=period)
        if rt.stop.is_set():
            return
        since = rt.view.events
        try:
            pods = await asyncio.to_thread(kube.list_launcher_pods, rt.clients)
            migrations = await asyncio.to_thread(kube.list_all, rt.clients, MIGRATIONS)
            listed = await asyncio.to_thread(
                kube.list_all, rt.clients, OS_COMPONENTS, missing_ok=False
            )
            added = rt.view.resync_pods(pods, since) | rt.view.resync_migrations(migrations, since)
            gone, missed = components.resync(rt, listed, since)
        except Exception as exc:  # noqa: BLE001 - the watch keeps the view; try next time
            log.warning("listing launcher pods, migrations and OSComponents failed (%s); retry "
                        "in %.0fs", exc, period)  # fmt: skip
            continue
        if gone:
            log.info("OSComponents deleted while the watch was away: %s", ", ".join(gone))
        for name in missed:  # in the listing, not in the view: checked as on its event
            await asyncio.to_thread(components.verify_component, rt, name)
        for node in added:
            rt.schedule.schedule(node, dt.timedelta(0))


async def stop_loops(memo: kopf.Memo, **_: Any) -> None:
    rt = runtime_of(memo)
    rt.stop.set()
    if rt.tasks:
        await asyncio.wait(rt.tasks, timeout=5)
