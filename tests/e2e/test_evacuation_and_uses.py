"""Evacuation that survives an operator crash, and maxUses forcing a fresh quote.

Same real/simulated split as test_trusted_pool: real API server, agents, swtpms, operator and
webhooks; Nodes by kwok and virt-controller by gtvp's stand-in (SIMULATED).
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gtvp.core.timestamps import parse_ts
from gtvp_local.controlplane import ControlPlane
from gtvp_local.pool import Pool
from tests.e2e.test_trusted_pool import _vm, _vmi, _wait
from tests.pools import trusted_pool

pytestmark = [pytest.mark.e2e, pytest.mark.controlplane, pytest.mark.tpm]


@pytest.fixture(scope="module")
def pool(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with trusted_pool(
        control_plane,
        tmp_path_factory.mktemp("e2e-evac"),
        tag="evac",
        identities={"a": 3, "b": 3, "c": 3},
        policy={"interval": "2s", "valid_for": "6s", "max_uses": 50},
    ) as p:
        yield p


def _placements(pool: Pool, ns: str, names: list[str]) -> dict[str, str]:
    return {n: (_vmi(pool, ns, n).get("status") or {}).get("nodeName", "") for n in names}


def _migrations(pool: Pool, ns: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(
        pool.cp.kubectl("get", "vmim", "-n", ns, "-o", "json").stdout
    )["items"]
    return items


def test_maxuses_forces_a_fresh_quote(pool: Pool, namespace: str) -> None:
    pool.apply_policy(interval="60s", valid_for="180s", max_uses=1)
    name = pool.members()[0]
    time.sleep(4)  # the current challenge (2s interval) is answered; the next is 60s away
    before = pool.member(name)["status"]
    assert before["trust"]["usesLeft"] == 1
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(_vm("one", 3)))
    host = _wait(
        "one running", lambda: _vmi(pool, namespace, "one").get("status", {}).get("nodeName")
    )
    target = next(n for n in pool.members() if n != host)
    mig = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": "one-moves"},
        "spec": {"vmiName": "one", "addedNodeSelector": {"kubernetes.io/hostname": target}},
    }
    verified = pool.member(target)["status"]["trust"]["verifiedAt"]
    pool.cp.kubectl("create", "-n", namespace, "-f", "-", input_text=json.dumps(mig))
    # the migration spends the target's only use; a fresh quote follows at once, not in 60s
    fresh = _wait(
        "a fresh verdict for the target",
        lambda: (t := pool.member(target)["status"]["trust"])["verifiedAt"] != verified and t,
        timeout=15,
    )
    assert fresh["usesLeft"] == 1
    assert fresh["reason"] == "QuoteVerified"
    pool.apply_policy(interval="2s", valid_for="6s", max_uses=50)


def test_operator_killed_mid_evacuation_starts_no_duplicate_and_loses_no_vm(
    pool: Pool, namespace: str
) -> None:
    # verdicts from a policy with fewer uses (an earlier test's) are spent at once by the
    # VMs' starts, and a target whose verdict is spent loses its pinned evacuation (rightly
    # re-planned under another name): begin with every member re-verified under this one
    _wait(
        "every member Trusted with the policy's uses",
        lambda: all(
            (st := pool.member(m).get("status") or {}).get("phase") == "Trusted"
            and (st.get("trust") or {}).get("usesLeft", 0) >= 10
            for m in pool.members()
        ),
    )
    names = [f"vm{i}" for i in range(4)]
    for n in names:
        pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(_vm(n, 3)))
    _wait("all running", lambda: all(_placements(pool, namespace, names).values()))
    placed = _placements(pool, namespace, names)
    host = max(set(placed.values()), key=list(placed.values()).count)
    on_host = sorted(n for n, node in placed.items() if node == host)
    pool.procs.stop("virtsim")  # freeze migrations where they are (SIMULATED controller)
    try:
        pool.extend_pcr(host, 7, b"rootkit")
        pool.wait_phase(host, "Untrusted", reason="PcrMismatch", timeout=20)

        def evacuating() -> list[dict[str, Any]]:
            return [
                m
                for m in _migrations(pool, namespace)
                if m["metadata"].get("labels", {}).get("gtvp.io/evacuation") == host
            ]

        # Kill only once the pass has started a migration for every VM on the member: killed
        # between two of its creates, the restarted operator rightly finishes the pass, and a
        # comparison with the half-done set would fail with no duplicate anywhere.
        _wait(
            "an evacuation migration for every VM on the member",
            lambda: sorted(m["spec"]["vmiName"] for m in evacuating()) == on_host,
        )
        operator = pool.procs.get("operator")
        assert operator is not None
        import os

        os.kill(operator.pid, signal.SIGKILL)  # mid-evacuation, no goodbye
        pool.procs.stop("operator")
        pool.start_operator()
        time.sleep(6)  # the restarted operator re-plans the evacuation
        # one evacuation per VM, none started twice (a pin whose target's verdict lapsed
        # meanwhile is rightly cancelled and planned again under another name)
        assert sorted(m["spec"]["vmiName"] for m in evacuating()) == on_host
        assert len({m["spec"]["vmiName"] for m in _migrations(pool, namespace)}) == len(
            _migrations(pool, namespace)
        )
    finally:  # KubeVirt (simulated) back, whatever failed: the next test needs it
        pool.start_virtsim()
    _wait(
        "every VM off the tampered member",
        lambda: all(node and node != host for node in _placements(pool, namespace, names).values()),
        timeout=60,
    )
    assert set(_placements(pool, namespace, names)) == set(names)  # no VM lost
    assert len(on_host) >= 1


def test_a_vm_not_moved_off_within_its_levels_bound_is_stopped(pool: Pool, namespace: str) -> None:
    """Whatever holds an evacuation back (here KubeVirt itself: the stand-in is frozen, so
    the migration never leaves Pending) must not keep a restricted VM on a host that lost
    trust for ever: past its level's migrateWithin gtvp stops it, says so once, and the VM
    does not come back on that host."""
    pool.apply_policy(interval="2s", valid_for="6s", max_uses=50, migrate_within={3: "10s"})
    try:
        pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(_vm("held", 3)))
        host = _wait(
            "held running",
            lambda: (_vmi(pool, namespace, "held").get("status") or {}).get("nodeName"),
        )
        pool.procs.stop("virtsim")  # SIMULATED KubeVirt frozen: no migration makes progress
        pool.extend_pcr(host, 7, b"rootkit")
        lost = pool.wait_phase(host, "Untrusted", reason="PcrMismatch", timeout=20)
        since = parse_ts(lost["status"]["belowSince"]["3"])  # level 3 out of reach since
        assert since is not None
        _wait(
            "an evacuation migration started",
            lambda: any(
                m["metadata"].get("labels", {}).get("gtvp.io/evacuation") == host
                for m in _migrations(pool, namespace)
            ),
        )

        def halted() -> bool:
            vm = json.loads(pool.cp.kubectl("get", "vm", "held", "-n", namespace,
                                            "-o", "json").stdout)  # fmt: skip
            return vm["spec"].get("running") is False

        _wait("the VM stopped past its bound", halted, timeout=30)
        stopped_seen = dt.datetime.now(dt.UTC)
        # not before the bound (the recorded time is whole seconds, rounded down)
        assert stopped_seen - since >= dt.timedelta(seconds=10)
        assert not _vmi(pool, namespace, "held")  # the VMI itself deleted, not just the VM
        time.sleep(3)  # three more passes of the evacuation loop: said once, not per pass
        out = pool.cp.kubectl(
            "get", "events", "-n", namespace, "--field-selector", "reason=EvacuationDeadline",
            "-o", "json",
        )  # fmt: skip
        said = json.loads(out.stdout)["items"]
        assert [(e["involvedObject"]["name"], e["type"], e.get("count", 1)) for e in said] == [
            ("held", "Warning", 1)
        ]
        assert said[0]["message"].startswith(f"still on {host} 10s after it lost trust")
        assert "level restricted's migrateWithin" in said[0]["message"]
        pool.start_virtsim()
        time.sleep(3)  # KubeVirt (simulated) back: a halted VM is not started again
        assert not _vmi(pool, namespace, "held")
    finally:
        if pool.procs.get("virtsim") is None:
            pool.start_virtsim()
        pool.apply_policy(interval="2s", valid_for="6s", max_uses=50)
