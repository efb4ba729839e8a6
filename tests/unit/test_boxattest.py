"""The pure core of box attestation (gtvp.core.boxattest): policy settings, the PCR 13 fold,
the guest's configuration line, requests, nonces and the order of the quote checks. The
checks against a real vTPM are in tests/integration/test_box_attestation.py."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from typing import Any

import pytest

from gtvp.core import boxattest as ba
from gtvp.core.components import parse_component
from gtvp.core.compose import kernel_args, overlay_order
from gtvp.core.resolve import BoxRequest, resolve
from gtvp.core.timestamps import format_ts
from tests.catalogue import Publisher
from tests.softtpm import SoftCA

NOW = dt.datetime(2026, 12, 2, 4, 0, tzinfo=dt.UTC)
WHERE = ba.Where("member-a", "uid-1")
CREDENTIAL = "c" * 43


def _settings(**raw: Any) -> ba.Settings | None:
    return ba.parse_settings({"boxAttestation": raw})


def _reason(fn: Any) -> str:
    with pytest.raises(ba.Refused) as err:
        fn()
    return err.value.reason


# ----- the policy ---------------------------------------------------------------------------


def test_settings_default_to_pcr_13_and_refuse_what_cannot_be_used() -> None:
    pem = SoftCA().bundle_pem()
    assert ba.parse_settings({}) is None
    assert _settings(caBundle=pem) == ba.Settings(pem, 13)
    assert _settings(caBundle=pem, pcr=13) == ba.Settings(pem, 13)
    for raw, where, words in (
        ({"pcr": 13}, "spec.boxAttestation.caBundle", "holds no PEM certificate"),
        ({"caBundle": "not a certificate"}, "spec.boxAttestation.caBundle", "vTPM"),
        (
            {"caBundle": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"},
            "spec.boxAttestation.caBundle",
            "cannot be read",
        ),
        ({"caBundle": pem, "pcr": 24}, "spec.boxAttestation.pcr", "0..23"),
        ({"caBundle": pem, "pcr": "13"}, "spec.boxAttestation.pcr", "0..23"),
        # software in the guest resets these and replays the expected fold
        ({"caBundle": pem, "pcr": 16}, "spec.boxAttestation.pcr", "can be reset by any software"),
        ({"caBundle": pem, "pcr": 23}, "spec.boxAttestation.pcr", "can be reset by any software"),
        # the box init measures into 13 only: any other would mismatch every box
        ({"caBundle": pem, "pcr": 14}, "spec.boxAttestation.pcr", "measures every component"),
    ):
        with pytest.raises(ba.SettingsError) as err:
            _settings(**raw)
        assert err.value.field == where
        assert words in err.value.message
    with pytest.raises(ba.SettingsError):
        ba.parse_settings({"boxAttestation": "yes"})


# ----- measurements -------------------------------------------------------------------------


def test_the_expected_pcr_folds_the_composed_disks_in_mount_order() -> None:
    pub = Publisher()
    cat = [parse_component(o) for o in pub.web_catalogue()]
    spec = {"application": {"name": "nginx"}, "dependencies": [{"name": "debian-minimal"}]}
    comps = resolve(BoxRequest.from_spec({**spec, "level": 2}), cat)
    disks = ba.disks_of(kernel_args("web", comps))
    order = overlay_order(comps)
    assert [d.serial for d in disks] == [c.name[:20] for c in order]
    pins = [bytes.fromhex(c.pin.removeprefix("sha256:")) for c in order]
    value = b"\0" * 32
    for p in pins:
        value = hashlib.sha256(value + p).digest()
    assert ba.expected_pcr(disks) == value == ba.fold(pins)
    assert ba.expected_pcr(tuple(reversed(disks))) != value  # the order matters
    resolved = [{"name": c.name, "version": str(c.version)} for c in comps]
    names = ba.component_names(disks, resolved)
    assert names == [f"{c.name}@{c.version}" for c in order]
    assert ba.disks_of("console=ttyS0 root=/dev/vda") == ()
    with pytest.raises(ValueError, match="not <serial>:<sha256 hex>"):
        ba.disks_of("gtvp.disks=rootfs:abc")


# ----- the guest's configuration ------------------------------------------------------------


def test_the_attest_line_carries_the_protocols_json_and_only_its_hash_is_kept() -> None:
    line = ba.attest_line(
        url="https://gtvp:9443/",
        namespace="ns",
        box="web",
        credential=CREDENTIAL,
        ca_pem="PEM",
        pcr=13,
    )
    assert line.startswith("#gtvp-attest ")
    doc = json.loads(base64.b64decode(line.split(" ", 1)[1]))
    assert doc == {
        "v": 1,
        "url": "https://gtvp:9443",
        "box": "ns/web",
        "credential": CREDENTIAL,
        "caPem": "PEM",
        "pcr": 13,
    }
    user_data = ba.with_attest_line("#cloud-config\nruncmd: []\n#gtvp-attest old\n", line)
    assert user_data == f"#cloud-config\nruncmd: []\n{line}\n"
    assert ba.credential_of(user_data) == CREDENTIAL
    assert ba.credential_of("#cloud-config\n") is None
    fresh = ba.fresh_attestation(CREDENTIAL)
    assert fresh["credentialHash"] == hashlib.sha256(CREDENTIAL.encode()).hexdigest()
    assert CREDENTIAL not in json.dumps(fresh)


# ----- requests -----------------------------------------------------------------------------


def test_requests_are_refused_with_a_clear_reason() -> None:
    auth = f"Bearer {CREDENTIAL}"
    body = json.dumps({"box": "ns/web"}).encode()
    req = ba.parse_request(ba.CHALLENGE, auth, body)
    assert (req.namespace, req.box, req.credential) == ("ns", "web", CREDENTIAL)
    for path, header, raw, reason, words in (
        (ba.CHALLENGE, None, body, ba.WRONG_CREDENTIAL, "Authorization: Bearer"),
        (ba.CHALLENGE, "Basic abc", body, ba.WRONG_CREDENTIAL, "Bearer"),
        (ba.CHALLENGE, "Bearer short", body, ba.WRONG_CREDENTIAL, "Bearer"),
        (ba.CHALLENGE, auth, b"{", ba.BAD_REQUEST, "not JSON"),
        (ba.CHALLENGE, auth, b"[]", ba.BAD_REQUEST, "not a JSON object"),
        (ba.CHALLENGE, auth, b"[" * 5000, ba.BAD_REQUEST, "nested too deep"),
        (ba.CHALLENGE, auth, b'{"box": "web"}', ba.BAD_REQUEST, "<namespace>/<name>"),
        ("/boxattest/v1/other", auth, body, ba.BAD_REQUEST, "no such endpoint"),
    ):
        with pytest.raises(ba.Refused) as err:
            ba.parse_request(path, header, raw)
        assert err.value.reason == reason
        assert words in err.value.message
    assert ba.Refused(ba.WRONG_CREDENTIAL, "").status == 401
    assert ba.Refused(ba.BAD_REQUEST, "").status == 400
    assert ba.Refused(ba.NONCE_REPLAYED, "").status == 409
    assert ba.Refused(ba.EK_NOT_TRUSTED, "").status == 403
    att = ba.fresh_attestation(CREDENTIAL)
    ba.check_credential(CREDENTIAL, att)
    assert _reason(lambda: ba.check_credential("d" * 43, att)) == ba.WRONG_CREDENTIAL
    assert _reason(lambda: ba.check_credential(CREDENTIAL, {})) == ba.WRONG_CREDENTIAL


# ----- challenges ---------------------------------------------------------------------------


def test_a_quote_is_wanted_when_never_attested_moved_or_restarted() -> None:
    done = {"state": ba.VERIFIED, "member": WHERE.member, "vmiUID": WHERE.vmi_uid}
    assert ba.wants_quote({}, WHERE)
    assert ba.wants_quote({"state": ba.PENDING}, WHERE)
    assert not ba.wants_quote(done, WHERE)
    assert not ba.wants_quote({**done, "state": ba.MISMATCH}, WHERE)
    assert ba.wants_quote(done, ba.Where("member-b", WHERE.vmi_uid))  # migrated
    assert ba.wants_quote(done, ba.Where(WHERE.member, "uid-2"))  # restarted


def test_a_pending_nonce_is_reused_only_while_fresh_and_for_this_vmi_here() -> None:
    att = ba.with_nonce({}, b"\1" * 32, WHERE, NOW)
    assert ba.pending_nonce(att, WHERE, NOW + dt.timedelta(seconds=60)) == "01" * 32
    assert ba.pending_nonce(att, WHERE, NOW + ba.NONCE_TTL) is None
    assert ba.pending_nonce(att, ba.Where("member-b", WHERE.vmi_uid), NOW) is None
    assert ba.pending_nonce(att, ba.Where(WHERE.member, "uid-2"), NOW) is None


# ----- quotes -------------------------------------------------------------------------------


def _quote_body(answers: bytes, **changes: Any) -> dict[str, Any]:
    body = {
        "nonce": answers.hex(),
        "quote": base64.b64encode(b"\xff\x54\x43\x47" + b"\0" * 60).decode(),
        "signature": base64.b64encode(b"\0" * 8).decode(),
        "pcrs": {"13": "00" * 32},
        "measurements": [],
    }
    body.update(changes)
    return body


def test_the_quote_checks_come_in_order_and_refuse_before_anything_is_recorded() -> None:
    settings = ba.Settings("unused", 13)
    nonce = b"\7" * 32
    bound = {**ba.fresh_attestation(CREDENTIAL), "bound": True, "akPublic": "AAAA"}
    pending = ba.with_nonce(bound, nonce, WHERE, NOW)

    def check(att: dict[str, Any], body: dict[str, Any], now: dt.datetime = NOW) -> str:
        return _reason(
            lambda: ba.check_quote(
                att, body, settings=settings, disks=(), components=(), where=WHERE, now=now
            )
        )

    assert check(pending, _quote_body(nonce, nonce="zz")) == ba.BAD_REQUEST
    assert check(pending, _quote_body(nonce, pcrs={"13": "00" * 32, "7": "00" * 32})) == (
        ba.BAD_REQUEST
    )
    assert check(pending, _quote_body(nonce, measurements="sha256:00")) == ba.BAD_REQUEST
    assert check({**pending, "bound": False}, _quote_body(nonce)) == ba.AK_NOT_BOUND
    assert check(pending, _quote_body(b"\x08" * 32)) == ba.NONCE_UNKNOWN
    answered = {**pending, "answered": [nonce.hex()]}
    assert check(answered, _quote_body(nonce)) == ba.NONCE_REPLAYED
    assert check(pending, _quote_body(nonce), NOW + ba.NONCE_TTL) == ba.NONCE_EXPIRED
    # a nonce issued before the box moved: a quote taken on the source must not count as
    # the attestation after the move (the guest asks again)
    moved = ba.Where("another-member", WHERE.vmi_uid)
    assert (
        _reason(
            lambda: ba.check_quote(
                pending, _quote_body(nonce), settings=settings, disks=(), components=(),
                where=moved, now=NOW,
            )
        )
        == ba.NONCE_UNKNOWN
    )  # fmt: skip
    # past the nonce: the AK must be one (here it is no TPM2B_PUBLIC at all)
    assert check(pending, _quote_body(nonce)) == ba.QUOTE_INVALID


def test_tpm2b_attest_bytes_lose_their_size_and_a_mismatch_acts_once_per_boot() -> None:
    tpms = b"\xff\x54\x43\x47" + b"\1" * 20
    assert ba.attest_bytes(tpms) == tpms
    assert ba.attest_bytes(len(tpms).to_bytes(2, "big") + tpms) == tpms
    assert ba.act_on_mismatch({}, WHERE)
    assert not ba.act_on_mismatch({"actedOn": WHERE.vmi_uid}, WHERE)
    assert ba.act_on_mismatch({"actedOn": WHERE.vmi_uid}, ba.Where("b", "uid-2"))


def test_a_bound_vtpm_is_pinned_for_the_life_of_its_vmi() -> None:
    bound = {"bound": True, "ekSHA256": "a" * 64, "boundVmiUID": WHERE.vmi_uid}
    ba.check_ek_pin(bound, "a" * 64, WHERE)  # the same EK enrols again
    assert _reason(lambda: ba.check_ek_pin(bound, "b" * 64, WHERE)) == ba.EK_CHANGED
    moved = ba.Where("member-b", WHERE.vmi_uid)  # a migration keeps the vTPM
    assert _reason(lambda: ba.check_ek_pin(bound, "b" * 64, moved)) == ba.EK_CHANGED
    ba.check_ek_pin(bound, "b" * 64, ba.Where(WHERE.member, "uid-2"))  # a restart
    ba.check_ek_pin({"bound": False}, "b" * 64, WHERE)


def test_an_attested_box_asks_kubevirt_for_a_persistent_vtpm() -> None:
    from gtvp.core.boxattest import with_vtpm

    vm = {"spec": {"template": {"spec": {"domain": {"devices": {"disks": []}}}}}}
    out = with_vtpm(vm)
    assert out["spec"]["template"]["spec"]["domain"]["devices"] == {
        "disks": [],
        "tpm": {"persistent": True},
    }
    assert "tpm" not in vm["spec"]["template"]["spec"]["domain"]["devices"]  # not modified


def test_a_box_without_a_verified_quote_where_it_runs_is_overdue_once_per_boot() -> None:
    deadline = dt.timedelta(minutes=10)
    att: dict[str, Any] = ba.fresh_attestation(CREDENTIAL)
    new, act = ba.overdue_step(att, WHERE, NOW, deadline)  # the clock starts
    assert new is not None
    assert not act
    since = NOW.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert new["wanted"] == {"member": WHERE.member, "vmiUID": WHERE.vmi_uid, "since": since}
    assert ba.overdue_step(new, WHERE, NOW + deadline / 2, deadline) == (None, False)
    late, act = ba.overdue_step(new, WHERE, NOW + deadline, deadline)
    assert late is not None
    assert act
    assert (late["state"], late["reason"], late["actedOn"]) == (
        ba.OVERDUE,
        ba.ATTESTATION_OVERDUE,
        WHERE.vmi_uid,
    )
    assert ba.overdue_step(late, WHERE, NOW + 2 * deadline, deadline) == (None, False)
    assert ba.must_leave(late, WHERE)  # the evacuation loop moves it off, until it left
    assert ba.wants_quote(late, WHERE)  # still asked: a late quote makes it Verified
    assert not ba.must_leave({**late, "state": ba.VERIFIED}, WHERE)  # ... and then it stays
    moved = ba.Where("another-member", WHERE.vmi_uid)
    again, act = ba.overdue_step(late, moved, NOW + 2 * deadline, deadline)
    assert again is not None
    assert not act
    assert again["wanted"]["member"] == "another-member"
    assert again["state"] == ba.PENDING  # the Overdue was the member it left
    there, act = ba.overdue_step(again, moved, NOW + 3 * deadline, deadline)
    assert there is not None
    assert there["state"] == ba.OVERDUE
    assert not act  # one boot, one action
    assert not ba.must_leave(there, moved)  # it left the member it failed on: stays here
    assert not ba.must_leave(late, ba.Where(WHERE.member, "uid-2"))  # a restart: a new boot
    verified = {**att, "state": ba.VERIFIED, "member": WHERE.member, "vmiUID": WHERE.vmi_uid}
    assert ba.overdue_step(verified, WHERE, NOW + 5 * deadline, deadline) == (None, False)


def test_the_deadline_is_the_policys_or_ten_minutes() -> None:
    pem = SoftCA().bundle_pem()
    assert _settings(caBundle=pem).deadline == dt.timedelta(minutes=10)
    got = ba.parse_settings({"boxAttestation": {"caBundle": pem, "deadline": "90s"}})
    assert got is not None
    assert got.deadline == dt.timedelta(seconds=90)
    with pytest.raises(ba.SettingsError, match=r"spec\.boxAttestation\.deadline"):
        ba.parse_settings({"boxAttestation": {"caBundle": pem, "deadline": "soon"}})


# ----- where the box runs: its status and its launcher pods -------------------------------


def test_a_status_naming_another_member_neither_ends_a_move_nor_restarts_the_clock() -> None:
    """Root on the box's host writes the VMI's status with the host's virt-handler token:
    it names another member while the box's launcher pod still holds it on the host."""
    deadline = dt.timedelta(minutes=10)
    att: dict[str, Any] = ba.fresh_attestation(CREDENTIAL)
    started, _ = ba.overdue_step(att, WHERE, NOW, deadline)
    assert started is not None
    elsewhere = ba.Where("member-b", WHERE.vmi_uid, frozenset({"member-a", "member-b"}))
    assert not elsewhere.settled
    # the clock does not start again on member-b: the box is overdue at the first deadline
    assert ba.overdue_step(started, elsewhere, NOW + deadline / 2, deadline) == (None, False)
    late, act = ba.overdue_step(started, elsewhere, NOW + deadline, deadline)
    assert late is not None
    assert act
    assert (late["state"], late["actedOnMember"]) == (ba.OVERDUE, WHERE.member)
    assert ba.must_leave(late, elsewhere)  # the move off member-a is still owed
    assert not ba.must_leave(late, ba.Where("member-b", WHERE.vmi_uid))  # it really left
    # and a move owed for a mismatch on member-a the same way
    mismatch = {"state": ba.MISMATCH, **ba.acted_on(WHERE, NOW)}
    assert ba.must_leave(mismatch, elsewhere)


def test_binding_a_new_ak_does_not_end_a_failed_result_of_this_boot() -> None:
    """Whoever holds the box's credential (the mismatched guest too) may enrol again: the
    Mismatch or Overdue that called for the level's onUntrusted stays."""
    secret = b"s" * 32  # what ActivateCredential gave back
    pending = {
        "id": "e1",
        "secretSHA256": hashlib.sha256(secret).hexdigest(),
        "akPublic": "QUs=",
        "ekSHA256": "a" * 64,
    }
    for state in (ba.MISMATCH, ba.OVERDUE):
        failed = {"state": state, "bound": True, "enrolment": pending, **ba.acted_on(WHERE, NOW)}
        out = ba.check_activation(failed, "e1", secret, WHERE)
        assert out["state"] == state
        assert out["bound"]
        assert ba.must_leave(out, WHERE)
    # a result of an earlier boot does not stay: the new VMI's first quote is wanted
    earlier = {"state": ba.MISMATCH, "enrolment": pending, **ba.acted_on(WHERE, NOW)}
    restarted = ba.Where(WHERE.member, "uid-2")
    assert ba.check_activation(earlier, "e1", secret, restarted)["state"] == ba.PENDING


def test_the_clock_starts_at_the_first_running_and_no_later_phase_stops_it() -> None:
    """Pulling images and starting the launcher do not count against the guest; once the
    VMI ran, a phase written back (by root on its host) does not pause the clock."""
    deadline = dt.timedelta(minutes=10)
    att: dict[str, Any] = ba.fresh_attestation(CREDENTIAL)
    noted, act = ba.overdue_step(att, WHERE, NOW, deadline, running=False)
    assert noted is not None
    assert not act
    assert "since" not in noted["wanted"]  # only when it was first seen there
    assert ba.overdue_step(noted, WHERE, NOW + deadline, deadline, running=False) == (None, False)
    started, _ = ba.overdue_step(att, WHERE, NOW, deadline, running=True)
    assert started is not None
    late, act = ba.overdue_step(started, WHERE, NOW + deadline, deadline, running=False)
    assert late is not None
    assert act
    assert late["state"] == ba.OVERDUE


def test_a_vmi_its_host_never_reports_running_still_goes_overdue() -> None:
    """Running is virt-handler's word, and root on the host holds its token: a VMI that
    runs but stays `Scheduled` for good does not keep the clock from starting; it starts
    START_ALLOWANCE after the VMI was first held there (found by a review)."""
    deadline = dt.timedelta(minutes=10)
    att, _ = ba.overdue_step(ba.fresh_attestation(CREDENTIAL), WHERE, NOW, deadline, running=False)
    assert att is not None
    limit = NOW + ba.START_ALLOWANCE + deadline
    assert ba.overdue_step(
        att, WHERE, limit - dt.timedelta(seconds=1), deadline, running=False
    ) == (
        None,
        False,
    )
    late, act = ba.overdue_step(att, WHERE, limit, deadline, running=False)
    assert late is not None
    assert act
    assert (late["state"], late["reason"]) == (ba.OVERDUE, ba.ATTESTATION_OVERDUE)
    assert "never reported Running" in late["message"]
    assert ba.overdue_step(late, WHERE, limit + deadline, deadline, running=False) == (None, False)
    # reported Running after a while: the clock runs from then, its first sight kept
    started, _ = ba.overdue_step(att, WHERE, NOW + dt.timedelta(minutes=3), deadline)
    assert started is not None
    assert (started["wanted"]["since"], started["wanted"]["seen"]) == (
        "2026-12-02T04:03:00Z",
        "2026-12-02T04:00:00Z",
    )


def test_running_reported_after_the_allowance_does_not_start_the_clock_anew() -> None:
    """A host that withholds Running until just before the box would go Overdue, then
    reports it, does not win a second deadline: the clock started when the allowance ran
    out (found by a review)."""
    deadline = dt.timedelta(minutes=10)
    att, _ = ba.overdue_step(ba.fresh_attestation(CREDENTIAL), WHERE, NOW, deadline, running=False)
    assert att is not None
    late = NOW + ba.START_ALLOWANCE + deadline - dt.timedelta(seconds=5)
    started, _ = ba.overdue_step(att, WHERE, late, deadline, running=True)
    assert started is not None
    assert started["wanted"]["since"] == "2026-12-02T04:10:00Z"
    overdue, act = ba.overdue_step(started, WHERE, late + dt.timedelta(seconds=5), deadline)
    assert overdue is not None
    assert act
    assert overdue["state"] == ba.OVERDUE


def test_a_box_restarted_onto_a_new_vtpm_is_told_to_enrol_it() -> None:
    """A restart (gtvp's upgrade, a restored composition, the tenant's) may bring a new vTPM
    whose AK the bound one is not: the guest is told to enrol for the new VMI, or every
    quote would be refused and the box go Overdue (and stopped, under Stop) for nothing
    (found by a review)."""
    bound = {"bound": True, "ekSHA256": "a" * 64, "boundVmiUID": WHERE.vmi_uid, "akPublic": "QUs="}
    assert not ba.must_enrol(bound, WHERE)
    assert ba.must_enrol(bound, ba.Where(WHERE.member, "uid-2"))
    assert ba.must_enrol({"bound": False}, WHERE)
    assert ba.must_enrol({"bound": False}, None)
    assert not ba.must_enrol(bound, None)  # mid-migration: asked again later


def test_a_second_ak_of_the_bound_ek_is_refused_and_the_same_one_undoes_nothing() -> None:
    """Whoever copied the vTPM's state (root on a host the box left) or holds the box's
    credential enrols another AK of the same EK within the VMI: refused (the guest's client
    makes the same AK every time). The guest's own AK bound again leaves a Verified as it
    is (found by a review)."""
    bound = {"bound": True, "ekSHA256": "a" * 64, "boundVmiUID": WHERE.vmi_uid, "akPublic": "QUs="}
    ba.check_ek_pin(bound, "a" * 64, WHERE, "QUs=")
    assert _reason(lambda: ba.check_ek_pin(bound, "a" * 64, WHERE, "T1RIRVI=")) == ba.AK_CHANGED
    ba.check_ek_pin(bound, "a" * 64, ba.Where(WHERE.member, "uid-2"), "T1RIRVI=")  # a restart
    secret = b"s" * 32
    pending = {"id": "e1", "secretSHA256": hashlib.sha256(secret).hexdigest(),
               "akPublic": "QUs=", "ekSHA256": "a" * 64}  # fmt: skip
    asked = {"value": "ab" * 32, "issuedAt": "2026-12-02T04:00:00Z"}
    verified = {**bound, "state": ba.VERIFIED, "member": WHERE.member, "vmiUID": WHERE.vmi_uid,
                "enrolment": pending, "nonce": asked}  # fmt: skip
    out = ba.check_activation(verified, "e1", secret, WHERE)
    assert (out["state"], out["member"], out["akPublic"]) == (ba.VERIFIED, WHERE.member, "QUs=")
    assert "enrolment" not in out
    assert out["nonce"] == asked  # the guest's quote in flight still answers it


def test_a_box_that_cannot_be_armed_does_not_drain_its_members_uses() -> None:
    """A box whose VM cannot be armed (its namespace does not let gtvp write its cloud-init
    Secret, the API server failing) is Failed and planned again every pass: the member's
    verdict use each plan counts is not spent for a VM never written (found by a review)."""
    from typing import cast

    from gtvp import kube
    from gtvp.core.boxes import Decision
    from gtvp.core.placement import Placement
    from gtvp.handlers import lazyboxes
    from gtvp.runtime import OperatorSettings, Runtime

    rt = Runtime(settings=OperatorSettings(), clients=cast(kube.Clients, None))
    rt.boxes.unspent["m1"] += 1  # what `_plan` counted for this placement
    decision = Decision({"phase": "Placing"}, vm={}, placement=Placement("m1", "best fit"))
    assert lazyboxes._not_placed(rt, decision) is decision
    assert rt.boxes.unspent["m1"] == 0
    lazyboxes._not_placed(rt, decision)  # never below what was counted
    assert rt.boxes.unspent["m1"] == 0


def test_an_ek_no_credential_can_be_made_for_is_a_bad_request() -> None:
    """The certified EK key with no symmetric algorithm passes the certificate check, but no
    credential can be made for it: a 400 naming the field, not a 503 to ask again for ever
    (found by a review)."""
    import struct

    from tests.softtpm import (
        EK_ATTRIBUTES,
        EK_AUTH_POLICY,
        TPM_ALG_ECC,
        TPM_ALG_NULL,
        TPM_ALG_SHA256,
        TPM_ECC_NIST_P256,
        SoftTpm,
        _point,
        _tpm2b,
    )  # fmt: skip

    ca = SoftCA()
    tpm = SoftTpm(ca)
    settings = ba.Settings(ca.bundle_pem(), 13)
    x, y = _point(tpm._ek.public_key())
    area = struct.pack(">HHI", TPM_ALG_ECC, TPM_ALG_SHA256, EK_ATTRIBUTES)
    area += _tpm2b(EK_AUTH_POLICY) + struct.pack(">H", TPM_ALG_NULL)  # no symmetric
    area += struct.pack(">HHH", TPM_ALG_NULL, TPM_ECC_NIST_P256, TPM_ALG_NULL)
    area += _tpm2b(x) + _tpm2b(y)
    body = {
        "ekCertificate": base64.b64encode(tpm.ek_certificate).decode(),
        "ekPublic": base64.b64encode(_tpm2b(area)).decode(),
        "akPublic": base64.b64encode(tpm.ak_public).decode(),
    }
    now = dt.datetime.now(dt.UTC)  # the software CA's certificates start an hour back
    checked = ba.check_enrolment(body, settings, now)
    with pytest.raises(ba.Refused) as refused:
        ba.activation_challenge(checked, b"s" * 32)
    assert (refused.value.reason, refused.value.status) == (ba.BAD_REQUEST, 400)
    assert "'ekPublic'" in str(refused.value)
    good = {**body, "ekPublic": base64.b64encode(tpm.ek_public).decode()}
    assert ba.activation_challenge(ba.check_enrolment(good, settings, now), b"s" * 32)


def test_a_box_verified_where_it_was_is_pending_once_it_runs_elsewhere() -> None:
    """After a migration (or a restart) the box's attestation no longer says Verified, as
    `kubectl get lazybox` shows it, until a quote where it runs now is verified."""
    done = {"state": ba.VERIFIED, "member": WHERE.member, "vmiUID": WHERE.vmi_uid}
    deadline = dt.timedelta(minutes=2)
    assert ba.overdue_step(done, WHERE, NOW, deadline) == (None, False)  # still there
    for where in (ba.Where("member-b", WHERE.vmi_uid), ba.Where(WHERE.member, "uid-2")):
        new, act = ba.overdue_step(done, where, NOW, deadline)
        assert new is not None
        assert (new["state"], act) == (ba.PENDING, False)
        assert (new["wanted"]["member"], new["wanted"]["vmiUID"]) == (where.member, where.vmi_uid)


def test_enrolments_per_vtpm_and_per_vmi_are_bounded_every_ten_seconds() -> None:
    """Each enrolment is a status write and a MakeCredential: whoever holds the box's
    credential (root in its guest, a reader of its cloud-init Secret) could otherwise have
    gtvp write the box without pause, alternating certified vTPMs of their own too (a
    second review). One enrolment per EK and VMI, and 3 per VMI, are answered in 10 s;
    another EK than the last one's is not held back by it alone (someone else's vTPM
    enrolling first must not keep the box's guest out: a review); a restarted box
    (another VMI) enrols at once. Found by reviews."""

    def enrolled(att: dict[str, Any], ek: str, at: dt.datetime, where: ba.Where = WHERE) -> None:
        ba.check_enrol_rate(att, where, ek, at)
        att["lastEnrolments"] = [
            *ba.recent_enrolments(att, at)[-(ba.ENROLS_PER_VMI - 1) :],
            {"at": format_ts(at), "vmiUID": where.vmi_uid, "ekSHA256": ek},
        ]

    def refused(att: dict[str, Any], ek: str, at: dt.datetime, where: ba.Where = WHERE) -> str:
        with pytest.raises(ba.Refused) as no:
            ba.check_enrol_rate(att, where, ek, at)
        assert (no.value.reason, no.value.status) == (ba.ENROL_TOO_SOON, 429)
        return no.value.message

    s = dt.timedelta(seconds=1)
    att: dict[str, Any] = {}
    enrolled(att, "a", NOW)
    assert "enrol again in 8s" in refused(att, "a", NOW + 3 * s)
    enrolled(att, "b", NOW + 1 * s)  # another EK: the box's own guest, say
    enrolled(att, "c", NOW + 2 * s)
    assert "3 enrolments for this VMI" in refused(att, "d", NOW + 3 * s)  # alternating EKs
    assert len(att["lastEnrolments"]) == 3
    enrolled(att, "d", NOW + 3 * s, ba.Where("member-a", "uid-2"))  # a restarted box
    enrolled(att, "a", NOW + ba.ENROL_EVERY + 2 * s)  # the window moved on
    # the wait told is the refused vTPM's own; an entry another replica stamped ahead of
    # this one's clock still counts (review findings)
    assert "enrol again in 10s" in refused(att, "a", NOW + ba.ENROL_EVERY + 2 * s + s / 2)
    ahead = {"lastEnrolments": [{"at": format_ts(NOW + 30 * s), "vmiUID": "uid-1",
                                 "ekSHA256": "a"}]}  # fmt: skip
    refused(ahead, "a", NOW)
