"""Verify a TPM 2.0 quote: pure, ordered, stopping at the first failure with a named reason.

Order (each step raises its own `VerificationError` subclass):
1. the AK is a restricted signing key (an unrestricted key can sign forged attestations);
2. signature by the AK over the TPMS_ATTEST bytes (ECDSA, RSASSA, RSAPSS; hash as signed;
   SHA-1 refused);
3. magic = TPM_GENERATED_VALUE; 4. type = ATTEST_QUOTE;
5. qualifiedSigner = the AK's qualified name under the member's EK;
6. extraData = the outstanding nonce (a nonce answers once: an answered one is a replay);
7. the quoted PCR selection is the one asked for, and the reported values cover it;
8. PCR digest = hash of the reported PCR values;
9. clock, resetCount, restartCount never go back; a reset is reported as a reboot;
10. PCR values: the class's golden values, or an event-log replay that reproduces them and
    whose events the policy accepts.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from gtvp.core import errors
from gtvp.core.digest_cache import DigestCache, digest_of
from gtvp.core.eventlog import EventLog, parse_event_log
from gtvp.core.tpm_wire import (
    ALG_ECC,
    ALG_ECDSA,
    ALG_NULL,
    ALG_RSA,
    ALG_RSAPSS,
    ALG_RSASSA,
    ALG_SHA1,
    HASH_BY_NAME,
    HASH_NAMES,
    HASH_SIZES,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_QUOTE,
    Attest,
    PcrSelection,
    PublicArea,
    Signature,
    parse_attest,
    parse_signature,
)
from gtvp.core.weak_keys import WHY_ROCA, roca_weak

_HASHES: dict[int, hashes.HashAlgorithm] = {
    HASH_BY_NAME["sha256"]: hashes.SHA256(),
    HASH_BY_NAME["sha384"]: hashes.SHA384(),
    HASH_BY_NAME["sha512"]: hashes.SHA512(),
}
_ECDSA = {alg: ec.ECDSA(h) for alg, h in _HASHES.items()}


@dataclass(frozen=True)
class ClockState:
    """The TPM's clock and counters as seen in an accepted quote."""

    clock: int
    reset_count: int
    restart_count: int
    firmware: int | None = None  # the TPM's firmware version (None: not recorded yet)


@dataclass(frozen=True)
class Evidence:
    """What the agent sent: the signed bytes, the signature, PCR values, the event log."""

    attest: bytes
    signature: bytes
    pcr_bank: str
    pcr_values: Mapping[int, bytes]
    event_log: bytes | None = None


@dataclass(frozen=True)
class QuoteReference:
    """What one policy generation expects of every quote of one member class under one PCR
    selection: built once (`quote_reference`, keyed by its content) and shared by every
    member and every cycle, with what is derived from it worked out on first use."""

    pcr_bank: str
    pcrs: tuple[int, ...]
    golden: Mapping[int, bytes] | None
    event_log_required: bool = False
    forbidden_digests: frozenset[str] = frozenset()

    @functools.cached_property
    def wanted_selection(self) -> tuple[PcrSelection, ...]:
        return (PcrSelection(HASH_BY_NAME[self.pcr_bank], tuple(sorted(self.pcrs))),)

    @functools.cached_property
    def digest_size(self) -> int:
        return HASH_SIZES[HASH_BY_NAME[self.pcr_bank]]

    @functools.cached_property
    def pcr_set(self) -> frozenset[int]:
        return frozenset(self.pcrs)

    @functools.cached_property
    def golden_concatenated(self) -> bytes | None:
        """All selected PCRs' golden values in order, when golden covers every one."""
        golden = self.golden or {}
        if not all(p in golden for p in self.pcrs):
            return None
        return b"".join(golden[p] for p in sorted(self.pcrs))


@functools.lru_cache(maxsize=256)
def _reference(
    pcr_bank: str,
    pcrs: tuple[int, ...],
    golden: tuple[tuple[int, bytes], ...] | None,
    event_log_required: bool,
    forbidden_digests: frozenset[str],
) -> QuoteReference:
    return QuoteReference(
        pcr_bank,
        pcrs,
        None if golden is None else dict(golden),
        event_log_required,
        forbidden_digests,
    )


def quote_reference(
    *,
    pcr_bank: str,
    pcrs: tuple[int, ...],
    golden: Mapping[int, bytes] | None,
    event_log_required: bool = False,
    forbidden_digests: frozenset[str] = frozenset(),
) -> QuoteReference:
    """The shared `QuoteReference` for exactly this content (another golden value, bank or
    PCR is another key: a changed policy never finds the old generation's reference)."""
    return _reference(
        pcr_bank,
        tuple(pcrs),
        None if golden is None else tuple(golden.items()),
        event_log_required,
        forbidden_digests,
    )


@dataclass(frozen=True)
class Expectation:
    """What the verifier expects of one quote."""

    ak: PublicArea
    nonce: bytes
    pcr_bank: str
    pcrs: tuple[int, ...]
    signer: bytes | None
    """The AK's qualified name (`ak_qualified_name(ek, ak)`); None skips the check (the CLI
    without --ek-public)."""
    answered_nonces: frozenset[bytes] = frozenset()
    last_clock: ClockState | None = None
    golden: Mapping[int, bytes] | None = field(default_factory=dict)
    """Expected PCR values; None skips step 10 (`gtvp verify-quote` without --golden)."""
    ak_attributes_known: bool = True
    """False when the AK came as a bare PEM key, which carries no TPM attributes."""
    event_log_required: bool = False
    forbidden_digests: frozenset[str] = frozenset()
    reference: QuoteReference | None = field(default=None, compare=False, repr=False)
    """The shared reference these fields were taken from (`Expectation.of`); one that does
    not hold exactly these values is ignored."""

    @classmethod
    def of(
        cls,
        reference: QuoteReference,
        *,
        ak: PublicArea,
        nonce: bytes,
        signer: bytes | None,
        answered_nonces: frozenset[bytes] = frozenset(),
        last_clock: ClockState | None = None,
    ) -> Expectation:
        """An expectation for one quote under a shared reference (one policy generation)."""
        return cls(
            ak=ak,
            nonce=nonce,
            pcr_bank=reference.pcr_bank,
            pcrs=reference.pcrs,
            signer=signer,
            answered_nonces=answered_nonces,
            last_clock=last_clock,
            golden=reference.golden,
            event_log_required=reference.event_log_required,
            forbidden_digests=reference.forbidden_digests,
            reference=reference,
        )

    @functools.cached_property
    def ref(self) -> QuoteReference:
        r = self.reference
        if (
            r is not None
            and r.golden is self.golden
            and r.pcr_bank == self.pcr_bank
            and r.pcrs == self.pcrs
            and r.event_log_required == self.event_log_required
            and r.forbidden_digests == self.forbidden_digests
        ):
            return r
        return QuoteReference(
            self.pcr_bank,
            tuple(self.pcrs),
            self.golden,
            self.event_log_required,
            self.forbidden_digests,
        )

    @property
    def wanted_selection(self) -> tuple[PcrSelection, ...]:
        return self.ref.wanted_selection

    @property
    def digest_size(self) -> int:
        return self.ref.digest_size

    @property
    def golden_concatenated(self) -> bytes | None:
        """All selected PCRs' golden values in order, when golden covers every one."""
        return self.ref.golden_concatenated


@dataclass(frozen=True)
class QuoteResult:
    """A verified quote."""

    clock: ClockState
    pcrs: Mapping[int, bytes]
    used_event_log: bool


REQUIRED_AK_ATTRIBUTES = {
    "restricted": 1 << 16,
    "sign": 1 << 18,
    "fixedTPM": 1 << 1,
    "fixedParent": 1 << 4,
    "sensitiveDataOrigin": 1 << 5,
}
FORBIDDEN_AK_ATTRIBUTES = {"decrypt": 1 << 17}


_REQUIRED_MASK = sum(REQUIRED_AK_ATTRIBUTES.values())
_FORBIDDEN_MASK = sum(FORBIDDEN_AK_ATTRIBUTES.values())


def _check_ak_key(ak: PublicArea) -> None:
    """The AK is not an RSA key whose private half can be computed from its public one."""
    if roca_weak(ak.key):
        raise errors.AkAttributesInvalid(
            f"the AK is refused: {WHY_ROCA}; anyone who read it could forge quotes. Update "
            "the TPM's firmware, or run the agent with its default ECC AK (not --ak rsa)"
        )


def check_ak_attributes(ak: PublicArea) -> None:
    """An AK must be a restricted, non-duplicable, TPM-generated signing-only key, named
    with SHA-256 or stronger (its name is what a credential and every quote are bound to:
    a SHA-1 name could be shared by a key crafted to collide with it), and not an RSA key
    whose private half can be computed from its public one (ROCA)."""
    _check_ak_key(ak)
    if (
        ak.attributes & _REQUIRED_MASK == _REQUIRED_MASK
        and not ak.attributes & _FORBIDDEN_MASK
        and (ak.type != ALG_RSA or ak.key.key_size >= 2048)
        and ak.name_alg != ALG_SHA1
    ):
        return
    if ak.name_alg == ALG_SHA1:
        raise errors.AkAttributesInvalid(
            "the AK is named with SHA-1 (its nameAlg): gtvp binds credentials and quotes "
            "only to AKs named with SHA-256, SHA-384 or SHA-512; re-enrol the agent (it "
            "creates its AK with a SHA-256 name)"
        )
    missing = [n for n, bit in REQUIRED_AK_ATTRIBUTES.items() if not ak.attributes & bit]
    extra = [n for n, bit in FORBIDDEN_AK_ATTRIBUTES.items() if ak.attributes & bit]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks {', '.join(missing)}")
        if extra:
            parts.append(f"has {', '.join(extra)}")
        raise errors.AkAttributesInvalid(
            f"the AK {' and '.join(parts)}: only a restricted signing key that cannot leave "
            "its TPM can vouch for a quote; re-enrol the agent (it creates a proper AK)"
        )
    if isinstance(ak.key, rsa.RSAPublicKey) and ak.key.key_size < 2048:
        raise errors.AkAttributesInvalid(
            f"the AK is RSA-{ak.key.key_size}; at least 2048 is needed"
        )


def check_signature(ak: PublicArea, sig: Signature, message: bytes) -> None:
    """Raise unless `sig` is the AK's signature over `message`."""
    if sig.hash_alg == ALG_SHA1 or sig.hash_alg not in _HASHES:
        raise errors.WeakHashAlgorithm(
            f"the quote is signed with {HASH_NAMES.get(sig.hash_alg, hex(sig.hash_alg))}; "
            "gtvp accepts SHA-256, SHA-384 and SHA-512"
        )
    if ak.scheme != ALG_NULL and (ak.scheme != sig.scheme or ak.scheme_hash != sig.hash_alg):
        raise errors.BadSignature("the signature's scheme is not the one the AK is restricted to")
    h = _HASHES[sig.hash_alg]
    try:
        if (
            sig.scheme == ALG_ECDSA
            and ak.type == ALG_ECC
            and isinstance(ak.key, ec.EllipticCurvePublicKey)
        ):
            ak.key.verify(encode_dss_signature(sig.r, sig.s), message, _ECDSA[sig.hash_alg])
        elif sig.scheme == ALG_RSASSA and isinstance(ak.key, rsa.RSAPublicKey):
            ak.key.verify(sig.rsa_sig, message, padding.PKCS1v15(), h)
        elif sig.scheme == ALG_RSAPSS and isinstance(ak.key, rsa.RSAPublicKey):
            pss = padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.AUTO)
            ak.key.verify(sig.rsa_sig, message, pss, h)
        else:
            raise errors.BadSignature(
                "the signature's algorithm does not match the AK's key type (another key?)"
            )
    except InvalidSignature as exc:
        raise errors.BadSignature(
            "the signature does not verify with the member's AK: the quote was altered or "
            "signed by another key"
        ) from exc


_HASH_FUNCTIONS = {
    alg: getattr(hashlib, name) for alg, name in HASH_NAMES.items() if alg in _HASHES
}


def pcr_digest(values: list[bytes], hash_alg: int) -> bytes:
    return _digest(b"".join(values), hash_alg)


def _digest(data: bytes, hash_alg: int) -> bytes:
    fn = _HASH_FUNCTIONS.get(hash_alg)
    if fn is None:
        return hashlib.new(HASH_NAMES[hash_alg], data).digest()
    digest: bytes = fn(data).digest()
    return digest


EVENT_LOGS_KEPT = 8
"""Parsed event logs kept (a parsed log of the largest size takes a few MiB)."""
_EVENT_LOGS: DigestCache[EventLog] = DigestCache(EVENT_LOGS_KEPT)


def replay_event_log(event_log: bytes) -> EventLog:
    """The parsed, replayed log (memoized by its digest, a few at a time: the judgement of
    one quote reads it more than once; a log that does not parse is not kept)."""
    return _EVENT_LOGS.get(digest_of(event_log), lambda: parse_event_log(event_log))


def _check_counters(a: Attest, last: ClockState | None) -> ClockState:
    now = ClockState(a.clock, a.reset_count, a.restart_count, a.firmware_version)
    if last is None:
        return now
    if last.firmware is not None and a.firmware_version < last.firmware:
        # before the reset checks: a rollback comes with a reboot, and a reboot takes the
        # new firmware version as the baseline
        raise errors.FirmwareWentBack(
            f"the TPM's firmware version went back from {last.firmware:#x} to "
            f"{a.firmware_version:#x}: its firmware was rolled back (to a version with a known "
            "flaw, perhaps); after checking the host, readmit it"
        )
    if a.reset_count < last.reset_count:
        raise errors.CounterWentBack(
            f"TPM resetCount went from {last.reset_count} to {a.reset_count}: an old quote or "
            "another TPM"
        )
    if a.reset_count > last.reset_count:
        raise errors.Rebooted(
            f"the host rebooted (TPM resetCount {last.reset_count} -> {a.reset_count}); its "
            "new boot is verified by the next quote",
            clock=now,
        )
    if a.restart_count < last.restart_count:
        raise errors.CounterWentBack(
            f"TPM restartCount went from {last.restart_count} to {a.restart_count}"
        )
    if a.restart_count > last.restart_count:
        # a TPM Restart (Shutdown(STATE), then a reboot whose firmware sends Startup(CLEAR))
        # resets the PCRs and measures a new boot while resetCount stays: a reboot too (a
        # quote made in a brief good boot, handed in from a bad one, would hide it); a
        # Resume from suspend also counts here, which costs one more quote
        raise errors.TpmRestarted(
            f"the host rebooted or resumed (TPM restartCount {last.restart_count} -> "
            f"{a.restart_count}); its new boot is verified by the next quote",
            clock=now,
        )
    if a.clock < last.clock:
        raise errors.ClockWentBack(
            f"TPM clock went back from {last.clock} ms to {a.clock} ms without a reset"
        )
    return now


def _check_pcr_values(ev: Evidence, exp: Expectation, joined: bytes) -> bool:
    """Step 12; `joined` is the reported values of the selected PCRs, in order."""
    whole = exp.golden_concatenated
    if (
        whole is not None
        and not ev.event_log
        and not exp.event_log_required
        and not exp.forbidden_digests
        and hmac.compare_digest(joined, whole)
    ):
        return False  # the common case: every PCR has its golden value

    log: EventLog | None = None
    if ev.event_log:
        log = replay_event_log(ev.event_log)
        if exp.forbidden_digests:
            bad = log.all_digests(exp.pcr_bank) & exp.forbidden_digests
            if bad:
                raise errors.ForbiddenEvent(
                    f"the event log measures {sorted(bad)[0]}, which the policy forbids"
                )
    elif exp.event_log_required or exp.forbidden_digests:
        raise errors.EventLogMissing(
            "the policy "
            + ("requires an event log" if exp.event_log_required else "forbids event digests")
            + " and the agent sent none (is "
            "/sys/kernel/security/tpm0/binary_bios_measurements readable by the agent?)"
        )
    used_log = False
    golden = exp.golden or {}
    for p in exp.pcrs:
        got = ev.pcr_values[p]
        want = golden.get(p)
        if want is not None:
            if not hmac.compare_digest(got, want):
                raise errors.PcrMismatch(
                    f"PCR {p} ({exp.pcr_bank}) is {got.hex()}, the golden value is {want.hex()}"
                )
            if log is not None and exp.forbidden_digests:
                # the log is judged (no forbidden digest in it): it must be the log of what
                # the TPM signed here too, or a host running a forbidden binary whose PCR
                # still has its golden value would leave the event out of its log
                _replays_to(log, p, got, exp.pcr_bank)
            continue
        if log is None:
            raise errors.UnexplainedPcr(f"PCR {p} has no golden value and no event log explains it")
        _replays_to(log, p, got, exp.pcr_bank)
        used_log = True
    return used_log


def _replays_to(log: EventLog, pcr: int, got: bytes, bank: str) -> None:
    """Replaying `log` on `pcr` gives `got`, the value the TPM signed, or EventLogMismatch."""
    if bank not in log.pcrs:
        raise errors.EventLogMismatch(f"the event log has no {bank} digests")
    replayed = log.pcrs[bank].get(pcr, b"\0" * HASH_SIZES[HASH_BY_NAME[bank]])
    if not hmac.compare_digest(got, replayed):
        raise errors.EventLogMismatch(
            f"PCR {pcr} is {got.hex()} but replaying the event log gives {replayed.hex()}: "
            "something was measured that the log does not show"
        )


def verify_quote(ev: Evidence, exp: Expectation) -> QuoteResult:
    """Verify one quote against what is expected; raise the first failure."""
    if exp.ak_attributes_known:
        check_ak_attributes(exp.ak)
    else:  # a bare public key (`gtvp verify-quote --ak-pem`): its attributes are unknown, its
        _check_ak_key(exp.ak)  # modulus is not
    sig = parse_signature(ev.signature)
    check_signature(exp.ak, sig, ev.attest)
    a = parse_attest(ev.attest)
    if a.magic != TPM_GENERATED_VALUE:
        raise errors.NotTpmGenerated(
            f"magic is 0x{a.magic:08x}, not TPM_GENERATED_VALUE: the TPM did not make these bytes"
        )
    if a.type != TPM_ST_ATTEST_QUOTE:
        raise errors.NotAQuote(f"attestation type is 0x{a.type:04x}, not a quote (0x8018)")
    if exp.signer is not None and not hmac.compare_digest(a.qualified_signer, exp.signer):
        raise errors.SignerMismatch(
            f"the quote names signer {a.qualified_signer.hex()}, not the member's AK under its "
            f"EK ({exp.signer.hex()})"
        )
    if not hmac.compare_digest(a.extra_data, exp.nonce):
        if a.extra_data in exp.answered_nonces:
            raise errors.NonceReplayed(
                f"nonce {a.extra_data.hex()} was already answered: a replayed quote"
            )
        raise errors.NonceMismatch(
            f"the quote answers nonce {a.extra_data.hex() or '(none)'}, the outstanding nonce "
            f"is {exp.nonce.hex()}"
        )
    ref = exp.ref
    wanted = ref.wanted_selection
    if a.pcr_selections != wanted:
        raise errors.PcrSelectionMismatch(
            "the quote covers "
            + ", ".join(f"{HASH_NAMES[s.hash_alg]}:{list(s.pcrs)}" for s in a.pcr_selections)
            + f", the challenge asked for {exp.pcr_bank}:{sorted(exp.pcrs)}"
        )
    reported = ev.pcr_values
    if ev.pcr_bank != exp.pcr_bank or reported.keys() != ref.pcr_set:
        raise errors.PcrSelectionMismatch(
            f"the agent reported {ev.pcr_bank}:{sorted(reported)}, the quote covers "
            f"{exp.pcr_bank}:{sorted(exp.pcrs)}"
        )
    size = ref.digest_size
    values = [reported[p] for p in wanted[0].pcrs]
    joined = b"".join(values)
    for v in values:
        if len(v) != size:
            raise errors.MalformedEvidence(
                f"a reported {exp.pcr_bank} PCR value is not {size} bytes"
            )
    if not hmac.compare_digest(_digest(joined, sig.hash_alg), a.pcr_digest):
        raise errors.PcrDigestMismatch(
            "the reported PCR values do not hash to the digest the TPM signed: they were "
            "changed after the quote, or read at another time"
        )
    clock = _check_counters(a, exp.last_clock)
    used_log = _check_pcr_values(ev, exp, joined) if exp.golden is not None else False
    return QuoteResult(clock, {p: ev.pcr_values[p] for p in exp.pcrs}, used_log)
