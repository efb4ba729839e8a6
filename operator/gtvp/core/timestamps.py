"""RFC 3339 timestamps as the API server stores them (`2026-01-01T00:00:00Z`).

One place for writing and reading the times in Member status, shared by the operator's core,
`gtvp status` and the agent.
"""

from __future__ import annotations

import datetime as dt
from typing import Any


def format_ts(t: dt.datetime) -> str:
    """A timestamp in UTC, to the second, with a Z."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_ts(s: Any) -> dt.datetime | None:
    """The time in a status field, in UTC, or None when it is missing or not a timestamp (one
    without a time zone too: it could not be compared with an aware time; one that cannot
    be told in UTC, at the calendar's ends: `9999-12-31T23:59:59-14:00`, which a host could
    write in its own annotations, overflowed later when turned to UTC, an exception in the
    middle of a pass)."""
    if not isinstance(s, str):
        return None
    try:
        got = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
        if got.tzinfo is None:
            return None
        return got.astimezone(dt.UTC)
    except (ValueError, OverflowError):
        return None


def human_duration(d: dt.timedelta) -> str:
    """A duration as a person writes it in a policy: 45s, 10m, 1h30m."""
    secs = int(d.total_seconds())
    h, rest = divmod(secs, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{n}{u}" for n, u in ((h, "h"), (m, "m"), (s, "s")) if n) or "0s"
