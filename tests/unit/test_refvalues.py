"""Measured-boot reference sets appraised on event logs: the real UEFI logs from Keylime's
test data (tests/data/uefi-eventlogs) and small synthetic logs an attacker might send."""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gtvp.core import errors
from gtvp.core.eventlog import EventLog, parse_event_log
from gtvp.core.policy import PolicyError, parse_policy
from gtvp.core.refvalues import (
    EventNotAllowed,
    ReferenceSetExpired,
    appraise,
    learn,
    secure_boot_state,
)
from tests.eventlogs import synth_log

DATA = Path(__file__).parents[1] / "data" / "uefi-eventlogs"
PLAIN, SECURE = "binary_bios_measurements", "binary_bios_measurements-secureboot"
NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
EV_SEPARATOR = 0x4
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_BOOT = 0x80000002
ZERO = "00" * 32


def boot(bootloader: bytes) -> list[tuple[int, int, bytes]]:
    """A boot measuring shim and `bootloader` into PCR 4."""
    return [
        (4, EV_EFI_BOOT_SERVICES_APPLICATION, b"shim-15.8"),
        (4, EV_EFI_BOOT_SERVICES_APPLICATION, bootloader),
        (4, EV_SEPARATOR, b"\0\0\0\0"),
    ]


def uefi_variable(name: str, value: bytes) -> bytes:
    """UEFI_VARIABLE_DATA for the EFI global variable `name`."""
    utf16 = name.encode("utf-16-le")
    guid = bytes.fromhex("61dfe48bca93d211aa0d00e098032b8c")
    return guid + struct.pack("<QQ", len(name), len(value)) + utf16 + value


def real(name: str) -> EventLog:
    return parse_event_log((DATA / name).read_bytes())


def policy_spec(ref_sets: list[dict[str, Any]], pcrs: Sequence[int] = range(8)) -> dict[str, Any]:
    """A policy whose one class holds `ref_sets`, and golden values for the quoted PCRs that
    not every set has rules for (a class must verify every quoted PCR)."""

    def ruled(s: dict[str, Any]) -> set[Any]:
        rules = s.get("pcrs") if isinstance(s, dict) else None
        return {r.get("pcr") for r in rules or () if isinstance(r, dict)}

    golden = {
        str(p): "00" * 32 for p in pcrs if not ref_sets or not all(p in ruled(s) for s in ref_sets)
    }
    return {
        "levels": [
            {"level": 1, "name": "standard", "attestation": {"interval": "30s", "validFor": "90s"}}
        ],
        "pcrSelection": {"hashAlgorithm": "sha256", "pcrs": list(pcrs)},
        "memberClasses": [{"name": "fleet", "goldenPCRs": golden, "referenceSets": ref_sets}],
        "defaultMemberClass": "fleet",
        "ekTrust": {"caBundle": _ca_pem()},
    }


def _ca_pem() -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test EK CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def sets_of(ref_sets: list[dict[str, Any]], pcrs: Sequence[int] = range(8)) -> tuple[Any, ...]:
    """The reference sets as the operator parses them from a SecurityPolicy."""
    policy = parse_policy("p", policy_spec(ref_sets, pcrs))
    return policy.member_classes["fleet"].reference_sets


def quoted(log: EventLog) -> Mapping[int, bytes]:
    """What a TPM that ran this boot quotes for PCRs 0-7."""
    return {p: log.pcrs["sha256"].get(p, b"\0" * 32) for p in range(8)}


# ----- the real UEFI logs ----------------------------------------------------------------


@pytest.mark.parametrize("name", [PLAIN, SECURE])
def test_a_set_learned_from_a_real_log_accepts_that_boot(name: str) -> None:
    log = real(name)
    (ref,) = sets_of([learn(log, "sha256", range(8), name="v1")])
    assert appraise(log, quoted(log), "sha256", (ref,), NOW).name == "v1"
    assert ref.governed == frozenset(range(8))


def test_secure_boot_state_is_read_from_the_measured_variable() -> None:
    assert secure_boot_state(real(PLAIN), "sha256") == "Disabled"
    assert secure_boot_state(real(SECURE), "sha256") == "Enabled"
    assert learn(real(SECURE), "sha256", range(8), name="x")["secureBoot"] == "Enabled"


def test_another_machines_boot_is_refused_naming_its_first_unknown_event() -> None:
    plain, secure = real(PLAIN), real(SECURE)
    sets = sets_of([learn(plain, "sha256", range(8), name="lenovo")])
    with pytest.raises(EventNotAllowed) as exc:
        appraise(secure, quoted(secure), "sha256", sets, NOW)
    msg = exc.value.message
    first = secure.events[0]
    assert f"'lenovo': event 0 (PCR {first.pcr}, EV_S_CRTM_VERSION" in msg
    assert first.digests["sha256"].hex() in msg
    assert "gtvp policy learn" in msg


def test_secure_boot_required_but_off_is_refused() -> None:
    plain = real(PLAIN)
    learned = learn(plain, "sha256", range(8), name="v1")
    assert learned["secureBoot"] == "Disabled"
    sets = sets_of([{**learned, "secureBoot": "Enabled"}])
    with pytest.raises(EventNotAllowed, match="requires Secure Boot Enabled, the log shows Secure"):
        appraise(plain, quoted(plain), "sha256", sets, NOW)


def test_ungoverned_pcrs_events_are_not_appraised() -> None:
    """A set that governs PCR 4 only says nothing about PCR 0's firmware."""
    log = real(SECURE)
    (ref,) = sets_of([learn(log, "sha256", [4], name="boot-chain")])
    assert ref.governed == {4}
    assert appraise(log, quoted(log), "sha256", (ref,), NOW).name == "boot-chain"


def test_the_startup_locality_is_learned_where_the_firmware_set_it() -> None:
    """The Lenovo log's TPM was started at locality 3 (an H-CRTM): learned, PCR 0 governed;
    the other machine's at 0: nothing to learn (software can start a TPM there too)."""
    learned = learn(real(PLAIN), "sha256", range(8), name="v1")
    assert learned["startupLocality"] == 3
    assert "startupLocality" not in learn(real(SECURE), "sha256", range(8), name="v1")
    assert "startupLocality" not in learn(real(PLAIN), "sha256", [4], name="v1")
    (ref,) = sets_of([learned])
    assert ref.startup_locality == 3


# ----- attacks ---------------------------------------------------------------------------


def _synth(events: Sequence[tuple[int, int, bytes]]) -> EventLog:
    return parse_event_log(synth_log(events))


def test_a_different_bootloader_is_refused_with_the_event_named() -> None:
    good = _synth(boot(b"grub-2.12"))
    sets = sets_of([learn(good, "sha256", [4], name="v1")])
    evil = _synth(boot(b"grub-2.12-backdoored"))
    with pytest.raises(EventNotAllowed) as exc:
        appraise(evil, quoted(evil), "sha256", sets, NOW)
    digest = hashlib.sha256(b"grub-2.12-backdoored").hexdigest()
    assert (
        f"event 1 (PCR 4, EV_EFI_BOOT_SERVICES_APPLICATION, sha256 {digest}) is not allowed"
        in exc.value.message
    )


def test_an_allowed_digest_under_another_event_type_is_refused() -> None:
    good = _synth(boot(b"grub-2.12"))
    sets = sets_of([learn(good, "sha256", [4], name="v1")])
    # the separator's digest, presented as an application: the type is part of the rule
    moved = _synth([*boot(b"grub-2.12")[:2], (4, EV_EFI_BOOT_SERVICES_APPLICATION, b"\0" * 4)])
    with pytest.raises(EventNotAllowed, match=r"event 2 .*EV_EFI_BOOT_SERVICES_APPLICATION"):
        appraise(moved, quoted(moved), "sha256", sets, NOW)


def test_a_log_that_does_not_replay_to_the_quote_is_refused() -> None:
    """An allowlisted log sent alongside the quote of another boot: the TPM's PCR 4 is what
    the backdoored bootloader left, the log claims the good one."""
    good = _synth(boot(b"grub-2.12"))
    sets = sets_of([learn(good, "sha256", [4], name="v1")])
    tpm = quoted(_synth(boot(b"grub-2.12-backdoored")))
    with pytest.raises(errors.EventLogMismatch, match=r"PCR 4 is .* but replaying"):
        appraise(good, tpm, "sha256", sets, NOW)


def test_a_forged_secure_boot_variable_says_nothing() -> None:
    """SecureBoot data changed after measuring (its digest is still the 'off' one)."""
    off = uefi_variable("SecureBoot", b"\x00")
    log = _synth([(7, EV_EFI_VARIABLE_DRIVER_CONFIG, off), (7, EV_SEPARATOR, b"\0" * 4)])
    assert secure_boot_state(log, "sha256") == "Disabled"
    data = synth_log([(7, EV_EFI_VARIABLE_DRIVER_CONFIG, off), (7, EV_SEPARATOR, b"\0" * 4)])
    forged = parse_event_log(data.replace(off, uefi_variable("SecureBoot", b"\x01")))
    assert secure_boot_state(forged, "sha256") is None
    sets = sets_of([{"name": "sb", "secureBoot": "Enabled"}])
    with pytest.raises(EventNotAllowed, match="no measured SecureBoot variable"):
        appraise(forged, quoted(forged), "sha256", sets, NOW)


def test_a_secure_boot_event_the_tpm_never_measured_is_not_believed() -> None:
    """A set that checks Secure Boot only: the log's SecureBoot event must be what PCR 7
    holds, even though the set has no rule for PCR 7's events."""
    on = uefi_variable("SecureBoot", b"\x01")
    claimed = _synth([(7, EV_EFI_VARIABLE_DRIVER_CONFIG, on), (7, EV_SEPARATOR, b"\0" * 4)])
    measured = _synth([(7, EV_EFI_VARIABLE_DRIVER_CONFIG, uefi_variable("SecureBoot", b"\x00"))])
    (ref,) = sets_of([{"name": "sb", "secureBoot": "Enabled"}])
    assert ref.governed == {7}
    assert appraise(claimed, quoted(claimed), "sha256", (ref,), NOW).name == "sb"
    with pytest.raises(errors.EventLogMismatch, match="PCR 7"):
        appraise(claimed, quoted(measured), "sha256", (ref,), NOW)


@pytest.mark.parametrize(
    ("pcrs", "field"),
    [
        (["4"], "spec.memberClasses[0].referenceSets[0].pcrs[0]"),
        (
            [{"pcr": 4, "events": ["EV_SEPARATOR"]}],
            "spec.memberClasses[0].referenceSets[0].pcrs[0].events[0]",
        ),
        (
            [{"pcr": 4, "events": [{"type": "EV_SEPARATOR", "digests": ZERO}]}],
            "spec.memberClasses[0].referenceSets[0].pcrs[0].events[0]",
        ),
    ],
)
def test_misshapen_rules_are_refused_not_crashed_on(pcrs: list[Any], field: str) -> None:
    with pytest.raises(PolicyError) as exc:
        parse_policy("p", policy_spec([{"name": "a", "pcrs": pcrs}]))
    assert exc.value.field == field


def test_a_variable_rule_holds_only_for_that_variable() -> None:
    """EV_EFI_VARIABLE_BOOT digests cover the variable's contents only, so the same digest
    under another variable (Boot0001 pointing where BootOrder's bytes did) is refused."""
    contents = b"\x01\x00\x02\x00"
    digest = {0: hashlib.sha256(contents).digest()}
    order = [(1, EV_EFI_VARIABLE_BOOT, uefi_variable("BootOrder", contents))]
    log = parse_event_log(synth_log(order, digest))
    learned = learn(log, "sha256", [1], name="boot-vars")
    assert learned["pcrs"] == [
        {
            "pcr": 1,
            "events": [
                {
                    "type": "EV_EFI_VARIABLE_BOOT",
                    "variable": "BootOrder",
                    "digests": [hashlib.sha256(contents).hexdigest()],
                }
            ],
        }
    ]
    sets = sets_of([learned])
    assert appraise(log, quoted(log), "sha256", sets, NOW).name == "boot-vars"
    other = [(1, EV_EFI_VARIABLE_BOOT, uefi_variable("Boot0001", contents))]
    moved = parse_event_log(synth_log(other, digest))
    with pytest.raises(EventNotAllowed, match="EV_EFI_VARIABLE_BOOT Boot0001"):
        appraise(moved, quoted(moved), "sha256", sets, NOW)


# ----- staged rollouts -------------------------------------------------------------------


def test_two_reference_sets_accept_either_boot_and_name_which() -> None:
    old, new = _synth(boot(b"grub-2.06")), _synth(boot(b"grub-2.12"))
    sets = sets_of(
        [learn(old, "sha256", [4], name="grub-2-06"), learn(new, "sha256", [4], name="grub-2-12")]
    )
    assert appraise(old, quoted(old), "sha256", sets, NOW).name == "grub-2-06"
    assert appraise(new, quoted(new), "sha256", sets, NOW).name == "grub-2-12"


def test_an_expired_set_stops_matching_with_a_clear_reason() -> None:
    old, new = _synth(boot(b"grub-2.06")), _synth(boot(b"grub-2.12"))
    sets = sets_of(
        [
            {**learn(old, "sha256", [4], name="grub-2-06"), "notAfter": "2026-12-01T00:00:00Z"},
            learn(new, "sha256", [4], name="grub-2-12"),
        ]
    )
    with pytest.raises(ReferenceSetExpired) as exc:
        appraise(old, quoted(old), "sha256", sets, NOW)
    assert "reference set 'grub-2-06' expired at 2026-12-01T00:00:00Z (notAfter)" in str(exc.value)
    assert "'grub-2-12': event 1" in exc.value.message
    assert appraise(new, quoted(new), "sha256", sets, NOW).name == "grub-2-12"
    # before notAfter it still matched
    assert appraise(old, quoted(old), "sha256", sets, NOW - dt.timedelta(days=2)).name == (
        "grub-2-06"
    )


def test_a_set_not_yet_valid_does_not_match() -> None:
    new = _synth(boot(b"grub-2.12"))
    sets = sets_of(
        [{**learn(new, "sha256", [4], name="canary"), "notBefore": "2027-01-01T00:00:00Z"}]
    )
    with pytest.raises(ReferenceSetExpired, match="valid only from 2027-01-01T00:00:00Z"):
        appraise(new, quoted(new), "sha256", sets, NOW)


# ----- the policy parser -----------------------------------------------------------------

GOOD_RULE = {"type": "EV_SEPARATOR", "digests": [ZERO]}


@pytest.mark.parametrize(
    ("ref_set", "field", "says"),
    [
        (
            {
                "name": "a",
                "pcrs": [{"pcr": 4, "events": [{"type": "EV_BOGUS", "digests": [ZERO]}]}],
            },
            "spec.memberClasses[0].referenceSets[0].pcrs[0].events[0].type",
            "is not a TCG event type",
        ),
        (
            {
                "name": "a",
                "pcrs": [{"pcr": 4, "events": [{"type": "EV_SEPARATOR", "digests": ["ab" * 20]}]}],
            },
            "spec.memberClasses[0].referenceSets[0].pcrs[0].events[0].digests[0]",
            "20 bytes (40 hex digits), but a sha256 event digest has 32 bytes",
        ),
        (
            {"name": "a", "pcrs": [{"pcr": 9, "events": [GOOD_RULE]}]},
            "spec.memberClasses[0].referenceSets[0].pcrs[0].pcr",
            "PCR 9 is not in spec.pcrSelection.pcrs",
        ),
        (
            {"name": "a", "pcrs": [{"pcr": 4, "events": [GOOD_RULE]}, {"pcr": 4, "events": []}]},
            "spec.memberClasses[0].referenceSets[0].pcrs[1].pcr",
            "PCR 4 is listed twice",
        ),
        (
            {
                "name": "a",
                "pcrs": [{"pcr": 4, "events": [{"type": "EV_SEPARATOR", "digests": []}]}],
            },
            "spec.memberClasses[0].referenceSets[0].pcrs[0].events[0].digests",
            "at least one allowed digest",
        ),
        (
            {
                "name": "a",
                "notBefore": "2026-06-01T00:00:00Z",
                "notAfter": "2026-05-01T00:00:00Z",
                "pcrs": [{"pcr": 4, "events": [GOOD_RULE]}],
            },
            "spec.memberClasses[0].referenceSets[0].notAfter",
            "is not after notBefore",
        ),
        (
            {"name": "a", "notAfter": "next tuesday", "pcrs": [{"pcr": 4, "events": [GOOD_RULE]}]},
            "spec.memberClasses[0].referenceSets[0].notAfter",
            "is not an RFC 3339 time",
        ),
        (
            {"name": "a", "secureBoot": "Maybe"},
            "spec.memberClasses[0].referenceSets[0].secureBoot",
            "is not one of ['Enabled', 'Disabled']",
        ),
        (
            {"name": "a", "pcrs": []},
            "spec.memberClasses[0].referenceSets[0].pcrs",
            "governs no PCR: it would accept any log",
        ),
    ],
)
def test_unusable_reference_sets_are_refused_naming_the_field(
    ref_set: dict[str, Any], field: str, says: str
) -> None:
    with pytest.raises(PolicyError) as exc:
        parse_policy("p", policy_spec([ref_set]))
    assert exc.value.field == field
    assert says in exc.value.message


def test_secure_boot_needs_pcr_7_quoted() -> None:
    with pytest.raises(PolicyError, match=r"PCR 7, which spec\.pcrSelection\.pcrs does not quote"):
        parse_policy("p", policy_spec([{"name": "a", "secureBoot": "Enabled"}], pcrs=[0, 4]))


def test_a_set_named_twice_is_refused() -> None:
    rs = {"name": "a", "pcrs": [{"pcr": 4, "events": [GOOD_RULE]}]}
    with pytest.raises(PolicyError, match="reference set 'a' is defined twice"):
        parse_policy("p", policy_spec([rs, rs]))


def test_reference_sets_imply_a_required_event_log() -> None:
    """A class with reference sets and no golden values verifies something (the log)."""
    cls = parse_policy(
        "p", policy_spec([{"name": "a", "pcrs": [{"pcr": 4, "events": [GOOD_RULE]}]}])
    )
    assert cls.member_classes["fleet"].event_log_required


def test_learned_yaml_round_trips_through_the_policy_parser() -> None:
    """What `gtvp policy learn` prints is what the parser accepts (hex case, type names)."""
    learned = learn(real(PLAIN), "sha256", range(8), name="learned-plain")
    text = yaml.safe_dump(learned)
    (ref,) = sets_of([yaml.safe_load(text)])
    assert ref.name == "learned-plain"
    assert ref.secure_boot == "Disabled"


# ----- no exception but gtvp's own --------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0, max_value=4000))
def test_mutated_logs_are_refused_or_appraised_never_crash(patch: bytes, at: int) -> None:
    """Bytes an attacker controls (the whole log) never raise anything but a
    VerificationError, and never match a set unless the events are the allowed ones."""
    data = bytearray((DATA / SECURE).read_bytes())
    at %= len(data)
    data[at : at + len(patch)] = patch
    (ref,) = _SECURE_SETS
    try:
        log = parse_event_log(bytes(data))
        matched = appraise(log, quoted(log), "sha256", (ref,), NOW)
    except errors.VerificationError:
        return
    # accepted: then every governed event's digest is one the set allows
    allowed = {d for rule in ref.pcrs for e in rule.events for d in e.digests}
    assert matched is ref
    assert all(
        e.digests["sha256"].hex() in allowed
        for e in log.events
        if e.pcr in ref.governed and e.event_type != 3
    )


_SECURE_SETS = sets_of([learn(real(SECURE), "sha256", range(8), name="sb")])


@pytest.mark.parametrize(
    ("learned_from", "checked", "refusal"),
    [
        (SECURE, SECURE, None),
        (SECURE, PLAIN, "event 1 (PCR 0, EV_S_CRTM_CONTENTS, sha256 0cc511a92b85"),
        (PLAIN, SECURE, "event 0 (PCR 0, EV_S_CRTM_VERSION, sha256 65976c0bfab2"),
        (PLAIN, PLAIN, None),
    ],
)
def test_the_gtvp_column_of_the_keylime_comparison(
    learned_from: str, checked: str, refusal: str | None
) -> None:
    """docs/attestation.md compares these verdicts with Keylime's example policy."""
    sets = sets_of([learn(real(learned_from), "sha256", range(8), name="ref")])
    log = real(checked)
    if refusal is None:
        assert appraise(log, quoted(log), "sha256", sets, NOW).name == "ref"
        return
    with pytest.raises(EventNotAllowed) as exc:
        appraise(log, quoted(log), "sha256", sets, NOW)
    assert refusal in exc.value.message


def test_a_learned_set_rules_every_pcr_it_was_asked_for_even_one_with_no_events() -> None:
    """A class must verify every quoted PCR: a set learned for PCRs 0-15 rules those that
    hold no event too (no event allowed there), so the set alone makes a usable class, and
    the boot it was learned from is accepted."""
    log = real(SECURE)
    measured = {e.pcr for e in log.events if e.event_type != 0x3}  # EV_NO_ACTION extends none
    empty = sorted(set(range(16)) - measured)
    assert empty  # this firmware measures nothing into some of 8-15
    learned = learn(log, "sha256", range(16), name="all")
    ruled = {r["pcr"]: r["events"] for r in learned["pcrs"]}
    assert set(ruled) == set(range(16))
    assert all(ruled[p] == [] for p in empty)
    spec = policy_spec([learned], pcrs=range(16))
    assert spec["memberClasses"][0]["goldenPCRs"] == {}  # the set alone verifies every PCR
    sets = parse_policy("p", spec).member_classes["fleet"].reference_sets
    quoted16 = {p: log.pcrs["sha256"].get(p, b"\0" * 32) for p in range(16)}
    assert appraise(log, quoted16, "sha256", sets, NOW).name == "all"


def _software_filled(log: EventLog) -> EventLog:
    """The same boot's events, extended from the OS into a TPM it started itself (the
    firmware measured nothing: the TPM hidden from it), so no StartupLocality: PCR 0 begins
    at zero."""
    events = [(e.pcr, e.event_type, e.data) for e in log.events if e.event_type != 3]
    digests = {
        i: e.digests["sha256"] for i, e in enumerate(x for x in log.events if x.event_type != 3)
    }
    return parse_event_log(synth_log(events, digests))


def test_a_boot_the_firmware_did_not_measure_is_refused_where_it_starts_at_locality_3() -> None:
    """Root starts the TPM from the OS (at locality 0) on a boot the firmware did not
    measure, and extends the good boot's events itself: every event is allowed, the log
    replays to the quote, but PCR 0 began at 0, not at the firmware's locality 3."""
    genuine = real(PLAIN)
    sets = sets_of([learn(genuine, "sha256", range(8), name="lenovo")])
    forged = _software_filled(genuine)
    assert forged.pcrs["sha256"][4] == genuine.pcrs["sha256"][4]  # the same boot chain
    with pytest.raises(EventNotAllowed, match="requires a TPM started at locality 3"):
        appraise(forged, quoted(forged), "sha256", sets, NOW)
    assert appraise(genuine, quoted(genuine), "sha256", sets, NOW).name == "lenovo"


@pytest.mark.parametrize(
    ("value", "pcrs", "said"),
    [(5, range(8), "not a locality 0-4"), ("3", range(8), "not a locality 0-4"),
     (True, range(8), "not a locality 0-4"), (3, [4, 7], "does not quote")],
)  # fmt: skip
def test_a_startup_locality_that_checks_nothing_is_refused(
    value: Any, pcrs: Sequence[int], said: str
) -> None:
    learned = learn(real(PLAIN), "sha256", [4], name="v1")
    with pytest.raises(PolicyError, match=said):
        sets_of([{**learned, "startupLocality": value}], pcrs)


def test_requiring_the_startup_locality_counts_as_a_change_of_the_references() -> None:
    """A set that starts requiring the locality (the remediation for software-filled boots)
    changes what standing verdicts rested on: they are spent (`ReferencesChanged`) rather
    than backing key releases until the next quote; a set that does not require it hashes
    as before (no verdict of the fleet is spent by the upgrade)."""
    from gtvp.core.attestation import relied_on

    learned = learn(real(PLAIN), "sha256", range(8), name="lenovo")
    without = {k: v for k, v in learned.items() if k != "startupLocality"}
    before = parse_policy("p", policy_spec([without])).member_classes["fleet"]
    after = parse_policy("p", policy_spec([learned])).member_classes["fleet"]
    assert relied_on(before, "lenovo") != relied_on(after, "lenovo")
