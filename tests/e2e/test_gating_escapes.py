"""Ways out of gating that issue #10 found, and the webhooks' blast radius, end to end.

- The level a VM/VMI was admitted with sticks: removing or lowering `gtvp.io/level`, or
  dropping the trust selector of a running VMI, is refused, so a migration aimed at an
  Untrusted member stays refused; levels are canonical and a VM's two labels must agree.
- The webhooks are scoped (namespaceSelector, matchConditions): with the operator down an
  ungated VM is admitted, a gated one is refused (fail closed).
- Only the API server's webhook client certificate gets an answer from the webhook port.

Same real/simulated split as test_trusted_pool: real API server, agents, swtpms, operator and
webhooks; Nodes by kwok and virt-controller by gtvp's stand-in (SIMULATED).
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from gtvp.core.trust import TRUSTED_LABEL
from gtvp_local import pki
from gtvp_local.controlplane import ControlPlane, agent_identity
from gtvp_local.pool import Pool
from tests.e2e.test_trusted_pool import _vm, _vmi, _wait
from tests.pools import trusted_pool

pytestmark = [pytest.mark.e2e, pytest.mark.controlplane, pytest.mark.tpm]

LEVEL3 = "node-restriction.kubernetes.io/gtvp-level-3"


@pytest.fixture(scope="module")
def pool(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with trusted_pool(
        control_plane,
        tmp_path_factory.mktemp("e2e-escapes"),
        tag="escape",
        identities={"a": 3, "b": 3, "u": 3},
        policy={"interval": "2s", "valid_for": "6s", "max_uses": 50},
    ) as p:
        untrusted = _untrusted(p)
        p.extend_pcr(untrusted, 7, b"rootkit")
        p.wait_phase(untrusted, "Untrusted", reason="PcrMismatch", timeout=20)
        yield p


def _untrusted(pool: Pool) -> str:
    return next(n for n in pool.members() if n.endswith("-u"))


def _running(pool: Pool, ns: str, name: str) -> str:
    node: str = _wait(
        f"{name} running",
        lambda: (_vmi(pool, ns, name).get("status") or {}).get("nodeName"),
    )
    return node


def _create(pool: Pool, ns: str, obj: dict[str, Any]) -> Any:
    return pool.cp.kubectl("create", "-n", ns, "-f", "-", input_text=json.dumps(obj), check=False)


def _migration(vmi: str, name: str, target: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"vmiName": vmi}
    if target:
        spec["addedNodeSelector"] = {"kubernetes.io/hostname": target}
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": name},
        "spec": spec,
    }


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ----- the level sticks (issue #10 item 2) --------------------------------------------------


def test_removing_the_level_label_is_refused(pool: Pool, namespace: str) -> None:
    u = _untrusted(pool)
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(_vm("web", 3)))
    host = _running(pool, namespace, "web")
    # the attack: unlabel the running VMI, drop its trust selector, migrate it to `u`
    unlabel = pool.cp.kubectl("label", "vmi", "web", "-n", namespace, "gtvp.io/level-", check=False)
    assert unlabel.returncode != 0
    assert (
        'admission webhook "gtvp-validate-vmi.gtvp.io" denied the request: '
        f"VirtualMachineInstance {namespace}/web was admitted at level 3: its label "
        "gtvp.io/level cannot be removed (it would then migrate ungated); to run it ungated, "
        "delete it (or its VirtualMachine) and create it again without the label"
    ) in _one_line(unlabel.stderr)
    unselect = pool.cp.kubectl(
        "patch",
        "vmi",
        "web",
        "-n",
        namespace,
        "--type=json",
        "-p",
        '[{"op": "remove", "path": "/spec/nodeSelector"}]',
        check=False,
    )
    assert unselect.returncode != 0
    assert (
        f"VirtualMachineInstance {namespace}/web was admitted with the trust selector "
        f"{LEVEL3}=true, {TRUSTED_LABEL}=true: removing or changing"
    ) in _one_line(unselect.stderr)
    out = _create(pool, namespace, _migration("web", "to-u", u))
    assert out.returncode != 0
    assert f"is aimed at {u}, which may not receive a level-3 VM" in out.stderr
    vmi = _vmi(pool, namespace, "web")
    assert vmi["metadata"]["labels"]["gtvp.io/level"] == "3"
    assert vmi["spec"]["nodeSelector"][LEVEL3] == "true"
    assert vmi["status"]["nodeName"] == host != u


def test_lowering_the_level_is_refused(pool: Pool, namespace: str) -> None:
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(_vm("db", 3)))
    _running(pool, namespace, "db")
    lower_vmi = pool.cp.kubectl(
        "label", "vmi", "db", "-n", namespace, "gtvp.io/level=1", "--overwrite", check=False
    )
    assert lower_vmi.returncode != 0
    assert "its label gtvp.io/level cannot be lowered (to 1)" in lower_vmi.stderr
    lowered = _vm("db", 1)
    lower_vm = pool.cp.kubectl(
        "apply", "-n", namespace, "-f", "-", input_text=json.dumps(lowered), check=False
    )
    assert lower_vm.returncode != 0
    assert (
        f"VirtualMachine {namespace}/db was admitted at level 3: gtvp.io/level cannot be "
        "lowered (to 1); its running instance keeps the level it was admitted with. To run it "
        "at level 1, delete the VirtualMachine and create it again with that level"
    ) in _one_line(lower_vm.stderr)
    unlabel_vm = pool.cp.kubectl(
        "label", "vm", "db", "-n", namespace, "gtvp.io/level-", check=False
    )
    assert unlabel_vm.returncode != 0
    assert "gtvp.io/level cannot be removed from it" in unlabel_vm.stderr
    # the way that works: delete the VM, create it again at the level wanted
    pool.cp.kubectl("delete", "vm", "db", "-n", namespace, "--wait=false")
    _wait("db's instance gone", lambda: not _vmi(pool, namespace, "db"), timeout=30)
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(lowered))
    _wait(
        "db back at level 1",
        lambda: (
            _vmi(pool, namespace, "db").get("metadata", {}).get("labels", {}).get("gtvp.io/level")
            == "1"
        ),
        timeout=30,
    )


def test_vm_with_disagreeing_levels_is_refused(pool: Pool, namespace: str) -> None:
    vm = _vm("split", 3)
    vm["spec"]["template"]["metadata"]["labels"]["gtvp.io/level"] = "1"
    out = _create(pool, namespace, vm)
    assert out.returncode != 0
    assert (
        f"VirtualMachine {namespace}/split: label gtvp.io/level is "
        '"3" on the VirtualMachine but "1" on its template; they must agree'
    ) in _one_line(out.stderr)
    assert not _vmi(pool, namespace, "split")


def test_noncanonical_level_is_refused(pool: Pool, namespace: str) -> None:
    vm = _vm("padded", 3)
    vm["metadata"]["labels"]["gtvp.io/level"] = "03"
    vm["spec"]["template"]["metadata"]["labels"]["gtvp.io/level"] = "03"
    out = _create(pool, namespace, vm)
    assert out.returncode != 0
    assert (
        f'VirtualMachine {namespace}/padded: label gtvp.io/level="03" on the VirtualMachine '
        'must be a single digit from 1 to 9 (write "3", not "03")'
    ) in _one_line(out.stderr)
    vmi = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "padded", "labels": {"gtvp.io/level": "03"}},
        "spec": {"domain": {"devices": {}, "memory": {"guest": "64Mi"}}},
    }
    out = _create(pool, namespace, vmi)
    assert out.returncode != 0
    assert 'label gtvp.io/level="03" must be a single digit from 1 to 9 (write "3"' in out.stderr


def test_a_gated_vmi_cannot_ask_for_days_to_shut_down(pool: Pool, namespace: str) -> None:
    """When gtvp stops a gated VM on a host that lost trust, KubeVirt asks the guest to shut
    down and waits its terminationGracePeriodSeconds before killing it: a guest that ignores
    the request would run on for as long as its user asked. The grace is brought down to
    180 s at admission, and the user is told; nor may it be raised later (KubeVirt's stop
    endpoint writes the grace it is given into the VMI, as KubeVirt's own account); ungated
    VMIs keep theirs."""

    def vmi(name: str, labels: dict[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"name": name, "labels": labels},
            "spec": {"domain": {"devices": {}, "memory": {"guest": "64Mi"}},
                     "terminationGracePeriodSeconds": 2000000000},
        }  # fmt: skip

    out = _create(pool, namespace, vmi("patient", {"gtvp.io/level": "3"}))
    assert out.returncode == 0, out.stderr
    assert "terminationGracePeriodSeconds lowered to 180" in out.stderr  # kubectl's Warning:
    assert _vmi(pool, namespace, "patient")["spec"]["terminationGracePeriodSeconds"] == 180

    def grace(seconds: int) -> Any:
        patch = json.dumps({"spec": {"terminationGracePeriodSeconds": seconds}})
        return pool.cp.kubectl("patch", "vmi", "patient", "-n", namespace, "--type=merge",
                               "-p", patch, check=False)  # fmt: skip

    out = grace(10_000_000)
    assert out.returncode != 0
    assert "may not raise its terminationGracePeriodSeconds to 10000000" in out.stderr
    assert grace(60).returncode == 0  # a shorter one is fine
    assert _vmi(pool, namespace, "patient")["spec"]["terminationGracePeriodSeconds"] == 60
    out = _create(pool, namespace, vmi("plain", {}))
    assert out.returncode == 0, out.stderr
    assert _vmi(pool, namespace, "plain")["spec"]["terminationGracePeriodSeconds"] == 2000000000


def test_migration_of_an_unlabelled_vmi_keeps_its_admitted_level(
    pool: Pool, namespace: str
) -> None:
    """A VMI whose label went while gtvp did not refuse that (before this version, or with
    its webhooks removed) is still judged by the level its trust selector carries."""
    u = _untrusted(pool)
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(_vm("old", 3)))
    _running(pool, namespace, "old")
    pool.cp.kubectl("delete", "validatingwebhookconfiguration", "gtvp")
    try:
        pool.cp.kubectl("label", "vmi", "old", "-n", namespace, "gtvp.io/level-")
    finally:
        pool.install_webhooks()
    assert "gtvp.io/level" not in _vmi(pool, namespace, "old")["metadata"].get("labels", {})
    out = _create(pool, namespace, _migration("old", "old-to-u", u))
    assert out.returncode != 0
    assert f"is aimed at {u}, which may not receive a level-3 VM" in out.stderr

    def phase(name: str) -> str | None:
        out = pool.cp.kubectl(
            "get", "vmim", name, "-n", namespace, "-o", "jsonpath={.status.phase}", check=False
        )
        return out.stdout if out.returncode == 0 else None  # None: gone

    # the gate aborts (deletes) a migration whose target's verdict lapsed in flight, which a
    # loaded machine can cause: then the test asks again, as an evacuation would
    for attempt in range(3):
        name = f"old-moves-{attempt}"
        assert _create(pool, namespace, _migration("old", name)).returncode == 0
        got = json.loads(pool.cp.kubectl("get", "vmim", name, "-n", namespace, "-o", "json").stdout)
        assert got["spec"]["addedNodeSelector"] == {TRUSTED_LABEL: "true", LEVEL3: "true"}
        ended = _wait(f"{name} to end", lambda n=name: phase(n) in ("Succeeded", None), 30)
        if ended and phase(name) == "Succeeded":
            break
    else:
        raise AssertionError("three migrations of old were aborted: no target stayed usable")
    assert _vmi(pool, namespace, "old")["status"]["nodeName"] != u


# ----- blast radius with the operator down (issue #10 item 7) ------------------------------


# ----- only the API server calls the webhooks ---------------------------------------------------
def _post_review(port: int, cert: tuple[str, str] | None, namespace: str = "default") -> int | str:
    """Post a forged review of a gated VMI to the operator's webhook port, as an attacker
    would (not checking the server): the HTTP status, or the error the connection ended in."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        context.load_cert_chain(*cert)
    vm = _vm("probe", 3)
    vm["metadata"]["namespace"] = namespace
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "forged",
            "kind": {"group": "kubevirt.io", "version": "v1", "kind": "VirtualMachine"},
            "resource": {"group": "kubevirt.io", "version": "v1", "resource": "virtualmachines"},
            "namespace": namespace,
            "name": "probe",
            "operation": "CREATE",
            "userInfo": {"username": "anyone"},
            "object": vm,
            "dryRun": True,
        },
    }
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        connection.request(
            "POST",
            "/gtvp-validate-vm",
            body=json.dumps(review),
            headers={"Content-Type": "application/json"},
        )
        return connection.getresponse().status
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        connection.close()


def test_only_the_api_server_gets_an_answer_from_the_webhooks(pool: Pool, namespace: str) -> None:
    """A pod posts a review with no certificate; root on a member posts one with its agent's
    client certificate (the cluster CA signed it): both fail in the TLS handshake, while the
    API server, presenting its webhook client certificate, still gets gated VMs admitted."""
    assert pool.webhook_port
    client_ca = pool.cp.pki_dir / "webhook-client"
    # the port answers the API server's own certificate (the control: the port is up) ...
    apiserver = (str(client_ca / "apiserver.crt"), str(client_ca / "apiserver.key"))
    assert _post_review(pool.webhook_port, apiserver, namespace) == 200
    # ... refuses another name from the same CA before any handler ...
    other = pki.issue(
        pki.KeyPair(client_ca / "ca.crt", client_ca / "ca.key"),
        pool.dir / "attacker",
        "other-name",
        common_name="not-the-api-server",
    )
    assert _post_review(pool.webhook_port, (str(other.cert), str(other.key)), namespace) == 403
    # ... and ends the handshake of a caller with no certificate, or with a member's
    assert isinstance(_post_review(pool.webhook_port, None), str)
    member = next(iter(pool.members()))
    pool.cp.kubeconfig_for(agent_identity(member))
    users = pool.cp.pki_dir / "users"
    agent_cert = (str(users / f"agent-{member}.crt"), str(users / f"agent-{member}.key"))
    assert isinstance(_post_review(pool.webhook_port, agent_cert), str)
    out = _create(pool, namespace, _vm("through-the-api-server", 3))
    assert out.returncode == 0, out.stderr
    assert _running(pool, namespace, "through-the-api-server") != _untrusted(pool)


@pytest.fixture
def operator_down(pool: Pool) -> Iterator[None]:
    pool.stop_operator()
    try:
        yield
    finally:
        pool.start_operator()


def test_ungated_vm_is_admitted_with_the_operator_down(
    pool: Pool, namespace: str, operator_down: None
) -> None:
    plain = _vm("plain", 1)
    del plain["metadata"]["labels"]
    del plain["spec"]["template"]["metadata"]
    out = _create(pool, namespace, plain)
    assert out.returncode == 0, out.stderr
    assert _running(pool, namespace, "plain")  # its VMI too, created by the (SIMULATED) controller
    # kube-system is never gated, labelled or not
    stopped = _vm(f"sys-{namespace}", 3)
    stopped["spec"]["running"] = False
    system = _create(pool, "kube-system", stopped)
    try:
        assert system.returncode == 0, system.stderr
    finally:
        pool.cp.kubectl("delete", "vm", f"sys-{namespace}", "-n", "kube-system", check=False)


def test_gated_vmi_keeps_running_and_updating_with_the_operator_down(
    pool: Pool, namespace: str
) -> None:
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(_vm("busy", 3)))
    host = _running(pool, namespace, "busy")
    pool.stop_operator()
    try:
        # what KubeVirt does all day to a running VMI (status, annotations) never needs gtvp
        note = pool.cp.kubectl(
            "annotate", "vmi", "busy", "-n", namespace, "example.com/note=x", check=False
        )
        assert note.returncode == 0, note.stderr
        status = pool.cp.kubectl(
            "patch",
            "vmi",
            "busy",
            "-n",
            namespace,
            "--type=merge",
            "-p",
            json.dumps({"status": {"nodeName": host, "phase": "Running"}}),
            check=False,
        )
        assert status.returncode == 0, status.stderr
        # a forced stop (KubeVirt's stop endpoint writes a grace of 0 first) needs no gtvp
        forced = pool.cp.kubectl(
            "patch", "vmi", "busy", "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {"terminationGracePeriodSeconds": 0}}), check=False,
        )  # fmt: skip
        assert forced.returncode == 0, forced.stderr
        longer = pool.cp.kubectl(
            "patch", "vmi", "busy", "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {"terminationGracePeriodSeconds": 10_000}}), check=False,
        )  # fmt: skip
        assert longer.returncode != 0  # a raise above the cap reaches gtvp: refused
        # ... but removing its label still reaches gtvp (oldObject carries it): refused
        unlabel = pool.cp.kubectl(
            "label", "vmi", "busy", "-n", namespace, "gtvp.io/level-", check=False
        )
        assert unlabel.returncode != 0
        assert 'failed calling webhook "gtvp-validate-vmi.gtvp.io"' in unlabel.stderr
        unlabel_vm = pool.cp.kubectl(
            "label", "vm", "busy", "-n", namespace, "gtvp.io/level-", check=False
        )
        assert unlabel_vm.returncode != 0
        assert 'failed calling webhook "gtvp-mutate-vm.gtvp.io"' in unlabel_vm.stderr
        # ... as does a change of its template
        retemplate = pool.cp.kubectl(
            "patch", "vm", "busy", "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {"template": {"metadata": {"labels": {"x": "y"}}}}}),
            check=False,
        )  # fmt: skip
        assert retemplate.returncode != 0
        # an administrator halts the gated VM the ordinary way (virtctl stop writes the run
        # strategy): no gtvp needed. Found by a review: every VM update reached gtvp.
        halt = pool.cp.kubectl(
            "patch", "vm", "busy", "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {"running": None, "runStrategy": "Halted"}}), check=False,
        )  # fmt: skip
        assert halt.returncode == 0, halt.stderr
    finally:
        pool.start_operator()


def test_gated_vm_is_refused_with_the_operator_down(
    pool: Pool, namespace: str, operator_down: None
) -> None:
    out = _create(pool, namespace, _vm("gated", 3))
    assert out.returncode != 0
    assert 'failed calling webhook "gtvp-mutate-vm.gtvp.io"' in out.stderr
    template_only = _vm("inner", 3)
    del template_only["metadata"]["labels"]
    out = _create(pool, namespace, template_only)
    assert out.returncode != 0
    assert 'failed calling webhook "gtvp-mutate-vm.gtvp.io"' in out.stderr
    # migrations always reach gtvp: only gtvp knows the level of the VMI they move
    out = _create(pool, namespace, _migration("anything", "m"))
    assert out.returncode != 0
    assert 'failed calling webhook "gtvp-mutate-migration.gtvp.io"' in out.stderr
    got = pool.cp.kubectl("get", "vm", "-n", namespace, "-o", "name").stdout
    assert got.strip() == ""
