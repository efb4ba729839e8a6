"""OSComponent verification: every component is checked by this operator itself.

A component's status is what we wrote, never what we trust: each one is checked again on
start and whenever the policy's publisher keys change, and a component with `maxUses` is
re-checked when its uses run out (`spend`, called for each placement that uses it).

Every status write is made at the resourceVersion it was computed from: the view may hold
an older body than the server (a watch event arriving after our own write, or a check and
a placement racing), and a verification written from it would give back uses already
spent. A write refused as stale (409) reads the component again and decides anew.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from collections.abc import Iterable
from typing import Any

from kubernetes.client.exceptions import ApiException

from gtvp import kube
from gtvp.cluster_view import kept
from gtvp.core.api_resources import OS_COMPONENTS
from gtvp.core.component_checks import (
    CHANGING,
    Check,
    Use,
    check_component,
    resolvable,
    revokes,
    spend_use,
    verification_status,
)
from gtvp.core.components import ComponentError, parse_component
from gtvp.metrics import METRICS
from gtvp.runtime import Runtime

log = logging.getLogger("gtvp.lazyboxes")


def observe(rt: Runtime, body: dict[str, Any], event_type: str) -> str | None:
    """Record a component event (event loop); returns the name to verify, if any."""
    name = str((body.get("metadata") or {}).get("name", ""))
    before = _uid(rt.view.components.get(name))
    rt.boxes.catalogue_version += 1
    rt.touch_boxes()
    if not rt.view.observe_component(body, event_type):
        rt.boxes.checks.pop(name, None)
        return None
    if before != _uid(body):
        # another object under the name (deleted and created again, its deletion missed):
        # the old one's check says nothing of it; boxes wait until it is checked
        rt.boxes.checks.pop(name, None)
    return name


def _set_check(rt: Runtime, name: str, check: Check, body: dict[str, Any] | None = None) -> bool:
    """Keep `check` as `name`'s outcome, if it was made on the object the view holds under
    that name (`body`'s uid; False: another object came since, made while this one was
    checked in a thread). A component whose check fails (a publisher key revoked, a
    signature that does not verify) leaves the catalogue boxes are resolved over, and one
    that verifies again returns to it: the boxes are resolved again."""
    if body is not None and _uid(rt.view.components.get(name)) != _uid(body):
        return False
    before = rt.boxes.checks.get(name)
    rt.boxes.checks[name] = check
    if before is None or resolvable(before) != resolvable(check):
        rt.boxes.catalogue_version += 1
        rt.touch_boxes()
    return True


def _uid(body: dict[str, Any] | None) -> str:
    return str(((body or {}).get("metadata") or {}).get("uid") or "")


def verify_all(rt: Runtime) -> None:
    """Publisher keys may have changed: every component is checked again (blocking)."""
    for name in list(rt.view.components):
        verify_component(rt, name)


def _check(rt: Runtime, body: dict[str, Any]) -> Check:
    policy = rt.view.policy
    if policy is None:
        return Check("Failed", "NoPolicy", "no usable SecurityPolicy names publisher keys")
    return check_component(
        body, policy.publisher_keys, policy.publisher_scopes, policy.revoked_components
    )


WRITE_ATTEMPTS = 5
"""Times a status write refused as stale (409) is decided again on a fresh read."""


def verify_component(rt: Runtime, name: str, *, force_write: bool = False) -> Check:
    """Check one component now; write its status when the outcome changed (with
    `force_write`: always, a fresh verification with all its uses)."""
    failed: Check | None = None
    for _ in range(WRITE_ATTEMPTS):
        body = rt.view.components.get(name)
        if body is None:
            return _deleted(rt, name)
        check = _check(rt, body)
        if not _set_check(rt, name, check, body):
            failed = None
            continue  # another object under the name since: check that one
        failed = check if revokes(check) else None
        if check.reason == "NoPolicy":  # the policy is not loaded yet (or gone): no status flaps
            return check
        METRICS.components.labels("verified" if check.ok else "failed", check.reason).inc()
        current = _verification(body)
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
        written = _write_status(rt, body, status)
        if written is _Written.STALE:
            continue
        if written is _Written.GONE:
            return _deleted(rt, name)
        if not check.ok:
            log.warning(
                "OSComponent %s failed verification: %s: %s", name, check.reason, check.message
            )
        return check
    return _every_write_conflicted(rt, name, failed)


def _every_write_conflicted(rt: Runtime, name: str, failed: Check | None) -> Check:
    """The component changed under every status write. A failure (`failed`) stands: it
    rests on the object's spec (immutable) and the policy, never on its resourceVersion,
    and whoever keeps patching its labels so that every write meets a conflict must not
    turn a revocation into `Changing`, which takes nothing back from running boxes. A
    check that verified concluded nothing (its uses kept changing): `_unsettled`."""
    if failed is None:
        return _unsettled(rt, name)
    log.warning(
        "OSComponent %s failed verification (%s: %s); its status could not be written: it "
        "kept changing",
        name,
        failed.reason,
        failed.message,
    )
    return failed


def _deleted(rt: Runtime, name: str) -> Check:
    rt.boxes.checks.pop(name, None)
    return Check("Failed", "Deleted", "the component was deleted")


def _unsettled(rt: Runtime, name: str) -> Check:
    """The component kept changing under every attempt: not usable for now (fail closed)."""
    check = Check("Failed", CHANGING, "the component kept changing while it was checked")
    _set_check(rt, name, check)
    log.warning("OSComponent %s: %s", name, check.message)
    return check


def _verification(body: dict[str, Any]) -> dict[str, Any]:
    got: dict[str, Any] = (body.get("status") or {}).get("verification") or {}
    return got


class _Written(enum.Enum):
    DONE = "done"
    STALE = "stale"
    """The component changed since the body the status was computed from; read again."""
    GONE = "gone"
    FAILED = "failed"


def _write_status(rt: Runtime, body: dict[str, Any], verification: dict[str, Any]) -> _Written:
    """Write `verification` if the component is still as `body` (its resourceVersion)."""
    meta = body.get("metadata") or {}
    name = str(meta.get("name", ""))
    version = str(meta.get("resourceVersion") or "") or None
    try:
        out = kube.patch_status(
            rt.clients,
            OS_COMPONENTS,
            name,
            {"verification": verification},
            resource_version=version,
        )
    except ApiException as exc:
        if kube.is_conflict(exc):
            _read_again(rt, name)
            return _Written.STALE
        if kube.is_not_found(exc):
            _forget(rt, name)
            return _Written.GONE
        log.warning("cannot write OSComponent %s status: %s", name, exc.reason)
        return _Written.FAILED
    rt.view.components[name] = kept(out)  # a status write changes no resolution input
    return _Written.DONE


def _read_again(rt: Runtime, name: str) -> None:
    """The server's component into the view (gone: out of it)."""
    try:
        fresh = kube.get_if_present(rt.clients, OS_COMPONENTS, name)
    except ApiException as exc:
        log.warning("cannot read OSComponent %s: %s", name, exc.reason)
        return
    if fresh is None:
        _forget(rt, name)
        return
    rt.view.note_component(name)
    if _uid(rt.view.components.get(name)) != _uid(fresh):
        # another object under the name (deleted and made again since the view's): the
        # old one's check says nothing of it, and it leaves the catalogue until checked
        _drop_check(rt, name)
    rt.view.components[name] = kept(fresh)


def _forget(rt: Runtime, name: str) -> None:
    """A component found gone on the server: out of the view and the catalogue (what boxes
    boot of it is no longer vouched for: `lazyboxes.unvouched`)."""
    rt.view.note_component(name)
    if rt.view.components.pop(name, None) is not None:
        _drop_check(rt, name)


def _drop_check(rt: Runtime, name: str) -> None:
    """What the view held under `name` is no longer there: its check goes, and the boxes
    are resolved again over a catalogue without it."""
    rt.boxes.checks.pop(name, None)
    rt.boxes.catalogue_version += 1
    rt.touch_boxes()


def resync(rt: Runtime, listed: list[dict[str, Any]], since: int) -> tuple[list[str], list[str]]:
    """The components as listed when `rt.view.events` was `since`: one deleted while the
    watch was away (a watch that resumes after a gap delivers no DELETED) is forgotten, one
    listed that the view lacks (or holds as another object) is taken in; one the watch told
    of after `since` is as the watch says. (The names forgotten, the names taken in: to
    check.)"""
    by_name = {str((b.get("metadata") or {}).get("name", "")): b for b in listed}
    fresh = {n for n, at in rt.view.component_seen.items() if at > since}
    gone = [n for n in list(rt.view.components) if n not in by_name and n not in fresh]
    for name in gone:
        _forget(rt, name)
    missed = [
        n
        for n, body in by_name.items()
        if n not in fresh and _uid(rt.view.components.get(n)) != _uid(body)
    ]
    for name in missed:
        observe(rt, by_name[name], "ADDED")
    seen = rt.view.component_seen
    rt.view.component_seen = {n: at for n, at in seen.items() if at > since or n in by_name}
    return gone, missed


def spend(rt: Runtime, uses: Iterable[tuple[str, str]]) -> list[str]:
    """Spend one use of each component planned on, (object name, uid); re-verify those with
    none left. Returns the names of those not usable."""
    return [name for name, uid in uses if not _spend_one(rt, name, uid)]


def _spend_one(rt: Runtime, name: str, planned_uid: str) -> bool:
    """Spend one use of `name`; False: it is not usable, or it is no longer the object the
    plan was made on (`planned_uid`: deleted and made again under its name since, by a
    watch event or a re-read after a 409)."""
    for _ in range(WRITE_ATTEMPTS):
        got = _next_use(rt, name)
        if got is None:
            return False
        body, use = got
        if _uid(body) != planned_uid:
            return False
        if use.status is None:
            return True
        written = _write_status(rt, body, use.status)
        if written is not _Written.STALE:
            return written is not _Written.GONE
    _unsettled(rt, name)
    return False


def _next_use(rt: Runtime, name: str) -> tuple[dict[str, Any], Use] | None:
    """The body a use of `name` is decided on and what it writes (verified again first
    when no use is left); None: not usable."""
    body = rt.view.components.get(name)
    if body is None:
        return None
    try:
        max_uses = parse_component(body).max_uses
    except ComponentError:
        return None
    use = spend_use(_verification(body), max_uses)
    if use.recheck:
        if not verify_component(rt, name, force_write=True).ok:
            return None
        body = rt.view.components[name]
        use = spend_use(_verification(body), max_uses)
    return body, use
