"""gtvp-agent's timing of quotes now that the operator publishes each nonce only when its
quote is due: it quotes such a nonce at once whatever its own clock says, still waits for
the `answerAfter` of a nonce an older operator published ahead, and reads its Member again
just after a quote falls due should its watch miss the nonce (less often while the operator
is late), instead of waiting for an idle watch to end."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from gtvp.core.timestamps import format_ts
from gtvp_agent.agent import DUE_SLACK
from tests.softmember import AgentMember, policy_trusting
from tests.softtpm import SoftCA, SoftTpm


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def member() -> AgentMember:
    ca = SoftCA()
    m = AgentMember(SoftTpm(ca), policy_trusting(ca.bundle_pem()))
    m.enrol(_now() - dt.timedelta(minutes=1))
    assert m.phase == "Trusted"
    return m


def _answer(m: AgentMember, challenge: dict[str, Any]) -> tuple[dict[str, Any], float]:
    mine = {k: v for k, v in (m.status.get("agent") or {}).items() if k != "evidence"}
    patch, wait, _quoted = m.agent._answer(mine, challenge)
    return patch, wait


def _challenge(**times: dt.datetime) -> dict[str, Any]:
    return {"pcrBank": "sha256", "pcrs": [0, 1], **{k: format_ts(v) for k, v in times.items()}}


def test_it_looks_again_just_after_a_quote_falls_due(member: AgentMember) -> None:
    patch, wait = _answer(member, _challenge(answerAfter=_now() + dt.timedelta(seconds=3)))
    assert "evidence" not in patch
    assert 2 < wait <= 3 + DUE_SLACK + 1  # not the idle watch's 60 s


def test_while_the_operator_is_late_it_looks_less_and_less_often(member: AgentMember) -> None:
    now = _now()
    _patch, soon = _answer(member, _challenge(answerAfter=now - dt.timedelta(seconds=1)))
    _patch, later = _answer(member, _challenge(answerAfter=now - dt.timedelta(seconds=30)))
    assert DUE_SLACK <= soon < later <= 60


def test_a_nonce_published_when_due_is_quoted_at_once_on_a_clock_behind(
    member: AgentMember,
) -> None:
    ahead = _now() + dt.timedelta(seconds=20)  # the operator's clock, ahead of this node's
    challenge = {**_challenge(issuedAt=ahead, answerAfter=ahead), "nonce": "ab" * 32}
    patch, _wait = _answer(member, challenge)
    assert patch["evidence"]["nonce"] == "ab" * 32


def test_a_nonce_published_ahead_by_an_older_operator_waits(member: AgentMember) -> None:
    now = _now()
    challenge = {
        **_challenge(issuedAt=now, answerAfter=now + dt.timedelta(seconds=20)),
        "nonce": "cd" * 32,
    }
    patch, wait = _answer(member, challenge)
    assert "evidence" not in patch
    assert 15 < wait <= 20
