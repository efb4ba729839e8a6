"""Member attestation: run the pure `attestation_step` on each change and when a verdict is due.

The kopf event handler feeds every Member change here; a single background loop re-checks
members whose verdict expires or whose next look is due (one loop for the whole pool rather
than a timer per member). Each member is handled under its own lock, and a body older
than our last answer (its nonce already consumed) is skipped, so a verdict is never judged
twice. The only writes: one status merge patch per decision, and an Event on transitions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import heapq
import logging
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from gtvp import kube
from gtvp.core.attestation import ENTROPY_BYTES, Step, attestation_step
from gtvp.core.policy import Policy
from gtvp.core.trust import node_patch
from gtvp.handlers import kubevirt
from gtvp.metrics import METRICS

log = logging.getLogger("gtvp.members")

OPERATOR_FIELDS = ("phase", "level", "trust", "challenge", "effectivePolicy", "conditions")


@dataclass
class PoolState:
    """What the operator keeps in memory: latest bodies, policy, node labels, due times."""

    clients: kube.Clients | None = None
    policy_name: str = "default"
    policy: Policy | None = None
    policy_error: str | None = None
    node_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)
    answered: dict[str, collections.deque[bytes]] = field(default_factory=dict)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    due: list[tuple[float, str]] = field(default_factory=list)
    next_due: dict[str, float] = field(default_factory=dict)
    wakeup: asyncio.Event | None = None
    create_members: bool = True
    default_identity: int = 1
    webhook_server: Any = None
    ek_of: dict[str, str] = field(default_factory=dict)
    ek_holders: dict[str, set[str]] = field(default_factory=dict)
    # True once the members, VMIs and migrations have been listed at start-up: until then
    # the webhooks refuse what needs a verdict and /readyz says not ready.
    loaded: bool = False
    # monotonic time of the recheck loop's last turn (/healthz: the event loop is alive)
    heartbeat: float = 0.0

    def lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())

    def schedule(self, name: str, after: dt.timedelta) -> None:
        """Look at `name` again after `after`; replaces any earlier plan for it."""
        at = time.monotonic() + max(after.total_seconds(), 0.05)
        self.next_due[name] = at
        heapq.heappush(self.due, (at, name))
        if self.wakeup is not None:
            self.wakeup.set()

    def pop_due(self, now: float) -> set[str]:
        names = set()
        while self.due and self.due[0][0] <= now:
            at, name = heapq.heappop(self.due)
            if self.next_due.get(name) == at:  # stale plans were replaced
                del self.next_due[name]
                names.add(name)
        return names


STATE = PoolState()


def set_policy(name: str, policy: Policy | None, error: str | None = None) -> bool:
    """Run the pool under `policy` if `name` is the policy this operator enforces.

    `policy` is the generation `gtvp.handlers.policies` chose (the current one, or the last
    accepted one while the current is unusable); None, with `error` saying why, when no
    usable generation is known: every member turns Untrusted (NoPolicy), fail closed.
    True when that changed what the pool runs under (every member is looked at again).
    """
    if name != STATE.policy_name:
        return False
    error = None if policy is not None else (error or f"SecurityPolicy {name!r} is unusable")
    if policy == STATE.policy and error == STATE.policy_error:
        return False
    STATE.policy, STATE.policy_error = policy, error
    if policy is not None:
        log.info(
            "SecurityPolicy %s in force: levels %s, PCRs %s:%s",
            name,
            [lv.level for lv in policy.levels],
            policy.pcr_bank,
            list(policy.pcrs),
        )
    else:
        log.error("no usable SecurityPolicy: %s; every member is Untrusted", error)
    for member in list(STATE.bodies):
        STATE.schedule(member, dt.timedelta(0))
    return True


def _no_policy_status(body: Mapping[str, Any]) -> dict[str, Any]:
    """Without a usable policy nothing can be verified: every member is Untrusted."""
    status = dict(body.get("status") or {})
    trust = dict(status.get("trust") or {})
    message = f"no usable SecurityPolicy: {STATE.policy_error}"
    trust.update(verdict="Untrusted", reason="NoPolicy", message=message[:2000], usesLeft=0)
    trust.pop("expiresAt", None)
    return {
        "phase": "Untrusted",
        "level": 0,
        "trust": trust,
        "challenge": status.get("challenge") or {},
    }


async def reconcile(name: str) -> None:
    """Decide and write the next status of one member (no-op when nothing changes)."""
    c = STATE.clients
    if c is None:
        return
    async with STATE.lock(name):
        body = STATE.bodies.get(name)
        if body is None:
            return
        status = body.get("status") or {}
        challenge = status.get("challenge") or {}
        seen = STATE.answered.setdefault(name, collections.deque(maxlen=32))
        nonce = challenge.get("nonce")
        if nonce and bytes.fromhex(str(nonce)) in seen:
            return  # a body from before our last answer; the newer one is on its way
        step: Step | None = None
        if STATE.policy is None:
            new = _no_policy_status(body)
        else:
            started = time.perf_counter()
            step = attestation_step(
                spec=body.get("spec") or {},
                status=status,
                labels=STATE.node_labels.get(
                    name, (body.get("metadata") or {}).get("labels") or {}
                ),
                policy=STATE.policy,
                now=dt.datetime.now(dt.UTC),
                entropy=secrets.token_bytes(ENTROPY_BYTES),
                answered_nonces=frozenset(seen),
                readmit=((body.get("metadata") or {}).get("annotations") or {}).get(
                    "gtvp.io/readmit"
                ),
                ek_holders=OtherHolders(name),
            )
            if step.outcome is not None:
                METRICS.observe_attestation(step.outcome, time.perf_counter() - started)
            new = step.status
            if step.answered_nonce is not None:
                seen.append(step.answered_nonce)
        old = {k: status.get(k) for k in OPERATOR_FIELDS if k in status}
        patch = kube.merge_patch_for(old, new)
        if patch:
            log.debug("member %s: status patch %s", name, patch)
            result = await asyncio.to_thread(kube.patch_member_status, c, name, patch)
            remember(name, dict(result) if isinstance(result, Mapping) else body)
        await sync_node(name)
        if status.get("phase") != new.get("phase") or status.get("level") != new.get("level"):
            await kubevirt.rejudge_migrations_to(name)
        if step is not None:
            step = await _move_vms_off(name, new, step)
        if step is not None:
            for ev in step.events:
                meta = body.get("metadata") or {}
                await asyncio.to_thread(
                    kube.post_event,
                    c,
                    kind="Member",
                    name=name,
                    uid=str(meta.get("uid", "")),
                    namespace=None,
                    type_=ev.type,
                    reason=ev.reason,
                    message=ev.message,
                )
                log.info("member %s: %s: %s", name, ev.reason, ev.message)
            STATE.schedule(name, step.recheck_after)
        else:
            STATE.schedule(name, dt.timedelta(seconds=30))
        METRICS.set_member(name, str(new.get("phase", "")), int(new.get("level", 0) or 0))


async def _move_vms_off(name: str, new: Mapping[str, Any], step: Step) -> Step:
    """Apply onUntrusted to the gated VMs the member may no longer hold: all of them in
    every phase but Trusted (Pending, Enrolling, Untrusted, Maintenance alike), those that
    need more than its level when Trusted at a lower level than before."""
    phase = str(new.get("phase", ""))
    trust = new.get("trust") or {}
    if phase == "Trusted":
        keep = int(new.get("level", 0) or 0)
        incident, action = f"level-{keep}", "Migrate"
    else:
        keep = 0
        incident = f"{trust.get('reason') or phase}@{trust.get('verifiedAt') or phase}"
        action = (
            "Migrate"
            if phase == "Maintenance"
            else str((new.get("effectivePolicy") or {}).get("onUntrusted", "Migrate"))
        )
    remaining = await kubevirt.evacuate(name, incident, action, keep_level=keep)
    if remaining and action == "Migrate":
        return dataclasses.replace(
            step, recheck_after=min(step.recheck_after, dt.timedelta(seconds=1))
        )
    return step


async def sync_node(name: str) -> None:
    """Bring the Node's gtvp labels and taint in line with its Member's verdict."""
    c = STATE.clients
    node = STATE.nodes.get(name)
    body = STATE.bodies.get(name)
    if c is None or node is None:
        return
    status = (body or {}).get("status") or {}
    meta = node.get("metadata") or {}
    patch = node_patch(
        meta.get("labels") or {},
        (node.get("spec") or {}).get("taints") or [],
        str(status.get("phase", "")) if body else "",
        int(status.get("level", 0) or 0),
    )
    if patch is None:
        return
    try:
        result = await asyncio.to_thread(c.core.patch_node, name, patch)
        STATE.nodes[name] = result.to_dict() if hasattr(result, "to_dict") else node
        log.info(
            "node %s: %s",
            name,
            "trusted labels set"
            if status.get("phase") == "Trusted"
            else "trust labels removed, tainted gtvp.io/untrusted:NoSchedule",
        )
    except ApiException as exc:
        log.warning("could not update node %s: %s %s", name, exc.status, exc.reason)


async def ensure_member(name: str) -> None:
    """Every Node is a member: create its Member (identity from --default-identity)."""
    c = STATE.clients
    if c is None:
        return
    body = {
        "apiVersion": "gtvp.io/v1alpha1",
        "kind": "Member",
        "metadata": {"name": name, "labels": {NODE_MEMBER_LABEL: "true"}},
        "spec": {"identity": STATE.default_identity},
    }
    try:
        await asyncio.to_thread(
            c.custom.create_cluster_custom_object, "gtvp.io", "v1alpha1", "members", body
        )
        log.info("node %s joined: Member created (identity %d)", name, STATE.default_identity)
    except ApiException as exc:
        if exc.status != 409:
            log.warning("could not create Member %s: %s %s", name, exc.status, exc.reason)


NODE_MEMBER_LABEL = "gtvp.io/node-member"
"""On the Members the operator created for a Node: they leave with their Node."""


async def forget_node(name: str) -> None:
    """A Node was deleted: the Member the operator made for it goes too (no orphan left
    counted, listed or offered as a target). A Member an administrator created stays, with
    a Warning, since it may carry an approval meant for a node that is coming back."""
    c = STATE.clients
    body = STATE.bodies.get(name)
    if c is None or body is None:
        return
    meta = body.get("metadata") or {}
    if (meta.get("labels") or {}).get(NODE_MEMBER_LABEL) == "true":
        await asyncio.to_thread(kube.delete_member, c, name)
        log.info("node %s left: its Member was deleted", name)
        return
    message = f"Node {name} was deleted; this Member (created by an administrator) has no Node"
    await asyncio.to_thread(
        kube.post_event,
        c,
        kind="Member",
        name=name,
        uid=str(meta.get("uid", "")),
        namespace=None,
        type_="Warning",
        reason="NodeGone",
        message=message,
    )


async def spend_use(name: str) -> None:
    """One placement or migration decision backed by this member's verdict."""
    c = STATE.clients
    if c is None:
        return
    async with STATE.lock(name):
        body = STATE.bodies.get(name)
        trust = ((body or {}).get("status") or {}).get("trust") or {}
        left = int(trust.get("usesLeft", 0) or 0)
        if body is None or left <= 0:
            return
        result = await asyncio.to_thread(
            kube.patch_member_status, c, name, {"trust": {"usesLeft": left - 1}}
        )
        remember(name, dict(result) if isinstance(result, Mapping) else body)
    if left - 1 <= 0:
        STATE.schedule(name, dt.timedelta(0))


def observe(body: Mapping[str, Any], event_type: str) -> bool:
    """Record the latest body; False when the member is gone."""
    name = str((body.get("metadata") or {}).get("name", ""))
    if event_type == "DELETED":
        STATE.bodies.pop(name, None)
        _index_ek(name, None)
        STATE.answered.pop(name, None)
        STATE.next_due.pop(name, None)
        METRICS.forget_member(name)
        return False
    remember(name, dict(body))
    return True


def remember(name: str, body: dict[str, Any]) -> None:
    STATE.bodies[name] = body
    ek = ((body.get("status") or {}).get("trust") or {}).get("ekSHA256")
    _index_ek(name, str(ek) if ek else None)


def _index_ek(name: str, fingerprint: str | None) -> None:
    """Which members are bound to which EK (so a second member with the same EK is refused)."""
    old = STATE.ek_of.get(name)
    if old == fingerprint:
        return
    if old is not None:
        holders = STATE.ek_holders.get(old, set())
        holders.discard(name)
        if not holders:
            STATE.ek_holders.pop(old, None)
        del STATE.ek_of[name]
    if fingerprint is not None:
        STATE.ek_of[name] = fingerprint
        STATE.ek_holders.setdefault(fingerprint, set()).add(name)


class OtherHolders(Mapping[str, str]):
    """EK fingerprint -> another member bound to it (a view; nothing is copied)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getitem__(self, fingerprint: str) -> str:
        others = STATE.ek_holders.get(fingerprint, set()) - {self.name}
        if not others:
            raise KeyError(fingerprint)
        return min(others)

    def __iter__(self) -> Iterator[str]:
        return (fp for fp in list(STATE.ek_holders) if fp in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


async def recheck_loop(stop: asyncio.Event) -> None:
    """Wake members whose next look is due (expiry, answerAfter): one loop for the pool."""
    STATE.wakeup = asyncio.Event()
    while not stop.is_set():
        STATE.heartbeat = time.monotonic()
        for name in STATE.pop_due(time.monotonic()):
            try:
                await reconcile(name)
            except Exception:
                log.exception("re-checking member %s failed; retrying in 5s", name)
                STATE.schedule(name, dt.timedelta(seconds=5))
        timeout = (STATE.due[0][0] - time.monotonic()) if STATE.due else 30.0
        STATE.wakeup.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(STATE.wakeup.wait(), timeout=max(0.05, min(timeout, 30.0)))
