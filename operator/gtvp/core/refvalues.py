"""Measured-boot reference sets: which boots a member class accepts, judged on the event log.

Golden PCR values break on every firmware, shim or kernel update. A reference set instead
lists, per PCR, the event digests it allows by event type (firmware blobs, drivers,
bootloaders, Secure Boot variables ...), and may require Secure Boot on or off. The
appraisal (`appraise`) is pure and fails closed:

1. the replayed event log must reproduce every quoted PCR a reference set governs, and PCR 7
   when a set checks Secure Boot (else `EventLogMismatch`): the events appraised are the
   ones the TPM measured;
2. every event on a governed PCR (EV_NO_ACTION aside: it extends nothing) must be allowed
   by the set: its type, its digest in the policy's bank and, for a UEFI variable event
   whose rule names a variable, that variable; the first event that is not is named;
3. `secureBoot: Enabled` (or `Disabled`) needs the log's EV_EFI_VARIABLE_DRIVER_CONFIG
   event for `SecureBoot` on PCR 7 whose data hashes to its digest (so it is what was
   measured) and says 1 (or 0);
4. `startupLocality: N` needs the log's StartupLocality to be N (PCR 0 governed: its
   replay begins there), so a TPM software started itself on a boot the firmware did not
   measure (locality 0), with good events extended from the OS, is refused.

A member class may hold several reference sets at once (a staged rollout): the first one
that accepts the log and whose validity window (notBefore, notAfter) holds now matches,
and the member's status names it. A log only an expired (or not yet valid) set accepts is
`ReferenceSetExpired`; one no set accepts is `EventNotAllowed`, naming the first refused
event of each set. `learn` proposes a reference set from a log, for a person to review.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gtvp.core import errors
from gtvp.core.eventlog import (
    EV_EFI_VARIABLE_DRIVER_CONFIG,
    EV_NO_ACTION,
    Event,
    EventLog,
    efi_variable,
    event_type_name,
    startup_locality,
)

SECURE_BOOT_PCR = 7
SECURE_BOOT_STATES = ("Enabled", "Disabled")


class EventNotAllowed(errors.VerificationError):
    """An event on a governed PCR is in no reference set of the member's class."""

    reason = "EventNotAllowed"


class ReferenceSetExpired(errors.VerificationError):
    """The log matches only reference sets whose validity window does not hold now."""

    reason = "ReferenceSetExpired"


@dataclass(frozen=True)
class EventRule:
    """Events of one type that a PCR may hold: their digests in the policy's bank (lower-case
    hex) and, for UEFI variable events, the variable they must be (None: any)."""

    event_type: int
    digests: frozenset[str]
    variable: str | None = None


@dataclass(frozen=True)
class PcrRule:
    pcr: int
    events: tuple[EventRule, ...]

    @functools.cached_property
    def allowed(self) -> frozenset[tuple[int, str | None, str]]:
        """(type, variable, digest) triples; variable None allows any variable."""
        return frozenset((r.event_type, r.variable, d) for r in self.events for d in r.digests)


@dataclass(frozen=True)
class ReferenceSet:
    """One accepted boot configuration of a member class, valid within its window."""

    name: str
    pcrs: tuple[PcrRule, ...]
    secure_boot: str | None = None  # "Enabled", "Disabled" or None (not checked)
    not_before: dt.datetime | None = None
    not_after: dt.datetime | None = None
    startup_locality: int | None = None
    """The locality the TPM must have been started from (the log's StartupLocality, which
    PCR 0's replay begins at); None: not checked."""

    @property
    def rule_pcrs(self) -> frozenset[int]:
        """The PCRs whose every event this set appraises (its rules)."""
        return frozenset(r.pcr for r in self.pcrs)

    @property
    def governed(self) -> frozenset[int]:
        """The PCRs the log must reproduce: those with rules, and PCR 7 when the set checks
        Secure Boot (else a SecureBoot event the TPM never measured could be believed)."""
        pcrs = frozenset(r.pcr for r in self.pcrs)
        if self.startup_locality is not None:
            pcrs |= {0}  # the locality is what PCR 0's replay starts at
        return pcrs | {SECURE_BOOT_PCR} if self.secure_boot is not None else pcrs

    def window_problem(self, now: dt.datetime) -> str | None:
        """Why the set is not valid at `now` (None: it is)."""
        if self.not_before is not None and now < self.not_before:
            return f"is valid only from {_ts(self.not_before)} (notBefore)"
        if self.not_after is not None and now >= self.not_after:
            return f"expired at {_ts(self.not_after)} (notAfter)"
        return None


def _ts(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe(index: int, event: Event, bank: str) -> str:
    """An event as a person finds it in `gtvp eventlog replay`: index, PCR, type, variable,
    digest."""
    var = efi_variable(event)
    what = event_type_name(event.event_type) + (f" {var[0]}" if var else "")
    digest = event.digests.get(bank, b"").hex() or f"(no {bank} digest)"
    return f"event {index} (PCR {event.pcr}, {what}, {bank} {digest})"


def _allowed(rule: PcrRule, event: Event, bank: str) -> bool:
    digest = event.digests.get(bank)
    if digest is None:
        return False
    allowed = rule.allowed
    d = digest.hex()
    if (event.event_type, None, d) in allowed:
        return True
    var = efi_variable(event)
    return var is not None and (event.event_type, var[0], d) in allowed


def secure_boot_state(log: EventLog, bank: str) -> str | None:
    """ "Enabled" or "Disabled" as the log's measured SecureBoot variable says (the last
    one on PCR 7 whose data hashes to its digest); None when the log holds none."""
    state = None
    for e in log.events:
        if e.pcr != SECURE_BOOT_PCR or e.event_type != EV_EFI_VARIABLE_DRIVER_CONFIG:
            continue
        var = efi_variable(e)
        digest = e.digests.get(bank)
        if var is None or var[0] != "SecureBoot" or digest is None:
            continue
        if not hmac.compare_digest(hashlib.new(bank, e.data).digest(), digest):
            continue  # data that is not what was measured says nothing
        state = "Enabled" if var[1] == b"\x01" else "Disabled"
    return state


def set_problem(log: EventLog, bank: str, ref: ReferenceSet) -> str | None:
    """Why `ref` refuses the log (the first refused event, or Secure Boot); None: accepts."""
    rules = {r.pcr: r for r in ref.pcrs}
    for i, e in enumerate(log.events):
        rule = rules.get(e.pcr)
        if rule is None or e.event_type == EV_NO_ACTION:
            continue
        if not _allowed(rule, e, bank):
            return f"{describe(i, e, bank)} is not allowed"
    if ref.startup_locality is not None:
        started = startup_locality(log)
        if started != ref.startup_locality:
            return (
                f"it requires a TPM started at locality {ref.startup_locality} (its firmware's "
                f"StartupLocality), the log shows locality {started}: a boot the firmware did "
                "not measure, whose PCRs software filled"
            )
    if ref.secure_boot is not None:
        got = secure_boot_state(log, bank)
        if got != ref.secure_boot:
            said = f"Secure Boot {got}" if got else "no measured SecureBoot variable"
            return f"it requires Secure Boot {ref.secure_boot}, the log shows {said}"
    return None


def check_replay(
    log: EventLog, quoted: Mapping[int, bytes], bank: str, pcrs: Iterable[int]
) -> None:
    """Every governed PCR that was quoted equals the log's replay (EventLogMismatch)."""
    replayed = log.pcrs.get(bank)
    if replayed is None:
        raise errors.EventLogMismatch(f"the event log has no {bank} digests")
    for p in sorted(pcrs):
        got = quoted.get(p)
        if got is None:
            raise errors.EventLogMismatch(
                f"PCR {p} is governed by a reference set but the quote does not cover it"
            )
        want = replayed.get(p, b"\0" * len(got))
        if not hmac.compare_digest(got, want):
            raise errors.EventLogMismatch(
                f"PCR {p} is {got.hex()} but replaying the event log gives {want.hex()}: the "
                "log is not what the TPM measured, so its events cannot be appraised"
            )


def appraise(
    log: EventLog,
    quoted: Mapping[int, bytes],
    bank: str,
    sets: tuple[ReferenceSet, ...],
    now: dt.datetime,
) -> ReferenceSet:
    """The reference set the quoted boot matches, or the VerificationError saying why none."""
    check_replay(log, quoted, bank, frozenset().union(*(s.governed for s in sets)))
    refused: list[str] = []
    out_of_window: list[str] = []
    for ref in sets:
        problem = set_problem(log, bank, ref)
        if problem is not None:
            refused.append(f"{ref.name!r}: {problem}")
            continue
        window = ref.window_problem(now)
        if window is None:
            return ref
        out_of_window.append(f"reference set {ref.name!r} {window}")
    if out_of_window:
        raise ReferenceSetExpired(
            "the event log matches no reference set valid now: "
            + "; ".join(out_of_window)
            + (f" (and the other sets refuse it: {'; '.join(refused)})" if refused else "")
            + ". Add a reference set for this boot (gtvp policy learn) or update the host"
        )
    raise EventNotAllowed(
        "the event log matches no reference set of the member's class: "
        + "; ".join(refused)
        + ". If this is an intended update, add a reference set for it (gtvp policy learn)"
    )


def accepted_until(
    log: EventLog, bank: str, sets: tuple[ReferenceSet, ...], now: dt.datetime
) -> dt.datetime | None:
    """How long the boot in `log` stays accepted: the latest notAfter among the sets that
    accept it and hold now (None: one of them has no end, or none does). Not only the set
    `appraise` matched first: a later, overlapping set may run longer."""
    ends: list[dt.datetime] = []
    for ref in sets:
        if ref.window_problem(now) is not None or set_problem(log, bank, ref) is not None:
            continue
        if ref.not_after is None:
            return None
        ends.append(ref.not_after)
    return max(ends, default=None)


def learn(log: EventLog, bank: str, pcrs: Iterable[int], *, name: str) -> dict[str, object]:
    """A reference set (as the SecurityPolicy's YAML holds it) that accepts exactly what
    `log` shows on `pcrs`: per PCR, its events' digests grouped by type (and by variable
    for UEFI variable events), in log order, plus Secure Boot's measured state. A PCR of
    `pcrs` with no event gets a rule allowing none (the set must rule every PCR its class
    verifies by the log)."""
    wanted = set(pcrs)
    by_pcr: dict[int, dict[tuple[str, str | None], list[str]]] = {}
    for e in log.events:
        if e.pcr not in wanted or e.event_type == EV_NO_ACTION or bank not in e.digests:
            continue
        var = efi_variable(e)
        key = (event_type_name(e.event_type), var[0] if var else None)
        digests = by_pcr.setdefault(e.pcr, {}).setdefault(key, [])
        d = e.digests[bank].hex()
        if d not in digests:
            digests.append(d)
    out: dict[str, object] = {"name": name}
    started = startup_locality(log)
    if started and 0 in wanted:
        # an H-CRTM starts PCR 0 at its locality: software alone cannot
        out["startupLocality"] = started
    state = secure_boot_state(log, bank)
    if state is not None and SECURE_BOOT_PCR in wanted:
        out["secureBoot"] = state
    out["pcrs"] = [
        {
            "pcr": p,
            "events": [
                {"type": t, **({"variable": v} if v else {}), "digests": ds}
                for (t, v), ds in groups.items()
            ],
        }
        for p, groups in sorted({p: by_pcr.get(p, {}) for p in wanted}.items())
    ]
    return out
