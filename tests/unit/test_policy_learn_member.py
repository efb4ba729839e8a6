"""`gtvp policy learn --member` learns only from the event log the member's verdict verified.

The agent may rewrite `status.agent.evidence` at any time, for example with a nonce the
operator no longer asks about (so it is never judged) and a log of a boot it did not run:
learning from that log would allow that boot for the whole class. The operator records the
SHA-256 of the log its Trusted verdict replayed against the signed PCRs
(`status.trust.eventLogSHA256`); `learn` refuses any other.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest

from gtvp import policy_cli
from tests.unit.test_refvalues import boot, synth_log

RAN = synth_log(boot(b"grub-2.12"))
FOREIGN = synth_log(boot(b"grub-2.12-backdoored"))


def _status(verified: bytes | None) -> dict[str, Any]:
    trust: dict[str, Any] = {"verdict": "Trusted", "reason": "QuoteVerified"}
    if verified is not None:
        trust["eventLogSHA256"] = hashlib.sha256(verified).hexdigest()
    return {"phase": "Trusted", "trust": trust}


def _evidence(log: bytes) -> dict[str, Any]:
    return {"eventLog": base64.b64encode(log).decode()}


def test_the_log_the_verdict_verified_is_learned() -> None:
    log = policy_cli._trusted_log("m", _status(RAN), _evidence(RAN))
    assert log.pcrs["sha256"][4] == policy_cli._parse(RAN, "x").pcrs["sha256"][4]


def test_a_log_written_after_the_verdict_is_refused() -> None:
    with pytest.raises(policy_cli.Refused, match="is not the one its Trusted verdict verified"):
        policy_cli._trusted_log("m", _status(RAN), _evidence(FOREIGN))


def test_a_verdict_that_verified_no_log_teaches_nothing() -> None:
    with pytest.raises(policy_cli.Refused, match="names no event log it verified"):
        policy_cli._trusted_log("m", _status(None), _evidence(RAN))
