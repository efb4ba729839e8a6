"""Verification errors: one type per way evidence can fail, each with a searchable reason code.

Every failure the verifier reports is a `VerificationError` subclass whose `reason` is a
stable CamelCase code (the one written to `Member.status.trust.reason` and to the
`gtvp_attestations_total{reason=...}` metric) and whose message says what happened and
what a person can do. Malformed input is its own family (`MalformedEvidence`): never a
crash, never an accept.
"""

from __future__ import annotations

from typing import ClassVar


class VerificationError(Exception):
    """Evidence did not verify. `reason` is a stable code; str() is the human message."""

    reason: ClassVar[str] = "VerificationFailed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class MalformedEvidence(VerificationError):
    """Bytes that do not parse as the TPM structure they claim to be (truncated, oversized,
    trailing data, wrong base64, unknown algorithm identifiers)."""

    reason = "MalformedEvidence"


class UnsupportedAlgorithm(VerificationError):
    """A well-formed structure that names an algorithm gtvp does not accept."""

    reason = "UnsupportedAlgorithm"


class WeakHashAlgorithm(VerificationError):
    """The quote was signed with a hash gtvp does not accept (e.g. SHA-1)."""

    reason = "WeakHashAlgorithm"


class BadSignature(VerificationError):
    """The signature is not the AK's over the attested bytes."""

    reason = "BadSignature"


class NotTpmGenerated(VerificationError):
    """magic is not TPM_GENERATED_VALUE: the TPM did not produce these bytes."""

    reason = "NotTpmGenerated"


class NotAQuote(VerificationError):
    """The attestation structure is not of type TPM_ST_ATTEST_QUOTE."""

    reason = "NotAQuote"


class SignerMismatch(VerificationError):
    """qualifiedSigner is not the name of the member's bound AK."""

    reason = "SignerMismatch"


class NonceMismatch(VerificationError):
    """extraData is not the outstanding nonce."""

    reason = "NonceMismatch"


class NonceReplayed(VerificationError):
    """The quote answers a nonce that was already answered."""

    reason = "NonceReplayed"


class PcrSelectionMismatch(VerificationError):
    """The quote covers other PCRs than the challenge asked for."""

    reason = "PcrSelectionMismatch"


class PcrDigestMismatch(VerificationError):
    """The reported PCR values do not hash to the digest the TPM signed."""

    reason = "PcrDigestMismatch"


class ClockWentBack(VerificationError):
    """The TPM clock went backwards without a reset."""

    reason = "ClockWentBack"


class CounterWentBack(VerificationError):
    """resetCount or restartCount decreased: an old quote or another TPM."""

    reason = "CounterWentBack"


class FirmwareWentBack(CounterWentBack):
    """The TPM's firmware version (TPMS_CLOCK_INFO.firmwareVersion, signed in every quote)
    is lower than in an earlier quote: its firmware was rolled back, perhaps to a version
    with a known flaw (the EK survives, and firmware is measured into no PCR). Held for an
    administrator's readmission, as counters that went back."""

    reason = "FirmwareWentBack"


class Rebooted(VerificationError):
    """resetCount increased: the host rebooted since the last quote; its new boot chain is
    verified by a fresh quote before it is trusted again."""

    reason = "Rebooted"

    def __init__(self, message: str, clock: object = None) -> None:
        super().__init__(message)
        self.clock = clock
        """The TPM's new clock state (a `quote.ClockState`): the baseline for the next quote."""


class TpmRestarted(Rebooted):
    """restartCount increased, resetCount did not: a TPM Restart (TPM2_Shutdown(STATE)
    before a reboot) or a Resume from suspend, judged like a reboot: a quote made before it
    makes no verdict, the next one (of the running boot) does, and a level with
    `autoRecover: false` holds the host for readmission (a host that restarts into a good
    boot for each quote and back into a bad one is told from a resume by no quote)."""

    reason = "Rebooted"


class PcrMismatch(VerificationError):
    """A PCR differs from the policy's golden value for the member's class."""

    reason = "PcrMismatch"


class EventLogMissing(VerificationError):
    """The policy needs an event log and the evidence has none."""

    reason = "EventLogMissing"


class EventLogMismatch(VerificationError):
    """Replaying the event log does not reproduce the quoted PCR values."""

    reason = "EventLogMismatch"


class ForbiddenEvent(VerificationError):
    """The event log contains a digest the policy forbids."""

    reason = "ForbiddenEvent"


class UnexplainedPcr(VerificationError):
    """A quoted PCR has neither a golden value nor an event log that reproduces it."""

    reason = "UnexplainedPcr"


class AkAttributesInvalid(VerificationError):
    """The AK is not a restricted, fixed, TPM-generated signing key."""

    reason = "AkAttributesInvalid"


class AkNameMismatch(VerificationError):
    """The AK name the agent reported is not the name of the AK public area."""

    reason = "AkNameMismatch"


class ActivationFailed(VerificationError):
    """The credential-activation proof does not match: the AK is not in the EK's TPM."""

    reason = "ActivationFailed"


class EkCertificateInvalid(VerificationError):
    """The EK certificate is unreadable, expired, not an EK certificate, or not for this EK."""

    reason = "EkCertificateInvalid"


class EkCertificateUntrusted(VerificationError):
    """No path from the EK certificate to a CA in the policy's bundle."""

    reason = "EkCertificateUntrusted"


class EkCertificateMissing(VerificationError):
    """No EK certificate, and no administrator approval of this EK."""

    reason = "EkCertificateMissing"


class EkChanged(VerificationError):
    """The EK differs from the one this member is pinned to (possible identity takeover);
    refused until an administrator approves the new EK."""

    reason = "EkChanged"


class EkNotApproved(VerificationError):
    """The policy binds only EKs an administrator approved (spec.ekTrust.requireApproval)
    and this member's is not: a configuration step still to do, no sign of tampering."""

    reason = "EkNotApproved"


class EkRevoked(VerificationError):
    """The EK is on the policy's revocation list (spec.ekTrust.revokedEKs): whatever its
    certificate or an approval says, this TPM proves nothing any more."""

    reason = "EkRevoked"


class EvidenceTooLate(VerificationError):
    """Evidence that verified, but arrived after the verdict it would make had expired
    (validFor counts from the nonce's issue); not a sign of tampering."""

    reason = "EvidenceTooLate"


class DuplicateEk(VerificationError):
    """Another member already presents this EK: one TPM cannot prove two hosts."""

    reason = "DuplicateEk"


class EnrolmentChanged(VerificationError):
    """The agent withdrew its enrolment or published another AK while the member held a
    verdict: the verdict is dropped at once and the member re-enrols from Untrusted."""

    reason = "EnrolmentChanged"


class UnknownMemberClass(VerificationError):
    """The member's class cannot be resolved (spec.memberClass names no class of the policy,
    or neither it nor the policy's defaultMemberClass names one): there are no reference
    values to judge a quote by, so none is judged (fail closed). A configuration slip, not
    a sign of tampering."""

    reason = "UnknownMemberClass"


class EvidenceUnprocessable(VerificationError):
    """What the agent published made a parser or the TPM library fail in a way no check
    names (a certificate extension that is not DER, a key the library cannot load): the
    member is Untrusted, as for any failed check, until its agent publishes well-formed
    data. Never a crash of the cycle, which would leave the last verdict standing."""

    reason = "EvidenceUnprocessable"


ALL_REASONS: tuple[str, ...] = tuple(
    sorted(
        c.reason
        for c in list(globals().values())
        if isinstance(c, type) and issubclass(c, VerificationError) and c is not VerificationError
    )
)
