"""Reference sets through the operator's own attestation cycle (`attestation_step`), with the
real agent code over a software-held TPM (tests/softtpm.py) that sends an event log: what
the member's status says, and when a human is needed."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, cast

import pytest

from gtvp.core.eventlog import parse_event_log
from gtvp.core.policy import Policy, parse_policy
from gtvp.core.refvalues import learn
from gtvp_local.pool import GOLDEN_PCRS, pool_policy
from gtvp_local.swtpm import SwtpmCA
from tests.softmember import AgentMember, Bundle
from tests.softtpm import SoftCA, SoftTpm
from tests.unit.test_refvalues import boot, synth_log

T0 = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
LATER = dt.timedelta(seconds=11)


@pytest.fixture(scope="module")
def ca() -> SoftCA:
    return SoftCA()


def _policy(ca: SoftCA, ref_sets: list[dict[str, Any]], *, auto_recover: bool) -> Policy:
    spec = pool_policy(cast(SwtpmCA, Bundle(ca.bundle_pem())), name="default")["spec"]
    for level in spec["levels"]:
        level["autoRecover"] = auto_recover
    spec["memberClasses"] = [
        {
            "name": "swtpm",
            "goldenPCRs": {str(p): "00" * 32 for p in GOLDEN_PCRS if p != 4},
            "referenceSets": ref_sets,
        }
    ]
    return parse_policy("default", spec)


def _set(name: str, bootloader: bytes, **window: str) -> dict[str, Any]:
    return {
        **learn(parse_event_log(synth_log(boot(bootloader))), "sha256", [4], name=name),
        **window,
    }


def _member(ca: SoftCA, policy: Policy, bootloader: bytes, tmp_path: Path) -> AgentMember:
    """A member whose TPM measured `bootloader` and whose agent sends that boot's log."""
    tpm = SoftTpm(ca)
    for _pcr, _type, data in boot(bootloader):
        tpm.extend(4, data)
    log = tmp_path / f"{bootloader.decode()}.log"
    log.write_bytes(synth_log(boot(bootloader)))
    m = AgentMember(tpm, policy)
    m.agent.cfg.event_log = log
    m.enrol(T0)
    return m


def _trust(m: AgentMember) -> dict[str, Any]:
    return cast(dict[str, Any], m.status["trust"])


def test_status_names_the_set_each_member_matched(ca: SoftCA, tmp_path: Path) -> None:
    policy = _policy(ca, [_set("old", b"grub-2.06"), _set("new", b"grub-2.12")], auto_recover=True)
    old, new = (_member(ca, policy, b, tmp_path) for b in (b"grub-2.06", b"grub-2.12"))
    assert (old.phase, _trust(old)["referenceSet"]) == ("Trusted", "old")
    assert (new.phase, _trust(new)["referenceSet"]) == ("Trusted", "new")
    assert _trust(new)["message"].endswith("; reference set new")


def test_an_expired_set_quarantines_and_needs_no_human_once_the_policy_accepts_again(
    ca: SoftCA, tmp_path: Path
) -> None:
    """On a level with autoRecover: false, ReferenceSetExpired is the policy's calendar, not
    tampering: it does not wait for gtvp.io/readmit."""
    end = (T0 + 2 * LATER).strftime("%Y-%m-%dT%H:%M:%SZ")
    policy = _policy(ca, [_set("old", b"grub-2.06", notAfter=end)], auto_recover=False)
    m = _member(ca, policy, b"grub-2.06", tmp_path)
    assert _trust(m)["referenceSet"] == "old"
    step = m.cycle(T0 + 3 * LATER)
    assert (m.phase, step.outcome) == ("Untrusted", "ReferenceSetExpired")
    assert f"reference set 'old' expired at {end} (notAfter)" in _trust(m)["message"]
    assert "referenceSet" not in _trust(m)
    assert not _trust(m).get("awaitingReadmission")
    # the administrator extends the window: the next quote is Trusted again, no readmit
    m.policy = _policy(ca, [_set("old", b"grub-2.06")], auto_recover=False)
    step = m.cycle(T0 + 4 * LATER)
    assert (m.phase, step.outcome) == ("Trusted", "Verified")
    assert _trust(m)["referenceSet"] == "old"


def test_a_verdict_ends_with_its_reference_sets_window_even_if_the_agent_is_silent(
    ca: SoftCA, tmp_path: Path
) -> None:
    """notAfter retires an old boot: a verdict whose boot matched the set just before the
    date holds no longer than the date (before: validFor past it, for an agent that then
    withheld its quotes), and its end is the policy's calendar (no readmission) on a level
    without autoRecover. Found by a review."""
    end_at = T0 + LATER
    end = end_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    policy = _policy(ca, [_set("old", b"grub-2.06", notAfter=end)], auto_recover=False)
    m = _member(ca, policy, b"grub-2.06", tmp_path)
    assert _trust(m)["expiresAt"] == end
    step = m.operator(end_at + dt.timedelta(seconds=1))  # the agent stays silent
    assert (m.phase, m.reason) == ("Untrusted", "ReferenceSetExpired")
    said = _trust(m)["message"]
    assert f"reference set old, the last that accepted this verdict's boot, ended at {end}" in said
    assert "ReferenceSetExpired" in [e.reason for e in step.events]
    assert not _trust(m).get("awaitingReadmission")


def test_a_later_set_accepting_the_same_boot_keeps_the_verdict_past_the_first_sets_end(
    ca: SoftCA, tmp_path: Path
) -> None:
    """A rollout's old set ends while a new, overlapping set accepts the same boot: the
    verdict is bounded by the set that runs longest (none: validFor), not by the first one
    matched, or every host on that boot would turn Untrusted at once. Found by a review."""
    end = (T0 + LATER).strftime("%Y-%m-%dT%H:%M:%SZ")
    sets = [_set("old", b"grub-2.06", notAfter=end), _set("new", b"grub-2.06")]
    m = _member(ca, _policy(ca, sets, auto_recover=False), b"grub-2.06", tmp_path)
    assert _trust(m)["referenceSet"] == "old"
    assert _trust(m)["expiresAt"] > end


def test_an_unknown_boot_on_a_level_without_auto_recover_waits_for_a_human(
    ca: SoftCA, tmp_path: Path
) -> None:
    policy = _policy(ca, [_set("old", b"grub-2.06")], auto_recover=False)
    m = _member(ca, policy, b"grub-2.06-backdoored", tmp_path)
    assert (m.phase, m.reason) == ("Untrusted", "EventNotAllowed")
    assert "EV_EFI_BOOT_SERVICES_APPLICATION" in _trust(m)["message"]
    assert _trust(m)["awaitingReadmission"] is True


def test_no_event_log_is_refused_for_a_class_with_reference_sets(
    ca: SoftCA, tmp_path: Path
) -> None:
    policy = _policy(ca, [_set("old", b"grub-2.06")], auto_recover=True)
    tpm = SoftTpm(ca)
    for _pcr, _type, data in boot(b"grub-2.06"):
        tpm.extend(4, data)
    m = AgentMember(tpm, policy)  # its agent sends no event log
    m.enrol(T0)
    assert (m.phase, m.reason) == ("Untrusted", "EventLogMissing")
