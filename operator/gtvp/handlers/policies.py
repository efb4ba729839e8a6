"""SecurityPolicy events: which generation the pool runs under, and every policy's status.

Thin: `gtvp.core.policy_status.assess_policy` decides. This module remembers the last
generation of each policy it accepted (status.acceptedSpec holds it too, for a restarted
operator), hands the generation to run under to `members.set_policy`, writes the policy's
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
from gtvp.core.policy_status import STATUS_FIELDS, Accepted, assess_policy
from gtvp.handlers import members

log = logging.getLogger("gtvp.policies")

# policy name -> (uid, the last generation this process accepted)
_ACCEPTED: dict[str, tuple[str, Accepted]] = {}


async def observe(body: Mapping[str, Any], type_: str) -> bool:
    """Handle one SecurityPolicy event; True when what the pool runs under changed."""
    meta = body.get("metadata") or {}
    name, uid = str(meta.get("name", "")), str(meta.get("uid", ""))
    if type_ == "DELETED":
        _ACCEPTED.pop(name, None)
        return members.set_policy(name, None, f"SecurityPolicy {name!r} does not exist")
    kept = _ACCEPTED.get(name)
    status = body.get("status") or {}
    a = assess_policy(
        name,
        generation=int(meta.get("generation") or 0),
        spec=body.get("spec") or {},
        status=status,
        now=dt.datetime.now(dt.UTC),
        remembered=kept[1] if kept is not None and kept[0] == uid else None,
        enforced=name == members.STATE.policy_name,
    )
    if a.accepted is not None:
        _ACCEPTED[name] = (uid, a.accepted)
    changed = members.set_policy(name, a.policy, f"SecurityPolicy {name!r} {a.message}")
    if a.event is not None:
        log.log(
            logging.INFO if a.error is None else logging.ERROR,
            "SecurityPolicy %s: %s",
            name,
            a.message,
        )
    c = members.STATE.clients
    if c is None:
        return changed
    old = {k: status[k] for k in STATUS_FIELDS if k in status}
    patch = kube.merge_patch_for(old, a.status)
    if patch:
        try:
            await asyncio.to_thread(kube.patch_policy_status, c, name, patch)
        except ApiException as exc:  # the next event (or restart) writes it again
            log.warning("could not write the status of SecurityPolicy %s: %s", name, exc.reason)
    if a.event is not None:
        await asyncio.to_thread(
            kube.post_event,
            c,
            kind="SecurityPolicy",
            name=name,
            uid=uid,
            namespace=None,
            type_=a.event.type,
            reason=a.event.reason,
            message=f"SecurityPolicy {name} {a.event.message}",
        )
    return changed
