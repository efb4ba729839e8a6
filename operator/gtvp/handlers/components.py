"""OSComponent verification: every component is checked by this operator itself.

A component's status is what we wrote, never what we trust: each one is checked again on
start and whenever the policy's publisher keys change, and a component with `maxUses` is
re-checked when its uses run out (`spend`, called for each placement that uses it).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from kubernetes.client.exceptions import ApiException

from gtvp import kube
from gtvp.core.api_resources import OS_COMPONENTS
from gtvp.core.component_checks import Check, check_component, spend_use, verification_status
from gtvp.core.components import ComponentError, parse_component
from gtvp.metrics import METRICS
from gtvp.runtime import Runtime

log = logging.getLogger("gtvp.lazyboxes")


def observe(rt: Runtime, body: dict[str, Any], event_type: str) -> str | None:
    """Record a component event (event loop); returns the name to verify, if any."""
    name = str((body.get("metadata") or {}).get("name", ""))
    rt.boxes.catalogue_version += 1
    rt.touch_boxes()
    if not rt.view.observe_component(body, event_type):
        rt.boxes.checks.pop(name, None)
        return None
    return name


def verify_all(rt: Runtime) -> None:
    """Publisher keys may have changed: every component is checked again (blocking)."""
    for name in list(rt.view.components):
        verify_component(rt, name)


def _check(rt: Runtime, body: dict[str, Any]) -> Check:
    policy = rt.view.policy
    if policy is None:
        return Check("Failed", "NoPolicy", "no usable SecurityPolicy names publisher keys")
    return check_component(body, policy.publisher_keys)


def verify_component(rt: Runtime, name: str, *, force_write: bool = False) -> Check:
    """Check one component now; write its status when the outcome changed."""
    body = rt.view.components.get(name)
    if body is None:
        return Check("Failed", "Deleted", "the component was deleted")
    check = _check(rt, body)
    rt.boxes.checks[name] = check
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
    _write_status(rt, name, status)
    if not check.ok:
        log.warning("OSComponent %s failed verification: %s: %s", name, check.reason, check.message)
    return check


def _write_status(rt: Runtime, name: str, verification: dict[str, Any]) -> None:
    try:
        out = kube.patch_status(rt.clients, OS_COMPONENTS, name, {"verification": verification})
        rt.view.components[name] = out  # a status write changes no resolution input
    except ApiException as exc:
        log.warning("cannot write OSComponent %s status: %s", name, exc.reason)


def spend(rt: Runtime, names: tuple[str, ...]) -> list[str]:
    """Spend one use of each component; re-verify those with none left. Returns failures."""
    failed = []
    for name in names:
        body = rt.view.components.get(name)
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
            check = verify_component(rt, name, force_write=True)
            if not check.ok:
                failed.append(name)
                continue
            ver = (rt.view.components[name].get("status") or {}).get("verification") or {}
            use = spend_use(ver, max_uses)
        if use.status is not None:
            _write_status(rt, name, use.status)
    return failed
