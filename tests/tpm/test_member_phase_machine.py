"""The member phase machine under any agent behaviour: a hypothesis stateful test.

An attacker holding a node's agent identity may write anything into `status.agent`, pause,
withdraw its enrolment, swap in a software AK, replay or garble evidence, while the clock
runs on. The operator (the pure `attestation_step`, run on every agent write and whenever
its own schedule says so, as the recheck loop does) must never show the member Trusted past
the expiry of the last verdict a genuine TPM quote earned, nor after the enrolment that
verdict rested on changed. A gated VM stays on a member only while it is Trusted (otherwise
the level's onUntrusted applies), so this bounds how long a VM can stay on a member past its
verdict's expiry: not at all at the operator's next look, which is never later than expiry.

The TPM is a real swtpm driven by the agent's own code (tests/tpm/test_attestation_cycle.py's
Member); only the attacker's writes are crafted.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from gtvp.core.timestamps import parse_ts
from gtvp_local.swtpm import Swtpm, SwtpmCA
from tests.tpm.test_attestation_cycle import T0, Member
from tests.tpmkit import soft_ak

pytestmark = pytest.mark.tpm


class MemberMachine(RuleBasedStateMachine):
    """One member, one agent that may turn hostile, the operator and a clock."""

    tpm: Swtpm
    ca: SwtpmCA
    root: Path

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.due = T0
        self.fresh_until: dt.datetime | None = None  # expiry of the last genuine verdict
        self.enrolment_intact = True  # the enrolment that verdict rested on is still there

    @initialize()
    def enrol(self) -> None:
        self.m = Member(self.tpm, self.root / secrets.token_hex(6), self.ca)
        self.m.spec["identity"] = 3
        for _ in range(3):  # publish, activate the credential, first quote
            self.m.agent()
            self.operate()
        assert self.m.phase == "Trusted", self.m.status.get("trust")

    # ----- the operator: on every agent write, and when its own schedule says ---------------

    def operate(self) -> None:
        step = self.m.operator(self.now)
        self.due = self.now + step.recheck_after
        if step.outcome == "Verified":
            self.fresh_until = parse_ts(self.m.status["trust"]["expiresAt"])
            self.enrolment_intact = True

    # ----- what the agent (honest or not) may do ---------------------------------------------

    @rule()
    def honest_agent_answers(self) -> None:
        answer_after = parse_ts((self.m.status.get("challenge") or {}).get("answerAfter"))
        if answer_after is not None and answer_after > self.now:
            return  # an honest agent waits for answerAfter
        self.m.agent()
        self.operate()

    @rule()
    def agent_withdraws_its_enrolment(self) -> None:
        self.m.status["agent"] = {}
        self.enrolment_intact = False
        self.operate()

    @rule()
    def agent_publishes_a_software_ak(self) -> None:
        _, ak = soft_ak()
        enrollment = dict((self.m.status.get("agent") or {}).get("enrollment") or {})
        if not enrollment:
            return
        enrollment["akPublic"] = base64.b64encode(
            len(ak.marshalled).to_bytes(2, "big") + ak.marshalled
        ).decode()
        enrollment["akName"] = ak.name.hex()
        self.m.status.setdefault("agent", {})["enrollment"] = enrollment
        self.enrolment_intact = False
        self.operate()

    @rule(raw=st.binary(min_size=0, max_size=64))
    def agent_writes_garbage_evidence(self, raw: bytes) -> None:
        nonce = (self.m.status.get("challenge") or {}).get("nonce")
        self.m.status.setdefault("agent", {})["evidence"] = {
            "nonce": nonce,
            "attest": base64.b64encode(raw).decode(),
            "signature": base64.b64encode(raw[::-1]).decode(),
            "pcrBank": "sha256",
            "pcrValues": {},
        }
        self.operate()

    @rule()
    def agent_replays_old_evidence(self) -> None:
        agent = self.m.status.get("agent") or {}
        old = agent.get("evidence")
        nonce = (self.m.status.get("challenge") or {}).get("nonce")
        if old and nonce:
            agent["evidence"] = {**old, "nonce": nonce}
            self.operate()

    @rule(seconds=st.integers(min_value=1, max_value=45))
    def clock_runs(self, seconds: int) -> None:
        """Time passes; the operator looks whenever its schedule says (the recheck loop)."""
        until = self.now + dt.timedelta(seconds=seconds)
        while self.due <= until:
            self.now = max(self.now, self.due)
            self.operate()
        self.now = until

    # ----- the guarantee ----------------------------------------------------------------------

    @invariant()
    def trusted_only_while_a_genuine_verdict_is_fresh(self) -> None:
        if not hasattr(self, "m") or self.m.phase != "Trusted":
            return
        assert self.enrolment_intact, "Trusted after the agent changed its enrolment"
        assert self.fresh_until is not None
        assert self.now < self.fresh_until, (
            f"Trusted at {self.now} past the verdict's expiry {self.fresh_until}"
        )
        # the operator's next look is no later than the expiry (one recheck bounds the stay)
        assert self.due <= self.fresh_until
        assert self.m.status["level"] > 0

    @invariant()
    def not_trusted_means_level_zero(self) -> None:
        if hasattr(self, "m") and self.m.phase != "Trusted":
            assert self.m.status["level"] == 0


def test_no_agent_behaviour_keeps_a_member_trusted_past_its_verdict(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    MemberMachine.tpm = make_tpm("phase-machine")
    MemberMachine.ca = swtpm_ca
    MemberMachine.root = tpm_dir / "phase-machine-agents"
    run = settings(
        max_examples=25,
        stateful_step_count=12,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        derandomize=False,
    )(MemberMachine).TestCase
    run().runTest()
