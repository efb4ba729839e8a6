"""The event log the agent sends fits the Member CRD: a larger one would make every
evidence write fail (the API server refuses the whole status), so the member could never
be judged; one beyond the bound is left out with a warning instead."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, cast

import yaml

from gtvp_agent.agent import MAX_EVENT_LOG, Agent, AgentConfig

CRD = Path(__file__).resolve().parents[2] / "crds" / "member.yaml"


def _crd_limit() -> int:
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    agent = schema["properties"]["status"]["properties"]["agent"]["properties"]
    return int(agent["evidence"]["properties"]["eventLog"]["maxLength"])


def _agent(log: Path) -> Agent:
    config = AgentConfig(node="n", tcti="swtpm:", state_dir=log.parent, event_log=log)
    return Agent(cast(Any, None), config)


def test_the_largest_event_log_sent_fits_the_crd(tmp_path: Path) -> None:
    log = tmp_path / "binary_bios_measurements"
    log.write_bytes(b"\x01" * MAX_EVENT_LOG)
    sent = _agent(log)._event_log()
    assert sent is not None
    assert len(base64.b64encode(sent)) <= _crd_limit()
    log.write_bytes(b"\x01" * (MAX_EVENT_LOG + 1))
    assert _agent(log)._event_log() is None
