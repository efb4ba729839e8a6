"""SecurityPolicy events: which generation the pool runs under, and every policy's status.

Thin: `gtvp.core.policy_status.assess_policy` decides. This module remembers the last
generation of each policy it accepted (status.acceptedSpec holds it too, for a restarted
operator), puts the generation to run under in the cluster view (`set_policy`), writes the policy's
status (one merge patch, only when it changes) and posts an Event when the verdict for a
generation changes: an unusable policy is never silent, and never replaces a good one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException

from gtvp import kube
from gtvp.core.api_resources import SECURITY_POLICIES
from gtvp.core.policy import Policy
from gtvp.core.policy_status import STATUS_FIELDS, PolicyAssessment, assess_policy
from gtvp.runtime import Runtime

log = logging.getLogger("gtvp.policies")


def set_policy(rt: Runtime, name: str, policy: Policy | None, error: str | None = None) -> bool:
    """Run the pool under `policy` if `name` is the policy this operator enforces.

    `policy` is the generation `assess_policy` chose (the current one, or the last accepted
    one while the current is unusable); None, with `error` saying why, when no usable
    generation is known: every member turns Untrusted (NoPolicy), fail closed.
    True when that changed what the pool runs under (every member is looked at again).
    """
    view = rt.view
    if name != rt.settings.policy_name:
        return False
    error = None if policy is not None else (error or f"SecurityPolicy {name!r} is unusable")
    if policy == view.policy and error == view.policy_error:
        # the same rules (a new generation that changed nothing they say): nothing to look
        # at again, but tokens name the newest generation, found by this very object
        view.policy = policy
        return False
    view.policy, view.policy_error = policy, error
    if policy is not None:
        view.policy_lost_at = None
    elif view.policy_lost_at is None:  # lost now (not again at each edit while it stays lost)
        view.policy_lost_at = dt.datetime.now(dt.UTC)
    if policy is not None:
        log.info(
            "SecurityPolicy %s in force: levels %s, PCRs %s:%s",
            name,
            [lv.level for lv in policy.levels],
            policy.pcr_bank,
            list(policy.pcrs),
        )
    else:
        log.error("no usable SecurityPolicy: %s; every member is Untrusted", error)
    for member in list(view.members):
        rt.schedule.schedule(member, dt.timedelta(0))
    return True


async def observe(rt: Runtime, body: Mapping[str, Any], type_: str) -> bool:
    """Handle one SecurityPolicy event; True when what the pool runs under changed."""
    meta = body.get("metadata") or {}
    name, uid = str(meta.get("name", "")), str(meta.get("uid", ""))
    accepted = rt.accepted_policies
    enforced = name == rt.settings.policy_name
    if enforced and type_ == "DELETED":
        rt.view.policy_version = None  # key release refuses from now on
    if type_ == "DELETED":
        accepted.pop(name, None)
        return set_policy(rt, name, None, f"SecurityPolicy {name!r} does not exist")
    kept = accepted.get(name)
    status = body.get("status") or {}
    a = assess_policy(
        name,
        generation=int(meta.get("generation") or 0),
        spec=body.get("spec") or {},
        status=status,
        now=dt.datetime.now(dt.UTC),
        remembered=kept[1] if kept is not None and kept[0] == uid else None,
        enforced=enforced,
    )
    if a.accepted is not None:
        accepted[name] = (uid, a.accepted)
    changed = set_policy(rt, name, a.policy, f"SecurityPolicy {name!r} {a.message}")
    if enforced:  # what key release compares with the server's: only once the pool runs
        # under what this version says (a release judged meanwhile is told to ask again)
        rt.view.policy_version = meta.get("resourceVersion")
    if a.event is not None:
        log.log(
            logging.INFO if a.error is None else logging.ERROR,
            "SecurityPolicy %s: %s",
            name,
            a.message,
        )
    await _write(rt, name, uid, status, a)
    return changed


async def _write(
    rt: Runtime, name: str, uid: str, status: Mapping[str, Any], a: PolicyAssessment
) -> None:
    """The policy's status (when it changed) and the Event of a new verdict."""
    c = rt.clients
    old = {k: status[k] for k in STATUS_FIELDS if k in status}
    patch = kube.merge_patch_for(old, a.status)
    if patch:
        try:
            await asyncio.to_thread(kube.patch_policy_status, c, name, patch)
        except ApiException as exc:  # the next event (or restart) writes it again
            log.warning("could not write the status of SecurityPolicy %s: %s", name, exc.reason)
    if not rt.coordination.leads():  # one Event, not one per replica
        return
    for event in (a.event, a.weak_event):
        if event is None:
            continue
        await asyncio.to_thread(
            kube.post_event,
            c,
            kind=SECURITY_POLICIES.kind,
            name=name,
            uid=uid,
            namespace=None,
            type_=event.type,
            reason=event.reason,
            message=f"SecurityPolicy {name} {event.message}",
        )
