"""Attestation-gated key release: the shell around `gtvp.core.keyrelease` (docs/keyrelease.md).

- `arm`: the box loop is about to write the VM of a box that names Secrets. A fresh
  one-time credential goes into the box's cloud-init Secret (`<box>-gtvp-cloudinit`, owned
  by the box) with its SHA-256 in the Secret's annotations, and the VM is made to boot from
  that Secret (`cloudInitNoCloud.secretRef`), never with the credential in its spec.
- `arm_gated_vms`: a gated VirtualMachine that is not a box names Secrets in its annotation
  `gtvp.io/secrets`: its credential goes into the Secret `<vm>-gtvp-keyrelease` (owned by
  the VM), which the VM mounts as a KubeVirt `secret` disk (gtvp does not write its spec).
- `Endpoint`: `POST /keyrelease/v1/release`, served only over TLS. It reads the cloud-init
  Secret afresh (the credential's state lives there, written only here), takes where the
  box's VMI runs and that member's verdict from the operator's view, verifies the token with
  the operator's own keys, and lets `decide` judge. A release reads the named Secrets, then
  consumes the credential and arms the next one in *one* write of the cloud-init Secret
  with its resourceVersion as precondition (a replay, another replica or a restart cannot
  accept it again), then answers. When that write fails, the Secret is read again: a
  write that committed anyway (a 504 after the fact, or this guest's own earlier attempt
  winning a 409) is the guest's release, and it is answered; the guest that lost an
  answer asks again with its retry key (`kr.repeatable`). Every release and refusal is an
  Event on the box (KeyReleased / KeyReleaseRefused, never a secret value or credential)
  and counted in `gtvp_key_releases_total{result}`.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException

from gtvp import kube
from gtvp.cluster_view import Key
from gtvp.core import boxattest as ba
from gtvp.core import compose, ear
from gtvp.core import keyrelease as kr
from gtvp.core.api_resources import (
    LAZY_BOXES,
    MEMBERS,
    SECURITY_POLICIES,
    VIRTUAL_MACHINE_INSTANCES,
    VIRTUAL_MACHINES,
    ApiResource,
)
from gtvp.core.components import ComponentError, parse_component
from gtvp.core.gating import GatingError, box_level, vm_level
from gtvp.core.launchers import launcher_pod, pod_nodes
from gtvp.core.timestamps import format_ts, parse_ts
from gtvp.metrics import METRICS
from gtvp.runtime import Runtime

log = logging.getLogger("gtvp.keyrelease")
JSON = "application/json"
WRITE_MARGIN = dt.timedelta(seconds=2)
"""A verdict that runs out sooner than this is not written on: the consuming write and its
answer take time, and a release judged void after the write has used the credential for
nothing (the guest's repeat then waits for a fresh verdict)."""
RBAC_HINT = (
    "bind the ClusterRole gtvp-key-release to gtvp-operator in this namespace (a RoleBinding; "
    "docs/keyrelease.md)"
)


def names_secrets(box: Mapping[str, Any]) -> bool:
    """Whether the box (a LazyBox body) names Secrets to receive."""
    return bool(kr.named_secrets(box.get("spec") or {}))


def new_credential() -> str:
    """A fresh credential: 256 random bits, base64url (43 characters)."""
    return secrets.token_urlsafe(32)


def _credential_secret(
    namespace: str,
    name: str,
    credential: str,
    *,
    owner: dict[str, Any],
    files: dict[str, str],
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The Secret a VM boots with: `files` (its cloud-init, or the files of its secret
    disk) and, in its annotations, only the hash of the credential they hold."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "annotations": kr.issued_annotations(credential, format_ts(dt.datetime.now(dt.UTC))),
        "ownerReferences": [owner],
    }
    if labels:
        meta["labels"] = labels
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": meta,
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in files.items()},
    }


def _owner(box: Mapping[str, Any], res: ApiResource = LAZY_BOXES) -> dict[str, Any]:
    meta = box.get("metadata") or {}
    return {
        "apiVersion": res.api_version,
        "kind": res.kind,
        "name": str(meta.get("name", "")),
        "uid": str(meta.get("uid", "")),
        "controller": True,
    }


def arm(
    rt: Runtime,
    key: Key,
    vm: Mapping[str, Any],
    *,
    extra_user_data: str = "",
    restart: bool = False,
) -> dict[str, Any] | str:
    """The VM to write for box `key` (booting from its armed cloud-init Secret), or why it
    cannot be armed (the box is then not started without its Secrets).
    `extra_user_data`: a line appended to the user data (the box attestation line,
    `gtvp.box_attestation.arm`). The credential is fresh, unless the running VMI booted with
    the Secret's current one, unused, and is not `restart`ed (`_unconsumed`)."""
    settings = rt.key_release
    if settings is None:
        return (
            "the box names Secrets but this gtvp-operator serves no key-release endpoint "
            "(--key-release-url with --metrics-secure)"
        )
    ns, name = key
    box = rt.view.boxes.get(key) or {}
    kept = None
    if not restart:
        kept = _keep(rt, key, vm, settings=settings, box=box, extra_user_data=extra_user_data)
    if kept is not None:
        return kept
    got = _armed(key, vm, settings=settings, box=box, credential=new_credential(),
                 extra_user_data=extra_user_data)  # fmt: skip
    if isinstance(got, str):
        return got
    out, body = got
    failed = write_cloud_init_secret(rt, body)
    if failed is not None:
        return failed
    log.info("box %s/%s: a new key-release credential is in its cloud-init Secret", ns, name)
    return out


def _keep(
    rt: Runtime,
    key: Key,
    vm: Mapping[str, Any],
    *,
    settings: kr.Settings,
    box: Mapping[str, Any],
    extra_user_data: str,
) -> dict[str, Any] | str | None:
    """The VM armed with the credential its running guest booted with (`_unconsumed`),
    written at the resourceVersion the Secret was read at (read and decided again when it
    changed since); why it cannot be; None: a fresh credential is due."""
    secret_name = kr.cloud_init_secret(key[1])
    for _ in range(REARM_ATTEMPTS):
        try:
            kept = _unconsumed(rt, key, box)
            if kept is None:
                return None
            got = _armed(key, vm, settings=settings, box=box, credential=kept[0],
                         extra_user_data=extra_user_data)  # fmt: skip
            if isinstance(got, str):
                return got
            if _replace_as_read(rt, got[1], kept[1]):
                log.info("box %s/%s: its guest keeps its key-release credential", *key)
                return got[0]
        except ApiException as exc:
            if exc.status == 404:
                return None  # gone meanwhile: a fresh one
            return _cannot_write(key[0], secret_name, exc, "read or write")
    # a fresh one would lock the waiting guest out: the box waits, looked at again
    return _kept_changing(key[0], secret_name)


def _armed(
    key: Key,
    vm: Mapping[str, Any],
    *,
    settings: kr.Settings,
    box: Mapping[str, Any],
    credential: str,
    extra_user_data: str,
) -> tuple[dict[str, Any], dict[str, Any]] | str:
    """The VM booting from the box's cloud-init Secret, and that Secret with `credential`
    (or why the VM cannot be armed)."""
    ns, name = key
    secret_name = kr.cloud_init_secret(name)
    try:
        out, user_data = compose.with_cloud_init_secret(vm, secret_name)
        text = compose.key_release_user_data(
            user_data,
            credential=credential,
            url=settings.url,
            path=kr.PATH,
            namespace=ns,
            box=name,
            ca_pem=settings.ca_pem,
        )
    except compose.CompositionError as exc:
        return str(exc)
    if extra_user_data:
        text = text.rstrip("\n") + "\n" + extra_user_data + "\n"
    body = _credential_secret(
        ns,
        secret_name,
        credential,
        owner=_owner(box),
        files={kr.USER_DATA_KEY: text},
        labels={compose.BOX_LABEL: name},
    )
    return out, body


def _cannot_write(ns: str, secret_name: str, exc: ApiException, what: str = "write") -> str:
    hint = f": {RBAC_HINT}" if exc.status == 403 else ""
    return (
        f"cannot {what} the cloud-init Secret {ns}/{secret_name} ({exc.status} {exc.reason}){hint}"
    )


def _kept_changing(ns: str, secret_name: str) -> str:
    return f"cannot write the cloud-init Secret {ns}/{secret_name} (it kept changing)"


def _unconsumed(rt: Runtime, key: Key, box: Mapping[str, Any]) -> tuple[str, Any] | None:
    """The key-release credential the box's cloud-init Secret holds (and the Secret as
    read), when the guest that runs now booted with it and no release consumed it
    (`kr.kept_for`): a VM written again (a live update, a drift restored) keeps it, so a
    guest still waiting to fetch with it (the box not attested yet) is not refused
    `WrongCredential` and left without its Secrets until its next boot. None (a fresh
    credential) otherwise: no VMI runs, or the credential is another boot's, or the Secret
    is not there; a read the API server fails raises (the box waits: taking it for a
    missing credential would lock the running guest out)."""
    vmi = rt.view.vmis.get(key) or {}
    started = parse_ts((vmi.get("metadata") or {}).get("creationTimestamp"))
    if started is None or (vmi.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return None
    vmi_uid = str((vmi.get("metadata") or {}).get("uid") or "")
    try:
        secret = rt.clients.core.read_namespaced_secret(kr.cloud_init_secret(key[1]), key[0])
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    box_uid = str((box.get("metadata") or {}).get("uid") or "")
    owners = {str(o.uid) for o in secret.metadata.owner_references or ()}
    raw = (secret.data or {}).get(kr.USER_DATA_KEY)
    ann = secret.metadata.annotations or {}
    if not box_uid or box_uid not in owners or not raw:
        return None
    got = compose.key_release_credential_of(base64.b64decode(raw).decode(errors="replace"))
    if got is None or not kr.kept_for(ann, got, vmi_uid=vmi_uid, vmi_started=started):
        return None
    return got, secret


def _replace_as_read(rt: Runtime, body: Mapping[str, Any], read: Any) -> bool:
    """Replace the Secret `read` with `body` at the resourceVersion it was read at, keeping
    its annotations (its credential was kept, so its issue time stays too); False when it
    changed since (409: a release may have consumed the credential meanwhile)."""
    meta = {
        **body["metadata"],
        "annotations": dict(read.metadata.annotations or {}),
        "resourceVersion": read.metadata.resource_version,
    }
    ns, name = meta["namespace"], meta["name"]
    try:
        rt.clients.core.replace_namespaced_secret(name, ns, {**body, "metadata": meta})
    except ApiException as exc:
        if exc.status == 409:
            return False
        raise
    return True


REARM_ATTEMPTS = 3


def write_cloud_init_secret(rt: Runtime, body: Mapping[str, Any]) -> str | None:
    """Create or replace a box's cloud-init Secret; why not (None: written). A Secret of the
    same box that exists keeps its record of releases (`kr.rearmed_annotations`), replaced
    at the resourceVersion it was read at (a release consuming meanwhile is not lost)."""
    ns, secret_name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        try:
            rt.clients.core.create_namespaced_secret(ns, body)
            return None
        except ApiException as exc:
            if exc.status != 409:
                raise
        for _ in range(REARM_ATTEMPTS):
            existing = rt.clients.core.read_namespaced_secret(secret_name, ns)
            try:
                rt.clients.core.replace_namespaced_secret(secret_name, ns, _over(body, existing))
                return None
            except ApiException as exc:
                if exc.status != 409:
                    raise
        return _kept_changing(ns, secret_name)
    except ApiException as exc:
        return _cannot_write(ns, secret_name, exc)


def _over(body: Mapping[str, Any], existing: Any) -> dict[str, Any]:
    """`body` to replace `existing` with: at its resourceVersion, and with its record of
    releases when it is the same owner's (a deleted box's Secret of the name keeps none)."""
    meta = dict(body["metadata"])
    owners = {str(o.get("uid")) for o in meta.get("ownerReferences") or ()}
    theirs = {str(o.uid) for o in existing.metadata.owner_references or ()}
    if owners & theirs:
        meta["annotations"] = kr.rearmed_annotations(
            existing.metadata.annotations or {}, meta.get("annotations") or {}
        )
    meta["resourceVersion"] = existing.metadata.resource_version
    return {**body, "metadata": meta}


def gated_vm_subject(vm: Mapping[str, Any]) -> dict[str, Any] | None:
    """A gated VirtualMachine that is not a box, seen as a box (None: not such a VM)."""
    labels = (vm.get("metadata") or {}).get("labels") or {}
    if compose.BOX_LABEL in labels:
        return None
    try:
        level = vm_level(vm)
    except GatingError:
        return None
    return None if level is None else kr.vm_subject(vm, level)


def arm_gated_vms(rt: Runtime) -> None:
    """Give each gated VM that names Secrets its credential Secret, once (a Secret that
    exists is left as it is: the endpoint re-arms it at each release)."""
    settings = rt.key_release
    if settings is None:
        return
    vms = list(rt.view.vms.items())
    marks = {(ns, name, str((vm.get("metadata") or {}).get("uid", ""))) for (ns, name), vm in vms}
    failed = {(ns, name, "!" + uid) for ns, name, uid in marks}
    rt.key_release_armed &= marks | failed  # forget VMs that are gone
    for (ns, name), vm in vms:
        mark = (ns, name, str((vm.get("metadata") or {}).get("uid", "")))
        subject = None if mark in rt.key_release_armed else gated_vm_subject(vm)
        if subject is None or not kr.named_secrets(subject["spec"]):
            continue
        files = _files(settings, ns, name, kr.VM, new_credential())
        secret_name = kr.credential_secret(kr.VM, name)
        body = _credential_secret(
            ns, secret_name, files["credential"], owner=_owner(vm, VIRTUAL_MACHINES), files=files
        )
        try:
            rt.clients.core.create_namespaced_secret(ns, body)
        except ApiException as exc:
            if exc.status != 409:
                _cannot_arm(rt, mark, exc)
                continue  # tried again at the next sweep
            if not _owned_by(rt, ns, secret_name, mark[2]):
                continue  # a deleted VM's of that name, which the garbage collector removes
        else:
            log.info(
                "VirtualMachine %s/%s: a key-release credential is in Secret %s",
                ns,
                name,
                secret_name,
            )
        rt.key_release_armed.add(mark)  # created, or armed before (another replica, a restart)


def _owned_by(rt: Runtime, ns: str, secret: str, uid: str) -> bool:
    """Whether the existing Secret is the one armed for the VM of `uid`."""
    try:
        got = rt.clients.core.read_namespaced_secret(secret, ns)
    except ApiException:
        return False
    return any(ref.uid == uid for ref in got.metadata.owner_references or ())


def _cannot_arm(rt: Runtime, mark: tuple[str, str, str], exc: ApiException) -> None:
    """Say once per VM why its credential Secret cannot be written."""
    said = (mark[0], mark[1], "!" + mark[2])
    if said in rt.key_release_armed:
        return
    rt.key_release_armed.add(said)
    log.warning(
        "VirtualMachine %s/%s names Secrets but its key-release credential cannot be written "
        "(%s %s)%s",
        mark[0],
        mark[1],
        exc.status,
        exc.reason,
        f": {RBAC_HINT}" if exc.status == 403 else "",
    )


def _files(settings: kr.Settings, ns: str, name: str, kind: str, credential: str) -> dict[str, str]:
    return compose.key_release_files(
        credential=credential,
        url=settings.url,
        path=kr.PATH,
        namespace=ns,
        name=name,
        kind=kind,
        ca_pem=settings.ca_pem,
    )


def _json(code: int, body: Mapping[str, Any]) -> tuple[int, str, bytes]:
    return code, JSON, json.dumps(body, sort_keys=True).encode()


class Endpoint:
    """`POST /keyrelease/v1/release` (`gtvp.http_endpoints.Release`)."""

    def __init__(
        self, rt: Runtime, clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    ) -> None:
        self.rt = rt
        self.clock = clock

    def __call__(self, method: str, raw: bytes) -> tuple[int, str, bytes]:
        if method != "POST":
            return _json(405, {"error": "POST a JSON request (docs/keyrelease.md)"})
        try:
            req = kr.parse_request(raw)
        except kr.BadRequest as exc:
            return _json(400, {"error": str(exc)})
        try:
            return self.answer(req)
        except Exception:
            # the server answers 503 (ask again): counted here, logged there
            METRICS.key_releases.labels(kr.UNAVAILABLE).inc()
            raise

    # -- reading ---------------------------------------------------------------------

    def _cloud_init(self, req: kr.Request) -> Any:
        """The box's cloud-init Secret, read now (None: absent or not readable)."""
        try:
            return self.rt.clients.core.read_namespaced_secret(
                kr.credential_secret(req.kind, req.box), req.namespace
            )
        except ApiException as exc:
            if exc.status not in (403, 404):
                raise
            return None

    def _claims(self, token: str, now: dt.datetime) -> tuple[Any, tuple[str, str] | None]:
        issuer = self.rt.verdict_issuer
        if issuer is None or not issuer.keys or issuer.name is None:
            return None, ("no-keys", "gtvp has no verdict keys loaded")
        try:
            # signed by this operator's own keys, so this cluster's: one an older gtvp
            # issued without `iss` (until re-signed, one interval after an upgrade) is too;
            # one naming another issuer is not (keys shared between clusters)
            claims = ear.verify(
                token, issuer.jwks(), audience=issuer.audience, now=now,
                issuer=issuer.name, issuer_may_be_absent=True,
            )  # fmt: skip
        except ear.TokenRefused as exc:
            return None, (exc.reason, str(exc))
        return claims, None

    def facts(
        self, req: kr.Request, now: dt.datetime, *, stored: Any = None, fresh: bool = False
    ) -> tuple[kr.Facts, Any]:
        """What `decide` judges, from the view and the box's cloud-init Secret (read now,
        unless `stored`: the one read for this request already); `fresh`: the Members
        where the VM runs read from the API server, not the view (which may lag)."""
        view = self.rt.view
        key = (req.namespace, req.box)
        if req.kind == kr.BOX:
            box: Mapping[str, Any] | None = view.boxes.get(key)
        else:
            vm = view.vms.get(key)
            box = gated_vm_subject(vm) if vm is not None else None
        if stored is None:
            stored = self._cloud_init(req) if box is not None else None
        issued = dict((stored.metadata.annotations or {}) if stored is not None else {})
        vmi: Mapping[str, Any] | None = view.vmis.get(key)
        nodes = set(view.nodes_of.get(key, frozenset()))
        if fresh:  # where the VM runs as the API server has it too: a watch may lag
            vmi = self._vmi_now(req)
            nodes |= self._pod_nodes_now(req, vmi)
        node = ((vmi or {}).get("status") or {}).get("nodeName")
        member = self._member(str(node), fresh) if node else None
        elsewhere = sorted(nodes - {node})
        claims, refusal = self._claims(req.token, now) if req.token else (None, None)
        facts = kr.Facts(
            policy=self.rt.view.policy,
            attest_boxes=ba.attests_boxes(self.rt.enforced_spec()),
            box=box,
            issued=issued if stored is not None else None,
            vmi=vmi,
            member=member,
            pod_members={n: self._member(n, fresh) for n in elsewhere},
            node_boots={n: view.node_boot_id(n) for n in ([node] if node else []) + elsewhere},
            claims=claims,
            token_refusal=refusal,
        )
        return facts, stored

    def _vmi_now(self, req: kr.Request) -> Mapping[str, Any] | None:
        """The VMI of the request's box or VM, read from the API server now."""
        return kube.get_if_present(
            self.rt.clients, VIRTUAL_MACHINE_INSTANCES, req.box, req.namespace
        )

    def _pod_nodes_now(self, req: kr.Request, vmi: Mapping[str, Any] | None) -> set[str]:
        """The nodes the VMI's launcher pods hold it on (`launchers.pod_nodes`), listed from
        the API server now: a replica whose pod watch lags (a migration's target pod just
        bound to a host that lost trust) judges those hosts too."""
        uid = ((vmi or {}).get("metadata") or {}).get("uid")
        if not uid:
            return set()
        listed = kube.list_launcher_pods_of(self.rt.clients, req.namespace, str(uid))
        pods = [launcher_pod(p) for p in listed]
        return set(pod_nodes([p for p in pods if p is not None], str(uid)))

    def _member(self, name: str, fresh: bool) -> Mapping[str, Any] | None:
        """The member's body (read from the server when `fresh`), with a verdict this
        replica reached but could not store in place of the stored one (`held_body`)."""
        if not fresh:  # and no more than its Node's labels say (MemberUnsettled: ask again)
            return self.rt.view.member_body(name, by_labels=True)
        got = kube.get_if_present(self.rt.clients, MEMBERS, name)
        return self.rt.view.held_body(name, got, by_labels=True)

    def _policy_behind(self) -> kr.Verdict | None:
        """Why this replica's SecurityPolicy may be older than the server's (None: it is
        the server's): its watch has not delivered an edit yet (a revocation, a shorter
        validFor). Asked again, a replica that has caught up answers."""
        name = self.rt.settings.policy_name
        got = kube.get_if_present(self.rt.clients, SECURITY_POLICIES, name)
        version = ((got or {}).get("metadata") or {}).get("resourceVersion")
        if version is not None and version == self.rt.view.policy_version:
            return None
        return kr.Verdict(
            kr.UNAVAILABLE,
            f"SecurityPolicy {name} changed since this replica read it: ask again",
        )

    # -- answering -------------------------------------------------------------------

    def answer(self, req: kr.Request) -> tuple[int, str, bytes]:
        now = self.clock()
        facts, stored = self.facts(req, now)
        verdict = kr.decide(req, facts, now)
        if verdict.reason == kr.TOKEN_REQUIRED:
            return _json(
                428,
                {
                    "member": verdict.node,
                    "token": f"/ear/members/{verdict.node}",
                    "message": verdict.message,
                },
            )
        if not verdict.released:
            return self._refuse(req, facts.box, verdict)
        got = self._read_all(req, facts, verdict, stored)
        if isinstance(got, kr.Verdict):
            return self._refuse(req, facts.box, got)
        released, digests = got
        changed, fresh = self._changed_meanwhile(req, facts, stored)
        if changed is not None:
            return self._refuse(req, facts.box, *changed)
        if not verdict.again:
            problem = self._consume_in_time(req, stored, facts, fresh, digests)
            if problem is not None:
                return self._refuse(req, facts.box, *problem)
        self._audit(req, facts.box, "Normal", "KeyReleased", verdict)
        return _json(200, {"member": verdict.node, "secrets": released})

    def _read_all(
        self, req: kr.Request, facts: kr.Facts, verdict: kr.Verdict, stored: Any
    ) -> tuple[dict[str, dict[str, str]], dict[str, str]] | kr.Verdict:
        """The data of every Secret `verdict` releases and its `released_digests`, or the
        refusal: one cannot be given, or (a repeat) one changed since the release."""
        released: dict[str, dict[str, str]] = {}
        booted = self._booted(facts.vmi)  # gtvp's composition: `decide` saw to it
        for named in verdict.secrets:
            got = self._read(req, named, box_level(facts.box), booted)
            if isinstance(got, kr.Verdict):
                return kr.Verdict(got.reason, got.message, verdict.node)
            released[named.name] = got
        digests = kr.released_digests(req.retry, released)
        newer = (
            kr.changed_since_release(stored.metadata.annotations or {}, digests)
            if verdict.again
            else None
        )
        if newer is not None:
            return kr.Verdict(
                kr.SECRET_CHANGED,
                f"Secret {newer} changed since it was released to this guest: a repeat gives "
                "what was released then, nothing newer (the VM's next boot asks with its next "
                "credential)",
                verdict.node,
            )
        return released, digests

    def _consume_in_time(
        self,
        req: kr.Request,
        stored: Any,
        facts: kr.Facts,
        fresh: kr.Facts,
        digests: Mapping[str, str],
    ) -> tuple[kr.Verdict, int | None] | None:
        """Consume the credential (`_consume`), then judge the release once more at the
        time that write ended: a verdict that ran out while it was written gives nothing,
        and the guest asks again with the same credential and retry key (a repeat, judged
        anew). A verdict that runs out within WRITE_MARGIN is not written on at all (503,
        nothing consumed: the guest asks again once it is renewed). None: release."""
        if not kr.decide(req, fresh, self.clock() + WRITE_MARGIN).released:
            verdict = kr.Verdict(
                kr.UNAVAILABLE,
                f"a verdict the release rests on runs out within {WRITE_MARGIN.seconds} s: "
                "nothing consumed; ask again once it is renewed",
            )
            return verdict, None
        problem = self._consume(req, stored, self.clock(), kr.vmi_uid(facts.vmi), digests)
        if problem is not None:
            return problem
        if kr.decide(req, fresh, self.clock()).released:
            return None
        verdict = kr.Verdict(
            kr.UNAVAILABLE,
            "the release, judged again once the credential was written, no longer stands (a "
            "verdict ran out meanwhile): nothing released; ask again with the same "
            "credential and retry key",
        )
        return verdict, None

    def _changed_meanwhile(
        self, req: kr.Request, facts: kr.Facts, stored: Any
    ) -> tuple[tuple[kr.Verdict, int | None] | None, kr.Facts]:
        """The release judged again, just before the credential is consumed, on the Members
        where the VM runs as the API server holds them and at the time those reads ended (a
        verdict that expired, a member that lost trust meanwhile, or whose loss this
        replica's watch has not delivered yet, stops it; so does a VMI that moved or was
        replaced, and a SecurityPolicy this replica has not seen the latest of: 503, ask
        again); the refusal (None when it still stands) and the facts it was judged on."""
        behind = self._policy_behind()
        fresh = self.facts(req, self.clock(), stored=stored, fresh=True)[0]
        if behind is not None:
            return (behind, 503), fresh
        recheck = kr.decide(req, fresh, self.clock())  # after the reads, not before them
        if not recheck.released:
            return (recheck, None), fresh
        if kr.vmi_uid(fresh.vmi) != kr.vmi_uid(facts.vmi):  # the consuming write names it
            verdict = kr.Verdict(
                kr.NOT_RUNNING, "the box's VMI was replaced while its Secrets were read"
            )
            return (verdict, None), fresh
        return None, fresh

    def _unchecked(self) -> bool:
        """Whether an OSComponent in the view has no check yet (verification pending)."""
        checks = self.rt.boxes.checks
        return any(name not in checks for name in list(self.rt.view.components))

    def _booted(self, vmi: Mapping[str, Any] | None) -> tuple[frozenset[str], ...] | None:
        """What each component disk the VMI boots can be: the verified components whose
        pin is its digest (`kr.disk_names`); None when it pins no disk."""
        pins = kr.booted_pins(vmi)
        if pins is None:
            return None
        known: list[tuple[str, str]] = []
        for name, body in list(self.rt.view.components.items()):
            check = self.rt.boxes.checks.get(name)
            if check is None or not check.ok:
                continue
            try:
                c = parse_component(body)
            except ComponentError:
                continue
            known.append((c.name, c.pin))
        return kr.disk_names(pins, known)

    def _read(
        self,
        req: kr.Request,
        named: kr.Named,
        level: int,
        booted: tuple[frozenset[str], ...] | None,
    ) -> dict[str, str] | kr.Verdict:
        """The Secret's data to release to a box of `level`, or the refusal (its node is the
        caller's to fill in)."""
        namespace, box = req.namespace, req.box
        try:
            secret = self.rt.clients.core.read_namespaced_secret(named.name, namespace)
        except ApiException as exc:
            if exc.status == 403:
                why = f"gtvp may not read Secret {named.name}: {RBAC_HINT}"
            elif exc.status == 404:
                why = f"Secret {named.name} does not exist"
            else:  # the API server failing (a 429 of its fairness limits, a 5xx) says
                return kr.Verdict(  # nothing about the Secret: nothing consumed, ask again
                    kr.UNAVAILABLE,
                    f"Secret {named.name} cannot be read now ({exc.status} {exc.reason}): "
                    "ask again",
                )
            return kr.Verdict(kr.SECRET_UNAVAILABLE, why)
        annotations = secret.metadata.annotations or {}
        refused = kr.refuses_release(annotations, box, req.kind, level, booted)
        if refused is not None and kr.COMPONENTS_ANNOTATION in annotations and self._unchecked():
            # a replica that has not checked every component yet (just started) cannot name
            # every disk: not a final answer (the guest's script stops on a 403)
            return kr.Verdict(
                kr.UNAVAILABLE,
                f"Secret {named.name} names the components its receivers may boot, and this "
                "replica has not checked every OSComponent yet: ask again",
            )
        if refused is not None:
            return kr.Verdict(kr.SECRET_NOT_RELEASABLE, f"Secret {named.name} {refused}")
        data = kr.select_keys(named, dict(secret.data or {}))
        if isinstance(data, str):
            return kr.Verdict(kr.SECRET_UNAVAILABLE, data)
        return data

    def _consume(
        self,
        req: kr.Request,
        stored: Any,
        now: dt.datetime,
        vmi: str,
        digests: Mapping[str, str],
    ) -> tuple[kr.Verdict, int] | None:
        """Consume the credential and arm the next one in one conditional write (None:
        consumed by this guest; else the refusal and its HTTP status)."""
        nxt, write = new_credential(), secrets.token_hex(16)
        meta = stored.metadata
        meta.annotations = kr.consumed_annotations(
            meta.annotations or {},
            used=kr.credential_hash(req.credential),
            next_credential=nxt,
            now=format_ts(now),
            retry=req.retry,
            vmi=vmi,
            write=write,
            digests=digests,
        )
        data = {
            k: base64.b64encode(
                base64.b64decode(v).replace(req.credential.encode(), nxt.encode())
            ).decode()
            for k, v in (stored.data or {}).items()
        }
        stored.data = data  # the resourceVersion read stays: the write's precondition
        try:
            self.rt.clients.core.replace_namespaced_secret(meta.name, meta.namespace, stored)
        except ApiException as exc:
            return self._after_failed_write(req, vmi, write, f"{exc.status} {exc.reason}")
        except Exception as exc:  # noqa: BLE001 - a timeout: the write may have committed
            return self._after_failed_write(req, vmi, write, type(exc).__name__)
        return None

    def _after_failed_write(
        self, req: kr.Request, vmi: str, write: str, why: str
    ) -> tuple[kr.Verdict, int] | None:
        """The consuming write failed (`why`): read the Secret again. This very write
        committed all the same (its answer lost: a 504 or a timeout after the fact), or an
        earlier request of this guest (its retry key) won the race: the guest's release
        (None). Else the refusal and its HTTP status."""
        try:
            again = self._cloud_init(req)
        except Exception as unread:  # noqa: BLE001 - not knowing is answered, not raised
            log.warning(
                "%s %s/%s: cannot read back the credential: %s",
                req.kind,
                req.namespace,
                req.box,
                unread,
            )
            return (
                kr.Verdict(
                    kr.SECRET_UNAVAILABLE,
                    f"the credential's write failed ({why}) and whether it was consumed is "
                    "not known: ask again with the same credential and retry key",
                ),
                503,
            )
        if again is None:
            return kr.Verdict(kr.NO_CREDENTIAL, "the box's credential Secret is gone"), 403
        ann = again.metadata.annotations
        if kr.written_by(ann, write) or kr.answered(ann, req, vmi):
            return None
        if not kr.is_current(ann, req.credential):
            verdict = kr.Verdict(
                kr.CREDENTIAL_USED, "the credential was used at the same time by another request"
            )
            return verdict, 403
        said = (
            f"the credential's write failed ({why}): nothing released, and the credential was "
            "still unused when read back (a write that was slow to commit may yet use it): ask "
            "again with the same credential and retry key"
        )
        return kr.Verdict(kr.SECRET_UNAVAILABLE, said), 503

    def _refuse(
        self,
        req: kr.Request,
        box: Mapping[str, Any] | None,
        verdict: kr.Verdict,
        code: int | None = None,
    ) -> tuple[int, str, bytes]:
        self._audit(req, box, "Warning", "KeyReleaseRefused", verdict)
        reason, message = kr.told(verdict)
        code = code or (503 if verdict.reason in kr.ASK_AGAIN else 403)
        return _json(code, {"reason": reason, "message": message})

    def _audit(
        self,
        req: kr.Request,
        box: Mapping[str, Any] | None,
        type_: str,
        reason: str,
        verdict: kr.Verdict,
    ) -> None:
        METRICS.key_releases.labels(verdict.reason).inc()
        log.info(
            "key release for %s %s/%s: %s: %s",
            req.kind,
            req.namespace,
            req.box,
            verdict.reason,
            verdict.message,
        )
        if box is None:
            return  # no object to tell (and no Event per guessed name)
        message = verdict.message if verdict.released else f"{verdict.reason}: {verdict.message}"
        try:
            kube.post_object_event(
                self.rt.clients,
                LAZY_BOXES if req.kind == kr.BOX else VIRTUAL_MACHINES,
                box,
                name=req.box,
                namespace=req.namespace,
                type_=type_,
                reason=reason,
                message=message,
            )
        except Exception as exc:  # noqa: BLE001 - the answer stands; the log has it
            log.warning(
                "%s %s/%s: cannot post the %s Event: %s",
                req.kind,
                req.namespace,
                req.box,
                reason,
                exc,
            )
