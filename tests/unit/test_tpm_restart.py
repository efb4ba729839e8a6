"""A TPM Restart (Shutdown(STATE) before a reboot) and a Resume from suspend, judged by the
operator's own attestation step over a software TPM: a quote made before one never makes a
verdict, and a resume alone asks no human to readmit the host."""

from __future__ import annotations

import datetime as dt
from typing import cast

import pytest

from gtvp.core.policy import Policy, parse_policy
from gtvp_local.pool import pool_policy
from gtvp_local.swtpm import SwtpmCA
from tests import softtpm
from tests.softmember import AgentMember, Bundle
from tests.softtpm import PCR_COUNT, SoftCA, SoftTpm

T0 = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
LATER = dt.timedelta(seconds=6)


def _policy(ca: SoftCA, *, auto_recover: bool) -> Policy:
    spec = pool_policy(cast(SwtpmCA, Bundle(ca.bundle_pem())), name="default")["spec"]
    for level in spec["levels"]:
        level["autoRecover"] = auto_recover
    return parse_policy("default", spec)


def _restart(tpm: SoftTpm, *, good: bool) -> None:
    """Shutdown(STATE), a reboot, the firmware's Startup(CLEAR): PCRs reset and the boot
    measured again, restartCount + 1, resetCount as it was."""
    tpm.pcrs = {"sha256": [bytes(32)] * PCR_COUNT}
    tpm._clock.restart_count += 1
    if not good:
        tpm.extend(7, b"a bootloader the policy does not accept")


def _trusted_member(*, auto_recover: bool) -> tuple[SoftTpm, AgentMember, dt.datetime]:
    """A member over a software TPM, enrolled and Trusted after one quote; the time then."""
    ca = SoftCA()
    tpm = SoftTpm(ca)
    m = AgentMember(tpm, _policy(ca, auto_recover=auto_recover))
    m.enrol(T0)
    t = T0 + LATER
    m.cycle(t)
    assert m.phase == "Trusted"
    return tpm, m, t


@pytest.mark.parametrize("auto_recover", [True, False])
def test_a_quote_made_before_a_tpm_restart_makes_no_verdict(auto_recover: bool) -> None:
    """Root, running a bad boot, answers each nonce from a brief good boot and hands the
    quote in from the bad one again, rebooting through TPM Restarts: never Trusted again.
    (No nonce is out between a verdict and its due time, so it cannot be quoted ahead.)"""
    tpm, m, t = _trusted_member(auto_recover=auto_recover)
    assert "nonce" not in m.status["challenge"]  # nothing to quote ahead of time
    _restart(tpm, good=False)
    for _ in range(4):
        t += LATER
        m.operator(t)  # the nonce, published when due, finds the host in the bad boot
        _restart(tpm, good=True)
        m.agent_step()  # quoted from a brief good boot
        _restart(tpm, good=False)
        m.operator(t + dt.timedelta(seconds=1))  # handed in from the bad one
        assert (m.phase, m.reason) == ("Untrusted", "Rebooted")
    for _ in range(2):  # asked again at once: quotes of the running (bad) boot
        t += LATER
        m.cycle(t)
        assert m.phase == "Untrusted"
    assert m.reason == "PcrMismatch"


def test_a_host_that_restarts_into_a_good_boot_for_each_quote_is_held_for_readmission() -> None:
    """Root answers from a brief good boot (`Rebooted`: asked again at once), answers that
    in the same good boot, then restarts into the bad one; on a level with autoRecover:
    false the first restart already holds it for a human (a resume from suspend is held
    too: no quote tells the two apart)."""
    tpm, m, t = _trusted_member(auto_recover=False)
    _restart(tpm, good=False)
    seen = []
    for _ in range(3):
        t += LATER
        m.operator(t)  # the nonce, published when due
        _restart(tpm, good=True)  # a brief good boot
        m.agent_step()
        m.operator(t)  # handed in from the good boot
        seen.append(m.phase)
        t += dt.timedelta(seconds=1)
        m.agent_step()  # the nonce asked again at once, quoted in the same good boot
        _restart(tpm, good=False)
        m.operator(t)  # handed in from the bad boot
        seen.append(m.phase)
    assert "Trusted" not in seen
    assert m.reason == "AwaitingReadmission"


def test_binding_a_new_ak_does_not_hide_a_reboot() -> None:
    """The TPM's counters belong to the TPM, not the AK: a failure that unbinds the AK (here
    a fault no check names, `EvidenceUnprocessable`, right after a reboot) and a new AK
    bound under the same EK keep them, so the reboot is still seen (and, on a level with
    autoRecover: false, still held for readmission)."""
    import gtvp.core.attestation as steps

    tpm, m, t = _trusted_member(auto_recover=False)
    tpm._clock.reset_count += 1  # a reboot (TPM Reset)
    real = steps._check_enrolment

    def unforeseen(*_: object, **__: object) -> object:
        raise RuntimeError("unforeseen")

    steps._check_enrolment = unforeseen  # type: ignore[assignment]
    try:
        t += dt.timedelta(seconds=1)
        m.operator(t)
    finally:
        steps._check_enrolment = real
    assert m.reason == "EvidenceUnprocessable"
    assert "resetCount" in m.status["trust"]
    reasons = []
    for _ in range(5):
        t += LATER
        m.cycle(t)
        reasons.append(m.reason)
    assert "Rebooted" in reasons
    assert m.reason == "AwaitingReadmission"


def _refused(m: AgentMember, t: dt.datetime, reason: str) -> dt.datetime:
    """Two quote cycles after `t`, each refused for `reason`; the time of the last."""
    for _ in range(2):
        t = _after(m, t)
        assert (m.phase, m.reason) == ("Untrusted", reason)
    return t


def _after(m: AgentMember, t: dt.datetime, cycles: int = 1) -> dt.datetime:
    """`cycles` quote cycles, LATER apart, after `t`; the time of the last."""
    for _ in range(cycles):
        t += LATER
        m.cycle(t)
    return t


def _clear(tpm: SoftTpm) -> None:
    """TPM2_Clear (or the TPM's state put back from a copy): its counters back to 0."""
    tpm._clock.reset_count = 0
    tpm._clock.restart_count = 0


@pytest.mark.parametrize("auto_recover", [True, False])
def test_a_cleared_tpm_is_refused_until_readmitted_then_judged_from_its_counters(
    auto_recover: bool,
) -> None:
    """Counters that went back fail every quote (no deleting the Member needed to recover):
    an administrator's readmission takes the TPM's counters as they are now, once."""
    tpm, m, t = _trusted_member(auto_recover=auto_recover)
    _clear(tpm)
    t = _refused(m, t, "CounterWentBack")
    m.readmit = "ticket-1"
    t = _after(m, t)
    assert m.phase == "Trusted", m.status["trust"]
    assert (m.status["trust"]["resetCount"], m.status["trust"]["readmitToken"]) == (0, "ticket-1")
    tpm._clock.reset_count = 3  # rebooted a few times since, then cleared again
    t = _after(m, t)
    assert m.reason in ("Rebooted", "AwaitingReadmission")
    m.readmit = "ticket-2" if not auto_recover else m.readmit  # a strict level: readmitted
    t = _after(m, t, 2)
    assert m.phase == "Trusted"
    _clear(tpm)
    for _ in range(2):  # the same readmission resets nothing twice
        t += LATER
        m.cycle(t)
        assert (m.phase, m.reason) == ("Untrusted", "CounterWentBack")


@pytest.mark.parametrize("auto_recover", [True, False])
def test_a_tpm_whose_firmware_was_rolled_back_is_held_until_readmitted(
    auto_recover: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root flashes an older TPM firmware (one with a published flaw: the EK survives, and
    firmware is measured into no PCR) and reboots: the firmware version every quote signs
    went back, which fails every quote (`FirmwareWentBack`, on every level) until an
    administrator readmits the host; an upgrade is no rollback. Found by a review: the
    version was parsed and never compared."""
    tpm, m, t = _trusted_member(auto_recover=auto_recover)
    assert m.status["trust"]["firmwareVersion"] == str(softtpm.FIRMWARE_VERSION)
    older = softtpm.FIRMWARE_VERSION - 0x10000
    monkeypatch.setattr(softtpm, "FIRMWARE_VERSION", older)
    tpm._clock.reset_count += 1  # flashed, then rebooted
    t = _refused(m, t, "FirmwareWentBack")
    assert "rolled back" in m.status["trust"]["message"]
    m.readmit = "ticket-1"
    t = _after(m, t, 2)
    assert m.phase == "Trusted", m.status["trust"]
    assert m.status["trust"]["firmwareVersion"] == str(older)
    monkeypatch.setattr(softtpm, "FIRMWARE_VERSION", older + 0x20000)  # an upgrade
    t = _after(m, t, 2)
    assert m.phase == "Trusted", m.status["trust"]
    assert m.status["trust"]["firmwareVersion"] == str(older + 0x20000)


def test_a_readmission_set_before_a_failure_does_not_readmit_it() -> None:
    """A `gtvp.io/readmit` value left on a Member while nothing waited for one (an old
    ticket, or one set ahead) is used up doing nothing: the failure that comes later still
    waits for a human."""
    tpm, m, t = _trusted_member(auto_recover=False)
    m.readmit = "set-ahead"
    t = _after(m, t)
    assert m.phase == "Trusted"
    tpm.extend(7, b"a bootloader the policy does not accept")  # then the host is tampered
    t = _after(m, t)
    assert m.reason == "PcrMismatch"
    _restart(tpm, good=True)  # and boots the good chain again: clean quotes
    t = _after(m, t, 2)
    assert (m.phase, m.reason) == ("Untrusted", "AwaitingReadmission")
    m.readmit = "after-checking-the-host"
    t = _after(m, t)
    assert m.phase == "Trusted"


def test_a_readmission_readmits_only_the_failures_judged_before_it() -> None:
    """A value set for one failure does not approve another judged after it, before the
    next clean quote: a counter rollback (TPM2_Clear, or the TPM's state put back with a
    good boot's PCRs) or a second tampering waits for a value set after it."""
    tpm, m, t = _trusted_member(auto_recover=False)
    tpm.extend(7, b"a bootloader the policy does not accept")
    t = _after(m, t)
    assert (m.reason, m.status["trust"]["awaitingReadmission"]) == ("PcrMismatch", True)
    m.readmit = "checked-the-pcr"
    _clear(tpm)
    tpm.pcrs = {"sha256": [bytes(32)] * PCR_COUNT}  # a good boot's PCRs, put back
    t = _refused(m, t, "CounterWentBack")
    m.readmit = "checked-the-rollback"
    t = _after(m, t)
    assert m.phase == "Trusted"
    # a value set for a reboot does not approve a tampering judged before the clean quote
    _restart(tpm, good=True)
    t = _after(m, t)
    assert (m.reason, m.status["trust"]["awaitingReadmission"]) == ("Rebooted", True)
    m.readmit = "checked-the-reboot"
    tpm.extend(7, b"a bootloader the policy does not accept")
    t = _after(m, t)
    assert m.reason == "PcrMismatch"
    _restart(tpm, good=True)
    t = _after(m, t, 2)
    assert (m.phase, m.reason) == ("Untrusted", "AwaitingReadmission")


def test_a_counter_readmission_holds_when_the_reason_was_overwritten_meanwhile() -> None:
    """The member's reason may change while it waits (the policy briefly unusable, its
    class renamed): the readmission an administrator sets after seeing CounterWentBack still
    takes the counters as they are."""
    tpm, m, t = _trusted_member(auto_recover=True)
    _clear(tpm)
    t = _after(m, t)
    assert m.reason == "CounterWentBack"
    m.status["trust"]["reason"] = "NoPolicy"  # as the handler writes it without a policy
    m.readmit = "after-the-clear"
    t = _after(m, t, 2)
    assert m.phase == "Trusted", m.status["trust"]
    assert "countersWentBack" not in m.status["trust"]
