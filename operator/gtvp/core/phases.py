"""The words of a Member's status: its phase, its verdict, and the shapes of `status.trust`
and `status.challenge` as the operator writes them.

`MemberPhase` and `Verdict` are `StrEnum`s, so they compare equal to the strings the API
server holds (`status.phase == MemberPhase.TRUSTED` whether phase came from a watch or from
core). What core writes into a status is the plain string (`.value`): a status must dump
as JSON and YAML alike, and YAML's safe dumper refuses str subclasses.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypedDict


class MemberPhase(StrEnum):
    """`Member.status.phase` (docs/attestation.md has the machine)."""

    PENDING = "Pending"  # no agent has enrolled the member's TPM
    ENROLLING = "Enrolling"  # enrolment under way: EK checked, AK not yet bound or quoted
    TRUSTED = "Trusted"  # a fresh verdict of Trusted
    UNTRUSTED = "Untrusted"  # held or was refused a verdict: never back to Pending
    MAINTENANCE = "Maintenance"  # spec.maintenance: level 0 whatever the verdict


class Verdict(StrEnum):
    """`Member.status.trust.verdict`: the outcome of the last verification."""

    TRUSTED = "Trusted"
    UNTRUSTED = "Untrusted"


class TrustStatus(TypedDict, total=False):
    """`Member.status.trust`: the operator's verdict and what it is pinned to."""

    verdict: str  # a Verdict
    reason: str
    message: str
    verifiedAt: str
    expiresAt: str
    usesLeft: int
    ekSHA256: str
    akName: str
    resetCount: int
    restartCount: int
    clock: int
    firmwareVersion: str  # the TPM's firmware version in the last quote (decimal)
    awaitingReadmission: bool
    readmitToken: str
    memberClass: str  # the member class the Trusted verdict's quote was judged under
    level: int  # the level it was judged at (the published level never exceeds it)
    referenceSet: str  # the measured-boot reference set its event log matched, if any
    eventLogSHA256: str  # the event log it replayed against the signed PCRs, if any
    eventLogPCRs: list[int]  # the PCRs that replay was checked on
    eventLogBank: str  # in this bank
    references: str  # SHA-256 of the reference values it rested on (`relied_on`)
    nodeBootID: str  # the Node's boot (kubelet's bootID) the operator last saw
    bootUnquoted: bool  # the Node reported another boot since the Trusted verdict's quote
    countersWentBack: bool  # the TPM's counters went back: a readmission takes them as now


class CredentialChallenge(TypedDict, total=False):
    """`Member.status.challenge.credential`: MakeCredential binding the AK to the EK."""

    id: str
    akName: str
    ekSHA256: str
    credentialBlob: str
    secret: str
    secretSHA256: str


class ChallengeStatus(TypedDict, total=False):
    """`Member.status.challenge`: what the operator asks of the agent next."""

    nonce: str
    pcrBank: str
    pcrs: list[int]
    issuedAt: str
    answerAfter: str
    askedAt: str  # the first nonce of this round, when one was replaced unanswered
    credential: CredentialChallenge
