"""The pure attestation cycle driven with a real TPM: enrol, activate, quote, expire, recover.

`attestation_step` is a pure function; here its inputs are what a real agent on a real
swtpm produces, and the member status is carried from one step to the next as the API
server would store it (operator fields replaced, agent fields merged).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml

from gtvp.core.attestation import ENTROPY_BYTES, Step, attestation_step
from gtvp.core.enrolment import ek_facts
from gtvp.core.policy import parse_policy
from gtvp.core.timestamps import format_ts, parse_ts
from gtvp_agent.tpm import Tpm
from gtvp_local.pool import pool_policy
from gtvp_local.swtpm import Swtpm, SwtpmCA

pytestmark = pytest.mark.tpm

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


class Member:
    """A Member as the API server would hold it, with an agent on a real TPM."""

    def __init__(
        self,
        tpm: Swtpm,
        state: Path,
        ca: SwtpmCA,
        identity: int = 3,
        ek: str = "rsa",
        ak: str = "ecc",
    ) -> None:
        self.tpm, self.state = tpm, state
        self.ek_type, self.ak_type = ek, ak
        self.spec: dict[str, Any] = {"identity": identity}
        self.status: dict[str, Any] = {}
        self.policy = parse_policy(
            "default", pool_policy(ca, interval="10s", valid_for="30s")["spec"]
        )
        self.answered: set[bytes] = set()
        self.ek_holders: dict[str, str] = {}  # EKs other members are bound to
        self.labels: dict[str, str] = {}  # its Node's labels

    def operator(self, now: dt.datetime) -> Step:
        step = attestation_step(
            spec=self.spec,
            status=self.status,
            labels=self.labels,
            policy=self.policy,
            now=now,
            entropy=secrets.token_bytes(ENTROPY_BYTES),
            answered_nonces=frozenset(self.answered),
            ek_holders=self.ek_holders,
        )
        _as_stored(step.status)
        self.status = {**step.status, "agent": self.status.get("agent", {})}
        if step.answered_nonce:
            self.answered.add(step.answered_nonce)
        return step

    def ask(self, now: dt.datetime) -> None:
        """The operator at `now`, when the next quote is due: it publishes the nonce (a nonce
        is never out before then)."""
        self.operator(now)
        assert (self.status.get("challenge") or {}).get("nonce"), self.status.get("challenge")

    def agent(self, *, quote: bool = True) -> None:
        agent = self.status.setdefault("agent", {})
        ch = self.status.get("challenge") or {}
        with Tpm.open(self.tpm.tcti, self.state, ek_type=self.ek_type, ak_type=self.ak_type) as t:
            en = t.enrolment()
            agent.setdefault("enrollment", {}).update(
                ekPublic=base64.b64encode(en.ek_public).decode(),
                ekCertificate=base64.b64encode(en.ek_certificate or b"").decode(),
                akPublic=base64.b64encode(en.ak_public).decode(),
                akName=en.ak_name.hex(),
            )
            cred = ch.get("credential")
            if cred and cred.get("akName") == en.ak_name.hex():  # as the real agent does
                secret = t.activate_credential(
                    base64.b64decode(cred["credentialBlob"]), base64.b64decode(cred["secret"])
                )
                agent["enrollment"]["activation"] = {
                    "challengeId": cred["id"],
                    "secret": base64.b64encode(secret).decode(),
                }
            if quote and ch.get("nonce"):
                q = t.quote(bytes.fromhex(ch["nonce"]), ch["pcrBank"], ch["pcrs"])
                agent["evidence"] = {
                    "nonce": ch["nonce"],
                    "attest": base64.b64encode(q.attest).decode(),
                    "signature": base64.b64encode(q.signature).decode(),
                    "pcrBank": q.pcr_bank,
                    "pcrValues": {str(p): v.hex() for p, v in q.pcr_values.items()},
                }

    @property
    def phase(self) -> str:
        return str(self.status.get("phase"))

    @property
    def reason(self) -> str:
        return str((self.status.get("trust") or {}).get("reason"))


def _as_stored(status: dict[str, Any]) -> None:
    """The operator's status is what the API server stores: plain JSON and YAML values (the
    phase and the verdict are written as strings, not as core's StrEnums)."""
    assert type(status["phase"]) is str
    assert type((status.get("trust") or {}).get("verdict", "")) is str
    assert yaml.safe_load(yaml.safe_dump(status)) == json.loads(json.dumps(status)) == status


def _enrolled(
    tpm: Swtpm,
    tpm_dir: Path,
    ca: SwtpmCA,
    name: str,
    ek: str = "rsa",
    ak: str = "ecc",
    *,
    identity: int = 3,
) -> Member:
    m = Member(tpm, tpm_dir / f"agent-{name}", ca, identity=identity, ek=ek, ak=ak)
    assert m.operator(T0).phase == "Pending"
    m.agent()
    assert m.operator(T0).phase == "Enrolling"  # credential challenge issued
    m.agent()
    step = m.operator(T0)
    assert step.phase == "Enrolling"
    assert [e.reason for e in step.events] == ["AkBound"]
    m.agent()
    step = m.operator(T0 + dt.timedelta(seconds=1))
    assert m.phase == "Trusted", m.status.get("trust")
    return m


def test_member_enrols_and_becomes_trusted_at_its_level(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "a")
    assert m.status["level"] == 3
    trust = m.status["trust"]
    assert trust["usesLeft"] == 50
    assert trust["expiresAt"] == "2030-01-01T00:00:30Z"  # validFor after the nonce was issued
    # the next quote: within the second half of the interval (members drift apart)
    answer_after = m.status["challenge"]["answerAfter"]
    assert "2030-01-01T00:00:06Z" <= answer_after <= "2030-01-01T00:00:11Z"
    ready = {c["type"]: c["status"] for c in m.status["conditions"]}
    assert ready == {"Ready": "True", "Enrolled": "True", "Attested": "True"}


def test_verdict_expires_without_a_fresh_quote(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "b")
    step = m.operator(T0 + dt.timedelta(seconds=29))
    assert m.phase == "Trusted"
    assert step.recheck_after <= dt.timedelta(seconds=1)  # look again right at expiry
    m.operator(T0 + dt.timedelta(seconds=31))
    assert (m.phase, m.reason) == ("Untrusted", "VerdictExpired")
    assert m.status["level"] == 0


def test_tampered_member_turns_untrusted_and_recovers_only_by_a_clean_quote(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    tpm = make_tpm()
    m = _enrolled(tpm, tpm_dir, swtpm_ca, "c")
    with Tpm.open(tpm.tcti, m.state) as t:
        t.extend_pcr(4, b"unsigned kernel")
    m.ask(T0 + dt.timedelta(seconds=12))
    m.agent()
    m.operator(T0 + dt.timedelta(seconds=12))
    assert (m.phase, m.reason) == ("Untrusted", "PcrMismatch")
    assert "PCR 4" in m.status["trust"]["message"]
    m.ask(T0 + dt.timedelta(seconds=20))
    m.agent()  # every later quote shows the same PCR: it stays Untrusted
    step = m.operator(T0 + dt.timedelta(seconds=20))
    assert (m.reason, step.outcome) == ("PcrMismatch", "PcrMismatch")


def test_replayed_evidence_is_refused(make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA) -> None:
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "d")
    old = dict(m.status["agent"]["evidence"])
    m.ask(T0 + dt.timedelta(seconds=12))
    # a compromised agent claims the new nonce but sends the old, genuine quote
    m.status["agent"]["evidence"] = {**old, "nonce": m.status["challenge"]["nonce"]}
    m.operator(T0 + dt.timedelta(seconds=12))
    assert (m.phase, m.reason) == ("Untrusted", "NonceReplayed")


def test_ek_swapped_under_a_known_member_is_refused_until_approved(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "e")
    m.tpm = make_tpm()  # the host now presents another TPM
    m.agent()
    m.operator(T0 + dt.timedelta(seconds=12))
    assert (m.phase, m.reason) == ("Untrusted", "EkChanged")
    assert m.status["challenge"] == {}  # nothing is asked of an unknown TPM
    new_fp = m.status["trust"]["message"].split("approve it: ")[1]
    assert "ekSHA256" in new_fp
    from gtvp.core.enrolment import ek_fingerprint
    from gtvp.core.tpm_wire import parse_public

    fp = ek_fingerprint(parse_public(base64.b64decode(m.status["agent"]["enrollment"]["ekPublic"])))
    m.spec["approval"] = {"ekSHA256": fp, "approvedBy": "admin"}
    m.operator(T0 + dt.timedelta(seconds=13))  # approved: a new credential challenge
    m.agent()
    m.operator(T0 + dt.timedelta(seconds=14))  # AK of the new TPM bound
    assert _asks_soon(m)  # its first quote: 5 s after the last judgement, not at once
    assert _due(m) > T0 + dt.timedelta(seconds=14)
    _quote_when_asked(m)
    assert m.phase == "Trusted"
    assert m.status["trust"]["ekSHA256"] == fp


def test_a_revoked_ek_is_refused_and_untrusts_its_member(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    """A TPM whose EK key leaked (its certificate still chains to the vendor's CA): listed in
    ekTrust.revokedEKs, its member is Untrusted at the next look, key release refuses the
    standing verdict from the edit on, an approval does not bring it back, and a fresh
    enrolment with that TPM is refused before any credential challenge."""
    from gtvp.core.attestation import references_revoked

    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "revoked")
    fp = m.status["trust"]["ekSHA256"]
    spec = _policy_spec(swtpm_ca)
    spec["ekTrust"]["revokedEKs"] = [fp, "ab" * 32]
    m.policy = parse_policy("default", spec)
    assert references_revoked(m.status["trust"], m.policy) == (
        "the policy revokes this member's EK (spec.ekTrust.revokedEKs)"
    )
    m.agent()
    m.operator(T0 + dt.timedelta(seconds=2))
    assert (m.phase, m.reason) == ("Untrusted", "EkRevoked")
    assert fp in m.status["trust"]["message"]
    assert m.status["challenge"] == {}  # nothing is asked of a revoked TPM
    m.spec["approval"] = {"ekSHA256": fp, "approvedBy": "admin"}
    m.agent()
    m.operator(T0 + dt.timedelta(seconds=3))
    assert (m.phase, m.reason) == ("Untrusted", "EkRevoked")
    fresh = Member(m.tpm, tpm_dir / "agent-revoked-again", swtpm_ca)
    fresh.policy = m.policy
    fresh.agent()
    fresh.operator(T0)
    assert (fresh.phase, fresh.reason) == ("Untrusted", "EkRevoked")
    # the entry taken out (listed by mistake): a clean quote brings the member back
    m.policy = parse_policy("default", _policy_spec(swtpm_ca))
    for t in range(4, 12):
        m.agent()
        m.operator(T0 + dt.timedelta(seconds=t))
    assert m.phase == "Trusted", m.status["trust"]


def test_with_require_approval_only_an_approved_ek_is_bound(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    """ekTrust.requireApproval: a new member's certified EK is not pinned on first use (root
    on a host could relay its first enrolment to a clean machine of its own); it waits,
    Untrusted, for an administrator's approval of that very key, and a member bound before
    the option needs one too (no readmission: a step to do, not tampering)."""
    spec = _policy_spec(swtpm_ca)
    spec["ekTrust"]["requireApproval"] = True
    strict = parse_policy("default", spec)
    bound = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "bound")
    fp = bound.status["trust"]["ekSHA256"]
    bound.policy = strict
    bound.agent()
    bound.operator(T0 + dt.timedelta(seconds=2))
    assert (bound.phase, bound.reason) == ("Untrusted", "EkNotApproved")
    assert fp in bound.status["trust"]["message"]
    assert not bound.status["trust"].get("awaitingReadmission")
    fresh = Member(make_tpm(), tpm_dir / "agent-new", swtpm_ca)
    fresh.policy = strict
    fresh.spec["approval"] = {"ekSHA256": fp, "approvedBy": "admin"}  # another TPM's key
    fresh.agent()
    fresh.operator(T0)
    assert (fresh.phase, fresh.reason) == ("Untrusted", "EkNotApproved")
    assert fresh.status["challenge"] == {}  # nothing asked before the approval
    assert "ekSHA256" not in fresh.status["trust"]  # and nothing pinned
    presented = fresh.status["agent"]["enrollment"]["ekPublic"]
    fresh_fp = ek_facts(base64.b64decode(presented)).fingerprint
    for m, own in ((bound, fp), (fresh, fresh_fp)):
        m.spec["approval"] = {"ekSHA256": own, "approvedBy": "admin"}
        for t in range(3, 9):
            m.agent()
            m.operator(T0 + dt.timedelta(seconds=t))
        assert m.phase == "Trusted", m.status["trust"]


def test_agent_answer_with_wrong_secret_fails_activation(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    m = Member(make_tpm(), tpm_dir / "agent-f", swtpm_ca)
    m.agent()
    m.operator(T0)
    m.agent()
    m.status["agent"]["enrollment"]["activation"]["secret"] = base64.b64encode(
        b"guessed" * 4
    ).decode()
    m.operator(T0)
    assert (m.phase, m.reason) == ("Untrusted", "ActivationFailed")
    assert m.status["challenge"]["credential"]  # a new challenge to try again


def test_reboot_is_reported_then_trusted_again(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    tpm = make_tpm()
    m = _enrolled(tpm, tpm_dir, swtpm_ca, "g")
    tpm.stop()
    tpm.start()
    m.ask(T0 + dt.timedelta(seconds=12))
    m.agent()
    m.operator(T0 + dt.timedelta(seconds=12))
    assert (m.phase, m.reason) == ("Untrusted", "Rebooted")
    assert m.status["challenge"]["answerAfter"] == "2030-01-01T00:00:12Z"  # re-asked at once
    m.agent()
    m.operator(T0 + dt.timedelta(seconds=13))
    assert m.phase == "Trusted"


def test_maintenance_takes_a_trusted_member_out(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "h")
    m.spec["maintenance"] = True
    m.operator(T0 + dt.timedelta(seconds=2))
    assert (m.phase, m.status["level"]) == ("Maintenance", 0)


@pytest.mark.parametrize(("ek", "ak"), [("ecc", "ecc"), ("rsa", "rsa"), ("ecc", "rsa")])
def test_every_ek_and_ak_type_enrols(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA, ek: str, ak: str
) -> None:
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, f"types-{ek}-{ak}", ek=ek, ak=ak)
    assert m.status["trust"]["reason"] == "QuoteVerified"


def test_restarted_agent_reuses_its_ak(make_tpm: Any, tpm_dir: Path) -> None:
    tpm = make_tpm()
    with Tpm.open(tpm.tcti, tpm_dir / "agent-reuse") as t:
        first = t.enrolment()
    tpm.stop()
    tpm.start()  # even across a TPM reboot the AK blobs load under the same EK
    with Tpm.open(tpm.tcti, tpm_dir / "agent-reuse") as t:
        again = t.enrolment()
    assert again.ak_name == first.ak_name
    assert again.ek_public == first.ek_public


def test_strict_level_waits_for_a_human_after_a_failure(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    tpm = make_tpm()
    m = _enrolled(tpm, tpm_dir, swtpm_ca, "strict")
    spec = pool_policy(swtpm_ca, interval="10s", valid_for="30s")["spec"]
    spec["levels"][2]["autoRecover"] = False  # level 3, this member's level
    m.policy = parse_policy("default", spec)
    m.ask(_due(m))  # the agent is down: nothing answers the nonce
    m.operator(T0 + dt.timedelta(seconds=40))  # verdict expired
    assert (m.phase, m.reason) == ("Untrusted", "VerdictExpired")
    assert "did not answer the nonce" in m.status["trust"]["message"]
    m.agent()  # the agent is back, but answers the nonce issued before it went away
    m.operator(T0 + dt.timedelta(seconds=41))
    assert (m.phase, m.reason) == ("Untrusted", "EvidenceTooLate")
    m.agent()  # a fresh nonce, answered in time: clean, but this level waits for a human
    m.operator(T0 + dt.timedelta(seconds=41))
    assert (m.phase, m.reason) == ("Untrusted", "AwaitingReadmission")
    assert "gtvp.io/readmit" in m.status["trust"]["message"]
    m.ask(_due(m))
    m.agent()
    step = attestation_step(
        spec=m.spec,
        status=m.status,
        labels={},
        policy=m.policy,
        now=_due(m),
        entropy=secrets.token_bytes(ENTROPY_BYTES),
        readmit="ticket-42",
    )
    assert step.phase == "Trusted"
    assert step.status["trust"]["readmitToken"] == "ticket-42"


def test_second_member_with_the_same_ek_is_refused(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    tpm = make_tpm()
    first = _enrolled(tpm, tpm_dir, swtpm_ca, "first")
    ek = first.status["trust"]["ekSHA256"]
    twin = Member(tpm, tpm_dir / "agent-twin", swtpm_ca)
    twin.ek_holders = {ek: "first"}
    twin.operator(T0)
    twin.agent()
    step = twin.operator(T0)
    assert twin.phase == "Untrusted"
    assert twin.reason == "DuplicateEk"
    assert "member first already presents this EK" in twin.status["trust"]["message"]
    assert [e.reason for e in step.events] == ["DuplicateEk"]
    assert not twin.status.get("challenge")  # no credential challenge for a duplicate
    # a load-test policy may allow it
    twin.policy = dataclasses.replace(twin.policy, allow_shared_ek=True)
    twin.operator(T0)
    twin.agent()
    twin.operator(T0)
    twin.ask(T0 + dt.timedelta(seconds=5))  # 5 s after the last judgement (DuplicateEk)
    twin.agent()
    twin.operator(T0 + dt.timedelta(seconds=5))
    assert twin.phase == "Trusted"


def test_no_nonce_is_out_before_its_time_so_none_is_quoted_ahead(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    """A nonce handed out with each verdict could be quoted at once from the boot the host is
    in and handed in, when due, from another boot (and an agent answering every nonce at
    once would have its quotes verified as fast as it writes them): the next nonce is
    published only when it is due, and the operator looks again right then."""
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "eager")
    before = dict(m.status["trust"])
    due = _due(m)
    assert "nonce" not in m.status["challenge"]
    m.agent()  # nothing to quote
    step = m.operator(due - dt.timedelta(seconds=1))
    assert "nonce" not in m.status["challenge"]
    assert step.recheck_after <= dt.timedelta(seconds=1)  # looked at again when due
    m.ask(due)
    assert m.status["challenge"]["issuedAt"] == format_ts(due)
    m.agent()
    step = m.operator(due + dt.timedelta(milliseconds=200))
    assert step.answered_nonce is not None
    assert m.status["trust"]["verifiedAt"] != before["verifiedAt"]
    assert m.phase == "Trusted"
    # after a failure the next nonce comes RETRY_AFTER_FAILURE later, not at once
    m.ask(_due(m))
    m.status["agent"]["evidence"] = {**m.status["agent"]["evidence"], "signature": "AAAA"}
    m.status["agent"]["evidence"]["nonce"] = m.status["challenge"]["nonce"]
    failed_at = _due(m) + dt.timedelta(seconds=1)
    m.operator(failed_at)
    assert m.phase == "Untrusted"
    assert "nonce" not in m.status["challenge"]
    assert _due(m) == failed_at + dt.timedelta(seconds=5)


def test_a_nonce_an_older_operator_published_ahead_is_asked_again_when_due(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    """After an upgrade, a nonce an older gtvp published with its verdict, an interval ahead,
    may have been quoted at once and kept: it is withdrawn, and a fresh one asked when due."""
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "upgraded")
    due = _due(m)
    m.status["challenge"].update(nonce="ab" * 32, issuedAt=format_ts(T0 + dt.timedelta(seconds=1)))
    m.agent()  # quoted at once
    assert m.status["agent"]["evidence"]["nonce"] == "ab" * 32
    step = m.operator(due)
    assert step.answered_nonce is None  # not judged
    fresh = m.status["challenge"]["nonce"]
    assert fresh != "ab" * 32
    assert m.status["challenge"]["issuedAt"] == format_ts(due)
    m.agent()
    step = m.operator(due + dt.timedelta(seconds=1))
    assert step.answered_nonce == bytes.fromhex(fresh)
    assert m.phase == "Trusted"


def test_an_expiry_no_nonce_was_asked_for_holds_no_one(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    """A verdict that expires because the operator published no nonce in time (down, or the
    API server was) is the operator's doing: VerdictExpired, but on a level without
    autoRecover no human is needed once a fresh quote verifies."""
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "unasked")
    spec = pool_policy(swtpm_ca, interval="10s", valid_for="30s")["spec"]
    spec["levels"][2]["autoRecover"] = False  # level 3, this member's level
    m.policy = parse_policy("default", spec)
    m.operator(T0 + dt.timedelta(seconds=40))  # the first look since the verdict
    assert (m.phase, m.reason) == ("Untrusted", "VerdictExpired")
    assert "no nonce was asked for in time" in m.status["trust"]["message"]
    assert not m.status["trust"].get("awaitingReadmission")
    m.agent()  # the nonce published in that same look
    m.operator(T0 + dt.timedelta(seconds=41))
    assert m.phase == "Trusted"


def test_a_policy_edit_adding_a_pcr_asks_for_it_at_once_and_judges_no_quote_without_it(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "edit")
    m.agent()  # a quote of the selection asked for before the edit
    spec = _policy_spec(swtpm_ca)
    spec["pcrSelection"]["pcrs"] = [*spec["pcrSelection"]["pcrs"], 8]
    spec["memberClasses"][0]["goldenPCRs"]["8"] = "00" * 32
    m.policy = parse_policy("default", spec)
    now = _due(m)
    step = m.operator(now)
    assert step.answered_nonce is None  # the old selection's quote is not judged
    assert 8 in m.status["challenge"]["pcrs"]
    # asked within half an interval (not the whole pool at once)
    assert _due(m) <= now + dt.timedelta(seconds=5)
    m.agent()
    step = m.operator(_due(m))
    assert step.answered_nonce is not None
    assert m.phase == "Trusted"


def test_an_activation_presented_with_another_members_ek_binds_nothing(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    """Root on host A enrols with its own EK and AK, activates the credential in its own TPM,
    then publishes an honest new host B's EK (public area and certificate, readable in B's
    Member) with that proof, before B is bound: the proof answers a credential made for A's
    EK, so it binds nothing here (it would pin B's EK to A's Member and lock B out as a
    duplicate), and B enrols to Trusted."""
    attacker = Member(make_tpm(), tpm_dir / "agent-a", swtpm_ca)
    attacker.operator(T0)
    attacker.agent()
    assert attacker.operator(T0).phase == "Enrolling"  # a credential for A's AK under A's EK
    attacker.agent()  # activated in A's own TPM: the proof is in A's status
    honest = Member(make_tpm(), tpm_dir / "agent-b", swtpm_ca)
    honest.operator(T0)
    honest.agent()  # B's enrolment, as its Member shows it to anyone who may read Members
    copied = honest.status["agent"]["enrollment"]
    mine = attacker.status["agent"]["enrollment"]
    mine.update(ekPublic=copied["ekPublic"], ekCertificate=copied["ekCertificate"])
    step = attacker.operator(T0)
    assert "AkBound" not in [e.reason for e in step.events]
    assert not (attacker.status.get("trust") or {}).get("ekSHA256")  # nothing pinned
    assert attacker.phase != "Trusted"
    cred = attacker.status["challenge"]["credential"]  # a new one, for B's EK: A cannot answer
    assert cred["ekSHA256"] != (honest.status.get("trust") or {}).get("ekSHA256", "")
    # the honest host, judged with every EK other members are bound to, is not a duplicate
    honest.ek_holders = {
        str(h): n for n, h in (("a", (attacker.status.get("trust") or {}).get("ekSHA256")),) if h
    }
    honest.operator(T0)
    honest.agent()
    honest.operator(T0)
    honest.agent()
    honest.operator(T0 + dt.timedelta(seconds=1))
    assert honest.phase == "Trusted", honest.status.get("trust")


def test_evidence_that_arrives_after_validfor_asks_again_at_once(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "late")
    m.ask(T0 + dt.timedelta(seconds=10))
    m.agent()  # answers the nonce issued at T0+10s (validFor 30s)
    late = T0 + dt.timedelta(seconds=45)
    step = m.operator(late)
    assert m.phase == "Untrusted"
    assert m.reason == "EvidenceTooLate"
    assert "issued 35s ago" in m.status["trust"]["message"]
    assert [e.reason for e in step.events] == ["EvidenceTooLate"]
    assert m.status["challenge"]["answerAfter"] == "2030-01-01T00:00:45Z"  # at once
    assert not m.status["trust"].get("awaitingReadmission")
    m.agent()
    m.operator(late + dt.timedelta(seconds=1))
    assert m.phase == "Trusted"


# ----- an agent that tries to freeze its member out of expiry (issue: the guarantee) ------------


def test_agent_withdrawing_its_enrolment_loses_the_verdict_at_once(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "withdraw")
    # the node's own agent identity may write status.agent: it patches its enrolment and
    # evidence to null (a merge patch: the API server then holds neither)
    m.status["agent"] = {}
    step = m.operator(T0 + dt.timedelta(seconds=2))
    assert (m.phase, m.reason) == ("Untrusted", "EnrolmentChanged")
    assert m.status["level"] == 0
    assert [e.reason for e in step.events] == ["EnrolmentChanged"]
    assert m.status["trust"]["ekSHA256"]  # the EK pin stays; only the AK must be bound anew
    # paused for good: it never drifts back to Pending, and nothing is left to expire
    m.operator(T0 + dt.timedelta(seconds=300))
    assert m.phase == "Untrusted"
    # the same TPM enrols again: credential activation, then a fresh quote
    m.agent()
    m.operator(T0 + dt.timedelta(seconds=301))
    m.agent()
    m.operator(T0 + dt.timedelta(seconds=302))
    assert m.phase == "Untrusted"  # bound again, still waiting for a quote
    m.agent()
    m.operator(T0 + dt.timedelta(seconds=303))
    assert m.phase == "Trusted"


def test_agent_publishing_a_software_ak_loses_the_verdict_at_once(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    from tests.tpmkit import soft_ak

    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "softak")
    _key, ak = soft_ak()
    enrollment = m.status["agent"]["enrollment"]
    enrollment["akPublic"] = base64.b64encode(
        len(ak.marshalled).to_bytes(2, "big") + ak.marshalled
    ).decode()
    enrollment["akName"] = ak.name.hex()
    step = m.operator(T0 + dt.timedelta(seconds=2))
    assert (m.phase, m.reason) == ("Untrusted", "EnrolmentChanged")
    assert [e.reason for e in step.events] == ["EnrolmentChanged"]
    assert m.status["challenge"]["credential"]["akName"] == ak.name.hex()
    # the software key can never activate the credential (only the EK's TPM can): it stays
    # Untrusted however long it waits, and expiry has nothing left to protect
    for seconds in (10, 40, 400):
        m.operator(T0 + dt.timedelta(seconds=seconds))
        assert m.phase == "Untrusted"


def test_expiry_applies_while_the_agent_withholds_evidence(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "withhold")
    del m.status["agent"]["evidence"]  # enrolment kept, evidence withheld
    m.operator(T0 + dt.timedelta(seconds=29))
    assert m.phase == "Trusted"
    step = m.operator(T0 + dt.timedelta(seconds=31))
    assert (m.phase, m.reason) == ("Untrusted", "VerdictExpired")
    assert [e.reason for e in step.events] == ["VerdictExpired"]


def test_the_same_failing_quote_is_one_event_not_one_a_cycle(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    tpm = make_tpm()
    m = _enrolled(tpm, tpm_dir, swtpm_ca, "repeat")
    with Tpm.open(tpm.tcti, m.state) as t:
        t.extend_pcr(4, b"unsigned kernel")
    reasons: list[str] = []
    outcomes: list[str | None] = []
    for i in range(4):
        now = T0 + dt.timedelta(seconds=12 + 6 * i)
        m.ask(now)
        m.agent()
        step = m.operator(now)
        reasons += [e.reason for e in step.events]
        outcomes.append(step.outcome)
        assert m.reason == "PcrMismatch"
    assert outcomes == ["PcrMismatch"] * 4  # judged each time
    assert reasons == ["PcrMismatch"]


# ----- the member class: resolved, or no verdict at all --------------------------------------


def _policy_spec(ca: SwtpmCA) -> dict[str, Any]:
    spec: dict[str, Any] = pool_policy(ca, interval="10s", valid_for="30s")["spec"]
    return spec


def test_a_member_whose_class_is_unknown_is_never_trusted(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    # a typo in spec.memberClass would mean no golden values and no event-log requirement:
    # any self-consistent event log (a modified bootloader's real one) would "replay"
    m = Member(make_tpm(), tpm_dir / "agent-typo", swtpm_ca)
    m.spec["memberClass"] = "typo"
    seen = []
    for i in range(6):
        step = m.operator(T0 + dt.timedelta(seconds=i))
        seen.append(m.phase)
        assert step.outcome in (None, "UnknownMemberClass")
        assert m.status["level"] == 0
        m.agent()
    assert "Trusted" not in seen
    assert (m.phase, m.reason) == ("Untrusted", "UnknownMemberClass")
    message = m.status["trust"]["message"]
    assert "'typo'" in message
    assert "swtpm" in message  # the classes the policy has
    ready = {c["type"]: c["reason"] for c in m.status["conditions"]}
    assert ready["Ready"] == "UnknownMemberClass"
    # fixed: it enrols and is judged under the class it names
    m.spec["memberClass"] = "swtpm"
    m.operator(T0 + dt.timedelta(seconds=6))
    assert (m.phase, m.reason) == ("Untrusted", "AwaitingQuote")  # no stale refusal
    for i in range(6, 10):
        m.operator(T0 + dt.timedelta(seconds=i))
        m.agent()
    assert m.phase == "Trusted", m.status["trust"]


def test_a_policy_without_a_default_class_leaves_classless_members_untrusted(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "nodefault")
    spec = _policy_spec(swtpm_ca)
    del spec["defaultMemberClass"]  # optional in the CRD
    m.policy = parse_policy("default", spec)
    step = m.operator(T0 + dt.timedelta(seconds=2))  # at once, not at the next quote
    assert (m.phase, m.reason) == ("Untrusted", "UnknownMemberClass")
    assert m.status["level"] == 0
    assert [e.reason for e in step.events] == ["UnknownMemberClass"]
    assert "no defaultMemberClass" in m.status["trust"]["message"]
    m.agent()  # a quote that would verify is not judged
    before = {k: v for k, v in m.status.items() if k != "agent"}
    step = m.operator(T0 + dt.timedelta(seconds=3))
    assert (m.phase, m.reason) == ("Untrusted", "UnknownMemberClass")
    assert step.answered_nonce is None
    assert step.outcome is None
    assert step.events == ()  # one event, not one a cycle
    assert {k: v for k, v in m.status.items() if k != "agent"} == before  # nothing to write


def test_a_class_removed_by_a_policy_edit_turns_its_members_untrusted(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "renamed")
    m.spec["memberClass"] = "swtpm"
    m.operator(T0 + dt.timedelta(seconds=2))
    assert m.phase == "Trusted"
    spec = _policy_spec(swtpm_ca)
    spec["memberClasses"][0]["name"] = "swtpm-v2"  # renamed: the member still names swtpm
    spec["defaultMemberClass"] = "swtpm-v2"
    spec["levels"][2]["autoRecover"] = False  # a configuration slip is no tampering
    m.policy = parse_policy("default", spec)
    m.operator(T0 + dt.timedelta(seconds=3))
    assert (m.phase, m.reason) == ("Untrusted", "UnknownMemberClass")
    assert "'swtpm'" in m.status["trust"]["message"]
    assert "swtpm-v2" in m.status["trust"]["message"]
    assert not m.status["trust"].get("awaitingReadmission")
    m.spec["memberClass"] = "swtpm-v2"
    # fixed: a quote is asked for as soon as may be (5 s after the last judgement, at 3 s),
    # not at the next routine interval (10 s here)
    m.operator(T0 + dt.timedelta(seconds=4))
    assert (m.phase, m.reason) == ("Untrusted", "AwaitingQuote")
    assert _due(m) == T0 + dt.timedelta(seconds=8)
    m.ask(T0 + dt.timedelta(seconds=8))
    m.agent()
    m.operator(T0 + dt.timedelta(seconds=8))
    assert m.phase == "Trusted", m.status["trust"]


# ----- a new level or class needs a quote judged under it ---------------------------------


def _due(m: Member) -> dt.datetime:
    """When the outstanding nonce may be answered (its answerAfter)."""
    due = parse_ts(m.status["challenge"]["answerAfter"])
    assert due is not None
    return due


def _asks_soon(m: Member) -> bool:
    """Whether the next quote is asked for as soon as may be: no later than 5 s (the floor
    against asking without pause) after the last judgement, not at the routine interval."""
    last = parse_ts(m.status["trust"]["verifiedAt"])
    assert last is not None
    return _due(m) <= last + dt.timedelta(seconds=5)


def _quote_when_asked(m: Member) -> dt.datetime:
    """The operator publishes the nonce when due, the agent quotes it, it is judged."""
    due = _due(m)
    m.ask(due)
    m.agent()
    m.operator(due)
    return due


def test_a_raised_identity_applies_only_after_a_fresh_quote(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "raise", identity=2)
    assert m.status["level"] == 2
    expires = m.status["trust"]["expiresAt"]
    m.spec["identity"] = 3
    now = T0 + dt.timedelta(seconds=2)
    m.operator(now)
    assert (m.phase, m.status["level"]) == ("Trusted", 2)  # the verdict was judged at 2
    assert (m.status["trust"]["memberClass"], m.status["trust"]["level"]) == ("swtpm", 2)
    assert m.status["trust"]["expiresAt"] == expires
    assert _asks_soon(m)  # a fresh quote as soon as may be
    assert m.status["effectivePolicy"]["level"] == 3
    m.operator(now + dt.timedelta(seconds=1))  # still no quote: still 2
    assert m.status["level"] == 2
    _quote_when_asked(m)
    assert (m.phase, m.status["level"]) == ("Trusted", 3)
    assert m.status["trust"]["level"] == 3


def test_a_node_label_raising_the_level_waits_for_a_fresh_quote(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "label")
    spec = _policy_spec(swtpm_ca)
    label = "node-restriction.kubernetes.io/hardware"
    spec["transitions"] = [{"matchLabels": {label: "confidential"}, "level": 3}]
    m.policy = parse_policy("default", spec)  # a policy edit lowers it at once
    m.operator(T0 + dt.timedelta(seconds=2))
    assert (m.phase, m.status["level"]) == ("Trusted", 1)
    due = _quote_when_asked(m)  # judged at level 1 now
    assert m.status["level"] == 1
    assert m.status["trust"]["level"] == 1
    m.labels = {label: "confidential"}
    now = due + dt.timedelta(seconds=1)
    m.operator(now)
    assert (m.phase, m.status["level"]) == ("Trusted", 1)
    assert m.status["trust"]["level"] == 1
    assert _asks_soon(m)
    _quote_when_asked(m)
    assert (m.phase, m.status["level"]) == ("Trusted", 3)


def test_a_lower_level_applies_at_once_and_the_judged_one_may_come_back(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "lower")
    answer_after = m.status["challenge"]["answerAfter"]
    m.spec["identity"] = 1
    m.operator(T0 + dt.timedelta(seconds=2))
    assert (m.phase, m.status["level"]) == ("Trusted", 1)
    assert m.status["challenge"]["answerAfter"] == answer_after  # no quote needed
    assert m.status["trust"]["level"] == 3
    m.spec["identity"] = 3  # back to the level the verdict was judged at
    m.operator(T0 + dt.timedelta(seconds=3))
    assert (m.phase, m.status["level"]) == ("Trusted", 3)


def test_a_new_class_is_judged_by_a_fresh_quote(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "reclass")
    spec = _policy_spec(swtpm_ca)
    golden = {str(p): "00" * 32 for p in spec["pcrSelection"]["pcrs"]}
    strict = {"name": "strict", "goldenPCRs": {**golden, "0": "11" * 32}}  # this PCR 0 is zero
    spec["memberClasses"].append(strict)
    spec["levels"][0]["attestation"] = {"interval": "20s", "validFor": "60s", "maxUses": 50}
    m.policy = parse_policy("default", spec)
    m.spec["memberClass"] = "strict"
    m.spec["identity"] = 1  # a lower level, but under a class its verdict was not judged by
    now = T0 + dt.timedelta(seconds=2)
    m.operator(now)
    assert (m.phase, m.status["level"]) == ("Trusted", 1)
    assert _asks_soon(m)
    _quote_when_asked(m)
    assert (m.phase, m.reason) == ("Untrusted", "PcrMismatch")


def test_a_verdict_from_before_the_judged_level_was_recorded_stands(
    make_tpm: Any, tpm_dir: Path, swtpm_ca: SwtpmCA
) -> None:
    m = _enrolled(make_tpm(), tpm_dir, swtpm_ca, "upgrade")
    answer_after = m.status["challenge"]["answerAfter"]
    del m.status["trust"]["memberClass"], m.status["trust"]["level"]  # an older operator's
    m.operator(T0 + dt.timedelta(seconds=2))
    assert (m.phase, m.status["level"]) == ("Trusted", 3)
    assert m.status["challenge"]["answerAfter"] == answer_after  # no disruption
    assert (m.status["trust"]["memberClass"], m.status["trust"]["level"]) == ("swtpm", 3)
