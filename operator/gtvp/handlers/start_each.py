"""Start the migrations a plan asks for, one failure holding back none of the others.

Evacuations, drains and balancing each start several migrations per pass; one whose
create fails (an API error, a timeout, a name taken meanwhile) is logged and planned again
on the next pass, while the rest of the pass still starts.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

log = logging.getLogger("gtvp.migrations")

T = TypeVar("T")


async def start_each(
    planned: Iterable[T], start: Callable[[T], Awaitable[None]], what: Callable[[T], str]
) -> None:
    """`start` each of `planned`; one that raises is logged (`what` names it) and skipped."""
    for item in planned:
        try:
            await start(item)
        except Exception:  # one migration must not hold back the others' in this pass
            log.exception("starting %s failed; planned again on the next pass", what(item))
