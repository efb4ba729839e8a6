"""Attestation-gated key release: whether a box's VM gets the Secrets its box names.

Pure. A box (`LazyBox.spec.secrets`) names Secrets of its namespace; gtvp gives its VM a
one-time credential through the VM's cloud-init (a Secret the VM references), and the guest
sends it, with its host's signed verdict token, to gtvp's key-release endpoint over TLS
(docs/keyrelease.md). `decide` says release or refuse (with a stable reason code and why)
from what gtvp itself sees: the box and the SHA-256 of its current credential (its status,
read fresh from the API server), where the box's VMI really runs (the VMI's
`status.nodeName` in the operator's view, never what the guest claims, and every other node
its launcher pods are on: root on a host can rewrite the status with that host's
virt-handler token, not a pod's node), each such member's verdict *now* (the view's, not
only the token's) and the token, verified by the caller against the operator's own JWKS.
Only hashes of credentials are ever stored or compared; no message here quotes a
credential, a token or a secret value.

A guest whose answer was lost after its credential was consumed (a connection reset, an
operator restart, an API server answering 504 after committing) asks again with the same
credential and the retry key it sent the first time (a random string only that guest
knows; its hash is written in the consuming write): within REPEAT_FOR, for the same VMI and
with every other check passing again, it gets the Secrets again (`RELEASED_AGAIN`, nothing
consumed). Anyone else holding the used credential is still refused (`CredentialUsed`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from gtvp.core import ear
from gtvp.core.attestation import references_revoked
from gtvp.core.boxattest import VERIFIED, disks_booted
from gtvp.core.compose import NOT_COMPOSED_MESSAGE, SERIAL_MAX, vmi_runs_composition
from gtvp.core.gating import GatingError, admitted_level, box_level
from gtvp.core.policy import Policy
from gtvp.core.timestamps import parse_ts
from gtvp.core.trust import NOT_STORED, boot_unquoted

PATH: Final = "/keyrelease/v1/release"
"""The endpoint a box's guest POSTs its request to."""
MAX_REQUEST_BYTES: Final = 32 * 1024
CREDENTIAL_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{32,128}")
SECRET_SUFFIX: Final = "-gtvp-cloudinit"  # noqa: S105 - a name, not a secret
"""The cloud-init Secret of box `b` is `b-gtvp-cloudinit` (its namespace)."""
VM_SECRET_SUFFIX: Final = "-gtvp-keyrelease"  # noqa: S105 - a name, not a secret
"""The credential Secret of gated VM `v` is `v-gtvp-keyrelease` (the VM mounts it)."""
BOX: Final = "box"
VM: Final = "vm"
"""What a request names: a LazyBox, or a gated VirtualMachine that is not a box."""
VM_SECRETS_ANNOTATION: Final = "gtvp.io/secrets"
"""On a gated VirtualMachine: the Secrets to release to it, as JSON in the form of a
LazyBox's `spec.secrets` (`[{"name": "db-disk-key", "keys": ["key"]}]`)."""
CONSUMED_KEPT: Final = 8
"""How many used credential hashes the cloud-init Secret remembers (a replay is named so)."""
HASH_ANNOTATION: Final = "gtvp.io/credential-sha256"
"""On the cloud-init Secret: the SHA-256 (hex) of the credential the next release accepts."""
CONSUMED_ANNOTATION: Final = "gtvp.io/consumed-sha256"
"""On the cloud-init Secret: the SHA-256 of the last credentials used, newest first."""
RELEASES_ANNOTATION: Final = "gtvp.io/releases"
ISSUED_ANNOTATION: Final = "gtvp.io/credential-issued-at"
ANSWERED_ANNOTATION: Final = "gtvp.io/last-release"
"""On the cloud-init Secret: who the last release went to, as JSON: the used credential's
hash, the hash of the retry key sent with it, the VMI's uid and when (`repeatable`), and
the id of the write that consumed it (`written_by`)."""
REPEAT_FOR: Final = dt.timedelta(minutes=10)
"""How long the guest that consumed a credential may ask again for an answer it lost."""
CLOCK_SKEW: Final = dt.timedelta(seconds=60)
"""How far another replica's clock may run ahead of this one's for a repeat to be judged."""
RELEASE_TO_ANNOTATION: Final = "gtvp.io/release-to"
"""On a Secret to be released: the LazyBoxes (comma-separated names, `*` for any box of
the namespace) it may be released to. The Secret's writer consents, so being able to create
a box does not mean being able to read every Secret of the namespace through gtvp."""
COMPONENTS_ANNOTATION: Final = "gtvp.io/release-components"
"""On a Secret to be released (optional): the components, by name, a box receiving it may
boot (comma-separated); when set, every component disk the box's VMI boots (the composition
gtvp made for it, which pins each on the kernel command line, `gtvp.disks=`) must be one of
them, and no gated VM (which boots whatever its creator put in it) gets it. Whoever may edit
box `db` can change what it runs (its application, its requested components) and keep its
name and level: without this, the consent is to whatever box `db` runs."""
MIN_LEVEL_ANNOTATION: Final = "gtvp.io/release-min-level"
"""On a Secret to be released: the lowest security level a box (or VM) receiving it may
have, so on a host Trusted at least at that level. Required: a box's level is its editor's
to change (and a VM can be created again at a lower one under the same name), while the
consent is the Secret owner's; without a level of their own, a box lowered to level 1
would take a Secret meant for level 5 to a level-1 host."""
USER_DATA_KEY: Final = "userdata"
"""The key KubeVirt reads a NoCloud `secretRef`'s user data from."""

_NAME: Final = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")

RELEASED: Final = "released"
RELEASED_AGAIN: Final = "released-again"
"""Released once more to the guest that consumed the credential (its retry key), whose
first answer was lost; nothing consumed."""
TOKEN_REQUIRED: Final = "TokenRequired"  # noqa: S105 - a name, not a secret
"""Not a refusal but the exchange's first step: a request with this box's valid, unused
credential and no token is told the member its VM runs on (whose token to fetch); nothing
is consumed, and it is neither counted nor an Event."""
# refusal reasons (`gtvp_key_releases_total{result=...}`, the Events' messages)
NO_SUCH_BOX: Final = "NoSuchBox"
NOTHING_TO_RELEASE: Final = "NothingToRelease"
NO_CREDENTIAL: Final = "NoCredentialIssued"
WRONG_CREDENTIAL: Final = "WrongCredential"
CREDENTIAL_USED: Final = "CredentialUsed"
CREDENTIAL_FOR_NEXT_BOOT: Final = "CredentialForNextBoot"
"""The current credential was armed by a release to the VMI that is running now: it is for
the VM's next boot. Whoever read it while that VMI ran (root on a host it left, or one that
lost trust since) cannot use it while the VMI lives on elsewhere."""
NOT_RUNNING: Final = "NotRunning"
MEMBER_UNKNOWN: Final = "MemberUnknown"
MEMBER_NOT_TRUSTED: Final = "MemberNotTrusted"
VERDICT_EXPIRED: Final = "VerdictExpired"
REFERENCES_CHANGED: Final = "ReferencesChanged"
"""The member's verdict rests on reference values the policy in force no longer holds (a
golden value or its reference set revoked, its member class removed): nothing is released on
it until a quote judged by the new values verifies (or no policy is in force at all)."""
LEVEL_TOO_LOW: Final = "LevelTooLow"
MEMBER_UNSETTLED: Final = "MemberUnsettled"
"""The member's Node's trust labels say less than its stored verdict (the replica holding it
reached a verdict it could not store, or the labels have not followed a change yet): a 503,
ask again (a replica that holds the member, or labels that caught up, answer)."""
MEMBER_REBOOTED: Final = "MemberRebooted"
"""The member's host booted again since the quote its verdict rests on (its Node reports
another bootID): nothing is released to what runs there until a quote of this boot is
judged, which gtvp asks for at once. A 503: ask again."""
TOKEN_REFUSED: Final = "TokenRefused"  # noqa: S105 - a name, not a secret
TOKEN_OTHER_MEMBER: Final = "TokenForAnotherMember"  # noqa: S105 - a name, not a secret
TOKEN_NOT_AFFIRMING: Final = "TokenNotAffirming"  # noqa: S105 - a name, not a secret
SECRET_NOT_NAMED: Final = "SecretNotNamed"  # noqa: S105 - a name, not a secret
SECRET_UNAVAILABLE: Final = "SecretUnavailable"  # noqa: S105 - a name, not a secret
SECRET_NOT_RELEASABLE: Final = "SecretNotReleasable"  # noqa: S105 - a name, not a secret
VMI_NOT_GATED: Final = "VmiNotGated"
NOT_COMPOSED: Final = "NotComposed"
"""A box's VMI does not boot a composition gtvp made for the box (`status.composedBoots`)."""
BOX_NOT_ATTESTED: Final = "BoxNotAttested"
SECRET_CHANGED: Final = "SecretChanged"  # noqa: S105 - a name, not a secret
"""A repeat (`RELEASED_AGAIN`) found a Secret changed since the release it repeats."""
REASONS: Final = (
    NO_SUCH_BOX,
    NOTHING_TO_RELEASE,
    NO_CREDENTIAL,
    WRONG_CREDENTIAL,
    CREDENTIAL_USED,
    CREDENTIAL_FOR_NEXT_BOOT,
    NOT_RUNNING,
    MEMBER_UNKNOWN,
    MEMBER_NOT_TRUSTED,
    VERDICT_EXPIRED,
    REFERENCES_CHANGED,
    LEVEL_TOO_LOW,
    MEMBER_REBOOTED,
    MEMBER_UNSETTLED,
    TOKEN_REFUSED,
    TOKEN_OTHER_MEMBER,
    TOKEN_NOT_AFFIRMING,
    SECRET_NOT_NAMED,
    SECRET_UNAVAILABLE,
    SECRET_NOT_RELEASABLE,
    VMI_NOT_GATED,
    NOT_COMPOSED,
    BOX_NOT_ATTESTED,
    SECRET_CHANGED,
)
UNAVAILABLE: Final = "Unavailable"
"""gtvp could not answer (the API server failed or timed out under the request): a 503
saying to ask again (a consuming write that failed is read back first: SecretUnavailable)."""
RESULTS: Final = (RELEASED, RELEASED_AGAIN, *REASONS, UNAVAILABLE)
ASK_AGAIN: Final = frozenset({MEMBER_REBOOTED, MEMBER_UNSETTLED, UNAVAILABLE})
"""Refusals answered 503: what they wait for comes by itself (a fresh quote, an API server
that answers); the guest's fetch script asks again. The rest are 403."""


class BadRequest(ValueError):
    """A request that is not one (HTTP 400); the message says what is wrong."""


@dataclass(frozen=True)
class Settings:
    """What the guest is told in its cloud-init: where gtvp's endpoint is and which CA
    signs its certificate (PEM; None: the guest's own trust store)."""

    url: str
    ca_pem: str | None = None


@dataclass(frozen=True)
class Request:
    """A guest's request (`POST PATH`, JSON)."""

    namespace: str
    box: str
    """The name of the LazyBox, or of the VirtualMachine when `kind` is VM."""
    credential: str = field(repr=False)
    token: str = field(default="", repr=False)
    """Empty: the first step (TOKEN_REQUIRED)."""
    secrets: tuple[str, ...] | None = None
    """The Secrets asked for (None: every Secret the box names)."""
    kind: str = BOX
    retry: str = field(default="", repr=False)
    """A random string the guest made for this exchange (empty: none): with it, and only
    with it, an answer lost after the credential was consumed can be asked for again."""


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise BadRequest(f"{what} must be a Kubernetes object name")
    return value


def parse_request(raw: bytes) -> Request:
    """The request in `raw` (JSON: namespace, box, credential, token, optional secrets)."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise BadRequest(f"the request is longer than {MAX_REQUEST_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # nested too deep too
        raise BadRequest("the request is not JSON") from exc
    if not isinstance(body, dict):
        raise BadRequest("the request is not a JSON object")
    credential = body.get("credential")
    if not isinstance(credential, str) or not CREDENTIAL_PATTERN.fullmatch(credential):
        raise BadRequest("'credential' must be the credential from the VM's cloud-init")
    token = body.get("token", "")
    if not isinstance(token, str) or len(token) > ear.MAX_TOKEN_BYTES:
        raise BadRequest("'token' must be the host's verdict token (GET /ear/members/<host>)")
    asked = body.get("secrets")
    secrets: tuple[str, ...] | None = None
    if asked is not None:
        if not isinstance(asked, list) or not asked:
            raise BadRequest("'secrets' must be a non-empty list of Secret names")
        secrets = tuple(_name(s, "each of 'secrets'") for s in asked)
    retry = body.get("retry", "")
    if retry != "" and (not isinstance(retry, str) or not CREDENTIAL_PATTERN.fullmatch(retry)):
        raise BadRequest("'retry' must be 32 to 128 random letters, digits, '-' or '_'")
    if ("box" in body) == ("vm" in body):
        raise BadRequest("name either a LazyBox ('box') or a gated VirtualMachine ('vm')")
    kind = BOX if "box" in body else VM
    return Request(
        namespace=_name(body.get("namespace"), "'namespace'"),
        box=_name(body.get(kind), f"'{kind}'"),
        credential=credential,
        token=token.strip(),
        secrets=secrets,
        kind=kind,
        retry=retry,
    )


def credential_hash(credential: str) -> str:
    """What is stored of a credential: its SHA-256, hex."""
    return hashlib.sha256(credential.encode("ascii")).hexdigest()


def cloud_init_secret(box: str) -> str:
    """The name of box `box`'s cloud-init Secret."""
    return (box + SECRET_SUFFIX)[:253]


def credential_secret(kind: str, name: str) -> str:
    """Where the credential of a box (its cloud-init Secret) or a gated VM is kept."""
    return cloud_init_secret(name) if kind == BOX else (name + VM_SECRET_SUFFIX)[:253]


def vm_subject(vm: Mapping[str, Any], level: int) -> dict[str, Any]:
    """A gated VM (of `level`) seen as a box: its metadata, its level and the Secrets its
    annotation VM_SECRETS_ANNOTATION names (none when the annotation is not such JSON)."""
    meta = vm.get("metadata") or {}
    try:
        named = json.loads(str((meta.get("annotations") or {}).get(VM_SECRETS_ANNOTATION, "[]")))
    except (ValueError, RecursionError):
        named = []
    return {
        "metadata": meta,
        "spec": {"level": level, "secrets": named if isinstance(named, list) else []},
    }


@dataclass(frozen=True)
class Named:
    """A Secret a box names, and the keys to release of it (None: every key)."""

    name: str
    keys: tuple[str, ...] | None = None


def named_secrets(spec: Mapping[str, Any]) -> tuple[Named, ...]:
    """The Secrets `spec` (a LazyBox's) names, in its order."""
    out = []
    for item in spec.get("secrets") or ():
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            keys = item.get("keys")
            out.append(Named(item["name"], tuple(str(k) for k in keys) if keys else None))
    return tuple(out)


@dataclass(frozen=True)
class Facts:
    """What gtvp sees when a request arrives."""

    box: Mapping[str, Any] | None
    """The LazyBox in the operator's view (None: no such box)."""
    issued: Mapping[str, str] | None
    """The annotations of the box's cloud-init Secret, read from the API server now (None:
    no Secret): the one place the credential's hash and the used ones are kept."""
    vmi: Mapping[str, Any] | None
    """The box's VMI in the operator's view (None: none)."""
    member: Mapping[str, Any] | None
    """The Member the VMI runs on, in the operator's view (None: unknown)."""
    pod_members: Mapping[str, Mapping[str, Any] | None]
    """The other nodes the VMI's launcher pods hold it on (`gtvp.core.launchers`) -> their
    Member in the operator's view (None: no Member). Each must be Trusted at the level too."""
    claims: Mapping[str, Any] | None
    """The token's claims once verified (None: refused, see `token_refusal`)."""
    token_refusal: tuple[str, str] | None = None
    """(reason code, why) when the token did not verify."""
    policy: Policy | None = None
    """The SecurityPolicy in force, as accepted (None: none is, and nothing is released):
    each verdict must still rest on reference values it holds."""
    node_boots: Mapping[str, str | None] = field(default_factory=dict)
    """The boot (kubelet's bootID) each of those members' Node reports, in the operator's
    view (absent or None: unknown)."""
    attest_boxes: bool = False
    """The SecurityPolicy attests boxes (spec.boxAttestation, or set but unusable): a box's
    Secrets then wait until its vTPM is attested where it runs, on this boot."""


@dataclass(frozen=True)
class Verdict:
    """Release (reason RELEASED, the Secrets to give) or refuse (a reason of REASONS)."""

    reason: str
    message: str
    node: str | None = None
    secrets: tuple[Named, ...] = ()

    @property
    def released(self) -> bool:
        return self.reason in (RELEASED, RELEASED_AGAIN)

    @property
    def again(self) -> bool:
        """Released to the guest that consumed the credential already: consume nothing."""
        return self.reason == RELEASED_AGAIN


BEFORE_THE_CREDENTIAL = frozenset(
    {NO_SUCH_BOX, NOTHING_TO_RELEASE, NO_CREDENTIAL, WRONG_CREDENTIAL}
)
"""Refusals given before the request's credential was found to be one gtvp issued."""
NOT_ISSUED = "the credential is not one gtvp issued to this box, or there is no such box"


def told(verdict: Verdict) -> tuple[str, str]:
    """The reason and message a refusal is answered with. Before the credential was found
    to be one gtvp issued to the box, only that it was not: the same answer for a box that
    does not exist, names no Secrets or has no credential yet, so that whoever reaches the
    endpoint without a credential learns nothing of which boxes and gated VMs exist (the
    log, the metric and the box's Event keep the reason)."""
    if verdict.reason in BEFORE_THE_CREDENTIAL:
        return WRONG_CREDENTIAL, NOT_ISSUED
    return verdict.reason, verdict.message


def _refuse(reason: str, message: str, node: str | None = None) -> Verdict:
    return Verdict(reason, message, node)


def _credential(req: Request, facts: Facts, now: dt.datetime) -> Verdict | None:
    """None: the current credential; a RELEASED_AGAIN verdict: the used one, asked again by
    the guest that used it; else the refusal."""
    ann = facts.issued or {}
    current = ann.get(HASH_ANNOTATION)
    if not isinstance(current, str) or not current:
        return _refuse(NO_CREDENTIAL, "no key-release credential was issued to this box")
    got = credential_hash(req.credential)
    if hmac.compare_digest(got, current):
        armed_by = _answered(ann).get("vmi", "")
        uid = vmi_uid(facts.vmi)
        if armed_by and uid and armed_by == uid:
            return _refuse(
                CREDENTIAL_FOR_NEXT_BOOT,
                "this credential was armed by the release to the VMI that is running now "
                "(it got its Secrets then): it is for the VM's next boot",
            )
        return None
    if any(hmac.compare_digest(got, h) for h in _consumed(ann)):
        if repeatable(ann, req, vmi_uid(facts.vmi), now):
            return Verdict(RELEASED_AGAIN, "asked again by the guest that used the credential")
        return _refuse(CREDENTIAL_USED, "the credential was used already (one release each)")
    return _refuse(WRONG_CREDENTIAL, "the credential is not this box's")


def _running_node(vmi: Mapping[str, Any] | None) -> str | None:
    status = (vmi or {}).get("status") or {}
    node = status.get("nodeName")
    if status.get("phase") != "Running" or not node:
        return None
    return str(node)


def _vmi_gated(vmi: Mapping[str, Any] | None, level: int, node: str) -> Verdict | None:
    """The VMI must be one gtvp holds at the box's level (its level label or trust
    selector): a VMI of the same name that is not, which gtvp would neither move nor stop
    when its member loses trust, gets nothing (a VM user could stop the gated VM and start
    an ungated VMI under its name that mounts its credential)."""
    meta = (vmi or {}).get("metadata") or {}
    selector = ((vmi or {}).get("spec") or {}).get("nodeSelector") or {}
    try:
        held = admitted_level(meta.get("labels") or {}, selector)
    except GatingError:
        held = None
    if held is not None and held >= level:
        return None
    said = "not gated" if held is None else f"gated at level {held}"
    return _refuse(
        VMI_NOT_GATED,
        f"VMI {meta.get('name', '?')} is {said}, the box needs {level}: only a VMI gtvp holds "
        "at the box's level gets its Secrets",
        node,
    )


def _composed(
    req: Request, box: Mapping[str, Any], vmi: Mapping[str, Any] | None, node: str
) -> Verdict | None:
    """A box's VMI must boot a composition gtvp made for the box (`compose.runs_composition`:
    its kernel, kernel command line, which pins every component disk, volumes and access
    credentials as `status.composedBoots` records them). Whoever may edit VMs in the
    namespace could otherwise boot disks of their own under the box's name and take its
    Secrets. A gated VM that is not a box has no composition: its Secrets consent to the VM
    by name."""
    if req.kind != BOX or vmi_runs_composition(box.get("status") or {}, vmi):
        return None
    return _refuse(NOT_COMPOSED, NOT_COMPOSED_MESSAGE, node)


def _member_trusted(
    member: Mapping[str, Any] | None,
    node: str,
    level: int,
    now: dt.datetime,
    facts: Facts,
) -> Verdict | None:
    policy = facts.policy
    if member is None:
        return _refuse(MEMBER_UNKNOWN, f"the VM runs on {node}, which is no Member", node)
    status = member.get("status") or {}
    trust = status.get("trust") or {}
    if trust.get("reason") == NOT_STORED:
        return _refuse(
            MEMBER_UNSETTLED,
            f"the trust labels of member {node}, where the VM runs, say less than its stored "
            "verdict; ask again",
            node,
        )
    if status.get("phase") != "Trusted" or trust.get("verdict") != "Trusted":
        why = trust.get("reason") or status.get("phase") or "no verdict"
        return _refuse(
            MEMBER_NOT_TRUSTED, f"the VM runs on member {node}, which is not Trusted ({why})", node
        )
    expires = parse_ts(trust.get("expiresAt"))
    if expires is None or expires <= now:
        return _refuse(
            VERDICT_EXPIRED, f"the verdict of member {node}, where the VM runs, has expired", node
        )
    revoked = (
        "no SecurityPolicy is in force" if policy is None else references_revoked(trust, policy)
    )
    if revoked is not None:
        return _refuse(
            REFERENCES_CHANGED,
            f"member {node}, where the VM runs, is not vouched for: {revoked}",
            node,
        )
    return _member_holds(status, node, level, facts)


def _member_holds(status: Mapping[str, Any], node: str, level: int, facts: Facts) -> Verdict | None:
    """A Trusted member's verdict, in force, holds the box's level for the boot it runs."""
    held = int(status.get("level", 0) or 0)
    if held < level:
        return _refuse(
            LEVEL_TOO_LOW,
            f"member {node}, where the VM runs, is Trusted at level {held}, the box needs {level}",
            node,
        )
    if boot_unquoted(status, facts.node_boots.get(node)):
        return _refuse(
            MEMBER_REBOOTED,
            f"member {node}, where the VM runs, booted again since the quote its verdict "
            "rests on: nothing is released until a quote of this boot is judged (asked for "
            "now): ask again",
            node,
        )
    return None


def _token(facts: Facts, node: str, level: int) -> Verdict | None:
    if facts.claims is None:
        code, why = facts.token_refusal or ("refused", "the token did not verify")
        return _refuse(TOKEN_REFUSED, f"the verdict token was refused ({code}): {why}", node)
    try:
        found = ear.appraisals(facts.claims)
    except ear.TokenRefused as exc:
        return _refuse(TOKEN_REFUSED, f"the verdict token was refused ({exc.reason}): {exc}", node)
    names = sorted(a.member for a in found)
    if names != [node]:
        return _refuse(
            TOKEN_OTHER_MEMBER,
            f"the token is about member(s) {', '.join(names)}, the VM runs on {node}",
            node,
        )
    (a,) = found
    if a.status != ear.AFFIRMING:
        return _refuse(TOKEN_NOT_AFFIRMING, f"the token's status is {a.status}", node)
    if a.level < level:
        return _refuse(
            LEVEL_TOO_LOW, f"the token states level {a.level}, the box needs {level}", node
        )
    return None


def _asked(req: Request, named: Sequence[Named], node: str, *, again: bool) -> Verdict:
    if req.secrets is None:
        asked = tuple(named)
    else:
        by_name = {n.name: n for n in named}
        other = [s for s in req.secrets if s not in by_name]
        if other:
            return _refuse(
                SECRET_NOT_NAMED, f"the box does not name Secret(s) {', '.join(other)}", node
            )
        asked = tuple(by_name[s] for s in dict.fromkeys(req.secrets))
    names = ", ".join(n.name for n in asked)
    if again:
        said = f"released Secret(s) {names} again to the VM on member {node} (its answer was lost)"
        return Verdict(RELEASED_AGAIN, said, node, asked)
    return Verdict(RELEASED, f"released Secret(s) {names} to the VM on member {node}", node, asked)


def _box(req: Request, facts: Facts, now: dt.datetime) -> Verdict | None:
    if facts.box is None:
        what = "LazyBox" if req.kind == BOX else "gated VirtualMachine"
        return _refuse(NO_SUCH_BOX, f"no {what} {req.namespace}/{req.box}")
    if not named_secrets(facts.box.get("spec") or {}):
        where = "spec.secrets" if req.kind == BOX else f"annotation {VM_SECRETS_ANNOTATION}"
        return _refuse(NOTHING_TO_RELEASE, f"the {req.kind} names no Secrets ({where})")
    return _credential(req, facts, now)


def _attested(req: Request, facts: Facts, node: str) -> Verdict | None:
    """Under a policy that attests boxes, a box's Secrets go only to a VM whose vTPM quote
    gtvp verified on this member for this VMI (docs/boxattest.md): its components, not
    only its host, are what gtvp composed. Gated VMs (not boxes) have no vTPM to attest."""
    if not facts.attest_boxes or req.kind != BOX or facts.box is None:
        return None
    att = (facts.box.get("status") or {}).get("attestation") or {}
    uid = ((facts.vmi or {}).get("metadata") or {}).get("uid")
    if (
        att.get("state") == VERIFIED
        and att.get("member") == node
        and uid is not None
        and att.get("vmiUID") == uid
    ):
        return None
    state = att.get("state") or "not armed"
    said = f"{state}: {att['message']}" if att.get("message") else state
    return _refuse(
        BOX_NOT_ATTESTED,
        f"the box's vTPM is not attested on member {node} for this boot ({said}); gtvp "
        "releases its Secrets once a quote there is verified",
        node,
    )


def decide(req: Request, facts: Facts, now: dt.datetime) -> Verdict:
    """Release or refuse (every check must pass; the first that fails is the reason)."""
    refused = _box(req, facts, now)
    again = refused is not None and refused.again
    if (refused is not None and not again) or facts.box is None:
        return refused or _refuse(NO_SUCH_BOX, "no such box")
    node = _running_node(facts.vmi)
    if node is None:
        return _refuse(NOT_RUNNING, "the box's VMI is not Running on a member")
    spec = facts.box.get("spec") or {}
    level = box_level(facts.box)
    if not req.token:
        return Verdict(TOKEN_REQUIRED, f"send the verdict token of member {node}", node)
    refused = (
        _vmi_gated(facts.vmi, level, node)
        or _composed(req, facts.box, facts.vmi, node)
        or _member_trusted(facts.member, node, level, now, facts)
        or _token(facts, node, level)
    )
    for other, member in sorted(facts.pod_members.items()):
        refused = refused or _pod_elsewhere(_member_trusted(member, other, level, now, facts), node)
    refused = refused or _attested(req, facts, node)
    return refused or _asked(req, named_secrets(spec), node, again=again)


def _pod_elsewhere(refused: Verdict | None, node: str) -> Verdict | None:
    """A refusal about a node where the VM's launcher pod is, though its status names
    `node`, said so."""
    if refused is None:
        return None
    where = f"the VMI's status names member {node} but a launcher pod of it is on {refused.node}"
    return Verdict(refused.reason, f"{where}: {refused.message}", refused.node)


def _consumed(ann: Mapping[str, str]) -> list[str]:
    return [h for h in str(ann.get(CONSUMED_ANNOTATION, "")).split(",") if h]


ISSUED_SKEW: Final = dt.timedelta(seconds=60)
"""How far a credential's issue time (the operator's clock) may be after the creation of
the VMI that booted with it (the API server's clock) for `kept_for`: the operator's clock
may run ahead, and the guest's cloud-init is made after the VMI; a next boot's credential
is kept out by the record of the release to the running VMI, not by this."""


def kept_for(
    ann: Mapping[str, str], credential: str, *, vmi_uid: str, vmi_started: dt.datetime | None
) -> bool:
    """Whether a VM written again keeps `credential`, the current one of a credential
    Secret with these annotations, for the guest that runs now (VMI `vmi_uid`, created at
    `vmi_started`): that guest booted with it (issued no later than the VMI was created, and
    the last release did not go to that VMI: it armed the next boot's), and no release
    consumed it. A guest still waiting to fetch with it is then not locked out; any other
    credential (a next boot's, which root on a host the box ran on may have read) is
    replaced by a fresh one."""
    issued = parse_ts(ann.get(ISSUED_ANNOTATION))
    if not vmi_uid or vmi_started is None or issued is None:
        return False
    if issued > vmi_started + ISSUED_SKEW:
        return False
    if _answered(ann).get("vmi") == vmi_uid:
        return False
    digest = credential_hash(credential)
    return ann.get(HASH_ANNOTATION) == digest and digest not in _consumed(ann)


def issued_annotations(credential: str, now: str) -> dict[str, str]:
    """The cloud-init Secret's annotations for a fresh credential (the VM written anew)."""
    return {HASH_ANNOTATION: credential_hash(credential), ISSUED_ANNOTATION: now}


RELEASE_RECORD = (ANSWERED_ANNOTATION, CONSUMED_ANNOTATION, RELEASES_ANNOTATION)
"""What a credential Secret records of the releases made with it."""


def rearmed_annotations(existing: Mapping[str, str], issued: Mapping[str, str]) -> dict[str, str]:
    """The annotations of a credential Secret armed anew over one that exists (the VM
    written again while its VMI may run: a drift restored, a live update): the fresh
    credential's (`issued_annotations`) with the record of the releases made so far. So,
    while the VMI that got the last release runs, the fresh credential is for its next boot
    as the one it replaces was (`CredentialForNextBoot`: root on a host it ran on read it
    there), used credentials stay used, and a lost answer can still be asked again."""
    kept = {k: str(existing[k]) for k in RELEASE_RECORD if k in existing}
    return {**kept, **issued}


def vmi_uid(vmi: Mapping[str, Any] | None) -> str:
    """The VMI's uid ("" when none)."""
    return str(((vmi or {}).get("metadata") or {}).get("uid") or "")


def _answered(ann: Mapping[str, str]) -> dict[str, str]:
    try:
        got = json.loads(str(ann.get(ANSWERED_ANNOTATION, "{}")))
    except (ValueError, RecursionError):
        return {}
    return {k: v for k, v in got.items() if isinstance(v, str)} if isinstance(got, dict) else {}


def answered(ann: Mapping[str, str] | None, req: Request, uid: str) -> bool:
    """Whether these annotations say the last release consumed `req`'s credential, for the
    holder of `req`'s retry key, for the VMI of `uid` (a guest without a retry key: never)."""
    last = _answered(ann or {})
    return bool(
        req.retry
        and uid
        and hmac.compare_digest(last.get("credential", ""), credential_hash(req.credential))
        and hmac.compare_digest(last.get("retry", ""), credential_hash(req.retry))
        and last.get("vmi") == uid
    )


def is_current(ann: Mapping[str, str] | None, credential: str) -> bool:
    """Whether `credential` is the one these annotations say the next release accepts."""
    current = str((ann or {}).get(HASH_ANNOTATION, ""))
    return hmac.compare_digest(current, credential_hash(credential))


def written_by(ann: Mapping[str, str] | None, write: str) -> bool:
    """Whether the last release recorded in these annotations is the consuming write with
    id `write` (the endpoint's own, read back after the write's answer was an error)."""
    last = _answered(ann or {}).get("write", "")
    return bool(write) and hmac.compare_digest(last, write)


def repeatable(ann: Mapping[str, str], req: Request, uid: str, now: dt.datetime) -> bool:
    """Whether `req` (its credential used) may get the Secrets again: it is the guest that
    used it (`answered`), asking within REPEAT_FOR of that release (by this replica's clock:
    a release up to CLOCK_SKEW in its future, written by a replica whose clock runs ahead,
    counts as just made)."""
    at = parse_ts(_answered(ann).get("at"))
    return answered(ann, req, uid) and at is not None and -CLOCK_SKEW <= now - at <= REPEAT_FOR


def released_digests(retry: str, released: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """Per Secret released (name -> the data given), an HMAC-SHA256 of that data keyed with
    the request's retry key: what a repeat compares (`changed_since_release`). Keyed, so
    that whoever reads the cloud-init Secret's annotations cannot test guesses of a
    low-entropy Secret against it; of the data, so that a label or an annotation added to a
    Secret (a GitOps tool, say) changes nothing. Empty without a retry key (no repeat)."""
    if not retry:
        return {}
    return {
        name: hmac.new(
            retry.encode(), json.dumps(dict(data), sort_keys=True).encode(), hashlib.sha256
        ).hexdigest()[:32]
        for name, data in released.items()
    }


def changed_since_release(ann: Mapping[str, str], digests: Mapping[str, str]) -> str | None:
    """The first Secret (of those about to be given again: name -> `released_digests` of
    its data now) whose data is not what the last release gave (or that it did not give);
    None when all are. A repeat gives the Secrets the lost answer held, not newer ones: a
    Secret rotated after the release (its host found bad since) does not go to whoever
    kept that guest's credential and retry key. A release recorded by an older gtvp,
    without its Secrets' digests, is not judged so."""
    recorded = _answered(ann).get("secrets")
    if recorded is None:
        return None
    given = dict(p.split("=", 1) for p in recorded.split(",") if "=" in p)
    for name, digest in sorted(digests.items()):
        if not hmac.compare_digest(given.get(name, ""), digest):
            return name
    return None


def consumed_annotations(
    ann: Mapping[str, str],
    *,
    used: str,
    next_credential: str,
    now: str,
    retry: str = "",
    vmi: str = "",
    write: str = "",
    digests: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The cloud-init Secret's annotations after a release: the used credential's hash
    remembered, the next one's current, and who the release went to (hashes of the used
    credential and of the request's `retry` key, the VMI's uid: `repeatable`; the id of
    this `write`: `written_by`; the `released_digests` of each Secret released:
    `changed_since_release`). Written with the Secret's resourceVersion as the
    precondition, in the same write that puts the next credential in the user data: of two
    replicas consuming one credential at once, one write fails (409) and that one refuses."""
    out = dict(ann)
    out[ANSWERED_ANNOTATION] = json.dumps(
        {
            "credential": used,
            "retry": credential_hash(retry) if retry else "",
            "vmi": vmi,
            "at": now,
            "write": write,
            "secrets": ",".join(f"{n}={v}" for n, v in sorted((digests or {}).items())),
        },
        sort_keys=True,
    )
    consumed = [used, *[h for h in _consumed(ann) if h != used]][:CONSUMED_KEPT]
    releases = str(ann.get(RELEASES_ANNOTATION, "0"))
    out.update(
        {
            HASH_ANNOTATION: credential_hash(next_credential),
            ISSUED_ANNOTATION: now,
            CONSUMED_ANNOTATION: ",".join(consumed),
            RELEASES_ANNOTATION: str((int(releases) if releases.isdigit() else 0) + 1),
        }
    )
    return out


def releasable_to(annotations: Mapping[str, str] | None, box: str, kind: str = BOX) -> bool:
    """Whether a Secret with these annotations consents to release to box `box` (a gated
    VM `v` is named `vm/v`). `*` is any box of the namespace, `vm/*` any gated VM: a box
    boots only what gtvp composed from signed components (and attested, where the policy
    attests boxes), a gated VM whatever its creator chose, so a Secret meant for any box
    does not go to any VM."""
    allowed = str((annotations or {}).get(RELEASE_TO_ANNOTATION, ""))
    names = {n.strip() for n in allowed.split(",") if n.strip()}
    if kind == BOX:
        return "*" in names or box in names
    return "vm/*" in names or f"vm/{box}" in names


_LEVEL = re.compile(r"[1-9][0-9]{0,2}")


def booted_pins(vmi: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...] | None:
    """The component disks a box's VMI boots, as (serial, sha256 hex) from the `gtvp.disks=`
    its kernel command line pins them with (a serial is a component's name cut to
    SERIAL_MAX); None when it pins none. What gtvp composed only once
    `vmi_runs_composition` holds for the VMI (a line gtvp did not write, malformed: None)."""
    try:
        disks = disks_booted((vmi or {}).get("spec") or {})
    except ValueError:
        return None
    return tuple((d.serial, d.digest.hex()) for d in disks) or None


def disk_names(
    pins: Sequence[tuple[str, str]], components: Sequence[tuple[str, str]]
) -> tuple[frozenset[str], ...]:
    """For each pinned disk (serial, sha256 hex), the full names of the verified
    `components` (name, pin as `sha256:<hex>`) it can be: their pin is its digest and their
    name cut to SERIAL_MAX is its serial (two names sharing their first 20 characters are
    told apart by their bytes)."""
    return tuple(
        frozenset(
            name
            for name, pin in components
            if pin == f"sha256:{sha}" and name[:SERIAL_MAX] == serial
        )
        for serial, sha in pins
    )


def refuses_release(
    annotations: Mapping[str, str] | None,
    box: str,
    kind: str,
    level: int,
    booted: Sequence[frozenset[str]] | None = None,
) -> str | None:
    """Why a Secret with these annotations may not go to box (or VM) `box` of security
    level `level`, whose VMI boots component disks each of which is one of the components
    `booted` names for it (`disk_names`), None when it consents. Completes
    "Secret <name> ..."."""
    ann = annotations or {}
    what = f"{kind} {box}"
    if not releasable_to(ann, box, kind):
        return f"does not consent to release to {what} (annotation {RELEASE_TO_ANNOTATION})"
    raw = str(ann.get(MIN_LEVEL_ANNOTATION, "")).strip()
    if not raw:
        return (
            f"names no level its receivers must have (annotation {MIN_LEVEL_ANNOTATION}, "
            f'for example "{max(level, 1)}"): a box\'s level may be lowered by who edits it'
        )
    if not _LEVEL.fullmatch(raw):
        return f"has {MIN_LEVEL_ANNOTATION}={raw!r}, which is not a level (1, 2, ...)"
    if level < int(raw):
        return f"goes only to level {raw} or above, and {what} is of level {level}"
    return _components_refused(ann, what, kind, booted)


def _components_refused(
    ann: Mapping[str, str], what: str, kind: str, booted: Sequence[frozenset[str]] | None
) -> str | None:
    """Why the component disks `booted` are not all ones the Secret names
    (COMPONENTS_ANNOTATION; None: it names none, or they are)."""
    if COMPONENTS_ANNOTATION not in ann:
        return None
    named = sorted({n.strip() for n in str(ann[COMPONENTS_ANNOTATION]).split(",") if n.strip()})
    said = (
        f"goes only to boxes booting components among {', '.join(named) or '(none)'} "
        f"(annotation {COMPONENTS_ANNOTATION})"
    )
    if kind != BOX:
        return f"{said}, and {what} is no box"
    if not booted:
        return f"{said}, and {what} boots no component disk gtvp pinned"
    others = [names for names in booted if not names & set(named)]
    if others:
        shown = ", ".join(sorted(others[0])) or "a disk no verified component has"
        return f"{said}, and {what} boots {shown} too"
    return None


def select_keys(named: Named, data: Mapping[str, str]) -> dict[str, str] | str:
    """The Secret's data (base64 values) to release, or why it cannot be (a missing key)."""
    if named.keys is None:
        return dict(data)
    missing = [k for k in named.keys if k not in data]
    if missing:
        return f"Secret {named.name} has no key(s) {', '.join(missing)}"
    return {k: data[k] for k in named.keys}
