"""Pre-fetch before migrating a Lazy Box: the shell around `gtvp.core.prefetch`.

Evacuation, drains and balancing call `hold` with each migration they planned. For a Lazy
Box whose pinned target's Node lacks some of its components, `hold` writes (or finds) a
request in the target Node's `gtvp.io/prefetch` annotation and `waits` says so: the caller
creates nothing now and plans again on its next pass (no handler sleeps). Once the Node
lists every component, or the bound has passed (`GTVP_PREFETCH_TIMEOUT_SECONDS`, default
120; 0 turns pre-fetching off), `waits` says no and the caller creates the migration;
`started` then removes the request and counts the bytes and the wait (and, past the bound,
says so: a Warning Event `PrefetchTimedOut` on the VMI and its LazyBox, and a log line).
The request holds its own time, so a restarted operator finds it and goes on waiting. Once
the migration exists, a request for the same VMI on any other Node (an earlier plan's target)
is withdrawn. Not before: two planners (an evacuation and a drain of one member) may each
ask their own target meanwhile, and withdrawing each other's requests would restart both
waits on every pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections.abc import Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException

from gtvp import kube
from gtvp.core.api_resources import LAZY_BOXES, VIRTUAL_MACHINE_INSTANCES
from gtvp.core.components import ComponentError, image_digests, parse_component
from gtvp.core.compose import BOX_LABEL
from gtvp.core.evacuation import HOSTNAME_LABEL
from gtvp.core.prefetch import (
    ANNOTATION,
    DEFAULT_TIMEOUT,
    STALE_AFTER,
    Accepted,
    Decision,
    Part,
    Request,
    accepted_images,
    asked_elsewhere,
    believed,
    decide,
    missing_parts,
    render_requests,
    requests_on,
    updated,
)
from gtvp.metrics import METRICS
from gtvp.runtime import Runtime

log = logging.getLogger("gtvp.prefetch")
TIMEOUT_ENV = "GTVP_PREFETCH_TIMEOUT_SECONDS"
EVACUATION_TIMEOUT_ENV = "GTVP_PREFETCH_EVACUATION_TIMEOUT_SECONDS"
DEFAULT_EVACUATION_TIMEOUT = dt.timedelta(seconds=30)
_SAID: set[tuple[str, str]] = set()  # unreadable settings warned about


def timeout(reason: str | None = None) -> dt.timedelta:
    """The bound on the wait (operator setting, environment `GTVP_PREFETCH_TIMEOUT_SECONDS`:
    whole seconds, 0 = do not pre-fetch; anything else unreadable: the default). A box
    leaving a member that lost trust (`reason` "evacuation") waits at most
    `GTVP_PREFETCH_EVACUATION_TIMEOUT_SECONDS` (default 30): its VM runs on an untrusted
    host meanwhile, so a slow or absent pre-fetcher must not hold it there for long."""
    bound = _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT)
    if reason == "evacuation":
        return min(bound, _seconds(EVACUATION_TIMEOUT_ENV, DEFAULT_EVACUATION_TIMEOUT))
    return bound


def _seconds(variable: str, default: dt.timedelta) -> dt.timedelta:
    raw = os.environ.get(variable, "").strip()
    if raw.isascii() and raw.isdigit() and len(raw) <= 6:
        return dt.timedelta(seconds=int(raw))
    if raw and (variable, raw) not in _SAID:
        _SAID.add((variable, raw))  # once, not every plan
        log.warning("%s=%r is not a number of seconds: using %s s", variable, raw,
                    int(default.total_seconds()))  # fmt: skip
    return default


def box_parts(box: Mapping[str, Any]) -> tuple[Part, ...]:
    """A LazyBox's resolved components as (digest, size)."""
    out = []
    for r in (box.get("status") or {}).get("resolved") or []:
        try:
            out.append((str(r.get("digest", "")), int(r.get("sizeBytes", 0) or 0)))
        except (TypeError, ValueError):
            continue
    return tuple(p for p in out if p[0])


def _accepted(rt: Runtime, digests: set[str], box: Mapping[str, Any]) -> dict[str, Accepted]:
    """The accepted (signature Verified) component images among `digests`, the box's own
    resolved components first."""
    comps = []
    for name, body in list(rt.view.components.items()):
        if str((body.get("spec") or {}).get("digest", "")) not in digests:
            continue
        check = rt.boxes.checks.get(name)
        if check is None or not check.ok:
            continue
        with contextlib.suppress(ComponentError):
            comps.append(parse_component(body))
    resolved = {
        str(r.get("object"))
        for r in (box.get("status") or {}).get("resolved") or ()
        if isinstance(r, Mapping) and r.get("object")
    }
    return accepted_images(comps, {c.object_name: True for c in comps}, resolved)


def _target(obj: Mapping[str, Any]) -> str | None:
    return ((obj.get("spec") or {}).get("addedNodeSelector") or {}).get(HOSTNAME_LABEL)


def _box_of(rt: Runtime, obj: Mapping[str, Any]) -> tuple[str, str, Mapping[str, Any]] | None:
    ns = str((obj.get("metadata") or {}).get("namespace", ""))
    vmi = str((obj.get("spec") or {}).get("vmiName", ""))
    labels = ((rt.view.vmis.get((ns, vmi)) or {}).get("metadata") or {}).get("labels") or {}
    box = rt.view.boxes.get((ns, vmi))
    if box is None or BOX_LABEL not in labels:
        return None
    return ns, vmi, box


def _pending(
    rt: Runtime, key: str, target: str, node: Mapping[str, Any], now: dt.datetime
) -> tuple[Request | None, Request | None]:
    """(the request the wait counts from, the one the Node shows) for VMI `key` on
    `target`."""
    on_node = requests_on(node).get(key)
    return believed(rt.prefetch_asked.get((key, target)), on_node, now), on_node


def plan(rt: Runtime, obj: Mapping[str, Any], reason: str, now: dt.datetime) -> Decision | None:
    """The pre-fetch decision for a planned migration (None: not a box's, or off)."""
    bound = timeout(reason)
    target = _target(obj)
    found = _box_of(rt, obj)
    node = rt.view.nodes.get(target) if target else None
    if bound <= dt.timedelta(0) or found is None or node is None or target is None:
        return None
    ns, vmi, box = found
    parts = box_parts(box)
    if not parts:
        return None
    images = image_digests((node.get("status") or {}).get("images"))
    lacking = missing_parts(parts, images)
    return decide(
        parts=parts,
        node_images=images,
        accepted=_accepted(rt, set(lacking), box) if lacking else {},
        pending=_pending(rt, f"{ns}/{vmi}", target, node, now)[0],
        now=now,
        reason=reason,
        timeout=bound,
    )


def waits(decision: Decision | None) -> bool:
    """Whether the planned migration waits for its target's pre-fetch (plan again later)."""
    return decision is not None and decision.action != "migrate"


async def hold(rt: Runtime, obj: Mapping[str, Any], reason: str) -> Decision | None:
    """The pre-fetch decision for the planned migration `obj` (None: not a box's migration,
    or pre-fetching is off), after writing the request it calls for; `waits` tells whether
    the caller creates the migration now. The wait counts from gtvp's first ask, kept in
    memory (`Runtime.prefetch_asked`); a request the Node does not show (a write refused, or
    a host removed it) is written again with that time."""
    now = dt.datetime.now(dt.UTC)
    _forget_stale(rt, now)
    decision = plan(rt, obj, reason, now)
    if decision is None or decision.action == "migrate":
        return decision
    target = str(_target(obj))
    key = f"{obj['metadata']['namespace']}/{obj['spec']['vmiName']}"
    if decision.action == "request" and decision.request is not None:
        rt.prefetch_asked[(key, target)] = decision.request
        await _ask(rt, obj, decision.request, now)
        return decision
    pending, on_node = _pending(rt, key, target, rt.view.nodes.get(target) or {}, now)
    if pending is not None:
        rt.prefetch_asked.setdefault((key, target), pending)  # from a restart: ours now
        if on_node != pending:
            await _write(rt, target, now, add={key: pending})
    return decision


def _forget_stale(rt: Runtime, now: dt.datetime) -> None:
    """Drop remembered requests past the bound plus `STALE_AFTER` (the VMI went elsewhere,
    was deleted, or migrated without gtvp)."""
    limit = timeout() + STALE_AFTER
    for k in [k for k, r in rt.prefetch_asked.items() if now - r.requested_at >= limit]:
        del rt.prefetch_asked[k]


async def _ask(rt: Runtime, obj: Mapping[str, Any], request: Request, now: dt.datetime) -> None:
    target = str(_target(obj))
    ns = str(obj["metadata"]["namespace"])
    vmi = str(obj["spec"]["vmiName"])
    if not await _write(rt, target, now, add={f"{ns}/{vmi}": request}):
        return
    METRICS.prefetch_requests.labels(request.reason).inc()
    await _say(
        rt,
        ns,
        vmi,
        type_="Normal",
        reason="Prefetching",
        message=f"{request.reason}: asked {target} to fetch {len(request.images)} component "
        f"image(s) ({request.bytes} bytes) before the migration",
    )


async def started(rt: Runtime, obj: Mapping[str, Any], decision: Decision | None) -> None:
    """The migration `obj` exists now: drop its request, count the bytes and the wait, and
    say so when the bound was reached first."""
    if decision is None:
        return
    target = _target(obj)
    ns = str(obj["metadata"]["namespace"])
    vmi = str(obj["spec"]["vmiName"])
    key = f"{ns}/{vmi}"
    node = rt.view.nodes.get(target) if target else None
    now = dt.datetime.now(dt.UTC)
    pending = _pending(rt, key, target, node, now)[0] if node and target else None
    for k in [k for k in rt.prefetch_asked if k[0] == key]:
        del rt.prefetch_asked[k]
    if target:
        await withdraw_elsewhere(rt, key, target)
    if pending is None:
        return  # nothing was asked (or a run before a restart counted it)
    if target:
        await _write(rt, target, now, drop=(key,))
    reason = pending.reason if pending.reason in ("evacuation", "drain", "balancing") else None
    if reason is None:
        return
    METRICS.prefetch_bytes.labels(reason).inc(pending.bytes)
    METRICS.prefetch_wait_seconds.labels(reason).observe(decision.waited.total_seconds())
    if decision.timed_out:
        METRICS.prefetch_timeouts.labels(reason).inc()
        await _say(
            rt,
            ns,
            vmi,
            type_="Warning",
            reason="PrefetchTimedOut",
            message=f"migrating to {target}: {decision.message}",
        )
    else:
        log.info("%s/%s: %s fetched %d bytes ahead of the migration in %.0f s", ns, vmi, target,
                 pending.bytes, decision.waited.total_seconds())  # fmt: skip


async def withdraw_elsewhere(rt: Runtime, key: str, target: str) -> None:
    """Drop the requests for `key` (a VMI) on every Node but `target`, its migration's: an
    earlier plan's target (it lost trust, was cordoned or filled up) does not fetch for
    nothing until the request goes stale. A write refused (409: the Node changed) is tried
    once more on the Node as read again."""
    now = dt.datetime.now(dt.UTC)
    for name in asked_elsewhere(rt.view.nodes, key, target):
        done = await _write(rt, name, now, drop=(key,))
        if not done and await _reread_node(rt, name):
            done = await _write(rt, name, now, drop=(key,))
        if done:
            log.info("%s: pre-fetch request on %s withdrawn (its migration goes to %s)",
                     key, name, target)  # fmt: skip


async def _reread_node(rt: Runtime, name: str) -> bool:
    try:
        node = await asyncio.to_thread(rt.clients.core.read_node, name)
    except ApiException:
        return False
    rt.view.observe_node(rt.clients.api.sanitize_for_serialization(node), "MODIFIED")
    return True


async def _write(
    rt: Runtime,
    target: str,
    now: dt.datetime,
    *,
    add: Mapping[str, Request] | None = None,
    drop: tuple[str, ...] = (),
) -> bool:
    """Rewrite the target Node's requests (optimistic: a Node changed since the view saw it
    answers 409 and the next pass writes again). False when not written."""
    node = rt.view.nodes.get(target)
    if node is None:
        return False
    meta = node.get("metadata") or {}
    value = render_requests(updated(requests_on(node), now=now, add=add, drop=drop,
                                    timeout=timeout()))  # fmt: skip
    if value == (meta.get("annotations") or {}).get(ANNOTATION):
        return True
    patch = {
        "metadata": {
            "resourceVersion": meta.get("resourceVersion"),
            "annotations": {ANNOTATION: value},
        }
    }
    try:
        result = await asyncio.to_thread(
            rt.clients.core.patch_node,
            target,
            patch,
            field_manager=rt.clients.field_manager,
            _content_type="application/merge-patch+json",
        )
    except ApiException as exc:
        log.warning("could not write the pre-fetch request on node %s: %s %s", target,
                    exc.status, exc.reason)  # fmt: skip
        return False
    annotations = dict(meta.get("annotations") or {})
    if value is None:
        annotations.pop(ANNOTATION, None)
    else:
        annotations[ANNOTATION] = value
    rv = getattr(getattr(result, "metadata", None), "resource_version", None)
    new_meta = {**meta, "annotations": annotations}
    if rv:
        new_meta["resourceVersion"] = rv
    rt.view.nodes[target] = {**node, "metadata": new_meta}  # until its watch event
    return True


async def _say(rt: Runtime, ns: str, vmi: str, *, type_: str, reason: str, message: str) -> None:
    """Log and record an Event on the VMI and its LazyBox."""
    (log.warning if type_ == "Warning" else log.info)("%s/%s: %s", ns, vmi, message)
    about = [
        (VIRTUAL_MACHINE_INSTANCES, rt.view.vmis.get((ns, vmi)) or {}),
        (LAZY_BOXES, rt.view.boxes.get((ns, vmi)) or {}),
    ]
    for res, body in about:
        with contextlib.suppress(ApiException):
            await asyncio.to_thread(
                kube.post_object_event,
                rt.clients,
                res,
                body,
                name=vmi,
                namespace=ns,
                type_=type_,
                reason=reason,
                message=message,
            )
