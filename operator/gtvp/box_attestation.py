"""Box attestation: the shell around `gtvp.core.boxattest` (docs/boxattest.md).

- `arm`: the box loop is about to write the VM of a box under a SecurityPolicy with
  `spec.boxAttestation`. The box's credential (the one its cloud-init Secret already holds,
  else a fresh one) goes into that Secret (`<box>-gtvp-cloudinit`, the VM boots from it) as
  the `#gtvp-attest` line; only its SHA-256 is kept, in `status.attestation.credentialHash`.
- `Endpoint`: `POST /boxattest/v1/{enrol,activate,challenge,quote}` on the key-release
  HTTPS server. Each request reads the LazyBox afresh, checks the credential against the
  hash, takes where the VMI runs from the operator's view (never from the guest), lets the
  core judge, and writes `status.attestation` with the box's resourceVersion as the
  precondition (several replicas may answer: of two writes of one state, one fails and its
  request is answered 409). A mismatch is an Event and the box's level `onUntrusted`
  (a migration off the member, or a stop), once per boot of the box. Every result is counted
  in `gtvp_box_attestations_total{result}`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException

from gtvp import key_release, kube
from gtvp.cluster_view import Key
from gtvp.core import boxattest as ba
from gtvp.core import compose
from gtvp.core import keyrelease as kr
from gtvp.core.api_resources import (
    LAZY_BOXES,
)
from gtvp.core.footprint import FINISHED
from gtvp.core.timestamps import format_ts
from gtvp.metrics import METRICS
from gtvp.runtime import Runtime

log = logging.getLogger("gtvp.boxattest")
JSON = "application/json"


def _count(result: str) -> None:
    METRICS.box_attestations.labels(result).inc()


# -- the policy ------------------------------------------------------------------------------


def settings(rt: Runtime) -> ba.Settings | None:
    """spec.boxAttestation of the SecurityPolicy in force (None: boxes are not attested);
    SettingsError when it is set but unusable."""
    spec = rt.enforced_spec()
    return None if spec is None else ba.parse_settings(spec)


# -- arming a box's VM -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Armed:
    """The VM to write (booting from the cloud-init Secret) and the box's attestation;
    `fresh`: the credential was armed anew (its attestation replaces the status's)."""

    vm: dict[str, Any]
    attestation: dict[str, Any]
    fresh: bool = False


class _Unreadable(Exception):
    """The box's cloud-init Secret could not be read now (the API server failed the read)."""


def _current_credential(rt: Runtime, key: Key, att: Mapping[str, Any]) -> str | None:
    """The credential the box's cloud-init Secret holds, when it is the recorded one (a VM
    rewritten for another reason keeps it: the running guest stays authenticated). A Secret
    that is not there (404), or that gtvp may not read (403: its write then fails with the
    reason), holds none; an API server failing the read (a 5xx, a 429) is `_Unreadable`:
    taking that for a missing credential would arm a new one and a fresh attestation,
    dropping a Mismatch, the move it owes and the EK pin, and lock the running guest out."""
    try:
        secret = rt.clients.core.read_namespaced_secret(kr.cloud_init_secret(key[1]), key[0])
    except ApiException as exc:
        if exc.status in (403, 404):
            return None
        raise _Unreadable(
            f"cannot read the box's cloud-init Secret now ({exc.status} {exc.reason}): "
            "looked at again"
        ) from exc
    raw = (secret.data or {}).get(kr.USER_DATA_KEY)
    if not raw:
        return None
    got = ba.credential_of(base64.b64decode(raw).decode(errors="replace"))
    if got is None or ba.credential_hash(got) != att.get("credentialHash"):
        return None
    return got


def _write_secret(rt: Runtime, key: Key, vm: Mapping[str, Any], line: str) -> dict[str, Any] | str:
    ns, name = key
    secret_name = kr.cloud_init_secret(name)
    try:
        out, user_data = compose.with_cloud_init_secret(vm, secret_name)
    except compose.CompositionError as exc:
        return str(exc)
    box = rt.view.boxes.get(key) or {}
    meta = box.get("metadata") or {}
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name,
            "namespace": ns,
            "labels": {compose.BOX_LABEL: name},
            "ownerReferences": [
                {
                    "apiVersion": LAZY_BOXES.api_version,
                    "kind": LAZY_BOXES.kind,
                    "name": name,
                    "uid": str(meta.get("uid", "")),
                    "controller": True,
                }
            ],
        },
        "data": {
            kr.USER_DATA_KEY: base64.b64encode(
                ba.with_attest_line(user_data, line).encode()
            ).decode()
        },
    }
    failed = key_release.write_cloud_init_secret(rt, body)
    return out if failed is None else failed


def arm(
    rt: Runtime, key: Key, vm: Mapping[str, Any], *, restart: bool = False
) -> Armed | str | None:
    """The VM to write for box `key` with its attestation credential in its cloud-init
    Secret (and its key-release credential when it names Secrets: `key_release.arm`, told
    whether the VMI is `restart`ed), or why it cannot be; None when the policy does not
    attest boxes."""
    try:
        wanted = settings(rt)
    except ba.SettingsError as exc:
        return f"the SecurityPolicy's box attestation is unusable: {exc}"
    if wanted is None:
        return None
    serving = rt.key_release
    if serving is None:
        return (
            "the SecurityPolicy attests boxes (spec.boxAttestation) but this gtvp-operator "
            "serves no key-release endpoint for them to attest to (--key-release-url)"
        )
    ns, name = key
    box = rt.view.boxes.get(key) or {}
    att = dict((box.get("status") or {}).get("attestation") or {})
    try:
        credential = _current_credential(rt, key, att) or key_release.new_credential()
    except _Unreadable as exc:
        return str(exc)
    line = ba.attest_line(
        url=serving.url,
        namespace=ns,
        box=name,
        credential=credential,
        ca_pem=serving.ca_pem,
        pcr=wanted.pcr,
    )
    if key_release.names_secrets(box):
        out = key_release.arm(rt, key, dict(vm), extra_user_data=line, restart=restart)
    else:
        out = _write_secret(rt, key, vm, line)
    if isinstance(out, str):
        return out
    fresh = att.get("credentialHash") != ba.credential_hash(credential)
    if fresh:
        att = ba.fresh_attestation(credential)
        log.info("box %s/%s: a new attestation credential is in its cloud-init Secret", ns, name)
    return Armed(ba.with_vtpm(out), att, fresh)


# -- the endpoint ----------------------------------------------------------------------------


def _json(code: int, body: Mapping[str, Any]) -> tuple[int, str, bytes]:
    return code, JSON, json.dumps(body, sort_keys=True).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Endpoint:
    """`POST /boxattest/v1/*` (`gtvp.http_endpoints.serve(box_attest=...)`)."""

    def __init__(
        self, rt: Runtime, clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    ) -> None:
        self.rt = rt
        self.clock = clock

    def __call__(
        self, path: str, method: str, authorization: str | None, raw: bytes
    ) -> tuple[int, str, bytes]:
        if method != "POST":
            return _json(405, {"error": "MethodNotAllowed", "message": "POST JSON"})
        box: dict[str, Any] | None = None
        req: ba.Request | None = None
        try:
            req = ba.parse_request(path, authorization, raw)
            box = self._box(req)
            return self._answer(req, box)
        except ba.Refused as exc:
            return self._refuse(req, box, exc)
        except Exception:
            _count(ba.UNAVAILABLE)  # the server answers 503 (ask again) and logs it
            raise

    # -- reading and writing -------------------------------------------------------------

    def _box(self, req: ba.Request) -> dict[str, Any]:
        """The LazyBox, read now, once the credential is its current one. A request the
        view already shows to hold no current credential (no such box, another credential:
        it is armed once per box) is refused before any API call, so that requests from
        anyone who reaches the port cost the API server nothing."""
        seen = self.rt.view.boxes.get((req.namespace, req.box))
        if seen is None:
            raise ba.Refused(ba.WRONG_CREDENTIAL, "the credential is not this box's")
        ba.check_credential(req.credential, _attestation(seen))
        try:
            box = kube.get_if_present(self.rt.clients, LAZY_BOXES, req.box, req.namespace)
        except ApiException as exc:
            raise ba.Refused(ba.CONFLICT, f"the LazyBox cannot be read ({exc.status})") from exc
        if box is None:
            raise ba.Refused(ba.WRONG_CREDENTIAL, "the credential is not this box's")
        ba.check_credential(req.credential, _attestation(box))
        return box

    def _write(self, box: dict[str, Any], att: Mapping[str, Any]) -> dict[str, Any]:
        """Replace the box's status.attestation, conditional on the box's resourceVersion."""
        try:
            return replace_attestation(self.rt, box, att)
        except ApiException as exc:
            if exc.status == 409:
                raise ba.Refused(
                    ba.CONFLICT, "the box's attestation changed meanwhile: ask again"
                ) from exc
            raise ba.Refused(
                ba.CONFLICT, f"the box's attestation cannot be written ({exc.status}): ask again"
            ) from exc

    def _where(self, req: ba.Request) -> ba.Where | None:
        """Where the box runs, for its guest's requests: one member (None while it is held
        on several, mid-migration or where its status and its pods disagree: the guest
        asks again; a quote taken before a move must not count as one after it)."""
        where = where_runs(self.rt, vmi_key(req))
        return where if where is not None and where.settled else None

    def _running(self, req: ba.Request) -> ba.Where:
        where = self._where(req)
        if where is None:
            raise ba.Refused(
                ba.NOT_RUNNING,
                "the box's VMI is not running on one member (not started, ended, or "
                "migrating): ask again",
            )
        return where

    def _settings(self) -> ba.Settings:
        try:
            got = settings(self.rt)
        except ba.SettingsError as exc:
            raise ba.Refused(
                ba.NOT_REQUIRED, f"the policy's box attestation is unusable: {exc}"
            ) from exc
        if got is None:
            raise ba.Refused(ba.NOT_REQUIRED, "the SecurityPolicy does not attest boxes")
        return got

    # -- answering -------------------------------------------------------------------------

    def _answer(self, req: ba.Request, box: dict[str, Any]) -> tuple[int, str, bytes]:
        if req.path == ba.ENROL:
            return self._enrol(req, box)
        if req.path == ba.ACTIVATE:
            return self._activate(req, box)
        if req.path == ba.CHALLENGE:
            return self._challenge(req, box)
        return self._quote(req, box)

    def _enrol(self, req: ba.Request, box: dict[str, Any]) -> tuple[int, str, bytes]:
        now = self.clock()
        checked = ba.check_enrolment(req.body, self._settings(), now)
        running = self._running(req)
        ba.check_ek_pin(_attestation(box), checked.ek_sha256, running, _b64(checked.ak_public))
        ba.check_enrol_rate(_attestation(box), running, checked.ek_sha256, now)
        secret = secrets.token_bytes(32)
        challenge = ba.activation_challenge(checked, secret)
        enrolment = secrets.token_hex(8)
        att = {
            **_attestation(box),
            "lastEnrolments": [
                *ba.recent_enrolments(_attestation(box), now)[-(ba.ENROLS_PER_VMI - 1) :],
                {"at": format_ts(now), "vmiUID": running.vmi_uid, "ekSHA256": checked.ek_sha256},
            ],
            "enrolment": {
                "id": enrolment,
                "secretSHA256": challenge.secret_sha256,
                "akPublic": _b64(checked.ak_public),
                "ekSHA256": checked.ek_sha256,
                "issuedAt": format_ts(now),
            },
        }
        self._write(box, att)
        _count("Enrolling")
        return _json(
            200,
            {
                "enrolment": enrolment,
                "credentialBlob": _b64(challenge.credential_blob),
                "secret": _b64(challenge.encrypted_secret),
            },
        )

    def _activate(self, req: ba.Request, box: dict[str, Any]) -> tuple[int, str, bytes]:
        proof = ba.b64_field(req.body, "secret", "the ActivateCredential output", 256)
        att = ba.check_activation(
            _attestation(box), req.body.get("enrolment"), proof, self._running(req)
        )
        self._write(box, att)
        _count("Bound")
        log.info("box %s/%s: its vTPM AK is bound to its EK", req.namespace, req.box)
        return _json(200, {"bound": True})

    def _challenge(self, req: ba.Request, box: dict[str, Any]) -> tuple[int, str, bytes]:
        att = _attestation(box)
        where = self._where(req)
        if ba.must_enrol(att, where):
            return _json(200, {"enrol": True, "nonce": None, "retryAfter": 0})
        if where is None or not ba.wants_quote(att, where):
            return _json(200, {"nonce": None, "retryAfter": ba.RETRY_AFTER})
        now = self.clock()
        nonce = ba.pending_nonce(att, where, now)
        if nonce is None:
            fresh = secrets.token_bytes(32)
            self._write(box, ba.with_nonce(att, fresh, where, now))
            nonce = fresh.hex()
        return _json(200, {"nonce": nonce, "retryAfter": ba.RETRY_AFTER})

    def _quote(self, req: ba.Request, box: dict[str, Any]) -> tuple[int, str, bytes]:
        wanted = self._settings()
        att = _attestation(box)
        where = self._running(req)
        disks = self._disks(req, box)
        resolved = (box.get("status") or {}).get("resolved") or []
        outcome = ba.check_quote(
            att,
            req.body,
            settings=wanted,
            disks=disks,
            components=ba.component_names(disks, resolved),
            where=where,
            now=self.clock(),
        )
        new = outcome.attestation
        act = outcome.reason == ba.COMPONENT_MISMATCH and ba.act_on_mismatch(att, where)
        if act:
            new = {**new, **ba.acted_on(where, self.clock())}
        self._write(box, new)  # only the replica whose write succeeded acts
        _count(outcome.reason)
        if outcome.verified:
            if att.get("state") != ba.VERIFIED or att.get("member") != where.member:
                self._event(req, box, "Normal", "BoxAttested", outcome.message)
        else:
            self._event(req, box, "Warning", f"BoxAttestation{outcome.reason}", outcome.message)
        if act:
            on_untrusted(vmi_key(req), where)
        log.info(
            "box %s/%s attestation on %s: %s: %s",
            req.namespace,
            req.box,
            where.member,
            outcome.reason,
            outcome.message,
        )
        return _json(
            200,
            {"verified": outcome.verified, "reason": outcome.reason, "message": outcome.message},
        )

    def _disks(self, req: ba.Request, box: Mapping[str, Any]) -> tuple[ba.Disk, ...]:
        """The component disks the box's VMI boots, pinned on its kernel command line, when
        what it boots is a composition gtvp made for the box (`status.composedBoots`):
        whoever may edit VMs in the namespace could otherwise put disks of their own, with
        their own pins, on the line the measurements are compared with."""
        vmi = self.rt.view.vmis.get((req.namespace, req.box))
        if vmi is None or not compose.vmi_runs_composition(box.get("status") or {}, vmi):
            raise ba.Refused(ba.NOT_COMPOSED, compose.NOT_COMPOSED_MESSAGE)
        try:
            return ba.disks_booted(vmi.get("spec") or {})
        except ValueError as exc:
            raise ba.Refused(ba.QUOTE_INVALID, f"the composed disks: {exc}") from exc

    # -- onUntrusted -------------------------------------------------------------------------

    # -- refusals and Events ---------------------------------------------------------------

    def _refuse(
        self, req: ba.Request | None, box: Mapping[str, Any] | None, exc: ba.Refused
    ) -> tuple[int, str, bytes]:
        _count(exc.reason)
        where = f"{req.namespace}/{req.box}" if req is not None else "?"
        log.info("box attestation for %s refused: %s: %s", where, exc.reason, exc.message)
        # no Event for a conflict, a malformed request or an enrolment too soon: each
        # would be a write that whoever holds the credential could ask for without pause
        quiet = (ba.CONFLICT, ba.BAD_REQUEST, ba.ENROL_TOO_SOON)
        if req is not None and box is not None and exc.reason not in quiet:
            self._event(
                req, box, "Warning", "BoxAttestationRefused", f"{exc.reason}: {exc.message}"
            )
        return _json(exc.status, {"error": exc.reason, "message": exc.message})

    def _event(
        self, req: ba.Request, box: Mapping[str, Any], type_: str, reason: str, message: str
    ) -> None:
        try:
            kube.post_object_event(
                self.rt.clients,
                LAZY_BOXES,
                box,
                name=req.box,
                namespace=req.namespace,
                type_=type_,
                reason=reason,
                message=message,
            )
        except Exception as exc:  # noqa: BLE001 - the answer stands; the log has it
            log.warning(
                "box %s/%s: cannot post the %s Event: %s", req.namespace, req.box, reason, exc
            )


def on_untrusted(key: Key, where: ba.Where) -> None:
    """The box's vTPM evidence failed on `where` for this boot (recorded on the box:
    `ba.must_leave`): the leader's box loop, on its next full pass (every 5 s), applies
    the level's onUntrusted (`handlers.evacuation.evacuate_unattested`: a migration planned
    and started as every evacuation's, through pre-fetch; Stop; Keep) until the box has
    left. Called from the endpoint's threads: it only says so."""
    log.warning(
        "box %s/%s: vTPM evidence failed on %s (VMI %s): its level's onUntrusted applies",
        key[0],
        key[1],
        where.member,
        where.vmi_uid[:8],
    )


def where_runs(rt: Runtime, key: Key) -> ba.Where | None:
    """Where the operator holds the box's VMI (None: it has not been placed on a member or
    has ended): the node its status names as the view keeps it (a blanked status does not
    hide it), and every node a launcher pod of it holds it on (`ClusterView.nodes_of`).
    Root on a host can write the VMI's status with that host's virt-handler token: what
    it writes there neither moves the box's attestation clock to another member nor ends
    a move gtvp owes (`boxattest.Where.on`). Any phase but an ended one counts once the
    VMI has a node (the deadline clock starts at the first Running, `overdue_step`; a host
    writing its VMI back to an earlier phase does not stop it)."""
    vmi = rt.view.vmis.get(key) or {}
    phase = (vmi.get("status") or {}).get("phase")
    nodes = rt.view.nodes_of.get(key, frozenset())
    member = rt.view.node_of.get(key) or min(nodes, default=None)
    if phase in FINISHED or member is None:
        return None
    return ba.Where(member, str((vmi.get("metadata") or {}).get("uid", "")), nodes)


def replace_attestation(
    rt: Runtime, box: Mapping[str, Any], att: Mapping[str, Any]
) -> dict[str, Any]:
    """Replace the box's status.attestation, conditional on the box's resourceVersion
    (ApiException 409 when it changed meanwhile: another replica or the guest wrote)."""
    body = json.loads(json.dumps(box))
    body.setdefault("status", {})["attestation"] = dict(att)
    meta = body["metadata"]
    group, version, plural = LAZY_BOXES.coordinates
    out: dict[str, Any] = rt.clients.custom.replace_namespaced_custom_object_status(
        group, version, meta["namespace"], plural, meta["name"], body
    )
    return out


def sweep_overdue(rt: Runtime, now: dt.datetime | None = None) -> list[Key]:
    """Start each running box's attestation clock and act on the boxes past the policy's
    deadline without a verified quote where they run (`gtvp.core.boxattest.overdue_step`);
    the boxes made Overdue now. Blocking (API writes): the box loop runs it in a thread, on
    the leader."""
    try:
        wanted = settings(rt)
    except ba.SettingsError:
        return []  # said where boxes are armed (they turn Failed)
    if wanted is None:
        return []
    now = now or dt.datetime.now(dt.UTC)
    overdue: list[Key] = []
    for key, box in list(rt.view.boxes.items()):
        where = where_runs(rt, key)
        att = _attestation(box)
        if where is None or not att.get("credentialHash"):
            continue  # not running, or not armed under attestation
        phase = ((rt.view.vmis.get(key) or {}).get("status") or {}).get("phase")
        new, act = ba.overdue_step(att, where, now, wanted.deadline, running=phase == "Running")
        if new is None:
            continue
        try:
            replace_attestation(rt, box, new)
        except ApiException as exc:
            log.debug("box %s/%s: attestation clock not written (%s)", *key, exc.status)
            continue  # changed meanwhile: the next pass looks again
        if new.get("state") != ba.OVERDUE:
            continue
        overdue.append(key)
        _count(ba.ATTESTATION_OVERDUE)
        log.warning("box %s/%s: %s", *key, new["message"])
        with contextlib.suppress(ApiException):
            kube.post_object_event(
                rt.clients,
                LAZY_BOXES,
                box,
                name=key[1],
                namespace=key[0],
                type_="Warning",
                reason="BoxAttestationOverdue",
                message=str(new["message"]),
            )
        if act:
            on_untrusted(key, where)
    return overdue


def vmi_key(req: ba.Request) -> tuple[str, str]:
    return req.namespace, req.box


def _attestation(box: Mapping[str, Any]) -> dict[str, Any]:
    return dict((box.get("status") or {}).get("attestation") or {})
