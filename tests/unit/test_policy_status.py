"""assess_policy: an unusable generation never replaces the last accepted one, and the
policy's status says so (Accepted, reason, message, observedGeneration, levelCount)."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Any

import yaml

from gtvp.core.policy import parse_policy
from gtvp.core.policy_status import Accepted, PolicyAssessment, assess_policy

SAMPLE = Path(__file__).parents[2] / "crds" / "samples" / "securitypolicy.yaml"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _good() -> dict[str, Any]:
    doc = next(d for d in yaml.safe_load_all(SAMPLE.read_text()) if d)
    spec: dict[str, Any] = copy.deepcopy(doc["spec"])
    return spec


def _bad() -> dict[str, Any]:
    spec = _good()
    spec["memberClasses"][0]["goldenPCRs"] = {"7": "ab" * 31}
    return spec


def _assess(
    generation: int,
    spec: dict[str, Any],
    status: dict[str, Any] | None = None,
    *,
    now: dt.datetime = T0,
    remembered: Accepted | None = None,
    enforced: bool = True,
) -> PolicyAssessment:
    return assess_policy(
        "default",
        generation=generation,
        spec=spec,
        status=status or {},
        now=now,
        remembered=remembered,
        enforced=enforced,
    )


def _accepted(a: PolicyAssessment) -> dict[str, Any]:
    return next(c for c in a.status["conditions"] if c["type"] == "Accepted")


def test_a_good_policy_is_accepted_with_level_count_and_generation() -> None:
    a = _assess(1, _good())
    assert a.policy is not None
    assert a.error is None
    assert a.status["observedGeneration"] == 1
    assert a.status["levelCount"] == 3
    assert a.status["acceptedGeneration"] == 1
    assert a.status["acceptedSpec"] == _good()
    cond = _accepted(a)
    assert (cond["status"], cond["reason"], cond["observedGeneration"]) == ("True", "Valid", 1)
    assert "3 levels (standard, sensitive, restricted)" in cond["message"]
    assert a.event is not None
    assert (a.event.type, a.event.reason) == ("Normal", "PolicyAccepted")


def test_a_bad_generation_keeps_the_last_accepted_one() -> None:
    first = _assess(1, _good())
    a = _assess(2, _bad(), first.status, now=T0 + dt.timedelta(minutes=1))
    assert a.policy == first.policy  # the pool goes on under generation 1
    assert a.accepted is not None
    assert a.accepted.generation == 1
    assert a.error is not None
    assert a.error.field == "spec.memberClasses[0].goldenPCRs[7]"
    assert a.status["observedGeneration"] == 2
    assert a.status["levelCount"] == 3
    assert a.status["acceptedGeneration"] == 1
    assert a.status["acceptedSpec"] == _good()
    cond = _accepted(a)
    assert (cond["status"], cond["reason"], cond["observedGeneration"]) == ("False", "Invalid", 2)
    assert cond["message"].startswith(
        "generation 2 is unusable: spec.memberClasses[0].goldenPCRs[7]"
    )
    assert "31 bytes" in cond["message"]
    assert "the pool goes on under generation 1, the last one accepted" in cond["message"]
    assert cond["lastTransitionTime"] == "2026-01-01T00:01:00Z"
    assert a.event is not None
    assert (a.event.type, a.event.reason) == ("Warning", "PolicyInvalid")
    assert a.event.message == cond["message"]
    assert a.enforcement_error is None


def test_a_restarted_operator_finds_the_last_accepted_generation_in_status() -> None:
    status = _assess(2, _bad(), _assess(1, _good()).status).status
    # a new process: nothing remembered, only the object as the API server holds it
    a = _assess(2, _bad(), status, now=T0 + dt.timedelta(hours=1))
    assert a.accepted is not None
    assert a.accepted.generation == 1
    assert a.status == status  # nothing to write
    assert a.event is None  # and no second Warning


def test_a_bad_policy_with_nothing_accepted_before_fails_closed_and_says_why() -> None:
    a = _assess(1, _bad())
    assert a.policy is None
    assert a.accepted is None
    assert "acceptedSpec" not in a.status
    assert "acceptedGeneration" not in a.status
    assert a.status["levelCount"] == 3
    cond = _accepted(a)
    assert (cond["status"], cond["reason"], cond["observedGeneration"]) == ("False", "Invalid", 1)
    assert "no generation of it was accepted before" in cond["message"]
    assert "every member is Untrusted (NoPolicy) until it is fixed" in cond["message"]
    assert a.enforcement_error is not None
    assert "generation 1 is unusable" in a.enforcement_error


def test_a_policy_not_enforced_here_gets_its_status_too() -> None:
    a = _assess(1, _bad(), enforced=False)
    cond = _accepted(a)
    assert cond["status"] == "False"
    assert "every member" not in cond["message"]
    assert "no generation of it was accepted before" in cond["message"]


def test_an_accepted_spec_in_status_that_no_longer_parses_is_not_used() -> None:
    status = {"acceptedGeneration": 1, "acceptedSpec": _bad(), "observedGeneration": 1}
    a = _assess(2, _bad(), status)
    assert a.policy is None
    assert "acceptedSpec" not in a.status


def test_a_newer_generation_remembered_in_memory_wins_over_status() -> None:
    gen1 = _assess(1, _good())
    spec2 = _good()
    spec2["levels"] = spec2["levels"][:2]
    remembered = Accepted(2, spec2, parse_policy("default", spec2))
    # the write of generation 2's status failed: status still says generation 1
    a = _assess(3, _bad(), gen1.status, remembered=remembered)
    assert a.accepted is not None
    assert a.accepted.generation == 2
    assert a.status["acceptedGeneration"] == 2
    assert a.status["acceptedSpec"] == spec2


def test_fixing_the_policy_accepts_the_new_generation() -> None:
    bad = _assess(2, _bad(), _assess(1, _good()).status)
    spec3 = _good()
    spec3["levels"] = spec3["levels"][:1]
    a = _assess(3, spec3, bad.status, now=T0 + dt.timedelta(minutes=5))
    assert a.accepted is not None
    assert a.accepted.generation == 3
    assert a.status["levelCount"] == 1
    cond = _accepted(a)
    assert (cond["status"], cond["observedGeneration"]) == ("True", 3)
    assert cond["lastTransitionTime"] == "2026-01-01T00:05:00Z"
    assert a.event is not None
    assert a.event.type == "Normal"


def test_the_same_verdict_on_a_later_event_writes_nothing() -> None:
    first = _assess(1, _good())
    again = _assess(1, _good(), first.status, now=T0 + dt.timedelta(minutes=3))
    assert again.status == first.status
    assert again.event is None


def test_what_an_accepted_policy_leaves_unappraised_is_a_condition_and_one_warning() -> None:
    """A policy quoting only PCR 7 is accepted; its BootChain condition is False (Weak) and
    says which boot-chain PCRs it leaves out, with one PolicyWeak Warning (not one per
    event); the sample policy appraises the whole chain."""
    good = _assess(1, _good())
    chain = next(c for c in good.status["conditions"] if c["type"] == "BootChain")
    assert (chain["status"], chain["reason"]) == ("True", "Appraised")
    assert good.weak_event is None
    spec = _good()
    spec["pcrSelection"]["pcrs"] = [7]
    spec["memberClasses"] = [{"name": "sb", "goldenPCRs": {"7": "ab" * 32}}]
    spec["defaultMemberClass"] = "sb"
    weak = _assess(2, spec, good.status)
    assert _accepted(weak)["status"] == "True"
    chain = next(c for c in weak.status["conditions"] if c["type"] == "BootChain")
    assert (chain["status"], chain["reason"]) == ("False", "Weak")
    assert "leaves out boot-chain PCR(s) 0: the firmware" in chain["message"]
    assert weak.weak_event is not None
    assert (weak.weak_event.type, weak.weak_event.reason) == ("Warning", "PolicyWeak")
    again = _assess(2, spec, weak.status, now=T0 + dt.timedelta(minutes=1))
    assert again.weak_event is None
