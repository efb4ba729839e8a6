"""The four CRDs on the real API server, through the real kubectl.

Samples are accepted as written; invalid objects are refused by the API server itself
(schema, CEL) with a message that names the offending field.
"""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from gtvp_local.controlplane import ControlPlane

pytestmark = pytest.mark.controlplane


def _load_samples(repo: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((repo / "crds" / "samples").glob("*.yaml")):
        out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def _sample(repo: Path, kind: str) -> dict[str, Any]:
    for docs in _load_samples(repo).values():
        for d in docs:
            if d["kind"] == kind:
                return copy.deepcopy(d)
    raise AssertionError(f"no sample of kind {kind}")


def test_every_sample_is_accepted(control_plane: ControlPlane, repo: Path) -> None:
    samples = sorted((repo / "crds" / "samples").glob("*.yaml"))
    assert len(samples) >= 4
    applied: list[str] = []
    try:
        for path in samples:
            out = control_plane.kubectl("create", "-f", str(path), "-o", "name")
            applied += out.stdout.split()
        kinds = {n.split("/")[0] for n in applied}
        assert {
            "member.gtvp.io",
            "securitypolicy.gtvp.io",
            "oscomponent.gtvp.io",
            "lazybox.gtvp.io",
        } <= kinds
        got = control_plane.kubectl("get", "members", "-o", "wide").stdout
        assert "IDENTITY" in got
        assert "sample-node-a" in got
    finally:
        for path in reversed(samples):
            control_plane.kubectl(
                "delete", "-f", str(path), "--ignore-not-found", "--wait=false", check=False
            )


def _unique(obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"] = {"name": f"{obj['metadata']['name']}-{uuid.uuid4().hex[:6]}"}
    return obj


def _policy(repo: Path, **changes: Any) -> dict[str, Any]:
    p = _unique(_sample(repo, "SecurityPolicy"))
    p["spec"].update(changes)
    return p


def _with_locality(policy: dict[str, Any], locality: Any) -> dict[str, Any]:
    """`policy` whose first reference set requires the TPM started at `locality`."""
    policy["spec"]["memberClasses"][0]["referenceSets"][0]["startupLocality"] = locality
    return policy


def _component(repo: Path, **changes: Any) -> dict[str, Any]:
    c = _unique(_sample(repo, "OSComponent"))
    c["spec"].update(changes)
    return c


def _box(repo: Path, **changes: Any) -> dict[str, Any]:
    b = _sample(repo, "LazyBox")
    b["metadata"] = {"name": f"box-{uuid.uuid4().hex[:6]}"}
    b["spec"].update(changes)
    return b


def _member(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gtvp.io/v1alpha1",
        "kind": "Member",
        "metadata": {"name": f"node-{uuid.uuid4().hex[:6]}"},
        "spec": spec,
    }


def _levels(**attestation: Any) -> list[dict[str, Any]]:
    att = {"interval": "30s", "validFor": "90s", "maxUses": 10} | attestation
    return [{"level": 1, "name": "standard", "attestation": att}]


INVALID: list[tuple[str, Any, list[str]]] = [
    (
        "member identity above 9",
        lambda r: _member(identity=12),
        ["spec.identity", "less than or equal to 9"],
    ),
    (
        "member approval fingerprint not hex",
        lambda r: _member(approval={"ekSHA256": "not-a-fingerprint", "approvedBy": "alice"}),
        ["spec.approval.ekSHA256"],
    ),
    (
        "member unknown field",
        lambda r: _member(identity=1, trusted=True),
        ['unknown field "spec.trusted"'],
    ),
    (
        "policy validFor shorter than interval",
        lambda r: _policy(r, levels=_levels(interval="60s", validFor="30s")),
        ["spec.levels[0].attestation", "validFor must be longer than interval"],
    ),
    (
        "policy migrateWithin with onUntrusted Keep",
        lambda r: _policy(
            r, levels=[_levels()[0] | {"onUntrusted": "Keep", "migrateWithin": "10m"}]
        ),
        ["spec.levels[0].migrateWithin", "migrateWithin bounds onUntrusted Migrate only"],
    ),
    (
        "policy migrateWithin too short",
        lambda r: _policy(r, levels=[_levels()[0] | {"migrateWithin": "1s"}]),
        ["spec.levels[0].migrateWithin", "between 10s and 72h"],
    ),
    (
        "policy interval not a duration",
        lambda r: _policy(r, levels=_levels(interval="soon")),
        ["spec.levels[0].attestation.interval"],
    ),
    (
        "policy duplicate level names",
        lambda r: _policy(
            r,
            levels=[
                {
                    "level": 1,
                    "name": "same",
                    "attestation": {"interval": "10s", "validFor": "30s", "maxUses": 1},
                },
                {
                    "level": 2,
                    "name": "same",
                    "attestation": {"interval": "10s", "validFor": "30s", "maxUses": 1},
                },
            ],
        ),
        ["spec.levels", "level names must be unique"],
    ),
    (
        "policy PCR index 24",
        lambda r: _policy(r, pcrSelection={"pcrs": [0, 24]}),
        ["spec.pcrSelection.pcrs[1]", "less than or equal to 23"],
    ),
    (
        "policy golden PCR key out of range",
        lambda r: _policy(r, memberClasses=[{"name": "x", "goldenPCRs": {"30": "00" * 32}}]),
        ["spec.memberClasses[0].goldenPCRs", "PCR indices 0 to 23"],
    ),
    (
        "policy onUntrusted unknown",
        lambda r: _policy(r, levels=[_levels()[0] | {"onUntrusted": "Explode"}]),
        ["spec.levels[0].onUntrusted", "Unsupported value"],
    ),
    (
        "policy balancing watermarks inverted",
        lambda r: _policy(r, balancing={"enabled": True, "highWatermark": 50, "lowWatermark": 70}),
        ["spec.balancing", "lowWatermark must be below highWatermark"],
    ),
    (
        "policy CA bundle not PEM",
        lambda r: _policy(r, ekTrust={"caBundle": "trust me"}),
        ["spec.ekTrust.caBundle", "caBundle must hold PEM certificates"],
    ),
    (
        "policy golden value of 31 bytes",
        lambda r: _policy(
            r, memberClasses=[{"name": "generic-uefi", "goldenPCRs": {"7": "ab" * 31}}]
        ),
        ["spec.memberClasses[0].goldenPCRs[7]", "a golden PCR value must be a whole digest"],
    ),
    (
        "policy sha1 bank with sha256 golden values",
        lambda r: _policy(
            r,
            pcrSelection={"hashAlgorithm": "sha1", "pcrs": [0]},
            memberClasses=[{"name": "generic-uefi", "goldenPCRs": {"0": "00" * 32}}],
        ),
        [
            "spec.memberClasses",
            "every goldenPCRs value must be a sha1 digest, 40 hex digits, since "
            "spec.pcrSelection.hashAlgorithm is sha1",
        ],
    ),
    (
        "policy default member class missing",
        lambda r: _policy(r, defaultMemberClass="generic-bios"),
        ["spec.defaultMemberClass", "no member class named generic-bios in spec.memberClasses"],
    ),
    (
        "policy transition to a missing member class",
        lambda r: _policy(r, transitions=[{"matchLabels": {}, "level": 2, "memberClass": "nope"}]),
        ["spec.transitions", "every transitions[].memberClass must name an entry"],
    ),
    (
        "policy transition on a label a kubelet can set on itself",
        lambda r: _policy(
            r, transitions=[{"matchLabels": {"gtvp.io/hardware": "confidential"}, "level": 3}]
        ),
        [
            "spec.transitions[0].matchLabels",
            "label gtvp.io/hardware is not under node-restriction.kubernetes.io/",
            "raise its own level",
        ],
    ),
    (
        "policy transition on gtvp's own trust label",
        lambda r: _policy(
            r,
            transitions=[
                {"matchLabels": {"node-restriction.kubernetes.io/gtvp-level-3": "true"}, "level": 3}
            ],
        ),
        ["spec.transitions[0].matchLabels", "gtvp writes it from the member's verdict"],
    ),
    (
        "policy reference set startup locality 7",
        lambda r: _with_locality(_policy(r), 7),
        ["startupLocality", "should be less than or equal to 4"],
    ),
    (
        "policy balancing sustainFor not a duration",
        lambda r: _policy(r, balancing={"sustainFor": "0s"}),
        ["spec.balancing.sustainFor", "sustainFor must be a positive duration"],
    ),
    (
        "component image without digest",
        lambda r: _component(r, image="registry.example.com/x:latest"),
        ["spec", "image must be pinned by the same digest"],
    ),
    ("component digest malformed", lambda r: _component(r, digest="md5:abc"), ["spec.digest"]),
    (
        "component type unknown",
        lambda r: _component(r, type="firmware"),
        ["spec.type", "Unsupported value"],
    ),
    (
        "component conflicts with itself",
        lambda r: _component(r, conflicts=[{"name": "linux"}]),
        ["spec", "cannot conflict with itself"],
    ),
    (
        "component signature not base64",
        lambda r: _component(
            r, signature={"publisher": "p", "algorithm": "Ed25519", "value": "!!"}
        ),
        ["spec.signature.value"],
    ),
    (
        "box memory not a quantity",
        lambda r: _box(r, resources={"cpu": "1", "memory": "lots"}),
        ["spec.resources.memory", "memory must be a Kubernetes quantity"],
    ),
    ("box level 0", lambda r: _box(r, level=0), ["spec.level", "greater than or equal to 1"]),
    (
        "box port twice",
        lambda r: _box(r, ports=[{"port": 8080}, {"name": "again", "port": 8080}]),
        ["spec.ports", "each port appears once"],
    ),
    ("box port 0", lambda r: _box(r, ports=[{"port": 0}]), ["spec.ports[0].port"]),
    (
        "box depends on its own application",
        lambda r: _box(r, dependencies=[{"name": "hello-web"}]),
        ["spec", "dependencies must not repeat the application"],
    ),
]


@pytest.mark.parametrize(("case", "make", "expected"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_object_is_refused_naming_the_field(
    control_plane: ControlPlane,
    repo: Path,
    namespace: str,
    case: str,
    make: Any,
    expected: list[str],
) -> None:
    obj = make(repo)
    ns_args = ["-n", namespace] if obj["kind"] == "LazyBox" else []
    out = control_plane.kubectl(
        "create", *ns_args, "-f", "-", input_text=json.dumps(obj), check=False
    )
    if out.returncode == 0:  # never leave an accepted object behind
        control_plane.kubectl(
            "delete", *ns_args, "-f", "-", input_text=json.dumps(obj), check=False
        )
    assert out.returncode != 0, f"{case}: the API server accepted it"
    for needle in expected:
        assert needle in out.stderr, f"{case}: {needle!r} not in {out.stderr!r}"


def test_component_is_immutable(
    control_plane: ControlPlane, repo: Path, cluster_names: list[str]
) -> None:
    comp = _component(repo)
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(comp))
    cluster_names.append(f"oscomponent/{comp['metadata']['name']}")
    out = control_plane.kubectl(
        "patch",
        "oscomponent",
        comp["metadata"]["name"],
        "--type=merge",
        "-p",
        json.dumps({"spec": {"sizeBytes": 1}}),
        check=False,
    )
    assert out.returncode != 0
    assert "an OSComponent is immutable" in out.stderr


def test_printer_columns_show_trust_at_a_glance(
    control_plane: ControlPlane, cluster_names: list[str]
) -> None:
    m = _member(identity=2)
    name = m["metadata"]["name"]
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(m))
    cluster_names.append(f"member/{name}")
    status = {
        "status": {
            "phase": "Trusted",
            "level": 2,
            "trust": {
                "verdict": "Trusted",
                "reason": "QuoteVerified",
                "verifiedAt": "2026-01-01T00:00:00Z",
                "usesLeft": 7,
            },
        }
    }
    control_plane.kubectl(
        "patch", "member", name, "--subresource=status", "--type=merge", "-p", json.dumps(status)
    )
    out = control_plane.kubectl("get", "member", name).stdout.splitlines()
    header, row = out[0].split(), out[1].split()
    assert header[:5] == ["NAME", "PHASE", "LEVEL", "REASON", "VERIFIED"]
    assert row[:4] == [name, "Trusted", "2", "QuoteVerified"]


def test_server_reports_the_built_kubernetes_version(control_plane: ControlPlane) -> None:
    out = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"].startswith("v1.36.")
    assert out["clientVersion"]["gitVersion"] == out["serverVersion"]["gitVersion"]


def _stored(control_plane: ControlPlane, policy: dict[str, Any]) -> dict[str, Any]:
    """`policy` as the API server keeps it once created (a field its schema lacks is pruned
    without a word); the object is deleted again."""
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(policy))
    try:
        name = policy["metadata"]["name"]
        got: dict[str, Any] = json.loads(
            control_plane.kubectl("get", "securitypolicy", name, "-o", "json").stdout
        )
        return got
    finally:
        control_plane.kubectl("delete", "-f", "-", input_text=json.dumps(policy), check=False)


def test_a_reference_sets_startup_locality_is_kept_not_pruned(
    control_plane: ControlPlane, repo: Path
) -> None:
    """A field the CRD's schema lacked would be dropped without a word, and the set would
    check nothing of the TPM's startup locality."""
    got = _stored(control_plane, _with_locality(_policy(repo), 3))
    assert got["spec"]["memberClasses"][0]["referenceSets"][0]["startupLocality"] == 3


def test_a_levels_ek_ca_bundle_is_kept_not_pruned(control_plane: ControlPlane, repo: Path) -> None:
    """A level that trusts fewer TPMs than the pool (`levels[].ekCaBundle`): without the
    field in the CRD's schema the API server would drop it without a word, and the level
    would be held by every TPM the pool admits."""
    obj = _policy(repo)
    bundle = obj["spec"]["ekTrust"]["caBundle"]
    obj["spec"]["levels"][-1]["ekCaBundle"] = bundle
    assert _stored(control_plane, obj)["spec"]["levels"][-1]["ekCaBundle"] == bundle
