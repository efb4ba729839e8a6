"""Composed VirtualMachines against KubeVirt's own CRD schema on the real API server.

kubectl's `--validate=strict` asks the API server to refuse unknown or mistyped fields
(structural schemas otherwise prune them silently), so every field gtvp writes must exist
in KubeVirt's schema with the right type. Also: the signed sample catalogue verifies with
the sample policy's publisher key, and `gtvp component sign/verify` round-trips.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gtvp.core.component_checks import check_component
from gtvp.core.components import parse_component
from gtvp.core.compose import BoxRef, compose_vm
from gtvp.core.resolve import BoxRequest, resolve
from gtvp_local import layout
from gtvp_local.controlplane import ControlPlane
from gtvp_local.pool import sample_publisher_keys
from tests.catalogue import Publisher

pytestmark = [pytest.mark.controlplane]
PUB = Publisher()


def _samples(name: str) -> list[dict[str, Any]]:
    path = layout.repo_root() / "crds" / "samples" / name
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _vms(namespace: str) -> list[dict[str, Any]]:
    objs = [
        *PUB.web_catalogue(),
        PUB.component("linux-initrd", "6.6.0", "kernel", provides=["kernel", "initrd"]),
        PUB.component("curl", "8.0.0", requires=["libc"]),
    ]
    cat = [parse_component(o) for o in objs]
    spec: dict[str, Any] = {
        "application": {"name": "nginx"},
        "dependencies": [{"name": "debian-minimal"}],
        "level": 2,
        "resources": {"cpu": "500m", "memory": "512Mi"},
    }
    comps = resolve(BoxRequest.from_spec(spec), cat)
    curl = next(c for c in cat if c.name == "curl")
    initrd_kernel = next(c for c in cat if c.name == "linux-initrd")
    with_initrd = [initrd_kernel if c.type == "kernel" else c for c in comps]
    ref = BoxRef("web", namespace, "0b4e1c2a-0000-4000-8000-000000000001")
    return [
        compose_vm(ref, spec, comps, None),
        compose_vm(BoxRef("placed", namespace, ref.uid), spec, comps, "node-1"),
        compose_vm(BoxRef("hot", namespace, ref.uid), spec, comps, "node-1", hotplugged=[curl]),
        compose_vm(
            BoxRef("initrd", namespace, ref.uid), {**spec, "running": False}, with_initrd, None
        ),
    ]


def test_composed_vms_pass_kubevirts_schema_strictly(
    control_plane: ControlPlane, namespace: str
) -> None:
    for vm in _vms(namespace):
        out = control_plane.kubectl(
            "create", "--validate=strict", "-f", "-", input_text=json.dumps(vm), check=False
        )
        assert out.returncode == 0, (vm["metadata"]["name"], out.stderr)
        stored = json.loads(
            control_plane.kubectl(
                "get", "vm", vm["metadata"]["name"], "-n", namespace, "-o", "json"
            ).stdout
        )
        assert stored["spec"]["template"] == vm["spec"]["template"]  # nothing pruned


def test_strict_validation_would_catch_a_wrong_field(
    control_plane: ControlPlane, namespace: str
) -> None:
    vm = _vms(namespace)[0]
    vm["spec"]["template"]["spec"]["domain"]["firmware"]["kernelBoot"]["kernelPth"] = "/x"
    out = control_plane.kubectl(
        "create", "--validate=strict", "-f", "-", input_text=json.dumps(vm), check=False
    )
    assert out.returncode != 0
    assert "kernelPth" in out.stderr


def test_sample_catalogue_verifies_with_the_sample_publisher_key() -> None:
    keys = sample_publisher_keys()
    comps = _samples("oscomponents.yaml")
    assert len(comps) >= 3
    for obj in comps:
        check = check_component(obj, keys)
        assert check.ok, (obj["metadata"]["name"], check)
    box = next(d for d in _samples("lazybox.yaml") if d["kind"] == "LazyBox")
    got = resolve(BoxRequest.from_spec(box["spec"]), [parse_component(o) for o in comps])
    assert [c.name for c in got] == ["linux", "busybox-base", "glibc", "hello-web"]


def _gtvp(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gtvp.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_component_sign_and_verify_cli(tmp_path: Path) -> None:
    key = tmp_path / "publisher.pem"
    key.write_bytes(PUB.private_pem)
    pub = tmp_path / "publisher.pub"
    pub.write_text(PUB.public_pem)
    obj = PUB.component("tool", "1.0.0")
    del obj["spec"]["signature"]
    manifest = tmp_path / "tool.yaml"
    manifest.write_text(yaml.safe_dump(obj))
    signed = _gtvp("component", "sign", str(manifest), "--key", str(key), "--publisher", "acme")
    assert signed.returncode == 0, signed.stderr
    out = yaml.safe_load(signed.stdout)
    assert out["spec"]["signature"]["publisher"] == "acme"
    signed_path = tmp_path / "signed.yaml"
    signed_path.write_text(signed.stdout)
    ok = _gtvp("component", "verify", str(signed_path), "--publisher-key", f"acme={pub}")
    assert ok.returncode == 0, ok.stderr
    assert "Verified" in ok.stdout
    out["spec"]["version"] = "1.0.1"  # changed after signing
    signed_path.write_text(yaml.safe_dump(out))
    bad = _gtvp("component", "verify", str(signed_path), "--publisher-key", f"acme={pub}")
    assert bad.returncode == 1
    assert "BadSignature" in bad.stdout
    missing = _gtvp(
        "component", "sign", str(tmp_path / "nope.yaml"), "--key", str(key), "--publisher", "acme"
    )
    assert missing.returncode == 2
    assert "nope.yaml" in missing.stderr
    # a policy that lets acme sign only its kernel: the tool, well signed, is out of its scope
    out["spec"]["version"] = "1.0.0"
    signed_path.write_text(yaml.safe_dump(out))
    policy = tmp_path / "policy.yaml"
    key_entry = {"name": "acme", "publicKey": PUB.public_pem, "components": ["linux"]}
    policy.write_text(
        yaml.safe_dump({"kind": "SecurityPolicy", "spec": {"publisherKeys": [key_entry]}})
    )
    scoped = _gtvp("component", "verify", str(signed_path), "--policy", str(policy))
    assert scoped.returncode == 1
    assert "OutOfScope: publisher acme may sign only linux" in scoped.stdout
