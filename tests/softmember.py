"""A member driven by gtvp-agent's own decisions over any TPM (a `SoftTpm` or a real one),
with its status carried from step to step as the API server would store it: for tests of
the pure attestation cycle that need no API server.

The agent's part is `gtvp_agent.agent.Agent._answer`, the very code that decides what a
real agent writes into `status.agent`; the operator's part is `attestation_step`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from gtvp.core.attestation import ENTROPY_BYTES, Step, attestation_step
from gtvp.core.policy import Policy, parse_policy
from gtvp_agent.agent import Agent, AgentConfig
from gtvp_agent.tpm import Tpm
from gtvp_local.pool import pool_policy
from gtvp_local.swtpm import SwtpmCA


class Bundle:
    """Stands in for a CA where `pool_policy` only reads the bundle."""

    def __init__(self, *pems: str) -> None:
        self.pems = pems

    def bundle_pem(self) -> str:
        return "".join(self.pems)


def policy_trusting(*pems: str, name: str = "default", **kwargs: Any) -> Policy:
    """The local pool's policy (`pool_policy`) with exactly these EK CAs in its bundle."""
    spec = pool_policy(cast(SwtpmCA, Bundle(*pems)), name=name, **kwargs)["spec"]
    return parse_policy(name, spec)


def merge_patch(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """RFC 7386 JSON merge patch, as the API server applies the agent's status patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping):
            child = target.get(key)
            if not isinstance(child, dict):
                child = target[key] = {}
            merge_patch(child, value)
        else:
            target[key] = value


class AgentMember:
    """One Member: gtvp-agent's decisions over `tpm`, the operator's `attestation_step`."""

    def __init__(self, tpm: object, policy: Policy, *, name: str = "m-0") -> None:
        self.tpm = tpm
        self.policy = policy
        self.name = name
        self.spec: dict[str, Any] = {"identity": 3}
        self.status: dict[str, Any] = {}
        self.answered: set[bytes] = set()
        self.ek_holders: dict[str, str] = {}
        self.boot_id: str | None = None  # the boot its Node reports (kubelet's bootID)
        self.readmit: str | None = None  # its gtvp.io/readmit annotation
        config = AgentConfig(node=name, tcti="soft", state_dir=Path("/nonexistent"), event_log=None)
        self.agent = Agent(api=None, config=config, tpm_opener=self._tpm)

    @contextlib.contextmanager
    def _tpm(self) -> Iterator[Tpm]:
        yield cast(Tpm, self.tpm)

    def agent_step(self) -> dict[str, Any]:
        """What the agent writes now (merged into status.agent); returns its patch."""
        mine = self.status.get("agent") or {}
        patch, _wait, quoted = self.agent._answer(mine, self.status.get("challenge") or {})
        merge_patch(self.status.setdefault("agent", {}), patch)
        if quoted:
            self.agent.stored_answer(quoted)
        return patch

    def operator(self, now: dt.datetime) -> Step:
        step = attestation_step(
            spec=self.spec,
            status=self.status,
            labels={},
            policy=self.policy,
            now=now,
            entropy=secrets.token_bytes(ENTROPY_BYTES),
            answered_nonces=frozenset(self.answered),
            ek_holders=self.ek_holders,
            boot_id=self.boot_id,
            readmit=self.readmit,
        )
        self.status = {**step.status, "agent": self.status.get("agent", {})}
        if step.answered_nonce:
            self.answered.add(step.answered_nonce)
        return step

    def cycle(self, now: dt.datetime) -> Step:
        """The agent answers what is asked, the operator judges it; a quote that is due but
        not yet asked for (no nonce: the operator publishes it when due) is asked first."""
        challenge = self.status.get("challenge") or {}
        if challenge.get("answerAfter") and not challenge.get("nonce"):
            asked = self.operator(now)
            if not (self.status.get("challenge") or {}).get("nonce"):
                return asked  # not due yet: nothing to answer
        self.agent_step()
        return self.operator(now)

    def enrol(self, now: dt.datetime) -> Step:
        """Enrolment, credential activation, the first quote: until the first verdict."""
        step = self.operator(now)
        for _ in range(5):
            step = self.cycle(now)
            if step.outcome is not None:
                return step
        return step

    @property
    def phase(self) -> str:
        return str(self.status.get("phase"))

    @property
    def reason(self) -> str:
        return str((self.status.get("trust") or {}).get("reason"))
