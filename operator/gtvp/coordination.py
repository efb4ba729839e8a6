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
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def sole(cls) -> Coordination:
        return cls(identity="sole", enabled=False)

    def fenced(self) -> bool:
        """Its presence Lease may have expired for the others: no writes until renewed."""
        return self.enabled and self.clock() - self.renewed_at >= self.timing.renew_deadline

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
        lapsed = self.enabled and sent - self.renewed_at >= self.timing.renew_deadline
        if lapsed:
            self.held.clear()
            self.leading = False
        self.renewed_at = sent
        self.refused = None
        return lapsed and not first
