"""Verification state of OSComponents: check one, and decide whether a use needs a re-check.

A component is usable only while its status says Verified. With `maxUses` set, each box
composition that uses it spends one use; when none is left the component is verified
again (against the policy's publisher keys as they are now) before its next use — the
paper's component attestation count. Pure.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gtvp.core.component_signing import ComponentSignatureError, verify
from gtvp.core.components import Component, ComponentError, parse_component
from gtvp.core.policy import PublisherScope
from gtvp.core.timestamps import format_ts

COMPONENT_VERIFIED_REASON = "SignatureValid"
COMPONENT_FAILURE_REASONS: tuple[str, ...] = (
    "AlgorithmMismatch",
    "BadSignature",
    "DigestMismatch",
    "MalformedComponent",
    "MalformedSignature",
    "MissingSignature",
    "OutOfScope",
    "Revoked",
    "UnknownPublisher",
    "UnreadableKey",
    "UnsupportedKey",
)
"""Every reason `check_component` can fail with (gtvp.metrics exports each at 0)."""


@dataclass(frozen=True)
class Check:
    state: str  # Verified | Failed
    reason: str
    message: str

    @property
    def ok(self) -> bool:
        return self.state == "Verified"


CHANGING = "Changing"
"""A check that concluded nothing: the component kept changing while it was checked."""


def revokes(check: Check | None) -> bool:
    """Whether a check takes back what a component vouched for in running boxes: one that
    failed, not one that concluded nothing (`Changing`: no new use, but no restart)."""
    return not resolvable(check) and check is not None and check.reason != CHANGING


def resolvable(check: Check | None) -> bool:
    """Whether a component with this check outcome may be resolved into a box: verified, not
    judged yet (the box waits for it) or judged without a policy loaded (nothing can be said
    of it yet); not one that failed (a revoked publisher's, an unsigned one)."""
    return check is None or check.ok or check.reason == "NoPolicy"


OUT_OF_SCOPE = "OutOfScope"
"""A good signature by a publisher the policy does not let sign that component: its name or
something it provides is not among the publisher's `components`, or its level is above the
publisher's `maxLevel` (so an application publisher's key cannot replace every box's kernel
or libc)."""


def check_component(
    obj: Mapping[str, Any],
    publisher_keys: Mapping[str, str],
    scopes: Mapping[str, PublisherScope] | None = None,
    revoked: frozenset[str] = frozenset(),
) -> Check:
    """Verify one OSComponent object against the trusted publisher keys, and what each
    publisher may sign (`scopes`, by publisher name; none: anything); a component whose
    image or disk digest the policy revokes (`revoked`) fails whatever its signature."""
    try:
        comp = parse_component(obj)
    except ComponentError as exc:
        return Check("Failed", "MalformedComponent", str(exc))
    hit = next((d for d in (comp.digest, comp.disk_digest) if d and d in revoked), None)
    if hit is not None:
        return Check(
            "Failed",
            "Revoked",
            f"the policy revokes {hit} (spec.revokedComponents): withdrawn by its publisher "
            "or found bad; a signed copy applied again stays refused",
        )
    try:
        verify(obj.get("spec") or {}, publisher_keys)
    except ComponentSignatureError as exc:
        return Check("Failed", exc.reason, exc.message)
    if not comp.image.endswith("@" + comp.digest):
        return Check("Failed", "DigestMismatch", "image is not pinned by spec.digest")
    publisher = str((obj.get("spec") or {}).get("signature", {}).get("publisher", ""))
    outside = _out_of_scope(comp, publisher, (scopes or {}).get(publisher))
    if outside is not None:
        return Check("Failed", OUT_OF_SCOPE, outside)
    return Check("Verified", COMPONENT_VERIFIED_REASON, f"signed by {publisher}")


def _out_of_scope(comp: Component, publisher: str, scope: PublisherScope | None) -> str | None:
    """Why `publisher` may not sign `comp` (None: it may)."""
    if scope is None:
        return None
    if scope.components is not None:
        # a kernel or a rootfs fills the box's one slot of its type, whatever it provides
        slot = {comp.type} if comp.type in ("kernel", "rootfs") else set()
        outside = sorted({comp.name, *comp.provides, *slot} - scope.components)
        if outside:
            allowed = ", ".join(sorted(scope.components)) or "nothing"
            return (
                f"publisher {publisher} may sign only {allowed}; this component is or "
                f"provides {', '.join(outside)}"
            )
    if scope.max_level is not None and comp.level > scope.max_level:
        return (
            f"publisher {publisher} may sign components up to level {scope.max_level}; "
            f"this one declares level {comp.level}"
        )
    return None


def verification_status(check: Check, max_uses: int | None, now: dt.datetime) -> dict[str, Any]:
    """The `status.verification` block for a fresh check."""
    out: dict[str, Any] = {
        "state": check.state,
        "reason": check.reason,
        "message": check.message,
        "verifiedAt": format_ts(now),
    }
    if max_uses is not None and check.ok:
        out["usesLeft"] = max_uses
    return out


@dataclass(frozen=True)
class Use:
    """What using a component once requires: a re-check first or not, and the status after."""

    recheck: bool
    status: dict[str, Any] | None  # the new status.verification to write (None: no write)


def spend_use(
    verification: Mapping[str, Any] | None,
    max_uses: int | None,
) -> Use:
    """Spend one use of a Verified component, or ask for a re-check when none is left."""
    if max_uses is None:
        return Use(recheck=False, status=None)
    left = int((verification or {}).get("usesLeft", 0) or 0)
    if left <= 0:
        return Use(recheck=True, status=None)
    return Use(recheck=False, status={**dict(verification or {}), "usesLeft": left - 1})
