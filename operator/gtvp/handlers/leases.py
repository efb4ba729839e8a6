"""Keep this replica's Leases: presence, member shards, leadership; hand them back at shutdown.

Each round (every retry period) the replica lists gtvp's Leases, renews its presence Lease
`gtvp-replica-<identity>`, then takes free shards up to its fair share and hands back what
exceeds it (`core.shards.plan_claims`), and takes the leader Lease when it is free. A shard
or the leadership counts as held only after this replica wrote the Lease itself since its
presence was last continuous (a write at the resourceVersion it read, so of two replicas
going for one shard exactly one wins). Gaining shards re-judges their members at once;
gaining the leadership wakes the singleton loops. On SIGTERM the replica turns unready,
hands every Lease back at once, keeps answering admission for the shutdown grace, and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import re
import signal
from collections.abc import Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException

from gtvp import kube
from gtvp.coordination import Coordination
from gtvp.core.shards import LEADER, Claims, Observed, live, observe, plan_claims, shard_of
from gtvp.metrics import METRICS
from gtvp.runtime import Runtime

log = logging.getLogger("gtvp.leases")

PRESENCE, SHARD, LEAD = "replica", "shard", "leader"


def lease_name(kind: str, key: str | int = "") -> str:
    """`gtvp-replica-<identity>`, `gtvp-shard-07`, `gtvp-leader`."""
    if kind == SHARD:
        return f"gtvp-shard-{int(key):02d}"
    if kind == LEAD:
        return "gtvp-leader"
    return "gtvp-replica-" + re.sub(r"[^a-z0-9.-]", "-", str(key).lower())[:200]


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _body(co: Coordination, kind: str, name: str, holder: str | None) -> dict[str, Any]:
    labels = {kube.LEASE_LABEL: kind, "app.kubernetes.io/part-of": "gtvp"}
    spec: dict[str, Any] = {"leaseDurationSeconds": math.ceil(co.timing.duration)}
    if holder:
        spec.update(holderIdentity=holder, renewTime=_now(), acquireTime=_now())
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": co.namespace, "labels": labels},
        "spec": spec,
    }


def _holder(lease: Mapping[str, Any]) -> str:
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


class LeaseKeeper:
    """The Lease rounds of one replica (state between rounds: what it saw, and when)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.co = rt.coordination
        self.seen: dict[str, Observed] = {}
        self.said: str | None = None
        self.busy = asyncio.Lock()
        """One round at a time; the hand-back waits for a round in flight."""

    # ----- one round ------------------------------------------------------------------
    async def _leases(self) -> dict[str, dict[str, Any]]:
        """gtvp's Leases in the lease namespace, by name."""
        items = await asyncio.to_thread(kube.list_leases, self.rt.clients, self.co.namespace)
        return {str(item["metadata"]["name"]): item for item in items}

    async def round(self) -> None:
        async with self.busy:
            if not self.co.stopping:
                await self._round()
            METRICS.set_coordination(len(self.co.held), self.co.leads())

    async def _round(self) -> None:
        co = self.co
        try:
            listed = co.clock()
            leases = await self._leases()
            sent = co.clock()
            if not await self._renew_presence(leases.get(lease_name(PRESENCE, co.identity))):
                return
        except Exception as exc:  # noqa: BLE001 - any failure: say so, write nothing, retry
            self._refused(exc)
            return
        if co.renewed(sent):
            log.warning("presence was not renewed in time: shards and leadership claimed afresh")
        if self.said is not None:
            log.info("the API server accepts this replica's renewals again")
            self.said = None
        if co.stopping:
            return
        alive = self._observe(leases, listed=listed, received=sent)
        await self._claim_shards(leases, alive)
        await self._claim_leadership(leases.get(lease_name(LEAD)), alive)
        if co.leads():
            await self._collect_presence(leases)

    async def _renew_presence(self, lease: Mapping[str, Any] | None) -> bool:
        co, c = self.co, self.rt.clients
        body = _body(co, PRESENCE, lease_name(PRESENCE, co.identity), co.identity)
        if lease is not None:
            body["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
            if await asyncio.to_thread(kube.replace_lease, c, co.namespace, body) is not None:
                return True
            body["metadata"].pop("resourceVersion")
        return await asyncio.to_thread(kube.create_lease, c, co.namespace, body) is not None

    def _refused(self, exc: Exception) -> None:
        """Renewal failed: after the renew deadline this replica writes nothing (fenced)
        and reports unready; it keeps trying, and rejoins when the API server accepts it."""
        status = getattr(exc, "status", None)
        if isinstance(exc, ApiException) and status in (401, 403):
            why = f"the API server refuses this replica's credentials ({status} {exc.reason})"
        else:
            why = f"renewing its Lease failed ({getattr(exc, 'reason', None) or exc})"
        self.co.refused = why
        METRICS.lease_renewal_failed()
        if why != self.said:
            log.warning(
                "%s: stepping down within %gs (no writes, unready) until a renewal succeeds",
                why,
                self.co.timing.renew_deadline,
            )
            self.said = why

    def _observe(
        self, leases: Mapping[str, Mapping[str, Any]], *, listed: float, received: float
    ) -> set[str]:
        """Record when each presence Lease last changed; the live replicas (self included).
        The list shows the Leases as they were between `listed` (the request sent) and
        `received` (its answer): a change counts from `received`, and a Lease's age is taken
        at `listed`, not after this replica's own renewal (which may take seconds): a holder
        that renewed just after the list is not found dead by the time that list grew old."""
        alive = {self.co.identity}
        for name, lease in leases.items():
            if (lease["metadata"].get("labels") or {}).get(kube.LEASE_LABEL) != PRESENCE:
                continue
            spec = lease.get("spec") or {}
            holder = _holder(lease)
            version = str(spec.get("renewTime"))
            self.seen[name] = observe(self.seen.get(name), holder, version, received)
            if live(self.seen[name], listed, self.co.timing.duration):
                alive.add(holder)
        return alive

    def _effective(
        self, lease: Mapping[str, Any] | None, alive: set[str], held: bool
    ) -> str | None:
        """Who writes under this Lease: None when free (no holder, a dead holder, or this
        replica named but not confirmed in its current tenure)."""
        holder = _holder(lease) if lease is not None else ""
        if holder == self.co.identity:
            return holder if held else None
        return holder if holder in alive else None

    # ----- shards and leadership -----------------------------------------------------
    async def _claim_shards(self, leases: Mapping[str, Mapping[str, Any]], alive: set[str]) -> None:
        co = self.co
        named = {
            s
            for s in range(co.shards)
            if _holder(leases.get(lease_name(SHARD, s)) or {}) == co.identity
        }
        lost = co.held - named
        if lost:
            co.held -= lost
            self._lost(lost)
        holders = {
            s: self._effective(leases.get(lease_name(SHARD, s)), alive, s in co.held)
            for s in range(co.shards)
        }
        claims: Claims = plan_claims(co.identity, sorted(alive), holders, co.shards)
        co.held -= set(claims.release)  # stop writing before anyone can take them
        results = await asyncio.gather(
            *(self._write(leases, SHARD, s, None) for s in claims.release),
            *(self._write(leases, SHARD, s, co.identity) for s in claims.take),
        )
        taken = {s for s, ok in zip(claims.take, results[len(claims.release) :], strict=True) if ok}
        if taken and not co.stopping and co.active():
            co.held |= taken
            self._gained(taken)
        if claims.release:
            log.info("handed back shards %s (fair share)", sorted(claims.release))

    async def _claim_leadership(self, lease: Mapping[str, Any] | None, alive: set[str]) -> None:
        co = self.co
        if co.leading and _holder(lease or {}) != co.identity:
            co.leading = False
            log.warning("leadership lost to %s", _holder(lease or {}) or "nobody")
            METRICS.boxes.clear()
        if co.leading or self._effective(lease, alive, co.leading) is not None:
            return
        if await self._write({lease_name(LEAD): lease} if lease else {}, LEAD, LEADER, co.identity):
            co.leading = True
            log.info("leading: evacuation, Lazy Boxes, balancing and drains run here")
            self._woken_as_leader()

    async def _write(
        self,
        leases: Mapping[str, Mapping[str, Any] | None],
        kind: str,
        key: int,
        holder: str | None,
    ) -> bool:
        """Name `holder` (None: nobody) in a shard or the leader Lease, at the version read."""
        name = lease_name(kind, key)
        body = _body(self.co, kind, name, holder)
        if kind == SHARD:
            body["metadata"]["labels"]["gtvp.io/shard"] = f"{key:02d}"
        current = leases.get(name)
        c, ns = self.rt.clients, self.co.namespace
        try:
            if current is None:
                return await asyncio.to_thread(kube.create_lease, c, ns, body) is not None
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            moves = int((current.get("spec") or {}).get("leaseTransitions") or 0)
            body["spec"]["leaseTransitions"] = moves + (_holder(current) != (holder or ""))
            return await asyncio.to_thread(kube.replace_lease, c, ns, body) is not None
        except ApiException as exc:
            log.warning("writing Lease %s failed: %s %s", name, exc.status, exc.reason)
            return False

    async def _collect_presence(self, leases: Mapping[str, Mapping[str, Any]]) -> None:
        """The leader deletes presence Leases dead for three lease durations (replicas that
        are gone for good: pod names change with every rollout)."""
        now, co = self.co.clock(), self.co
        for name, seen in list(self.seen.items()):
            lease = leases.get(name)
            if lease is None:
                self.seen.pop(name, None)
            elif seen.holder != co.identity and now - seen.since > 3 * co.timing.duration:
                with contextlib.suppress(ApiException):
                    rv = str(lease["metadata"]["resourceVersion"])
                    await asyncio.to_thread(
                        kube.delete_lease, self.rt.clients, co.namespace, name, rv
                    )

    # ----- what changes when shards or leadership move -------------------------------
    def _members_of(self, shards: set[int]) -> list[str]:
        return [m for m in self.rt.view.members if shard_of(m, self.co.shards) in shards]

    def _gained(self, shards: set[int]) -> None:
        """Look at every member and Node of the shards taken now: also a Node whose Member
        went while nobody held its shard (it must not keep the trust labels it had)."""
        log.info("took shards %s", sorted(shards))
        view = self.rt.view
        for name in sorted(set(view.members) | set(view.nodes)):
            if shard_of(name, self.co.shards) in shards:
                self.rt.schedule.schedule(name, dt.timedelta(0))

    def _lost(self, shards: set[int]) -> None:
        log.warning("shards %s are held by another replica now", sorted(shards))
        for name in self._members_of(shards):
            METRICS.forget_member(name)

    def _woken_as_leader(self) -> None:
        rt = self.rt
        rt.touch_boxes()
        rt.drains.wake.set()
        hosts = {n for nodes in list(rt.view.nodes_of.values()) for n in nodes}  # pods' too
        for name in hosts & (set(rt.view.members) | set(rt.view.nodes)):
            rt.schedule.schedule(name, dt.timedelta(0))  # evacuations owed while nobody led

    # ----- shutdown ---------------------------------------------------------------------
    async def hand_back(self) -> None:
        """Stop writing, then give every Lease back so others take over at once."""
        co = self.co
        co.stopping = True
        async with self.busy:
            await self._hand_back()
        METRICS.set_coordination(0, False)

    async def _hand_back(self) -> None:
        co = self.co
        held, leading = set(co.held), co.leading
        co.held.clear()
        co.leading = False
        try:
            leases = await self._leases()
            named = {n: x for n, x in leases.items() if _holder(x) == co.identity}
            await asyncio.gather(
                *(
                    self._write(named, SHARD, s, None)
                    for s in held
                    if lease_name(SHARD, s) in named
                ),
                *(
                    [self._write(named, LEAD, LEADER, None)]
                    if leading and lease_name(LEAD) in named
                    else []
                ),
            )
            mine = named.get(lease_name(PRESENCE, co.identity))
            if mine is not None:
                rv = str(mine["metadata"]["resourceVersion"])
                name = lease_name(PRESENCE, co.identity)
                await asyncio.to_thread(kube.delete_lease, self.rt.clients, co.namespace, name, rv)
            log.info("handed back %d shards%s", len(held), " and the leadership" if leading else "")
        except Exception as exc:  # noqa: BLE001 - the Leases then expire on their own
            log.warning("handing the Leases back failed (%s): they expire on their own", exc)


async def lease_loop(rt: Runtime) -> None:
    """Rounds every retry period until the operator stops (a sole replica has no Leases)."""
    co = rt.coordination
    if not co.enabled:
        return
    keeper = LeaseKeeper(rt)
    rt.lease_keeper = keeper
    while not rt.stop.is_set() and not co.stopping:
        try:
            await keeper.round()
        except Exception:  # one bad round must not end coordination
            log.exception("lease round failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(rt.stop.wait(), timeout=co.timing.retry_period)


def install_graceful_stop(rt: Runtime, stop_flag: asyncio.Event) -> None:
    """SIGTERM/SIGINT: unready and writing nothing at once, every Lease handed back (the
    others take over in their next round), admission still answered for the shutdown grace
    (a Service stops sending requests meanwhile), then kopf stops. A second signal stops
    at once."""
    loop = asyncio.get_running_loop()

    async def drain() -> None:
        rt.coordination.stopping = True
        keeper = rt.lease_keeper
        if isinstance(keeper, LeaseKeeper):
            await keeper.hand_back()
        log.info(
            "stopping: unready, Leases handed back; answering admission for %gs more",
            rt.settings.shutdown_grace,
        )
        await asyncio.sleep(rt.settings.shutdown_grace)
        stop_flag.set()

    def on_signal() -> None:
        if rt.coordination.stopping:
            stop_flag.set()
            return
        rt.tasks.append(asyncio.create_task(drain()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
