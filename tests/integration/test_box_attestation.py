"""Box attestation on the real API server, the guest's vTPM a real swtpm (docs/boxattest.md).

The operator's code runs in-process (as in test_key_release.py): members attested by
gtvp-agent's code over software TPMs, the LazyBoxes, VMIs, Secrets and migrations real
objects. The guest is played by this test: it reads its `#gtvp-attest` line from the
cloud-init Secret gtvp armed, drives its vTPM (an swtpm whose EK certificate the vTPM CA
issued) with tpm2-pytss (gtvp-agent's Tpm class: an RSA EK, an AK under it), measures the
composed disks into PCR 13 and talks to the endpoint over HTTPS. The attacker comes first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import http.client
import json
import secrets
import ssl
import struct
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry

from gtvp import box_attestation, http_endpoints, kube
from gtvp.core import boxattest as ba
from gtvp.core import keyrelease as kr
from gtvp.core.api_resources import LAZY_BOXES, MEMBERS, MIGRATIONS, VIRTUAL_MACHINE_INSTANCES
from gtvp.core.components import parse_component
from gtvp.core.compose import BOX_LABEL, BoxRef, compose_vm, overlay_order, template_boots
from gtvp.core.evacuation import EVACUATION_LABEL, Vmi, migration_name
from gtvp.core.policy import MigrationLimits, Policy, parse_policy
from gtvp.core.policy_status import Accepted
from gtvp.core.resolve import BoxRequest, resolve
from gtvp.core.timestamps import parse_ts
from gtvp.handlers import evacuation, policies
from gtvp.metrics import METRICS
from gtvp.metrics_auth import TlsFiles
from gtvp.runtime import Runtime
from gtvp_agent.tpm import Tpm
from gtvp_local import pki
from gtvp_local.controlplane import ControlPlane
from gtvp_local.pool import pool_policy
from gtvp_local.swtpm import Swtpm, SwtpmCA
from tests.catalogue import Publisher
from tests.integration.test_key_release import _bind_key_release, _create
from tests.integration.test_verdict_tokens import (  # noqa: F401 - fixtures
    POLICY,
    _Member,
    _until,
    admin,
    ca,
    keys_namespace,
    members,
    rt,
)
from tests.launcher_pods import create_launcher_pod
from tests.softmember import Bundle, policy_trusting
from tests.softtpm import SoftCA, SoftTpm

pytestmark = [pytest.mark.controlplane, pytest.mark.tpm]

BOX, OTHER_BOX = "attested", "neighbour"
PUB = Publisher()


# ----- the guest ----------------------------------------------------------------------------


def _extend(tcti: str, pcr: int, digest: bytes) -> None:
    """TPM2_PCR_Extend(pcr, sha256: digest), as the box init does for each disk."""
    from tpm2_pytss import ESAPI, TCTILdr
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
    from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    name, _, conf = tcti.partition(":")
    esapi = ESAPI(TCTILdr(name, conf))
    try:
        values = TPML_DIGEST_VALUES(
            [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))]
        )
        esapi.pcr_extend(ESYS_TR.PCR0 + pcr, values)
    finally:
        esapi.close()


@dataclass
class Guest:
    """A box's guest: its cloud-init configuration and its vTPM."""

    config: dict[str, Any]
    tpm: Swtpm
    state: Path
    measured: list[bytes] = field(default_factory=list)

    def post(
        self,
        path: str,
        body: dict[str, Any],
        *,
        credential: str | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, Any]]:
        url = urllib.parse.urlparse(self.config["url"])
        ctx = ssl.create_default_context(cadata=self.config["caPem"])
        conn = http.client.HTTPSConnection(url.hostname or "", url.port, context=ctx, timeout=30)
        data = raw if raw is not None else json.dumps({"box": self.config["box"], **body}).encode()
        conn.request(
            "POST",
            path,
            body=data,
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {credential or self.config['credential']}",
            },
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    def keys(self) -> dict[str, str]:
        with Tpm.open(self.tpm.tcti, self.state) as t:
            e = t.enrolment()
        assert e.ek_certificate is not None
        return {
            "ekCertificate": base64.b64encode(e.ek_certificate).decode(),
            "ekPublic": base64.b64encode(e.ek_public).decode(),
            "akPublic": base64.b64encode(e.ak_public).decode(),
        }

    def enrol(self, **override: str) -> tuple[int, dict[str, Any]]:
        return self.post(ba.ENROL, {**self.keys(), **override})

    def activate(
        self, answer: dict[str, Any], proof: bytes | None = None
    ) -> tuple[int, dict[str, Any]]:
        if proof is None:
            with Tpm.open(self.tpm.tcti, self.state) as t:
                proof = t.activate_credential(
                    base64.b64decode(answer["credentialBlob"]), base64.b64decode(answer["secret"])
                )
        body = {"enrolment": answer["enrolment"], "secret": base64.b64encode(proof).decode()}
        return self.post(ba.ACTIVATE, body)

    def bind(self) -> None:
        status, answer = self.enrol()
        assert status == 200, answer
        status, body = self.activate(answer)
        assert (status, body) == (200, {"bound": True}), body

    def measure(self, digests: list[bytes]) -> None:
        for d in digests:
            _extend(self.tpm.tcti, self.config["pcr"], d)
            self.measured.append(d)

    def challenge(self) -> dict[str, Any]:
        status, body = self.post(ba.CHALLENGE, {})
        assert status == 200, body
        return body

    def quote_body(self, nonce: str, measurements: list[bytes] | None = None) -> dict[str, Any]:
        with Tpm.open(self.tpm.tcti, self.state) as t:
            q = t.quote(bytes.fromhex(nonce), "sha256", [self.config["pcr"]])
        listed = self.measured if measurements is None else measurements
        return {
            "nonce": nonce,
            "quote": base64.b64encode(q.attest).decode(),
            "signature": base64.b64encode(q.signature).decode(),
            "pcrs": {str(self.config["pcr"]): q.pcr_values[self.config["pcr"]].hex()},
            "measurements": [f"sha256:{m.hex()}" for m in listed],
        }

    def quote(self, nonce: str, **kw: Any) -> tuple[int, dict[str, Any]]:
        return self.post(ba.QUOTE, self.quote_body(nonce, **kw))


# ----- the pool -----------------------------------------------------------------------------


def _composed(namespace: str, name: str, uid: str) -> tuple[dict[str, Any], list[Any]]:
    cat = [parse_component(o) for o in PUB.web_catalogue()]
    spec: dict[str, Any] = {
        "application": {"name": "nginx"},
        "dependencies": [{"name": "debian-minimal"}],
        "level": 2,
        "resources": {"cpu": "500m", "memory": "512Mi"},
    }
    comps = resolve(BoxRequest.from_spec(spec), cat)
    return compose_vm(BoxRef(name, namespace, uid), spec, comps, None), list(comps)


@dataclass
class Pool:
    rt: Runtime
    namespace: str
    members: list[_Member]
    admin: kube.Clients
    endpoint: box_attestation.Endpoint
    guests: dict[str, Guest]
    disks: dict[str, list[bytes]]
    clock_offset: list[dt.timedelta]

    def box(self, name: str) -> dict[str, Any]:
        got = kube.get_if_present(self.admin, LAZY_BOXES, name, self.namespace)
        assert got is not None
        return got

    def attestation(self, name: str) -> dict[str, Any]:
        return dict((self.box(name).get("status") or {}).get("attestation") or {})

    def move(self, name: str, member: _Member) -> None:
        """The VMI now runs on `member` (as a finished migration leaves it)."""
        vmi = kube.get_if_present(self.admin, VIRTUAL_MACHINE_INSTANCES, name, self.namespace)
        assert vmi is not None
        vmi["status"]["nodeName"] = member.name
        group, version, plural = VIRTUAL_MACHINE_INSTANCES.coordinates
        out = self.admin.custom.replace_namespaced_custom_object(
            group, version, self.namespace, plural, name, vmi
        )
        self.rt.view.observe_vmi(out, "MODIFIED")

    def act(self) -> None:
        """One full pass of the leader's box loop over boxes whose vTPM evidence failed."""
        for name in (BOX, OTHER_BOX):
            self.rt.view.observe_box(self.box(name), "MODIFIED")
        asyncio.run(evacuation.evacuate_unattested(self.rt))

    def migrations(self, name: str) -> list[dict[str, Any]]:
        group, version, plural = MIGRATIONS.coordinates
        got = self.admin.custom.list_namespaced_custom_object(
            group, version, self.namespace, plural
        )
        return [m for m in got["items"] if m["spec"]["vmiName"] == name]

    def events(self, name: str) -> list[tuple[str, str]]:
        got = self.admin.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        )
        return [(e.reason, e.message) for e in got.items]


def _vmi(name: str, namespace: str, node: str, vm: dict[str, Any]) -> dict[str, Any]:
    """The box's VMI as virt-controller makes it from its VM's template."""
    return {
        "apiVersion": VIRTUAL_MACHINE_INSTANCES.api_version,
        "kind": VIRTUAL_MACHINE_INSTANCES.kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {BOX_LABEL: name, "gtvp.io/level": "2"},
        },
        "spec": vm["spec"]["template"]["spec"],
        "status": {"phase": "Running", "nodeName": node},
    }


def _config(runtime: Runtime, namespace: str, box: str) -> dict[str, Any]:
    """The `#gtvp-attest` line of the box's cloud-init Secret, decoded (what the init greps)."""
    secret = runtime.clients.core.read_namespaced_secret(kr.cloud_init_secret(box), namespace)
    text = base64.b64decode(secret.data[kr.USER_DATA_KEY]).decode()
    (line,) = [x for x in text.splitlines() if x.startswith(ba.LINE_PREFIX)]
    doc: dict[str, Any] = json.loads(base64.b64decode(line.removeprefix(ba.LINE_PREFIX)))
    return doc


@pytest.fixture(scope="module")
def vtpm_ca(tpm_dir: Path, make_tpm: Callable[..., Swtpm]) -> SwtpmCA:
    """The vTPM CA: it certifies the boxes' vTPM EKs (not the members' TPMs)."""
    authority = SwtpmCA(tpm_dir / "vtpm-ca").ensure()
    make_tpm(ca=authority)  # its first certificate creates the CA's root and intermediate
    return authority


@pytest.fixture
def pool(
    rt: Runtime,  # noqa: F811
    members: list[_Member],  # noqa: F811
    control_plane: ControlPlane,
    admin: kube.Clients,  # noqa: F811
    namespace: str,
    tmp_path: Path,
    make_tpm: Callable[..., Swtpm],
    vtpm_ca: SwtpmCA,
) -> Iterator[Pool]:
    _bind_key_release(control_plane, namespace)  # the operator writes the cloud-init Secrets
    guest_tpms = {b: make_tpm(ca=vtpm_ca) for b in (BOX, OTHER_BOX)}
    policy = rt.view.policy
    assert policy is not None
    spec = {"boxAttestation": {"caBundle": vtpm_ca.bundle_pem(), "pcr": 13}}
    rt.accepted_policies[POLICY] = ("uid", Accepted(1, spec, policy))
    cert_dir = tmp_path / "pki"
    cert_dir.mkdir()
    authority = pki.ensure_ca(cert_dir, "gtvp test CA")
    leaf = pki.issue(authority, cert_dir, "operator", common_name="gtvp", server_ips=("127.0.0.1",))
    offset = [dt.timedelta(0)]
    endpoint = box_attestation.Endpoint(rt, clock=lambda: dt.datetime.now(dt.UTC) + offset[0])
    server = http_endpoints.serve(
        0,
        "127.0.0.1",
        CollectorRegistry(),
        lambda: http_endpoints.Probe(loaded=True, loop_started=False, loop_idle_seconds=0),
        tls=TlsFiles(str(leaf.cert), str(leaf.key)).context,
        box_attest=endpoint,
    )
    rt.key_release = kr.Settings(
        url=f"https://127.0.0.1:{server.server_port}", ca_pem=authority.cert.read_text()
    )
    nodes = [_node(admin, m.name) for m in members]  # where evacuations may go
    for node in nodes:
        rt.view.observe_node(node, "ADDED")
    try:
        for m in members:
            _until(rt, m, "QuoteVerified")
        guests, disks = {}, {}
        for name, m in ((BOX, members[0]), (OTHER_BOX, members[0])):
            box = _create(
                admin,
                LAZY_BOXES,
                {
                    "apiVersion": LAZY_BOXES.api_version,
                    "kind": LAZY_BOXES.kind,
                    "metadata": {"name": name, "namespace": namespace},
                    "spec": {
                        "application": {"name": "nginx"},
                        "level": 2,
                        "resources": {"cpu": "500m", "memory": "512Mi"},
                    },
                },
            )
            vm, comps = _composed(namespace, name, box["metadata"]["uid"])
            resolved = [
                {"name": c.name, "version": str(c.version), "digest": c.digest, "type": c.type}
                for c in comps
            ]
            box = kube.patch_status(admin, LAZY_BOXES, name, {"resolved": resolved}, namespace)
            rt.view.observe_box(box, "ADDED")
            armed = box_attestation.arm(rt, (namespace, name), vm)
            assert isinstance(armed, box_attestation.Armed), armed
            # what gtvp records of the armed VM it writes (lazyboxes.reconcile_box)
            composed = [template_boots(armed.vm)]
            written = {"attestation": armed.attestation, "composedBoots": composed}
            box = kube.patch_status(admin, LAZY_BOXES, name, written, namespace)
            rt.view.observe_box(box, "MODIFIED")
            vmi = _create(admin, VIRTUAL_MACHINE_INSTANCES, _vmi(name, namespace, m.name, armed.vm))
            rt.view.observe_vmi(vmi, "ADDED")
            guests[name] = Guest(_config(rt, namespace, name), guest_tpms[name], tmp_path / name)
            disks[name] = [
                bytes.fromhex(c.pin.removeprefix("sha256:")) for c in overlay_order(comps)
            ]
        yield Pool(rt, namespace, members, admin, endpoint, guests, disks, offset)
    finally:
        rt.accepted_policies.pop(POLICY, None)
        server.shutdown()
        server.server_close()
        for node in nodes:
            with contextlib.suppress(ApiException):
                admin.core.delete_node(node["metadata"]["name"])


def _node(clients: kube.Clients, name: str) -> dict[str, Any]:
    """A Node object for a member (no kubelet behind it: evacuation only reads it)."""
    body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}
    made = clients.core.create_node(body)
    out: dict[str, Any] = clients.core.api_client.sanitize_for_serialization(made)
    return out


def _count(result: str) -> float:
    got = METRICS.registry.get_sample_value("gtvp_box_attestations_total", {"result": result})
    return got or 0.0


def _unrestricted(ak_b64: str) -> str:
    """The AK's TPM2B_PUBLIC with its `restricted` attribute cleared."""
    area = bytearray(base64.b64decode(ak_b64))
    (attrs,) = struct.unpack(">I", area[6:10])
    area[6:10] = struct.pack(">I", attrs & ~(1 << 16))
    return base64.b64encode(bytes(area)).decode()


# ----- the attacker -------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_enrolment_refuses_strangers_foreign_eks_weak_aks_and_wrong_activations(
    pool: Pool, make_tpm: Callable[..., Swtpm], tmp_path: Path
) -> None:
    guest, other = pool.guests[BOX], pool.guests[OTHER_BOX]
    before = pool.attestation(BOX)
    keys = guest.keys()
    # no credential, a made-up one, another box's: 401, nothing recorded
    for credential in ("x" * 43, other.config["credential"]):
        status, body = guest.post(ba.ENROL, keys, credential=credential)
        assert (status, body["error"]) == (401, ba.WRONG_CREDENTIAL), body
    status, body = guest.post(ba.ENROL, {**keys, "box": f"{pool.namespace}/nobody"})
    assert (status, body["error"]) == (401, ba.WRONG_CREDENTIAL)
    # malformed: clear 400s
    status, body = guest.post(ba.ENROL, {}, raw=b"{not json")
    assert (status, body["error"]) == (400, ba.BAD_REQUEST)
    assert "not JSON" in body["message"]
    status, body = guest.post(ba.ENROL, {**keys, "ekCertificate": "%%%not base64"})
    assert (status, body["error"]) == (400, ba.BAD_REQUEST)
    assert "'ekCertificate' is not valid base64" in body["message"]
    status, body = guest.post(ba.ENROL, {**keys, "box": "no-slash"})
    assert (status, body["error"]) == (400, ba.BAD_REQUEST)
    assert "<namespace>/<name>" in body["message"]
    # a TPM whose EK certificate the members' CA issued, not the vTPM CA
    rogue = Guest(guest.config, make_tpm(), tmp_path / "rogue")
    status, body = rogue.enrol()
    assert (status, body["error"]) == (403, ba.EK_NOT_TRUSTED), body
    assert "vTPM CA" in body["message"]
    # the right EK with an AK that is not restricted (it could sign a forged quote)
    status, body = guest.enrol(akPublic=_unrestricted(keys["akPublic"]))
    assert (status, body["error"]) == (403, ba.AK_INVALID), body
    assert "restricted" in body["message"]
    assert pool.attestation(BOX) == before  # nothing of it was recorded
    # a proper enrolment; an activation answer that is not the TPM's: not bound
    status, answer = guest.enrol()
    assert status == 200, answer
    status, body = guest.activate(answer, proof=secrets.token_bytes(32))
    assert (status, body["error"]) == (403, ba.ACTIVATION_FAILED), body
    assert pool.attestation(BOX)["bound"] is False
    assert guest.challenge()["enrol"] is True
    # another TPM's (vTPM-CA-certified) answer to this challenge cannot be had; a stale
    # enrolment id is refused as such
    status, body = guest.post(ba.ACTIVATE, {"enrolment": "0" * 16, "secret": "AAAA"})
    assert (status, body["error"]) == (409, ba.STALE_ENROLMENT)
    status, body = guest.activate(answer)
    assert (status, body) == (200, {"bound": True})
    assert any(r == "BoxAttestationRefused" and ba.EK_NOT_TRUSTED in m for r, m in pool.events(BOX))
    # bound: another certified vTPM (the neighbour's) cannot take over while this VMI runs
    bound = pool.attestation(BOX)
    impostor = Guest(guest.config, other.tpm, tmp_path / "impostor")
    status, body = impostor.enrol()
    assert (status, body["error"]) == (403, ba.EK_CHANGED), body
    assert pool.attestation(BOX) == bound


def test_a_guest_enrolling_without_pause_gets_one_enrolment_per_ten_seconds(
    pool: Pool, tmp_path: Path
) -> None:
    """Whoever holds the box's credential (root in its guest, a reader of its cloud-init
    Secret) enrolled the bound AK again and again: each a status write by the operator's
    own account (and a MakeCredential), the box's resourceVersion moving so that the
    deadline's writes met conflicts. Now one enrolment per vTPM and VMI per 10 s is
    answered; the others are a 429, with nothing written (no status, no Event). Someone
    else's certified vTPM enrolling first does not hold the box's own guest back. Found by
    reviews."""
    guest = pool.guests[BOX]
    squatter = Guest(guest.config, pool.guests[OTHER_BOX].tpm, tmp_path / "squatter")
    status, _ = squatter.enrol()  # first, never activated
    assert status == 200
    guest.bind()
    box = pool.box(BOX)
    for _ in range(5):
        status, body = guest.enrol()
        assert (status, body["error"]) == (429, ba.ENROL_TOO_SOON), body
        assert "enrol again in" in body["message"]
    assert pool.box(BOX)["metadata"]["resourceVersion"] == box["metadata"]["resourceVersion"]
    assert not [m for r, m in pool.events(BOX) if ba.ENROL_TOO_SOON in m]
    assert pool.attestation(BOX)["bound"] is True


@pytest.mark.timeout(240)
def test_forged_replayed_expired_and_inconsistent_quotes_are_refused(pool: Pool) -> None:
    guest, other = pool.guests[BOX], pool.guests[OTHER_BOX]
    guest.bind()
    other.bind()
    guest.measure(pool.disks[BOX])
    other.measure(pool.disks[OTHER_BOX])
    nonce = guest.challenge()["nonce"]
    assert len(nonce or "") == 64
    # signed by another TPM's AK (the neighbour's vTPM, same vTPM CA, same PCR value)
    forged = other.quote_body(nonce)
    status, body = guest.post(ba.QUOTE, forged)
    assert (status, body["error"]) == (403, ba.BAD_SIGNATURE), body
    assert pool.attestation(BOX)["state"] == ba.PENDING
    # the PCR is right but the guest's list does not fold to it: not verified, no action
    status, body = guest.quote(nonce, measurements=list(reversed(pool.disks[BOX])))
    assert (status, body["verified"], body["reason"]) == (200, False, ba.MEASUREMENTS_MISMATCH)
    att = pool.attestation(BOX)
    assert att["state"] == ba.PENDING
    assert pool.migrations(BOX) == []
    # the nonce was answered: replaying that quote, or a good one on it, is refused
    status, body = guest.quote(nonce)
    assert (status, body["error"]) == (409, ba.NONCE_REPLAYED), body
    nonce = guest.challenge()["nonce"]
    good = guest.quote_body(nonce)
    pool.clock_offset[0] = ba.NONCE_TTL + dt.timedelta(seconds=1)
    status, body = guest.post(ba.QUOTE, good)
    assert (status, body["error"]) == (409, ba.NONCE_EXPIRED), body
    pool.clock_offset[0] = dt.timedelta(0)
    # malformed quotes: 400, and the nonce is still good afterwards
    for change, words in (
        ({"quote": "@@"}, "'quote' is not valid base64"),
        ({"pcrs": {"7": "00" * 32}}, "exactly PCR 13"),
        ({"measurements": ["md5:abc"]}, "sha256:<64 hex digits>"),
    ):
        status, body = guest.post(ba.QUOTE, {**good, **change})
        assert (status, body["error"]) == (400, ba.BAD_REQUEST), body
        assert words in body["message"]
    status, body = guest.post(ba.QUOTE, good)
    assert (status, body["verified"], body["reason"]) == (200, True, ba.VERIFIED), body
    status, body = guest.post(ba.QUOTE, good)
    assert (status, body["error"]) == (409, ba.NONCE_REPLAYED)
    assert pool.attestation(BOX)["state"] == ba.VERIFIED


@pytest.mark.timeout(240)
def test_a_quote_from_a_vmi_booting_another_composition_is_refused(pool: Pool) -> None:
    """A tenant who may edit VMs (not the box's Secrets) restarts the box's VMI with a disk of
    their own pinned on its kernel command line; the init measures and checks that disk
    against that pin, so the vTPM shows exactly what the line says. gtvp compares with what
    it composed (status.composedBoots), not with the line: refused, nothing attested."""
    guest = pool.guests[BOX]
    guest.bind()
    theirs = hashlib.sha256(b"the tenant's own application disk").digest()
    *kept, _app = pool.disks[BOX]
    group, version, plural = VIRTUAL_MACHINE_INSTANCES.coordinates
    vmi = kube.get_if_present(pool.admin, VIRTUAL_MACHINE_INSTANCES, BOX, pool.namespace)
    assert vmi is not None
    boot = vmi["spec"]["domain"]["firmware"]["kernelBoot"]
    boot["kernelArgs"] = boot["kernelArgs"].replace(_app.hex(), theirs.hex())
    out = pool.admin.custom.replace_namespaced_custom_object(
        group, version, pool.namespace, plural, BOX, vmi
    )
    pool.rt.view.observe_vmi(out, "MODIFIED")
    guest.measure([*kept, theirs])
    before = _count(ba.NOT_COMPOSED)
    status, body = guest.quote(guest.challenge()["nonce"])
    assert (status, body["error"]) == (403, ba.NOT_COMPOSED), body
    assert "does not boot what gtvp composed" in body["message"]
    assert _count(ba.NOT_COMPOSED) == before + 1
    assert pool.attestation(BOX).get("state") != ba.VERIFIED


def test_an_extra_component_is_a_mismatch_and_moves_the_box_once(pool: Pool) -> None:
    guest = pool.guests[BOX]
    here, elsewhere = pool.members
    guest.bind()
    extra = hashlib.sha256(b"a disk the composition does not have").digest()
    guest.measure([*pool.disks[BOX], extra])
    before = _count(ba.COMPONENT_MISMATCH)
    status, body = guest.quote(guest.challenge()["nonce"])
    assert (status, body["verified"], body["reason"]) == (200, False, ba.COMPONENT_MISMATCH)
    assert extra.hex()[:16] in body["message"]
    att = pool.attestation(BOX)
    assert (att["state"], att["member"]) == (ba.MISMATCH, here.name)
    assert _count(ba.COMPONENT_MISMATCH) == before + 1
    # the level (2) says Migrate: the box loop's next pass starts one migration off the member
    assert pool.migrations(BOX) == []
    pool.act()
    (moved,) = pool.migrations(BOX)
    assert moved["spec"]["vmiName"] == BOX
    assert any(r == f"BoxAttestation{ba.COMPONENT_MISMATCH}" for r, _ in pool.events(BOX))
    # nothing new to quote on that member and boot
    assert guest.challenge()["nonce"] is None
    # the migration lands: gtvp wants a quote there; the same vTPM shows the same PCR, and
    # the box is not moved a second time for that mismatch
    pool.move(BOX, elsewhere)
    nonce = guest.challenge()["nonce"]
    assert nonce
    status, body = guest.quote(nonce)
    assert (status, body["reason"]) == (200, ba.COMPONENT_MISMATCH)
    assert pool.attestation(BOX)["member"] == elsewhere.name
    pool.act()
    assert len(pool.migrations(BOX)) == 1


def test_boxes_failing_at_will_take_at_most_half_of_the_migration_budget(pool: Pool) -> None:
    """A tenant makes its boxes fail their quotes at will (here: two boxes, an extra disk
    measured in each) and could keep every move long: with the whole budget theirs, a
    member that lost trust waited for its evacuation until its VMs were stopped (found by
    a review). Under maxParallel 2, one of the two moves now; the other waits its turn."""
    policy = pool.rt.view.policy
    assert policy is not None
    pool.rt.view.policy = dataclasses.replace(policy, migration=MigrationLimits(max_parallel=2))
    try:
        for name in (BOX, OTHER_BOX):
            guest = pool.guests[name]
            guest.bind()
            guest.measure([*pool.disks[name], hashlib.sha256(b"not composed").digest()])
            status, body = guest.quote(guest.challenge()["nonce"])
            assert (status, body["reason"]) == (200, ba.COMPONENT_MISMATCH)
        pool.act()
        pool.act()
        started = pool.migrations(BOX) + pool.migrations(OTHER_BOX)
        assert len(started) == 1
        # with the whole budget (as before), the second would have started too
        pool.rt.view.policy = dataclasses.replace(policy, migration=MigrationLimits(max_parallel=4))
        pool.act()
        assert len(pool.migrations(BOX) + pool.migrations(OTHER_BOX)) == 2
    finally:
        pool.rt.view.policy = policy


def test_a_box_that_attests_once_its_move_began_keeps_holding_the_tenants_share(
    pool: Pool,
) -> None:
    """An overdue box that answers a quote once its move has begun is Verified again, but
    its move still runs: counted by the box's state now, it left the tenants' share, and a
    tenant repeating it with box after box took the whole budget (found by a review)."""
    policy = pool.rt.view.policy
    assert policy is not None
    pool.rt.view.policy = dataclasses.replace(policy, migration=MigrationLimits(max_parallel=2))
    try:
        first, second = pool.guests[BOX], pool.guests[OTHER_BOX]
        first.bind()
        first.measure([*pool.disks[BOX], hashlib.sha256(b"not composed").digest()])
        assert first.quote(first.challenge()["nonce"])[1]["reason"] == ba.COMPONENT_MISMATCH
        pool.act()
        assert len(pool.migrations(BOX)) == 1
        # the box says Verified again while its move runs (as a late answer to an overdue
        # challenge leaves it), acted on for this boot all the same
        att = pool.attestation(BOX)
        assert att["actedOn"]
        box = kube.patch_status(
            pool.admin, LAZY_BOXES, BOX, {"attestation": {**att, "state": ba.VERIFIED}},
            pool.namespace,
        )  # fmt: skip
        pool.rt.view.observe_box(box, "MODIFIED")
        second.bind()
        second.measure([*pool.disks[OTHER_BOX], hashlib.sha256(b"not composed").digest()])
        assert second.quote(second.challenge()["nonce"])[1]["reason"] == ba.COMPONENT_MISMATCH
        pool.act()
        assert pool.migrations(OTHER_BOX) == []  # the share (1 of 2) is still the first's
    finally:
        pool.rt.view.policy = policy


@pytest.mark.timeout(240)
def test_a_boxs_own_move_gives_way_to_the_evacuation_of_a_member_that_lost_trust(
    pool: Pool,
    control_plane: ControlPlane,
    ca: SoftCA,  # noqa: F811
) -> None:
    """Under maxParallel 1 the tenants' half of the budget is all of it: a tenant failing its
    box's quotes at will (and keeping each move long) held every evacuation of a member that
    lost trust until migrateWithin stopped its VMs. The box's move now gives way: it is
    deleted (the box stays on its Trusted member), the evacuation starts, and the box
    starts no new move while that evacuation waits for the limits."""
    policy = pool.rt.view.policy
    assert policy is not None
    pool.rt.view.policy = dataclasses.replace(policy, migration=MigrationLimits(max_parallel=1))
    name = f"tok-{secrets.token_hex(3)}"
    member_body = {
        "apiVersion": MEMBERS.api_version,
        "kind": MEMBERS.kind,
        "metadata": {"name": name},
        "spec": {"identity": 3},
    }
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(member_body))
    plain = [f"plain-{i}-{secrets.token_hex(3)}" for i in (1, 2)]
    try:
        guest = pool.guests[BOX]
        guest.bind()
        guest.measure([*pool.disks[BOX], hashlib.sha256(b"not composed").digest()])
        assert guest.quote(guest.challenge()["nonce"])[1]["reason"] == ba.COMPONENT_MISMATCH
        pool.act()
        (theirs,) = pool.migrations(BOX)
        pool.rt.view.observe_migration(theirs, "MODIFIED")  # as the operator's watch sees it
        # a third member, Trusted, runs two ordinary gated VMs; then it loses trust
        lost = _Member(name, SoftTpm(ca), pool.admin)
        _until(pool.rt, lost, "QuoteVerified")
        pool.rt.view.observe_node(_node(pool.admin, name), "ADDED")
        box_vmi = kube.get_if_present(pool.admin, VIRTUAL_MACHINE_INSTANCES, BOX, pool.namespace)
        assert box_vmi is not None
        for vm in plain:
            vmi = {
                "apiVersion": VIRTUAL_MACHINE_INSTANCES.api_version,
                "kind": VIRTUAL_MACHINE_INSTANCES.kind,
                "metadata": {"name": vm, "namespace": pool.namespace,
                             "labels": {"gtvp.io/level": "2"}},
                "spec": box_vmi["spec"],
                "status": {"phase": "Running", "nodeName": name},
            }  # fmt: skip
            pool.rt.view.observe_vmi(_create(pool.admin, VIRTUAL_MACHINE_INSTANCES, vmi), "ADDED")
        before = METRICS.registry.get_sample_value(
            "gtvp_evacuation_migrations_total", {"state": "preempted"}
        )
        asyncio.run(evacuation.evacuate(pool.rt, name, "lost", "Migrate"))
        (first,) = pool.migrations(plain[0])
        assert first["metadata"]["labels"][EVACUATION_LABEL] == name
        assert pool.migrations(BOX) == []  # deleted: KubeVirt aborts it, the box stays
        assert any(
            r == "EvacuationPreempted" and theirs["metadata"]["name"] in m
            for r, m in pool.events(BOX)
        )
        after = METRICS.registry.get_sample_value(
            "gtvp_evacuation_migrations_total", {"state": "preempted"}
        )
        assert (after or 0) - (before or 0) == 1
        # the first VM's move lands, freeing the slot: the box loop's pass comes before the
        # member's next one, and the box waits for the member's second VM, not the reverse
        first["status"] = {"phase": "Succeeded"}
        group, version, plural = MIGRATIONS.coordinates
        landed = pool.admin.custom.replace_namespaced_custom_object_status(
            group, version, pool.namespace, plural, first["metadata"]["name"], first
        )
        pool.rt.view.observe_migration(landed, "MODIFIED")
        target = first["spec"]["addedNodeSelector"]["kubernetes.io/hostname"]
        pool.move(plain[0], next(m for m in pool.members if m.name == target))
        pool.act()
        assert pool.migrations(BOX) == []
        asyncio.run(evacuation.evacuate(pool.rt, name, "lost", "Migrate"))
        assert len(pool.migrations(plain[1])) == 1
    finally:
        pool.rt.view.policy = policy
        with contextlib.suppress(ApiException):
            pool.admin.core.delete_node(name)
        control_plane.kubectl("delete", "member", name, "--ignore-not-found", "--wait=false")


def test_a_host_naming_another_member_in_the_vmis_status_does_not_keep_a_mismatched_box(
    pool: Pool, control_plane: ControlPlane
) -> None:
    """Root on the box's host writes the VMI's status with that host's virt-handler token
    once the box's vTPM evidence failed there: it names another member. The box's launcher
    pod (which only KubeVirt makes, and whose node cannot change) still holds it on the
    host, so the move off the host is still started, and the guest cannot attest while
    its status and its pod disagree."""
    guest = pool.guests[BOX]
    here, elsewhere = pool.members
    vmi = kube.get_if_present(pool.admin, VIRTUAL_MACHINE_INSTANCES, BOX, pool.namespace)
    assert vmi is not None
    pod = create_launcher_pod(control_plane, pool.namespace, vmi, here.name)
    pool.rt.view.observe_pod(pod, "ADDED")
    guest.bind()
    guest.measure([*pool.disks[BOX], hashlib.sha256(b"not composed").digest()])
    status, body = guest.quote(guest.challenge()["nonce"])
    assert (status, body["reason"]) == (200, ba.COMPONENT_MISMATCH)
    pool.move(BOX, elsewhere)  # the host's lie: its status names the other member
    assert pool.rt.view.nodes_of[(pool.namespace, BOX)] == {here.name, elsewhere.name}
    pool.act()
    (moved,) = pool.migrations(BOX)
    assert moved["metadata"]["labels"][EVACUATION_LABEL] == here.name
    # no attestation while it is held on two members: no nonce, and enrolling is refused
    assert guest.challenge()["nonce"] is None
    status, body = guest.enrol()
    assert (status, body["error"]) == (403, ba.NOT_RUNNING)


def test_a_box_moved_off_its_member_is_not_moved_again_while_its_source_pod_ends(
    pool: Pool, control_plane: ControlPlane
) -> None:
    """gtvp's move of a mismatched box succeeded and its status names the target; the
    source's launcher pod is still ending for a moment (virt-launcher exits once the VM
    has left): the box is not moved a second time meanwhile."""
    guest = pool.guests[BOX]
    here, elsewhere = pool.members
    vmi = kube.get_if_present(pool.admin, VIRTUAL_MACHINE_INSTANCES, BOX, pool.namespace)
    assert vmi is not None
    pool.rt.view.observe_pod(create_launcher_pod(control_plane, pool.namespace, vmi, here.name),
                             "ADDED")  # fmt: skip
    guest.bind()
    guest.measure([*pool.disks[BOX], hashlib.sha256(b"not composed").digest()])
    status, body = guest.quote(guest.challenge()["nonce"])
    assert (status, body["reason"]) == (200, ba.COMPONENT_MISMATCH)
    pool.act()
    (moved,) = pool.migrations(BOX)
    # KubeVirt: the target's pod runs, the migration succeeds, the VMI names the target
    pool.rt.view.observe_pod(
        create_launcher_pod(control_plane, pool.namespace, vmi, elsewhere.name), "ADDED"
    )
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    group, version, plural = MIGRATIONS.coordinates
    done = pool.admin.custom.patch_namespaced_custom_object_status(
        group, version, pool.namespace, plural, moved["metadata"]["name"],
        {"status": {"phase": "Succeeded", "phaseTransitionTimestamps": [
            {"phase": "Succeeded", "phaseTransitionTimestamp": now}]}},
    )  # fmt: skip
    pool.rt.view.observe_migration(done, "MODIFIED")
    pool.move(BOX, elsewhere)
    assert pool.rt.view.nodes_of[(pool.namespace, BOX)] == {here.name, elsewhere.name}
    pool.act()
    assert len(pool.migrations(BOX)) == 1


@pytest.mark.timeout(240)
def test_a_migration_squatting_on_the_planned_name_does_not_keep_a_mismatched_box(
    pool: Pool,
) -> None:
    """The VM's owner can read the VMI's uid, so the name gtvp gives the box's move is
    predictable: a migration created under it beforehand (of another VMI, never to run) is
    not taken for gtvp's, and the box still leaves the member its vTPM evidence failed on."""
    guest = pool.guests[BOX]
    here, _ = pool.members
    uid = pool.rt.view.vmis[(pool.namespace, BOX)]["metadata"]["uid"]
    planned = migration_name(Vmi(pool.namespace, BOX, here.name, 2), f"attest-{uid[:8]}")
    _create(
        pool.admin,
        MIGRATIONS,
        {
            "apiVersion": MIGRATIONS.api_version,
            "kind": MIGRATIONS.kind,
            "metadata": {"name": planned, "namespace": pool.namespace},
            "spec": {"vmiName": OTHER_BOX},
        },
    )
    guest.bind()
    guest.measure([*pool.disks[BOX], hashlib.sha256(b"a rootkit's disk").digest()])
    status, body = guest.quote(guest.challenge()["nonce"])
    assert (status, body["reason"]) == (200, ba.COMPONENT_MISMATCH)
    pool.act()  # meets the squatter: not gtvp's migration of this box
    assert pool.migrations(BOX) == []
    pool.act()  # the next pass plans under another name
    (moved,) = pool.migrations(BOX)
    assert moved["metadata"]["name"] != planned
    assert moved["metadata"]["labels"][EVACUATION_LABEL] == here.name
    pool.act()  # while it runs, nothing more
    assert len(pool.migrations(BOX)) == 1


def _enforce(pool: Pool, **settings: Any) -> None:
    """The runtime enforces the pool's policy with these `pool_policy` settings changed."""
    current = pool.rt.view.policy
    assert current is not None
    _enforce_policy(pool, policy_trusting(current.ca_bundle_pem, name=POLICY, **settings))


def _enforce_policy(pool: Pool, policy: Policy) -> None:
    """The runtime enforces `policy` (accepted as the pool's next generation)."""
    policies.set_policy(pool.rt, POLICY, policy)
    kept = pool.rt.accepted_policies[POLICY]
    pool.rt.accepted_policies[POLICY] = (kept[0], Accepted(2, kept[1].spec, policy))


@pytest.mark.timeout(240)
def test_a_mismatch_stops_the_box_when_its_level_says_stop(pool: Pool) -> None:
    _enforce(pool, on_untrusted={2: "Stop"})
    guest = pool.guests[OTHER_BOX]
    guest.bind()
    guest.measure([hashlib.sha256(b"another rootfs").digest(), *pool.disks[OTHER_BOX][1:]])
    status, body = guest.quote(guest.challenge()["nonce"])
    assert (status, body["reason"]) == (200, ba.COMPONENT_MISMATCH)
    assert "component(s) not measured" in body["message"]
    pool.act()
    gone = kube.get_if_present(pool.admin, VIRTUAL_MACHINE_INSTANCES, OTHER_BOX, pool.namespace)
    assert gone is None or gone["metadata"].get("deletionTimestamp")
    assert pool.migrations(OTHER_BOX) == []


@pytest.mark.timeout(240)
def test_a_mismatched_box_of_a_level_the_policy_no_longer_defines_is_stopped(pool: Pool) -> None:
    """The box's evidence failed, and its level (2) has since been removed from the policy:
    no member can be judged at it, so no target could ever take it, and it has no bound
    to wait under: it is stopped, not migrated or left running."""
    guest = pool.guests[OTHER_BOX]
    guest.bind()
    guest.measure([hashlib.sha256(b"another rootfs").digest(), *pool.disks[OTHER_BOX][1:]])
    status, body = guest.quote(guest.challenge()["nonce"])
    assert (status, body["reason"]) == (200, ba.COMPONENT_MISMATCH)
    current = pool.rt.view.policy
    assert current is not None
    spec = pool_policy(cast(SwtpmCA, Bundle(current.ca_bundle_pem)), name=POLICY)["spec"]
    spec["levels"] = [lv for lv in spec["levels"] if lv["level"] != 2]
    _enforce_policy(pool, parse_policy(POLICY, spec))
    pool.act()
    gone = kube.get_if_present(pool.admin, VIRTUAL_MACHINE_INSTANCES, OTHER_BOX, pool.namespace)
    assert gone is None or gone["metadata"].get("deletionTimestamp")
    assert pool.migrations(OTHER_BOX) == []


@pytest.mark.timeout(240)
def test_a_mismatched_box_still_there_past_its_levels_bound_is_stopped(pool: Pool) -> None:
    """The box's own evidence failed on a trusted member and its migration is held back (here
    the mismatch was 11 s ago and nothing moved it): past its level's migrateWithin it is
    stopped rather than left running where its components cannot be vouched for."""
    _enforce(pool, migrate_within={2: "10s"})
    guest = pool.guests[OTHER_BOX]
    guest.bind()
    pool.clock_offset[0] = -dt.timedelta(seconds=11)  # the quote was answered 11 s ago
    try:
        guest.measure([hashlib.sha256(b"another rootfs").digest(), *pool.disks[OTHER_BOX][1:]])
        status, body = guest.quote(guest.challenge()["nonce"])
    finally:
        pool.clock_offset[0] = dt.timedelta(0)
    assert (status, body["reason"]) == (200, ba.COMPONENT_MISMATCH)
    acted = parse_ts(pool.attestation(OTHER_BOX)["actedAt"])
    assert acted is not None
    assert dt.timedelta(seconds=10) < dt.datetime.now(dt.UTC) - acted < dt.timedelta(seconds=60)
    pool.act()
    gone = kube.get_if_present(pool.admin, VIRTUAL_MACHINE_INSTANCES, OTHER_BOX, pool.namespace)
    assert gone is None or gone["metadata"].get("deletionTimestamp")
    assert pool.migrations(OTHER_BOX) == []
    (said,) = [m for r, m in pool.events(OTHER_BOX) if r == "EvacuationDeadline"]
    here = pool.rt.view.vmis.get((pool.namespace, OTHER_BOX), {}).get("status", {}).get("nodeName")
    assert said.startswith(f"still on {here} 10s after its vTPM evidence failed there")


# ----- the box that is what gtvp composed ---------------------------------------------------


@pytest.mark.timeout(240)
def test_a_box_restarted_onto_a_new_vtpm_is_told_to_enrol_it_and_attests_again(
    pool: Pool, make_tpm: Callable[..., Swtpm], vtpm_ca: SwtpmCA, tmp_path: Path
) -> None:
    """A restart (gtvp's upgrade, a restored composition, the tenant's) may bring a new vTPM:
    its guest is told to enrol (the AK bound was the old VMI's) and attests; before, its
    quotes were refused for good (BadSignature) and the box went Overdue (found by a
    review)."""
    guest = pool.guests[BOX]
    guest.bind()
    guest.measure(pool.disks[BOX])
    status, body = guest.quote(guest.challenge()["nonce"])
    assert (status, body["verified"]) == (200, True), body
    old = pool.rt.view.vmis[(pool.namespace, BOX)]
    group, version, plural = VIRTUAL_MACHINE_INSTANCES.coordinates
    pool.admin.custom.delete_namespaced_custom_object(group, version, pool.namespace, plural, BOX)
    pool.rt.view.observe_vmi(old, "DELETED")
    template = {"spec": {"template": {"spec": old["spec"]}}}
    node = old["status"]["nodeName"]
    fresh = _create(
        pool.admin, VIRTUAL_MACHINE_INSTANCES, _vmi(BOX, pool.namespace, node, template)
    )
    pool.rt.view.observe_vmi(fresh, "ADDED")
    restarted = Guest(guest.config, make_tpm(ca=vtpm_ca), tmp_path / "restarted")
    assert restarted.challenge()["enrol"] is True
    restarted.bind()
    restarted.measure(pool.disks[BOX])
    status, body = restarted.quote(restarted.challenge()["nonce"])
    assert (status, body["verified"]) == (200, True), body
    att = pool.attestation(BOX)
    assert (att["state"], att["vmiUID"]) == (ba.VERIFIED, fresh["metadata"]["uid"])
    # within that VMI, the old vTPM (whoever kept its state) cannot take it back
    status, body = guest.enrol()
    assert (status, body["error"]) == (403, ba.EK_CHANGED), body


@pytest.mark.timeout(240)
def test_a_box_attests_after_boot_and_again_after_a_migration(
    pool: Pool, control_plane: ControlPlane
) -> None:
    guest = pool.guests[BOX]
    here, elsewhere = pool.members
    assert guest.config["box"] == f"{pool.namespace}/{BOX}"
    assert guest.config["pcr"] == 13
    att = pool.attestation(BOX)
    assert att["credentialHash"] == hashlib.sha256(guest.config["credential"].encode()).hexdigest()
    assert guest.config["credential"] not in json.dumps(pool.box(BOX))
    assert guest.challenge() == {"enrol": True, "nonce": None, "retryAfter": 0}
    guest.bind()
    guest.measure(pool.disks[BOX])
    before = _count(ba.VERIFIED)
    status, body = guest.quote(guest.challenge()["nonce"])
    assert (status, body["verified"], body["reason"]) == (200, True, ba.VERIFIED), body
    att = pool.attestation(BOX)
    assert att["state"] == ba.VERIFIED
    assert att["member"] == here.name
    assert att["pcr13"] == ba.fold(pool.disks[BOX]).hex()
    assert att["components"][0].startswith("debian-minimal@")
    assert att["components"][-1].startswith("nginx@")
    assert _count(ba.VERIFIED) == before + 1
    assert "BoxAttested" in [r for r, _ in pool.events(BOX)]
    assert guest.challenge()["nonce"] is None  # attested here, for this boot
    out = control_plane.kubectl("get", "lazybox", BOX, "-n", pool.namespace).stdout
    assert "ATTESTED" in out.splitlines()[0]
    assert "Verified" in out
    # the VMI moves (a migration): gtvp wants a quote from the new member
    pool.move(BOX, elsewhere)
    status, body = guest.quote(guest.challenge()["nonce"])
    assert (status, body["verified"]) == (200, True), body
    assert pool.attestation(BOX)["member"] == elsewhere.name
    assert pool.migrations(BOX) == []


def _seen(pool: Pool, *names: str) -> None:
    """The operator's view catches up with the boxes (its watch, in a running operator)."""
    for name in names:
        pool.rt.view.observe_box(pool.box(name), "MODIFIED")


@pytest.mark.timeout(240)
def test_a_box_whose_guest_does_not_attest_in_time_is_overdue_and_moves_once(
    pool: Pool,
) -> None:
    """The attacker keeps the guest's channel shut (or the guest runs no client): past the
    policy's deadline the box is treated as a mismatch, once per boot."""
    here, elsewhere = pool.members
    deadline = ba.DEFAULT_DEADLINE
    t0 = dt.datetime.now(dt.UTC)
    assert box_attestation.sweep_overdue(pool.rt, t0) == []  # the clocks start
    _seen(pool, BOX, OTHER_BOX)
    assert pool.attestation(BOX)["wanted"]["member"] == here.name
    assert box_attestation.sweep_overdue(pool.rt, t0 + deadline / 2) == []
    # the other box's guest attests in time: it is never overdue
    other = pool.guests[OTHER_BOX]
    other.bind()
    other.measure(pool.disks[OTHER_BOX])
    status, body = other.quote(other.challenge()["nonce"])
    assert (status, body["verified"]) == (200, True), body
    _seen(pool, BOX, OTHER_BOX)
    before = _count(ba.ATTESTATION_OVERDUE)
    late = t0 + deadline + dt.timedelta(seconds=1)
    assert box_attestation.sweep_overdue(pool.rt, late) == [(pool.namespace, BOX)]
    att = pool.attestation(BOX)
    assert (att["state"], att["reason"], att["member"]) == (
        ba.OVERDUE,
        ba.ATTESTATION_OVERDUE,
        here.name,
    )
    assert _count(ba.ATTESTATION_OVERDUE) == before + 1
    assert "BoxAttestationOverdue" in [r for r, _ in pool.events(BOX)]
    pool.act()
    (moved,) = pool.migrations(BOX)  # level 2 says Migrate: off the member, once
    assert moved["spec"]["vmiName"] == BOX
    assert pool.migrations(OTHER_BOX) == []
    _seen(pool, BOX)
    assert box_attestation.sweep_overdue(pool.rt, late + deadline) == []  # said once
    # on the next member the clock starts again; overdue there too, it is not moved twice
    pool.move(BOX, elsewhere)
    t1 = late + dt.timedelta(seconds=5)
    assert box_attestation.sweep_overdue(pool.rt, t1) == []
    _seen(pool, BOX)
    assert pool.attestation(BOX)["wanted"]["member"] == elsewhere.name
    assert box_attestation.sweep_overdue(pool.rt, t1 + deadline + dt.timedelta(seconds=1)) == [
        (pool.namespace, BOX)
    ]
    assert pool.attestation(BOX)["member"] == elsewhere.name
    pool.act()
    assert len(pool.migrations(BOX)) == 1
    # a late quote still counts: an Overdue box is asked, and Verified once it answers
    guest = pool.guests[BOX]
    guest.bind()
    guest.measure(pool.disks[BOX])
    status, body = guest.quote(guest.challenge()["nonce"])
    assert (status, body["verified"]) == (200, True), body
    assert pool.attestation(BOX)["state"] == ba.VERIFIED


# ----- the policy ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_the_api_server_refuses_an_unusable_box_attestation_naming_the_field(
    control_plane: ControlPlane, cluster_names: list[str], vtpm_ca: SwtpmCA
) -> None:
    def policy(box_attestation: dict[str, Any]) -> dict[str, Any]:
        body = pool_policy(
            cast(SwtpmCA, Bundle(vtpm_ca.bundle_pem())), name=f"ba-{secrets.token_hex(3)}"
        )
        body["spec"]["boxAttestation"] = box_attestation
        return body

    for raw, words in (
        (
            {"caBundle": "a CA"},
            ["spec.boxAttestation.caBundle", "PEM certificate(s) of the vTPM CA"],
        ),
        ({"caBundle": vtpm_ca.bundle_pem(), "pcr": 24}, ["spec.boxAttestation.pcr"]),
        ({"pcr": 13}, ["spec.boxAttestation.caBundle", "Required"]),
    ):
        out = control_plane.kubectl(
            "create", "-f", "-", input_text=json.dumps(policy(raw)), check=False
        )
        assert out.returncode != 0, raw
        for needle in words:
            assert needle in out.stderr, (needle, out.stderr)
    good = policy({"caBundle": vtpm_ca.bundle_pem()})
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(good))
    cluster_names.append(f"securitypolicy/{good['metadata']['name']}")
    got = json.loads(
        control_plane.kubectl(
            "get", "securitypolicy", good["metadata"]["name"], "-o", "json"
        ).stdout
    )
    assert got["spec"]["boxAttestation"]["pcr"] == 13  # the default
    assert ba.parse_settings(got["spec"]) == ba.Settings(vtpm_ca.bundle_pem(), 13)


# ----- arming -------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_the_box_loop_arms_the_credential_next_to_key_release_and_keeps_it(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gtvp.core.boxes import Decision
    from gtvp.core.compose import KEY_RELEASE_DIR
    from gtvp.handlers import box_writes, lazyboxes

    name, ns = "both", pool.namespace
    key = (ns, name)
    box = _create(
        pool.admin,
        LAZY_BOXES,
        {
            "apiVersion": LAZY_BOXES.api_version,
            "kind": LAZY_BOXES.kind,
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "application": {"name": "nginx"},
                "level": 2,
                "resources": {"cpu": "500m", "memory": "512Mi"},
                "secrets": [{"name": "disk"}],
            },
        },
    )
    pool.rt.view.observe_box(box, "ADDED")
    vm, _ = _composed(ns, name, box["metadata"]["uid"])
    decision = Decision({"phase": "Placing", "message": "starting"}, vm=vm)
    first = box_attestation.arm(pool.rt, key, vm)
    assert first is not None
    armed = lazyboxes._attested(pool.rt, key, decision, first)
    assert armed is not None
    assert armed.vm is not None
    # as the box loop writes it: the fresh credential's attestation in place
    fresh = lazyboxes._attestation(armed, first)
    assert fresh == armed.status["attestation"]
    box_writes.write_status(pool.rt, key, armed.status, attestation=fresh)
    config = _config(pool.rt, ns, name)
    att = pool.attestation(name)
    assert att == {
        "state": ba.PENDING,
        "bound": False,
        "credentialHash": hashlib.sha256(config["credential"].encode()).hexdigest(),
    }
    assert config["credential"] not in json.dumps(armed.vm)
    volume = next(
        v for v in armed.vm["spec"]["template"]["spec"]["volumes"] if v["name"] == "cloudinit"
    )
    assert volume["cloudInitNoCloud"] == {"secretRef": {"name": kr.cloud_init_secret(name)}}
    secret = pool.rt.clients.core.read_namespaced_secret(kr.cloud_init_secret(name), ns)
    text = base64.b64decode(secret.data[kr.USER_DATA_KEY]).decode()
    assert f"{KEY_RELEASE_DIR}/credential" in text  # the key-release credential is there too
    # the VM written again (another reason than a new boot): the guest keeps its credential
    again = box_attestation.arm(pool.rt, key, vm)
    assert isinstance(again, box_attestation.Armed)
    assert again.attestation == att
    assert lazyboxes._attestation(armed, again) == box_writes.KEEP  # not undone
    assert _config(pool.rt, ns, name)["credential"] == config["credential"]
    # the API server fails the Secret's read while the VM is written again: that is no
    # missing credential (a new one and a fresh attestation would drop a Mismatch, the move
    # it owes and the EK pin, and lock the running guest out): said, looked at again
    core = pool.rt.clients.core
    read = core.read_namespaced_secret

    def failing(*_args: Any, **_kwargs: Any) -> Any:
        raise ApiException(status=500, reason="etcdserver: request timed out")

    monkeypatch.setattr(core, "read_namespaced_secret", failing)
    unread = box_attestation.arm(pool.rt, key, vm)
    assert isinstance(unread, str)
    assert "500" in unread
    assert "looked at again" in unread
    monkeypatch.setattr(core, "read_namespaced_secret", read)
    assert pool.attestation(name) == att
    assert _config(pool.rt, ns, name)["credential"] == config["credential"]
    # no endpoint to attest to: the box is not started, and says why
    pool.rt.key_release = None
    refused = box_attestation.arm(pool.rt, key, vm)
    assert isinstance(refused, str)
    assert lazyboxes._attested(pool.rt, key, decision, refused) is None
    status = pool.box(name)["status"]
    assert status["phase"] == "Failed"
    assert "--key-release-url" in status["message"]
    assert "BoxAttestationUnavailable" in [r for r, _ in pool.events(name)]


@pytest.mark.timeout(180)
def test_two_replicas_answering_one_quote_at_once_verify_it_once(pool: Pool) -> None:
    guest = pool.guests[BOX]
    guest.bind()
    guest.measure(pool.disks[BOX])
    raw = json.dumps(
        {"box": guest.config["box"], **guest.quote_body(guest.challenge()["nonce"])}
    ).encode()
    auth = f"Bearer {guest.config['credential']}"
    replicas = [box_attestation.Endpoint(pool.rt), box_attestation.Endpoint(pool.rt)]
    barrier = threading.Barrier(2)
    answers: list[tuple[int, dict[str, Any]]] = []

    def answer(ep: box_attestation.Endpoint) -> None:
        barrier.wait()
        code, _, body = ep(ba.QUOTE, "POST", auth, raw)
        answers.append((code, json.loads(body)))

    threads = [threading.Thread(target=answer, args=(ep,)) for ep in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(code for code, _ in answers)
    assert codes == [200, 409], answers
    refused = next(body for code, body in answers if code == 409)
    assert refused["error"] in (ba.CONFLICT, ba.NONCE_REPLAYED)
    assert pool.attestation(BOX)["state"] == ba.VERIFIED


@pytest.mark.timeout(180)
def test_a_request_the_api_server_times_out_under_is_a_counted_503_to_ask_again(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the box times out (the API server overloaded): the guest is told to ask
    again (503 Unavailable, which its client does), counted in
    gtvp_box_attestations_total{result="Unavailable"}; nothing is judged or written."""
    guest = pool.guests[BOX]
    guest.bind()
    custom = pool.rt.clients.custom
    read = custom.get_namespaced_custom_object
    before, state = _count(ba.UNAVAILABLE), pool.attestation(BOX)

    def timing_out(*_args: Any, **_kwargs: Any) -> Any:
        raise urllib3.exceptions.ReadTimeoutError(None, "/apis", "Read timed out. (read=60)")

    monkeypatch.setattr(custom, "get_namespaced_custom_object", timing_out)
    status, body = guest.post(ba.CHALLENGE, {})
    assert (status, body["reason"]) == (503, "Unavailable"), body
    assert "ask again" in body["message"]
    assert _count(ba.UNAVAILABLE) == before + 1
    monkeypatch.setattr(custom, "get_namespaced_custom_object", read)
    assert pool.attestation(BOX) == state
    assert guest.challenge()["nonce"]
