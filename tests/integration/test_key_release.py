"""Attestation-gated key release on the real API server (docs/keyrelease.md).

The operator's code runs in-process (as in test_verdict_tokens.py): members attested by
gtvp-agent's code over software TPMs, the verdict keys in a real Secret, the LazyBoxes,
VMIs and Secrets real objects under the RBAC a namespace opts in with (a RoleBinding of
the ClusterRole gtvp-key-release). The guest is played by a real TLS client (and once by
the cloud-init script itself, with curl) against the endpoint served over HTTPS. The
attacker's requests come first.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import http.client
import json
import logging
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry

from gtvp import http_endpoints, key_release, kube, verdict_keys
from gtvp.core import compose
from gtvp.core import keyrelease as kr
from gtvp.core.api_resources import LAZY_BOXES, SECURITY_POLICIES, VIRTUAL_MACHINE_INSTANCES
from gtvp.core.attestation import relied_on
from gtvp.core.component_checks import Check
from gtvp.core.policy import parse_policy
from gtvp.core.policy_status import Accepted
from gtvp.handlers import policies
from gtvp.metrics import METRICS
from gtvp.metrics_auth import TlsFiles
from gtvp.runtime import OperatorSettings, Runtime
from gtvp_local import pki
from gtvp_local.controlplane import ControlPlane
from gtvp_local.pool import pool_policy
from gtvp_local.swtpm import SwtpmCA
from tests.eventlogs import synth_log
from tests.integration.test_lazybox_vms import PUB as VM_PUB
from tests.integration.test_lazybox_vms import _vms
from tests.integration.test_verdict_tokens import (  # noqa: F401 - fixtures
    POLICY,
    _Member,
    _status,
    _turn,
    _until,
    admin,
    ca,
    keys_namespace,
    members,
    rt,
)
from tests.launcher_pods import create_launcher_pod
from tests.softmember import Bundle
from tests.softtpm import SoftCA

pytestmark = [pytest.mark.controlplane]

BOX, OTHER_BOX = "vault", "other"
DISK_KEY = "disk-key-7f3a9c-DO-NOT-LEAK"
TLS_KEY = "tls-private-key-5e1b-DO-NOT-LEAK"


@dataclass
class Pool:
    rt: Runtime
    namespace: str
    members: list[_Member]
    port: int
    ca_file: Path
    endpoint: key_release.Endpoint
    server: Any
    admin: kube.Clients
    clock_offset: list[dt.timedelta] = field(default_factory=lambda: [dt.timedelta(0)])

    def user_data(self, box: str) -> dict[str, Any]:
        """The cloud-config in the box's cloud-init Secret (the Secret the VM boots with)."""
        secret = self.rt.clients.core.read_namespaced_secret(
            kr.cloud_init_secret(box), self.namespace
        )
        doc: dict[str, Any] = yaml.safe_load(base64.b64decode(secret.data[kr.USER_DATA_KEY]))
        return doc

    def credential(self, box: str) -> str:
        """What the box's guest finds in its cloud-init."""
        files = {f["path"]: f["content"] for f in self.user_data(box)["write_files"]}
        return str(files[f"{compose.KEY_RELEASE_DIR}/credential"])

    def reboot(self, box: str) -> None:
        """The VM's next boot: its VMI deleted and made again (a new uid) on the same member,
        as the operator's watch would deliver both."""
        old = self.rt.view.vmis[(self.namespace, box)]
        group, version, plural = VIRTUAL_MACHINE_INSTANCES.coordinates
        self.admin.custom.delete_namespaced_custom_object(
            group, version, self.namespace, plural, box
        )
        self.rt.view.observe_vmi(old, "DELETED")
        node = old["status"]["nodeName"]
        fresh = _create(
            self.admin, VIRTUAL_MACHINE_INSTANCES, _vmi(box, self.namespace, node, old["spec"])
        )
        assert fresh["metadata"]["uid"] != old["metadata"]["uid"]
        self.rt.view.observe_vmi(fresh, "ADDED")

    def guest(self, box: str, into: Path) -> dict[str, Any]:
        """The box's cloud-init files written into `into` as cloud-init would write them
        (paths in them pointing there); its cloud-config."""
        doc = self.user_data(box)
        into.mkdir()
        for f in doc["write_files"]:
            path = into / Path(f["path"]).name
            path.write_text(str(f["content"]).replace(compose.KEY_RELEASE_DIR, str(into)))
        return doc

    def _conn(self) -> http.client.HTTPSConnection:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=30)

    def token(self, member: _Member) -> str:
        conn = self._conn()
        conn.request("GET", f"/ear/members/{member.name}")
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read().decode()

    def ask(
        self, box: str, credential: str, token: str = "", kind: str = "box", **extra: Any
    ) -> tuple[int, Any]:
        body = {"namespace": self.namespace, kind: box, "credential": credential, "token": token}
        conn = self._conn()
        conn.request(
            "POST",
            kr.PATH,
            body=json.dumps({**body, **extra}),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())


def _count(result: str) -> float:
    got = METRICS.registry.get_sample_value("gtvp_key_releases_total", {"result": result})
    return got or 0.0


def _bind_key_release(control_plane: ControlPlane, namespace: str) -> None:
    rbac = "rbac.authorization.k8s.io"
    binding = {
        "apiVersion": f"{rbac}/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "gtvp-key-release", "namespace": namespace},
        "subjects": [{"apiGroup": rbac, "kind": "Group", "name": "gtvp:operators"}],
        "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": "gtvp-key-release"},
    }
    control_plane.kubectl("apply", "-f", "-", input_text=json.dumps(binding))


def _box(name: str, namespace: str, secrets: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": LAZY_BOXES.api_version,
        "kind": LAZY_BOXES.kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "application": {"name": "nginx"},
            "level": 2,
            "resources": {"cpu": "500m", "memory": "512Mi"},
            "secrets": secrets,
        },
    }


def _create(clients: kube.Clients, res: Any, body: dict[str, Any]) -> dict[str, Any]:
    ns = body["metadata"]["namespace"]
    got: dict[str, Any] = clients.custom.create_namespaced_custom_object(
        *res.coordinates[:2], ns, res.coordinates[2], body
    )
    return got


def _vmi(
    name: str, namespace: str, node: str, template: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A box's VMI as virt-controller leaves it once it runs: Running on `node` (the
    VMI CRD has no status subresource; virt-handler writes it like this)."""
    return {
        "apiVersion": VIRTUAL_MACHINE_INSTANCES.api_version,
        "kind": VIRTUAL_MACHINE_INSTANCES.kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {compose.BOX_LABEL: name, "gtvp.io/level": "2"},
        },
        # a box's VMI: its VM's template spec, as virt-controller makes it
        "spec": template or {"domain": {"devices": {}, "memory": {"guest": "64Mi"}}},
        "status": {"phase": "Running", "nodeName": node},
    }


def _armed_vm(runtime: Runtime, namespace: str, box: str) -> dict[str, Any]:
    composed = _vms(namespace)[0]
    composed["metadata"]["name"] = box
    armed = key_release.arm(runtime, (namespace, box), composed)
    assert isinstance(armed, dict), armed
    return armed


@pytest.fixture
def pool(
    rt: Runtime,  # noqa: F811
    members: list[_Member],  # noqa: F811
    control_plane: ControlPlane,
    admin: kube.Clients,  # noqa: F811
    namespace: str,
    tmp_path: Path,
) -> Iterator[Pool]:
    _bind_key_release(control_plane, namespace)
    for name, data, to in (
        ("disk", {"key": DISK_KEY, "unused": "not asked for"}, BOX),
        ("tls", {"tls.key": TLS_KEY}, f"{BOX},{OTHER_BOX}"),
        ("unnamed", {"password": "named by no box"}, "*"),
        ("unwilling", {"password": "consents to no box"}, None),
    ):
        meta: dict[str, Any] = {"name": name}
        if to is not None:
            meta["annotations"] = {kr.RELEASE_TO_ANNOTATION: to, kr.MIN_LEVEL_ANNOTATION: "2"}
        admin.core.create_namespaced_secret(namespace, {"metadata": meta, "stringData": data})
    boxes = [
        _box(BOX, namespace, [{"name": "disk", "keys": ["key"]}, {"name": "tls"}]),
        _box(OTHER_BOX, namespace, [{"name": "tls"}, {"name": "disk"}, {"name": "unwilling"}]),
    ]
    for b in boxes:
        rt.view.observe_box(_create(admin, LAZY_BOXES, b), "ADDED")
    # the operator's HTTPS endpoint, with the verdict tokens' public documents
    cert_dir = tmp_path / "pki"
    cert_dir.mkdir()
    authority = pki.ensure_ca(cert_dir, "gtvp test CA")
    leaf = pki.issue(authority, cert_dir, "operator", common_name="gtvp", server_ips=("127.0.0.1",))
    offset = [dt.timedelta(0)]
    endpoint = key_release.Endpoint(rt, clock=lambda: dt.datetime.now(dt.UTC) + offset[0])
    issuer = rt.verdict_issuer
    assert issuer is not None
    public = verdict_keys.documents(
        issuer,
        lambda n: (
            ((rt.view.members.get(n) or {}).get("status") or {}).get("trust", {}).get("token")
        ),
    )
    server = http_endpoints.serve(
        0,
        "127.0.0.1",
        CollectorRegistry(),
        lambda: http_endpoints.Probe(loaded=True, loop_started=False, loop_idle_seconds=0),
        tls=TlsFiles(str(leaf.cert), str(leaf.key)).context,
        public=public,
        release=endpoint,
    )
    port = server.server_port
    rt.key_release = kr.Settings(url=f"https://127.0.0.1:{port}", ca_pem=authority.cert.read_text())
    try:
        armed = {name: _armed_vm(rt, namespace, name) for name in (BOX, OTHER_BOX)}
        for m in members:
            _until(rt, m, "QuoteVerified")
        for name, m in ((BOX, members[0]), (OTHER_BOX, members[1])):
            # the composition gtvp made for the box (its status), booted by its VMI
            tmpl = armed[name]["spec"]["template"]["spec"]
            booted = {"composedBoots": [compose.template_boots(armed[name])]}
            rt.view.observe_box(
                kube.patch_status(admin, LAZY_BOXES, name, booted, namespace), "MODIFIED"
            )
            vmi = _create(admin, VIRTUAL_MACHINE_INSTANCES, _vmi(name, namespace, m.name, tmpl))
            rt.view.observe_vmi(vmi, "ADDED")
        p = Pool(rt, namespace, members, port, authority.cert, endpoint, server, admin, offset)
        yield p
    finally:
        server.shutdown()
        server.server_close()


def _events(pool: Pool, box: str) -> list[tuple[str, str]]:
    got = pool.admin.core.list_namespaced_event(
        pool.namespace, field_selector=f"involvedObject.name={box}"
    )
    return [(e.reason, e.message) for e in got.items]


def _forge(token: str) -> str:
    """The token with its level raised and its signature kept (a tampered token)."""
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    for sub in claims["submods"].values():
        sub["gtvp"]["level"] = 9
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{sig}"


# ----- the attacker's requests ----------------------------------------------------------------


def _set_level(pool: Pool, box: str, level: int) -> None:
    """What the box's editor does: `kubectl patch lazybox` (the operator's watch sees it)."""
    got = pool.admin.custom.patch_namespaced_custom_object(
        *LAZY_BOXES.coordinates[:2], pool.namespace, LAZY_BOXES.coordinates[2], box,
        {"spec": {"level": level}},
    )  # fmt: skip
    pool.rt.view.observe_box(got, "MODIFIED")


@pytest.mark.timeout(180)
def test_a_box_lowered_below_its_secrets_level_gets_nothing(pool: Pool) -> None:
    """Who may edit a box (not read its Secrets) lowers it to level 1, so that it lands on
    a host Trusted only at level 1: the Secret's owner named level 2 as its lowest."""
    here = pool.members[0]
    cred = pool.credential(BOX)
    _set_level(pool, BOX, 1)
    status, body = pool.ask(BOX, cred, pool.token(here), secrets=["disk"])
    assert (status, body["reason"]) == (403, kr.SECRET_NOT_RELEASABLE), body
    said = f"Secret disk goes only to level 2 or above, and box {BOX} is of level 1"
    assert said in body["message"]
    assert "secrets" not in body
    # nothing was consumed: at its level again, the box's request is answered
    _set_level(pool, BOX, 2)
    status, body = pool.ask(BOX, cred, pool.token(here), secrets=["disk"])
    assert status == 200, body
    assert base64.b64decode(body["secrets"]["disk"]["key"]).decode() == DISK_KEY


@pytest.mark.timeout(180)
def test_a_secret_bound_to_its_boxs_components_goes_to_no_other_composition(pool: Pool) -> None:
    """The Secret's owner names the components its receivers may boot
    (`gtvp.io/release-components`): a box of the consented name and level whose
    composition holds another (its application swapped by whoever may edit the box) gets
    nothing, nothing consumed; the composition it names gets it."""
    here = pool.members[0]
    for obj in VM_PUB.web_catalogue():  # the catalogue the box was composed from, verified
        pool.rt.view.observe_component(obj, "ADDED")
        pool.rt.boxes.checks[obj["metadata"]["name"]] = Check("Verified", "SignatureValid", "")
    disks = pool.endpoint._booted(pool.rt.view.vmis[(pool.namespace, BOX)])
    assert disks
    assert all(len(names) == 1 for names in disks)
    booted = [next(iter(names)) for names in disks]
    cred = pool.credential(BOX)

    def bind(names: str) -> None:
        pool.admin.core.patch_namespaced_secret(
            "disk", pool.namespace, {"metadata": {"annotations": {kr.COMPONENTS_ANNOTATION: names}}}
        )

    bind(",".join(booted))
    # a replica that has not checked every component yet cannot say: ask again (503), not
    # a refusal the guest's script would stop on
    unchecked = {
        o["metadata"]["name"]: pool.rt.boxes.checks.pop(o["metadata"]["name"])
        for o in VM_PUB.web_catalogue()
        if o["spec"]["componentName"] == booted[0]
    }
    status, body = pool.ask(BOX, cred, pool.token(here), secrets=["disk"])
    assert (status, body["reason"]) == (503, kr.UNAVAILABLE), body
    pool.rt.boxes.checks.update(unchecked)
    bind("postgres")  # what the owner meant the box to run
    status, body = pool.ask(BOX, cred, pool.token(here), secrets=["disk"])
    assert (status, body["reason"]) == (403, kr.SECRET_NOT_RELEASABLE), body
    assert f"boots {booted[0]} too" in body["message"]
    assert "secrets" not in body
    bind(",".join(booted))
    status, body = pool.ask(BOX, cred, pool.token(here), secrets=["disk"])
    assert status == 200, body
    assert base64.b64decode(body["secrets"]["disk"]["key"]).decode() == DISK_KEY


@pytest.mark.timeout(180)
def test_misdirected_forged_and_stolen_requests_release_nothing_and_consume_nothing(
    pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    here, elsewhere = pool.members
    cred, other_cred = pool.credential(BOX), pool.credential(OTHER_BOX)
    good = pool.token(here)
    before = {r: _count(r) for r in kr.RESULTS}
    attempts = [
        # a valid token of another Trusted member than the one the VMI runs on
        ((BOX, cred, pool.token(elsewhere)), kr.TOKEN_OTHER_MEMBER),
        # the right member's token, tampered (a higher level)
        ((BOX, cred, _forge(good)), kr.TOKEN_REFUSED),
        # another box's credential
        ((BOX, other_cred, good), kr.WRONG_CREDENTIAL),
    ]
    for (box, credential, token), reason in attempts:
        status, body = pool.ask(box, credential, token)
        assert (status, body["reason"]) == (403, reason), body
        assert "secrets" not in body
    # a Secret the box does not name (it exists, and gtvp may read it)
    status, body = pool.ask(BOX, cred, good, secrets=["disk", "unnamed"])
    assert (status, body["reason"]) == (403, kr.SECRET_NOT_NAMED)
    # another box names Secrets that do not consent to it: nothing released, nothing used
    status, body = pool.ask(OTHER_BOX, other_cred, pool.token(elsewhere), secrets=["tls", "disk"])
    assert (status, body["reason"]) == (403, kr.SECRET_NOT_RELEASABLE)
    assert "disk" in body["message"]
    status, body = pool.ask(OTHER_BOX, other_cred, pool.token(elsewhere), secrets=["tls"])
    assert status == 200, body
    assert set(body["secrets"]) == {"tls"}
    # no such box: answered as a wrong credential (no one learns which boxes exist)
    status, body = pool.ask("nobody", cred, good)
    assert (status, body) == (403, {"reason": kr.WRONG_CREDENTIAL, "message": kr.NOT_ISSUED})
    # none of it consumed the credential: the box's own request is answered
    status, body = pool.ask(BOX, cred, good)
    assert status == 200, body
    assert body["member"] == here.name
    assert base64.b64decode(body["secrets"]["disk"]["key"]).decode() == DISK_KEY
    assert set(body["secrets"]["disk"]) == {"key"}  # only the keys the box names
    assert base64.b64decode(body["secrets"]["tls"]["tls.key"]).decode() == TLS_KEY
    # audited: an Event per release and refusal on the box, counted by result
    events = _events(pool, BOX)
    refused = [m for r, m in events if r == "KeyReleaseRefused"]
    assert len(refused) == 4
    for reason in (
        kr.TOKEN_OTHER_MEMBER,
        kr.TOKEN_REFUSED,
        kr.WRONG_CREDENTIAL,
        kr.SECRET_NOT_NAMED,
    ):
        assert any(m.startswith(reason) for m in refused), (reason, refused)
    assert [r for r, _ in events].count("KeyReleased") == 1
    for reason in (
        kr.TOKEN_OTHER_MEMBER,
        kr.TOKEN_REFUSED,
        kr.WRONG_CREDENTIAL,
        kr.SECRET_NOT_NAMED,
    ):
        assert _count(reason) == before[reason] + 1
    assert _count(kr.NO_SUCH_BOX) == before[kr.NO_SUCH_BOX] + 1
    assert _count(kr.SECRET_NOT_RELEASABLE) == before[kr.SECRET_NOT_RELEASABLE] + 1
    assert _count(kr.RELEASED) == before[kr.RELEASED] + 2
    # nothing secret in the Events nor in the logs
    said = json.dumps(events) + caplog.text
    for secret in (DISK_KEY, TLS_KEY, cred, other_cred, good):
        assert secret not in said
    assert "KeyReleased" in said or "released Secret(s) disk, tls" in said


@pytest.mark.timeout(180)
def test_a_credential_is_good_once_even_for_two_replicas_at_once(pool: Pool) -> None:
    here = pool.members[0]
    cred = pool.credential(BOX)
    # the first step: where do I run (nothing consumed)
    status, body = pool.ask(BOX, cred)
    assert (status, body["member"]) == (428, here.name)
    token = pool.token(here)
    status, body = pool.ask(BOX, cred, token)
    assert status == 200, body
    # replayed: refused, as such, also by an operator that starts afresh (the state is in
    # the API server, not in the process)
    status, body = pool.ask(BOX, cred, token)
    assert (status, body["reason"]) == (403, kr.CREDENTIAL_USED)
    restarted = key_release.Endpoint(pool.rt)
    got = restarted.answer(kr.Request(pool.namespace, BOX, cred, token))
    assert (got[0], json.loads(got[2])["reason"]) == (403, kr.CREDENTIAL_USED)
    # the release armed the next boot's credential: not for the VMI that runs now (root on
    # its host reads it in the cloud-init Secret, and could use it once the VM moved away)
    nxt = pool.credential(BOX)
    assert nxt != cred
    status, body = pool.ask(BOX, nxt, token)
    assert (status, body["reason"]) == (403, kr.CREDENTIAL_FOR_NEXT_BOOT), body
    # at the next boot two replicas race for it: one wins
    pool.reboot(BOX)
    replicas = [key_release.Endpoint(pool.rt), key_release.Endpoint(pool.rt)]
    barrier = threading.Barrier(2)
    codes: list[int] = []

    def race(ep: key_release.Endpoint) -> None:
        barrier.wait()
        codes.append(ep.answer(kr.Request(pool.namespace, BOX, nxt, token))[0])

    threads = [threading.Thread(target=race, args=(ep,)) for ep in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200, 403]


def test_a_credential_armed_again_while_the_released_vm_runs_is_for_its_next_boot(
    pool: Pool,
) -> None:
    """gtvp writes the box's VM again while the VMI that got its Secrets runs (a VM user's
    edit restored, a live update), arming a fresh credential in the cloud-init Secret, which
    root on the VMI's host reads there. That credential gets nothing while the VMI lives,
    wherever it runs (the token of the member it runs on), as the one it replaced; the used
    one is still reported used; the VM's next boot gets its Secrets with it."""
    here = pool.members[0]
    cred, token = pool.credential(BOX), pool.token(here)
    assert pool.ask(BOX, cred, token)[0] == 200
    _armed_vm(pool.rt, pool.namespace, BOX)  # the VM written again, its VMI kept
    fresh = pool.credential(BOX)
    assert fresh != cred
    status, body = pool.ask(BOX, fresh, token)
    assert (status, body["reason"]) == (403, kr.CREDENTIAL_FOR_NEXT_BOOT), body
    status, body = pool.ask(BOX, cred, token)
    assert (status, body["reason"]) == (403, kr.CREDENTIAL_USED), body
    pool.reboot(BOX)
    assert pool.ask(BOX, fresh, token)[0] == 200


def test_a_vm_written_again_before_its_guest_fetched_keeps_the_guests_credential(
    pool: Pool,
) -> None:
    """gtvp writes the box's VM again (a live update, a VM user's edit restored) while its
    guest waits to fetch (its box not attested yet, up to 10 minutes): the credential in
    the running guest's cloud-init stays the current one, and the guest gets its Secrets
    with it. Before, every VM write armed a fresh one and the waiting guest was refused
    (WrongCredential, its script stops) until its next boot. Found by a review."""
    cred, token = pool.credential(BOX), pool.token(pool.members[0])
    _armed_vm(pool.rt, pool.namespace, BOX)
    assert pool.credential(BOX) == cred
    assert pool.ask(BOX, cred, token)[0] == 200
    # released: the next credential (which root on this host can read) is never kept for
    # a guest that did not boot with it
    nxt = pool.credential(BOX)
    _armed_vm(pool.rt, pool.namespace, BOX)
    assert pool.credential(BOX) not in (cred, nxt)


def test_a_vm_restarted_or_a_secret_changed_meanwhile_gets_a_fresh_credential(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A credential is kept only for the guest that booted with it: a rewrite that
    restarts the VMI (a recomposition) arms a fresh one; one whose Secret changed between
    its read and its write reads it and decides again (a release consuming the credential
    meanwhile must not make it current again: tests/unit/test_key_release_keep.py). Found
    by reviews."""
    cred = pool.credential(BOX)
    composed = _vms(pool.namespace)[0]
    composed["metadata"]["name"] = BOX
    assert isinstance(key_release.arm(pool.rt, (pool.namespace, BOX), composed, restart=True), dict)
    fresh = pool.credential(BOX)
    assert fresh != cred
    core = pool.rt.clients.core
    replace = core.replace_namespaced_secret
    calls: list[str] = []

    def changed_meanwhile(name: str, namespace: str, body: Any, **kw: Any) -> Any:
        calls.append(body["metadata"]["resourceVersion"])
        if len(calls) == 1:
            raise ApiException(status=409, reason="Conflict")
        return replace(name, namespace, body, **kw)

    monkeypatch.setattr(core, "replace_namespaced_secret", changed_meanwhile)
    # the restarted VMI booted with `fresh`: a rewrite keeps it, the Secret read again
    vmi = pool.rt.view.vmis[(pool.namespace, BOX)]
    later = dict(vmi, metadata={**vmi["metadata"], "creationTimestamp": "2099-01-01T00:00:00Z"})
    pool.rt.view.observe_vmi(later, "MODIFIED")
    assert isinstance(key_release.arm(pool.rt, (pool.namespace, BOX), composed), dict)
    assert len(calls) == 2
    assert pool.credential(BOX) == fresh


def test_a_client_without_a_credential_cannot_tell_which_boxes_exist(pool: Pool) -> None:
    """Anyone who reaches the endpoint (any pod, any guest) guesses names: a box that
    exists, one that does not, a VM that is not gated all get the same answer, and a name
    that is no box costs the API server no read."""
    guess = "A" * 43
    token = pool.token(pool.members[0])
    reads: list[str] = []
    real_read = pool.rt.clients.core.read_namespaced_secret

    def counted(name: str, namespace: str, **kw: Any) -> Any:
        reads.append(name)
        return real_read(name, namespace, **kw)

    pool.rt.clients.core.read_namespaced_secret = counted  # type: ignore[method-assign]
    try:
        answers = {
            what: pool.ask(name, guess, token, kind=kind)
            for what, name, kind in (
                ("a box", BOX, "box"),
                ("no box", "nobody", "box"),
                ("no gated VM", "nobody", "vm"),
            )
        }
    finally:
        pool.rt.clients.core.read_namespaced_secret = real_read  # type: ignore[method-assign]
    assert len({json.dumps(a, sort_keys=True) for a in answers.values()}) == 1, answers
    assert answers["no box"] == (403, {"reason": kr.WRONG_CREDENTIAL, "message": kr.NOT_ISSUED})
    assert reads == [kr.cloud_init_secret(BOX)]  # only the box that exists was looked up


def test_a_replica_whose_member_watch_lags_releases_nothing(pool: Pool) -> None:
    """The replica holding the member's shard wrote it Untrusted (its EK revoked); the
    replica that serves the box's request has not seen that yet (a stalled watch): it asks
    the API server for the Member before it consumes anything, and refuses."""
    here = pool.members[0]
    cred, token = pool.credential(BOX), pool.token(here)
    untrusted = {"phase": "Untrusted", "level": 0,
                 "trust": {"verdict": "Untrusted", "reason": "EkRevoked"}}  # fmt: skip
    kube.patch_member_status(pool.admin, here.name, untrusted)
    assert (pool.rt.view.members[here.name]["status"]["phase"]) == "Trusted"  # not seen here
    status, body = pool.ask(BOX, cred, token)
    assert (status, body["reason"]) == (403, kr.MEMBER_NOT_TRUSTED), body
    assert pool.credential(BOX) == cred  # nothing consumed


def test_a_replica_that_has_not_seen_the_latest_policy_asks_for_a_retry(pool: Pool) -> None:
    """The SecurityPolicy was edited (a revocation, a shorter validFor) and this replica's
    watch has not delivered it: 503, nothing consumed; once it has, the release goes on."""
    here = pool.members[0]
    cred, token = pool.credential(BOX), pool.token(here)
    group, version, plural = SECURITY_POLICIES.coordinates
    edited = pool.admin.custom.patch_cluster_custom_object(
        group, version, plural, POLICY, {"metadata": {"annotations": {"example.com/ticket": "42"}}}
    )
    status, body = pool.ask(BOX, cred, token)
    assert (status, body["reason"]) == (503, kr.UNAVAILABLE), body
    assert pool.credential(BOX) == cred
    pool.rt.view.policy_version = edited["metadata"]["resourceVersion"]  # the watch caught up
    assert pool.ask(BOX, cred, token)[0] == 200


def _secret_hash(pool: Pool, box: str) -> str:
    got = pool.admin.core.read_namespaced_secret(kr.cloud_init_secret(box), pool.namespace)
    return str((got.metadata.annotations or {}).get(kr.HASH_ANNOTATION, ""))


@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_a_guest_whose_answer_was_lost_gets_its_secrets_again_and_a_thief_does_not(
    pool: Pool, tmp_path: Path
) -> None:
    """The guest's request consumed its credential, but the answer never reached it (the
    connection gone before gtvp answered). Its fetch script, run again with the retry key
    it sent, gets the Secrets; the used credential with another retry key gets nothing."""
    here = pool.members[0]
    guest = tmp_path / "guest"
    pool.guest(BOX, guest)
    retry = "7" * 64
    (guest / "retry").write_text(retry)  # the key the script made on its first run
    cred, armed = pool.credential(BOX), _secret_hash(pool, BOX)
    body = {"namespace": pool.namespace, "box": BOX, "credential": cred, "retry": retry,
            "token": pool.token(here)}  # fmt: skip
    conn = pool._conn()
    conn.request("POST", kr.PATH, body=json.dumps(body),
                 headers={"Content-Type": "application/json"})  # fmt: skip
    conn.close()  # gone before the answer
    deadline = time.monotonic() + 30
    while _secret_hash(pool, BOX) == armed:  # consumed all the same
        assert time.monotonic() < deadline, "the request was never served"
        time.sleep(0.1)
    # a thief with the used credential and a retry key of its own
    status, got = pool.ask(BOX, cred, pool.token(here), retry="t" * 64)
    assert (status, got["reason"]) == (403, kr.CREDENTIAL_USED)
    again = _count(kr.RELEASED_AGAIN)
    out = subprocess.run(
        ["/bin/sh", str(guest / "fetch")], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    released = json.loads((guest / "secrets.json").read_text())
    assert base64.b64decode(released["secrets"]["disk"]["key"]).decode() == DISK_KEY
    assert _count(kr.RELEASED_AGAIN) == again + 1
    assert not (guest / "credential").exists()
    assert not (guest / "retry").exists()
    said = [m for r, m in _events(pool, BOX) if r == "KeyReleased"]
    assert any("again" in m and "its answer was lost" in m for m in said), said
    # nothing more was consumed: the next boot's credential is still the one armed then
    assert _secret_hash(pool, BOX) != armed
    pool.reboot(BOX)
    assert pool.ask(BOX, pool.credential(BOX), pool.token(here))[0] == 200


@pytest.mark.timeout(180)
def test_a_consuming_write_whose_answer_the_api_server_lost_still_releases_or_keeps_the_credential(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API server committed the consuming write but answered it with an error (a 504
    after the fact): gtvp reads the Secret back, finds its own write and releases. A write
    that did not commit releases nothing and uses nothing: asked again, it releases."""
    here = pool.members[0]
    core = pool.rt.clients.core
    write = core.replace_namespaced_secret

    def committed_then_lost(*args: Any, **kwargs: Any) -> Any:
        write(*args, **kwargs)
        raise ApiException(status=504, reason="Gateway Timeout")

    def never_committed(*_args: Any, **_kwargs: Any) -> Any:
        raise ApiException(status=504, reason="Gateway Timeout")

    monkeypatch.setattr(core, "replace_namespaced_secret", committed_then_lost)
    for retry in ("5" * 64, None):  # with a retry key, and from a guest that sends none
        pool.reboot(BOX)  # each release is a boot's own
        cred = pool.credential(BOX)
        extra = {"retry": retry} if retry else {}
        status, got = pool.ask(BOX, cred, pool.token(here), **extra)
        assert status == 200, got
        assert base64.b64decode(got["secrets"]["disk"]["key"]).decode() == DISK_KEY
        assert pool.credential(BOX) != cred  # consumed, the next one armed
    monkeypatch.setattr(core, "replace_namespaced_secret", never_committed)
    pool.reboot(BOX)
    cred = pool.credential(BOX)
    status, got = pool.ask(BOX, cred, pool.token(here))
    assert (status, got["reason"]) == (503, kr.SECRET_UNAVAILABLE), got
    assert "nothing released, and the credential was still unused" in got["message"]
    assert pool.credential(BOX) == cred
    monkeypatch.setattr(core, "replace_namespaced_secret", write)
    assert pool.ask(BOX, cred, pool.token(here))[0] == 200


@pytest.mark.timeout(180)
def test_a_request_the_api_server_fails_under_is_a_counted_503_and_uses_nothing(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API server times out reading the box's Secret: the guest is told to ask again
    (503 Unavailable), the credential stays unused, the failure shows in
    gtvp_key_releases_total{result="Unavailable"}; asked again, it releases."""
    here = pool.members[0]
    core = pool.rt.clients.core
    read = core.read_namespaced_secret

    def timing_out(*_args: Any, **_kwargs: Any) -> Any:
        raise ApiException(status=504, reason="Gateway Timeout")

    cred, before = pool.credential(BOX), _count(kr.UNAVAILABLE)
    monkeypatch.setattr(core, "read_namespaced_secret", timing_out)
    status, got = pool.ask(BOX, cred, pool.token(here))
    assert (status, got["reason"]) == (503, kr.UNAVAILABLE), got
    assert "ask again" in got["message"]
    assert _count(kr.UNAVAILABLE) == before + 1
    monkeypatch.setattr(core, "read_namespaced_secret", read)
    assert pool.credential(BOX) == cred
    assert pool.ask(BOX, cred, pool.token(here))[0] == 200


@pytest.mark.timeout(180)
def test_an_api_server_failing_a_named_secrets_read_is_a_503_and_uses_nothing(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The box's credential is read, then the API server throttles (429) or fails (500) the
    read of a Secret the box names: no final refusal (the guest's script would stop and the
    box run without its keys), a 503 to ask again, nothing consumed."""
    here = pool.members[0]
    core = pool.rt.clients.core
    read = core.read_namespaced_secret

    def failing(status: int) -> Any:
        def reading(name: str, namespace: str, **kwargs: Any) -> Any:
            if name != kr.cloud_init_secret(BOX):
                raise ApiException(status=status, reason="Too Many Requests")
            return read(name, namespace, **kwargs)

        return reading

    cred, token = pool.credential(BOX), pool.token(here)
    for code in (429, 500):
        monkeypatch.setattr(core, "read_namespaced_secret", failing(code))
        status, body = pool.ask(BOX, cred, token)
        assert (status, body["reason"]) == (503, kr.UNAVAILABLE), body
        assert "ask again" in body["message"]
        assert pool.credential(BOX) == cred
    monkeypatch.setattr(core, "read_namespaced_secret", read)
    assert pool.ask(BOX, cred, token)[0] == 200


@pytest.mark.timeout(180)
def test_a_verdict_that_runs_out_during_the_last_reads_or_the_write_releases_nothing(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release is judged again at the time its last reads (the SecurityPolicy, the
    Members) end, and once more when the consuming write has ended: each may take seconds,
    and a verdict that ran out meanwhile gives nothing. Out after the write, the credential
    is used but nothing was given: the guest asks again with its retry key, and gets the
    Secrets once its member is Trusted now."""
    here = pool.members[0]
    cred, token = pool.credential(BOX), pool.token(here)
    late = lambda: pool.clock_offset.__setitem__(0, dt.timedelta(minutes=5))  # noqa: E731
    behind = pool.endpoint._policy_behind

    def slow_policy_read() -> Any:
        late()
        return behind()

    monkeypatch.setattr(pool.endpoint, "_policy_behind", slow_policy_read)
    status, body = pool.ask(BOX, cred, token)
    assert (status, body["reason"]) == (403, kr.VERDICT_EXPIRED), body
    assert pool.credential(BOX) == cred  # nothing consumed
    monkeypatch.setattr(pool.endpoint, "_policy_behind", behind)
    pool.clock_offset[0] = dt.timedelta(0)
    core = pool.rt.clients.core
    write = core.replace_namespaced_secret

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        late()
        return write(*args, **kwargs)

    monkeypatch.setattr(core, "replace_namespaced_secret", slow_write)
    retry = "5" * 64
    status, body = pool.ask(BOX, cred, token, retry=retry)
    assert (status, body["reason"]) == (503, kr.UNAVAILABLE), body
    assert "ask again with the same credential and retry key" in body["message"]
    assert DISK_KEY not in json.dumps(body)
    assert pool.credential(BOX) != cred  # used: the next one is armed
    monkeypatch.setattr(core, "replace_namespaced_secret", write)
    status, body = pool.ask(BOX, cred, token, retry=retry)  # still out
    assert (status, body["reason"]) == (403, kr.VERDICT_EXPIRED), body
    pool.clock_offset[0] = dt.timedelta(0)
    status, body = pool.ask(BOX, cred, token, retry=retry)
    assert status == 200, body
    assert base64.b64decode(body["secrets"]["disk"]["key"]).decode() == DISK_KEY


@pytest.mark.timeout(180)
def test_a_repeat_does_not_give_a_secret_rotated_since_the_release(pool: Pool) -> None:
    """The guest's answer was released (and, say, lost); its owner then rotates the Secret,
    because the host it went to was found bad. Root there, who kept the guest's credential
    and retry key, asks again within the repeat window: the rotated key is not given."""
    here = pool.members[0]
    cred, token, retry = pool.credential(BOX), pool.token(here), "6" * 64
    assert pool.ask(BOX, cred, token, retry=retry)[0] == 200
    status, body = pool.ask(BOX, cred, token, retry=retry)  # the same answer again
    assert status == 200, body
    pool.admin.core.patch_namespaced_secret(  # a tool labels it: the data is the same
        "disk", pool.namespace, {"metadata": {"labels": {"example.com/synced": "yes"}}}
    )
    status, body = pool.ask(BOX, cred, token, retry=retry)
    assert status == 200, body
    rotated = "disk-key-rotated-DO-NOT-LEAK"
    pool.admin.core.patch_namespaced_secret(
        "disk", pool.namespace, {"stringData": {"key": rotated}}
    )
    status, body = pool.ask(BOX, cred, token, retry=retry)
    assert (status, body["reason"]) == (403, kr.SECRET_CHANGED), body
    assert "disk" in body["message"]
    assert rotated not in json.dumps(body)


@pytest.mark.timeout(180)
def test_a_host_that_booted_again_gets_nothing_until_its_new_boot_is_quoted(pool: Pool) -> None:
    """The host rebooted (its Node reports another bootID): gtvp spends the verdict for new
    placements, but key release is no placement. A guest asking at once, before or after
    the operator looked, is told to ask again (503 MemberRebooted), nothing consumed; once
    a quote of the new boot verifies, it gets its Secrets."""
    here = pool.members[0]

    def node_boot(boot: str) -> None:
        node = {"metadata": {"name": here.name}, "status": {"nodeInfo": {"bootID": boot}}}
        pool.rt.view.observe_node(node, "MODIFIED")

    node_boot("b1")
    _until(pool.rt, here, "QuoteVerified")
    cred, token = pool.credential(BOX), pool.token(here)
    node_boot("b2")  # before the operator looked
    status, body = pool.ask(BOX, cred, token)
    assert (status, body["reason"]) == (503, kr.MEMBER_REBOOTED), body
    assert "booted again" in body["message"]
    _turn(pool.rt, here)  # the operator looked: spent, a fresh quote asked for
    trust = _status(pool.rt, here.name)["trust"]
    assert (trust["nodeBootID"], trust["usesLeft"], trust["bootUnquoted"]) == ("b2@", 0, True)
    status, body = pool.ask(BOX, cred, token)
    assert (status, body["reason"]) == (503, kr.MEMBER_REBOOTED), body
    assert pool.credential(BOX) == cred
    deadline = time.monotonic() + 20
    while _status(pool.rt, here.name)["trust"].get("bootUnquoted"):
        assert time.monotonic() < deadline
        _turn(pool.rt, here)
        time.sleep(0.2)
    assert pool.ask(BOX, cred, pool.token(here))[0] == 200


@pytest.mark.timeout(180)
def test_what_changes_while_the_secrets_are_read_stops_the_release(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verdict is judged again just before the credential is consumed: one that ran out
    while the named Secrets were read (each read may take seconds), or a VMI replaced
    meanwhile, stops the release and consumes nothing."""
    here = pool.members[0]
    core = pool.rt.clients.core
    read = core.read_namespaced_secret

    def slow(late: Any) -> Any:
        def reading(name: str, namespace: str, **kwargs: Any) -> Any:
            if name != kr.cloud_init_secret(BOX):  # a named Secret: the world moves on
                late()
            return read(name, namespace, **kwargs)

        return reading

    cred, token = pool.credential(BOX), pool.token(here)
    expire = lambda: pool.clock_offset.__setitem__(0, dt.timedelta(minutes=5))  # noqa: E731
    monkeypatch.setattr(core, "read_namespaced_secret", slow(expire))
    status, body = pool.ask(BOX, cred, token)
    assert (status, body["reason"]) == (403, kr.VERDICT_EXPIRED), body
    pool.clock_offset[0] = dt.timedelta(0)
    replaced: list[bool] = []

    def reboot_once() -> None:
        if not replaced:
            replaced.append(True)
            pool.reboot(BOX)

    monkeypatch.setattr(core, "read_namespaced_secret", slow(reboot_once))
    status, body = pool.ask(BOX, cred, token)
    assert (status, body["reason"]) == (403, kr.NOT_RUNNING), body
    assert "replaced while its Secrets were read" in body["message"]
    monkeypatch.setattr(core, "read_namespaced_secret", read)
    assert pool.credential(BOX) == cred  # nothing consumed
    assert pool.ask(BOX, cred, token)[0] == 200


@pytest.mark.timeout(180)
def test_an_expired_verdict_gets_no_release(pool: Pool) -> None:
    here = pool.members[0]
    cred, token = pool.credential(BOX), pool.token(here)
    pool.clock_offset[0] = dt.timedelta(minutes=5)  # the verdicts (validFor 30s) ran out
    status, body = pool.ask(BOX, cred, token)
    assert (status, body["reason"]) == (403, kr.VERDICT_EXPIRED)
    pool.clock_offset[0] = dt.timedelta(0)
    assert pool.ask(BOX, cred, token)[0] == 200  # not consumed by the refusal


@pytest.mark.timeout(180)
def test_a_member_that_loses_trust_gets_no_more_releases(pool: Pool) -> None:
    here = pool.members[0]
    assert pool.ask(BOX, pool.credential(BOX), pool.token(here))[0] == 200
    here.tpm.extend(7, b"an unsigned bootloader")
    _until(pool.rt, here, "PcrMismatch")
    pool.reboot(BOX)  # the VM's next boot on that member
    cred = pool.credential(BOX)
    status, body = pool.ask(BOX, cred, pool.token(here))
    assert (status, body["reason"]) == (403, kr.MEMBER_NOT_TRUSTED)
    assert "PcrMismatch" in body["message"]


@pytest.mark.timeout(180)
def test_a_revocation_stops_releases_before_the_member_is_looked_at_again(
    pool: Pool,
    ca: SoftCA,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The security team revokes a digest of the member class (a forbidden event digest
    added): the host's Trusted verdict rested on the old values. Before the operator has
    looked at the member again (a host that withholds its quote would keep that verdict
    until it expires), key release refuses, nothing consumed; once a quote judged by the
    new values verifies (with the host's event log: nothing measured, nothing forbidden),
    it releases."""
    here = pool.members[0]
    log = tmp_path / "binary_bios_measurements"
    log.write_bytes(synth_log([]))
    here.agent.cfg = dataclasses.replace(here.agent.cfg, event_log=log)
    cred, token = pool.credential(BOX), pool.token(here)
    spec = pool_policy(
        cast(SwtpmCA, Bundle(ca.bundle_pem())), name=POLICY, interval="1s", valid_for="30s"
    )["spec"]
    spec["memberClasses"][0]["eventLog"] = {"forbiddenDigests": ["ab" * 32]}
    revoked = parse_policy(POLICY, spec)
    assert policies.set_policy(pool.rt, POLICY, revoked)
    status, body = pool.ask(BOX, cred, token)
    assert (status, body["reason"]) == (403, kr.REFERENCES_CHANGED), body
    assert f"member {here.name}, where the VM runs, is not vouched for" in body["message"]
    # the operator's look spends the verdict and asks for a quote, judged by the new values
    now_relied = relied_on(revoked.member_classes["swtpm"], None)
    deadline = time.monotonic() + 20
    while (_status(pool.rt, here.name).get("trust") or {}).get("references") != now_relied:
        assert time.monotonic() < deadline, _status(pool.rt, here.name).get("trust")
        _turn(pool.rt, here)
        time.sleep(0.2)
    assert pool.ask(BOX, cred, pool.token(here))[0] == 200  # not consumed by the refusal


@pytest.mark.timeout(180)
def test_a_vm_whose_launcher_pod_is_on_a_host_without_a_verdict_gets_nothing(
    pool: Pool, control_plane: ControlPlane
) -> None:
    """Root on a host rewrote the box VMI's status.nodeName to a Trusted member (its
    virt-handler's token can) and sends that member's token: the VM's launcher pod, bound
    to the host, says where it runs, and the host holds no verdict."""
    here = pool.members[0]
    vmi = pool.rt.view.vmis[(pool.namespace, BOX)]
    pod = create_launcher_pod(control_plane, pool.namespace, vmi, "rogue-host")
    cred = pool.credential(BOX)
    said = f"status names member {here.name} but a launcher pod of it is on rogue-host"
    # this replica's pod watch has not delivered it yet: the last look, at the API
    # server, finds it all the same
    status, body = pool.ask(BOX, cred, pool.token(here))
    assert (status, body["reason"]) == (403, kr.MEMBER_UNKNOWN), body
    assert said in body["message"]
    pool.rt.view.observe_pod(pod, "ADDED")  # as the operator's watch delivers it
    status, body = pool.ask(BOX, cred, pool.token(here))
    assert (status, body["reason"]) == (403, kr.MEMBER_UNKNOWN)
    assert said in body["message"]
    # gone (a migration that landed: the same)
    pool.admin.core.delete_namespaced_pod(
        pod["metadata"]["name"], pool.namespace, grace_period_seconds=0
    )
    pool.rt.view.observe_pod(pod, "DELETED")
    assert pool.ask(BOX, cred, pool.token(here))[0] == 200  # not consumed by the refusal


@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_guests_cloud_init_script_fetches_the_secrets_with_curl(
    pool: Pool, tmp_path: Path
) -> None:
    """The user data's own files and script, run as cloud-init would (in a scratch dir)."""
    guest = tmp_path / "guest"
    doc = pool.guest(BOX, guest)
    assert doc["runcmd"][0] == ["/bin/sh", f"{compose.KEY_RELEASE_DIR}/fetch"]
    out = subprocess.run(
        ["/bin/sh", str(guest / "fetch")], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    released = json.loads((guest / "secrets.json").read_text())
    assert base64.b64decode(released["secrets"]["disk"]["key"]).decode() == DISK_KEY
    assert not (guest / "credential").exists()  # used, then removed


@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_under_box_attestation_the_guest_waits_for_its_vtpm_to_be_attested_here(
    pool: Pool, tmp_path: Path
) -> None:
    """A policy that attests boxes: the box's Secrets wait until gtvp verified a quote of
    its vTPM on the member where it runs, for this VMI; the guest's script asks again
    meanwhile (the credential unused), then gets them."""
    runtime, here = pool.rt, pool.members[0]
    policy_name = runtime.settings.policy_name
    kept = runtime.accepted_policies.get(policy_name)
    policy = runtime.view.policy
    assert policy is not None
    spec = {"boxAttestation": {"caBundle": SoftCA().bundle_pem()}}
    runtime.accepted_policies[policy_name] = ("uid", Accepted(1, spec, policy))
    try:
        guest = tmp_path / "guest"
        pool.guest(BOX, guest)
        refused_before = _count(kr.BOX_NOT_ATTESTED)
        env = {"PATH": "/usr/bin:/bin", "GTVP_ATTEST_PAUSE": "0.3"}
        script = subprocess.Popen(
            ["/bin/sh", str(guest / "fetch")], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while _count(kr.BOX_NOT_ATTESTED) < refused_before + 2:  # asked, refused, again
                assert script.poll() is None, script.communicate()
                assert time.monotonic() < deadline
                time.sleep(0.1)
            box = runtime.view.boxes[(pool.namespace, BOX)]
            vmi_uid = runtime.view.vmis[(pool.namespace, BOX)]["metadata"]["uid"]
            # a quote verified on another member, or for an earlier VMI, is not enough
            for member, uid in (("elsewhere", vmi_uid), (here.name, "an-earlier-vmi")):
                att = {"state": "Verified", "member": member, "vmiUID": uid}
                runtime.view.observe_box(
                    {**box, "status": {**box["status"], "attestation": att}}, "MODIFIED"
                )
                seen = _count(kr.BOX_NOT_ATTESTED)
                while _count(kr.BOX_NOT_ATTESTED) < seen + 1:
                    assert script.poll() is None, script.communicate()
                    assert time.monotonic() < deadline + 30
                    time.sleep(0.1)
            att = {"state": "Verified", "member": here.name, "vmiUID": vmi_uid}
            runtime.view.observe_box(
                {**box, "status": {**box["status"], "attestation": att}}, "MODIFIED"
            )
            _, err = script.communicate(timeout=60)
        finally:
            if script.poll() is None:
                script.kill()
        assert script.returncode == 0, err
        released = json.loads((guest / "secrets.json").read_text())
        assert base64.b64decode(released["secrets"]["disk"]["key"]).decode() == DISK_KEY
        said = [m for r, m in _events(pool, BOX) if r == "KeyReleaseRefused"]
        assert any("BoxNotAttested: the box's vTPM is not attested on member" in m for m in said), (
            said
        )
    finally:
        if kept is None:
            runtime.accepted_policies.pop(policy_name, None)
        else:
            runtime.accepted_policies[policy_name] = kept


@pytest.mark.timeout(120)
def test_the_armed_vm_passes_kubevirts_schema_and_never_holds_the_credential(
    pool: Pool, control_plane: ControlPlane
) -> None:
    vm = _armed_vm(pool.rt, pool.namespace, BOX)
    volume = next(v for v in vm["spec"]["template"]["spec"]["volumes"] if v["name"] == "cloudinit")
    assert volume == {
        "name": "cloudinit",
        "cloudInitNoCloud": {"secretRef": {"name": kr.cloud_init_secret(BOX)}},
    }
    assert pool.credential(BOX) not in json.dumps(vm)
    control_plane.kubectl(
        "create", "--dry-run=server", "--validate=strict", "-f", "-", input_text=json.dumps(vm)
    )


def test_a_namespace_that_did_not_opt_in_gets_no_credential_and_gtvp_reads_none_of_its_secrets(
    operator_clients: kube.Clients,
    admin: kube.Clients,  # noqa: F811
    namespace: str,
) -> None:
    rt_ = Runtime(settings=OperatorSettings(), clients=operator_clients)
    rt_.key_release = kr.Settings(url="https://gtvp.example:9090")
    admin.core.create_namespaced_secret(
        namespace, {"metadata": {"name": "disk"}, "stringData": {"k": "v"}}
    )
    box = _create(
        admin, LAZY_BOXES, _box(f"b-{uuid.uuid4().hex[:6]}", namespace, [{"name": "disk"}])
    )
    rt_.view.observe_box(box, "ADDED")
    composed = _vms(namespace)[0]
    got = key_release.arm(rt_, (namespace, box["metadata"]["name"]), composed)
    assert isinstance(got, str)
    assert "gtvp-key-release" in got
    assert "403" in got
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as refused:
        operator_clients.core.read_namespaced_secret("disk", namespace)
    assert refused.value.status == 403


def test_a_box_naming_a_secret_twice_or_a_bad_name_is_refused_by_the_api_server(
    control_plane: ControlPlane, namespace: str
) -> None:
    for secrets, says in (
        ([{"name": "disk"}, {"name": "disk"}], "each Secret appears once"),
        ([{"name": "Not_A_Name"}], "spec.secrets[0].name"),
    ):
        out = control_plane.kubectl(
            "create",
            "-f",
            "-",
            input_text=json.dumps(_box("twice", namespace, secrets)),
            check=False,
        )
        assert out.returncode != 0
        assert says in out.stderr


def test_a_box_naming_secrets_is_not_started_without_key_release_and_says_why(
    operator_clients: kube.Clients,
    admin: kube.Clients,  # noqa: F811
    namespace: str,
) -> None:
    from gtvp.core.boxes import Decision
    from gtvp.handlers import lazyboxes

    rt_ = Runtime(settings=OperatorSettings(), clients=operator_clients)  # no --key-release-url
    box = _create(admin, LAZY_BOXES, _box("nokeys", namespace, [{"name": "disk"}]))
    rt_.view.observe_box(box, "ADDED")
    key = (namespace, "nokeys")
    decision = Decision({"phase": "Placing", "message": "starting"}, vm=_vms(namespace)[0])
    assert lazyboxes._arm(rt_, key, decision) is None  # no VM is written
    status = (kube.get_if_present(admin, LAZY_BOXES, "nokeys", namespace) or {}).get("status") or {}
    assert status["phase"] == "Failed"
    assert "--key-release-url" in status["message"]
    events = admin.core.list_namespaced_event(
        namespace, field_selector="involvedObject.name=nokeys"
    )
    assert [e.reason for e in events.items] == ["KeyReleaseUnavailable"]


def _gated_vm(
    name: str, namespace: str, level: str | None, secrets: list[dict[str, Any]]
) -> dict[str, Any]:
    """A user's VirtualMachine (not a box) that mounts its key-release Secret as a disk."""
    labels = {"gtvp.io/level": level} if level else {}
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {kr.VM_SECRETS_ANNOTATION: json.dumps(secrets)},
        },
        "spec": {
            "runStrategy": "Always",
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    "domain": {
                        "devices": {"disks": [{"name": "keyrelease", "serial": "gtvp-keyrelease"}]},
                        "memory": {"guest": "64Mi"},
                    },
                    "volumes": [
                        {
                            "name": "keyrelease",
                            "secret": {"secretName": kr.credential_secret(kr.VM, name)},
                        }
                    ],
                },
            },
        },
    }


@pytest.mark.timeout(180)
def test_a_gated_vm_that_names_secrets_gets_a_credential_once_and_its_guest_fetches_them(
    pool: Pool, tmp_path: Path, control_plane: ControlPlane
) -> None:
    from gtvp.core.api_resources import VIRTUAL_MACHINES

    ns, admin_ = pool.namespace, pool.admin
    # the VM as docs/keyrelease.md shows it is valid KubeVirt
    control_plane.kubectl(
        "create",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        "-",
        input_text=json.dumps(_gated_vm("plain", ns, "2", [{"name": "vm-key"}])),
    )
    admin_.core.create_namespaced_secret(
        ns,
        {
            "metadata": {
                "name": "vm-key",
                "annotations": {kr.RELEASE_TO_ANNOTATION: "vm/plain", kr.MIN_LEVEL_ANNOTATION: "2"},
            },
            "stringData": {"key": DISK_KEY},
        },
    )
    for vm in (
        _gated_vm("plain", ns, "2", [{"name": "vm-key"}]),
        _gated_vm("ungated", ns, None, [{"name": "vm-key"}]),  # not gated: never armed
    ):
        pool.rt.view.observe_vm(_create(admin_, VIRTUAL_MACHINES, vm), "ADDED")
    key_release.arm_gated_vms(pool.rt)
    first = pool.rt.clients.core.read_namespaced_secret(kr.credential_secret(kr.VM, "plain"), ns)
    key_release.arm_gated_vms(pool.rt)  # nothing new: the credential stays
    pool.rt.key_release_armed.clear()  # as after a restart: the Secret exists, it stays
    key_release.arm_gated_vms(pool.rt)
    again = pool.rt.clients.core.read_namespaced_secret(kr.credential_secret(kr.VM, "plain"), ns)
    assert again.data == first.data
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as absent:
        admin_.core.read_namespaced_secret(kr.credential_secret(kr.VM, "ungated"), ns)
    assert absent.value.status == 404
    vmi = _create(admin_, VIRTUAL_MACHINE_INSTANCES, _vmi("plain", ns, pool.members[0].name))
    pool.rt.view.observe_vmi(vmi, "ADDED")
    # the guest: the Secret's files as the mounted disk shows them, the script run with curl
    guest = tmp_path / "guest"
    guest.mkdir()
    for key, value in again.data.items():
        (guest / key).write_bytes(base64.b64decode(value))
    env = {"PATH": "/usr/bin:/bin", "GTVP_KEY_RELEASE_DIR": str(guest)}
    out = subprocess.run(
        ["/bin/sh", str(guest / "fetch")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    released = json.loads((guest / "secrets.json").read_text())
    assert base64.b64decode(released["secrets"]["vm-key"]["key"]).decode() == DISK_KEY
    events = pool.admin.core.list_namespaced_event(ns, field_selector="involvedObject.name=plain")
    assert [(e.involved_object.kind, e.reason) for e in events.items] == [
        ("VirtualMachine", "KeyReleased")
    ]
    # the guest's credential is spent (the Secret holds the next one); the ungated VM and a
    # box of that name are not this VM
    spent = base64.b64decode(first.data["credential"]).decode()
    token = pool.token(pool.members[0])
    status, body = pool.ask("plain", spent, token, kind="vm")
    assert (status, body["reason"]) == (403, kr.CREDENTIAL_USED)
    assert pool.ask("ungated", spent, token, kind="vm")[1]["reason"] == kr.WRONG_CREDENTIAL
    assert pool.ask("plain", spent, token)[1]["reason"] == kr.WRONG_CREDENTIAL
