"""Box attestation: gtvp verifies each Lazy Box's vTPM quote after boot and after migrations.

Pure (docs/boxattest.md). A SecurityPolicy with `spec.boxAttestation` (`caBundle`: the vTPM
CA, `pcr`: 13) gives every box a per-box credential in its cloud-init (`attest_line`); the
box's init measures each component disk into that PCR of its vTPM before mounting it, in
the order it mounts them (`fold`). The guest then talks to gtvp over HTTPS:

- enrol: its EK certificate must chain to the vTPM CA and be for exactly its EK, its AK must
  be a restricted signing key (`check_enrolment`, the member checks of
  `gtvp.core.enrolment`); gtvp answers with MakeCredential for the EK and AK;
- activate: the ActivateCredential answer binds the AK to the EK (`check_activation`);
- challenge: a fresh nonce when gtvp wants a quote (`wants_quote`: never attested, the VMI
  moved to another member, or was restarted), single use, for NONCE_TTL;
- quote: `check_quote` — signature by the bound AK, nonce == qualifying data and not
  expired, PCR selection exactly {pcr} sha256, the presented PCR value hashes to the signed
  digest, the value == the fold of the composed disks' digests (`expected_pcr`), and the
  guest's measurement list folds to it. The result carries a reason code (REASONS).

State lives on the LazyBox (`status.attestation`); this module computes the next state, the
shell (`gtvp.box_attestation`) writes it with the box's resourceVersion as precondition.
Only the SHA-256 of the credential is ever stored or compared.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography import x509

from gtvp.core import errors
from gtvp.core.enrolment import (
    ActivationChallenge,
    ak_facts,
    check_ek_certificate,
    ek_facts,
    make_activation_challenge,
)
from gtvp.core.policy import PolicyError, parse_duration, resettable_pcrs_message
from gtvp.core.quote import Evidence, Expectation, verify_quote
from gtvp.core.timestamps import format_ts, parse_ts
from gtvp.core.tpm_wire import TPM_GENERATED_VALUE

PREFIX: Final = "/boxattest/v1/"
ENROL: Final = PREFIX + "enrol"
ACTIVATE: Final = PREFIX + "activate"
CHALLENGE: Final = PREFIX + "challenge"
QUOTE: Final = PREFIX + "quote"
PATHS: Final = (ENROL, ACTIVATE, CHALLENGE, QUOTE)
MAX_REQUEST_BYTES: Final = 32 * 1024
DEFAULT_PCR: Final = 13
BANK: Final = "sha256"
NONCE_TTL: Final = dt.timedelta(seconds=120)
DEFAULT_DEADLINE: Final = dt.timedelta(minutes=10)
"""How long a box may run on a member without a verified quote there (spec.boxAttestation.
deadline): a guest that never attests, or a host that keeps its channel shut, is then
treated as a mismatch."""
RETRY_AFTER: Final = 10
"""Seconds the guest waits before its next challenge when no quote is wanted."""
ENROL_EVERY: Final = dt.timedelta(seconds=RETRY_AFTER)
"""At most one enrolment per vTPM EK and VMI this often (`status.attestation.lastEnrolments`):
each is a status write (and a MakeCredential), and whoever holds the box's credential
could otherwise have gtvp write the box without pause."""
ENROLS_PER_VMI: Final = 3
"""At most this many enrolments per VMI, of any EKs, within `ENROL_EVERY`."""
ENROL_SKEW: Final = dt.timedelta(seconds=60)
"""How far ahead of this replica's clock another's may have stamped an enrolment that
still counts (one stamped ahead is neither ignored nor dropped from the record)."""
ANSWERED_KEPT: Final = 8
"""How many answered nonces a box's status remembers (a replay is named so)."""
LINE_PREFIX: Final = "#gtvp-attest "
"""The cloud-init user data line carrying the guest's configuration (a comment to cloud-init)."""
CREDENTIAL_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{32,128}")
_NAME: Final = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_HEX64: Final = re.compile(r"[0-9a-f]{64}")

# states (status.attestation.state)
VERIFIED: Final = "Verified"
MISMATCH: Final = "Mismatch"
PENDING: Final = "Pending"
OVERDUE: Final = "Overdue"

# reason codes: quote results and refusals (`gtvp_box_attestations_total{result}`)
COMPONENT_MISMATCH: Final = "ComponentMismatch"
MEASUREMENTS_MISMATCH: Final = "MeasurementsMismatch"
ATTESTATION_OVERDUE: Final = "AttestationOverdue"
NONCE_REPLAYED: Final = "NonceReplayed"
NONCE_EXPIRED: Final = "NonceExpired"
NONCE_UNKNOWN: Final = "NonceUnknown"
BAD_SIGNATURE: Final = "BadSignature"
AK_NOT_BOUND: Final = "AkNotBound"
AK_INVALID: Final = "AkAttributesInvalid"
EK_NOT_TRUSTED: Final = "EkNotTrusted"
EK_CHANGED: Final = "EkChanged"
AK_CHANGED: Final = "AkChanged"
ACTIVATION_FAILED: Final = "ActivationFailed"
STALE_ENROLMENT: Final = "StaleEnrolment"
ENROL_TOO_SOON: Final = "EnrolTooSoon"
QUOTE_INVALID: Final = "QuoteInvalid"
WRONG_CREDENTIAL: Final = "WrongCredential"
NOT_RUNNING: Final = "NotRunning"
NOT_COMPOSED: Final = "NotComposed"
"""The box's VMI does not boot a composition gtvp made for the box (`status.composedBoots`,
`compose.NOT_COMPOSED_MESSAGE`)."""
NOT_REQUIRED: Final = "AttestationNotRequired"
BAD_REQUEST: Final = "BadRequest"
CONFLICT: Final = "Conflict"
UNAVAILABLE: Final = "Unavailable"
"""Not a refusal: gtvp could not answer (the API server failed or timed out under the
request); a 503 saying to ask again, counted under this result."""
REASONS: Final = (
    VERIFIED,
    COMPONENT_MISMATCH,
    MEASUREMENTS_MISMATCH,
    ATTESTATION_OVERDUE,
    NONCE_REPLAYED,
    NONCE_EXPIRED,
    NONCE_UNKNOWN,
    BAD_SIGNATURE,
    AK_NOT_BOUND,
    AK_INVALID,
    EK_NOT_TRUSTED,
    EK_CHANGED,
    AK_CHANGED,
    ACTIVATION_FAILED,
    STALE_ENROLMENT,
    ENROL_TOO_SOON,
    QUOTE_INVALID,
    WRONG_CREDENTIAL,
    NOT_RUNNING,
    NOT_COMPOSED,
    NOT_REQUIRED,
    BAD_REQUEST,
    CONFLICT,
    UNAVAILABLE,
)
HTTP_STATUS: Final = {
    WRONG_CREDENTIAL: 401,
    BAD_REQUEST: 400,
    NONCE_REPLAYED: 409,
    NONCE_EXPIRED: 409,
    NONCE_UNKNOWN: 409,
    STALE_ENROLMENT: 409,
    ENROL_TOO_SOON: 429,
    CONFLICT: 409,
}
"""A refusal's HTTP status (403 for every other reason)."""


class Refused(Exception):
    """A request gtvp refuses; `reason` is one of REASONS, the message says why (never a
    credential)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def status(self) -> int:
        return HTTP_STATUS.get(self.reason, 403)


def _bad(message: str) -> Refused:
    return Refused(BAD_REQUEST, message)


# -- the policy ------------------------------------------------------------------------------


class SettingsError(ValueError):
    """spec.boxAttestation cannot be used; `field` names where."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field = field_path
        self.message = message


@dataclass(frozen=True)
class Settings:
    """A SecurityPolicy's spec.boxAttestation."""

    ca_bundle_pem: str
    pcr: int = DEFAULT_PCR
    deadline: dt.timedelta = DEFAULT_DEADLINE


def attests_boxes(spec: Mapping[str, Any] | None) -> bool:
    """Whether a SecurityPolicy (`spec`) attests boxes; one whose boxAttestation is set but
    unusable does too (its boxes cannot attest: what waits for it waits, fail closed)."""
    if spec is None:
        return False
    try:
        return parse_settings(spec) is not None
    except SettingsError:
        return True


def parse_settings(spec: Mapping[str, Any]) -> Settings | None:
    """spec.boxAttestation of a SecurityPolicy spec (None: boxes are not attested)."""
    raw = spec.get("boxAttestation")
    if raw is None:
        return None
    path = "spec.boxAttestation"
    if not isinstance(raw, Mapping):
        raise SettingsError(path, "must be an object {caBundle: PEM, pcr: 13}")
    pcr = raw.get("pcr", DEFAULT_PCR)
    if isinstance(pcr, bool) or not isinstance(pcr, int) or not 0 <= pcr <= 23:
        raise SettingsError(f"{path}.pcr", f"{pcr!r} is not a PCR index 0..23 (the guest uses 13)")
    resettable = resettable_pcrs_message((pcr,))
    if resettable:  # the guest's software would reset the fold and replay the expected value
        raise SettingsError(f"{path}.pcr", resettable)
    if pcr != DEFAULT_PCR:
        raise SettingsError(
            f"{path}.pcr",
            f"is {pcr}, but gtvp's box init measures every component disk into PCR "
            f"{DEFAULT_PCR}: a quote of PCR {pcr} would show none of them, and every box would "
            "be a ComponentMismatch (its level's onUntrusted, pool-wide)",
        )
    text = raw.get("caBundle")
    if not isinstance(text, str) or "-----BEGIN CERTIFICATE-----" not in text:
        raise SettingsError(
            f"{path}.caBundle",
            "holds no PEM certificate: put the PEM certificate(s) of the CA that certifies "
            "the boxes' vTPM EKs here (the local pool's vTPM CA, or KubeVirt's swtpm CA)",
        )
    try:
        certs = x509.load_pem_x509_certificates(text.encode())
    except ValueError as exc:
        raise SettingsError(
            f"{path}.caBundle", f"cannot be read as PEM X.509 certificates ({exc})"
        ) from exc
    if not certs:
        raise SettingsError(f"{path}.caBundle", "holds no PEM certificate")
    deadline = DEFAULT_DEADLINE
    if raw.get("deadline") is not None:
        try:
            deadline = parse_duration(str(raw["deadline"]), f"{path}.deadline")
        except PolicyError as exc:
            raise SettingsError(exc.field, exc.message) from exc
    return Settings(ca_bundle_pem=text, pcr=pcr, deadline=deadline)


# -- measurements ----------------------------------------------------------------------------


def extend(pcr: bytes, digest: bytes) -> bytes:
    """TPM2_PCR_Extend in the sha256 bank."""
    return hashlib.sha256(pcr + digest).digest()


def fold(digests: Sequence[bytes]) -> bytes:
    """The PCR value after extending a reset PCR by each digest in turn."""
    value = b"\0" * 32
    for d in digests:
        value = extend(value, d)
    return value


@dataclass(frozen=True)
class Disk:
    """One component disk the box init mounts: its serial and the sha256 it is pinned to."""

    serial: str
    digest: bytes


def disks_of(kernel_args: str) -> tuple[Disk, ...]:
    """The pinned component disks on a composed kernel command line (`gtvp.disks=`), in the
    order the box init mounts and measures them (`gtvp.core.compose.kernel_args`)."""
    for word in kernel_args.split():
        if word.startswith("gtvp.disks="):
            out = []
            for item in word.removeprefix("gtvp.disks=").split(","):
                serial, _, hexdigest = item.rpartition(":")
                if not serial or not _HEX64.fullmatch(hexdigest):
                    raise ValueError(f"gtvp.disks entry {item!r} is not <serial>:<sha256 hex>")
                out.append(Disk(serial, bytes.fromhex(hexdigest)))
            return tuple(out)
    return ()


def disks_booted(vmi_spec: Mapping[str, Any]) -> tuple[Disk, ...]:
    """`disks_of` the kernel command line a VMI spec (or a VM template's) boots with."""
    firmware = (vmi_spec.get("domain") or {}).get("firmware") or {}
    return disks_of(str((firmware.get("kernelBoot") or {}).get("kernelArgs") or ""))


def expected_pcr(disks: Sequence[Disk]) -> bytes:
    """What the PCR must hold once the init measured every component disk (mount order)."""
    return fold([d.digest for d in disks])


def component_names(disks: Sequence[Disk], resolved: Sequence[Mapping[str, Any]]) -> list[str]:
    """`name@version` of each disk, in mount order (the box's status.resolved; a disk whose
    component is not listed keeps its serial)."""
    out = []
    for d in disks:
        hit = next(
            (r for r in resolved if str(r.get("name", ""))[: len(d.serial)] == d.serial), None
        )
        out.append(f"{hit.get('name')}@{hit.get('version')}" if hit else d.serial)
    return out


# -- requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request: the box (namespace, name), its credential and the JSON body."""

    path: str
    namespace: str
    box: str
    credential: str = field(repr=False)
    body: Mapping[str, Any] = field(repr=False)


def bearer(authorization: str | None) -> str:
    """The credential of an `Authorization: Bearer <credential>` header."""
    scheme, _, value = (authorization or "").strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not CREDENTIAL_PATTERN.fullmatch(value):
        raise Refused(
            WRONG_CREDENTIAL,
            "send the box's credential from its cloud-init as 'Authorization: Bearer <credential>'",
        )
    return value


def parse_request(path: str, authorization: str | None, raw: bytes) -> Request:
    """The request to `path`; Refused (BadRequest or WrongCredential) when it is not one."""
    if path not in PATHS:
        raise _bad(f"no such endpoint {path!r}: POST to one of {', '.join(PATHS)}")
    credential = bearer(authorization)
    if len(raw) > MAX_REQUEST_BYTES:
        raise _bad(f"the request is longer than {MAX_REQUEST_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"the request is not JSON ({exc})") from exc
    except RecursionError as exc:
        raise _bad("the request is not JSON gtvp reads (nested too deep)") from exc
    if not isinstance(body, dict):
        raise _bad("the request is not a JSON object")
    box = body.get("box")
    ns, _, name = box.partition("/") if isinstance(box, str) else ("", "", "")
    if not _NAME.fullmatch(ns) or not _NAME.fullmatch(name):
        raise _bad("'box' must be '<namespace>/<name>' of the LazyBox")
    return Request(path, ns, name, credential, body)


def b64_field(body: Mapping[str, Any], key: str, what: str, limit: int = 8192) -> bytes:
    """A required standard-base64 field, decoded."""
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(f"'{key}' must be {what}, base64")
    try:
        out = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"'{key}' is not valid base64 ({exc})") from exc
    if len(out) > limit:
        raise _bad(f"'{key}' is {len(out)} bytes, more than {limit}")
    return out


def hex_field(body: Mapping[str, Any], key: str, what: str, size: int) -> bytes:
    value = body.get(key)
    if not isinstance(value, str) or len(value) != 2 * size:
        raise _bad(f"'{key}' must be {what}: {2 * size} hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise _bad(f"'{key}' is not hex ({exc})") from exc


def credential_hash(credential: str) -> str:
    """What is stored of a credential: its SHA-256, hex."""
    return hashlib.sha256(credential.encode("ascii")).hexdigest()


def check_credential(credential: str, att: Mapping[str, Any]) -> None:
    """The credential is the box's current one (else WrongCredential)."""
    stored = att.get("credentialHash")
    if not isinstance(stored, str) or not hmac.compare_digest(credential_hash(credential), stored):
        raise Refused(WRONG_CREDENTIAL, "the credential is not this box's")


# -- configuration for the guest -------------------------------------------------------------


def attest_line(
    *, url: str, namespace: str, box: str, credential: str, ca_pem: str | None, pcr: int
) -> str:
    """The `#gtvp-attest <base64 JSON>` line of the box's cloud-init user data."""
    doc = {
        "v": 1,
        "url": url.rstrip("/"),
        "box": f"{namespace}/{box}",
        "credential": credential,
        "caPem": ca_pem or "",
        "pcr": pcr,
    }
    encoded = base64.b64encode(json.dumps(doc, sort_keys=True).encode()).decode()
    return LINE_PREFIX + encoded


def credential_of(user_data: str) -> str | None:
    """The credential in user data carrying an attest line (None: no such line)."""
    for line in user_data.splitlines():
        if line.startswith(LINE_PREFIX):
            try:
                doc = json.loads(base64.b64decode(line.removeprefix(LINE_PREFIX)))
            except (binascii.Error, ValueError):
                return None
            got = doc.get("credential") if isinstance(doc, dict) else None
            return got if isinstance(got, str) else None
    return None


def with_vtpm(vm: Mapping[str, Any]) -> dict[str, Any]:
    """The composed VirtualMachine with a persistent vTPM (KubeVirt's
    `domain.devices.tpm: {persistent: true}`: an swtpm per VM whose state is kept, and
    migrated, with the VM), which the box's init measures its disks into."""
    out = json.loads(json.dumps(vm))
    domain = out.setdefault("spec", {}).setdefault("template", {}).setdefault("spec", {})
    devices = domain.setdefault("domain", {}).setdefault("devices", {})
    devices["tpm"] = {"persistent": True}
    return dict(out)


def with_attest_line(user_data: str, line: str) -> str:
    """`user_data` with `line` (any earlier attest line replaced), ending in a newline."""
    kept = [x for x in user_data.splitlines() if not x.startswith(LINE_PREFIX)]
    return "\n".join([*kept, line]) + "\n"


def fresh_attestation(credential: str) -> dict[str, Any]:
    """status.attestation of a box whose VM got a new credential: nothing attested yet."""
    return {"state": PENDING, "credentialHash": credential_hash(credential), "bound": False}


# -- enrolment -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Enrolment:
    """What the guest presented to enrol, checked: the EK's public area and the AK's."""

    ek_public: bytes
    ak_public: bytes
    ak_name: bytes
    ek_sha256: str


def check_enrolment(body: Mapping[str, Any], settings: Settings, now: dt.datetime) -> Enrolment:
    """The EK certificate chains to the vTPM CA and is for exactly the EK; the AK is a
    restricted signing key that cannot leave its TPM. Refused with EkNotTrusted or
    AkAttributesInvalid (BadRequest for bytes that are no such structure)."""
    cert = b64_field(body, "ekCertificate", "the EK certificate (DER)", 16384)
    ek_area = b64_field(body, "ekPublic", "the EK's TPM2B_PUBLIC")
    ak_area = b64_field(body, "akPublic", "the AK's TPM2B_PUBLIC")
    try:
        ek = ek_facts(ek_area)
    except errors.MalformedEvidence as exc:
        raise _bad(f"'ekPublic': {exc}") from exc
    except errors.VerificationError as exc:
        raise Refused(EK_NOT_TRUSTED, str(exc)) from exc
    try:
        check_ek_certificate(
            ek_spki=ek.spki,
            certificate=cert,
            presented_chain=(),
            ca_bundle_pem=settings.ca_bundle_pem,
            now=now,
        )
    except errors.VerificationError as exc:
        raise Refused(
            EK_NOT_TRUSTED, f"the vTPM's EK is not certified by the vTPM CA: {exc}"
        ) from exc
    try:
        ak = ak_facts(ak_area)
    except errors.MalformedEvidence as exc:
        raise _bad(f"'akPublic': {exc}") from exc
    except errors.VerificationError as exc:
        raise Refused(AK_INVALID, str(exc)) from exc
    return Enrolment(ek_area, ak_area, ak.public.name, ek.fingerprint)


def activation_challenge(checked: Enrolment, secret: bytes) -> ActivationChallenge:
    """MakeCredential for the enrolling EK and AK: only their one TPM can unwrap `secret`.
    An EK area no credential can be made for (the certified key with no symmetric algorithm,
    say) is a bad request, not a failure to ask again about."""
    try:
        return make_activation_challenge(
            ek_public_area=checked.ek_public, ak_name=checked.ak_name, secret=secret
        )
    except errors.MalformedEvidence as exc:
        raise _bad(f"'ekPublic': {exc}") from exc


def must_enrol(att: Mapping[str, Any], where: Where | None) -> bool:
    """Whether the guest is told to enrol (bind its vTPM's AK) before it quotes: nothing is
    bound, or the AK bound is another VMI's (the box restarted, perhaps onto a new vTPM
    whose AK the old one's quotes would never verify with: it would go Overdue for good)."""
    if not att.get("bound"):
        return True
    bound_for = att.get("boundVmiUID")
    return where is not None and bool(bound_for) and where.vmi_uid != bound_for


def check_ek_pin(
    att: Mapping[str, Any], ek_sha256: str, where: Where, ak_public: str | None = None
) -> None:
    """A bound box keeps its vTPM for the life of its VMI (a migration moves the vTPM's
    state with it): another EK while the VMI that bound the AK still runs is refused
    (EkChanged), and so is another AK of that EK (AkChanged: the guest's client makes the
    same AK every time; a second one is someone else's, a host that copied the vTPM's
    state, say, unbinding the guest's). A restarted box (a new VMI, maybe a new vTPM) may
    bind another. The caller refuses to enrol a box whose VMI runs on no one member
    (`where`): the pin is never skipped."""
    bound_for = att.get("boundVmiUID")
    if not (att.get("bound") and bound_for and where.vmi_uid == bound_for):
        return
    if att.get("ekSHA256") != ek_sha256:
        raise Refused(
            EK_CHANGED,
            f"the box's AK is bound to vTPM EK {str(att.get('ekSHA256'))[:16]}… for this VMI; "
            f"another EK ({ek_sha256[:16]}…) is refused until the box restarts",
        )
    if ak_public is not None and att.get("akPublic") != ak_public:
        raise Refused(
            AK_CHANGED,
            "the box's vTPM has an AK bound for this VMI; another AK of its EK is refused "
            "until the box restarts",
        )


def check_enrol_rate(
    att: Mapping[str, Any], where: Where, ek_sha256: str, now: dt.datetime
) -> None:
    """Refuse an enrolment (EnrolTooSoon, 429) of a vTPM EK that enrolled for this VMI less
    than `ENROL_EVERY` ago, or beyond `ENROLS_PER_VMI` enrolments of any EKs for this VMI
    within `ENROL_EVERY` (`status.attestation.lastEnrolments`): each is a status write and
    a MakeCredential, and whoever holds the box's credential and certified vTPMs of their
    own could otherwise alternate EKs and have gtvp write the box without pause. An honest
    guest enrols once per boot, and again only when told to; a restarted box (another VMI)
    enrols at once. (Whoever holds the credential can keep the box's guest from binding
    anyway, by binding a vTPM of their own first: a residual, docs/threat-model.md.)"""
    recent = [e for e in recent_enrolments(att, now) if e.get("vmiUID") == where.vmi_uid]
    mine = [e for e in recent if e.get("ekSHA256") == ek_sha256]
    if mine:
        raise Refused(
            ENROL_TOO_SOON,
            f"this vTPM enrolled less than {int(ENROL_EVERY.total_seconds())}s ago for this "
            f"VMI; enrol again in {_retry_in(mine, now)}s",
        )
    if len(recent) >= ENROLS_PER_VMI:
        raise Refused(
            ENROL_TOO_SOON,
            f"{len(recent)} enrolments for this VMI in the last "
            f"{int(ENROL_EVERY.total_seconds())}s; enrol again in {_retry_in(recent, now)}s",
        )


def recent_enrolments(att: Mapping[str, Any], now: dt.datetime) -> list[Mapping[str, Any]]:
    """The enrolments recorded (`lastEnrolments`) less than `ENROL_EVERY` before `now`
    (or up to `ENROL_SKEW` after it: another replica's clock may run ahead)."""
    got = att.get("lastEnrolments")
    out = []
    for e in got if isinstance(got, list) else ():
        at = parse_ts(e.get("at")) if isinstance(e, Mapping) else None
        if at is not None and -ENROL_SKEW <= now - at < ENROL_EVERY:
            out.append(e)
    return out


def _retry_in(recent: list[Mapping[str, Any]], now: dt.datetime) -> int:
    """Seconds until the oldest of `recent` leaves the window."""
    first = min(t for e in recent if (t := parse_ts(e.get("at"))) is not None)
    return max(1, int((ENROL_EVERY - (now - first)).total_seconds()) + 1)


def check_activation(
    att: Mapping[str, Any], enrolment_id: Any, proof: bytes, where: Where
) -> dict[str, Any]:
    """status.attestation once the ActivateCredential answer `proof` matches the pending
    enrolment `enrolment_id`: the AK bound for the VMI `where` runs (and a quote wanted).
    A failed result of this boot (a mismatch, or overdue, that called for the level's
    onUntrusted) stays as it is: binding a new AK does not end a move gtvp owes."""
    pending = att.get("enrolment") or {}
    if not isinstance(enrolment_id, str) or enrolment_id != pending.get("id"):
        raise Refused(STALE_ENROLMENT, "no such pending enrolment: enrol again")
    if not hmac.compare_digest(
        hashlib.sha256(proof).hexdigest(), str(pending.get("secretSHA256", ""))
    ):
        raise Refused(
            ACTIVATION_FAILED,
            "the ActivateCredential answer is wrong: the AK and the EK are not in one TPM",
        )
    if (
        att.get("bound")
        and att.get("boundVmiUID") == where.vmi_uid
        and att.get("akPublic") == pending.get("akPublic")
    ):  # the AK bound already, bound again: nothing attested, nor asked, is undone
        return {k: v for k, v in att.items() if k != "enrolment"}
    out = {k: v for k, v in att.items() if k not in ("enrolment", "nonce")}
    out.update(
        {
            "bound": True,
            "akPublic": pending.get("akPublic"),
            "ekSHA256": pending.get("ekSHA256"),
            "boundVmiUID": where.vmi_uid,
        }
    )
    if att.get("state") in (MISMATCH, OVERDUE) and acted_this_boot(att, where):
        return out  # still failed on this boot: the box must still leave (`must_leave`)
    out["state"] = PENDING
    for k in ("verifiedAt", "member", "vmiUID"):
        out.pop(k, None)  # a new AK: its first quote is wanted
    return out


# -- challenges ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Where:
    """Where gtvp sees the box's VMI run (never what the guest says): `member`, the node
    its status names (as gtvp's view keeps it: a blanked status does not hide it), and
    `nodes`, every node gtvp holds it on (the nodes of its launcher pods too, which root
    on a host cannot rewrite: `gtvp.core.launchers`)."""

    member: str
    vmi_uid: str
    nodes: frozenset[str] = frozenset()

    def on(self, member: object) -> bool:
        """Whether gtvp holds the box's VMI on `member`."""
        return member == self.member or member in self.nodes

    @property
    def settled(self) -> bool:
        """On one member only (not mid-migration, and status and pods agree)."""
        return self.nodes <= {self.member}


def wants_quote(att: Mapping[str, Any], where: Where) -> bool:
    """Whether gtvp wants a fresh quote: never attested, another member than the last
    attestation's (a migration), or another VMI (a restart)."""
    if att.get("state") not in (VERIFIED, MISMATCH):
        return True
    return not where.on(att.get("member")) or att.get("vmiUID") != where.vmi_uid


def pending_nonce(att: Mapping[str, Any], where: Where, now: dt.datetime) -> str | None:
    """The outstanding nonce, when it is still fresh and was issued for this VMI here."""
    n = att.get("nonce") or {}
    issued = parse_ts(n.get("issuedAt"))
    if (
        isinstance(n.get("value"), str)
        and issued is not None
        and now - issued < NONCE_TTL
        and n.get("member") == where.member
        and n.get("vmiUID") == where.vmi_uid
    ):
        return str(n["value"])
    return None


def with_nonce(
    att: Mapping[str, Any], nonce: bytes, where: Where, now: dt.datetime
) -> dict[str, Any]:
    return {
        **att,
        "nonce": {
            "value": nonce.hex(),
            "issuedAt": format_ts(now),
            "member": where.member,
            "vmiUID": where.vmi_uid,
        },
    }


# -- quotes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """A quote's result: the next status.attestation and the reason (VERIFIED or a code)."""

    reason: str
    message: str
    attestation: dict[str, Any]

    @property
    def verified(self) -> bool:
        return self.reason == VERIFIED


def attest_bytes(data: bytes) -> bytes:
    """TPMS_ATTEST from TPMS_ATTEST or TPM2B_ATTEST bytes."""
    if (
        len(data) >= 6
        and struct.unpack(">I", data[:4])[0] != TPM_GENERATED_VALUE
        and struct.unpack(">H", data[:2])[0] == len(data) - 2
    ):
        return data[2:]
    return data


def _measurements(body: Mapping[str, Any]) -> list[bytes]:
    raw = body.get("measurements")
    if not isinstance(raw, list) or len(raw) > 256:
        raise _bad("'measurements' must be a list of 'sha256:<hex>' (at most 256)")
    out = []
    for m in raw:
        if not isinstance(m, str) or not _HEX64.fullmatch(m.removeprefix("sha256:")):
            raise _bad(f"each of 'measurements' must be 'sha256:<64 hex digits>', not {m!r}")
        out.append(bytes.fromhex(m.removeprefix("sha256:")))
    return out


def _nonce_check(
    att: Mapping[str, Any], nonce: bytes, now: dt.datetime, where: Where
) -> Mapping[str, Any]:
    """The outstanding nonce record `nonce` answers, issued for the VMI where it runs now
    (else a 409 refusal: a quote taken before a move must not count as one after it)."""
    if nonce.hex() in (att.get("answered") or ()):
        raise Refused(NONCE_REPLAYED, f"nonce {nonce.hex()[:16]}… was answered already")
    pending = att.get("nonce") or {}
    if not isinstance(pending.get("value"), str) or not hmac.compare_digest(
        pending["value"], nonce.hex()
    ):
        raise Refused(NONCE_UNKNOWN, "not the outstanding nonce: ask for a challenge")
    issued = parse_ts(pending.get("issuedAt"))
    if issued is None or now - issued >= NONCE_TTL:
        raise Refused(
            NONCE_EXPIRED,
            f"the nonce expired ({int(NONCE_TTL.total_seconds())} s): ask for a new challenge",
        )
    if pending.get("member") != where.member or pending.get("vmiUID") != where.vmi_uid:
        raise Refused(
            NONCE_UNKNOWN,
            f"the nonce was issued while the box ran on {pending.get('member')}; it runs on "
            f"{where.member} now: ask for a new challenge",
        )
    return pending


def _differs(measured: Sequence[bytes], disks: Sequence[Disk]) -> str:
    """What the guest measured that the composition does not have, for the message."""
    want = [d.digest for d in disks]
    extra = [m.hex()[:16] for m in measured if m not in want]
    missing = [d.serial for d in disks if d.digest not in measured]
    parts = []
    if extra:
        parts.append(f"measured digest(s) not composed: {', '.join(extra)}")
    if missing:
        parts.append(f"component(s) not measured: {', '.join(missing)}")
    if not parts and len(measured) != len(want):
        parts.append(f"{len(measured)} measurements for {len(want)} disks")
    return "; ".join(parts) or "the disks were measured in another order"


def check_quote(
    att: Mapping[str, Any],
    body: Mapping[str, Any],
    *,
    settings: Settings,
    disks: Sequence[Disk],
    components: Sequence[str],
    where: Where,
    now: dt.datetime,
) -> Outcome:
    """Judge a quote. Refused (nothing to record: the state stays) for a malformed request,
    an unbound AK, an unknown, answered or expired nonce, a bad signature or another quote
    structure; otherwise an Outcome whose `attestation` answers the nonce: Verified, or
    ComponentMismatch (the PCR is not the composition's fold), or MeasurementsMismatch (the
    PCR is right but the guest's list does not fold to it)."""
    nonce = hex_field(body, "nonce", "the challenge's nonce", 32)
    quoted = attest_bytes(b64_field(body, "quote", "the TPMS_ATTEST (or TPM2B_ATTEST) bytes"))
    signature = b64_field(body, "signature", "the TPMT_SIGNATURE")
    pcrs = body.get("pcrs")
    key = str(settings.pcr)
    if not isinstance(pcrs, dict) or set(pcrs) != {key}:
        raise _bad(f'\'pcrs\' must be {{"{key}": "<hex>"}}: exactly PCR {key}')
    value = hex_field(pcrs, key, f"PCR {key}'s sha256 value", 32)
    measured = _measurements(body)
    if not att.get("bound") or not isinstance(att.get("akPublic"), str):
        raise Refused(AK_NOT_BOUND, "the box's AK is not bound to its EK: enrol and activate")
    _nonce_check(att, nonce, now, where)
    try:
        ak = ak_facts(base64.b64decode(str(att["akPublic"])))
        verify_quote(
            Evidence(
                attest=quoted, signature=signature, pcr_bank=BANK, pcr_values={settings.pcr: value}
            ),
            Expectation(
                ak=ak.public,
                nonce=nonce,
                pcr_bank=BANK,
                pcrs=(settings.pcr,),
                signer=None,
                golden=None,
            ),
        )
    except errors.BadSignature as exc:
        raise Refused(BAD_SIGNATURE, str(exc)) from exc
    except errors.VerificationError as exc:
        raise Refused(QUOTE_INVALID, f"{exc.reason}: {exc}") from exc
    expected = expected_pcr(disks)
    answered = [nonce.hex(), *(att.get("answered") or ())][:ANSWERED_KEPT]
    out: dict[str, Any] = {k: v for k, v in att.items() if k != "nonce"}
    out.update({"answered": answered, "pcr13": value.hex(), "components": list(components)})
    if not hmac.compare_digest(value, expected):
        why = (
            _differs(measured, disks)
            if hmac.compare_digest(fold(measured), value)
            else "and the guest's measurements do not explain it"
        )
        message = (
            f"PCR {settings.pcr} is {value.hex()[:16]}…, the composed components give "
            f"{expected.hex()[:16]}…: {why}"
        )
        out.update(
            {
                "state": MISMATCH,
                "reason": COMPONENT_MISMATCH,
                "message": message,
                "member": where.member,
                "vmiUID": where.vmi_uid,
                "verifiedAt": format_ts(now),
            }
        )
        return Outcome(COMPONENT_MISMATCH, message, out)
    if not hmac.compare_digest(fold(measured), value):
        message = (
            f"PCR {settings.pcr} is the composition's, but the guest's {len(measured)} "
            "measurement(s) do not fold to it: its event log is not what it extended"
        )
        out.update({"reason": MEASUREMENTS_MISMATCH, "message": message})
        return Outcome(MEASUREMENTS_MISMATCH, message, out)
    message = (
        f"the vTPM quote on member {where.member} shows exactly the composed components "
        f"({', '.join(components) or 'none'})"
    )
    out.update(
        {
            "state": VERIFIED,
            "reason": VERIFIED,
            "message": message,
            "member": where.member,
            "vmiUID": where.vmi_uid,
            "verifiedAt": format_ts(now),
        }
    )
    return Outcome(VERIFIED, message, out)


START_ALLOWANCE: Final = dt.timedelta(minutes=10)
"""How long a box's VMI may be held on a member without ever being reported Running
(images pulled, the launcher starting) before the deadline's clock starts all the same:
Running is virt-handler's word, and root on the host holds virt-handler's token, so a host
that never says it must not keep the clock from starting."""


def overdue_step(
    att: Mapping[str, Any],
    where: Where,
    now: dt.datetime,
    deadline: dt.timedelta,
    *,
    running: bool = True,
) -> tuple[dict[str, Any] | None, bool]:
    """What the box's attestation becomes while gtvp waits for a quote where its VMI runs
    (None: nothing to write) and whether the level's onUntrusted applies now.

    The wait starts when gtvp first sees the box want a quote on a member for a VMI
    (`wanted`); past `deadline` without a verified quote there, the box is `Overdue`
    (AttestationOverdue): a guest that never attests, or a host that keeps the channel shut,
    is treated as a mismatch, once per boot as every mismatch. A quote verified later still
    makes it Verified (an Overdue box is still asked). The clock starts when the VMI is
    first seen `running` (phase Running) there, or START_ALLOWANCE after it was first seen
    there (`wanted.seen`) if it never is; once started, no later phase stops it."""
    if not wants_quote(att, where):
        return None, False
    wanted = att.get("wanted") or {}
    # the clock runs on while the VMI is still held on the member it was wanted on: a
    # status that names another member now (while a launcher pod keeps it there) does not
    # start it again
    same = wanted.get("vmiUID") == where.vmi_uid and where.on(wanted.get("member"))
    since = parse_ts(wanted.get("since")) if same else None
    seen = parse_ts(wanted.get("seen")) if same else None
    if since is None:
        if running or seen is None or now - seen < START_ALLOWANCE:
            return _clock_waits_or_starts(att, where, now, running, seen), False
        since = seen + START_ALLOWANCE  # never reported Running: the clock started anyway
    if now - since < deadline or (
        att.get("state") == OVERDUE
        and att.get("vmiUID") == where.vmi_uid
        and where.on(att.get("member"))
    ):
        return None, False
    member = str(wanted.get("member"))
    act = act_on_mismatch(att, where)
    started = (
        f"started to run on {member}"
        if wanted.get("since")
        else f"was first held on {member} plus {int(START_ALLOWANCE.total_seconds())} s "
        "to start (its VMI was never reported Running there)"
    )
    message = (
        f"no verified quote of the box's vTPM {int(deadline.total_seconds())} s after it "
        f"{started}: its guest does not attest, or its host keeps the channel shut"
    )
    new = {
        **att,
        "state": OVERDUE,
        "reason": ATTESTATION_OVERDUE,
        "message": message,
        "member": member,
        "vmiUID": where.vmi_uid,
        **(acted_on(where, now, member) if act else {}),
    }
    return new, act


def _clock_waits_or_starts(
    att: Mapping[str, Any],
    where: Where,
    now: dt.datetime,
    running: bool,
    seen: dt.datetime | None,
) -> dict[str, Any] | None:
    """`overdue_step` before the clock runs for the VMI where it is: started now that it
    runs; or, not booted yet (pulling, starting), the first sight of it noted (`seen`), or
    nothing to write while START_ALLOWANCE has not passed since."""
    here = {"member": where.member, "vmiUID": where.vmi_uid}
    if not running:
        return None if seen is not None else {**att, "wanted": {**here, "seen": format_ts(now)}}
    # reported Running only after the allowance: the clock started when it ran out
    start = now if seen is None else min(now, seen + START_ALLOWANCE)
    fresh = {**here, "since": format_ts(start)}
    if seen is not None:
        fresh["seen"] = format_ts(seen)
    # an Overdue or a Verified on the member it left (or for the VMI before a restart) is
    # no longer this one's state: Pending here, until a quote here is verified (what
    # `kubectl get lazybox` shows; key release already asks for this member and VMI)
    pending = {"state": PENDING} if att.get("state") in (OVERDUE, VERIFIED) else {}
    return {**att, "wanted": fresh, **pending}


def acted_this_boot(att: Mapping[str, Any], where: Where) -> bool:
    """Whether the level's onUntrusted was called for on the boot (VMI uid) the box runs
    now, whatever its state since (`acted_on` records it)."""
    return att.get("actedOn") == where.vmi_uid


def act_on_mismatch(att: Mapping[str, Any], where: Where) -> bool:
    """Whether a mismatch now calls for the level's onUntrusted: once per boot (VMI uid)
    of the box, so a box is never moved twice for one mismatch (the vTPM migrates with it
    and still shows the same PCR on the next member)."""
    return not acted_this_boot(att, where)


def acted_on(where: Where, now: dt.datetime, member: str | None = None) -> dict[str, str]:
    """The fields that record onUntrusted called for on this boot, on this member (the
    one its status names unless said), and when (a level's `migrateWithin` counts from
    then)."""
    return {
        "actedOn": where.vmi_uid,
        "actedOnMember": member or where.member,
        "actedAt": format_ts(now),
    }


def must_leave(att: Mapping[str, Any], where: Where) -> bool:
    """Whether the box must still leave its member: onUntrusted was called for on this
    boot on this member (a mismatch, or overdue) and the box runs there still, with no
    verified quote since (an overdue box that attests after all may stay). The evacuation
    loop acts on it until it has left (a migration that failed, found no target or met a
    foreign object holding its name is planned again), then never again for that boot."""
    return (
        att.get("state") in (MISMATCH, OVERDUE)
        and acted_this_boot(att, where)
        and where.on(att.get("actedOnMember"))
    )
