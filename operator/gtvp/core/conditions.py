"""Kubernetes-style status conditions: one entry per type, transition time kept until a flip."""

from __future__ import annotations

import datetime as dt
from typing import Any

from gtvp.core.timestamps import format_ts


def merge_conditions(
    previous: list[dict[str, Any]], now: dt.datetime, updates: dict[str, tuple[bool, str, str]]
) -> list[dict[str, Any]]:
    """Standard conditions; lastTransitionTime moves only when status flips."""
    old = {c.get("type"): c for c in previous if isinstance(c, dict)}
    out = []
    for ctype, (ok, reason, message) in updates.items():
        status = "True" if ok else "False"
        prev = old.get(ctype)
        changed = prev is None or prev.get("status") != status
        out.append(
            {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message[:2000],
                "lastTransitionTime": (
                    format_ts(now) if changed or prev is None else prev.get("lastTransitionTime")
                ),
            }
        )
    return out
