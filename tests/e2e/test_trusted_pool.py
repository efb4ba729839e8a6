"""The trusted pool end to end on the local control plane.

Real: kube-apiserver + etcd, KubeVirt's CRDs, one gtvp-agent per member on its own swtpm,
gtvp-operator with its admission webhooks (called by the real API server over TLS), kubectl.
Simulated (no kubelet or KubeVirt here): Nodes by kwok, and KubeVirt's virt-controller by
gtvp's stand-in (`gtvp_local.virtsim`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from gtvp.core.trust import TAINT_KEY, TRUSTED_LABEL
from gtvp_local.controlplane import ControlPlane
from gtvp_local.pool import Pool
from tests.pools import trusted_pool
from tests.pools import wait_for as _wait

pytestmark = [pytest.mark.e2e, pytest.mark.controlplane, pytest.mark.tpm]


@pytest.fixture(scope="module")
def pool(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with trusted_pool(
        control_plane,
        tmp_path_factory.mktemp("e2e"),
        tag="e2e",
        identities={"a": 3, "b": 3, "c": 1},
        policy={"interval": "2s", "valid_for": "6s", "max_uses": 50},
    ) as p:
        yield p


def _names(pool: Pool) -> list[str]:
    return sorted(pool.tpms)


def _node(pool: Pool, name: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(pool.cp.kubectl("get", "node", name, "-o", "json").stdout)
    return out


def _vm(name: str, level: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "labels": {"gtvp.io/level": str(level)}},
        "spec": {
            "running": True,
            "template": {
                "metadata": {"labels": {"gtvp.io/level": str(level)}},
                "spec": {
                    "domain": {"devices": {}, "memory": {"guest": "128Mi"}},
                    "evictionStrategy": "External",
                },
            },
        },
    }


def _vmi(pool: Pool, ns: str, name: str) -> dict[str, Any]:
    out = pool.cp.kubectl("get", "vmi", name, "-n", ns, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def test_trusted_nodes_carry_labels_and_no_taint(pool: Pool) -> None:
    a, _b, c = _names(pool)
    node = _wait(
        "labels on a", lambda: (n := _node(pool, a))["metadata"]["labels"].get(TRUSTED_LABEL) and n
    )
    labels = node["metadata"]["labels"]
    assert labels["node-restriction.kubernetes.io/gtvp-level-3"] == "true"
    assert not any(t["key"] == TAINT_KEY for t in node["spec"].get("taints") or [])
    low = _wait(
        "labels on c", lambda: (n := _node(pool, c))["metadata"]["labels"].get(TRUSTED_LABEL) and n
    )
    assert "node-restriction.kubernetes.io/gtvp-level-2" not in low["metadata"]["labels"]


def test_the_pool_operator_signs_verdict_tokens_that_verify_offline(
    pool: Pool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The operator process of the local pool (its own RBAC, not an admin's) keeps the
    signing keys and publishes the JWKS; a member's token read from its status verifies
    offline with `gtvp token verify`, at its level and not above it."""
    a, _b, c = _names(pool)

    def token(name: str) -> str:
        out = pool.cp.kubectl("get", "member", name, "-o", "json").stdout
        trust = json.loads(out).get("status", {}).get("trust", {})
        return str(trust.get("token") or "") if trust.get("verdict") == "Trusted" else ""

    tokens = {n: _wait(f"a token for {n}", lambda n=n: token(n)) for n in (a, c)}
    jwks = tmp_path_factory.mktemp("jwks") / "jwks.json"
    jwks.write_text(
        _wait(
            "the JWKS ConfigMap",
            lambda: (
                pool.cp.kubectl(
                    "get",
                    "configmap",
                    "gtvp-verdict-jwks",
                    "-n",
                    "gtvp-system",
                    "-o",
                    "json",
                    check=False,
                ).stdout
            ),
        )
    )

    cluster = pool.cp.kubectl(
        "get", "namespace", "kube-system", "-o", "jsonpath={.metadata.uid}"
    ).stdout.strip()

    def verify(
        tok: str, level: int, issuer: str = f"gtvp.io/cluster/{cluster}"
    ) -> subprocess.CompletedProcess[str]:
        argv = ["token", "verify", tok, "--jwks", str(jwks), "--min-level", str(level)]
        argv += ["--issuer", issuer]
        return subprocess.run(
            [sys.executable, "-m", "gtvp.cli", *argv], capture_output=True, text=True, check=False
        )

    ok = verify(tokens[a], 3)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    low = verify(tokens[c], 3)  # c is trusted at level 1 only
    assert low.returncode == 1, low.stdout + low.stderr
    assert "level" in (low.stdout + low.stderr)
    elsewhere = verify(tokens[a], 3, issuer="gtvp.io/cluster/another")  # another cluster's
    assert elsewhere.returncode == 1, elsewhere.stdout + elsewhere.stderr
    # the published key set names this cluster: it is not the other cluster's key set
    assert f"is the key set of issuer 'gtvp.io/cluster/{cluster}'" in elsewhere.stderr


def test_vm_lands_only_on_a_trusted_node_of_a_sufficient_level(pool: Pool, namespace: str) -> None:
    a, b, _c = _names(pool)
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(_vm("web", 3)))
    vm = json.loads(pool.cp.kubectl("get", "vm", "web", "-n", namespace, "-o", "json").stdout)
    selector = vm["spec"]["template"]["spec"]["nodeSelector"]
    assert selector == {
        TRUSTED_LABEL: "true",
        "node-restriction.kubernetes.io/gtvp-level-3": "true",
    }
    vmi = _wait(
        "VMI running",
        lambda: (v := _vmi(pool, namespace, "web")).get("status", {}).get("nodeName") and v,
    )
    assert vmi["status"]["nodeName"] in {a, b}  # never c (level 1)


def test_vmi_without_the_trust_selector_is_refused(pool: Pool, namespace: str) -> None:
    # a VMI that bypasses the mutating webhook's selector (e.g. written by a buggy tool)
    vmi = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "bare", "labels": {"gtvp.io/level": "2"}},
        "spec": {"domain": {"devices": {}, "memory": {"guest": "64Mi"}}},
    }
    out = pool.cp.kubectl(
        "create", "-n", namespace, "-f", "-", input_text=json.dumps(vmi), check=False
    )
    # the mutating webhook adds the selector, so it is admitted with it
    assert out.returncode == 0, out.stderr
    got = _vmi(pool, namespace, "bare")
    assert got["spec"]["nodeSelector"][TRUSTED_LABEL] == "true"


def test_vm_of_a_level_no_member_has_is_refused_at_its_instance(pool: Pool, namespace: str) -> None:
    vmi = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "secret", "labels": {"gtvp.io/level": "5"}},
        "spec": {"domain": {"devices": {}, "memory": {"guest": "64Mi"}}},
    }
    out = pool.cp.kubectl(
        "create", "-n", namespace, "-f", "-", input_text=json.dumps(vmi), check=False
    )
    assert out.returncode != 0
    # no policy level 5 either: refused as a level the policy does not define
    assert "needs level 5, which the SecurityPolicy in force does not define" in out.stderr


def test_migration_aimed_at_an_untrusted_node_is_refused(pool: Pool, namespace: str) -> None:
    a, b, c = _names(pool)
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(_vm("db", 1)))
    _wait("db running", lambda: _vmi(pool, namespace, "db").get("status", {}).get("nodeName"))
    source = _vmi(pool, namespace, "db")["status"]["nodeName"]
    mig = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": "to-nowhere"},
        "spec": {"vmiName": "db", "addedNodeSelector": {"kubernetes.io/hostname": "no-such"}},
    }
    out = pool.cp.kubectl(
        "create", "-n", namespace, "-f", "-", input_text=json.dumps(mig), check=False
    )
    assert out.returncode != 0
    assert "is aimed at no-such, which may not receive a level-1 VM" in out.stderr
    assert source in {a, b, c}


def test_migration_gets_the_trust_selector(pool: Pool, namespace: str) -> None:
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(_vm("app", 2)))
    _wait("app running", lambda: _vmi(pool, namespace, "app").get("status", {}).get("nodeName"))
    mig = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": "move-app"},
        "spec": {"vmiName": "app"},
    }
    pool.cp.kubectl("create", "-n", namespace, "-f", "-", input_text=json.dumps(mig))
    got = json.loads(
        pool.cp.kubectl("get", "vmim", "move-app", "-n", namespace, "-o", "json").stdout
    )
    assert got["spec"]["addedNodeSelector"][TRUSTED_LABEL] == "true"
    assert got["spec"]["addedNodeSelector"]["node-restriction.kubernetes.io/gtvp-level-2"] == (
        "true"
    )


def test_tampered_member_is_quarantined_and_evacuated(pool: Pool, namespace: str) -> None:
    a, b, _c = _names(pool)
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(_vm("victim", 3)))
    host = _wait(
        "victim running", lambda: _vmi(pool, namespace, "victim").get("status", {}).get("nodeName")
    )
    other = b if host == a else a
    pool.extend_pcr(host, 7, b"rootkit")
    pool.wait_phase(host, "Untrusted", reason="PcrMismatch", timeout=20)
    node = _wait(
        "taint",
        lambda: (
            (n := _node(pool, host))
            and any(
                t["key"] == TAINT_KEY and t["effect"] == "NoSchedule"
                for t in n["spec"].get("taints") or []
            )
            and n
        ),
    )
    assert TRUSTED_LABEL not in node["metadata"]["labels"]
    moved = _wait(
        "evacuation",
        lambda: _vmi(pool, namespace, "victim").get("status", {}).get("nodeName") == other,
        timeout=30,
    )
    assert moved
    migs = json.loads(
        pool.cp.kubectl(
            "get", "vmim", "-n", namespace, "-l", f"gtvp.io/evacuation={host}", "-o", "json"
        ).stdout
    )
    assert len(migs["items"]) == 1
    assert migs["items"][0]["metadata"]["name"].startswith("gtvp-evac-victim-")
