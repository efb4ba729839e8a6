"""A simulated member (software-held keys, tests/softtpm.py) writes what a member on a real
swtpm writes: the same fields in the same encodings, an AK public area that differs only in
its key, TPMS_ATTEST and TPMT_SIGNATURE of the same layout; both enrol and verify under one
policy, and only the policy that holds the software CA admits the simulated one.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from gtvp.core.tpm_wire import parse_attest, parse_public, parse_signature
from gtvp_agent.tpm import Tpm
from gtvp_local.swtpm import Swtpm, SwtpmCA
from tests.softmember import AgentMember, policy_trusting
from tests.softtpm import SoftCA, SoftTpm

pytestmark = pytest.mark.tpm


def _t1() -> dt.datetime:
    """Behind the agent's clock (every answerAfter has passed), within the EK certificates'
    skew of the TPM made in the test: taken when the test runs (a module-level time was
    20 minutes old by the time a full run reached this module, before the certificates)."""
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2)


def _shape(value: Any) -> Any:
    """The fields and types of what the agent wrote (values left out)."""
    if isinstance(value, Mapping):
        return {k: _shape(v) for k, v in value.items() if k != "pcrValues"}
    return type(value).__name__


def _b64(agent: Mapping[str, Any], part: str, field: str) -> bytes:
    return base64.b64decode(agent[part][field])


def test_soft_and_real_members_write_the_same_format(
    make_tpm: Callable[..., Swtpm], swtpm_ca: SwtpmCA, tpm_dir: Path
) -> None:
    swtpm = make_tpm()  # (the swtpm CA issues its certificates with the first TPM)
    soft_ca = SoftCA()
    policy = policy_trusting(swtpm_ca.bundle_pem(), soft_ca.bundle_pem())
    with Tpm.open(swtpm.tcti, tpm_dir / "agent-format") as t:
        real = AgentMember(t, policy, name="real")
        soft = AgentMember(SoftTpm(soft_ca), policy, name="soft")
        for m in (real, soft):
            step = m.enrol(_t1())
            assert (m.phase, step.outcome) == ("Trusted", "Verified"), m.status.get("trust")
            m.agent_step()  # the next quote, not yet judged
    r, s = real.status["agent"], soft.status["agent"]
    assert _shape(r) == _shape(s)
    assert list(r["evidence"]["pcrValues"]) == list(s["evidence"]["pcrValues"])
    # the AK: the agent's template, only the key differs (x and y, the last 68 bytes)
    real_ak, soft_ak = _b64(r, "enrollment", "akPublic"), _b64(s, "enrollment", "akPublic")
    assert len(real_ak) == len(soft_ak)
    assert real_ak[:-68] == soft_ak[:-68]
    assert len(r["enrollment"]["akName"]) == len(s["enrollment"]["akName"])
    # the quote: same layout and sizes, same PCR selection, same firmware version
    ra, sa = (parse_attest(_b64(a, "evidence", "attest")) for a in (r, s))
    assert len(_b64(r, "evidence", "attest")) == len(_b64(s, "evidence", "attest"))
    assert (ra.magic, ra.type, ra.pcr_selections, ra.firmware_version, ra.safe) == (
        sa.magic,
        sa.type,
        sa.pcr_selections,
        sa.firmware_version,
        sa.safe,
    )
    assert (len(ra.qualified_signer), len(ra.extra_data)) == (
        len(sa.qualified_signer),
        len(sa.extra_data),
    )
    rsig, ssig = (_b64(a, "evidence", "signature") for a in (r, s))
    assert len(rsig) == len(ssig)
    assert (parse_signature(rsig).scheme, parse_signature(rsig).hash_alg) == (
        parse_signature(ssig).scheme,
        parse_signature(ssig).hash_alg,
    )
    # the EKs: real swtpm's RSA-2048 (the agent's default), the soft one's ECC P-256 (TCG
    # low-range template L-2): both endorsement keys the operator accepts from any TPM
    assert (
        parse_public(_b64(r, "enrollment", "ekPublic")).type
        != parse_public(_b64(s, "enrollment", "ekPublic")).type
    )


def test_only_a_policy_holding_the_software_ca_admits_a_simulated_member(
    make_tpm: Callable[..., Swtpm], swtpm_ca: SwtpmCA, tpm_dir: Path
) -> None:
    swtpm = make_tpm()
    swtpm_only = policy_trusting(swtpm_ca.bundle_pem())
    soft = AgentMember(SoftTpm(SoftCA()), swtpm_only, name="soft")
    assert soft.enrol(_t1()).outcome == "EkCertificateUntrusted"
    with Tpm.open(swtpm.tcti, tpm_dir / "agent-swtpm-only") as t:
        real = AgentMember(t, swtpm_only, name="real")
        assert real.enrol(_t1()).outcome == "Verified"
