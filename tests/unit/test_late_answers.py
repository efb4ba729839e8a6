"""An agent that answers each nonce late (in time, but late) and then withholds the next:
the next nonce is asked no later than the verdict needs it, so its silence is the host's,
and on a level without autoRecover the expiry holds it for a readmission; it does not pass
for an operator that was late."""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

import pytest

from gtvp.core.policy import Policy, parse_policy
from gtvp.core.timestamps import parse_ts
from gtvp_local.pool import pool_policy
from gtvp_local.swtpm import SwtpmCA
from tests.softmember import AgentMember, Bundle
from tests.softtpm import SoftCA, SoftTpm

SECOND = dt.timedelta(seconds=1)


def _t0() -> dt.datetime:
    """A start a few minutes back, taken when the test runs: within the validity of the EK
    certificates the test makes (a module-level time is as old as the run when a full suite
    reaches this module, 40 minutes in CI, before the certificates)."""
    return (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).replace(microsecond=0)


def _policy(ca: SoftCA, *, interval: str, valid_for: str) -> Policy:
    spec = pool_policy(
        cast(SwtpmCA, Bundle(ca.bundle_pem())), interval=interval, valid_for=valid_for
    )["spec"]
    for level in spec["levels"]:
        level["autoRecover"] = False
    return parse_policy("default", spec)


def _at(m: AgentMember, *path: str) -> dt.datetime:
    value: Any = m.status
    for key in path:
        value = value[key]
    t = parse_ts(value)
    assert t is not None
    return t


def _ask_when_due(m: AgentMember) -> None:
    for _ in range(3):
        m.operator(_at(m, "challenge", "answerAfter"))
        if m.status["challenge"].get("nonce"):
            return
    raise AssertionError(m.status["challenge"])


@pytest.mark.parametrize(
    ("interval", "valid_for", "late"), [("2s", "6s", 1.5), ("2s", "6s", 2.0), ("60s", "180s", 125)]
)
def test_a_host_that_answers_late_then_withholds_its_quote_is_held(
    interval: str, valid_for: str, late: float
) -> None:
    ca = SoftCA()
    m = AgentMember(SoftTpm(ca), _policy(ca, interval=interval, valid_for=valid_for))
    m.enrol(_t0())
    _ask_when_due(m)
    m.agent_step()
    answered = _at(m, "challenge", "issuedAt") + late * SECOND
    assert m.operator(answered).outcome == "Verified"  # late, but in time
    _ask_when_due(m)  # asked when due: no later than the verdict needs it
    expires = _at(m, "trust", "expiresAt")
    assert _at(m, "challenge", "issuedAt") <= expires - min(5 * SECOND, _margin(m))
    m.operator(expires)  # and never answered
    assert (m.phase, m.reason) == ("Untrusted", "VerdictExpired")
    assert m.status["trust"]["awaitingReadmission"] is True
    assert "did not answer the nonce" in m.status["trust"]["message"]


def _margin(m: AgentMember) -> dt.timedelta:
    level = m.policy.levels[-1]
    return level.valid_for - level.interval
