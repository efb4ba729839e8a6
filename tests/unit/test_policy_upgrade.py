"""judge_upgrade: before an upgrade, whether the new version would run the pool under its
live SecurityPolicy, and when the pool would lose it (the pre-upgrade hook's decision)."""

from __future__ import annotations

from typing import Any

from gtvp.core.policy_upgrade import StoredPolicy, judge_upgrade
from tests.samples import sample_policy_spec


def _good() -> dict[str, Any]:
    return sample_policy_spec()


def _log_only() -> dict[str, Any]:
    """What an older gtvp accepted: a class that only requires an event log (it replays to
    any boot, so this version refuses it)."""
    spec = _good()
    spec["memberClasses"][0] = {"name": "generic-uefi", "eventLog": {"required": True}}
    spec["defaultMemberClass"] = "generic-uefi"
    return spec


def _running(generation: int, spec: dict[str, Any]) -> dict[str, Any]:
    """The status an operator writes for the generation it runs under."""
    return {"observedGeneration": generation, "acceptedGeneration": generation,
            "acceptedSpec": spec,
            "conditions": [{"type": "Accepted", "status": "True"}]}  # fmt: skip


def _refused_status(generation: int) -> dict[str, Any]:
    """The status of a policy no generation of which was ever accepted."""
    return {"observedGeneration": generation,
            "conditions": [{"type": "Accepted", "status": "False"}]}  # fmt: skip


def _policy(generation: int, spec: dict[str, Any], status: dict[str, Any]) -> StoredPolicy:
    return StoredPolicy("default", generation, spec, status)


def test_a_policy_this_version_accepts_passes() -> None:
    p = _policy(4, _good(), _running(4, _good()))
    got = judge_upgrade("default", p, p)
    assert (got.runs_under, got.refused, got.blocks) == (4, None, False)
    assert got.message == "SecurityPolicy default (generation 4): accepted by this version"


def test_a_running_policy_this_version_refuses_blocks_the_upgrade_and_says_how_to_fix_it() -> None:
    p = _policy(4, _log_only(), _running(4, _log_only()))
    got = judge_upgrade("default", p, p)
    assert got.blocks
    assert got.runs_under is None
    assert got.refused is not None
    assert "verifies nothing" in got.refused
    assert "runs under a policy now and would run under none" in got.message
    assert "every member Untrusted (NoPolicy)" in got.message
    assert "gtvp policy learn" in got.message
    assert "upgradeCheck.enabled=false" in got.message


def test_an_older_accepted_generation_this_version_still_accepts_keeps_the_pool() -> None:
    """The spec was edited to something this version refuses, but the generation the pool
    runs under is still fine by it: it goes on under that one, as today."""
    p = _policy(5, _log_only(), _running(4, _good()))
    got = judge_upgrade("default", p, p)
    assert not got.blocks
    assert got.runs_under == 4
    assert "would go on under generation 4" in got.message


def test_a_pool_whose_status_shows_no_accepted_generation_loses_nothing() -> None:
    """The running operator looked at this generation, refused it and had no earlier one:
    the pool runs under none already, and an upgrade (which may bring the fix) goes on."""
    p = _policy(2, _log_only(), _refused_status(2))
    got = judge_upgrade("default", p, p)
    assert not got.blocks
    assert "runs under no policy now either" in got.message


def test_without_a_status_that_says_so_the_pool_is_taken_to_run_under_its_policy() -> None:
    """An operator that wrote no acceptedGeneration (an old release), or has not looked at
    the current generation yet: the check cannot tell that nothing would be lost, so it
    stops the upgrade (fail closed)."""
    for status in ({}, _refused_status(1), {"observedGeneration": 2}):
        p = _policy(2, _log_only(), status)
        assert judge_upgrade("default", p, p).blocks, status


def test_pointing_the_operator_at_a_policy_that_is_absent_or_refused_blocks() -> None:
    """policyName changed by the upgrade (or mistyped): the running policy is lost."""
    old = StoredPolicy("old", 3, _good(), _running(3, _good()))
    absent = judge_upgrade("new", None, old)
    assert absent.blocks
    assert absent.message.startswith(
        "SecurityPolicy new, which the upgrade makes the operator enforce instead of old: "
        "does not exist"
    )
    assert "apply it first, or keep policyName" in absent.message
    refused = StoredPolicy("new", 1, _log_only(), {})
    assert judge_upgrade("new", refused, old).blocks
    fine = StoredPolicy("new", 1, _good(), {})
    assert not judge_upgrade("new", fine, old).blocks
    # nothing running (no such policy either): nothing to lose
    assert not judge_upgrade("new", None, None).blocks
