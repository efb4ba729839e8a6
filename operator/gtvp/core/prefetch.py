"""Pre-fetch before migration: a Lazy Box's target fetches its components first.

Before gtvp creates a migration for a Lazy Box (evacuation, drain or balancing), it looks at
the target member's `Node.status.images`. When the target lacks some of the box's
components, gtvp asks it to fetch them: a request in the target Node's `gtvp.io/prefetch`
annotation (a JSON object: the VMI `namespace/name` -> the image references, their bytes,
when it was asked and why). The migration is created once the Node lists every component,
or, after the bound (`timeout`), anyway: the target then fetches inside the migration, and
gtvp says so (Event `PrefetchTimedOut`). The operator remembers when it asked (the Node's
annotation is only the channel to the host: root on a host may rewrite it, see `believed`);
the request on the Node also says when, so a restarted operator goes on with the wait, and
no handler ever sleeps: each plan asks `decide` again.

Only the references of signed OSComponents the policy accepts (`accepted_images`: a
Verified signature check, an image pinned by the component's own digest) are ever asked
for: a box's status names digests, never arbitrary images, and a digest no accepted
component carries is never requested. Who may receive (Trusted, level) is the planners'
business: only their targets are asked. Pure.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from gtvp.core.components import Component
from gtvp.core.timestamps import format_ts, parse_ts

ANNOTATION = "gtvp.io/prefetch"
DEFAULT_TIMEOUT = dt.timedelta(seconds=120)
STALE_AFTER = dt.timedelta(minutes=10)
"""A request older than the bound plus this is dropped at the next write to its Node (its
VMI went elsewhere, was deleted or migrated long ago)."""
MAX_IMAGES = 64  # per request: a box has a handful of components
REASONS = ("evacuation", "drain", "balancing")

Part = tuple[str, int]
"""(digest, size in bytes) of one of a box's resolved components."""


@dataclass(frozen=True)
class Accepted:
    """A component image the policy accepts: its pinned reference and size."""

    image: str
    size: int


@dataclass(frozen=True)
class Request:
    """One pre-fetch request on a target Node, for one VMI."""

    images: tuple[str, ...]
    bytes: int  # of the components missing on the target when asked
    requested_at: dt.datetime
    reason: str  # evacuation | drain | balancing
    sizes: tuple[int, ...] = ()  # each image's size in bytes, as its OSComponent says

    def to_json(self) -> dict[str, Any]:
        return {
            "images": list(self.images),
            "sizes": list(self.sizes),
            "bytes": self.bytes,
            "requestedAt": format_ts(self.requested_at),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Decision:
    """What to do now about one planned migration.

    `action`: "migrate" (create the migration now), "request" (write `request` on the
    target's Node, migrate later) or "wait" (the request stands, the bound is not reached).
    `timed_out`: migrating although the target still lacks components (`message` says
    which); `waited`: how long the migration waited for the pre-fetch; `fetched_bytes`: the
    bytes the request asked for (0 without one)."""

    action: str
    message: str = ""
    request: Request | None = None
    timed_out: bool = False
    waited: dt.timedelta = dt.timedelta(0)
    fetched_bytes: int = 0


def accepted_images(
    components: Iterable[Component],
    verified: Mapping[str, bool],
    resolved: Collection[str] = (),
) -> dict[str, Accepted]:
    """digest -> the image the policy accepts for it: components whose signature check
    passed (`verified`, by object name) and whose image reference pins their digest; of
    several with one digest, the one the box `resolved` (object names). Any publisher may
    sign a component whose digest is another's (its image in its own registry): the
    target would be sent there, learning who moves where and slowing each move to the
    bound (found by a review)."""
    out: dict[str, Accepted] = {}
    for c in sorted(components, key=lambda c: c.object_name not in resolved):
        if not verified.get(c.object_name, False):
            continue
        if not c.digest.startswith("sha256:") or not c.image.endswith("@" + c.digest):
            continue
        out.setdefault(c.digest, Accepted(c.image, c.size))
    return out


def cached_bytes(parts: Sequence[Part], images: frozenset[str]) -> int:
    """Bytes of a box's components (digest, size) that a node's image cache holds (each
    digest once)."""
    return sum(size for digest, size in dict(parts).items() if digest in images)


def missing_parts(parts: Sequence[Part], images: frozenset[str]) -> dict[str, int]:
    """digest -> size of the box's components the node does not hold."""
    return {d: s for d, s in dict(parts).items() if d not in images}


def believed(asked: Request | None, on_node: Request | None, now: dt.datetime) -> Request | None:
    """The request a migration's wait is counted from: the one gtvp made (kept in the
    operator's memory), else the one on the target's Node (gtvp's before a restart of the
    operator, but root on a host may write a Node's annotations: a time after `now` is taken
    as `now`, so a request never moves its wait's start into the future, and a request
    removed from the Node does not start the wait again while the operator remembers it)."""
    if asked is not None:
        return asked
    if on_node is None:
        return None
    if on_node.requested_at > now:
        return replace(on_node, requested_at=now)
    return on_node


def decide(
    *,
    parts: Sequence[Part],
    node_images: frozenset[str],
    accepted: Mapping[str, Accepted],
    pending: Request | None,
    now: dt.datetime,
    reason: str,
    timeout: dt.timedelta = DEFAULT_TIMEOUT,
) -> Decision:
    """Whether to create a box's migration to a target now (module docstring).

    `parts`: the box's resolved components; `node_images`: the digests the target's Node
    lists; `pending`: the request already on the target for this VMI, if any."""
    if reason not in REASONS:
        raise ValueError(f"pre-fetch reason {reason!r} is not one of {', '.join(REASONS)}")
    lacking = missing_parts(parts, node_images)
    asked = pending.bytes if pending is not None else 0
    waited = max(now - pending.requested_at, dt.timedelta(0)) if pending else dt.timedelta(0)
    if not lacking:
        return Decision("migrate", "the target holds every component", None, False, waited, asked)
    wanted = sorted((accepted[d].image, accepted[d].size) for d in lacking if d in accepted)
    wanted = wanted[:MAX_IMAGES]
    if not wanted:  # nothing gtvp may ask for: the migration's own pull fetches it
        return Decision(
            "migrate",
            f"the target lacks {len(lacking)} component(s) that no accepted, signed "
            "component image pins; nothing to pre-fetch",
            None,
            False,
            waited,
            asked,
        )
    if pending is None:
        size = sum(lacking[d] for d in lacking if d in accepted)
        images = tuple(i for i, _ in wanted)
        request = Request(images, size, now, reason, tuple(n for _, n in wanted))
        return Decision("request", f"asked the target to fetch {len(wanted)} image(s)", request)
    if waited >= timeout:
        return Decision(
            "migrate",
            f"the target still lacks {len(lacking)} of the box's components after "
            f"{int(waited.total_seconds())} s (bound {int(timeout.total_seconds())} s): "
            "migrating anyway, the target fetches them during the migration",
            None,
            True,
            waited,
            asked,
        )
    return Decision("wait", f"waiting for the target to fetch {len(lacking)} component(s)")


# ----- the annotation ---------------------------------------------------------------------


MAX_COUNT = 2**53
"""Byte counts a float metric adds exactly; a host's larger one (or a negative one) made the
metrics counter raise in the middle of a pass."""


def _count(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n < MAX_COUNT


def parse_requests(value: Any) -> dict[str, Request]:
    """The requests in a Node's annotation value; unreadable entries are left out (an
    unreadable annotation reads as no request: gtvp asks again)."""
    try:
        raw = json.loads(str(value)) if value else {}
    except (ValueError, RecursionError):
        return {}
    if not isinstance(raw, dict):
        return {}
    out: dict[str, Request] = {}
    for vmi, entry in raw.items():
        if not isinstance(entry, dict):
            continue
        at = parse_ts(entry.get("requestedAt"))
        images = entry.get("images")
        size = entry.get("bytes", 0)
        sizes = entry.get("sizes") or []
        if at is None or not isinstance(images, list) or not _count(size):
            continue  # a host writes its own Node's annotations: a count a metric refuses
        if not isinstance(sizes, list) or not all(_count(n) for n in sizes):
            sizes = []
        out[str(vmi)] = Request(
            tuple(str(i) for i in images),
            size,
            at,
            str(entry.get("reason", "")),
            tuple(sizes) if len(sizes) == len(images) else (),
        )
    return out


def requests_on(node: Mapping[str, Any]) -> dict[str, Request]:
    annotations = (node.get("metadata") or {}).get("annotations") or {}
    return parse_requests(annotations.get(ANNOTATION))


def asked_elsewhere(nodes: Mapping[str, Mapping[str, Any]], key: str, target: str) -> list[str]:
    """The Nodes other than `target` that hold a request for `key` (a VMI, "ns/name"): asked
    by an earlier plan whose target is no longer chosen, they would fetch for nothing."""
    quoted = json.dumps(key)  # cheap test on the raw annotation before parsing it

    def holds(node: Mapping[str, Any]) -> bool:
        raw = ((node.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION)
        return isinstance(raw, str) and quoted in raw and key in requests_on(node)

    return sorted(n for n, node in nodes.items() if n != target and holds(node))


def render_requests(requests: Mapping[str, Request]) -> str | None:
    """The annotation value (None: remove the annotation)."""
    if not requests:
        return None
    return json.dumps({k: requests[k].to_json() for k in sorted(requests)}, sort_keys=True)


def updated(
    requests: Mapping[str, Request],
    *,
    now: dt.datetime,
    add: Mapping[str, Request] | None = None,
    drop: Iterable[str] = (),
    timeout: dt.timedelta = DEFAULT_TIMEOUT,
) -> dict[str, Request]:
    """The requests after adding `add`, dropping `drop` and the stale ones."""
    gone = set(drop)
    out = {
        k: r
        for k, r in requests.items()
        if k not in gone and now - r.requested_at < timeout + STALE_AFTER
    }
    out.update(add or {})
    return out
