"""A Node that reports another boot (kubelet's `status.nodeInfo.bootID`), judged by the
operator's own attestation step over a software TPM: the verdict stops backing new
placements at once and a fresh quote is asked for; the TPM's counters decide the rest.
What the node says of itself only ever takes trust away, and only for one quote."""

from __future__ import annotations

import datetime as dt
import struct
from typing import cast

import pytest

from gtvp.core.policy import Policy, parse_policy
from gtvp.core.timestamps import parse_ts
from gtvp.core.trust import boot_unquoted
from gtvp_local.pool import pool_policy
from gtvp_local.swtpm import SwtpmCA
from tests.softmember import AgentMember, Bundle
from tests.softtpm import PCR_COUNT, TPM_RH_ENDORSEMENT, SoftCA, SoftTpm, _name, _qualified

T0 = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
SECOND = dt.timedelta(seconds=1)
LATER = T0 + 10 * SECOND  # a while after the verdict at T0, before its next quote is due


def _policy(ca: SoftCA, *, auto_recover: bool) -> Policy:
    spec = pool_policy(
        cast(SwtpmCA, Bundle(ca.bundle_pem())), name="default", interval="60s", valid_for="180s"
    )["spec"]
    for level in spec["levels"]:
        level["autoRecover"] = auto_recover
    return parse_policy("default", spec)


def _trusted(*, auto_recover: bool = True) -> tuple[SoftTpm, AgentMember]:
    """A member over a software TPM, Trusted, whose Node reports boot b1."""
    ca = SoftCA()
    tpm = SoftTpm(ca)
    m = AgentMember(tpm, _policy(ca, auto_recover=auto_recover))
    m.boot_id = "b1"
    m.enrol(T0)
    m.operator(T0)
    assert m.phase == "Trusted"
    assert m.status["trust"]["nodeBootID"] == "b1"
    return tpm, m


def _due(m: AgentMember) -> dt.datetime:
    due = parse_ts(m.status["challenge"]["answerAfter"])
    assert due is not None
    return due


def _reboot(tpm: SoftTpm) -> None:
    """A TPM Reset: PCRs cleared and the (good) boot measured again, resetCount + 1."""
    tpm.pcrs = {"sha256": [bytes(32)] * PCR_COUNT}
    tpm._clock.reset_count += 1


def test_a_node_reporting_another_boot_is_not_placed_on_until_a_fresh_quote() -> None:
    tpm, m = _trusted()
    uses = m.status["trust"]["usesLeft"]
    assert uses > 0
    _reboot(tpm)
    m.boot_id = "b2"  # kubelet registers again after the reboot
    step = m.operator(LATER)
    trust = m.status["trust"]
    assert m.phase == "Trusted"  # running VMs stay: the node's word alone moves nothing
    assert trust["usesLeft"] == 0  # but no new placement or migration rests on it
    assert "another boot" in trust["message"]
    assert [e.reason for e in step.events] == ["NodeRebooted"]
    assert m.status["challenge"]["nonce"]  # a fresh quote, asked for now
    step = m.cycle(LATER + SECOND)
    assert (m.phase, m.reason) == ("Untrusted", "Rebooted")  # what the TPM says
    step = m.cycle(LATER + 2 * SECOND)
    assert (m.phase, m.status["trust"]["usesLeft"]) == ("Trusted", uses)
    assert m.status["trust"]["nodeBootID"] == "b2"
    assert m.operator(LATER + 3 * SECOND).events == ()  # said once


def test_a_verdict_stays_unquoted_for_its_boot_until_a_quote_of_that_boot() -> None:
    """Key release (no placement, so no use spent) asks `boot_unquoted`: the verdict still
    standing after the Node reported another boot rests on a quote of the old one; a quote
    of the new boot ends that."""
    tpm, m = _trusted()
    assert not boot_unquoted(m.status, "b1")
    assert boot_unquoted(m.status, "b2")  # the Node says so before the operator looks
    _reboot(tpm)
    m.boot_id = "b2"
    m.operator(LATER)
    assert m.phase == "Trusted"
    assert m.status["trust"]["bootUnquoted"] is True
    assert boot_unquoted(m.status, "b2")  # the operator looked: still the old boot's quote
    assert boot_unquoted(m.status, None)  # whatever the view of the Node says now
    m.cycle(LATER + SECOND)  # Rebooted
    m.cycle(LATER + 2 * SECOND)
    assert m.phase == "Trusted"
    assert "bootUnquoted" not in m.status["trust"]
    assert not boot_unquoted(m.status, "b2")


def test_writing_the_old_bootid_back_does_not_make_the_verdict_good_again() -> None:
    """Root on the host, with its kubelet's credentials, writes the old bootID back once the
    operator saw the new one: the verdict still rests on a quote of the old boot (found by
    a review of the first version, which compared the boots only)."""
    _tpm, m = _trusted()
    m.boot_id = "b2"
    m.operator(LATER)
    m.boot_id = "b1"
    m.operator(LATER + SECOND)
    assert m.status["trust"]["nodeBootID"] == "b1"
    assert boot_unquoted(m.status, "b1")


def test_a_quote_asked_before_the_new_boot_was_seen_makes_no_verdict() -> None:
    """The nonce was out when the host rebooted; the old boot's quote of it, handed in after
    the Node reported its new boot, is not judged (it would be a verdict on a boot that is
    gone)."""
    tpm, m = _trusted()
    due = _due(m)
    m.operator(due)
    asked = m.status["challenge"]["nonce"]
    m.agent_step()  # quoted in the old boot
    _reboot(tpm)
    m.boot_id = "b2"
    step = m.operator(due + SECOND)
    assert step.answered_nonce is None
    assert m.status["challenge"]["nonce"] != asked
    assert m.status["trust"]["usesLeft"] == 0


@pytest.mark.parametrize("auto_recover", [True, False])
def test_another_boot_the_tpm_does_not_show_costs_one_quote(auto_recover: bool) -> None:
    """Something wrote the Node's bootID, the host did not reboot: one fresh quote, and the
    member is Trusted with its uses again, without a readmission on a strict level."""
    _tpm, m = _trusted(auto_recover=auto_recover)
    m.boot_id = "forged"
    m.operator(LATER)
    assert m.status["trust"]["usesLeft"] == 0
    step = m.cycle(LATER + SECOND)
    assert (m.phase, step.outcome) == ("Trusted", "Verified")
    assert m.status["trust"]["usesLeft"] > 0
    assert not m.status["trust"].get("awaitingReadmission")


def test_a_strict_level_holds_a_host_that_rebooted_for_readmission() -> None:
    tpm, m = _trusted(auto_recover=False)
    _reboot(tpm)
    m.boot_id = "b2"
    m.operator(LATER)
    m.cycle(LATER + SECOND)
    m.cycle(LATER + 2 * SECOND)
    assert (m.phase, m.reason) == ("Untrusted", "AwaitingReadmission")


def test_a_boot_first_seen_or_not_reported_changes_nothing() -> None:
    _tpm, m = _trusted()
    del m.status["trust"]["nodeBootID"]  # a status an older gtvp wrote
    m.boot_id = "b9"
    step = m.operator(T0 + SECOND)
    assert step.events == ()
    assert m.status["trust"]["usesLeft"] > 0
    assert m.status["trust"]["nodeBootID"] == "b9"
    assert "nonce" not in m.status["challenge"]  # nothing asked before it is due
    m.boot_id = None  # the Node is gone from the view, or reports no boot
    m.operator(T0 + 2 * SECOND)
    assert (m.phase, m.status["trust"]["nodeBootID"]) == ("Trusted", "b9")
    assert m.status["trust"]["usesLeft"] > 0


def _bad_answer(m: AgentMember) -> None:
    """Evidence for the outstanding nonce that fails (a judgement all the same)."""
    nonce = m.status["challenge"]["nonce"]
    m.status.setdefault("agent", {})["evidence"] = {
        "nonce": nonce, "attest": "AAAA", "signature": "AAAA", "pcrBank": "sha256",
        "pcrValues": {},
    }  # fmt: skip


def test_rewriting_the_bootid_without_pause_gets_no_judgement_per_write() -> None:
    """Root on the host, with its kubelet's token, rewrites its own Node's bootID again and
    again, answering each fresh nonce with a large quote: one judgement per
    RETRY_AFTER_FAILURE at most, as after any failure."""
    _tpm, m = _trusted()
    t = _due(m)
    m.operator(t)
    judged = 0
    for i in range(20):  # 2 s of writes
        t += 0.1 * SECOND
        m.boot_id = f"flip-{i}"
        m.operator(t)
        if m.status["challenge"].get("nonce"):
            _bad_answer(m)
            judged += m.operator(t).outcome is not None
    assert judged == 1


def test_a_bootid_rewritten_just_before_expiry_does_not_escape_readmission() -> None:
    """On a level without autoRecover, a host asked for a quote and silent until its verdict
    expires is held; replacing the nonce by rewriting its Node's bootID just before the
    expiry does not make the expiry the operator's doing."""
    _tpm, m = _trusted(auto_recover=False)
    expires = parse_ts(m.status["trust"]["expiresAt"])
    assert expires is not None
    m.operator(_due(m))  # asked: the nonce published when due, never answered
    m.boot_id = "forged"
    m.operator(expires - 2 * SECOND)
    m.operator(expires)
    assert (m.phase, m.reason) == ("Untrusted", "VerdictExpired")
    assert m.status["trust"]["awaitingReadmission"] is True
    assert "did not answer the nonce" in m.status["trust"]["message"]


def test_a_member_whose_class_is_gone_is_not_looked_at_in_a_tight_loop() -> None:
    _tpm, m = _trusted()
    due = _due(m)
    m.spec["memberClass"] = "no-such-class"
    for k in range(3):
        step = m.operator(due + k * SECOND)
        assert m.reason == "UnknownMemberClass"
        assert step.recheck_after >= dt.timedelta(seconds=1)


def test_rewriting_the_bootid_of_a_trusted_member_gets_no_judgement_per_write() -> None:
    """The same, answering each fresh nonce with a good quote: the member is Trusted again
    after each, and each rewrite spends it; still one judgement per RETRY_AFTER_FAILURE."""
    _tpm, m = _trusted()
    t = _due(m)
    judged = 0
    for i in range(20):
        t += 0.1 * SECOND
        m.boot_id = f"flip-{i}"
        m.operator(t)
        if m.status["challenge"].get("nonce"):
            m.agent_step()
            judged += m.operator(t).answered_nonce is not None
    assert judged == 1


def _new_ak(m: AgentMember, tpm: SoftTpm) -> None:
    """The agent makes and publishes another AK (its TPM made a new key)."""
    fresh = SoftTpm(None)
    tpm._ak, tpm.ak_public, tpm.ak_name = fresh._ak, fresh.ak_public, fresh.ak_name
    ek_qn = _qualified(struct.pack(">I", TPM_RH_ENDORSEMENT), _name(tpm.ek_public))
    tpm.qualified_signer = _qualified(ek_qn, tpm.ak_name)
    m.agent._enrolment = None


def test_binding_ak_after_ak_gets_no_judgement_per_ak() -> None:
    """An agent that publishes a new AK after each quote (credential activation, bound,
    quoted, again) gets no quote judged faster than a failure's retry."""
    tpm, m = _trusted()
    t = _due(m)
    judged = 0
    for _ in range(10):
        t += 0.1 * SECOND
        _new_ak(m, tpm)
        for _step in range(3):  # publish the AK, activate its credential, quote
            m.agent_step()
            judged += m.operator(t).answered_nonce is not None
    assert judged <= 1


def test_a_policy_edit_to_a_longer_interval_does_not_hold_back_a_quote_a_verdict_needs() -> None:
    """Trusted under interval 2 s / validFor 6 s, the policy goes to 60 s / 180 s: the quote
    due under the old schedule is asked for when due (the floor against asking again
    without pause would put it past the standing verdict's expiry, less the time an agent
    is given to answer), and the verdict is renewed without expiring."""
    ca = SoftCA()
    short = parse_policy(
        "default",
        pool_policy(cast(SwtpmCA, Bundle(ca.bundle_pem())), interval="2s", valid_for="6s")["spec"],
    )
    m = AgentMember(SoftTpm(ca), short)
    m.enrol(T0)
    assert m.phase == "Trusted"
    m.policy = _policy(ca, auto_recover=True)  # 60 s / 180 s
    due = _due(m)
    m.operator(due)
    assert m.status["challenge"].get("nonce")  # asked now, not at verifiedAt + 5 s
    step = m.cycle(due + SECOND)
    assert (m.phase, step.outcome) == ("Trusted", "Verified")


def test_a_node_made_again_under_the_members_name_spends_the_verdict_until_a_quote() -> None:
    """The member's Node object is deleted and another registers under its name (same
    bootID, or none): the verdict was judged beside the old object; nothing new rests on
    it until a quote verifies, said as another Node object."""
    _tpm, m = _trusted()
    m.boot_id = "b1@uid-1"
    m.operator(LATER)
    assert m.status["trust"]["usesLeft"] > 0  # the uid added to an older record: same boot
    m.boot_id = "b1@uid-2"
    step = m.operator(LATER + SECOND)
    trust = m.status["trust"]
    assert trust["usesLeft"] == 0
    assert "another Node object under its name (uid uid-1 -> uid-2)" in trust["message"]
    assert [e.reason for e in step.events] == ["NodeRebooted"]
