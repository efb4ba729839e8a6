"""One step of a member's attestation cycle: from what the agent wrote to the operator's answer.

Pure: `attestation_step` takes the Member (spec, status, the Node's labels), the parsed
policy, the time and fresh random bytes, and returns the operator-owned part of the status
to write (the verdict with the next quote's schedule; the next nonce itself only when that
quote is due), the events to record and when to look again. It never trusts what the agent
wrote beyond what the TPM signed: the EK certificate path, the credential activation and the
quote are all checked here.

Cycle: Pending (no agent) -> Enrolling (EK checked, credential challenge, activation) ->
nonce challenge -> quote verified -> Trusted, with the next quote due (`answerAfter`) one
interval away and its nonce published then. A verdict expires `validFor` after the nonce it
answered was issued; an expired verdict is Untrusted whatever the cause (fail closed). A
verdict records the member class and level it was judged under: another class or a higher
level asks for a fresh quote at once and is not published before one verifies under it. A
member whose class cannot be resolved is Untrusted (UnknownMemberClass) and no quote of it
is judged.

Per cycle, a quote costs one parse and one signature check: what does not change between
cycles is worked out once and memoized by its exact content (bounded `functools.lru_cache`
of pure functions, so a result never depends on what happens to be cached): the EK's facts
and its certificate path once per EK, certificate, presented chain and CA bundle
(`enrolment.ek_facts`, `enrolment.check_ek_certificate`, which still checks validity
against the time on every call), the AK's public key once per AK public area
(`enrolment.ak_facts`), and the quote reference (PCR selection, golden values) once per policy
generation (`quote.quote_reference`). A changed byte in any of them is another key,
checked from scratch.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

from gtvp.core import errors
from gtvp.core.conditions import merge_conditions as _conditions
from gtvp.core.ek_scope import NO_CEILING, ek_ceiling
from gtvp.core.enrolment import (
    EkFacts,
    ak_facts,
    check_activation,
    check_ek_certificate,
    check_ek_pin,
    ek_facts,
    make_activation_challenge,
)
from gtvp.core.phases import (
    ChallengeStatus,
    CredentialChallenge,
    MemberPhase,
    TrustStatus,
    Verdict,
)
from gtvp.core.policy import MemberClass, MemberPolicy, Policy, member_policy
from gtvp.core.quote import (
    ClockState,
    Evidence,
    Expectation,
    QuoteResult,
    quote_reference,
    replay_event_log,
    verify_quote,
)
from gtvp.core.refvalues import (
    ReferenceSet,
    ReferenceSetExpired,
    accepted_until,
    appraise,
    check_replay,
)
from gtvp.core.timestamps import format_ts, parse_ts
from gtvp.core.tpm_wire import PublicArea, qualified_signer
from gtvp.core.trust import below_since, boot_parts, other_boot

ENTROPY_BYTES = 64
RETRY_AFTER_FAILURE = dt.timedelta(seconds=5)
# failures that are no sign of tampering: they never wait for gtvp.io/readmit (an expired
# reference set is the policy's calendar, not the host's doing)
_NOT_TAMPERING = (
    errors.EvidenceTooLate,
    errors.EkNotApproved,
    errors.UnknownMemberClass,
    ReferenceSetExpired,
    # what no named check catches may as well be a fault of gtvp's: never a readmission
    # of every member of a level for it (the inputs known to be an agent's are named)
    errors.EvidenceUnprocessable,
)


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Step:
    """The operator's answer: status fields to write, events, metric outcome, next look."""

    status: dict[str, Any]
    events: tuple[Event, ...] = ()
    outcome: str | None = None  # "Verified" or a failure reason, when evidence was judged
    answered_nonce: bytes | None = None
    recheck_after: dt.timedelta = field(default=dt.timedelta(seconds=30))

    @property
    def phase(self) -> str:
        return str(self.status.get("phase", ""))


def _b64(value: Any, what: str, limit: int = 4 * 1024 * 1024) -> bytes:
    if not isinstance(value, str) or not value:
        raise errors.MalformedEvidence(f"{what} is missing")
    if len(value) > limit * 4 // 3 + 4:
        raise errors.MalformedEvidence(f"{what} is larger than {limit} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise errors.MalformedEvidence(f"{what} is not valid base64") from exc


def _hex(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise errors.MalformedEvidence(f"{what} is missing")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise errors.MalformedEvidence(f"{what} is not hex") from exc


def _retry_at(err: errors.VerificationError, trust: TrustStatus, now: dt.datetime) -> dt.datetime:
    """When to ask for the next quote after a failure (records a reboot's new baseline)."""
    if isinstance(err, errors.Rebooted) and isinstance(err.clock, ClockState):
        _keep_clock(trust, err.clock)
        return now
    if isinstance(err, errors.EvidenceTooLate):
        return now
    return now + RETRY_AFTER_FAILURE


def _raise_if_late(issued: dt.datetime, valid_for: dt.timedelta, now: dt.datetime) -> None:
    """A verdict lasts validFor from its nonce's issue: evidence arriving later cannot make
    one (the agent or the operator was too slow; a fresh nonce is asked for at once)."""
    if now >= issued + valid_for:
        age = int((now - issued).total_seconds())
        raise errors.EvidenceTooLate(
            f"the quote verified, but it answered a nonce issued {age}s ago, longer than "
            f"validFor ({valid_for}); a fresh quote was asked for"
        )


JITTER = 0.1  # share of an interval a routine quote may come early
FIRST_SPREAD = 0.5  # after a member's first verdict: anywhere in the interval's second half


def _next_quote(
    now: dt.datetime, interval: dt.timedelta, entropy: bytes, spread: float
) -> dt.datetime:
    """One interval on, minus a share of it drawn from this step's entropy, so that members
    that enrolled together (a mass reboot, a new cluster) do not quote together forever.
    Only ever earlier: a verdict never outlives validFor because of it."""
    return now + interval * (1 - spread * _jitter(entropy))


def _jitter(entropy: bytes) -> float:
    """A share in [0, 1) drawn from this step's entropy."""
    return int.from_bytes(hashlib.sha256(b"jitter" + entropy).digest()[:4], "big") / 2**32


def _nonce_challenge(
    policy: Policy, entropy: bytes, now: dt.datetime, answer_after: dt.datetime
) -> ChallengeStatus:
    """The next quote asked for at `answer_after`: its nonce now when it is due, otherwise
    only the time (the nonce is published when it is due, `_Cycle.wait`). A nonce
    handed out ahead could be quoted at once from the boot the host is in, kept, and handed
    in from another boot: published when due, it is quoted from the boot the host is in
    then (one that rebooted to answer it shows the reboot in its TPM's counters)."""
    if answer_after > now:
        return {
            "pcrBank": policy.pcr_bank,
            "pcrs": list(policy.pcrs),
            "answerAfter": format_ts(answer_after),
        }
    return {
        "nonce": hashlib.sha256(b"nonce" + entropy).hexdigest(),
        "pcrBank": policy.pcr_bank,
        "pcrs": list(policy.pcrs),
        "issuedAt": format_ts(now),
        "answerAfter": format_ts(now),
    }


def _asked_at(challenge: ChallengeStatus) -> dt.datetime | None:
    """Since when the host has been asked for the quote outstanding (`askedAt`: the first
    nonce of this round, when one was replaced unanswered); None: nothing is asked."""
    first = parse_ts(challenge.get("askedAt"))
    if first is not None:
        return first
    return parse_ts(challenge.get("issuedAt")) if challenge.get("nonce") else None


def _withdraw_early_nonce(challenge: ChallengeStatus) -> None:
    """A nonce issued before it was due (by a gtvp that published the next nonce with each
    verdict) is withdrawn: it is asked for again, freshly, when due."""
    issued = parse_ts(challenge.get("issuedAt"))
    due = parse_ts(challenge.get("answerAfter"))
    if challenge.get("nonce") and (issued is None or (due is not None and due > issued)):
        challenge.pop("nonce", None)
        challenge.pop("issuedAt", None)


@dataclass(frozen=True)
class _Keys:
    ek: EkFacts
    ak: PublicArea
    ek_area: bytes
    fingerprint: str
    ak_name: str
    signer: bytes  # the AK's qualified name under this EK


def _ek_ceiling(
    policy: Policy, status: Mapping[str, Any], now: dt.datetime
) -> tuple[int, str | None]:
    """The levels the member's EK certificate lets it hold (`ek_scope`); enrolment itself
    refuses an unreadable enrolment, which holds no level named with an ekCaBundle."""
    if all(lv.ek_ca_bundle is None for lv in policy.levels):
        return NO_CEILING
    enrollment = (status.get("agent") or {}).get("enrollment") or {}
    spki, certified = b"", None
    try:
        spki = ek_facts(_ek_area(enrollment)).spki
        certified = _ek_certificate(enrollment)
    except Exception:  # noqa: BLE001 - agent-written data broke a parser or library
        spki, certified = b"", None  # as if uncertified (enrolment refuses it anyway)
    certificate, chain = certified or (None, [])
    return ek_ceiling(
        policy.levels, ek_spki=spki, certificate=certificate, presented_chain=chain, now=now
    )


def _ek_area(enrollment: Mapping[str, Any]) -> bytes:
    return _b64(enrollment.get("ekPublic"), "enrollment.ekPublic", 2048)


def _ek_certificate(enrollment: Mapping[str, Any]) -> tuple[bytes, list[bytes]] | None:
    """The EK certificate and the chain the agent presents with it (None: no certificate)."""
    cert = enrollment.get("ekCertificate")
    if not cert:
        return None
    chain = [
        _b64(c, "enrollment.ekCertificateChain[]", 16384)
        for c in enrollment.get("ekCertificateChain") or []
    ]
    return _b64(cert, "enrollment.ekCertificate", 16384), chain


def _check_enrolment(
    enrollment: Mapping[str, Any],
    spec: Mapping[str, Any],
    trust: TrustStatus,
    policy: Policy,
    now: dt.datetime,
    *,
    ek_holders: Mapping[str, str] | None = None,
) -> _Keys:
    ek_area = _ek_area(enrollment)
    ek = ek_facts(ek_area)
    fp = ek.fingerprint
    # one lookup: never `ek_holders or {}`, whose truth test takes len() of a view of the
    # whole pool (the operator passes a lazy Mapping over every member's EK)
    if fp in policy.revoked_eks:
        raise errors.EkRevoked(
            f"the policy revokes this member's EK (SHA-256 {fp}, spec.ekTrust.revokedEKs): "
            "it proves nothing whatever its certificate or an approval says"
        )
    holder = ek_holders.get(fp) if ek_holders is not None else None
    if holder is not None and not policy.allow_shared_ek:
        raise errors.DuplicateEk(
            f"member {holder} already presents this EK (SHA-256 {fp[:16]}…); "
            "one TPM cannot prove two hosts"
        )
    approval = spec.get("approval") or {}
    approved = approval.get("ekSHA256") if isinstance(approval, Mapping) else None
    check_ek_pin(pinned=trust.get("ekSHA256"), current=fp, approved=approved)
    if policy.require_approval and approved != fp:
        raise errors.EkNotApproved(
            f"the policy binds only EKs an administrator approved (spec.ekTrust."
            f"requireApproval), and this member's EK (SHA-256 {fp}) is not: check it against "
            "your inventory of the hosts' TPMs, then set Member.spec.approval.ekSHA256"
        )
    certified = _ek_certificate(enrollment)
    if certified is not None:
        certificate, chain = certified
        check_ek_certificate(
            ek_spki=ek.spki,
            certificate=certificate,
            presented_chain=chain,
            ca_bundle_pem=policy.ca_bundle_pem,
            now=now,
        )
    elif not (policy.allow_uncertified_with_approval and approved == fp):
        raise errors.EkCertificateMissing(
            "the TPM has no EK certificate; the policy admits such a TPM only with "
            "ekTrust.allowUncertifiedWithApproval and an administrator's approval of EK "
            f"{fp} (Member.spec.approval.ekSHA256)"
        )
    ak = ak_facts(_b64(enrollment.get("akPublic"), "enrollment.akPublic", 2048))
    reported = str(enrollment.get("akName", ""))
    if ak.name != reported:
        raise errors.AkNameMismatch(
            f"the agent reports AK name {reported[:20]}…, the AK public area's name is "
            f"{ak.name[:20]}…"
        )
    signer = qualified_signer(ek.name, ak.public.name)
    return _Keys(ek, ak.public, ek_area, fp, reported, signer)


def parse_evidence(raw: Mapping[str, Any]) -> Evidence:
    """The evidence as the agent writes it (`status.agent.evidence`): base64 TPMS_ATTEST and
    TPMT_SIGNATURE, hex PCR values, an optional base64 event log."""
    values: dict[int, bytes] = {}
    pcr_values = raw.get("pcrValues") or {}
    if not isinstance(pcr_values, Mapping):
        raise errors.MalformedEvidence("evidence.pcrValues is not a map")
    for k, v in pcr_values.items():
        try:
            idx = int(k)
        except ValueError as exc:
            raise errors.MalformedEvidence(
                f"evidence.pcrValues key {k!r} is not a PCR index"
            ) from exc
        values[idx] = _hex(v, f"evidence.pcrValues[{k}]")
    log = raw.get("eventLog")
    return Evidence(
        attest=_b64(raw.get("attest"), "evidence.attest", 8192),
        signature=_b64(raw.get("signature"), "evidence.signature", 8192),
        pcr_bank=str(raw.get("pcrBank", "")),
        pcr_values=values,
        event_log=_b64(log, "evidence.eventLog") if log else None,
    )


def _last_clock(trust: TrustStatus) -> ClockState | None:
    try:
        clock = ClockState(
            int(trust["clock"]), int(trust["resetCount"]), int(trust["restartCount"])
        )
    except (KeyError, TypeError, ValueError):
        return None
    try:
        firmware = int(str(trust["firmwareVersion"]))
    except (KeyError, TypeError, ValueError):
        return clock  # recorded before gtvp kept it: taken from the next quote
    return replace(clock, firmware=firmware)


def _keep_clock(trust: TrustStatus, clock: ClockState) -> None:
    """Keep a quote's clock state in the trust status, the baseline of the next quote (the
    firmware version as a decimal string: a UINT64 may not fit the API server's int64)."""
    trust["clock"] = clock.clock
    trust["resetCount"] = clock.reset_count
    trust["restartCount"] = clock.restart_count
    if clock.firmware is not None:
        trust["firmwareVersion"] = str(clock.firmware)


def attestation_step(
    *,
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    labels: Mapping[str, str],
    policy: Policy,
    now: dt.datetime,
    entropy: bytes,
    answered_nonces: frozenset[bytes] = frozenset(),
    readmit: str | None = None,
    ek_holders: Mapping[str, str] | None = None,
    boot_id: str | None = None,
) -> Step:
    """Decide the operator's next write for one member.

    `readmit` is the value of the Member's `gtvp.io/readmit` annotation: on a level whose
    policy says `autoRecover: false`, a member that failed stays Untrusted
    (AwaitingReadmission) after clean quotes until an administrator sets a new value.
    `ek_holders` maps the EK fingerprints other members are bound to onto their names: a
    member presenting one of them is refused (DuplicateEk) unless the policy allows sharing.
    `boot_id` is the boot its Node reports (kubelet's `status.nodeInfo.bootID`; None when
    unknown): another boot than the one last seen spends a Trusted verdict at once (a
    `NodeRebooted` Event) and asks for a fresh quote. The node's word only ever takes trust
    away.

    The steps, in order: no agent (or its enrolment withdrawn), enrolment checks, AK binding
    by credential activation, judging a quote, and otherwise waiting. Expiry is applied on
    every path (`_Cycle.finish`), so no agent write can hold a verdict past its expiresAt.
    """
    if len(entropy) < ENTROPY_BYTES:
        raise ValueError("attestation_step needs 64 bytes of fresh randomness")
    mp = member_policy(
        policy,
        identity=int(spec.get("identity", 1)),
        member_class=spec.get("memberClass"),
        labels=labels,
        ek_ceiling=_ek_ceiling(policy, status, now),
    )

    def cycle() -> _Cycle:
        return _Cycle(
            spec=spec,
            status=status,
            policy=policy,
            mp=mp,
            now=now,
            entropy=entropy,
            readmit=readmit,
        )

    try:
        return _next_step(
            cycle(),
            status,
            spec,
            answered_nonces=answered_nonces,
            ek_holders=ek_holders,
            entropy=entropy,
            boot_id=boot_id,
        )
    except Exception as exc:  # noqa: BLE001 - agent-written data broke a parser or library
        # fail closed on a fresh cycle (the one that raised may be half rewritten): had the
        # step raised, nothing would be written and the last verdict would stand, unexpired
        return cycle().unprocessable(exc)


def _next_step(
    cycle: _Cycle,
    status: Mapping[str, Any],
    spec: Mapping[str, Any],
    *,
    answered_nonces: frozenset[bytes],
    ek_holders: Mapping[str, str] | None,
    entropy: bytes,
    boot_id: str | None,
) -> Step:
    """`attestation_step`'s decision, on one cycle (its steps in order)."""
    policy, mp, now = cycle.policy, cycle.mp, cycle.now
    if mp.member_class is None:  # no reference values: nothing to judge a quote by
        return cycle.unresolved()
    enrollment = cycle.enrollment
    if not enrollment.get("ekPublic") or not enrollment.get("akPublic"):
        return cycle.no_agent()
    try:
        keys = _check_enrolment(enrollment, spec, cycle.trust, policy, now, ek_holders=ek_holders)
    except errors.VerificationError as err:
        cycle.challenge = {}
        return cycle.failed(err, bound=False)
    trust = cycle.trust
    if trust.get("akName") != keys.ak_name or trust.get("ekSHA256") != keys.fingerprint:
        return cycle.bind(keys)
    cycle.node_boot(boot_id)
    if cycle.challenge.get("nonce") and not cycle.asks_for_the_policys_pcrs():
        # a policy edit changed the PCR selection: a quote of the old one is not judged
        # (it would leave an added PCR unchecked); a new nonce asks for the new one within
        # half an interval (every member at once would quote in one burst)
        soon = now + cycle.interval * 0.5 * _jitter(entropy)
        cycle.challenge = _nonce_challenge(policy, entropy, now, soon)
    evidence = (status.get("agent") or {}).get("evidence") or {}
    nonce_hex = cycle.challenge.get("nonce")
    if nonce_hex and evidence.get("nonce") == nonce_hex:
        return cycle.judge_quote(keys, evidence, answered_nonces)
    return cycle.wait()


class _Cycle:
    """The state one `attestation_step` works on: the operator's trust and challenge as it
    rewrites them, and how to turn them into a Step."""

    def __init__(
        self,
        *,
        spec: Mapping[str, Any],
        status: Mapping[str, Any],
        policy: Policy,
        mp: MemberPolicy,
        now: dt.datetime,
        entropy: bytes,
        readmit: str | None = None,
    ) -> None:
        self.policy, self.mp, self.now, self.entropy = policy, mp, now, entropy
        self.readmit = readmit
        self.enrollment: Mapping[str, Any] = (status.get("agent") or {}).get("enrollment") or {}
        self.trust = cast(TrustStatus, dict(status.get("trust") or {}))
        self.challenge = cast(ChallengeStatus, dict(status.get("challenge") or {}))
        _withdraw_early_nonce(self.challenge)
        self.asked_at = _asked_at(self.challenge)
        self.conditions_before = list(status.get("conditions") or [])
        self.below_before: Mapping[str, Any] = status.get("belowSince") or {}
        self.maintenance = bool(spec.get("maintenance", False))
        self.interval = mp.attestation.interval
        self.noted: tuple[Event, ...] = ()
        if mp.member_class is not None:
            _class_resolved(self.trust, self.challenge, mp.member_class, mp.granted, now)
            self.noted = _references_kept(self.trust, self.challenge, mp.member_class, policy, now)
        _bounds_tightened(self.trust, self.challenge, policy, now)

    # --- the steps ---------------------------------------------------------------------------

    def no_agent(self) -> Step:
        """No enrolment published: never enrolled, or withdrawn after the AK was bound."""
        if not self.trust.get("akName"):
            return self.finish(
                reason="AwaitingAgent",
                message="no agent has enrolled this member's TPM yet",
                bound=False,
            )
        self.challenge = {}
        return self.failed(
            errors.EnrolmentChanged(
                "the agent withdrew its enrolment (no EK or AK published) after the AK "
                "was bound; the member is Untrusted until it enrols again and a fresh "
                "quote verifies"
            ),
            bound=False,
            unbind=True,
        )

    def unprocessable(self, exc: Exception) -> Step:
        """Untrusted (EvidenceUnprocessable): what the agent published broke a parser or
        the TPM library. The AK must be bound again once it publishes well-formed data."""
        self.challenge = {}
        said = str(exc).splitlines()[0][:300] if str(exc) else ""
        err = errors.EvidenceUnprocessable(
            f"the member's enrolment or evidence could not be processed "
            f"({type(exc).__name__}{': ' + said if said else ''}); the member is Untrusted "
            "until its agent publishes well-formed data and a fresh quote verifies"
        )
        return self.failed(err, bound=False, unbind=True)  # looked at again each interval

    def unresolved(self) -> Step:
        """The member's class cannot be resolved: Untrusted, and no quote is judged."""
        err, trust = self.unknown_class(), self.trust
        bound = bool(trust.get("akName"))
        if trust.get("verdict") == Verdict.UNTRUSTED and trust.get("reason") == err.reason:
            # refused already: nothing changes (no write, no second event)
            trust["message"] = err.message
            return self.finish(reason=err.reason, message=err.message, bound=bound)
        return self.failed(err, bound=bound)

    def bind(self, keys: _Keys) -> Step:
        """An AK that is not (or no longer) the bound one: bind it by credential activation."""
        trust = self.trust
        if trust.get("akName"):
            # another AK than the bound one: nothing it signs is ours to trust until bound
            old = str(trust["akName"])
            self.challenge = {"credential": _credential(keys, self.entropy)}
            return self.failed(
                errors.EnrolmentChanged(
                    f"the agent published AK {keys.ak_name[:16]}… instead of the bound AK "
                    f"{old[:16]}…; the member is Untrusted until the new AK is bound by "
                    "credential activation and a fresh quote verifies"
                ),
                bound=False,
                unbind=True,
                recheck=RETRY_AFTER_FAILURE,
            )
        cred = self.challenge.get("credential") or {}
        activation = self.enrollment.get("activation") or {}
        # made for this AK under this EK: a proof from another TPM's activation, presented
        # with an EK the agent copied from another member, must not bind (it would pin that
        # EK here and lock its real holder out as a duplicate)
        made_for = cred.get("akName") == keys.ak_name and cred.get("ekSHA256") == keys.fingerprint
        if not cred or not made_for or activation.get("challengeId") != cred.get("id"):
            if not cred or not made_for:
                self.challenge = {"credential": _credential(keys, self.entropy)}
            return self.finish(
                reason="AwaitingActivation",
                message="waiting for the agent to answer the credential challenge",
                bound=False,
            )
        try:
            check_activation(
                proof=_b64(activation.get("secret"), "activation.secret", 256),
                secret_sha256=str(cred.get("secretSHA256", "")),
            )
        except errors.VerificationError as err:
            self.challenge = {"credential": _credential(keys, self.entropy)}
            return self.failed(err, bound=False, recheck=RETRY_AFTER_FAILURE)
        if trust.get("ekSHA256") != keys.fingerprint:
            # another TPM (a first enrolment, or an EK change allowed): its counters are its
            # own; the same TPM's stay, so that a new AK cannot hide a reboot
            _forget(trust, _CLOCK_KEYS)
        trust.update({"akName": keys.ak_name, "ekSHA256": keys.fingerprint})
        self.challenge = self.ask()  # an agent binding AK after AK gets no quote judged per AK
        bound_msg = f"AK {keys.ak_name[:16]}… bound to EK {keys.fingerprint[:16]}…"
        return self.finish(
            reason="AkBound",
            message="AK bound to the EK; waiting for the first quote",
            bound=True,
            events=(Event("Normal", "AkBound", bound_msg),),
        )

    def judge_quote(
        self,
        keys: _Keys,
        evidence: Mapping[str, Any],
        answered_nonces: frozenset[bytes],
    ) -> Step:
        """Evidence answering the outstanding nonce: verify it and make the verdict."""
        mp, now, trust, readmit = self.mp, self.now, self.trust, self.readmit
        nonce = bytes.fromhex(str(self.challenge["nonce"]))
        issued = parse_ts(self.challenge.get("issuedAt")) or now
        _readmit_counters(trust, readmit)
        try:
            cls = self.member_class()
            parsed = parse_evidence(evidence)
            result = verify_quote(parsed, self.expectation(keys, nonce, answered_nonces, cls))
            matched, until = _reference_set(
                parsed, result.pcrs, str(self.policy.pcr_bank), cls, now
            )
            _raise_if_late(issued, mp.attestation.valid_for, now)
        except errors.VerificationError as err:
            _forget(trust, ("referenceSet", *_LOG_KEYS))  # nothing matched or verified now
            # a reboot (new clock baseline) or a late answer is asked again at once
            self.challenge = _nonce_challenge(
                self.policy, self.entropy, now, _retry_at(err, trust, now)
            )
            return self.failed(err, bound=True, answered=nonce, recheck=RETRY_AFTER_FAILURE)
        was_trusted = trust.get("verdict") == Verdict.TRUSTED
        trust.pop("countersWentBack", None)  # they verified: no longer behind
        held = _hold_for_readmission(trust, readmit, mp, now, result.clock)
        if held is not None:
            self.challenge = _nonce_challenge(self.policy, self.entropy, now, now + self.interval)
            return self.finish(
                reason="AwaitingReadmission",
                message=held,
                bound=True,
                outcome="AwaitingReadmission",
                answered=nonce,
            )
        _record_verdict(trust, result=result, policy=self.policy, mp=mp, now=now, issued=issued)
        trust.update({"memberClass": cls.name, "level": mp.granted})
        if mp.ek_scope is not None:  # why it holds no higher level
            trust["message"] += f"; held at level {mp.granted}: {mp.ek_scope}"
        # status.trust.referenceSet: the reference set the verdict's event log matched
        if matched is None:
            trust.pop("referenceSet", None)
        else:
            trust["referenceSet"] = matched.name
            trust["message"] += f"; reference set {matched.name}"
            _within_window(trust, until)
        trust["references"] = relied_on(cls, trust.get("referenceSet"))
        # the event log this verdict replayed against the signed PCRs: what `gtvp policy
        # learn --member` may learn from (the agent can rewrite its evidence at any time)
        digest = _replayed_log_digest(parsed, result.pcrs, str(self.policy.pcr_bank))
        if digest is None:
            _forget(trust, _LOG_KEYS)
        else:  # and the PCRs its replay was checked on (a selection may grow later)
            trust["eventLogSHA256"] = digest
            trust["eventLogPCRs"] = sorted(result.pcrs)
            trust["eventLogBank"] = str(self.policy.pcr_bank)
        spread = JITTER if was_trusted else FIRST_SPREAD
        # one interval on, but never later than the new verdict needs its next quote by (an
        # agent that answers late must not push the next nonce past the point where its
        # silence would still hold it for a readmission)
        needed = issued + mp.attestation.valid_for - _answer_time(mp)
        at = max(now, min(_next_quote(now, self.interval, self.entropy, spread), needed))
        self.challenge = _nonce_challenge(self.policy, self.entropy, now, at)
        events = (
            ()
            if was_trusted
            else (Event("Normal", "Trusted", f"quote verified; level {mp.granted}"),)
        )
        return self.finish(
            reason="QuoteVerified",
            message=trust["message"],
            bound=True,
            events=events,
            outcome="Verified",
            answered=nonce,
        )

    def asks_for_the_policys_pcrs(self) -> bool:
        """Whether the outstanding challenge asks for the bank and PCRs the policy selects."""
        asked = tuple(int(p) for p in self.challenge.get("pcrs") or ())
        return self.challenge.get("pcrBank") == self.policy.pcr_bank and asked == tuple(
            self.policy.pcrs
        )

    def wait(self) -> Step:
        """No answer to judge: bring a spent verdict's next quote forward, and publish the
        next nonce once it is due (the first one at once). A nonce is only ever handed out
        when due, so an agent cannot answer ahead of time: after a failure the next one
        comes RETRY_AFTER_FAILURE later, however fast the agent writes."""
        _ask_now_if_spent(self.trust, self.challenge, self.now, self.interval)
        if self.judged_elsewhere():
            _ask_now(self.challenge, self.now)
        if not self.challenge.get("nonce"):
            due = parse_ts(self.challenge.get("answerAfter"))
            if due is None or due <= self.now:
                self.challenge = self.ask()
        if not self.trust.get("verdict"):
            return self.finish(
                reason="AwaitingQuote", message="waiting for the first quote", bound=True
            )
        return self.finish(
            reason=str(self.trust.get("reason", "AwaitingQuote")),
            message=str(self.trust.get("message", "waiting for the next quote")),
            bound=True,
        )

    def ask(self) -> ChallengeStatus:
        """The next quote asked for now, but no sooner than RETRY_AFTER_FAILURE (or the
        level's interval, if shorter) after the last judgement (`verifiedAt`): however an
        agent or its host makes the operator ask again (a spent verdict, a rewritten bootID,
        a new AK), it gets no quote judged faster than that. A failed judgement's own retry
        is not held back this way: only a reboot or a late answer asks again at once, and
        neither can be repeated at will. Nor does it hold a quote back past the time a
        standing Trusted verdict needs it by (its expiry less the time an agent is given to
        answer): a policy edit to a longer interval must not expire verdicts."""
        last = parse_ts(self.trust.get("verifiedAt"))
        floor = min(RETRY_AFTER_FAILURE, self.interval)
        at = self.now if last is None else max(self.now, last + floor)
        expires = parse_ts(self.trust.get("expiresAt"))
        if self.trust.get("verdict") == Verdict.TRUSTED and expires is not None:
            at = min(at, max(self.now, expires - _answer_time(self.mp)))
        return _nonce_challenge(self.policy, self.entropy, self.now, at)

    def node_boot(self, boot_id: str | None) -> None:
        """The Node reports another boot (kubelet's bootID) than the one last seen: the host
        rebooted, or something wrote its Node's status. A fresh nonce is asked for at once,
        so that no verdict rests on a quote asked for before the boot the host runs now (a
        quote the old boot made, handed in after the reboot); a standing Trusted verdict is
        spent (no new placement or migration rests on it; its Node's labels come off) until
        that quote is judged: the TPM's counters tell whether the host rebooted (`Rebooted`).
        The node's word takes trust away for one quote, never more: running VMs stay."""
        if not boot_id:
            return
        seen = self.trust.get("nodeBootID")
        self.trust["nodeBootID"] = boot_id
        if not isinstance(seen, str) or not other_boot(seen, boot_id):
            return  # first seen (a new member, an older gtvp's status), or the same boot
        if self.trust.get("verdict") == Verdict.TRUSTED:
            # until a quote of this boot verifies, whatever the Node says next (root there
            # can write its bootID back to the old one): nothing is released on this verdict
            self.trust["bootUnquoted"] = True
        self.challenge = self.ask()  # root rewriting its bootID gets no quote judged per write
        if self.trust.get("verdict") == Verdict.TRUSTED:
            (before, before_uid), (after, after_uid) = boot_parts(seen), boot_parts(boot_id)
            what = (
                f"another boot (bootID {before[:36]} -> {after[:36]})"
                if before and after and before != after
                else f"another Node object under its name (uid {before_uid[:36]} -> "
                f"{after_uid[:36]})"
            )
            message = (
                f"its Node reports {what}: no new placement or migration rests on this verdict "
                "until a quote of the boot it runs now is judged (asked for now)"
            )
            self.trust.update({"usesLeft": 0, "message": message})
            self.noted = (*self.noted, Event("Warning", "NodeRebooted", message))

    # --- shared ------------------------------------------------------------------------------

    def member_class(self) -> MemberClass:
        """The member's class; one that cannot be resolved judges nothing (fail closed)."""
        if self.mp.member_class is None:
            raise self.unknown_class()
        return self.mp.member_class

    def unknown_class(self) -> errors.UnknownMemberClass:
        name, policy = self.mp.class_name, self.policy
        have = ", ".join(sorted(policy.member_classes)) or "none"
        what = (
            f"member class {name!r} is not defined in SecurityPolicy {policy.name}"
            if name
            else f"the Member names no memberClass and SecurityPolicy {policy.name} has no "
            "defaultMemberClass"
        )
        return errors.UnknownMemberClass(
            f"{what} (its classes: {have}), so there are no reference values to judge a "
            "quote by and none is judged: set Member.spec.memberClass to one of them (or give "
            "the policy that class or a defaultMemberClass)"
        )

    def judged_level(self) -> int:
        """The level the Trusted verdict was judged at (the current one when unrecorded)."""
        try:
            return int(self.trust.get("level", self.mp.granted))
        except (TypeError, ValueError):
            return 0

    def judged_elsewhere(self) -> bool:
        """A Trusted verdict judged under another class or a lower level than applies now:
        the new ones need a fresh quote judged under them."""
        mc = self.mp.member_class
        if self.trust.get("verdict") != Verdict.TRUSTED or mc is None:
            return False
        judged_class = self.trust.get("memberClass", mc.name)
        return judged_class != mc.name or self.mp.granted > self.judged_level()

    def published_level(self) -> int:
        """The member's level while Trusted: never above the level its verdict was judged
        at (a higher one waits for a fresh quote); a lower one applies at once."""
        ceiling = min(self.mp.granted, self.judged_level())
        return max((lv.level for lv in self.policy.levels if lv.level <= ceiling), default=0)

    def expectation(
        self, keys: _Keys, nonce: bytes, answered_nonces: frozenset[bytes], mc: MemberClass
    ) -> Expectation:
        reference = quote_reference(
            pcr_bank=str(self.challenge.get("pcrBank")),
            pcrs=tuple(int(p) for p in self.challenge.get("pcrs") or ()),
            golden=mc.golden,
            event_log_required=mc.event_log_required,
            forbidden_digests=mc.forbidden_digests,
        )
        return Expectation.of(
            reference,
            ak=keys.ak,
            nonce=nonce,
            signer=keys.signer,
            answered_nonces=answered_nonces,
            last_clock=_last_clock(self.trust),
        )

    def failed(self, err: errors.VerificationError, *, unbind: bool = False, **kw: Any) -> Step:
        """Untrusted with the error's reason and the reason as the outcome; a Warning event
        on the transition only (the same failure every cycle is one event, not one a cycle)."""
        trust = self.trust
        repeat = trust.get("verdict") == Verdict.UNTRUSTED and trust.get("reason") == err.reason
        # lateness and a configuration slip are no sign of tampering: never wait for a human
        tampering = not isinstance(err, _NOT_TAMPERING)
        if not self.mp.attestation.auto_recover and tampering:
            trust["awaitingReadmission"] = True
        if isinstance(err, errors.CounterWentBack):
            trust["countersWentBack"] = True  # until a readmission takes them as they are
            self.readmit_used()
        elif tampering and trust.get("awaitingReadmission"):
            self.readmit_used()
        trust.update(
            {
                "verdict": Verdict.UNTRUSTED.value,
                "reason": err.reason,
                "message": err.message[:2000],
                "verifiedAt": format_ts(self.now),
                "usesLeft": 0,
            }
        )
        trust.pop("expiresAt", None)
        if unbind:  # the EK pin (ekSHA256) and the TPM's counters stay: only the AK goes
            _forget(trust, ("akName",))
        return self.finish(
            reason=err.reason,
            message=err.message,
            events=() if repeat else (Event("Warning", err.reason, err.message),),
            outcome=err.reason,
            **kw,
        )

    def readmit_used(self) -> None:
        """A readmission answers a failure already seen: the `gtvp.io/readmit` value on the
        Member when a failure that waits for one is judged (set ahead, or for an earlier
        failure) readmits nothing; only a value set after it does."""
        if self.readmit:
            self.trust["readmitToken"] = self.readmit

    def finish(
        self,
        *,
        reason: str,
        message: str,
        bound: bool,
        events: tuple[Event, ...] = (),
        outcome: str | None = None,
        answered: bytes | None = None,
        recheck: dt.timedelta | None = None,
    ) -> Step:
        """The Step: phase from the verdict, expiry applied whatever path led here."""
        now, trust = self.now, self.trust
        events = (*self.noted, *events)
        # expiry applies in every phase: whatever the agent wrote (or withdrew), a verdict
        # past its expiresAt is Untrusted (fail closed)
        expired = _expire_if_due(trust, self.mp, now, self.asked_at, self.policy)
        if expired is not None:
            events = (*events, expired)
            outcome = outcome or expired.reason
            reason, message = expired.reason, expired.message
        expires = parse_ts(trust.get("expiresAt"))
        trusted = trust.get("verdict") == Verdict.TRUSTED and expires is not None and now < expires
        phase = self.phase(trusted=trusted, bound=bound)
        new_status: dict[str, Any] = {
            "phase": phase.value,
            "level": self.published_level() if trusted and not self.maintenance else 0,
            "trust": trust,
            "challenge": self.challenge,
            "effectivePolicy": _effective_policy(self.policy, self.mp),
            "belowSince": below_since(
                self.below_before, self.published_level() if trusted else 0, now
            ),
            "conditions": _conditions(
                self.conditions_before,
                now,
                {
                    "Ready": (
                        phase == MemberPhase.TRUSTED,
                        phase.value if phase == MemberPhase.TRUSTED else reason,
                        message,
                    ),
                    "Enrolled": (
                        bound,
                        "AkBound" if bound else reason,
                        "AK bound to the EK by credential activation" if bound else message,
                    ),
                    "Attested": (
                        trusted,
                        trust.get("reason", reason) or reason,
                        str(trust.get("message", message)),
                    ),
                },
            ),
        }
        recheck = recheck or self.interval
        due = parse_ts(self.challenge.get("answerAfter"))
        if not self.challenge.get("nonce") and due is not None and due > now:
            recheck = min(recheck, due - now)  # its nonce is published then
        if (
            answered is None
            and self.asked_at is not None
            and "pcrs" in self.challenge
            and _asked_at(self.challenge) != self.asked_at
        ):
            # a nonce replaced unanswered (another boot seen, another PCR selection): the
            # host was asked from the first one on, whatever replaced it
            self.challenge["askedAt"] = format_ts(self.asked_at)
        if expired is not None and trust.get("awaitingReadmission"):
            self.readmit_used()
        if trusted and expires is not None:
            recheck = min(recheck, max(expires - now, dt.timedelta(seconds=1)))
        return Step(new_status, events, outcome, answered, recheck)

    def phase(self, *, trusted: bool, bound: bool) -> MemberPhase:
        if self.maintenance:
            return MemberPhase.MAINTENANCE
        if trusted:
            return MemberPhase.TRUSTED
        if self.trust.get("verdict") and self.trust.get("reason") != "NoPolicy":
            # it held or was refused a verdict: never back to Pending
            return MemberPhase.UNTRUSTED
        if not bound and not self.enrollment:
            return MemberPhase.PENDING
        return MemberPhase.ENROLLING


def _reference_set(
    ev: Evidence,
    quoted: Mapping[int, bytes],
    bank: str,
    cls: MemberClass,
    now: dt.datetime,
) -> tuple[ReferenceSet | None, dt.datetime | None]:
    """The reference set of the member's class that its verified quote's event log matches
    (None when the class has none), and until when its boot stays accepted
    (`refvalues.accepted_until`; None: no end); raises why none does (fail closed)."""
    if not cls.reference_sets:
        return None, None
    if not ev.event_log:
        raise errors.EventLogMissing(
            f"member class {cls.name} is judged on the event log (referenceSets) and the agent "
            "sent none (is /sys/kernel/security/tpm0/binary_bios_measurements readable by the "
            "agent?)"
        )
    log = replay_event_log(ev.event_log)
    matched = appraise(log, quoted, bank, cls.reference_sets, now)
    if matched.not_after is None:
        return matched, None
    return matched, accepted_until(log, bank, cls.reference_sets, now)


def _replayed_log_digest(ev: Evidence, quoted: Mapping[int, bytes], bank: str) -> str | None:
    """SHA-256 of the evidence's event log when its replay gives every PCR the verified
    quote signed (None: no log, or one that is not what the TPM measured)."""
    if not ev.event_log:
        return None
    try:
        check_replay(replay_event_log(ev.event_log), quoted, bank, quoted)
    except errors.VerificationError:
        return None
    return hashlib.sha256(ev.event_log).hexdigest()


def _effective_policy(policy: Policy, mp: MemberPolicy) -> dict[str, Any]:
    if mp.member_class is not None:
        cls = mp.member_class.name
    else:
        cls = f"{mp.class_name} (not in the policy)" if mp.class_name else "(none)"
    return {
        "policy": policy.name,
        "memberClass": cls,
        "level": mp.level,
        "interval": f"{int(mp.attestation.interval.total_seconds())}s",
        "validFor": f"{int(mp.attestation.valid_for.total_seconds())}s",
        "maxUses": mp.attestation.max_uses,
        "onUntrusted": mp.attestation.on_untrusted,
    }


def _record_verdict(
    trust: TrustStatus,
    *,
    result: QuoteResult,
    policy: Policy,
    mp: MemberPolicy,
    now: dt.datetime,
    issued: dt.datetime,
) -> None:
    against = "the event log" if result.used_event_log else "golden values"
    trust.update(
        {
            "verdict": Verdict.TRUSTED.value,
            "reason": "QuoteVerified",
            "message": (
                f"quote verified against {against} ({policy.pcr_bank}:{list(policy.pcrs)})"
            ),
            "verifiedAt": format_ts(now),
            "expiresAt": format_ts(issued + mp.attestation.valid_for),
            "usesLeft": mp.attestation.max_uses,
        }
    )
    _keep_clock(trust, result.clock)
    trust.pop("bootUnquoted", None)  # a quote of the boot the host runs now


def _bounds_tightened(
    trust: TrustStatus, challenge: ChallengeStatus, policy: Policy, now: dt.datetime
) -> None:
    """A policy edit that shortened the `validFor` of the level a standing verdict was
    judged at, or lowered its `maxUses`, applies at once, not at the next quote (which a
    compromised agent may withhold): `expiresAt` no later than `verifiedAt` + `validFor`
    (the nonce it answered was issued before), but never sooner than one `interval` from
    now, with the next quote asked for now, so that an honest agent answers in time and no
    member is expired (or held for readmission) by the edit alone; `usesLeft` no more than
    `maxUses`. The judged level's settings, not the level the member may hold now: a raised
    level waits for a fresh quote judged at it. A judged level the policy dropped: the
    highest level below it, at which the verdict is published now (found by a review: the
    verdict kept the dropped level's bounds)."""
    if trust.get("verdict") != Verdict.TRUSTED:
        return
    judged = int(trust.get("level", 0) or 0)
    below = [lv for lv in policy.levels if lv.level <= judged]
    if not below:
        return  # no level left at or under it: the member's published level is none
    level = max(below, key=lambda lv: lv.level)
    verified, expires = parse_ts(trust.get("verifiedAt")), parse_ts(trust.get("expiresAt"))
    if verified is not None and expires is not None:
        bound = max(verified + level.valid_for, now + level.interval)
        if bound < expires:
            trust["expiresAt"] = format_ts(bound)
            _ask_now(challenge, now)
    if int(trust.get("usesLeft", 0) or 0) > level.max_uses:
        trust["usesLeft"] = level.max_uses


ANSWER_GRACE = dt.timedelta(seconds=5)
"""How long before a verdict's expiry its next nonce must have been published for the
expiry to be the host's doing (its agent did not answer in time): a nonce published later,
or none (the operator was down or late), holds no host for readmission."""


def _answer_time(mp: MemberPolicy) -> dt.timedelta:
    """The time an agent is given to answer a nonce before a verdict expires: ANSWER_GRACE,
    or the level's `validFor` - `interval` if shorter."""
    att = mp.attestation
    return min(ANSWER_GRACE, att.valid_for - att.interval)


def _within_window(trust: TrustStatus, until: dt.datetime | None) -> None:
    """A verdict resting on reference sets ends when the last set accepting its boot does
    (`until`, `refvalues.accepted_until`; `notAfter`: the documented way to retire an old
    shim or dbx), not `validFor` past it (found by a review: a boot matched just before the
    date stayed Trusted that much longer)."""
    expires = parse_ts(trust.get("expiresAt"))
    if until is not None and expires is not None and until < expires:
        trust["expiresAt"] = format_ts(until)


def _set_ended(trust: TrustStatus, policy: Policy, expires: dt.datetime) -> str | None:
    """The message when a verdict's expiry is the end of a reference set of the class it
    was judged under (`_within_window`; None: not)."""
    name = trust.get("memberClass")
    cls = policy.member_classes.get(name) if isinstance(name, str) else None
    if cls is None:
        return None
    ended = [
        r
        for r in cls.reference_sets
        if r.not_after is not None and r.not_after.replace(microsecond=0) == expires
    ]
    if not ended:
        return None
    return (
        f"reference set {ended[0].name}, the last that accepted this verdict's boot, ended at "
        f"{format_ts(expires)} (notAfter): a quote judged by the policy's current sets is "
        "asked for; the policy's calendar, not the host's doing: no readmission"
    )


def _expire_if_due(
    trust: TrustStatus,
    mp: MemberPolicy,
    now: dt.datetime,
    asked_at: dt.datetime | None,
    policy: Policy,
) -> Event | None:
    """Turn a Trusted verdict past its expiresAt into VerdictExpired (updates `trust`), or
    ReferenceSetExpired when that was its reference set's notAfter (`_within_window`).
    `asked_at`: when the nonce outstanding as the step began was issued (None: none was)."""
    expires = parse_ts(trust.get("expiresAt"))
    if trust.get("verdict") != Verdict.TRUSTED or (expires is not None and now < expires):
        return None
    ended = None if expires is None else _set_ended(trust, policy, expires)
    if ended is not None:
        trust.update(
            {
                "verdict": Verdict.UNTRUSTED.value,
                "reason": ReferenceSetExpired.reason,
                "message": ended,
                "usesLeft": 0,
            }
        )
        trust.pop("expiresAt", None)
        return Event("Warning", ReferenceSetExpired.reason, ended)
    att = mp.attestation
    asked = asked_at is not None and (expires is None or asked_at <= expires - _answer_time(mp))
    message = f"no fresh quote verified within validFor ({att.valid_for}): " + (
        "the agent did not answer the nonce it was asked (agent stopped, network "
        "partition, TPM gone)"
        if asked
        else "no nonce was asked for in time (the operator or the API server down or "
        "late), so this holds no one for readmission"
    )
    trust.update(
        {
            "verdict": Verdict.UNTRUSTED.value,
            "reason": "VerdictExpired",
            "message": message,
            "usesLeft": 0,
        }
    )
    if not att.auto_recover and asked:
        trust["awaitingReadmission"] = True
    trust.pop("expiresAt", None)
    return Event("Warning", "VerdictExpired", message)


def _class_resolved(
    trust: TrustStatus,
    challenge: ChallengeStatus,
    cls: MemberClass,
    level: int,
    now: dt.datetime,
) -> None:
    """The member's class resolves: a verdict from before the class and level it was judged
    under were recorded is taken as judged under these; a refusal for want of a class is
    replaced by waiting for a quote judged under it (the member stays Untrusted), asked for
    now: a fixed class or policy brings the member back without waiting for its next
    routine quote."""
    if trust.get("verdict") == Verdict.TRUSTED:
        trust.setdefault("memberClass", cls.name)
        trust.setdefault("level", level)
    elif trust.get("reason") == errors.UnknownMemberClass.reason:
        trust["reason"] = "AwaitingQuote"
        trust["message"] = (
            f"member class {cls.name!r} applies now; waiting for a quote judged by it"
        )
        _ask_now(challenge, now)


def relied_on(cls: MemberClass, reference_set: str | None) -> str:
    """SHA-256 (hex) of the reference values a verdict under `cls` rests on: the class's
    golden values, forbidden digests and whether it needs a log, and the content of the
    reference set its log matched (another set added beside it changes nothing). A PCR
    added to the selection changes them too: every class verifies exactly the quoted PCRs
    (a golden value or a rule of every set for each, none for another: `parse_policy`)."""
    matched = next((r for r in cls.reference_sets if r.name == reference_set), None)
    content = {
        "golden": sorted((p, v.hex()) for p, v in cls.golden.items()),
        "forbidden": sorted(cls.forbidden_digests),
        "eventLogRequired": cls.event_log_required,
        # no set matched: the class had none (a class with sets refuses a log matching
        # none), so a first set added is a change of what the verdict rested on
        "referenceSet": (
            bool(cls.reference_sets) if reference_set is None else _set_content(matched)
        ),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def references_revoked(trust: Mapping[str, Any], policy: Policy) -> str | None:
    """Why a Trusted verdict (`status.trust`) no longer rests on reference values `policy`
    holds: its EK is revoked, the member class it was judged under is gone, or the values
    it recorded as relied on (`references`) changed. None when it still does, when it is not Trusted
    (other checks refuse it) or when it recorded neither (a verdict from before they were
    recorded is taken as resting on the current values, as `_references_kept` does).

    Read straight from the policy in force, this holds from the moment the policy changes,
    before the operator's next look at the member spends the verdict's uses."""
    if trust.get("verdict") != Verdict.TRUSTED:
        return None
    if trust.get("ekSHA256") in policy.revoked_eks:
        return "the policy revokes this member's EK (spec.ekTrust.revokedEKs)"
    name = trust.get("memberClass")
    if not isinstance(name, str):
        return None
    cls = policy.member_classes.get(name)
    if cls is None:
        return f"the policy no longer has member class {name}, which this verdict was judged under"
    recorded = trust.get("references")
    if recorded is None or recorded == relied_on(cls, trust.get("referenceSet")):
        return None
    return (
        f"the policy changed the reference values of member class {name} this verdict rested "
        "on; a quote judged by them has not verified yet"
    )


def _set_content(ref: ReferenceSet | None) -> Any:
    if ref is None:
        return "removed"
    content: dict[str, Any] = {
        "name": ref.name,
        "pcrs": [
            [
                rule.pcr,
                sorted([e.event_type, e.variable or "", sorted(e.digests)] for e in rule.events),
            ]
            for rule in ref.pcrs
        ],
        "secureBoot": ref.secure_boot,
        "window": [_iso(ref.not_before), _iso(ref.not_after)],
    }
    if ref.startup_locality is not None:  # only when set: no verdict of a set without it
        content["startupLocality"] = ref.startup_locality  # changes on an upgrade
    return content


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else format_ts(t)


def _references_kept(
    trust: TrustStatus,
    challenge: ChallengeStatus,
    cls: MemberClass,
    policy: Policy,
    now: dt.datetime,
) -> tuple[Event, ...]:
    """A policy edit changed the reference values a Trusted verdict rested on (a golden
    value or the matched reference set revoked, or the member class it was judged under
    removed): no new decision rests on it (its uses are spent) and its next quote is asked
    for now, to be judged by the new values. A verdict from before they were recorded is
    taken as resting on the current ones."""
    if trust.get("verdict") != Verdict.TRUSTED:
        return ()
    judged = trust.get("memberClass")
    if judged != cls.name:
        if not isinstance(judged, str):
            return ()
        if judged in policy.member_classes:
            # another class now (`judged_elsewhere` asks for a quote judged by it): until it
            # comes, the verdict rests on the values of the class it was judged under, and
            # a revocation there is one (found by a review: it was let stand)
            cls = policy.member_classes[judged]
        else:
            return _rests_on_nothing(
                trust,
                challenge,
                now,
                f"the policy no longer has member class {judged}, which this verdict was judged "
                "under: no new placement or migration rests on it until a quote judged under "
                f"class {cls.name} verifies (asked for now)",
            )
    now_relied = relied_on(cls, trust.get("referenceSet"))
    if trust.setdefault("references", now_relied) == now_relied:
        return ()
    return _rests_on_nothing(
        trust,
        challenge,
        now,
        f"the policy changed the reference values of member class {cls.name} this verdict "
        "rested on: no new placement or migration rests on it until a quote judged by "
        "them verifies (asked for now)",
    )


def _rests_on_nothing(
    trust: TrustStatus, challenge: ChallengeStatus, now: dt.datetime, message: str
) -> tuple[Event, ...]:
    """Spend a revoked verdict's uses and ask for its next quote now; the Event, the first
    time."""
    _ask_now(challenge, now)
    first = int(trust.get("usesLeft", 0) or 0) > 0
    trust.update({"usesLeft": 0, "message": message})
    return (Event("Normal", "ReferencesChanged", message),) if first else ()


def _ask_now(challenge: ChallengeStatus, now: dt.datetime) -> None:
    """Bring the next quote forward to now (never later than it already is)."""
    answer_after = parse_ts(challenge.get("answerAfter"))
    if answer_after is not None and answer_after > now:
        challenge["answerAfter"] = format_ts(now)


def _ask_now_if_spent(
    trust: TrustStatus,
    challenge: ChallengeStatus,
    now: dt.datetime,
    interval: dt.timedelta,
) -> None:
    """A verdict that backed maxUses decisions is spent: ask for the next quote now. A
    challenge issued under a longer interval (the policy changed) is brought forward."""
    answer_after = parse_ts(challenge.get("answerAfter"))
    if answer_after is not None and answer_after > now + interval:
        challenge["answerAfter"] = format_ts(now + interval)
    if trust.get("verdict") == Verdict.TRUSTED and int(trust.get("usesLeft", 0) or 0) <= 0:
        _ask_now(challenge, now)


def _readmit_counters(trust: TrustStatus, readmit: str | None) -> None:
    """A TPM whose counters went back (TPM2_Clear sets them to 0; so does a TPM state put
    back from a copy) fails every quote from then on: an administrator's readmission (a new
    `gtvp.io/readmit` value), after checking the host, takes the TPM's counters as they are
    now, from this quote on, and readmits the member (consumed here: it resets nothing
    twice)."""
    if readmit and readmit != trust.get("readmitToken") and trust.get("countersWentBack"):
        _forget(trust, _CLOCK_KEYS)
        trust.pop("countersWentBack", None)
        trust.pop("awaitingReadmission", None)
        trust["readmitToken"] = readmit


def _hold_for_readmission(
    trust: TrustStatus,
    readmit: str | None,
    mp: MemberPolicy,
    now: dt.datetime,
    clock: ClockState,
) -> str | None:
    """Keep a member that failed at a no-autoRecover level Untrusted until readmitted.

    Returns the message when it is held (and updates `trust`), None when it may be Trusted.
    """
    if not trust.get("awaitingReadmission"):
        return None
    if readmit and readmit != trust.get("readmitToken"):
        trust.pop("awaitingReadmission", None)
        trust["readmitToken"] = readmit
        return None
    message = (
        f"a fresh quote verified, but level {mp.attestation.level} ({mp.attestation.name}) "
        "does not recover without a human: after checking the host, run kubectl annotate "
        'member NAME gtvp.io/readmit="$(date +%s)" --overwrite'
    )
    trust.update(
        {
            "verdict": Verdict.UNTRUSTED.value,
            "reason": "AwaitingReadmission",
            "message": message,
            "verifiedAt": format_ts(now),
            "usesLeft": 0,
        }
    )
    _keep_clock(trust, clock)
    trust.pop("expiresAt", None)
    return message


_TrustKey = Literal[
    "akName",
    "clock",
    "resetCount",
    "restartCount",
    "firmwareVersion",
    "referenceSet",
    "eventLogSHA256",
    "eventLogPCRs",
    "eventLogBank",
]
_CLOCK_KEYS: tuple[_TrustKey, ...] = ("clock", "resetCount", "restartCount", "firmwareVersion")
_LOG_KEYS: tuple[_TrustKey, ...] = ("eventLogSHA256", "eventLogPCRs", "eventLogBank")


def _forget(trust: TrustStatus, keys: tuple[_TrustKey, ...]) -> None:
    for k in keys:
        trust.pop(k, None)


def _credential(keys: _Keys, entropy: bytes) -> CredentialChallenge:
    secret = hashlib.sha256(b"secret" + entropy).digest()
    ch = make_activation_challenge(
        ek_public_area=keys.ek_area, ak_name=bytes.fromhex(keys.ak_name), secret=secret
    )
    return {
        "id": hashlib.sha256(b"id" + entropy).hexdigest()[:32],
        "akName": keys.ak_name,
        "ekSHA256": keys.fingerprint,
        "credentialBlob": base64.b64encode(ch.credential_blob).decode(),
        "secret": base64.b64encode(ch.encrypted_secret).decode(),
        "secretSHA256": ch.secret_sha256,
    }


__all__ = ["ENTROPY_BYTES", "Event", "MemberPolicy", "Step", "attestation_step", "parse_evidence"]
