"""`gtvp local up | status | down` as a user runs them: real processes, real ports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from gtvp_local import replicas
from gtvp_local.polling import wait_for
from gtvp_local.processes import ProcessTable, free_port, port_in_use

pytestmark = pytest.mark.controlplane


def _gtvp(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GTVP_LOCAL_STATE=str(state))
    return subprocess.run(
        [sys.executable, "-m", "gtvp.cli", "local", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # `up` with real VMs boots two under software emulation
        check=False,
    )


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    state = tmp_path / "local"
    etcd, api = free_port(), free_port()
    while etcd + 1 == api or port_in_use(etcd + 1):
        etcd = free_port()
    yield state, ["--etcd-port", str(etcd), "--apiserver-port", str(api)]
    _gtvp(state, "down")


def test_up_status_down_round_trip(pool: tuple[Path, list[str]]) -> None:
    state, ports = pool
    up = _gtvp(state, "up", "--members", "0", *ports)
    assert up.returncode == 0, up.stderr
    assert "v1.36.3 is up" in up.stdout
    assert "$ kubectl get members" in up.stdout
    assert "sample-node-a" in up.stdout
    assert f"export KUBECONFIG={state}/kubeconfig" in up.stdout

    status = _gtvp(state, "status")
    assert status.returncode == 0
    assert "kube-apiserver" in status.stdout
    assert ": ready" in status.stdout

    api_port = int(ports[3])
    down = _gtvp(state, "down")
    assert down.returncode == 0
    assert "kube-apiserver" in down.stdout
    assert not port_in_use(api_port)
    assert not port_in_use(int(ports[1]))
    assert _gtvp(state, "status").returncode == 1
    assert "nothing was running" in _gtvp(state, "down").stdout
    assert state.exists()  # a plain down keeps the pool's state for the next up
    purged = _gtvp(state, "down", "--purge")
    assert purged.returncode == 0
    assert "the next up starts fresh" in purged.stdout
    assert not state.exists()


def test_port_in_use_is_a_clear_error(pool: tuple[Path, list[str]]) -> None:
    state, ports = pool
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", int(ports[3])))
        blocker.listen()
        up = _gtvp(state, "up", "--no-samples", "--members", "0", *ports)
    assert up.returncode == 2
    assert f"port {ports[3]} (apiserver) on 127.0.0.1 is in use" in up.stderr
    assert "Traceback" not in up.stderr
    assert not ProcessTable(state).all() or not any(t.alive() for t in ProcessTable(state).all())


def test_half_started_run_is_cleaned_and_restarted(pool: tuple[Path, list[str]]) -> None:
    state, ports = pool
    assert _gtvp(state, "up", "--no-samples", "--members", "0", *ports).returncode == 0
    table = ProcessTable(state)
    api = table.get("kube-apiserver")
    assert api is not None
    table.stop("kube-apiserver")  # etcd is left running: a half-started pool
    etcd = table.get("etcd")
    assert etcd is not None
    assert etcd.alive()
    again = _gtvp(state, "up", "--no-samples", "--members", "0", *ports)
    assert again.returncode == 0, again.stderr
    assert _gtvp(state, "status").returncode == 0


def _sample_components() -> list[str]:
    """`name version` of the newest version of each sample component, in the file's order
    (kernel, rootfs, application): what the sample box resolves to."""
    newest: dict[str, tuple[int, ...]] = {}
    path = Path(__file__).parents[2] / "crds" / "samples" / "oscomponents.yaml"
    for doc in yaml.safe_load_all(path.read_text()):
        spec = doc["spec"]
        version = tuple(int(x) for x in spec["version"].split("."))
        newest[spec["componentName"]] = max(version, newest.get(spec["componentName"], version))
    return [f"{name} {'.'.join(map(str, v))}" for name, v in newest.items()]


def _assert_two_replicas(state: Path, up: str) -> None:
    """Two operator replicas (the default) behind the SIMULATED Service share the members:
    `up` names them, `status` shows each one ready, its shards, and one leader."""
    assert "3 members, 2 operator replica(s)" in up
    assert "gtvp-operator local-0 (process operator-0" in up
    assert "gtvp-operator local-1 (process operator-1" in up
    assert "SIMULATION: a Service (gtvp_local.frontend)" in up
    status = _gtvp(state, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "operator replicas (Leases in gtvp-system, 64 shards):" in status.stdout
    rows = [ln for ln in status.stdout.splitlines() if ln.startswith("  local-")]
    assert len(rows) == 2, status.stdout
    assert all(" ready " in row and "NOT" not in row for row in rows), status.stdout
    written = sum(int(row.split("writes for ")[1].split()[0]) for row in rows)
    assert written == 3, status.stdout  # each member has exactly one writer
    assert sum("leader" in row for row in rows) == 1, status.stdout
    assert "webhook-frontend" in status.stdout


@pytest.mark.tpm
@pytest.mark.e2e
def test_main_job_places_a_vm_and_a_tampered_member_is_quarantined(
    pool: tuple[Path, list[str]],
) -> None:
    """The README's main job: a pool whose members turn Trusted, a gated VM and the sample
    Lazy Box placed (the box on the member that caches its components), and
    `gtvp local tamper` quarantining the box's member and moving the box."""
    state, ports = pool
    up = _gtvp(state, "up", "--members", "3", *ports)
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr
    assert "Members: 3 of 3 trusted" in up.stdout
    assert "SIMULATION: kwok" in up.stdout
    assert "SIMULATION: a stand-in for KubeVirt's virt-controller" in up.stdout
    assert "SIMULATION of virt-handler/virt-launcher (gtvp_local.vmruntime)" in up.stdout
    newest = _sample_components()
    built = [ln for ln in up.stdout.splitlines() if ln.endswith("as the sample pins it")]
    for comp in newest:  # built here, reproducibly, with the digests the samples pin
        assert any(ln.startswith(f"  {comp} (") for ln in built), up.stdout[:3000]
    warm = [c for c in newest if not c.startswith("hello-web")]
    assert f"node-2's component cache already holds {', '.join(warm)}" in up.stdout
    vm_host = up.stdout.split("gtvp-demo/demo-web runs on ")[1].split()[0]
    assert vm_host in {"node-1", "node-2"}  # level 3: never node-3 (identity 2)
    assert "(a real VM: qemu booted" in up.stdout
    assert "resolved and verified" in up.stdout
    assert ", ".join(newest) in up.stdout
    assert "placed on node-2: Trusted at level 3" in up.stdout
    # the guest booted from the components and says so on its console, verifying each disk
    assert "| gtvp-init: verified and mounted busybox-base" in up.stdout
    assert "| GTVP-READY web" in up.stdout
    # gtvp verified a quote of the box's own vTPM (its disks measured into PCR 13)
    assert "gtvp verified a fresh quote of its vTPM on node-2" in up.stdout
    page = up.stdout.split("(from this host): ")[1].splitlines()[0]
    assert f"gtvp Lazy Box web hello-web {newest[-1].split()[1]}" in page
    assert "gtvp local tamper node-2" in up.stdout
    _assert_two_replicas(state, up.stdout)
    host = "node-2"
    tamper = _gtvp(state, "tamper")  # as `make demo` runs it: the member running the box
    assert tamper.returncode == 0, tamper.stdout[-2000:] + tamper.stderr
    assert f"tampering with {host} (it runs the sample Lazy Box)" in tamper.stdout
    assert f"{host} Untrusted: PcrMismatch: PCR 7" in tamper.stdout
    assert "tainted gtvp.io/untrusted:NoSchedule" in tamper.stdout
    assert "Members: 2 of 3 trusted" in tamper.stdout
    assert "Lazy Box gtvp-samples/web live-migrated to node-" in tamper.stdout
    assert "a real qemu live migration between the members" in tamper.stdout
    assert "[SIMULATED virt-handler] migration of gtvp-samples/web to node-" in tamper.stdout
    assert "the guest did not reboot: its uptime went on from" in tamper.stdout
    assert "its page answers at http://10.77.0." in tamper.stdout
    assert "gtvp verified a fresh quote of its vTPM on node-" in tamper.stdout  # on its target
    assert "Lazy Boxes:" in tamper.stdout
    if vm_host == host:
        assert "evacuation started" in tamper.stdout
        assert "demo-web now runs on node-1" in tamper.stdout
    status = subprocess.run(
        [sys.executable, "-m", "gtvp.cli", "status", "--kubeconfig", str(state / "kubeconfig")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert status.returncode == 0
    assert f"! {host}: PCR 7" in status.stdout
    members_net = json.loads((state / "pool" / "vmruntime" / "network.json").read_text())
    assert {"node-1", "node-2"} <= set(members_net)  # members that ran VMs have a namespace
    down = _gtvp(state, "down")
    assert "agent-node-1" in down.stdout
    assert "swtpm-node-1" in down.stdout
    # the VMs, the members' network namespaces and their links go with the pool
    ip = ["ip", "-o", "link", "show"], ["ip", "netns", "list"]
    links, spaces = (
        subprocess.run(c, capture_output=True, text=True, check=True).stdout for c in ip
    )
    for member, octet in members_net.items():
        assert f"gtvpvm-{member} " not in spaces + " "
        assert f"gtvpvm-h{octet}@" not in links
    assert not [p for p in ProcessTable(state / "pool" / "vmruntime").all() if p.alive()]


def test_replica_report_names_holders_shards_and_leader() -> None:
    """What `gtvp local status` prints about the replicas, from a fixed set of Leases."""
    now = 1_000_000.0
    stamp = datetime.fromtimestamp(now - 1, UTC).isoformat()

    def lease(name: str, holder: str, kind: str) -> dict[str, object]:
        return {
            "metadata": {"name": name, "labels": {"gtvp.io/lease": kind}},
            "spec": {"holderIdentity": holder, "renewTime": stamp, "leaseDurationSeconds": 6},
        }

    leases = [lease("gtvp-replica-a", "a", "replica"), lease("gtvp-replica-b", "b", "replica")]
    leases += [lease(f"gtvp-shard-{n:02d}", "a" if n < 3 else "b", "shard") for n in range(4)]
    leases += [lease("gtvp-shard-04", "gone", "shard"), lease("gtvp-leader", "b", "leader")]
    table = replicas.LeaseTable(leases, now=now)
    assert table.shard_holders(shards=5) == {0: "a", 1: "a", 2: "a", 3: "b", 4: None}
    assert table.shard_holders(shards=5, live_only=False)[4] == "gone"
    members = [f"m{i}" for i in range(20)]
    lines = replicas.report(
        table,
        [
            replicas.Replica(0, "a", "operator-0", 1, 2),
            replicas.Replica(1, "b", "operator-1", 3, 4),
        ],
        running={"a": True, "b": True},
        ready={"a": True, "b": False},
        members=members,
        shards=5,
    )
    text = "\n".join(lines)
    assert "a            operator-0   ready        3 shards" in text
    assert "shards 0-2" in text
    assert "NOT ready    1 shards" in text
    assert "leader" in lines[2]
    assert "leader" not in lines[1]
    counts = [int(ln.split("writes for ")[1].split()[0]) for ln in lines[1:3]]
    unheld = int(text.split("no writer: 1 shard(s) (4), ")[1].split()[0])
    assert sum(counts) + unheld == 20
    assert replicas.shard_ranges([9, 0, 1, 2, 5, 7, 8]) == "0-2,5,7-9"


def _printed_gtvp(up: str) -> str:
    """The gtvp command `gtvp local up` told the user to run (`Stop it: <gtvp> local down`)."""
    line = next(ln for ln in up.splitlines() if ln.startswith("Stop it: "))
    return line.removeprefix("Stop it: ").removesuffix(" local down")


def test_the_commands_up_prints_work_as_printed(pool: tuple[Path, list[str]]) -> None:
    state, ports = pool
    env = dict(os.environ, GTVP_LOCAL_STATE=str(state))
    env["PATH"] = ":".join(  # the user's shell: gtvp's virtualenv is on no PATH
        d for d in env.get("PATH", "").split(":") if Path(sys.executable).parent != Path(d)
    )
    up = _gtvp(state, "up", "--no-samples", "--members", "0", *ports)
    assert up.returncode == 0, up.stderr
    gtvp = _printed_gtvp(up.stdout)
    status = subprocess.run(  # noqa: S602 - as the user's shell runs what was printed
        f"{gtvp} local status", shell=True, env=env, capture_output=True, text=True, check=False
    )
    assert status.returncode == 0, status.stdout + status.stderr
    assert ": ready" in status.stdout


def test_up_on_a_running_pool_says_so_and_starts_nothing(pool: tuple[Path, list[str]]) -> None:
    state, ports = pool
    assert _gtvp(state, "up", "--no-samples", "--members", "0", *ports).returncode == 0
    pids = {t.name: t.pid for t in ProcessTable(state).all()}
    again = _gtvp(state, "up", "--no-samples", "--members", "0", *ports)
    assert again.returncode == 2
    assert "the local pool already runs (" in again.stderr
    assert "`gtvp local down` stops it" in again.stderr
    assert {t.name: t.pid for t in ProcessTable(state).all()} == pids  # untouched
    assert all(t.alive() for t in ProcessTable(state).all())


def test_status_fails_when_a_process_is_down(pool: tuple[Path, list[str]]) -> None:
    state, ports = pool
    assert _gtvp(state, "up", "--no-samples", "--members", "0", *ports).returncode == 0
    died = ProcessTable(state / "pool").start("virtsim", ["true"])  # a pool process that died
    wait_for("the process to end", lambda: not died.alive(), 10)
    status = _gtvp(state, "status")
    assert status.returncode == 1, status.stdout
    assert "virtsim          pid" in status.stdout
    assert "not running: virtsim" in status.stdout
    with contextlib.suppress(ChildProcessError):
        os.waitpid(died.pid, 0)


def test_down_stops_strays(pool: tuple[Path, list[str]]) -> None:
    state, ports = pool
    assert _gtvp(state, "up", "--no-samples", "--members", "0", *ports).returncode == 0
    pool_procs = ProcessTable(state / "pool")
    stray = pool_procs.start("kwok", ["sleep", "600"])  # a pool process whose pid file ...
    (pool_procs.dir / "kwok.pid").unlink()  # ... a second `up` overwrote, say
    try:
        down = _gtvp(state, "down")
        assert down.returncode == 0
        assert f"sleep (stray, pid {stray.pid})" in down.stdout
        assert "kube-apiserver" in down.stdout
        assert not stray.alive()
    finally:
        if stray.alive():  # not stopped: do not leave it behind
            os.kill(stray.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(stray.pid, 0)
