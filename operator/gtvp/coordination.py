"""What this replica may write: the member shards and the leadership it holds right now.

Several gtvp-operator replicas share a pool. Every replica watches everything and answers
admission; writes are split: a member's challenge, verdict, Node labels and its share of the
migration bookkeeping come from the one replica holding the member's shard, and the
singleton loops (evacuation, Lazy Boxes, balancing, drains) run on the replica holding the
leader Lease. `handlers.leases` keeps the Leases; this module is the state every handler asks
("may I write for this member?") and the fencing rule it answers by: a replica counts as a
holder only while its own presence Lease was renewed less than the renew deadline ago, and
the others take over only after the Lease went unrenewed for the (longer) lease duration.

A `Coordination.sole()` replica (in-process tests, or one process alone) holds everything.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gtvp.core.shards import SHARDS, LeaseTiming, shard_of


@dataclass
class Coordination:
    """This replica's identity, its Leases' state, and the fencing check."""

    identity: str
    namespace: str = "gtvp-system"
    shards: int = SHARDS
    timing: LeaseTiming = field(default_factory=LeaseTiming)
    enabled: bool = True
    """False: the only replica there is (holds every shard and leads, no Leases)."""
    held: set[int] = field(default_factory=set)
    leading: bool = False
    renewed_at: float = -math.inf
    """Monotonic time the last successful presence renewal was *sent*."""
    stopping: bool = False
    """Shutting down: unready and writing nothing, its Leases about to be handed back."""
    refused: str | None = None
    """Why the API server refuses this replica's renewals (None: it does not)."""
    clock: Callable[[], float] = field(default_factory=lambda: _boot_clock)
    """Seconds on a clock that counts time the machine was suspended (CLOCK_BOOTTIME where
    there is one; CLOCK_MONOTONIC stands still then)."""
    wall: Callable[[], float] = time.time
    """The wall clock, asked too: in a guest its hypervisor paused, neither of the above
    moves, but the wall clock is set forward once the guest learns the time again."""
    renewed_wall: float = -math.inf
    """Wall-clock time the last successful presence renewal was sent (estimated)."""

    @classmethod
    def sole(cls) -> Coordination:
        return cls(identity="sole", enabled=False)

    def fenced(self) -> bool:
        """Its presence Lease may have expired for the others: no writes until renewed (by
        either clock: a replica whose machine was suspended or paused must not write on
        as holder and leader because its own clock did not see the time go by)."""
        deadline = self.timing.renew_deadline
        return self.enabled and (
            self.clock() - self.renewed_at >= deadline
            or self.wall() - self.renewed_wall >= deadline
        )

    def active(self) -> bool:
        return not self.stopping and not self.fenced()

    def holds_shard(self, shard: int) -> bool:
        return not self.enabled or (shard in self.held and self.active())

    def holds(self, member: str) -> bool:
        """May this replica write `member`'s challenge, verdict and Node labels now?"""
        return not self.enabled or self.holds_shard(shard_of(member, self.shards))

    def leads(self) -> bool:
        """May this replica run the singleton loops now?"""
        return not self.enabled or (self.leading and self.active())

    def ready(self) -> bool:
        """Ready to answer admission: renewing its presence and not shutting down."""
        return not self.enabled or self.active()

    def renewed(self, sent: float) -> bool:
        """Record a successful presence renewal sent at `sent`. When the one before it is
        older than the renew deadline, the others may have taken this replica's shards and
        leadership meanwhile: everything held is dropped (True) and claimed afresh."""
        first = self.renewed_at == -math.inf
        sent_wall = self.wall() - max(self.clock() - sent, 0.0)
        deadline = self.timing.renew_deadline
        lapsed = self.enabled and (
            sent - self.renewed_at >= deadline or sent_wall - self.renewed_wall >= deadline
        )
        if lapsed:
            self.held.clear()
            self.leading = False
        self.renewed_at = sent
        self.renewed_wall = sent_wall
        self.refused = None
        return lapsed and not first


def _boot_clock() -> float:
    """CLOCK_BOOTTIME (Linux: counts suspend), else CLOCK_MONOTONIC."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()
