"""The SecurityPolicy as typed values, and what it means for one member.

`parse_policy` turns a SecurityPolicy spec (as the API server stores it, after the CRD's
schema and CEL rules) into frozen dataclasses, and refuses what the operator could not
enforce with `PolicyError` naming the field and the fix: a CA bundle or publisher key that
is not PEM over valid DER (or a key type components are never signed with), a golden value
or forbidden digest whose length is not the bank's, a member class named twice or referred
to but missing, a member class that would verify nothing (neither golden values nor a
required event log), and a transition rule on a label that a node's kubelet may set on itself
(anything not under `node-restriction.kubernetes.io/`, and gtvp's own trust labels there).
The CRD's CEL rules refuse what CEL can check of this at the API server; the operator's
SecurityPolicy webhook runs this very function for the rest.
`member_policy` gives the level, attestation settings and golden values that apply to one
member, from its identity, its class and the transition rules (no class at all when the
member's cannot be resolved: such a member is refused a verdict).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gtvp.core.eventlog import EVENT_TYPE_BY_NAME, EVENT_TYPES
from gtvp.core.refvalues import (
    SECURE_BOOT_PCR,
    SECURE_BOOT_STATES,
    EventRule,
    PcrRule,
    ReferenceSet,
)
from gtvp.core.timestamps import format_ts, human_duration, parse_ts
from gtvp.core.tpm_wire import HASH_BY_NAME, HASH_SIZES
from gtvp.core.trust import LEVEL_LABEL, MAX_LEVEL, PREFIX, TRUSTED_LABEL

RESETTABLE_PCRS = {16: "debug", 23: "application support"}
"""PCRs that software may reset from locality 0 (TCG PC Client Platform TPM Profile): any
value there can be replayed at will, so a policy that appraises one proves nothing."""


LOCALITY2_PCRS = frozenset({20, 21, 22})
"""DRTM PCRs that locality 2 may reset (TCG PC Client Platform TPM Profile): the OS reaches
locality 2 after a dynamic launch, and on chipsets that decode every locality at all; gtvp
appraises no dynamic launch, so such a value proves no more than PCR 16's."""


def resettable_pcrs_message(pcrs: Sequence[int]) -> str | None:
    """Why a selection of these PCRs is refused (None: it has no resettable one)."""
    chosen = sorted(set(pcrs))
    reset = [p for p in chosen if p in RESETTABLE_PCRS]
    if reset:
        named = ", ".join(f"{p} ({RESETTABLE_PCRS[p]})" for p in reset)
        return (
            f"PCR {named} can be reset by any software on the machine (locality 0), so "
            "whatever it holds proves nothing about the boot: leave it out"
        )
    drtm = [p for p in chosen if p in LOCALITY2_PCRS]
    if drtm:
        return (
            f"PCR {', '.join(map(str, drtm))} can be reset from locality 2, which the OS may "
            "reach (after a dynamic launch, or on a chipset that decodes every locality), so "
            "root could replay any value there; gtvp appraises no dynamic (DRTM) launch: "
            "leave it out"
        )
    return None


class PolicyError(ValueError):
    """The policy cannot be used; `field` names where, the message says why."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field = field_path
        self.message = message


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, field_path: str = "duration") -> timedelta:
    """A Go duration (`90s`, `1m30s`, `500ms`) as a timedelta."""
    s = text.strip()
    if not s or s == "0":
        raise PolicyError(field_path, f"{text!r} is not a positive duration")
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or total <= 0:
        raise PolicyError(field_path, f"{text!r} is not a duration such as 30s, 2m or 1h30m")
    return timedelta(seconds=total)


DEFAULT_MIGRATE_WITHIN = timedelta(hours=1)
"""The bound on an evacuation of a Migrate level that sets no `migrateWithin`."""


@dataclass(frozen=True)
class Level:
    level: int
    name: str
    interval: timedelta
    valid_for: timedelta
    max_uses: int
    on_untrusted: str = "Migrate"
    auto_recover: bool = True
    migrate_within: timedelta | None = None  # Migrate: stop a VM not moved off in this time
    ek_ca_bundle: str | None = None  # only EKs certified by these CAs hold it (and above)

    @property
    def evacuation_bound(self) -> timedelta | None:
        """How long a gated VM of this level, being migrated, may stay on a member that no
        longer holds the level before gtvp stops it: `migrateWithin`, else
        `DEFAULT_MIGRATE_WITHIN` (a wait nothing bounds is one a tenant or a full pool can
        make last for good); None for a level that says Keep (its VMs may stay: one that is
        migrated because its member's level says so is bound by that level's)."""
        if self.on_untrusted == "Keep":
            return None
        return self.migrate_within or DEFAULT_MIGRATE_WITHIN


@dataclass(frozen=True)
class MemberClass:
    name: str
    golden: Mapping[int, bytes] = field(default_factory=dict)
    event_log_required: bool = False
    forbidden_digests: frozenset[str] = frozenset()
    reference_sets: tuple[ReferenceSet, ...] = ()


@dataclass(frozen=True)
class Transition:
    match_labels: Mapping[str, str]
    level: int
    member_class: str | None = None


@dataclass(frozen=True)
class MigrationLimits:
    max_parallel: int = 5
    max_outbound_per_node: int = 2
    max_inbound_per_node: int = 2
    allow_to_lower_level: bool = False


@dataclass(frozen=True)
class Balancing:
    enabled: bool = False
    high_watermark: int = 85
    low_watermark: int = 60
    sustain_for: timedelta = timedelta(minutes=2)
    cooldown: timedelta = timedelta(minutes=5)


@dataclass(frozen=True)
class PublisherScope:
    """What a publisher's key may sign (spec.publisherKeys[].components, .maxLevel): a
    component whose name or anything it provides is not in `components` (None: any), or whose
    level is above `max_level` (None: any), fails verification even with a good signature."""

    components: frozenset[str] | None = None
    max_level: int | None = None


@dataclass(frozen=True)
class Policy:
    name: str
    levels: tuple[Level, ...]
    pcr_bank: str
    pcrs: tuple[int, ...]
    member_classes: Mapping[str, MemberClass]
    default_member_class: str | None
    ca_bundle_pem: str
    allow_uncertified_with_approval: bool
    publisher_keys: Mapping[str, str]
    transitions: tuple[Transition, ...]
    migration: MigrationLimits
    balancing: Balancing
    allow_shared_ek: bool = False
    revoked_eks: frozenset[str] = frozenset()
    """EK fingerprints (SHA-256 of the public key, lowercase hex) no member may present."""
    require_approval: bool = False
    """Every EK must be approved (Member.spec.approval.ekSHA256), certified or not."""
    publisher_scopes: Mapping[str, PublisherScope] = field(default_factory=dict)
    revoked_components: frozenset[str] = frozenset()
    """OSComponent digests (`sha256:…`, image or disk) no box may use."""

    def level(self, number: int) -> Level | None:
        return next((lv for lv in self.levels if lv.level == number), None)

    @property
    def lowest(self) -> Level:
        return self.levels[0]


def _get(d: Mapping[str, Any], key: str, default: Any = None) -> Any:
    v = d.get(key, default)
    return default if v is None else v


_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)(?:-----END \1-----|\Z)", re.DOTALL)


@dataclass(frozen=True)
class _PemBlock:
    label: str
    line: int  # 1-based line of its BEGIN in the field's text
    der: bytes | None  # None: not valid base64
    terminated: bool


def _pem_blocks(text: str) -> list[_PemBlock]:
    """The PEM blocks of `text`, in order (text between blocks is ignored, as PEM allows)."""
    blocks = []
    line, counted = 1, 0  # lines counted up to `counted` (once, not from the start per block)
    for m in _PEM_BLOCK.finditer(text):
        line += text.count("\n", counted, m.start())
        counted = m.start()
        label = m.group(1)
        body = "".join(m.group(2).split())
        try:
            der: bytes | None = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            der = None
        blocks.append(
            _PemBlock(
                label=label,
                line=line,
                der=der,
                terminated=m.group(0).endswith(f"-----END {label}-----"),
            )
        )
    return blocks


def _short(exc: Exception) -> str:
    return str(exc).split(" See https://")[0].strip()[:200]


PEM_MAX = 262144
"""The CRD's maxLength of a PEM field: longer is refused before it is parsed (a review
posted straight to the webhook, which the API server never saw, is not bound by the CRD)."""


def _ca_bundle(text: str, path: str = "spec.ekTrust.caBundle") -> str:
    """The EK trust anchors as given, once every block is a readable X.509 certificate."""
    if len(text) > PEM_MAX:
        raise PolicyError(path, f"is {len(text)} characters long, more than {PEM_MAX}")
    certs = [b for b in _pem_blocks(text) if b.label == "CERTIFICATE"]
    if not certs:
        raise PolicyError(
            path,
            "holds no PEM certificate (-----BEGIN CERTIFICATE----- ... -----END CERTIFICATE-----):"
            " put the PEM certificates of the TPM manufacturers' EK root CAs here",
        )
    for i, block in enumerate(certs, 1):
        where = f"certificate {i} of {len(certs)} (line {block.line})"
        if not block.terminated:
            raise PolicyError(
                path, f"{where}: -----BEGIN CERTIFICATE----- without its -----END CERTIFICATE-----"
            )
        if block.der is None:
            raise PolicyError(path, f"{where} is not valid base64: paste the PEM block unchanged")
        try:
            x509.load_der_x509_certificate(block.der)
        except ValueError as exc:
            raise PolicyError(
                path,
                f"{where} is not a DER X.509 certificate ({_short(exc)}): paste the CA's PEM "
                "certificate unchanged",
            ) from exc
    return text


def _publisher_key(text: str, path: str, publisher: str) -> str:
    """A publisher's key, once `text` holds one Ed25519 or ECDSA P-256 public key: that key
    alone, as PEM (what is checked is what verifies signatures: other PEM blocks beside it,
    an `RSA PUBLIC KEY` first, would be what a PEM loader reads)."""
    what = f"publisher {publisher!r}"
    if len(text) > PEM_MAX:
        raise PolicyError(path, f"is {len(text)} characters long, more than {PEM_MAX}")
    blocks = [b for b in _pem_blocks(text) if b.label == "PUBLIC KEY"]
    if len(blocks) != 1:
        raise PolicyError(
            path,
            f"{what}: holds {len(blocks)} PEM public keys (-----BEGIN PUBLIC KEY-----), "
            "one is needed",
        )
    block = blocks[0]
    if not block.terminated:
        raise PolicyError(
            path, f"{what}: -----BEGIN PUBLIC KEY----- without its -----END PUBLIC KEY-----"
        )
    if block.der is None:
        raise PolicyError(path, f"{what}: the PEM block is not valid base64")
    try:
        key = serialization.load_der_public_key(block.der)
    except (ValueError, TypeError) as exc:
        raise PolicyError(
            path,
            f"{what}: the PEM block is not a DER SubjectPublicKeyInfo ({_short(exc)}); export "
            "it with `openssl pkey -pubout`",
        ) from exc
    if isinstance(key, ed25519.Ed25519PublicKey) or (
        isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    ):
        pem = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem.decode()
    if isinstance(key, ec.EllipticCurvePublicKey):
        kind = f"an ECDSA {key.curve.name}"
    elif isinstance(key, rsa.RSAPublicKey):
        kind = "an RSA"
    else:
        kind = f"a {type(key).__name__.removeprefix('_').removesuffix('PublicKey')}"
    raise PolicyError(
        path,
        f"{what}: {kind} key, but OSComponents are signed with Ed25519 or ECDSA P-256 keys "
        "only (gtvp component sign): no signature could ever verify with it",
    )


def _label_problem(key: str) -> str | None:
    """Why a transition rule must not match on label `key` (None: it may)."""
    if key == TRUSTED_LABEL or key.startswith(LEVEL_LABEL):
        return (
            f"label {key!r}: gtvp writes it from the member's verdict, so a rule on it would "
            "make a member's level depend on itself"
        )
    if not key.startswith(PREFIX):
        return (
            f"label {key!r} is not under {PREFIX}: a node's kubelet may set it on itself, so "
            "a rule on it would let a node raise its own level; label Nodes under "
            f"{PREFIX} (a kubelet cannot set those) or raise the Member's spec.identity"
        )
    return None


def _hex_digest(text: Any, path: str, bank: str, size: int, *, what: str, note: str = "") -> bytes:
    """A digest of the policy's bank (`what`: what it is, `note`: why its length matters)."""
    try:
        value = bytes.fromhex(str(text))
    except ValueError as exc:
        raise PolicyError(path, f"{str(text)[:80]!r} is not hex") from exc
    if len(value) != size:
        raise PolicyError(
            path,
            f"{len(value)} bytes ({2 * len(value)} hex digits), but a {bank} {what} has "
            f"{size} bytes ({2 * size} hex digits){note}: give the {bank} value, the bank "
            "spec.pcrSelection.hashAlgorithm names",
        )
    return value


def parse_policy(name: str, spec: Mapping[str, Any]) -> Policy:
    """Typed policy from a SecurityPolicy spec; PolicyError names what is unusable."""
    levels = _levels(_get(spec, "levels", []))
    bank, pcrs = _pcr_selection(_get(spec, "pcrSelection", {}))
    classes = _member_classes(_get(spec, "memberClasses", []), bank, frozenset(pcrs))
    default_class = _known_class(classes, spec.get("defaultMemberClass"), "spec.defaultMemberClass")
    ek = _get(spec, "ekTrust", {})
    bundle = _ca_bundle(str(_get(ek, "caBundle", "")))
    publishers = _get(spec, "publisherKeys", [])
    keys, scopes = _publisher_keys(publishers), publisher_scopes(publishers)
    transitions = _transitions(_get(spec, "transitions", []), classes)
    return Policy(
        name=name,
        levels=levels,
        pcr_bank=bank,
        pcrs=pcrs,
        member_classes=classes,
        default_member_class=default_class,
        ca_bundle_pem=bundle,
        allow_uncertified_with_approval=bool(_get(ek, "allowUncertifiedWithApproval", False)),
        allow_shared_ek=bool(_get(ek, "allowSharedEk", False)),
        revoked_eks=_revoked_eks(_get(ek, "revokedEKs", [])),
        revoked_components=revoked_components(_get(spec, "revokedComponents", [])),
        require_approval=bool(_get(ek, "requireApproval", False)),
        publisher_keys=keys,
        publisher_scopes=scopes,
        transitions=transitions,
        migration=_migration_limits(_get(spec, "migration", {})),
        balancing=_balancing(_get(spec, "balancing", {})),
    )


def _revoked_eks(raw: Any) -> frozenset[str]:
    """spec.ekTrust.revokedEKs: SHA-256 fingerprints, 64 lowercase hex digits each."""
    return _listed(
        raw,
        "spec.ekTrust.revokedEKs",
        r"[0-9a-f]{64}",
        "EK SHA-256 fingerprints",
        "is not an EK fingerprint: 64 lowercase hex digits, the SHA-256 a Member shows in "
        "status.trust.ekSHA256",
    )


def revoked_components(raw: Any) -> frozenset[str]:
    """spec.revokedComponents: `sha256:` digests of OSComponent images or disks."""
    return _listed(
        raw,
        "spec.revokedComponents",
        r"sha256:[0-9a-f]{64}",
        "sha256: digests",
        "is not a component digest: sha256: and 64 lowercase hex digits, an OSComponent's "
        "spec.digest or spec.diskDigest",
    )


def _listed(raw: Any, field: str, pattern: str, what: str, not_one: str) -> frozenset[str]:
    """A list field of identifiers, each matching `pattern` (the first that does not is
    named, with `not_one` saying what it should be)."""
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise PolicyError(field, f"must be a list of {what}")
    found = set()
    for i, item in enumerate(raw):
        text = str(item)
        if not re.fullmatch(pattern, text):
            raise PolicyError(f"{field}[{i}]", f"{text[:80]!r} {not_one}")
        found.add(text)
    return frozenset(found)


def _levels(raw_levels: Any) -> tuple[Level, ...]:
    """spec.levels, lowest first; each level's validFor longer than its interval."""
    if not raw_levels:
        raise PolicyError("spec.levels", "at least one level is needed")
    levels: list[Level] = []
    ranked = sorted(enumerate(raw_levels), key=lambda x: int(x[1].get("level", 0)))
    for i, lv in ranked:
        rank = int(_get(lv, "level", 0))
        if not 1 <= rank <= 9:
            raise PolicyError(f"spec.levels[{i}].level", f"{rank} is not a level from 1 to 9")
        if levels and levels[-1].level == rank:
            raise PolicyError(f"spec.levels[{i}].level", f"level {rank} is defined twice")
        att = _get(lv, "attestation", {})
        path = f"spec.levels[{i}].attestation"
        interval = parse_duration(str(_get(att, "interval", "")), f"{path}.interval")
        valid_for = parse_duration(str(_get(att, "validFor", "")), f"{path}.validFor")
        if valid_for <= interval:
            raise PolicyError(f"{path}.validFor", "must be longer than interval")
        on_untrusted = str(_get(lv, "onUntrusted", "Migrate"))
        within = _get(lv, "migrateWithin", None)
        if within is not None and on_untrusted != "Migrate":
            raise PolicyError(
                f"spec.levels[{i}].migrateWithin",
                f"bounds onUntrusted Migrate only; this level says {on_untrusted}",
            )
        max_uses = int(_get(att, "maxUses", 1))
        if max_uses < 1:
            raise PolicyError(f"{path}.maxUses", "must be at least 1")
        auto_recover = bool(_get(lv, "autoRecover", True))
        if levels:
            _demands_no_less(levels[-1], i, interval, valid_for, max_uses)
            if auto_recover and not levels[-1].auto_recover:
                raise PolicyError(
                    f"spec.levels[{i}].autoRecover",
                    f"true, but level {levels[-1].level} ({levels[-1].name}) below it says "
                    "false: a member readmitted without a person at this level would hold "
                    "that level's VMs again; set it false here too",
                )
        levels.append(
            Level(
                level=rank,
                name=str(lv.get("name", f"level-{rank}")),
                interval=interval,
                valid_for=valid_for,
                max_uses=max_uses,
                on_untrusted=on_untrusted,
                auto_recover=auto_recover,
                migrate_within=(
                    None
                    if within is None
                    else parse_duration(str(within), f"spec.levels[{i}].migrateWithin")
                ),
                ek_ca_bundle=(
                    None
                    if lv.get("ekCaBundle") is None
                    else _ca_bundle(str(lv["ekCaBundle"]), f"spec.levels[{i}].ekCaBundle")
                ),
            )
        )
    return tuple(levels)


def _demands_no_less(
    lower: Level, i: int, interval: timedelta, valid_for: timedelta, max_uses: int
) -> None:
    """A higher level (spec.levels[i]) asks for quotes at least as often, and lets a verdict
    back decisions no longer and no more often, than the level below it: a member's verdict
    is kept by the attestation of its own level, and it backs the VMs of every lower level
    too (a level-1 VM on a level-3 member), which would otherwise rest on looser values
    than their own level sets."""
    looser = [
        (name, f"{name} {ours} is looser than level {lower.level} ({lower.name})'s {theirs}")
        for name, ours, theirs, bigger in (
            ("interval", human_duration(interval), human_duration(lower.interval),
             interval > lower.interval),
            ("validFor", human_duration(valid_for), human_duration(lower.valid_for),
             valid_for > lower.valid_for),
            ("maxUses", max_uses, lower.max_uses, max_uses > lower.max_uses),
        )
        if bigger
    ]  # fmt: skip
    if looser:
        name, what = looser[0]
        raise PolicyError(
            f"spec.levels[{i}].attestation.{name}",
            f"{what}: a higher level demands at least as much, since its members' verdicts "
            "also back the lower levels' VMs",
        )


def _pcr_selection(sel: Mapping[str, Any]) -> tuple[str, tuple[int, ...]]:
    """spec.pcrSelection: a known bank and at least one PCR."""
    bank = str(_get(sel, "hashAlgorithm", "sha256"))
    if bank not in HASH_BY_NAME:
        raise PolicyError("spec.pcrSelection.hashAlgorithm", f"unknown bank {bank!r}")
    if bank == "sha1" and _get(sel, "allowSha1", False) is not True:
        raise PolicyError(
            "spec.pcrSelection.hashAlgorithm",
            "sha1: collisions are practical, so a colliding twin of a measured binary would "
            "extend the same PCR value and match the same golden value or reference digest; "
            "quote sha256 (or stronger), or set spec.pcrSelection.allowSha1: true for TPMs "
            "whose firmware enables no other bank",
        )
    pcrs = tuple(sorted({int(p) for p in _get(sel, "pcrs", [])}))
    if not pcrs:
        raise PolicyError("spec.pcrSelection.pcrs", "select at least one PCR")
    resettable = resettable_pcrs_message(pcrs)
    if resettable:
        raise PolicyError("spec.pcrSelection.pcrs", resettable)
    return bank, pcrs


def _member_classes(raw: Any, bank: str, selected: frozenset[int]) -> dict[str, MemberClass]:
    """spec.memberClasses by name: each named once, its digests of the bank's length."""
    size = HASH_SIZES[HASH_BY_NAME[bank]]
    classes: dict[str, MemberClass] = {}
    for i, mc in enumerate(raw):
        path = f"spec.memberClasses[{i}]"
        cname = str(mc["name"])
        if cname in classes:
            raise PolicyError(f"{path}.name", f"class {cname!r} is defined twice")
        golden = {
            int(k): _hex_digest(v, f"{path}.goldenPCRs[{k}]", bank, size, what="PCR value")
            for k, v in _get(mc, "goldenPCRs", {}).items()
        }
        unselected = sorted(set(golden) - selected)
        if unselected:
            raise PolicyError(
                f"{path}.goldenPCRs[{unselected[0]}]",
                f"PCR {unselected[0]} is not in spec.pcrSelection.pcrs: no quote includes it, "
                "so its golden value would check nothing; select it or remove the value",
            )
        log = _get(mc, "eventLog", {})
        forbidden = []
        for j, d in enumerate(_get(log, "forbiddenDigests", [])):
            dpath = f"{path}.eventLog.forbiddenDigests[{j}]"
            _hex_digest(d, dpath, bank, size, what="event digest", note=", so it would never match")
            forbidden.append(str(d).lower())
        ref_sets = _reference_sets(_get(mc, "referenceSets", []), path, bank, size, selected)
        # a reference set is appraised on the event log: it needs one
        required = bool(_get(log, "required", False)) or bool(ref_sets)
        _check_verifies_every_pcr(path, cname, selected, golden, ref_sets)
        classes[cname] = MemberClass(
            name=cname,
            golden=golden,
            event_log_required=required,
            forbidden_digests=frozenset(forbidden),
            reference_sets=ref_sets,
        )
    return classes


def _check_verifies_every_pcr(
    path: str,
    cname: str,
    selected: frozenset[int],
    golden: Mapping[int, bytes],
    ref_sets: Sequence[ReferenceSet],
) -> None:
    """Refuse a member class that leaves a quoted PCR unverified: one with no golden value
    that some reference set has no rules for. A PCR checked only by replaying the event log
    is verified by nothing: the log of a modified bootloader or kernel, measured faithfully
    by the firmware, replays to the quoted value just as well (forbidden digests only deny
    what is known to be bad)."""
    unverified = sorted(
        p
        for p in selected
        if p not in golden and not (ref_sets and all(p in s.rule_pcrs for s in ref_sets))
    )
    if not unverified:
        return
    listed = ", ".join(map(str, unverified))
    said = (
        "verifies nothing"
        if len(unverified) == len(selected)
        else f"leaves PCR(s) {listed} unverified"
    )
    raise PolicyError(
        path,
        f"member class {cname!r} {said}: a PCR needs a goldenPCRs value, or rules in every "
        "one of the class's referenceSets (`gtvp policy learn --event-log FILE` proposes them "
        "from a host's event log); a replayed event log alone only shows that the log matches "
        "the quote, "
        "so a modified bootloader's or kernel's own log would pass (or leave the PCR out of "
        "spec.pcrSelection)",
    )


def _reference_sets(
    raw: Any, path: str, bank: str, size: int, selected: frozenset[int]
) -> tuple[ReferenceSet, ...]:
    """A member class's referenceSets: uniquely named, on quoted PCRs, known event types,
    digests of the bank's length, a validity window that is one."""
    if not isinstance(raw, list):
        raise PolicyError(f"{path}.referenceSets", "must be a list of reference sets")
    sets: list[ReferenceSet] = []
    for i, rs in enumerate(raw):
        rpath = f"{path}.referenceSets[{i}]"
        if not isinstance(rs, Mapping):
            raise PolicyError(rpath, "must be a reference set (name, pcrs, ...)")
        name = str(_get(rs, "name", ""))
        if not name:
            raise PolicyError(f"{rpath}.name", "a reference set needs a name")
        if any(s.name == name for s in sets):
            raise PolicyError(f"{rpath}.name", f"reference set {name!r} is defined twice")
        not_before = _timestamp(rs.get("notBefore"), f"{rpath}.notBefore")
        not_after = _timestamp(rs.get("notAfter"), f"{rpath}.notAfter")
        if not_before and not_after and not_after <= not_before:
            raise PolicyError(
                f"{rpath}.notAfter",
                f"{format_ts(not_after)} is not after notBefore {format_ts(not_before)}: the "
                "set would never match",
            )
        secure_boot = rs.get("secureBoot")
        if secure_boot is not None and secure_boot not in SECURE_BOOT_STATES:
            raise PolicyError(
                f"{rpath}.secureBoot", f"{secure_boot!r} is not one of {list(SECURE_BOOT_STATES)}"
            )
        if secure_boot is not None and SECURE_BOOT_PCR not in selected:
            raise PolicyError(
                f"{rpath}.secureBoot",
                f"Secure Boot is measured into PCR {SECURE_BOOT_PCR}, which "
                "spec.pcrSelection.pcrs does not quote: add it there",
            )
        locality = rs.get("startupLocality")
        if locality is not None and (
            isinstance(locality, bool) or not isinstance(locality, int) or not 0 <= locality <= 4
        ):
            raise PolicyError(f"{rpath}.startupLocality", f"{locality!r} is not a locality 0-4")
        if locality is not None and 0 not in selected:
            raise PolicyError(
                f"{rpath}.startupLocality",
                "the startup locality is where PCR 0 begins, which spec.pcrSelection.pcrs does "
                "not quote: add it there",
            )
        rules = _pcr_rules(_get(rs, "pcrs", []), rpath, bank, size, selected)
        if not rules and secure_boot is None:
            raise PolicyError(
                f"{rpath}.pcrs", f"reference set {name!r} governs no PCR: it would accept any log"
            )
        sets.append(ReferenceSet(name, rules, secure_boot, not_before, not_after, locality))
    return tuple(sets)


def _timestamp(value: Any, path: str) -> dt.datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):  # YAML read by a client may give a datetime
        t: dt.datetime | None = value
    else:
        t = parse_ts(str(value))
    if t is None or t.tzinfo is None:
        raise PolicyError(
            path, f"{str(value)[:40]!r} is not an RFC 3339 time such as 2026-01-01T00:00:00Z"
        )
    return t


def _pcr_rules(
    raw: Any, rpath: str, bank: str, size: int, selected: frozenset[int]
) -> tuple[PcrRule, ...]:
    rules: dict[int, PcrRule] = {}
    for j, pr in enumerate(raw):
        ppath = f"{rpath}.pcrs[{j}]"
        if not isinstance(pr, Mapping):
            raise PolicyError(ppath, "must be a PCR rule: {pcr: N, events: [...]}")
        try:
            pcr = int(pr["pcr"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PolicyError(f"{ppath}.pcr", "a PCR index 0 to 23 is needed") from exc
        if pcr not in selected:
            raise PolicyError(
                f"{ppath}.pcr",
                f"PCR {pcr} is not in spec.pcrSelection.pcrs {sorted(selected)}: the quote "
                "would not cover it, so its events could not be bound to the TPM",
            )
        if pcr in rules:
            raise PolicyError(f"{ppath}.pcr", f"PCR {pcr} is listed twice in this set")
        events = []
        for k, er in enumerate(_get(pr, "events", [])):
            epath = f"{ppath}.events[{k}]"
            if not isinstance(er, Mapping) or not isinstance(_get(er, "digests", []), list):
                raise PolicyError(epath, "must be an event rule: {type: EV_..., digests: [hex]}")
            etype = _event_type(er.get("type"), f"{epath}.type")
            digests = frozenset(
                _hex_digest(d, f"{epath}.digests[{n}]", bank, size, what="event digest").hex()
                for n, d in enumerate(_get(er, "digests", []))
            )
            if not digests:
                raise PolicyError(f"{epath}.digests", "list at least one allowed digest")
            variable = er.get("variable")
            events.append(EventRule(etype, digests, str(variable) if variable else None))
        rules[pcr] = PcrRule(pcr, tuple(events))
    return tuple(rules.values())


def _event_type(value: Any, path: str) -> int:
    """An event type by its TCG name (EV_EFI_BOOT_SERVICES_APPLICATION) or as 0x hex."""
    text = str(value or "")
    if text in EVENT_TYPE_BY_NAME:
        return EVENT_TYPE_BY_NAME[text]
    if text.lower().startswith("0x"):
        try:
            return int(text, 16)
        except ValueError:
            pass
    raise PolicyError(
        path,
        f"{text[:60]!r} is not a TCG event type: give its name (e.g. "
        f"EV_EFI_BOOT_SERVICES_APPLICATION; known: {len(EVENT_TYPES)} names, as `gtvp "
        "eventlog replay` prints them) or 0x followed by its hex value",
    )


def _known_class(classes: Mapping[str, MemberClass], value: Any, path: str) -> str | None:
    """A member class a field refers to (None when it names none); it must exist."""
    if not value:
        return None
    if str(value) not in classes:
        have = ", ".join(sorted(classes)) or "none"
        raise PolicyError(
            path,
            f"no member class named {str(value)!r} in spec.memberClasses (there: {have})",
        )
    return str(value)


def _publisher_keys(raw: Any) -> dict[str, str]:
    """spec.publisherKeys: publisher name -> its PEM key, once the key is usable."""
    keys: dict[str, str] = {}
    for i, pk in enumerate(raw):
        pname = str(pk.get("name", ""))
        keys[pname] = _publisher_key(
            str(pk.get("publicKey", "")), f"spec.publisherKeys[{i}].publicKey", pname
        )
    return keys


def publisher_scopes(raw: Any) -> dict[str, PublisherScope]:
    """spec.publisherKeys[].components and .maxLevel, for the publishers that name either."""
    scopes: dict[str, PublisherScope] = {}
    for i, pk in enumerate(raw):
        names, level = pk.get("components"), pk.get("maxLevel")
        if names is None and level is None:
            continue
        if level is not None and (not isinstance(level, int) or not 1 <= level <= MAX_LEVEL):
            raise PolicyError(
                f"spec.publisherKeys[{i}].maxLevel", f"must be 1 to {MAX_LEVEL}, not {level!r}"
            )
        if names is not None and (
            not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)
        ):
            raise PolicyError(
                f"spec.publisherKeys[{i}].components", "must be a list of component names"
            )
        scopes[str(pk.get("name", ""))] = PublisherScope(
            None if names is None else frozenset(names), level
        )
    return scopes


def _transitions(raw: Any, classes: Mapping[str, MemberClass]) -> tuple[Transition, ...]:
    """spec.transitions: rules on labels a kubelet cannot set, naming known classes."""
    transitions = []
    for i, t in enumerate(raw):
        mc = _known_class(classes, t.get("memberClass"), f"spec.transitions[{i}].memberClass")
        match = {str(k): str(v) for k, v in _get(t, "matchLabels", {}).items()}
        for key in match:
            problem = _label_problem(key)
            if problem:
                raise PolicyError(f"spec.transitions[{i}].matchLabels[{key}]", problem)
        transitions.append(Transition(match, int(t.get("level", 0)), mc))
    return tuple(transitions)


def _migration_limits(mig: Mapping[str, Any]) -> MigrationLimits:
    return MigrationLimits(
        max_parallel=int(_get(mig, "maxParallel", 5)),
        max_outbound_per_node=int(_get(mig, "maxOutboundPerNode", 2)),
        max_inbound_per_node=int(_get(mig, "maxInboundPerNode", 2)),
        allow_to_lower_level=bool(_get(mig, "allowToLowerLevel", False)),
    )


def _balancing(bal: Mapping[str, Any]) -> Balancing:
    return Balancing(
        enabled=bool(_get(bal, "enabled", False)),
        high_watermark=int(_get(bal, "highWatermark", 85)),
        low_watermark=int(_get(bal, "lowWatermark", 60)),
        sustain_for=parse_duration(str(_get(bal, "sustainFor", "2m")), "spec.balancing.sustainFor"),
        cooldown=parse_duration(str(_get(bal, "cooldown", "5m")), "spec.balancing.cooldown"),
    )


@dataclass(frozen=True)
class MemberPolicy:
    """What applies to one member: its level while Trusted, attestation settings, golden.

    `member_class` is None when the member's class cannot be resolved (`class_name`, from
    its spec, the first matching transition or the policy's default, names no class of the
    policy, or no class is named at all): nothing can be verified, so no quote is judged.
    """

    level: int
    attestation: Level
    member_class: MemberClass | None
    class_name: str | None = None
    granted: int = 0  # the level a verdict may give it: `level`, or lower by its EK's CA
    ek_scope: str | None = None  # why its EK's CA holds it below `level`


def member_policy(
    policy: Policy,
    *,
    identity: int,
    member_class: str | None,
    labels: Mapping[str, str],
    ek_ceiling: tuple[int, str | None] = (9, None),
) -> MemberPolicy:
    """Apply the transition rules (first match) capped by the member's identity: its level,
    whose settings apply (attestation, failure handling: an agent that withdraws its EK
    certificate must not get a lower level's `autoRecover` or `onUntrusted`), and the level
    a verdict may grant it, capped again by the levels its EK's CA may hold (`ek_ceiling`:
    the highest, and why not higher)."""
    rule = next(
        (
            t
            for t in policy.transitions
            if all(labels.get(k) == v for k, v in t.match_labels.items())
        ),
        None,
    )
    pool_level = rule.level if rule else policy.lowest.level
    available = [lv for lv in policy.levels if lv.level <= min(identity, pool_level)]
    level = available[-1].level if available else 0
    attestation = available[-1] if available else policy.lowest
    cls_name = member_class or (rule.member_class if rule else None) or policy.default_member_class
    # fail closed: a class that is not the policy's (a typo, a class renamed or removed, no
    # default) has no reference values, so it resolves to none and nothing is judged
    cls = policy.member_classes.get(cls_name) if cls_name else None
    ceiling, why = ek_ceiling
    granted = max((lv.level for lv in available if lv.level <= ceiling), default=0)
    held = why if granted < level else None
    return MemberPolicy(level, attestation, cls, cls_name, granted, held)


BOOT_CHAIN_PCRS = {
    0: "the firmware",
    2: "option ROMs and drivers",
    4: "the boot loader and what it loads",
    7: "the Secure Boot state and keys",
}
"""The static root of trust's boot chain: a policy that leaves one out appraises less of
the boot than its name suggests."""


def firmware_measures(pcr: int) -> bool:
    """PCR 0-7, where the firmware of a measured boot logs at least a separator: a
    reset value, or no event in the log, there means no firmware measured the boot."""
    return 0 <= pcr < 8


def policy_weaknesses(policy: Policy) -> list[str]:
    """What the policy accepts that a boot the firmware measured would not show, or leaves
    unappraised: a boot-chain PCR not quoted; a golden value on PCR 0-7 that is the PCR's
    reset value (all zeros: only a boot the firmware never measured has it; the firmware
    logs at least a separator into each); a reference set rule allowing no event on PCR
    0-7 (the same boot). Accepted (a TPM emulator without firmware, the local pool's, has
    exactly these), but said: a Warning on the policy and in its `BootChain` condition."""
    out: list[str] = []
    missing = [p for p in BOOT_CHAIN_PCRS if p not in policy.pcrs]
    if missing:
        what = "; ".join(f"{p}: {BOOT_CHAIN_PCRS[p]}" for p in missing)
        out.append(
            f"spec.pcrSelection.pcrs leaves out boot-chain PCR(s) {what}: a host is trusted "
            "whatever it booted there"
        )
    for name, cls in sorted(policy.member_classes.items()):
        zeros = sorted(p for p, v in cls.golden.items() if firmware_measures(p) and not any(v))
        if zeros:
            out.append(
                f"member class {name} pins PCR(s) {', '.join(map(str, zeros))} to their reset "
                "value (all zeros): only a boot the firmware never measured has it"
            )
        for ref in cls.reference_sets:
            empty = sorted(r.pcr for r in ref.pcrs if firmware_measures(r.pcr) and not r.events)
            if empty:
                out.append(
                    f"member class {name}, reference set {ref.name}, allows no event on PCR(s) "
                    f"{', '.join(map(str, empty))}: only a boot the firmware never measured "
                    "logs none there"
                )
    return out
