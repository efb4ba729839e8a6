"""Member attestation: run the pure `attestation_step` on each change and when a verdict is due.

The kopf event handler feeds every Member change here; a single background loop re-checks
members whose verdict expires or whose next look is due (one loop for the whole pool rather
than a timer per member). Only the replica holding the member's shard judges it (see
`gtvp.coordination`). Each member is handled under its own lock, and a body older than our
last answer (its nonce already consumed) is skipped, so a verdict is never judged twice. The
only writes: one status merge patch per decision, at the resourceVersion judged (a replica
that lost the shard meanwhile cannot overwrite its new holder), and an Event on
transitions; then the member's Node follows the verdict. The leader moves the VMs the
verdict no longer allows.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any

from gtvp import kube, verdict_keys
from gtvp.core import ear
from gtvp.core.api_resources import MEMBERS
from gtvp.core.attestation import ENTROPY_BYTES, Step, attestation_step
from gtvp.core.phases import MemberPhase, Verdict
from gtvp.core.policy import Policy
from gtvp.core.timestamps import parse_ts
from gtvp.core.trust import below_since, below_since_times, holds_less, takes_trust_away
from gtvp.handlers.evacuation import evacuate, rejudge_migrations_to
from gtvp.handlers.node_trust import ensure_member, says_more, sync_node
from gtvp.handlers.verdict_uses import SPEND_RETRY, owes, spend_owed
from gtvp.metrics import METRICS
from gtvp.runtime import Runtime

log = logging.getLogger("gtvp.members")

JUDGED = (
    ("phase",),
    ("level",),
    ("trust", "verdict"),
    ("trust", "reason"),
    ("trust", "verifiedAt"),
    ("trust", "expiresAt"),
    ("trust", "usesLeft"),
    ("challenge", "nonce"),
    ("challenge", "answerAfter"),
)
"""What a verdict write tests the server still holds, as it was judged: what a verdict
rests on, which a verdict, a spent use or a new nonce changes (a write of conditions alone
may land over another such write). Free text is not tested (`kube.guarded_json_patch`)."""
OPERATOR_FIELDS = (
    "phase",
    "level",
    "trust",
    "challenge",
    "effectivePolicy",
    "belowSince",
    "conditions",
)


def observe(rt: Runtime, body: Mapping[str, Any], event_type: str) -> bool:
    """Record a Member event; False when the member is gone (and forgotten)."""
    if rt.view.observe_member(body, event_type):
        return True
    name = str((body.get("metadata") or {}).get("name", ""))
    rt.attestation.answered.pop(name, None)
    rt.schedule.forget(name)
    METRICS.forget_member(name)
    return False


def _no_policy_status(rt: Runtime, body: Mapping[str, Any]) -> dict[str, Any]:
    """Without a usable policy nothing can be verified: every member is Untrusted."""
    return _untrusted_status(body, "NoPolicy", f"no usable SecurityPolicy: {rt.view.policy_error}")


JUDGEMENT_FAILED = "JudgementFailed"


def _unjudged_status(body: Mapping[str, Any], exc: Exception) -> dict[str, Any]:
    """Judging the member failed (a fault of the operator's, logged): Untrusted, as
    without a policy, until it can be judged. Never the last verdict left standing."""
    message = (
        f"the operator could not judge this member ({type(exc).__name__}, in its log); the "
        "member is Untrusted until it can"
    )
    return _untrusted_status(body, JUDGEMENT_FAILED, message)


def _untrusted_status(body: Mapping[str, Any], reason: str, message: str) -> dict[str, Any]:
    """The member's status with its verdict dropped for `reason` (no level, no uses)."""
    status = dict(body.get("status") or {})
    trust = dict(status.get("trust") or {})
    trust.update(verdict=Verdict.UNTRUSTED.value, reason=reason, message=message[:2000], usesLeft=0)
    trust.pop("expiresAt", None)
    return {
        "phase": MemberPhase.UNTRUSTED.value,
        "level": 0,
        "trust": trust,
        "challenge": status.get("challenge") or {},
        "belowSince": below_since(status.get("belowSince"), 0, dt.datetime.now(dt.UTC)),
    }


JUDGE_THREADS = 2
"""Members judged at once: their own threads, never the default executor that the API
calls (the Leases' renewals among them) use; under the GIL more would not be faster, and
each holds an agent's event log (up to 4 MiB) while it is parsed."""
_JUDGES = concurrent.futures.ThreadPoolExecutor(JUDGE_THREADS, thread_name_prefix="gtvp-judge")


async def _step(rt: Runtime, name: str, body: Mapping[str, Any], policy: Policy) -> Step:
    """The attestation step for this body under `policy` (pure, timed), worked out on a
    judge thread (JUDGE_THREADS): parsing an agent's event log (up to 4 MiB), certificate
    paths and signatures must not hold up the event loop (admission, every other member,
    the Leases). Its inputs are taken here, on the loop; the clock is read when the work
    starts."""
    meta = body.get("metadata") or {}
    spec, status = body.get("spec") or {}, body.get("status") or {}
    labels = rt.view.node_labels.get(name, meta.get("labels") or {})
    answered = frozenset(rt.attestation.seen(name))
    readmit = (meta.get("annotations") or {}).get("gtvp.io/readmit")
    holders = rt.view.other_ek_holders(name)
    boot_id = rt.view.node_boot_id(name)

    def work() -> tuple[Step, float]:
        started = time.perf_counter()
        step = attestation_step(
            spec=spec,
            status=status,
            labels=labels,
            policy=policy,
            now=dt.datetime.now(dt.UTC),
            entropy=secrets.token_bytes(ENTROPY_BYTES),
            answered_nonces=answered,
            readmit=readmit,
            ek_holders=holders,
            boot_id=boot_id,
        )
        return step, time.perf_counter() - started

    step, took = await asyncio.get_running_loop().run_in_executor(_JUDGES, work)
    if step.outcome is not None:
        METRICS.observe_attestation(step.outcome, took)
    return step


def _already_answered(rt: Runtime, name: str, status: Mapping[str, Any]) -> bool:
    """A body from before our last answer (its nonce consumed); the newer one is on its way."""
    nonce = (status.get("challenge") or {}).get("nonce")
    return bool(nonce) and bytes.fromhex(str(nonce)) in rt.attestation.seen(name)


async def reconcile(rt: Runtime, name: str) -> None:
    """Look at one member: the holder of its shard decides and writes its next status (a
    no-op when nothing changes); the leader moves the VMs its verdict no longer allows.
    A Node without a Member (deleted, or never made) has no verdict: it is untrusted."""
    co = rt.coordination
    async with rt.attestation.lock(name):
        if co.holds(name):
            await spend_owed(rt, name)  # starts seen while its shard changed hands
            await _judge(rt, name)
            if owes(rt, name):  # a spend failed: again soon, whatever the judgement planned
                rt.schedule.schedule_by(name, SPEND_RETRY)
        if co.leads():
            status = _status_for_moves(rt, name)
            if status is not None and await _move_vms_off(rt, name, status):
                rt.schedule.schedule(name, EVACUATION_RECHECK)


EVACUATION_RECHECK = dt.timedelta(seconds=1)

NO_MEMBER: Mapping[str, Any] = {
    "phase": "",
    "trust": {"reason": "NoMember", "message": "the Node has no Member: nothing attests it"},
}
"""What a Node without a Member is judged by: no verdict, so it holds no gated VM."""


def _status_for_moves(rt: Runtime, name: str) -> Mapping[str, Any] | None:
    """The verdict the VMs on `name` are held to (None: neither a Member nor a Node)."""
    if name in rt.view.members:
        return rt.view.verdict_of(name)  # one that could not be stored included
    return NO_MEMBER if name in rt.view.nodes else None


async def _judge(rt: Runtime, name: str) -> None:
    body = rt.view.members.get(name)
    if body is None:
        await _untrust_memberless_node(rt, name)
        return
    status = body.get("status") or {}
    if _already_answered(rt, name, status):
        return
    policy = rt.view.policy
    step, new = await _verdict(rt, name, body, policy)
    if rt.view.policy is not policy:
        # the policy changed while the member was judged: a verdict is signed with the
        # policy it was reached under, so judge it again under the new one
        rt.schedule.schedule(name, WRITE_RETRY)
        return
    new = _with_token(rt, name, status, new)
    written = await _write(rt, name, body, new)
    if name not in rt.view.members:  # deleted on the server under us (404)
        await _untrust_memberless_node(rt, name)
        return
    if written is not True:
        # fail closed: the Node loses trust on the verdict reached, even unwritten (not when
        # another replica wrote first: it holds the member now, or the body was stale), and
        # the member is looked at again soon (its nonce is not taken as answered)
        if written is False and holds_less(status, new):
            # and the pool is held to it (admission, its VMs, its Node on every event)
            # until a verdict is stored: an agent that grew its Member past what the API
            # server stores must not keep the last one that could be (nor a level, uses or
            # an expiry the new verdict took away)
            rt.view.hold_to(name, status, new)
            await sync_node(rt, name, status_override=new)
        rt.schedule.schedule(name, WRITE_RETRY)
        return
    rt.view.unwritten.pop(name, None)
    if step is not None and step.answered_nonce is not None:
        rt.attestation.seen(name).append(step.answered_nonce)
    in_line = await sync_node(rt, name)
    if status.get("phase") != new.get("phase") or status.get("level") != new.get("level"):
        await rejudge_migrations_to(rt, name)
    if step is not None:
        await _post_events(rt, name, body, step)
        rt.schedule.schedule(name, step.recheck_after)
    else:
        rt.schedule.schedule(name, dt.timedelta(seconds=30))  # no policy, or it failed
    if not in_line and says_more(rt, name, new):
        # the Node still says more than the verdict: again soon (one that says less waits)
        rt.schedule.schedule_by(name, WRITE_RETRY)
    METRICS.set_member(
        name, str(new.get("phase", "")), int(new.get("level", 0) or 0), _verdict_expiry(new)
    )


async def _verdict(
    rt: Runtime, name: str, body: Mapping[str, Any], policy: Policy | None
) -> tuple[Step | None, dict[str, Any]]:
    """The member's attestation step (None without a policy, or when judging it failed)
    and the status to write: a judgement that fails leaves no verdict standing."""
    if policy is None:
        return None, _no_policy_status(rt, body)
    try:
        step = await _step(rt, name, body, policy)
    except Exception as exc:
        log.exception("member %s could not be judged: Untrusted until it can be", name)
        return None, _unjudged_status(body, exc)
    return step, dict(step.status)


async def _untrust_memberless_node(rt: Runtime, name: str) -> None:
    """A Node whose Member is gone keeps no trust label gtvp once wrote (its Member may have
    been deleted while no replica wrote its Node: the operator down, its shard between
    holders); every Node gets a Member again, which must enrol afresh."""
    if name not in rt.view.nodes:
        return
    if not await sync_node(rt, name):  # first: the labels go before anything else is asked
        rt.schedule.schedule(name, WRITE_RETRY)  # the patch failed: fail closed, try again
    await rejudge_migrations_to(rt, name)  # no Member, no verdict: migrations there stop
    if rt.settings.create_members:
        await ensure_member(rt, name)


def _policy_id(rt: Runtime, policy: Policy | None) -> ear.PolicyId | None:
    """The enforced SecurityPolicy's name and the generation the pool runs under."""
    if policy is None:
        return None
    accepted = rt.accepted_policies.get(policy.name)
    if accepted is not None and accepted[1].policy is policy:
        return ear.PolicyId(policy.name, accepted[1].generation)
    return ear.PolicyId(policy.name)


def _with_token(
    rt: Runtime, name: str, old: Mapping[str, Any], new: dict[str, Any]
) -> dict[str, Any]:
    """`new` with its signed verdict token (`status.trust.token`, gtvp.core.ear), issued in
    the same status patch as the verdict and only when the verdict changes; a status that
    is written anyway and has no token yet gets one. Never a write of its own: a no-op
    reconcile stays an empty patch. Without a signing key a changed verdict drops the old
    token (fail closed: no token says more than the status)."""
    trust = dict(new.get("trust") or {})
    had = (old.get("trust") or {}).get("token")
    trust.pop("token", None)
    without = {**new, "trust": trust}
    same = ear.verdict_key(old) == ear.verdict_key(new)
    issuer = rt.verdict_issuer
    if had and same and _issued_as_now(issuer, str(had)):
        trust["token"] = had
        return without
    if issuer is None or issuer.signing_key is None or issuer.name is None:
        return without
    if same:
        before = {k: old.get(k) for k in OPERATOR_FIELDS if k in old}
        if not kube.merge_patch_for(before, without):
            return without  # nothing else to write: no write for a token alone
    policy = rt.view.policy
    token = issuer.token(
        name,
        without,
        _policy_id(rt, policy),
        dt.datetime.now(dt.UTC),
        verdict_keys.longest_validity(policy),
    )
    if token is not None:
        trust["token"] = token
    return without


def _issued_as_now(issuer: verdict_keys.Issuer | None, token: str) -> bool:
    """Whether `token` names a key the operator still publishes and the issuer it signs as
    now: one signed by a key withdrawn since (`rotate-key --revoke-previous`, or pruned),
    or issued without this cluster's `iss` (by an older gtvp, or under another
    `--token-issuer`), is issued anew."""
    if issuer is None or not issuer.keys:
        return True  # no keys loaded (yet): the token stays as long as its verdict
    try:
        parsed = ear.parse(token)
    except ear.TokenRefused:
        return False
    kid = parsed.header.get("kid")
    if issuer.name is not None and parsed.claims.get("iss") != issuer.name:
        return False
    return any(k.kid == kid for k in issuer.keys)


def _verdict_expiry(status: Mapping[str, Any]) -> float | None:
    """When the Trusted verdict in `status` expires (Unix time); None without one."""
    trust = status.get("trust") or {}
    expires = parse_ts(trust.get("expiresAt"))
    if trust.get("verdict") != Verdict.TRUSTED.value or expires is None:
        return None
    return expires.timestamp()


WRITE_RETRY = dt.timedelta(seconds=2)


async def _write(
    rt: Runtime, name: str, body: Mapping[str, Any], new: Mapping[str, Any]
) -> bool | None:
    """Write the operator's part of the status (nothing when unchanged) only if the server
    still holds the operator's fields that were judged (a JSON Patch testing each; the
    first write, with none yet, at the judged resourceVersion). False when the API server
    refused or failed (said in the log; the caller retries); None when the Member changed
    since (a newer body is on its way) or this replica no longer holds the member's shard
    (fenced: it writes nothing).

    Not conditional on the resourceVersion once the operator's fields exist: root on the
    host rewriting its agent's status without pause (each write a new resourceVersion)
    would otherwise keep every verdict off the server — a revocation's spent uses, a
    shortened expiry. A verdict that takes trust away (`takes_trust_away`: it lost its
    verdict, or holds a lower level than the server says) is written even when the
    operator's own fields changed since it was judged: nothing written meanwhile can make
    the member more trusted than evidence that failed."""
    status = body.get("status") or {}
    old = {k: status.get(k) for k in OPERATOR_FIELDS if k in status}
    patch = kube.merge_patch_for(old, new)
    if not patch:
        return True
    if not rt.coordination.holds(name):
        return None
    log.debug("member %s: status patch %s", name, patch)
    version = (body.get("metadata") or {}).get("resourceVersion")
    withdraws = takes_trust_away(status, new)
    try:
        try:
            if old:
                ops = kube.guarded_json_patch(old, new, "/status", JUDGED)
                result = await asyncio.to_thread(
                    kube.json_patch_status, rt.clients, MEMBERS, name, ops
                )
            else:
                result = await asyncio.to_thread(
                    kube.patch_member_status, rt.clients, name, patch, resource_version=version
                )
        except Exception as exc:  # sorted below
            changed = kube.is_conflict(exc) or kube.is_failed_test(exc)
            if not (changed and withdraws):
                raise
            log.info("member %s changed since it was judged; its lost trust is written anyway",
                     name)  # fmt: skip
            result = await asyncio.to_thread(kube.patch_member_status, rt.clients, name, patch)
    except Exception as exc:  # noqa: BLE001 - any failure: fail closed and retry
        if kube.is_conflict(exc) or kube.is_failed_test(exc):
            log.debug("member %s changed since it was judged; judging the newer body", name)
            await _read_again(rt, name)  # the view may lag behind: the next look is on it
            return None
        if kube.is_not_found(exc):  # deleted, its watch event not seen (yet, or lost)
            log.info("member %s is gone; its Node is judged as having no Member", name)
            observe(rt, body, "DELETED")
            return False
        log.warning(
            "member %s: writing the verdict failed (%s); the Node follows the verdict "
            "anyway when it lowers trust, and the member is looked at again in %ss",
            name,
            getattr(exc, "reason", None) or exc,
            int(WRITE_RETRY.total_seconds()),
        )
        return False
    rt.view.remember_member(name, dict(result) if isinstance(result, Mapping) else dict(body))
    return True


async def _read_again(rt: Runtime, name: str) -> None:
    try:
        fresh = await asyncio.to_thread(kube.get_if_present, rt.clients, MEMBERS, name)
    except Exception as exc:  # noqa: BLE001 - the watch brings it anyway; only sooner here
        log.debug("member %s: reading it again failed: %s", name, exc)
        return
    if fresh is not None:
        rt.view.remember_member(name, fresh)


async def _post_events(rt: Runtime, name: str, body: Mapping[str, Any], step: Step) -> None:
    for ev in step.events:
        await asyncio.to_thread(
            kube.post_object_event,
            rt.clients,
            MEMBERS,
            body,
            type_=ev.type,
            reason=ev.reason,
            message=ev.message,
        )
        log.info("member %s: %s: %s", name, ev.reason, ev.message)


async def _move_vms_off(rt: Runtime, name: str, new: Mapping[str, Any]) -> bool:
    """Apply onUntrusted to the gated VMs the member may no longer hold: all of them in
    every phase but Trusted (Pending, Enrolling, Untrusted, Maintenance alike: migrated
    off a member in Maintenance while its verdict holds), those that need more than its
    level when Trusted at a lower level than before (migrated, or stopped where their own
    level says Stop). True when some are still to be migrated (look again soon)."""
    phase = str(new.get("phase", ""))
    trust = new.get("trust") or {}
    covered: int | None = None
    planned = False
    since = below_since_times(new)  # per level: its migrateWithin counts from then
    if phase == MemberPhase.TRUSTED:
        keep = int(new.get("level", 0) or 0)
        # the VMIs above its level were out of place there: each moves, or stops when its
        # own level says Stop (`untrusted_actions`)
        incident, action, covered = f"level-{keep}", "Migrate", keep
    else:
        keep = 0
        incident = f"{trust.get('reason') or phase}@{trust.get('verifiedAt') or phase}"
        if phase == MemberPhase.MAINTENANCE and trust.get("verdict") == Verdict.TRUSTED.value:
            action, planned = "Migrate", True  # emptied for maintenance while its verdict holds
        else:  # its level's onUntrusted, for the VMIs that level may hold
            effective = new.get("effectivePolicy") or {}
            action = str(effective.get("onUntrusted", "Migrate"))
            covered = int(effective.get("level", 0) or 0)
    after = "its level dropped below theirs" if phase == MemberPhase.TRUSTED else "it lost trust"
    remaining = await evacuate(
        rt, name, incident, action, keep_level=keep, covered_level=covered, since=since,
        after=after, stop_unmovable=not planned,
    )  # fmt: skip
    return bool(remaining)


async def recheck_loop(rt: Runtime) -> None:
    """Wake members whose next look is due (expiry, answerAfter): one loop for the pool."""
    schedule = rt.schedule
    schedule.wakeup = asyncio.Event()
    while not rt.stop.is_set():
        schedule.heartbeat = time.monotonic()
        for name in schedule.pop_due(time.monotonic()):
            try:
                await reconcile(rt, name)
            except Exception:
                log.exception("re-checking member %s failed; retrying in 5s", name)
                schedule.schedule(name, dt.timedelta(seconds=5))
        timeout = (schedule.due[0][0] - time.monotonic()) if schedule.due else 30.0
        schedule.wakeup.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(schedule.wakeup.wait(), timeout=max(0.05, min(timeout, 30.0)))
