"""Member phases and verdicts are StrEnums in core; what core writes stays plain strings.

Callers outside core compare phases read from the API server with string literals, and the
operator writes statuses as JSON (and `gtvp status` shows them as YAML), so the enums must
compare equal to their strings and never reach a status as an enum.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import yaml

from gtvp.core.attestation import ENTROPY_BYTES, attestation_step
from gtvp.core.phases import MemberPhase, Verdict
from gtvp.core.policy import Policy, parse_policy
from gtvp.core.timestamps import format_ts
from gtvp.core.trust import MemberView

SAMPLE = Path(__file__).parents[2] / "crds" / "samples" / "securitypolicy.yaml"
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def _policy() -> Policy:
    doc = next(d for d in yaml.safe_load_all(SAMPLE.read_text()) if d)
    return parse_policy("default", doc["spec"])


def _step(status: dict[str, Any]) -> dict[str, Any]:
    step = attestation_step(
        spec={"identity": 3},
        status=status,
        labels={},
        policy=_policy(),
        now=NOW,
        entropy=bytes(ENTROPY_BYTES),
    )
    return step.status


def _assert_plain(status: dict[str, Any]) -> None:
    assert type(status["phase"]) is str
    assert type(status["trust"].get("verdict", "")) is str
    assert yaml.safe_load(yaml.safe_dump(status)) == json.loads(json.dumps(status)) == status


def test_phases_and_verdicts_are_their_strings() -> None:
    assert [p.value for p in MemberPhase] == [
        "Pending",
        "Enrolling",
        "Trusted",
        "Untrusted",
        "Maintenance",
    ]
    assert MemberPhase.TRUSTED == "Trusted" == Verdict.TRUSTED
    assert {"Trusted": 1}[MemberPhase.TRUSTED] == 1  # same hash as the string
    assert f"{MemberPhase.UNTRUSTED}" == str(MemberPhase.UNTRUSTED) == "Untrusted"
    assert type(MemberPhase.PENDING.value) is str
    view = MemberView("m", "Trusted", 3, NOW + dt.timedelta(seconds=1), 1)
    assert view.usable(NOW, 3)  # a phase read from the API server is a plain string


def test_a_member_without_an_agent_is_pending_as_a_plain_string() -> None:
    status = _step({})
    assert status["phase"] == MemberPhase.PENDING
    _assert_plain(status)


def test_an_expired_verdict_is_written_untrusted_as_a_plain_string() -> None:
    trust = {
        "verdict": "Trusted",
        "reason": "QuoteVerified",
        "message": "quote verified",
        "expiresAt": format_ts(NOW - dt.timedelta(seconds=1)),
        "usesLeft": 3,
    }
    status = _step({"phase": "Trusted", "trust": trust})
    assert (status["phase"], status["trust"]["verdict"]) == ("Untrusted", Verdict.UNTRUSTED)
    assert status["trust"]["reason"] == "VerdictExpired"
    _assert_plain(status)


def test_a_withdrawn_enrolment_is_written_untrusted_as_a_plain_string() -> None:
    trust = {"verdict": "Trusted", "akName": "00" * 34, "ekSHA256": "ab" * 32}
    status = _step({"phase": "Trusted", "trust": trust})
    assert status["phase"] == MemberPhase.UNTRUSTED
    assert status["trust"]["reason"] == "EnrolmentChanged"
    assert "akName" not in status["trust"]
    _assert_plain(status)
