"""What one gtvp-operator process runs with: settings, API clients, the cluster view, and the
memory each handler concern keeps between events (due times, caches, what was said).

`gtvp.operator_main` creates one `Runtime` and hands it to every handler through kopf's
`memo` (`memo.runtime`: kopf copies the memo per object, shallowly, so all share it); a test
creates its own and calls the handlers directly. Nothing here decides or does I/O.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import heapq
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gtvp.cluster_view import ClusterView, Key
from gtvp.coordination import Coordination
from gtvp.core.component_checks import Check
from gtvp.core.components import Component
from gtvp.core.keyrelease import Settings as KeyReleaseSettings
from gtvp.core.policy_status import Accepted
from gtvp.core.prefetch import Request as PrefetchRequest
from gtvp.core.resolve import Unresolvable
from gtvp.core.shards import SHARDS, LeaseTiming
from gtvp.verdict_keys import Issuer

if TYPE_CHECKING:  # importing kubernetes fixes its default kubeconfig path (gtvp-operator
    # sets KUBECONFIG from --kubeconfig first, then imports the client)
    from gtvp.kube import Clients


@dataclass(frozen=True)
class OperatorSettings:
    """How this operator runs (`gtvp-operator`'s options)."""

    policy_name: str = "default"
    """The SecurityPolicy the pool runs under."""
    create_members: bool = True
    """Create a Member for every Node that has none."""
    default_identity: int = 1
    """Identity (level ceiling) of the Members created for new Nodes."""
    kubeconfig: str | None = None
    """The kubeconfig to use (None: in-cluster service account)."""
    metrics_port: int = 9090
    """Port of /metrics, /healthz and /readyz (0: not served)."""
    metrics_address: str = "127.0.0.1"
    webhook_port: int = 9443
    """Port of the admission webhooks (0: not served)."""
    webhook_address: str = "127.0.0.1"
    webhook_cert: str | None = None
    """Serving certificate (PEM) the API server trusts."""
    webhook_key: str | None = None
    webhook_client_ca: str | None = None
    """CA (PEM) whose certificates alone may open a connection to the webhooks (None: any)."""
    webhook_client_names: tuple[str, ...] = ()
    """Common names of the client certificates whose reviews are answered (empty: any)."""
    log_level: str = "INFO"
    identity: str = "gtvp-operator"
    """This replica's name in the Leases (the pod's name in a cluster)."""
    lease_namespace: str = "gtvp-system"
    shards: int = SHARDS
    lease_timing: LeaseTiming = field(default_factory=LeaseTiming)
    shutdown_grace: float = 5.0
    """After SIGTERM: seconds of answering admission while unready, before stopping."""
    coordinate: bool = True
    """Share the pool with other replicas through Leases (False: the only replica)."""


@dataclass
class RecheckSchedule:
    """When to look at each member again: one heap for the whole pool, not a timer each."""

    due: list[tuple[float, str]] = field(default_factory=list)
    next_due: dict[str, float] = field(default_factory=dict)
    wakeup: asyncio.Event | None = None
    heartbeat: float = 0.0
    """Monotonic time of the recheck loop's last turn (/healthz: the event loop is alive)."""

    def schedule(self, name: str, after: dt.timedelta) -> None:
        """Look at `name` again after `after`; replaces any earlier plan for it."""
        at = time.monotonic() + max(after.total_seconds(), 0.05)
        self.next_due[name] = at
        heapq.heappush(self.due, (at, name))
        if self.wakeup is not None:
            self.wakeup.set()

    def schedule_by(self, name: str, after: dt.timedelta) -> None:
        """Look at `name` again no later than after `after`: an earlier plan stands."""
        at = time.monotonic() + max(after.total_seconds(), 0.05)
        if self.next_due.get(name, at + 1) > at:
            self.schedule(name, after)

    def pop_due(self, now: float) -> set[str]:
        names = set()
        while self.due and self.due[0][0] <= now:
            at, name = heapq.heappop(self.due)
            if self.next_due.get(name) == at:  # stale plans were replaced
                del self.next_due[name]
                names.add(name)
        return names

    def forget(self, name: str) -> None:
        self.next_due.pop(name, None)


@dataclass
class AttestationMemory:
    """Per member: the nonces already answered (a body older than our answer is skipped)
    and a lock (one decision at a time)."""

    answered: dict[str, collections.deque[bytes]] = field(default_factory=dict)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    spend_locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())

    def spend_lock(self, name: str) -> asyncio.Lock:
        """One spend of the member's uses at a time in this replica (never held while
        waiting for another lock: a judgement holding `lock` may spend)."""
        return self.spend_locks.setdefault(name, asyncio.Lock())

    def seen(self, name: str) -> collections.deque[bytes]:
        return self.answered.setdefault(name, collections.deque(maxlen=32))


@dataclass
class EvacuationMemory:
    judged: set[str] = field(default_factory=set)
    """Migration uids whose target was checked (`uid`) or whose success was counted
    (`uid/done`)."""
    waiting: dict[str, list[str]] = field(default_factory=dict)
    """Topic (a member, or `<ns>/<box>` for a box evacuated for its own evidence; with
    `#failed`, its VMIs whose migrations kept failing) -> VMIs no target can take yet,
    logged once per change; dropped when nothing waits under the topic any more."""
    retargeted: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    """(namespace, VMI) -> target -> when (monotonic) a pinned migration of it to that
    target was cancelled (`core.evacuation.retargeted_from`)."""
    tenants_yield_until: float = 0.0
    """Until when (monotonic) boxes start no move for their own evidence: an evacuation of a
    member that lost trust was held back by the limits (`core.preemption`)."""


@dataclass
class BoxMemory:
    """The box loop's work list and its caches (keyed by resourceVersion, so each object is
    parsed once per change)."""

    checks: dict[str, Check] = field(default_factory=dict)
    decided_node: dict[Key, str] = field(default_factory=dict)
    dirty: set[Key] = field(default_factory=set)
    wakeup: asyncio.Event | None = None
    parsed: dict[str, tuple[str, Component | None]] = field(default_factory=dict)
    catalogue_version: int = 0
    catalogue_cache: tuple[int, list[Component]] = (-1, [])
    digest_index: tuple[int, dict[str, list[Component]]] = (-1, {})
    """The readable components by digest, as of a catalogue version (`lazyboxes.unvouched`)."""
    host_cache: dict[str, tuple[tuple[str, str, str], Any]] = field(default_factory=dict)
    host_memo: dict[str, tuple[Any, bool, int, int, Any]] = field(default_factory=dict)
    """Per member: the Host last built (reused while its inputs are the same objects)."""
    request_cache: dict[Key, tuple[str, tuple[int, int]]] = field(default_factory=dict)
    pool_cache: tuple[dt.datetime | None, frozenset[str]] = (None, frozenset())
    resolutions: dict[
        tuple[str, int, frozenset[str], bool, frozenset[str]], list[Component] | Unresolvable
    ] = field(default_factory=dict)
    plan_lock: threading.Lock = field(default_factory=threading.Lock)
    unspent: collections.Counter[str] = field(default_factory=collections.Counter)
    """Placements per member whose verdict use is not written yet (spent per batch)."""


@dataclass
class DrainMemory:
    marked: set[Key] = field(default_factory=set)
    """VMIs with status.evacuationNodeName."""
    said: dict[Key, str] = field(default_factory=dict)
    """Waiting reason last reported, per VMI."""
    finished: set[str] = field(default_factory=set)
    """Drain migration uids counted as done."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class BalanceMemory:
    over_since: dict[str, dt.datetime] = field(default_factory=dict)
    said: dict[str, str] = field(default_factory=dict)
    """Source -> why it could not be relieved (logged once)."""


@dataclass
class Runtime:
    """One operator process: settings, clients, the view, and each concern's memory."""

    settings: OperatorSettings
    clients: Clients
    view: ClusterView = field(default_factory=ClusterView)
    schedule: RecheckSchedule = field(default_factory=RecheckSchedule)
    attestation: AttestationMemory = field(default_factory=AttestationMemory)
    evacuation: EvacuationMemory = field(default_factory=EvacuationMemory)
    accepted_policies: dict[str, tuple[str, Accepted]] = field(default_factory=dict)
    """Policy name -> (uid, the last generation this process accepted)."""
    spent_starts: set[str] = field(default_factory=set)
    """VMI uids whose start spent a verdict use (once per VMI)."""
    unheld_starts: dict[str, tuple[str, float]] = field(default_factory=dict)
    """VMI starts seen while this replica did not hold their member's shard: uid -> (node,
    when, monotonic); spent by this replica if it takes the shard soon after."""
    failed_spends: dict[str, str] = field(default_factory=dict)
    """Uses this replica failed to spend (a start's or a migration's: key -> member): kept
    until spent at the member's next look, whatever their age."""
    boxes: BoxMemory = field(default_factory=BoxMemory)
    drains: DrainMemory = field(default_factory=DrainMemory)
    balance: BalanceMemory = field(default_factory=BalanceMemory)
    prefetch_asked: dict[tuple[str, str], PrefetchRequest] = field(default_factory=dict)
    """(VMI "ns/name", target Node) -> the pre-fetch request gtvp made: its wait counts from
    here, whatever a host writes in the Node's annotation (`core.prefetch.believed`)."""
    webhook_server: Any = None
    """kopf's WebhookServer when the admission webhooks are served."""
    coordination: Coordination = field(default_factory=Coordination.sole)
    """Which members' writes and which singleton loops are this replica's now."""
    verdict_issuer: Issuer | None = None
    """Signs the verdict tokens (`gtvp.verdict_keys`); None: no tokens are issued."""
    key_release: KeyReleaseSettings | None = None
    """Where box VMs fetch the Secrets their box names (docs/keyrelease.md); None: not
    served, and a box that names Secrets fails instead of booting without them."""
    key_release_armed: set[tuple[str, str, str]] = field(default_factory=set)
    """Gated VMs (namespace, name, uid) whose key-release credential Secret exists."""
    lease_keeper: Any = None
    """`handlers.leases.LeaseKeeper` while Leases are kept."""
    stop_flag: asyncio.Event | None = None
    """Set to stop kopf (the graceful SIGTERM path sets it after handing Leases back)."""
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.view.policy is None and self.view.policy_error is None:
            self.view.policy_error = f"SecurityPolicy {self.settings.policy_name!r} not seen yet"

    def enforced_spec(self) -> Mapping[str, Any] | None:
        """The spec of the SecurityPolicy in force, as accepted (None: none is)."""
        kept = self.accepted_policies.get(self.settings.policy_name)
        if kept is None or self.view.policy is None:
            return None
        return kept[1].spec

    def touch_boxes(self, *keys: Key) -> None:
        """Boxes to reconcile again (none named: every box)."""
        self.boxes.dirty.update(keys or self.view.boxes.keys())
        if self.boxes.wakeup is not None:
            self.boxes.wakeup.set()


def runtime_of(memo: Mapping[str, Any]) -> Runtime:
    """The runtime a handler was handed (kopf's `memo`, or a test's)."""
    rt = memo.get("runtime")
    if not isinstance(rt, Runtime):
        raise TypeError("the handler's memo carries no gtvp Runtime (memo.runtime)")
    return rt
