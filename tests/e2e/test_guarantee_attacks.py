"""Attacks on gtvp's one promise, end to end: no gated VM stays on, or reaches, a member
without a fresh verdict.

Each test is named after the attack or accident it plays. Real: kube-apiserver + etcd, the
agents (each with its own client identity) on their own swtpm, the operator and its
webhooks, kubectl. Simulated (no kubelet or KubeVirt here): Nodes by kwok, virt-controller by
gtvp's stand-in (`gtvp_local.virtsim`, SIMULATED).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gtvp.core.api_resources import GTVP_API_VERSION
from gtvp.core.trust import TAINT_KEY, TRUSTED_LABEL
from gtvp_local.controlplane import ControlPlane, agent_identity
from gtvp_local.pool import Pool
from tests.e2e.test_trusted_pool import _node, _vm, _vmi
from tests.pools import no_quote_for, trusted_pool
from tests.pools import wait_for as _wait
from tests.tpmkit import soft_ak

pytestmark = [pytest.mark.e2e, pytest.mark.controlplane, pytest.mark.tpm]


@pytest.fixture(scope="module")
def pool(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with trusted_pool(
        control_plane,
        tmp_path_factory.mktemp("e2e-attacks"),
        tag="attack",
        identities={"a": 3, "b": 3, "c": 3},
        policy={"interval": "2s", "valid_for": "6s", "max_uses": 50},
    ) as p:
        yield p


def _run_vm(pool: Pool, ns: str, name: str, level: int) -> str:
    pool.cp.kubectl("apply", "-n", ns, "-f", "-", input_text=json.dumps(_vm(name, level)))
    return str(
        _wait(
            f"{name} running",
            lambda: (_vmi(pool, ns, name).get("status") or {}).get("nodeName"),
        )
    )


def _moved_off(pool: Pool, ns: str, name: str, host: str) -> str:
    """Wait until the VMI `name` runs on a member other than `host`; that member."""
    return str(
        _wait(
            f"{name} moved off {host}",
            lambda: (
                (n := (_vmi(pool, ns, name).get("status") or {}).get("nodeName"))
                and n != host
                and n
            ),
            timeout=30,
        )
    )


def _as_agent(pool: Pool, member: str, patch: dict[str, Any]) -> None:
    """What a root user on `member` can do with its agent's own credentials."""
    out = pool.cp.kubectl(
        "patch",
        "member",
        member,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(patch),
        identity=agent_identity(member),
        check=False,
    )
    assert out.returncode == 0, out.stderr


def _recover(pool: Pool, member: str) -> None:
    pool.start_agent(member)
    pool.wait_phase(member, "Trusted", timeout=40)


def test_agent_that_nulls_its_enrolment_loses_trust_and_its_vm_moves(
    pool: Pool, namespace: str
) -> None:
    host = _run_vm(pool, namespace, "frozen", 3)
    pool.stop_agent(host)  # the agent is paused, then its identity blanks the enrolment
    _as_agent(pool, host, {"status": {"agent": {"enrollment": None, "evidence": None}}})
    pool.wait_phase(host, "Untrusted", reason="EnrolmentChanged", timeout=10)
    member = pool.member(host)
    assert member["status"]["level"] == 0
    moved = _moved_off(pool, namespace, "frozen", host)
    assert moved != host
    _recover(pool, host)


def test_agent_that_swaps_in_a_software_ak_loses_trust_at_once(pool: Pool, namespace: str) -> None:
    host = _run_vm(pool, namespace, "softak", 3)
    pool.stop_agent(host)
    _, ak = soft_ak()
    public = len(ak.marshalled).to_bytes(2, "big") + ak.marshalled
    _as_agent(
        pool,
        host,
        {
            "status": {
                "agent": {
                    "enrollment": {
                        "akPublic": base64.b64encode(public).decode(),
                        "akName": ak.name.hex(),
                    }
                }
            }
        },
    )
    pool.wait_phase(host, "Untrusted", reason="EnrolmentChanged", timeout=10)
    # the software key is asked to activate a credential only the EK's TPM can open
    challenge = pool.member(host)["status"]["challenge"]
    assert challenge["credential"]["akName"] == ak.name.hex()
    _wait(
        "softak evacuated",
        lambda: (
            (_vmi(pool, namespace, "softak").get("status") or {}).get("nodeName")
            not in (None, host)
        ),
        timeout=30,
    )
    _recover(pool, host)


def test_migration_in_flight_to_a_member_that_loses_trust_is_aborted_at_once(
    pool: Pool, namespace: str
) -> None:
    source = _run_vm(pool, namespace, "mover", 3)
    target = next(n for n in pool.members() if n != source)
    pool.procs.stop("virtsim")  # SIMULATED virt-controller paused: the migration stays Running
    try:
        mig = {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": "inflight"},
            "spec": {"vmiName": "mover", "addedNodeSelector": {"kubernetes.io/hostname": target}},
        }
        pool.cp.kubectl("create", "-n", namespace, "-f", "-", input_text=json.dumps(mig))
        running = {
            "status": {
                "phase": "Running",
                "migrationState": {"sourceNode": source, "targetNode": target},
            }
        }
        pool.cp.kubectl(
            "patch",
            "vmim",
            "inflight",
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps(running),
        )
        pool.cp.kubectl("get", "vmim", "inflight", "-n", namespace)  # still there, Running
        pool.extend_pcr(target, 7, b"rootkit on the target")  # nothing touches the migration
        pool.wait_phase(target, "Untrusted", reason="PcrMismatch", timeout=20)
        _wait(
            "migration aborted",
            lambda: (
                pool.cp.kubectl("get", "vmim", "inflight", "-n", namespace, check=False).returncode
                != 0
            ),
            timeout=10,
        )
    finally:
        pool.start_virtsim()
    pool.tpm(target).stop()  # a reboot clears the rogue measurement
    pool.tpm(target).start()
    pool.stop_agent(target)
    _recover(pool, target)


def test_each_vmi_start_spends_a_use_of_its_hosts_verdict(pool: Pool, namespace: str) -> None:
    pool.apply_policy(interval="60s", valid_for="180s", max_uses=5)
    try:
        # wait until every member answered under the long interval (uses reset to 5; the
        # edit alone brings them down to 5 at once, and a nonce asked under the old short
        # interval would reset them mid-count)
        _wait(
            "uses at 5",
            lambda: all(
                (st := pool.member(n)["status"])["trust"].get("usesLeft") == 5
                and no_quote_for(st, 30)
                for n in pool.members()
            ),
            timeout=20,
        )
        host = _run_vm(pool, namespace, "counted", 1)
        _wait(
            "a use spent",
            lambda: pool.member(host)["status"]["trust"]["usesLeft"] == 4,
            timeout=10,
        )
        others = [pool.member(n)["status"]["trust"]["usesLeft"] for n in pool.members()]
        assert sorted(others) == [4, 5, 5]
    finally:
        pool.apply_policy(interval="2s", valid_for="6s", max_uses=50)


def test_deleted_node_takes_its_member_along(pool: Pool) -> None:
    name = f"gone-{pool.members()[0]}"
    pool.add_node(name)  # the operator makes every Node a member
    _wait(
        "member created",
        lambda: pool.cp.kubectl("get", "member", name, check=False).returncode == 0,
    )
    pool.cp.kubectl("delete", "node", name)
    _wait(
        "member removed",
        lambda: pool.cp.kubectl("get", "member", name, check=False).returncode != 0,
        timeout=15,
    )


def test_member_deleted_while_the_operator_is_down_leaves_no_trusted_node(
    pool: Pool, namespace: str
) -> None:
    """An administrator deletes a Member (to enrol its host afresh, or by mistake) while no
    operator runs: its Node still carries the trust labels gtvp wrote, and KubeVirt would
    place gated VMs there. Once the operator is back the Node is untrusted until its host
    enrols again, and the gated VM on it moves."""
    host = _run_vm(pool, namespace, "orphaned", 3)
    pool.stop_agent(host)  # the host does not enrol again during the test
    pool.stop_operator()
    try:
        pool.cp.kubectl("delete", "member", host)
    finally:
        pool.start_operator()

    def untrusted() -> bool:
        node = _node(pool, host)
        taints = node["spec"].get("taints") or []
        return TRUSTED_LABEL not in node["metadata"].get("labels", {}) and any(
            t["key"] == TAINT_KEY for t in taints
        )

    assert _wait(f"{host} untrusted", untrusted, timeout=20)
    made = pool.cp.kubectl("get", "member", host, "-o", "json", check=False)
    assert made.returncode == 0, made.stderr  # made again by the operator, for its Node
    assert json.loads(made.stdout)["metadata"]["labels"]["gtvp.io/node-member"] == "true"
    moved = _moved_off(pool, namespace, "orphaned", host)
    assert pool.member(moved)["status"]["phase"] == "Trusted"
    # the Member as the pool made it (its identity), then its host enrols afresh
    pool.apply(
        {
            "apiVersion": GTVP_API_VERSION,
            "kind": "Member",
            "metadata": {"name": host},
            "spec": {"identity": 3},
        }
    )
    _recover(pool, host)
    assert pool.member(host)["status"]["level"] == 3


def test_a_member_failing_every_cycle_posts_one_event_not_one_a_cycle(pool: Pool) -> None:
    name = pool.members()[-1]
    pool.extend_pcr(name, 7, b"persistent rootkit")  # every later quote fails the same way
    pool.wait_phase(name, "Untrusted", reason="PcrMismatch", timeout=20)
    first = pool.member(name)["status"]["trust"]["verifiedAt"]
    time.sleep(12)  # a retry every 5 s after a failure: at least two more refusals
    assert pool.member(name)["status"]["trust"]["verifiedAt"] != first
    events = json.loads(
        pool.cp.kubectl(
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            f"involvedObject.name={name},reason=PcrMismatch",
            "-o",
            "json",
        ).stdout
    )["items"]
    assert len(events) == 1, [e["message"] for e in events]
    pool.tpm(name).stop()  # a reboot clears the rogue measurement
    pool.tpm(name).start()
    pool.stop_agent(name)
    _recover(pool, name)
