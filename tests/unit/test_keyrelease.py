"""The key-release decision (gtvp.core.keyrelease) and the cloud-init it is wired through."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from gtvp.core import compose, ear
from gtvp.core import keyrelease as kr
from gtvp.core.attestation import relied_on
from gtvp.core.policy import Policy, parse_policy
from gtvp.core.trust import trust_selector
from tests.samples import sample_policy_spec

NOW = dt.datetime(2026, 12, 2, 1, 0, tzinfo=dt.UTC)
CRED = "c" * 43
OTHER = "o" * 43
KEY = ec.generate_private_key(ec.SECP256R1())
JWKS = ear.jwks([KEY.public_key()])
POLICY = parse_policy("default", sample_policy_spec())
CLASS, SET = "uefi-secureboot", "example-host-secureboot"
KERNEL = "registry.example/gtvp/linux@sha256:" + "1" * 64
VMI_SPEC: dict[str, Any] = {
    "domain": {
        "firmware": {
            "kernelBoot": {
                "container": {
                    "image": KERNEL,
                    "kernelPath": "/boot/vmlinuz",
                    "initrdPath": "/boot/initrd.img",
                    "imagePullPolicy": "IfNotPresent",
                },
                "kernelArgs": "console=ttyS0 gtvp.box=box gtvp.disks=c-app:" + "2" * 64,
            }
        }
    }
}
"""What the box's VMI boots: the composition gtvp made for it (`status.composedBoots`)."""
BOOTED = compose.composed_boot(VMI_SPEC, None, {"gtvp.io/level": "2"})
"""That composition's record, for the VMI gated at level 2 (its label)."""


def _member_status(level: int = 3, *, verdict: str = "Trusted", expires: dt.datetime | None = None):  # type: ignore[no-untyped-def]
    exp = expires or NOW + dt.timedelta(seconds=30)
    return {
        "phase": "Trusted" if verdict == "Trusted" else "Untrusted",
        "level": level if verdict == "Trusted" else 0,
        "trust": {
            "verdict": verdict,
            "reason": "QuoteVerified" if verdict == "Trusted" else "PcrMismatch",
            "expiresAt": exp.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    }


def _token(member: str, status: dict[str, Any]) -> str:
    claims = ear.verdict_claims(
        member=member,
        status=status,
        policy=None,
        now=NOW,
        audience="gtvp",
        issuer=ear.cluster_issuer("test"),
        build="test",
        lifetime=dt.timedelta(seconds=30),
    )
    return ear.sign(claims, KEY)


def _facts(
    *,
    node: str = "m1",
    member: dict[str, Any] | None = None,
    token_member: str = "m1",  # noqa: S107 - a member name
    token: str | None = None,
    issued: dict[str, str] | None = None,
    phase: str = "Running",
    pods_on: dict[str, dict[str, Any] | None] | None = None,
    vmi_labels: dict[str, str] | None = None,
    policy: Policy | None = POLICY,
    vmi_spec: dict[str, Any] | None = None,
    composed: list[str] | None = None,
    composed_at: str | None = None,
) -> tuple[kr.Request, kr.Facts]:
    status = member if member is not None else _member_status()
    labels = {"gtvp.io/level": "2"} if vmi_labels is None else vmi_labels
    tok = token if token is not None else _token(token_member, _member_status())
    req = kr.Request("ns", "box", CRED, tok)
    try:
        claims: Any = ear.verify(tok, JWKS, audience="gtvp", now=NOW)
        refusal = None
    except ear.TokenRefused as exc:
        claims, refusal = None, (exc.reason, str(exc))
    box = {
        "metadata": {"name": "box", "namespace": "ns"},
        "spec": {"level": 2, "secrets": [{"name": "disk", "keys": ["key"]}, {"name": "tls"}]},
        "status": {
            "composedBoots": composed if composed is not None else [BOOTED],
            "composedAt": composed_at,
        },
    }
    facts = kr.Facts(
        box=box,
        issued=issued if issued is not None else kr.issued_annotations(CRED, "t"),
        vmi={
            "metadata": {
                "name": "box",
                "labels": labels,
                "creationTimestamp": "2026-12-02T00:00:00Z",
            },
            "spec": VMI_SPEC if vmi_spec is None else vmi_spec,
            "status": {"phase": phase, "nodeName": node},
        },
        member={"metadata": {"name": node}, "status": status},
        pod_members={
            n: None if st is None else {"metadata": {"name": n}, "status": st}
            for n, st in (pods_on or {}).items()
        },
        claims=claims,
        token_refusal=refusal,
        policy=policy,
    )
    return req, facts


def test_a_box_vm_on_a_trusted_member_gets_the_secrets_its_box_names() -> None:
    req, facts = _facts()
    v = kr.decide(req, facts, NOW)
    assert v.released
    assert v.node == "m1"
    assert [n.name for n in v.secrets] == ["disk", "tls"]
    assert v.secrets[0].keys == ("key",)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"member": _member_status(verdict="Untrusted")}, kr.MEMBER_NOT_TRUSTED),
        ({"member": _member_status(expires=NOW - dt.timedelta(seconds=1))}, kr.VERDICT_EXPIRED),
        ({"member": _member_status(level=1)}, kr.LEVEL_TOO_LOW),
        ({"token_member": "m2"}, kr.TOKEN_OTHER_MEMBER),
        ({"phase": "Scheduling"}, kr.NOT_RUNNING),
        ({"issued": {}}, kr.NO_CREDENTIAL),
        ({"issued": kr.issued_annotations(OTHER, "t")}, kr.WRONG_CREDENTIAL),
    ],
)
def test_refusals(change: dict[str, Any], reason: str) -> None:
    req, facts = _facts(**change)
    v = kr.decide(req, facts, NOW)
    assert (v.released, v.reason) == (False, reason), v.message


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no such box", kr.NO_SUCH_BOX),
        ("a box naming no Secrets", kr.NOTHING_TO_RELEASE),
        ("no credential issued", kr.NO_CREDENTIAL),
        ("another credential", kr.WRONG_CREDENTIAL),
    ],
)
def test_a_refusal_before_the_credential_is_found_good_tells_nothing_of_the_box(
    case: str, reason: str
) -> None:
    """The reason is kept for the log, the metric and the box's Event; the requester is told
    only that the credential is not one gtvp issued (whoever guesses names learns nothing of
    which boxes exist, name Secrets or are armed)."""
    req, facts = _facts(issued=kr.issued_annotations(OTHER, "t") if "another" in case else None)
    if case == "no such box":
        facts = dataclasses.replace(facts, box=None)
    elif case == "a box naming no Secrets":
        box = dict(facts.box or {})
        facts = dataclasses.replace(facts, box={**box, "spec": {**box["spec"], "secrets": []}})
    elif case == "no credential issued":
        facts = dataclasses.replace(facts, issued={})
    verdict = kr.decide(req, facts, NOW)
    assert verdict.reason == reason, verdict.message
    assert kr.told(verdict) == (kr.WRONG_CREDENTIAL, kr.NOT_ISSUED)
    used = kr.decide(req, _asking_again(_consumed_by(RETRY), retry="")[1], NOW)
    assert kr.told(used)[0] == kr.CREDENTIAL_USED  # a credential gtvp issued: said so


def _judged(status: dict[str, Any]) -> dict[str, Any]:
    """`status` as the operator writes a verdict judged under the sample policy's class."""
    trust = {
        **status["trust"],
        "memberClass": CLASS,
        "referenceSet": SET,
        "references": relied_on(POLICY.member_classes[CLASS], SET),
    }
    return {**status, "trust": trust}


def _policy_with(edit: Any) -> Policy:
    spec = sample_policy_spec()
    edit(spec)
    return parse_policy("default", spec)


def _revoke_a_firmware_digest(spec: dict[str, Any]) -> None:
    (cls,) = spec["memberClasses"]
    cls["referenceSets"][0]["pcrs"][0]["events"][1]["digests"].pop()


def _rename_the_class(spec: dict[str, Any]) -> None:
    spec["memberClasses"][0]["name"] = spec["defaultMemberClass"] = "uefi-secureboot-2027"


def test_nothing_is_released_on_a_verdict_whose_reference_values_were_revoked() -> None:
    """A security team revokes a firmware digest (or the whole class): a host that withholds
    its next quote keeps a Trusted verdict until it expires, and the operator spends its
    uses only at its next look. Key release reads the policy in force itself, so from the
    edit on no Secret goes to a VM there, nor to one whose launcher pod is there."""
    req, facts = _facts(member=_judged(_member_status()))
    assert kr.decide(req, facts, NOW).released  # the verdict rests on the policy in force
    for policy, said in (
        (_policy_with(_revoke_a_firmware_digest), "changed the reference values"),
        (_policy_with(_rename_the_class), "no longer has member class uefi-secureboot"),
        (None, "no SecurityPolicy is in force"),
    ):
        req, facts = _facts(member=_judged(_member_status()), policy=policy)
        v = kr.decide(req, facts, NOW)
        assert (v.released, v.reason, v.node) == (False, kr.REFERENCES_CHANGED, "m1"), v.message
        assert said in v.message
    # the VM's other launcher pod on a member whose verdict rests on the revoked values
    policy = _policy_with(_revoke_a_firmware_digest)
    fresh = _judged(_member_status())
    fresh["trust"]["references"] = relied_on(policy.member_classes[CLASS], SET)
    req, facts = _facts(member=fresh, pods_on={"m2": _judged(_member_status())}, policy=policy)
    v = kr.decide(req, facts, NOW)
    assert (v.released, v.reason, v.node) == (False, kr.REFERENCES_CHANGED, "m2"), v.message
    # that member quoted again and was judged by the new values: released again
    req, facts = _facts(member=fresh, pods_on={"m2": fresh}, policy=policy)
    assert kr.decide(req, facts, NOW).released


def test_a_vm_whose_launcher_pod_is_on_an_untrusted_host_gets_nothing() -> None:
    """Root on a host rewrites the VMI's status.nodeName to a Trusted member (its
    virt-handler's token can) and sends that member's token (members can read each other's):
    the VM's launcher pod is still on the host, which must hold the level too."""
    for pods_on, reason in (
        ({"bad": _member_status(verdict="Untrusted")}, kr.MEMBER_NOT_TRUSTED),
        ({"bad": None}, kr.MEMBER_UNKNOWN),
        ({"bad": _member_status(level=1)}, kr.LEVEL_TOO_LOW),
    ):
        req, facts = _facts(pods_on=pods_on)
        v = kr.decide(req, facts, NOW)
        assert (v.released, v.reason, v.node) == (False, reason, "bad"), v.message
        assert "status names member m1 but a launcher pod of it is on bad" in v.message
    # a migration between two Trusted members of the level (pods on both): released
    req, facts = _facts(pods_on={"m2": _member_status()})
    assert kr.decide(req, facts, NOW).released


def _booted(status: dict[str, Any], seen: str, unquoted: bool = False) -> dict[str, Any]:
    """`status` whose Node was last seen in boot `seen`, `unquoted` if the operator saw the
    host boot again since the verdict's quote."""
    trust = {**status["trust"], "nodeBootID": seen}
    return {**status, "trust": {**trust, "bootUnquoted": True} if unquoted else trust}


def test_a_host_that_booted_again_since_its_quote_gets_nothing_until_that_boot_is_quoted() -> None:
    """The host rebooted (into a chain the policy may refuse) and its guest asks at once:
    the verdict standing on the old boot's quote releases nothing, whether the operator
    has seen the new boot yet (the view's Node) or has (its Member says so), on the VM's
    member or where a launcher pod of it is; a quote of the new boot does."""
    for node, st, boots in (
        ("m1", _booted(_member_status(), "b1"), {"m1": "b2"}),  # not looked at yet
        ("m1", _booted(_member_status(), "b2", True), {"m1": "b2"}),  # looked at: spent
        ("m1", _booted(_member_status(), "b2", True), {}),  # the Node gone from the view
    ):
        req, facts = _facts(member=st)
        v = kr.decide(req, dataclasses.replace(facts, node_boots=boots), NOW)
        assert (v.released, v.reason, v.node) == (False, kr.MEMBER_REBOOTED, node), v.message
        assert "booted again" in v.message
        assert "ask again" in v.message
        assert kr.MEMBER_REBOOTED in kr.ASK_AGAIN  # a 503: the fresh quote is on its way
    req, facts = _facts(pods_on={"m2": _booted(_member_status(), "b7", True)})
    v = kr.decide(req, facts, NOW)
    assert (v.released, v.reason, v.node) == (False, kr.MEMBER_REBOOTED, "m2"), v.message
    # quoted in the boot it runs: released
    req, facts = _facts(member=_booted(_member_status(), "b2"))
    assert kr.decide(req, dataclasses.replace(facts, node_boots={"m1": "b2"}), NOW).released


def test_a_member_whose_node_labels_say_less_than_its_stored_verdict_is_asked_again() -> None:
    """The replica holding the member reached a verdict the API server would not store and
    took its Node's trust labels off; another replica still reads the stored Trusted one:
    it releases nothing on it (found by a review), but says ask again (labels also lag a
    verdict for a moment, and a replica that holds the member answers)."""
    from gtvp.core.trust import as_labelled

    trust = {**_member_status()["trust"], "usesLeft": 5, "verifiedAt": "2026-12-02T00:59:00Z"}
    held = as_labelled({**_member_status(), "trust": trust}, {}, None, NOW)  # no labels
    req, facts = _facts(member=held)
    v = kr.decide(req, facts, NOW)
    assert (v.released, v.reason) == (False, kr.MEMBER_UNSETTLED), v.message
    assert "say less than its stored verdict; ask again" in v.message
    assert kr.MEMBER_UNSETTLED in kr.ASK_AGAIN


def test_a_tampered_token_is_refused_even_for_the_right_member() -> None:
    good = _token("m1", _member_status())
    head, payload, sig = good.split(".")
    claims = json.loads(ear.b64url_decode(payload, "p"))
    claims["submods"]["m1"]["gtvp"]["level"] = 9
    forged = f"{head}.{ear.b64url(json.dumps(claims).encode())}.{sig}"
    req, facts = _facts(token=forged)
    v = kr.decide(req, facts, NOW)
    assert v.reason == kr.TOKEN_REFUSED
    assert "bad-signature" in v.message


def test_a_used_credential_is_named_a_replay_and_the_next_one_is_current() -> None:
    ann = kr.consumed_annotations(
        kr.issued_annotations(CRED, "t"),
        used=kr.credential_hash(CRED),
        next_credential=OTHER,
        now="t2",
    )
    assert ann[kr.HASH_ANNOTATION] == kr.credential_hash(OTHER)
    assert ann[kr.RELEASES_ANNOTATION] == "1"
    req, facts = _facts(issued=ann)
    assert kr.decide(req, facts, NOW).reason == kr.CREDENTIAL_USED
    assert CRED not in json.dumps(ann)  # only hashes are kept


RETRY = "r" * 64


def _consumed_by(retry: str, vmi: str = "vmi-1", at: dt.datetime = NOW) -> dict[str, str]:
    """The cloud-init Secret's annotations once CRED was consumed by a request with `retry`."""
    return kr.consumed_annotations(
        kr.issued_annotations(CRED, "t"),
        used=kr.credential_hash(CRED),
        next_credential=OTHER,
        now=at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        retry=retry,
        vmi=vmi,
    )


def _asking_again(
    issued: dict[str, str], retry: str = RETRY, uid: str = "vmi-1", **change: Any
) -> tuple[kr.Request, kr.Facts]:
    req, facts = _facts(issued=issued, **change)
    vmi = {**dict(facts.vmi or {}), "metadata": {**(facts.vmi or {})["metadata"], "uid": uid}}
    return dataclasses.replace(req, retry=retry), dataclasses.replace(facts, vmi=vmi)


def test_the_guest_whose_answer_was_lost_gets_its_secrets_again_and_nobody_else() -> None:
    """The credential was consumed but the answer never reached the guest (a reset, an
    operator restart): the same guest (its retry key) asks again and gets the Secrets; a
    thief of the used credential without that key gets nothing."""
    issued = _consumed_by(RETRY)
    assert RETRY not in json.dumps(issued)
    assert CRED not in json.dumps(issued)
    req, facts = _asking_again(issued)
    v = kr.decide(req, facts, NOW + dt.timedelta(seconds=20))
    assert (v.released, v.again, v.reason) == (True, True, kr.RELEASED_AGAIN), v.message
    assert [n.name for n in v.secrets] == ["disk", "tls"]
    assert "again" in v.message
    # the first step (no token) says where it runs, as for an unused credential
    bare = dataclasses.replace(req, token="")
    assert kr.decide(bare, facts, NOW).reason == kr.TOKEN_REQUIRED
    # every other check still applies to a repeat
    req_u, facts_u = _asking_again(issued, member=_member_status(verdict="Untrusted"))
    assert kr.decide(req_u, facts_u, NOW).reason == kr.MEMBER_NOT_TRUSTED
    for refused_req, refused_facts, at in (
        (*_asking_again(issued, retry="x" * 64), NOW),  # another retry key: a thief
        (*_asking_again(issued, retry=""), NOW),  # no retry key
        (*_asking_again(issued, uid="vmi-2"), NOW),  # the VMI restarted since
        (*_asking_again(issued), NOW + kr.REPEAT_FOR + dt.timedelta(seconds=1)),  # too late
        (*_asking_again(_consumed_by("")), NOW),  # consumed by a guest that sent no key
    ):
        got = kr.decide(refused_req, refused_facts, at)
        assert (got.released, got.reason) == (False, kr.CREDENTIAL_USED), got.message


def test_a_repeat_gives_only_the_secrets_as_they_were_released() -> None:
    """A repeat gives what the lost answer held: a Secret rotated since (its host found bad
    meanwhile, and root there kept the guest's credential and retry key), or one the box
    names only now, is not given again; a label added to it changes nothing. What is kept
    is keyed with the retry key: no guess of a Secret can be tested against it."""
    given = {"disk": {"key": "czNjcmV0"}, "tls": {"tls.key": "a2V5"}}
    digests = kr.released_digests(RETRY, given)
    assert kr.released_digests("", given) == {}  # no retry key, no repeat
    assert kr.released_digests("x" * 64, given) != digests
    assert "czNjcmV0" not in json.dumps(digests)
    issued = kr.consumed_annotations(
        kr.issued_annotations(CRED, "t"),
        used=kr.credential_hash(CRED),
        next_credential=OTHER,
        now="t",
        retry=RETRY,
        vmi="vmi-1",
        digests=digests,
    )
    assert kr.changed_since_release(issued, kr.released_digests(RETRY, given)) is None
    rotated = {**given, "tls": {"tls.key": "bmV3"}}
    assert kr.changed_since_release(issued, kr.released_digests(RETRY, rotated)) == "tls"
    added = {**given, "new": {"k": "dg=="}}
    assert kr.changed_since_release(issued, kr.released_digests(RETRY, added)) == "new"
    # a release an older gtvp recorded holds no digests: not judged so
    older = dict(issued)
    record = json.loads(older[kr.ANSWERED_ANNOTATION])
    del record["secrets"]
    older[kr.ANSWERED_ANNOTATION] = json.dumps(record)
    assert kr.changed_since_release(older, kr.released_digests(RETRY, rotated)) is None
    assert kr.SECRET_CHANGED in kr.REASONS
    assert kr.SECRET_CHANGED not in kr.ASK_AGAIN


def test_a_repeat_judged_by_a_replica_whose_clock_runs_behind_is_still_answered() -> None:
    """The consuming replica's clock ran ahead: its release seems up to a minute in the
    future to the replica the guest reaches next. Further ahead, or a time without a zone
    (only a Secret writer could put one there), is no release to repeat."""
    for ahead, released in ((30, True), (59, True), (120, False)):
        req, facts = _asking_again(_consumed_by(RETRY, at=NOW + dt.timedelta(seconds=ahead)))
        assert kr.decide(req, facts, NOW).released is released, ahead
    naive = dict(_consumed_by(RETRY))
    last = json.loads(naive[kr.ANSWERED_ANNOTATION])
    naive[kr.ANSWERED_ANNOTATION] = json.dumps({**last, "at": "2026-12-02T01:00:00"})
    req, facts = _asking_again(naive)
    assert kr.decide(req, facts, NOW).reason == kr.CREDENTIAL_USED


def test_the_next_credential_is_only_for_the_next_boot() -> None:
    """A release to VMI vmi-1 arms OTHER in the cloud-init Secret, where root on the host
    that runs vmi-1 reads it. vmi-1 then moves (its host lost trust, or was drained) to a
    Trusted member: OTHER with that member's token gets nothing while vmi-1 lives; the VM's
    next boot (a new VMI) gets its Secrets with it."""
    armed = _consumed_by(RETRY, vmi="vmi-1")
    stolen = dataclasses.replace(_asking_again(armed, uid="vmi-1")[0], credential=OTHER, retry="")
    facts = _asking_again(armed, uid="vmi-1", node="m1")[1]
    got = kr.decide(stolen, facts, NOW)
    assert (got.released, got.reason) == (False, kr.CREDENTIAL_FOR_NEXT_BOOT), got.message
    next_boot = _asking_again(armed, uid="vmi-2")[1]
    got = kr.decide(stolen, next_boot, NOW)
    assert (got.released, got.reason) == (True, kr.RELEASED), got.message


def test_a_credential_armed_anew_while_the_released_vmi_runs_is_for_its_next_boot_too() -> None:
    """gtvp writes the box's VM again while vmi-1 (which got its Secrets) runs on it (a VM
    user's edit restored, a live update), and arms a fresh credential: root on that host
    reads it as it read the one it replaces. It is for the next boot all the same; the used
    one stays used, and the guest's lost answer can still be asked for again."""
    armed = _consumed_by(RETRY, vmi="vmi-1")
    fresh = "f" * 43
    rearmed = kr.rearmed_annotations(armed, kr.issued_annotations(fresh, "t4"))
    req, facts = _asking_again(rearmed, uid="vmi-1", node="m1")
    stolen = dataclasses.replace(req, credential=fresh, retry="")
    got = kr.decide(stolen, facts, NOW)
    assert (got.released, got.reason) == (False, kr.CREDENTIAL_FOR_NEXT_BOOT), got.message
    used = kr.decide(dataclasses.replace(req, retry=""), facts, NOW)
    assert used.reason == kr.CREDENTIAL_USED
    assert kr.decide(req, facts, NOW).reason == kr.RELEASED_AGAIN  # the guest's own retry
    next_boot = _asking_again(rearmed, uid="vmi-2")[1]
    assert kr.decide(stolen, next_boot, NOW).reason == kr.RELEASED


def test_a_later_release_forgets_the_earlier_ones_retry_key() -> None:
    first = _consumed_by(RETRY)
    later = kr.consumed_annotations(
        first, used=kr.credential_hash(OTHER), next_credential="n" * 43, now="t3"
    )
    req, facts = _asking_again(later)
    assert kr.decide(req, facts, NOW).reason == kr.CREDENTIAL_USED
    assert not kr.answered(later, dataclasses.replace(req, retry=RETRY), "vmi-1")
    assert kr.answered(first, dataclasses.replace(req, retry=RETRY), "vmi-1")


def test_the_endpoint_knows_its_own_consuming_write_when_reading_it_back() -> None:
    ann = kr.consumed_annotations(
        kr.issued_annotations(CRED, "t"),
        used=kr.credential_hash(CRED),
        next_credential=OTHER,
        now="t2",
        write="w1",
    )
    assert kr.written_by(ann, "w1")
    assert not kr.written_by(ann, "w2")
    assert not kr.written_by(ann, "")
    assert not kr.is_current(ann, CRED)
    assert kr.is_current(ann, OTHER)


def test_a_malformed_retry_key_is_a_bad_request() -> None:
    body = {"namespace": "ns", "box": "b", "credential": CRED}
    for bad in ("short", 7, "has space" * 8):
        with pytest.raises(kr.BadRequest, match="'retry'"):
            kr.parse_request(json.dumps({**body, "retry": bad}).encode())
    assert kr.parse_request(json.dumps({**body, "retry": RETRY}).encode()).retry == RETRY
    assert RETRY not in repr(kr.parse_request(json.dumps({**body, "retry": RETRY}).encode()))


def test_a_secret_the_box_did_not_name_is_refused() -> None:
    req, facts = _facts()
    asked = kr.Request("ns", "box", CRED, req.token, secrets=("disk", "kubeconfig"))
    v = kr.decide(asked, facts, NOW)
    assert v.reason == kr.SECRET_NOT_NAMED
    assert "kubeconfig" in v.message
    only = kr.Request("ns", "box", CRED, req.token, secrets=("tls",))
    assert [n.name for n in kr.decide(only, facts, NOW).secrets] == ["tls"]


def test_without_a_token_the_guest_is_told_where_it_runs_and_nothing_is_released() -> None:
    _req, facts = _facts()
    v = kr.decide(kr.Request("ns", "box", CRED), facts, NOW)
    assert (v.reason, v.node, v.secrets) == (kr.TOKEN_REQUIRED, "m1", ())
    # ...but only with the right credential
    v = kr.decide(kr.Request("ns", "box", OTHER), facts, NOW)
    assert v.reason == kr.WRONG_CREDENTIAL


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"not json", "not JSON"),
        (b"[]", "JSON object"),
        (json.dumps({"namespace": "ns", "box": "b", "credential": "short"}).encode(), "credential"),
        (json.dumps({"namespace": "NS!", "box": "b", "credential": CRED}).encode(), "namespace"),
        (
            json.dumps({"namespace": "ns", "box": "b", "credential": CRED, "secrets": []}).encode(),
            "secrets",
        ),
        (b"x" * (kr.MAX_REQUEST_BYTES + 1), "longer"),
        (b"[" * 5000, "not JSON"),  # nested deeper than the parser goes: 400, not a 500
    ],
)
def test_bad_requests_say_what_is_wrong(body: bytes, says: str) -> None:
    with pytest.raises(kr.BadRequest, match=says):
        kr.parse_request(body)


def test_the_request_never_shows_its_credential_or_token() -> None:
    req = kr.Request("ns", "box", CRED, "tok.en.x")
    assert CRED not in repr(req)
    assert "tok.en.x" not in repr(req)


def test_the_cloud_init_carries_the_credential_and_runs_the_exchange_first() -> None:
    base = "#cloud-config\nmounts:\n  - [a, b]\nruncmd:\n  - [/opt/gtvp/app/start]\n"
    text = compose.key_release_user_data(
        base,
        credential=CRED,
        url="https://gtvp.example:9090/",
        path=kr.PATH,
        namespace="ns",
        box="box",
        ca_pem="-----BEGIN CERTIFICATE-----\n",
    )
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    files = {f["path"]: f for f in doc["write_files"]}
    assert files[f"{compose.KEY_RELEASE_DIR}/credential"]["content"] == CRED
    assert files[f"{compose.KEY_RELEASE_DIR}/credential"]["permissions"] == "0400"
    assert (
        "GTVP_KEY_RELEASE_URL='https://gtvp.example:9090'"
        in files[f"{compose.KEY_RELEASE_DIR}/env"]["content"]
    )
    assert doc["runcmd"] == [
        ["/bin/sh", f"{compose.KEY_RELEASE_DIR}/fetch"],
        ["/opt/gtvp/app/start"],
    ]
    assert doc["mounts"] == [["a", "b"]]


def test_the_vm_references_the_secret_and_never_carries_the_credential() -> None:
    vm = {
        "spec": {
            "template": {
                "spec": {
                    "volumes": [
                        {"name": "rootfs", "containerDisk": {"image": "x"}},
                        {"name": "cloudinit", "cloudInitNoCloud": {"userData": "#cloud-config\n"}},
                    ]
                }
            }
        }
    }
    out, user_data = compose.with_cloud_init_secret(vm, "box-gtvp-cloudinit")
    assert user_data == "#cloud-config\n"
    assert out["spec"]["template"]["spec"]["volumes"][1] == {
        "name": "cloudinit",
        "cloudInitNoCloud": {"secretRef": {"name": "box-gtvp-cloudinit"}},
    }
    assert "userData" in json.dumps(vm)  # the input is left as it was


def test_the_endpoint_is_never_served_in_plain_http() -> None:
    from prometheus_client import CollectorRegistry

    from gtvp import http_endpoints

    with pytest.raises(ValueError, match="only over TLS"):
        http_endpoints.serve(
            0,
            "127.0.0.1",
            CollectorRegistry(),
            lambda: http_endpoints.Probe(loaded=True, loop_started=False, loop_idle_seconds=0),
            release=lambda method, body: (200, "text/plain", b""),
        )


def test_the_operator_refuses_key_release_without_tls(capsys: pytest.CaptureFixture[str]) -> None:
    from gtvp import operator_main

    argv = ["--key-release-url", "https://gtvp.example:9090", "--webhook-port", "0"]
    assert operator_main.main(argv) == 2
    assert "--key-release-url needs --metrics-secure" in capsys.readouterr().err
    argv = ["--metrics-secure", "--metrics-cert", "c", "--metrics-key", "k"]
    assert operator_main.main([*argv, "--key-release-url", "http://gtvp.example:9090"]) == 2
    assert "an https:// URL is needed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("annotations", "ok"),
    [
        (None, False),
        ({}, False),
        ({kr.RELEASE_TO_ANNOTATION: "other"}, False),
        ({kr.RELEASE_TO_ANNOTATION: "other, box"}, True),
        ({kr.RELEASE_TO_ANNOTATION: "*"}, True),
        ({kr.RELEASE_TO_ANNOTATION: "boxes"}, False),
    ],
)
def test_a_secret_is_released_only_to_the_boxes_it_consents_to(
    annotations: dict[str, str] | None, ok: bool
) -> None:
    assert kr.releasable_to(annotations, "box") is ok


@pytest.mark.parametrize(
    ("allowed", "ok"),
    [("*", False), ("vm/*", True), ("box", False), ("vm/box", True), ("other, vm/box", True)],
)
def test_any_box_is_not_any_vm(allowed: str, ok: bool) -> None:
    """A Secret for any box (`*`: what gtvp composed from signed components) does not go to
    a gated VM its creator filled with anything; `vm/*` says any gated VM."""
    assert kr.releasable_to({kr.RELEASE_TO_ANNOTATION: allowed}, "box", kr.VM) is ok


@pytest.mark.parametrize(
    ("min_level", "level", "said"),
    [
        ("2", 2, None),
        ("2", 3, None),
        (" 2 ", 2, None),
        ("3", 2, "goes only to level 3 or above, and box box is of level 2"),
        (None, 5, 'must have (annotation gtvp.io/release-min-level, for example "5")'),
        ("", 2, "names no level"),
        ("0", 2, "which is not a level"),
        ("02", 2, "which is not a level"),
        ("-1", 2, "which is not a level"),
        ("\u00b3", 5, "which is not a level"),  # a superscript digit: isdigit() says yes
        ("2.0", 2, "which is not a level"),
    ],
)  # fmt: skip
def test_a_secret_goes_only_to_boxes_of_the_level_its_owner_names(
    min_level: str | None, level: int, said: str | None
) -> None:
    """A box's editor may lower its level (a VM may be created again at a lower one): the
    Secret's owner names the lowest level its receivers may have, and must name one."""
    annotations = {kr.RELEASE_TO_ANNOTATION: "box"}
    if min_level is not None:
        annotations[kr.MIN_LEVEL_ANNOTATION] = min_level
    got = kr.refuses_release(annotations, "box", kr.BOX, level)
    if said is None:
        assert got is None
    else:
        assert got is not None
        assert said in got
    # consent by name comes first, whatever the level
    refused = kr.refuses_release({kr.MIN_LEVEL_ANNOTATION: "1"}, "box", kr.BOX, 5)
    assert refused is not None
    assert "does not consent to release to box box" in refused


def test_a_secret_can_bind_its_consent_to_what_the_box_boots() -> None:
    """Whoever may edit box `db` (not read its Secrets) swaps its application for a signed one
    that serves files, or adds a requested component, keeping its name and level: a Secret
    naming the components its receivers may boot goes to neither, nor to a gated VM."""
    assert kr.booted_pins({"spec": VMI_SPEC}) == (("c-app", "2" * 64),)
    assert kr.booted_pins({"spec": {}}) is None
    base = {kr.RELEASE_TO_ANNOTATION: "box", kr.MIN_LEVEL_ANNOTATION: "2"}
    bound = {**base, kr.COMPONENTS_ANNOTATION: "busybox-base, glibc,postgres"}

    def boots(*names: str) -> tuple[frozenset[str], ...]:
        return tuple(frozenset({n}) for n in names)

    ok = boots("busybox-base", "glibc", "postgres")
    assert kr.refuses_release(bound, "box", kr.BOX, 2, ok) is None
    assert kr.refuses_release(bound, "box", kr.BOX, 2, boots("busybox-base", "postgres")) is None
    swapped = kr.refuses_release(bound, "box", kr.BOX, 2, boots("busybox-base", "webdav"))
    assert swapped is not None
    assert "boots webdav too" in swapped
    assert kr.COMPONENTS_ANNOTATION in swapped
    unknown = kr.refuses_release(bound, "box", kr.BOX, 2, (frozenset(), *ok))
    assert "a disk no verified component has" in str(unknown)
    assert "boots no component" in str(kr.refuses_release(bound, "box", kr.BOX, 2, None))
    vm = kr.refuses_release({**bound, kr.RELEASE_TO_ANNOTATION: "vm/box"}, "box", kr.VM, 2)
    assert vm is not None
    assert "is no box" in vm
    # without the annotation the consent is to the box by name, whatever it boots
    assert kr.refuses_release(base, "box", kr.BOX, 2, boots("webdav")) is None


def test_consent_to_a_long_component_name_is_not_consent_to_its_20_byte_siblings() -> None:
    """Disk serials are names cut to 20 bytes: `postgres-production-server` and
    `postgres-production-backup` share one. A disk is told by its pinned digest, so consent
    to one is not consent to the other (found by a review of the first version)."""
    server, backup = "postgres-production-server", "postgres-production-backup"
    serial = server[:20]
    assert backup[:20] == serial
    catalogue = [(server, "sha256:" + "a" * 64), (backup, "sha256:" + "b" * 64)]
    booted_backup = kr.disk_names([(serial, "b" * 64)], catalogue)
    assert booted_backup == (frozenset({backup}),)
    ann = {kr.RELEASE_TO_ANNOTATION: "box", kr.MIN_LEVEL_ANNOTATION: "2",
           kr.COMPONENTS_ANNOTATION: server}  # fmt: skip
    refused = kr.refuses_release(ann, "box", kr.BOX, 2, booted_backup)
    assert refused is not None
    assert f"boots {backup} too" in refused
    booted_server = kr.disk_names([(serial, "a" * 64)], catalogue)
    assert kr.refuses_release(ann, "box", kr.BOX, 2, booted_server) is None
    # a component of that digest whose name is not the serial's is not that disk
    assert kr.disk_names([("other", "a" * 64)], catalogue) == (frozenset(),)


def test_a_request_names_either_a_box_or_a_gated_vm() -> None:
    base = {"namespace": "ns", "credential": CRED}
    assert kr.parse_request(json.dumps({**base, "vm": "db"}).encode()).kind == kr.VM
    assert kr.parse_request(json.dumps({**base, "box": "db"}).encode()).kind == kr.BOX
    for body in (base, {**base, "box": "a", "vm": "b"}):
        with pytest.raises(kr.BadRequest, match="either a LazyBox"):
            kr.parse_request(json.dumps(body).encode())


def test_a_gated_vm_is_judged_as_a_box_of_its_level_naming_its_annotations_secrets() -> None:
    vm = {
        "metadata": {
            "name": "db",
            "annotations": {kr.VM_SECRETS_ANNOTATION: '[{"name": "disk", "keys": ["key"]}]'},
        }
    }
    subject = kr.vm_subject(vm, 3)
    assert subject["spec"]["level"] == 3
    assert kr.named_secrets(subject["spec"]) == (kr.Named("disk", ("key",)),)
    broken = {"metadata": {"annotations": {kr.VM_SECRETS_ANNOTATION: "disk"}}}
    assert kr.named_secrets(kr.vm_subject(broken, 3)["spec"]) == ()
    assert kr.releasable_to({kr.RELEASE_TO_ANNOTATION: "vm/db"}, "db", kr.VM)
    assert not kr.releasable_to({kr.RELEASE_TO_ANNOTATION: "db"}, "db", kr.VM)


def test_a_vmi_of_the_boxs_name_that_gtvp_does_not_hold_at_its_level_gets_nothing() -> None:
    """A VM user stops the gated VM and starts an ungated VMI under its name on a Trusted
    member, mounting the VM's credential: gtvp would never move or stop that VMI."""
    for labels, said in (({}, "not gated"), ({"gtvp.io/level": "1"}, "gated at level 1")):
        req, facts = _facts(vmi_labels=labels)
        v = kr.decide(req, facts, NOW)
        assert not v.released
        assert v.reason == kr.VMI_NOT_GATED
        assert f"VMI box is {said}, the box needs 2" in v.message
    # its trust selector counts as its level, as for gating (a composition gtvp made for a
    # box confines it so: `status.composedBoots` covers the selector)
    selected = {**VMI_SPEC, "nodeSelector": trust_selector(2)}
    req, facts = _facts(
        vmi_labels={}, vmi_spec=selected, composed=[compose.composed_boot(selected, None, {})]
    )
    assert kr.decide(req, facts, NOW).released


def test_under_box_attestation_a_box_gets_its_secrets_only_once_attested_here() -> None:
    """A policy that attests boxes: the Secrets wait for a quote of the box's vTPM that gtvp
    verified on the member where it runs, for this VMI (not another member's, not an
    earlier boot's, not a Pending or Mismatch one)."""
    req, facts = _facts()
    vmi = {**(facts.vmi or {}), "metadata": {"name": "box", "uid": "uid-1",
                                             "labels": {"gtvp.io/level": "2"}}}  # fmt: skip
    box = dict(facts.box or {})

    def ask(att: dict[str, Any] | None, attest: bool = True) -> kr.Verdict:
        status = {**box["status"], "attestation": att}
        with_att = {**box, "status": status} if att is not None else box
        got = dataclasses.replace(facts, box=with_att, vmi=vmi, attest_boxes=attest)
        return kr.decide(req, got, NOW)

    verified = {"state": "Verified", "member": "m1", "vmiUID": "uid-1"}
    assert ask(verified).released
    assert ask(None, attest=False).released  # a policy that does not attest boxes
    for att, says in (
        (None, "(not armed)"),
        ({"state": "Pending"}, "(Pending)"),
        ({**verified, "member": "m2"}, "(Verified)"),
        ({**verified, "vmiUID": "uid-0"}, "(Verified)"),
        ({"state": "Mismatch", "message": "PCR 13 is 00…"}, "(Mismatch: PCR 13 is 00…)"),
    ):
        v = ask(att)
        assert (v.released, v.reason) == (False, kr.BOX_NOT_ATTESTED), att
        assert f"not attested on member m1 for this boot {says}" in v.message


def test_a_box_vmi_that_boots_what_gtvp_did_not_compose_gets_nothing() -> None:
    """Whoever may edit VMs in the box's namespace (not its Secrets) changes the box VM's
    kernel command line to pin a disk of their own (or its kernel, or starts a VMI of the
    box's name booting a disk image): the init would check their disk against their pin.
    Only a VMI booting a composition gtvp made for the box gets its Secrets; an older one
    it made (a LiveUpdate waiting for a restart) still does; a gated VM has none."""
    boot = VMI_SPEC["domain"]["firmware"]["kernelBoot"]
    theirs = {**boot, "kernelArgs": boot["kernelArgs"].replace("2" * 64, "6" * 64)}
    other_kernel = {**boot, "container": {**boot["container"], "image": KERNEL[:-1] + "7"}}
    for spec in (
        {"domain": {"firmware": {"kernelBoot": theirs}}},
        {"domain": {"firmware": {"kernelBoot": other_kernel}}},
        {"domain": {"devices": {"disks": [{"name": "root", "disk": {}}]}}},
        # the composition, and the box's own credential Secret as a disk, or an SSH key
        {
            **VMI_SPEC,
            "volumes": [{"name": "steal", "secret": {"secretName": "box-gtvp-cloudinit"}}],
        },
        {
            **VMI_SPEC,
            "accessCredentials": [{"sshPublicKey": {"source": {"secret": {"secretName": "k"}}}}],
        },
    ):
        req, facts = _facts(vmi_spec=spec)
        v = kr.decide(req, facts, NOW)
        assert (v.released, v.reason) == (False, kr.NOT_COMPOSED), v.message
    req, facts = _facts(composed=[])  # gtvp recorded no composition for the box (yet)
    assert kr.decide(req, facts, NOW).reason == kr.NOT_COMPOSED
    # an older composition gtvp made: for a VMI created before the newest was written (a
    # LiveUpdate waiting for a restart), not for one created since (a rollback)
    newer = compose.composed_boot({"domain": {"firmware": {"kernelBoot": other_kernel}}})
    older = [str(newer), str(BOOTED)]
    for written, released in (("2026-12-02T00:00:01Z", True), ("2026-12-01T23:59:59Z", False)):
        req, facts = _facts(composed=older, composed_at=written)
        v = kr.decide(req, facts, NOW)
        assert (v.released, v.reason) == (released, kr.RELEASED if released else kr.NOT_COMPOSED)
    req, facts = _facts(vmi_spec={"domain": {}})
    vm_req = dataclasses.replace(req, kind=kr.VM)
    assert kr.decide(vm_req, facts, NOW).released


def test_a_vm_written_again_keeps_only_the_credential_its_running_guest_booted_with() -> None:
    """A rewrite keeps the current credential for the guest that booted with it (still
    waiting to fetch); never a next boot's (the last release went to the running VMI, or
    it was issued after that VMI started: root on a host the box ran on may have read it),
    nor one consumed, nor with no VMI running. Found by reviews."""
    first, nxt = "f" * 43, "n" * 43
    started = NOW + dt.timedelta(seconds=30)
    issued = kr.issued_annotations(first, "2026-12-02T01:00:00Z")
    assert kr.kept_for(issued, first, vmi_uid="v1", vmi_started=started)
    assert not kr.kept_for(issued, first, vmi_uid="", vmi_started=started)
    assert not kr.kept_for(issued, first, vmi_uid="v1", vmi_started=None)
    # issued after that VMI started (the operator's clock may run a minute ahead)
    assert kr.kept_for(issued, first, vmi_uid="v1", vmi_started=NOW - dt.timedelta(seconds=2))
    assert not kr.kept_for(issued, first, vmi_uid="v1", vmi_started=NOW - 2 * kr.ISSUED_SKEW)
    assert not kr.kept_for(issued, "o" * 43, vmi_uid="v1", vmi_started=started)
    released = kr.consumed_annotations(
        issued, used=kr.credential_hash(first), next_credential=nxt, now="2026-12-02T01:00:40Z",
        vmi="v1",
    )  # fmt: skip
    later = started + dt.timedelta(minutes=5)
    assert not kr.kept_for(released, nxt, vmi_uid="v1", vmi_started=started)  # a next boot's
    assert not kr.kept_for(released, first, vmi_uid="v1", vmi_started=started)  # consumed
    assert not kr.kept_for(released, nxt, vmi_uid="v1", vmi_started=later)  # the release's VMI
    assert kr.kept_for(released, nxt, vmi_uid="v2", vmi_started=later)  # the next boot's guest
