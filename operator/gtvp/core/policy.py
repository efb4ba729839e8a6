"""The SecurityPolicy as typed values, and what it means for one member.

`parse_policy` turns a SecurityPolicy spec (as the API server stores it, after the CRD's
schema and CEL rules) into frozen dataclasses, and refuses what the schema cannot express
(unreadable CA bundle or publisher key, a golden value of the wrong length, a member class
named twice, a default class that does not exist) with `PolicyError` naming the field.
`member_policy` gives the level, attestation settings and golden values that apply to one
member, from its identity, its class and the transition rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gtvp.core.tpm_wire import HASH_BY_NAME, HASH_SIZES


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


@dataclass(frozen=True)
class Level:
    level: int
    name: str
    interval: timedelta
    valid_for: timedelta
    max_uses: int
    on_untrusted: str = "Migrate"
    auto_recover: bool = True


@dataclass(frozen=True)
class MemberClass:
    name: str
    golden: Mapping[int, bytes] = field(default_factory=dict)
    event_log_required: bool = False
    forbidden_digests: frozenset[str] = frozenset()


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

    def level(self, number: int) -> Level | None:
        return next((lv for lv in self.levels if lv.level == number), None)

    @property
    def lowest(self) -> Level:
        return self.levels[0]


def _get(d: Mapping[str, Any], key: str, default: Any = None) -> Any:
    v = d.get(key, default)
    return default if v is None else v


def parse_policy(name: str, spec: Mapping[str, Any]) -> Policy:
    """Typed policy from a SecurityPolicy spec; PolicyError names what is unusable."""
    raw_levels = _get(spec, "levels", [])
    if not raw_levels:
        raise PolicyError("spec.levels", "at least one level is needed")
    levels = []
    for i, lv in enumerate(sorted(raw_levels, key=lambda x: int(x.get("level", 0)))):
        att = _get(lv, "attestation", {})
        path = f"spec.levels[{i}].attestation"
        interval = parse_duration(str(_get(att, "interval", "")), f"{path}.interval")
        valid_for = parse_duration(str(_get(att, "validFor", "")), f"{path}.validFor")
        if valid_for <= interval:
            raise PolicyError(f"{path}.validFor", "must be longer than interval")
        levels.append(
            Level(
                level=int(lv["level"]),
                name=str(lv.get("name", f"level-{lv['level']}")),
                interval=interval,
                valid_for=valid_for,
                max_uses=int(_get(att, "maxUses", 1)),
                on_untrusted=str(_get(lv, "onUntrusted", "Migrate")),
                auto_recover=bool(_get(lv, "autoRecover", True)),
            )
        )
    sel = _get(spec, "pcrSelection", {})
    bank = str(_get(sel, "hashAlgorithm", "sha256"))
    if bank not in HASH_BY_NAME:
        raise PolicyError("spec.pcrSelection.hashAlgorithm", f"unknown bank {bank!r}")
    pcrs = tuple(sorted({int(p) for p in _get(sel, "pcrs", [])}))
    if not pcrs:
        raise PolicyError("spec.pcrSelection.pcrs", "select at least one PCR")
    size = HASH_SIZES[HASH_BY_NAME[bank]]
    classes: dict[str, MemberClass] = {}
    for i, mc in enumerate(_get(spec, "memberClasses", [])):
        path = f"spec.memberClasses[{i}]"
        cname = str(mc["name"])
        if cname in classes:
            raise PolicyError(f"{path}.name", f"class {cname!r} is defined twice")
        golden: dict[int, bytes] = {}
        for k, v in _get(mc, "goldenPCRs", {}).items():
            try:
                value = bytes.fromhex(str(v))
            except ValueError as exc:
                raise PolicyError(f"{path}.goldenPCRs[{k}]", "not hex") from exc
            if len(value) != size:
                raise PolicyError(
                    f"{path}.goldenPCRs[{k}]",
                    f"{len(value)} bytes, but a {bank} PCR value has {size}",
                )
            golden[int(k)] = value
        log = _get(mc, "eventLog", {})
        classes[cname] = MemberClass(
            name=cname,
            golden=golden,
            event_log_required=bool(_get(log, "required", False)),
            forbidden_digests=frozenset(str(d).lower() for d in _get(log, "forbiddenDigests", [])),
        )
    default_class = spec.get("defaultMemberClass") or None
    if default_class is not None and default_class not in classes:
        raise PolicyError("spec.defaultMemberClass", f"no member class named {default_class!r}")
    ek = _get(spec, "ekTrust", {})
    bundle = str(_get(ek, "caBundle", ""))
    try:
        if not x509.load_pem_x509_certificates(bundle.encode()):
            raise ValueError("no certificate")
    except ValueError as exc:
        raise PolicyError("spec.ekTrust.caBundle", f"cannot read the certificates: {exc}") from exc
    keys: dict[str, str] = {}
    for i, pk in enumerate(_get(spec, "publisherKeys", [])):
        try:
            serialization.load_pem_public_key(str(pk["publicKey"]).encode())
        except (ValueError, TypeError) as exc:
            raise PolicyError(f"spec.publisherKeys[{i}].publicKey", f"unreadable: {exc}") from exc
        keys[str(pk["name"])] = str(pk["publicKey"])
    transitions = []
    for i, t in enumerate(_get(spec, "transitions", [])):
        mc = t.get("memberClass")
        if mc and mc not in classes:
            raise PolicyError(f"spec.transitions[{i}].memberClass", f"no member class {mc!r}")
        transitions.append(
            Transition(dict(_get(t, "matchLabels", {})), int(t.get("level", 0)), mc or None)
        )
    mig = _get(spec, "migration", {})
    bal = _get(spec, "balancing", {})
    return Policy(
        name=name,
        levels=tuple(levels),
        pcr_bank=bank,
        pcrs=pcrs,
        member_classes=classes,
        default_member_class=default_class,
        ca_bundle_pem=bundle,
        allow_uncertified_with_approval=bool(_get(ek, "allowUncertifiedWithApproval", False)),
        allow_shared_ek=bool(_get(ek, "allowSharedEk", False)),
        publisher_keys=keys,
        transitions=tuple(transitions),
        migration=MigrationLimits(
            max_parallel=int(_get(mig, "maxParallel", 5)),
            max_outbound_per_node=int(_get(mig, "maxOutboundPerNode", 2)),
            max_inbound_per_node=int(_get(mig, "maxInboundPerNode", 2)),
            allow_to_lower_level=bool(_get(mig, "allowToLowerLevel", False)),
        ),
        balancing=Balancing(
            enabled=bool(_get(bal, "enabled", False)),
            high_watermark=int(_get(bal, "highWatermark", 85)),
            low_watermark=int(_get(bal, "lowWatermark", 60)),
            sustain_for=parse_duration(str(_get(bal, "sustainFor", "2m")), "spec.balancing"),
            cooldown=parse_duration(str(_get(bal, "cooldown", "5m")), "spec.balancing.cooldown"),
        ),
    )


@dataclass(frozen=True)
class MemberPolicy:
    """What applies to one member: its level while Trusted, attestation settings, golden."""

    level: int
    attestation: Level
    member_class: MemberClass


def member_policy(
    policy: Policy,
    *,
    identity: int,
    member_class: str | None,
    labels: Mapping[str, str],
) -> MemberPolicy:
    """Apply the transition rules (first match) capped by the member's identity."""
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
    # an unknown class has no golden values: its PCRs must be explained by an event log
    cls = policy.member_classes.get(cls_name or "") or MemberClass(name=cls_name or "(none)")
    return MemberPolicy(level=level, attestation=attestation, member_class=cls)
