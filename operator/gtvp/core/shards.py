"""Which replica writes for which member: shards by a stable hash, shared fairly through Leases.

Members are split into a fixed number of shards by a hash of their name that every replica
computes alike (no state, no coordination). Each shard has at most one writer: the replica
its Lease names, for as long as that replica's own presence Lease stays live. This module is
the pure part: the shard of a name, when a Lease counts as expired (by *local observation*,
never by comparing clocks), and which shards a replica should take or hand back so that no
replica holds more than its fair share. `gtvp.coordination` does the Lease I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SHARDS = 64
"""Default shard count: enough to spread over a few replicas evenly, few Leases to watch."""

LEADER = -1
"""The singleton loops' Lease, handled like one more shard (never handed over for balance)."""


def shard_of(name: str, shards: int = SHARDS) -> int:
    """The shard of a member: sha256 of its name, first 8 bytes big-endian, modulo `shards`."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


@dataclass(frozen=True)
class LeaseTiming:
    """How long a Lease lasts unrenewed, how soon its holder must have renewed it to keep
    writing, and how often it renews. Fencing needs renew_deadline < duration: a holder
    stops writing `duration - renew_deadline` before anyone may take over."""

    duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.duration:
            raise ValueError(
                "lease timing must satisfy 0 < retry period < renew deadline < lease duration "
                f"(got {self.retry_period:g} < {self.renew_deadline:g} < {self.duration:g})"
            )

    def failover_bound(self) -> float:
        """Longest time a dead holder's members wait for another writer: a survivor sees the
        last renewal up to one retry period late, waits `duration`, and takes over in its
        next round (one more retry period)."""
        return self.duration + 2 * self.retry_period


@dataclass(frozen=True)
class Observed:
    """A Lease record as one replica saw it: who holds it, the record's version (holder and
    renew time), and the local monotonic time this version was first seen."""

    holder: str
    version: str
    since: float


def observe(previous: Observed | None, holder: str, version: str, now: float) -> Observed:
    """The observation after reading a Lease at `now`: its clock restarts when it changed."""
    if previous is not None and previous.holder == holder and previous.version == version:
        return previous
    return Observed(holder, version, now)


def live(record: Observed | None, now: float, duration: float) -> bool:
    """A presence Lease is live until it has gone unchanged for `duration` here."""
    return record is not None and bool(record.holder) and now - record.since <= duration


def fair_share(shards: int, replicas: int) -> int:
    """The most shards one replica may hold: the shards over the live replicas, rounded up."""
    return math.ceil(shards / max(replicas, 1))


@dataclass(frozen=True)
class Claims:
    """What a replica does with the shard Leases this round."""

    take: tuple[int, ...]
    release: tuple[int, ...]


def _preference(me: str, shard: int) -> bytes:
    """Each replica's own order over the shards (rendezvous hashing): replicas starting
    together go for different free shards instead of racing for shard 0."""
    return hashlib.sha256(f"{me}/{shard}".encode()).digest()


def plan_claims(
    me: str, replicas: Sequence[str], holders: Mapping[int, str | None], shards: int
) -> Claims:
    """Shards `me` takes (free ones, up to its fair share) and hands back (beyond it).

    `replicas`: the live replicas (presence Leases), `me` counted even when absent;
    `holders`: shard -> its writer, None when free (no holder, or one whose presence
    Lease is no longer live). A new replica gets shards because the others hand back what
    exceeds the new, smaller share; a dead one's shards come free when its presence expires.
    """
    share = fair_share(shards, len(set(replicas) | {me}))
    mine = sorted((s for s, h in holders.items() if h == me), key=lambda s: _preference(me, s))
    if len(mine) > share:
        return Claims(take=(), release=tuple(sorted(mine[share:])))
    free = [s for s in range(shards) if holders.get(s) is None]
    free.sort(key=lambda s: _preference(me, s))
    return Claims(take=tuple(sorted(free[: share - len(mine)])), release=())
