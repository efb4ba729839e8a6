"""parse_policy refuses what the operator could not enforce, naming the field and the fix.

Each case starts from the sample policy (which parses) and breaks one thing the CRD's
schema lets through or cannot check (PEM and DER, digest lengths per bank, names that
refer to other entries, labels a kubelet may set on itself).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gtvp.core.component_checks import check_component
from gtvp.core.policy import PolicyError, member_policy, parse_policy, policy_weaknesses
from tests.catalogue import Publisher
from tests.samples import sample_policy_spec


def _sample() -> dict[str, Any]:
    return sample_policy_spec()


def _pem(label: str, der: bytes) -> str:
    body = base64.b64encode(der).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""])


def _public_pem(key: Any) -> str:
    return str(
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _refused(spec: dict[str, Any]) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy("p", spec)
    return info.value


def test_the_sample_policy_parses() -> None:
    policy = parse_policy("example", _sample())
    assert [lv.level for lv in policy.levels] == [1, 2, 3]
    assert policy.default_member_class == "uefi-secureboot"


def test_golden_value_of_31_bytes_in_a_sha256_bank_is_refused() -> None:
    spec = _sample()
    spec["memberClasses"][0]["goldenPCRs"] = {"7": "ab" * 31}
    err = _refused(spec)
    assert err.field == "spec.memberClasses[0].goldenPCRs[7]"
    assert "31 bytes (62 hex digits)" in err.message
    assert "a sha256 PCR value has 32 bytes (64 hex digits)" in err.message
    assert "spec.pcrSelection.hashAlgorithm" in err.message


def test_sha1_bank_with_32_byte_golden_values_is_refused() -> None:
    spec = _sample()
    spec["pcrSelection"]["allowSha1"] = True
    spec["pcrSelection"]["hashAlgorithm"] = "sha1"
    spec["memberClasses"][0]["goldenPCRs"] = {"0": "00" * 32}
    err = _refused(spec)
    assert err.field == "spec.memberClasses[0].goldenPCRs[0]"
    assert "32 bytes (64 hex digits)" in err.message
    assert "a sha1 PCR value has 20 bytes (40 hex digits)" in err.message


def test_forbidden_digest_of_another_bank_is_refused() -> None:
    spec = _sample()
    spec["memberClasses"][0]["eventLog"] = {"forbiddenDigests": ["aa" * 20]}
    err = _refused(spec)
    assert err.field == "spec.memberClasses[0].eventLog.forbiddenDigests[0]"
    assert "20 bytes" in err.message
    assert "sha256" in err.message
    assert "would never match" in err.message


def test_ca_bundle_with_bad_der_is_refused() -> None:
    spec = _sample()
    spec["ekTrust"]["caBundle"] = _pem("CERTIFICATE", b"\x30\x03\x02\x01\x01")
    err = _refused(spec)
    assert err.field == "spec.ekTrust.caBundle"
    assert "certificate 1 of 1 (line 1)" in err.message
    assert "is not a DER X.509 certificate" in err.message


def test_ca_bundle_with_bad_pem_is_refused() -> None:
    spec = _sample()
    good = spec["ekTrust"]["caBundle"]
    spec["ekTrust"]["caBundle"] = (
        good + "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
    )
    err = _refused(spec)
    assert err.field == "spec.ekTrust.caBundle"
    assert "certificate 2 of 2" in err.message
    assert "not valid base64" in err.message


def test_ca_bundle_with_an_unterminated_block_is_refused() -> None:
    spec = _sample()
    spec["ekTrust"]["caBundle"] = spec["ekTrust"]["caBundle"].replace(
        "-----END CERTIFICATE-----", ""
    )
    err = _refused(spec)
    assert err.field == "spec.ekTrust.caBundle"
    assert "-----BEGIN CERTIFICATE----- without its -----END CERTIFICATE-----" in err.message


def test_ca_bundle_holding_a_key_instead_of_a_certificate_is_refused() -> None:
    spec = _sample()
    spec["ekTrust"]["caBundle"] = spec["publisherKeys"][0]["publicKey"]
    err = _refused(spec)
    assert err.field == "spec.ekTrust.caBundle"
    assert "holds no PEM certificate" in err.message


def test_publisher_key_with_bad_pem_is_refused() -> None:
    spec = _sample()
    spec["publisherKeys"][0]["publicKey"] = _pem("PUBLIC KEY", b"\x30\x03\x02\x01\x01")
    err = _refused(spec)
    assert err.field == "spec.publisherKeys[0].publicKey"
    assert "publisher 'gtvp-demo-publisher'" in err.message
    assert "not a DER SubjectPublicKeyInfo" in err.message


def test_publisher_key_of_an_unsupported_type_is_refused() -> None:
    spec = _sample()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    spec["publisherKeys"][0]["publicKey"] = _public_pem(key)
    err = _refused(spec)
    assert err.field == "spec.publisherKeys[0].publicKey"
    assert "an RSA key" in err.message
    assert "Ed25519 or ECDSA P-256" in err.message


def test_publisher_keys_of_the_supported_types_are_accepted() -> None:
    spec = _sample()
    spec["publisherKeys"] = [
        {"name": "ed", "publicKey": _public_pem(ed25519.Ed25519PrivateKey.generate())},
        {"name": "p256", "publicKey": _public_pem(ec.generate_private_key(ec.SECP256R1()))},
    ]
    assert set(parse_policy("p", spec).publisher_keys) == {"ed", "p256"}


def test_the_publisher_key_checked_is_the_key_signatures_are_verified_with() -> None:
    """An editor pastes an old RSA key (`RSA PUBLIC KEY`, not counted as a public key)
    before the publisher's Ed25519 one: the policy is accepted on the Ed25519 key, and that
    key, not the first PEM block, verifies the publisher's components."""
    signer = Publisher("acme")
    rsa_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        .decode()
    )
    spec = _sample()
    spec["publisherKeys"] = [{"name": "acme", "publicKey": rsa_pem + signer.keys["acme"]}]
    policy = parse_policy("p", spec)
    assert "RSA PUBLIC KEY" not in policy.publisher_keys["acme"]
    component = signer.component("nginx", "1.26.2", "application")
    check = check_component(component, policy.publisher_keys, policy.publisher_scopes)
    assert (check.ok, check.reason) == (True, "SignatureValid"), check.message


def test_missing_default_class_is_refused() -> None:
    spec = _sample()
    spec["defaultMemberClass"] = "generic-bios"
    err = _refused(spec)
    assert err.field == "spec.defaultMemberClass"
    assert "no member class named 'generic-bios'" in err.message
    assert "uefi-secureboot" in err.message  # says which classes there are


def test_transition_to_a_missing_class_is_refused() -> None:
    spec = _sample()
    spec["transitions"][0]["memberClass"] = "nope"
    err = _refused(spec)
    assert err.field == "spec.transitions[0].memberClass"
    assert "no member class named 'nope'" in err.message


VERIFIES_NOTHING: list[dict[str, Any]] = [
    {"name": "lax"},
    {"name": "lax", "goldenPCRs": {}},
    {"name": "lax", "eventLog": {"required": False}},
    {"name": "lax", "eventLog": {"forbiddenDigests": ["aa" * 32]}},
    # a required log only shows that the log matches the quote: a modified bootloader's or
    # kernel's own log, measured faithfully by the firmware, replays just as well
    {"name": "lax", "eventLog": {"required": True}},
    {"name": "lax", "eventLog": {"required": True, "forbiddenDigests": ["aa" * 32]}},
]


@pytest.mark.parametrize(
    "cls",
    VERIFIES_NOTHING,
    ids=["bare", "no-golden", "log-optional", "deny", "log-required", "log-required-deny"],
)
def test_a_member_class_that_would_verify_nothing_is_refused(cls: dict[str, Any]) -> None:
    spec = _sample()
    spec["memberClasses"].append(cls)
    err = _refused(spec)
    assert err.field == "spec.memberClasses[1]"
    assert "member class 'lax' verifies nothing" in err.message
    assert "goldenPCRs" in err.message
    assert "gtvp policy learn" in err.message


def _set_on(*pcrs: int, name: str = "s") -> dict[str, Any]:
    return {
        "name": name,
        "pcrs": [{"pcr": p, "events": [{"type": "EV_SEPARATOR", "digests": ["df" * 32]}]}
                 for p in pcrs],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("cls", "unverified"),
    [
        ({"goldenPCRs": {"0": "00" * 32}}, "1, 2, 3, 4, 5, 6, 7"),  # golden PCR 0 only
        ({"goldenPCRs": {str(p): "00" * 32 for p in range(7)}}, "7"),
        ({"referenceSets": [_set_on(0, 1, 2, 3, 4, 5, 6)]}, "7"),
        # a set that checks only the Secure Boot state leaves PCR 7's keys (db, KEK) open
        ({"referenceSets": [{**_set_on(0, 1, 2, 3, 4, 5, 6), "secureBoot": "Enabled"}]}, "7"),
        # each set must cover what golden values do not: a second set lacking PCR 4
        (
            {"referenceSets": [_set_on(*range(8), name="a"), _set_on(0, 1, 2, 3, 5, 6, 7)]},
            "4",
        ),
    ],
    ids=["golden-0", "golden-0-6", "set-0-6", "set-secureboot-only", "second-set-lacks-4"],
)
def test_a_member_class_leaving_a_quoted_pcr_unverified_is_refused(
    cls: dict[str, Any], unverified: str
) -> None:
    spec = _sample()
    spec["memberClasses"].append({"name": "partial", **cls})
    err = _refused(spec)
    assert err.field == "spec.memberClasses[1]"
    assert f"member class 'partial' leaves PCR(s) {unverified} unverified" in err.message


def test_a_golden_value_for_a_pcr_no_quote_includes_is_refused() -> None:
    """Golden values for PCR 8 and 9 (kernel command line, initrd) under a selection of 0-7
    would check nothing: a host booting a good kernel with `init=/bin/sh` would pass."""
    spec = _sample()
    assert 8 not in spec["pcrSelection"]["pcrs"]
    spec["memberClasses"][0]["goldenPCRs"] = {
        **spec["memberClasses"][0].get("goldenPCRs", {}), "8": "11" * 32, "9": "22" * 32,
    }  # fmt: skip
    err = _refused(spec)
    assert err.field == "spec.memberClasses[0].goldenPCRs[8]"
    assert err.message.startswith("PCR 8 is not in spec.pcrSelection.pcrs")


@pytest.mark.parametrize(
    ("pcrs", "named"),
    [
        ([0, 16], "16 (debug)"),
        ([23], "23 (application support)"),
        ([16, 23], "16 (debug), 23 (application support)"),
    ],
)
def test_a_selection_of_pcrs_any_software_can_reset_is_refused(pcrs: list[int], named: str) -> None:
    """A golden value for PCR 16 or 23 proves nothing: root on the host resets the PCR and
    extends it to that value before the quote."""
    spec = _sample()
    spec["pcrSelection"]["pcrs"] = sorted(set(spec["pcrSelection"]["pcrs"]) | set(pcrs))
    for cls in spec["memberClasses"]:
        cls.setdefault("goldenPCRs", {}).update({str(p): "00" * 32 for p in pcrs})
    err = _refused(spec)
    assert err.field == "spec.pcrSelection.pcrs"
    assert f"PCR {named} can be reset by any software on the machine" in err.message


def test_a_selection_of_pcrs_locality_2_can_reset_is_refused() -> None:
    """PCRs 20-22 (DRTM) can be reset from locality 2, which the OS may reach: root replays
    any value there. Found by a review: they were accepted."""
    spec = _sample()
    spec["pcrSelection"]["pcrs"] = [*spec["pcrSelection"]["pcrs"], 17, 20, 22]
    err = _refused(spec)
    assert err.field == "spec.pcrSelection.pcrs"
    assert "PCR 20, 22 can be reset from locality 2" in err.message


def test_a_policy_that_appraises_no_measured_boot_is_accepted_but_said_weak() -> None:
    """Secure Boot state alone (PCR 7, a habit from disk encryption) admits any kernel the
    db keys signed; zeros pinned on PCRs 0-7, or a set allowing no event there, admit only
    a boot the firmware never measured. A TPM emulator without firmware has exactly that
    (the local pool), so such a policy is accepted, and each weakness said. Found by a
    review: nothing said it."""
    assert policy_weaknesses(parse_policy("p", _sample())) == []
    only7 = _sample()
    only7["pcrSelection"]["pcrs"] = [7]
    only7["memberClasses"] = [{"name": "sb", "goldenPCRs": {"7": "ab" * 32}}]
    only7["defaultMemberClass"] = "sb"
    [said] = policy_weaknesses(parse_policy("p", only7))
    assert "leaves out boot-chain PCR(s) 0: the firmware; 2:" in said
    assert "4: the boot loader and what it loads" in said
    zeros = _sample()
    zeros["memberClasses"] = [
        {"name": "bare", "goldenPCRs": {str(p): "00" * 32 for p in range(8)}},
        {"name": "nolog", "referenceSets": [
            {"name": "empty", "pcrs": [{"pcr": p, "events": []} for p in range(8)]}]},
    ]  # fmt: skip
    zeros["defaultMemberClass"] = "bare"
    said_all = policy_weaknesses(parse_policy("p", zeros))
    assert any("member class bare pins PCR(s) 0, 1, 2, 3, 4, 5, 6, 7 to their reset" in w
               for w in said_all)  # fmt: skip
    assert any("reference set empty, allows no event on PCR(s) 0, 1" in w for w in said_all)


def test_a_ca_bundle_is_read_in_one_pass_and_refused_past_the_crds_length() -> None:
    """A review posted straight to the webhook is not bound by the CRD's maxLength, and
    each PEM block's line number was counted from the start of the text: a megabyte of
    empty blocks cost seconds of the operator's CPU per review (found by a review). Past
    the CRD's length the bundle is refused before it is read; line numbers still say where
    a bad block is."""
    spec = _sample()
    spec["ekTrust"]["caBundle"] = "-----BEGIN A-----\n-----END A-----\n" * 40_000
    err = _refused(spec)
    assert (err.field, err.message) == (
        "spec.ekTrust.caBundle",
        "is 1360000 characters long, more than 262144",
    )
    good = _sample()["ekTrust"]["caBundle"]
    spec["ekTrust"]["caBundle"] = good + "\n\n-----BEGIN CERTIFICATE-----\nnot base64!\n"
    spec["ekTrust"]["caBundle"] += "-----END CERTIFICATE-----\n"
    err = _refused(spec)
    lines = good.count("\n") + 3
    assert f"(line {lines}) is not valid base64" in err.message


def test_revoked_eks_are_fingerprints() -> None:
    spec = _sample()
    spec["ekTrust"]["revokedEKs"] = ["ab" * 32, "ab" * 32, "cd" * 32]
    assert parse_policy("p", spec).revoked_eks == {"ab" * 32, "cd" * 32}
    spec["ekTrust"]["revokedEKs"] = ["AB" * 32]
    err = _refused(spec)
    assert err.field == "spec.ekTrust.revokedEKs[0]"
    assert "is not an EK fingerprint: 64 lowercase hex digits" in err.message


def test_a_class_verifying_every_quoted_pcr_is_accepted() -> None:
    spec = _sample()
    spec["memberClasses"] += [
        {"name": "golden", "goldenPCRs": {str(p): "00" * 32 for p in range(8)}},
        {"name": "sets", "referenceSets": [_set_on(*range(8), name="a"), _set_on(*range(8))]},
        {
            "name": "both",
            "goldenPCRs": {str(p): "00" * 32 for p in (1, 3, 5, 6)},
            "referenceSets": [_set_on(0, 2, 4, 7)],
        },
    ]
    names = set(parse_policy("p", spec).member_classes)
    assert names == {"uefi-secureboot", "golden", "sets", "both"}


def test_a_member_class_that_cannot_be_resolved_has_no_class() -> None:
    # a typo in Member.spec.memberClass: no golden values and no log requirement at all
    # would verify anything, so it resolves to no class (the member is refused a verdict)
    policy = parse_policy("p", _sample())
    mp = member_policy(policy, identity=3, member_class="typo", labels={})
    assert mp.member_class is None
    assert mp.class_name == "typo"
    # no memberClass and no defaultMemberClass (optional in the CRD)
    spec = _sample()
    del spec["defaultMemberClass"]
    mp = member_policy(parse_policy("p", spec), identity=3, member_class=None, labels={})
    assert mp.member_class is None
    assert mp.class_name is None
    # the default still resolves
    mp = member_policy(policy, identity=3, member_class=None, labels={})
    assert mp.member_class is not None
    assert mp.member_class.name == "uefi-secureboot"


KUBELET_SETTABLE = [
    "gtvp.io/hardware",
    "kubernetes.io/hostname",
    "node.kubernetes.io/instance-type",
    "topology.kubernetes.io/zone",
    "confidential",
]


@pytest.mark.parametrize("key", KUBELET_SETTABLE)
def test_transition_on_a_label_a_kubelet_can_set_is_refused(key: str) -> None:
    spec = _sample()
    spec["transitions"] = [{"matchLabels": {key: "x"}, "level": 3}]
    err = _refused(spec)
    assert err.field == f"spec.transitions[0].matchLabels[{key}]"
    assert f"label {key!r} is not under node-restriction.kubernetes.io/" in err.message
    assert "a node's kubelet may set it on itself" in err.message
    assert "raise its own level" in err.message


@pytest.mark.parametrize(
    "key",
    ["node-restriction.kubernetes.io/gtvp-trusted", "node-restriction.kubernetes.io/gtvp-level-3"],
)
def test_transition_on_gtvps_own_trust_labels_is_refused(key: str) -> None:
    spec = _sample()
    spec["transitions"] = [{"matchLabels": {key: "true"}, "level": 3}]
    err = _refused(spec)
    assert err.field == f"spec.transitions[0].matchLabels[{key}]"
    assert "gtvp writes it from the member's verdict" in err.message


def test_transitions_on_node_restriction_labels_are_accepted() -> None:
    spec = _sample()
    spec["transitions"] = [
        {"matchLabels": {"node-restriction.kubernetes.io/hardware": "confidential"}, "level": 3},
        {"matchLabels": {}, "level": 2},
    ]
    policy = parse_policy("p", spec)
    assert policy.transitions[0].match_labels == {
        "node-restriction.kubernetes.io/hardware": "confidential"
    }


BAD_DURATIONS: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("spec.balancing.sustainFor", lambda s: s["balancing"].update(sustainFor="soon")),
    ("spec.balancing.cooldown", lambda s: s["balancing"].update(cooldown="0")),
]


@pytest.mark.parametrize(("field", "change"), BAD_DURATIONS, ids=[b[0] for b in BAD_DURATIONS])
def test_balancing_durations_name_their_field(
    field: str, change: Callable[[dict[str, Any]], None]
) -> None:
    spec = _sample()
    change(spec)
    assert _refused(spec).field == field


@pytest.mark.parametrize(
    ("looser", "field", "said"),
    [
        (
            {"validFor": "72h"},
            "validFor",
            "validFor 72h is looser than level 2 (sensitive)'s 1m30s",
        ),
        ({"interval": "60s"}, "interval", "interval 1m is looser than level 2 (sensitive)'s 30s"),
        (
            {"maxUses": 1000000},
            "maxUses",
            "maxUses 1000000 is looser than level 2 (sensitive)'s 20",
        ),
    ],
)
def test_a_higher_level_may_not_demand_less_than_the_one_below(
    looser: dict[str, Any], field: str, said: str
) -> None:
    """A level-3 member's verdict backs level-1 and level-2 VMs too: with a 72 h validFor at
    level 3, a level-1 VM (10 s in its own level) would be placed on a 3-day-old verdict."""
    spec = _sample()
    top = spec["levels"][2]
    assert top["level"] == 3
    top["attestation"] = {**top["attestation"], **looser}
    if field == "interval":
        top["attestation"]["validFor"] = "90s"
    err = _refused(spec)
    assert err.field == f"spec.levels[2].attestation.{field}"
    assert err.message.startswith(said)


def test_a_higher_level_may_not_readmit_without_a_person_when_a_lower_one_does_not() -> None:
    spec = _sample()
    spec["levels"][0]["autoRecover"] = False
    err = _refused(spec)
    assert err.field == "spec.levels[1].autoRecover"
    assert "level 1 (standard) below it says false" in err.message
    for lv in spec["levels"]:
        lv["autoRecover"] = False
    assert not any(lv.auto_recover for lv in parse_policy("p", spec).levels)


def test_levels_listed_out_of_order_are_named_by_their_place_in_the_list() -> None:
    spec = _sample()
    spec["levels"].reverse()  # restricted (3) first
    spec["levels"][0]["attestation"]["maxUses"] = 50
    err = _refused(spec)
    assert err.field == "spec.levels[0].attestation.maxUses"


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"level": 2}, "level 2 is defined twice"),
        ({"level": 10}, "10 is not a level from 1 to 9"),
        ({"attestation": {"interval": "1s", "validFor": "2s", "maxUses": 0}}, "must be at least 1"),
    ],
)
def test_level_numbers_and_uses_the_crd_bounds_are_checked_again(
    change: dict[str, Any], said: str
) -> None:
    """The CRD refuses these; the operator does not rely on it (a policy read from another
    source, or a CRD an administrator edited)."""
    spec = _sample()
    spec["levels"][2].update(change)
    assert said in _refused(spec).message


def test_a_sha1_bank_needs_an_explicit_allowance() -> None:
    """SHA-1 collisions are practical: a colliding twin of a measured binary extends the
    same value. The policy says so, or quotes a stronger bank."""
    spec = _sample()
    spec["pcrSelection"]["hashAlgorithm"] = "sha1"
    cls = spec["defaultMemberClass"]
    spec["memberClasses"] = [
        {"name": cls, "goldenPCRs": {str(p): "00" * 20 for p in spec["pcrSelection"]["pcrs"]}}
    ]
    spec.pop("transitions", None)
    err = _refused(spec)
    assert err.field == "spec.pcrSelection.hashAlgorithm"
    assert err.message.startswith("sha1: collisions are practical")
    spec["pcrSelection"]["allowSha1"] = True
    assert parse_policy("p", spec).pcr_bank == "sha1"
