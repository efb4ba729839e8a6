"""Key release on the local pool, end to end: the guest's own fetch script gets the Secret.

Real: kube-apiserver + etcd, a gtvp-agent on its own swtpm, gtvp-operator serving key release
on its own HTTPS port (`--key-release-port`, a certificate from the pool's CA), curl.
Simulated (no kubelet or KubeVirt here): Nodes by kwok, virt-controller by gtvp's stand-in,
and THE GUEST: the pool's VMs here only move through their phases, so the guest's side is
the box's cloud-init files (taken from its cloud-init Secret as cloud-init writes them) and
the documented fetch script, run with curl from its host's network namespace (the member's
`gtvpvm-<member>` namespace when the pool runs real VMs; here the member is a process of this
machine, so its network namespace is the root one).
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gtvp.core import compose
from gtvp.core import keyrelease as kr
from gtvp_local.controlplane import ControlPlane
from gtvp_local.pool import Pool
from tests.catalogue import Publisher
from tests.pools import trusted_pool
from tests.pools import wait_for as _wait

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.controlplane,
    pytest.mark.tpm,
    pytest.mark.skipif(shutil.which("curl") is None, reason="the guest's script needs curl"),
]
PUB = Publisher()
NAMESPACE = "default"  # the namespace the local pool opts in to key release
DISK_KEY = "correct horse battery staple"


@pytest.fixture(scope="module")
def pool(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    # validFor - interval (13 s) outlasts a shard handover (lease 4 s + 2 retries + a quote):
    # a replica killed and restarted here never lets the member's verdict lapse
    # (gtvp_local.replicas.LeaseTimings)
    policy = {"interval": "2s", "valid_for": "15s", "max_uses": 50, "publisher_keys": PUB.keys}
    control_plane.kubectl("delete", "oscomponents", "--all", "--wait=false", check=False)
    with trusted_pool(
        control_plane,
        tmp_path_factory.mktemp("krpool"),
        tag="krpool",
        identities={"a": 3},
        policy=policy,
        replicas=2,  # the boxes' cloud-init names the Service in front of both
        before_start=lambda p: _apply(p, PUB.web_catalogue()),
    ) as p:
        yield p
    control_plane.kubectl("delete", "oscomponents", "--all", "--wait=false", check=False)


def _apply(pool: Pool, objs: list[dict[str, Any]]) -> None:
    body = json.dumps({"apiVersion": "v1", "kind": "List", "items": objs})
    pool.cp.kubectl("apply", "-n", NAMESPACE, "-f", "-", input_text=body)


def _get(pool: Pool, kind: str, name: str) -> dict[str, Any]:
    out = pool.cp.kubectl("get", kind, name, "-n", NAMESPACE, "-o", "json", check=False)
    got: dict[str, Any] = json.loads(out.stdout) if out.returncode == 0 else {}
    return got


def _running_on(pool: Pool, box: str) -> str | None:
    """The member the box's VMI runs on, once box and VMI are Running."""
    st = _get(pool, "lazybox", box).get("status") or {}
    vmi = (_get(pool, "vmi", box).get("status")) or {}
    if st.get("phase") == "Running" and vmi.get("phase") == "Running":
        return str(vmi.get("nodeName") or "") or None
    return None


@contextlib.contextmanager
def _box_with_secret(pool: Pool) -> Iterator[str]:
    """A box in `default` naming one key of a Secret that consents to it; both removed."""
    box = f"kr-{uuid.uuid4().hex[:6]}"
    secret = f"{box}-disk"
    _apply(
        pool,
        [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": secret,
                    "annotations": {
                        kr.RELEASE_TO_ANNOTATION: box,
                        kr.MIN_LEVEL_ANNOTATION: "2",
                    },
                },
                "stringData": {"key": DISK_KEY, "other": "not named by the box"},
            },
            {
                "apiVersion": "gtvp.io/v1alpha1",
                "kind": "LazyBox",
                "metadata": {"name": box},
                "spec": {
                    "application": {"name": "nginx"},
                    "dependencies": [{"name": "debian-minimal"}],
                    "level": 2,
                    "resources": {"cpu": "1", "memory": "512Mi"},
                    "secrets": [{"name": secret, "keys": ["key"]}],
                },
            },
        ],
    )
    try:
        yield box
    finally:
        pool.cp.kubectl("delete", "lazybox", box, "-n", NAMESPACE, "--wait=false", check=False)
        pool.cp.kubectl("delete", "secret", secret, "-n", NAMESPACE, "--wait=false", check=False)


def _cloud_init_hands_over(pool: Pool, box: str, guest: Path) -> dict[str, Any]:
    """THE GUEST (simulated): what cloud-init writes from the box's NoCloud Secret, the
    key-release files of its cloud-config in `guest` with their modes; the cloud-config."""
    secret = _get(pool, "secret", kr.cloud_init_secret(box))
    doc: dict[str, Any] = yaml.safe_load(base64.b64decode(secret["data"][kr.USER_DATA_KEY]))
    guest.mkdir(parents=True)
    for f in doc["write_files"]:
        if not str(f["path"]).startswith(f"{compose.KEY_RELEASE_DIR}/"):
            continue
        path = guest / Path(f["path"]).name
        path.write_text(str(f["content"]))
        path.chmod(int(str(f["permissions"]), 8) | 0o200)  # the test may clean it up
    return doc


def _guests_fetch(pool: Pool, member: str, guest: Path) -> subprocess.CompletedProcess[str]:
    """Run the box's documented fetch script (its cloud-config's own `fetch` file), with
    curl, from the network namespace of the member the box's VM runs on."""
    netns: list[str] = []
    if pool.vms == "qemu":
        from gtvp_local.vmruntime import network

        net = network.member_net(pool.dir, member)
        assert net is not None, f"member {member} has no network namespace"
        netns = ["ip", "netns", "exec", net.netns]
    return subprocess.run(
        [*netns, "/bin/sh", str(guest / "fetch")],
        # asking again after a lost answer: 3 times, 1 s apart (the test's own waits retry)
        env={
            "PATH": "/usr/bin:/bin",
            "GTVP_KEY_RELEASE_DIR": str(guest),
            "GTVP_LOST_WAITS": "3",
            "GTVP_ATTEST_PAUSE": "1",
        },
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def _reason(path: Path) -> str | None:
    """The refusal reason in an answer the script kept (None: no refusal there)."""
    if not path.exists():
        return None
    with contextlib.suppress(ValueError):
        reason = json.loads(path.read_text()).get("reason")
        return str(reason) if reason else None
    return None


@pytest.mark.timeout(300)
def test_the_box_still_gets_its_secret_when_the_replica_that_composed_it_died(
    pool: Pool, tmp_path: Path
) -> None:
    """Its cloud-init names the SIMULATED Service in front of every replica's key-release
    port, not the port of the replica that composed it (which is then killed)."""
    direct = {f"https://{pool.key_release_address}:{r.key_release_port}" for r in pool.replicas}
    assert len(direct) == 2
    assert pool.key_release_url() not in direct
    with _box_with_secret(pool) as box:
        host = _wait("the box to run", lambda: _running_on(pool, box), timeout=90)
        _cloud_init_hands_over(pool, box, tmp_path / "boot")
        env = (tmp_path / "boot" / "env").read_text()
        assert f"GTVP_KEY_RELEASE_URL='{pool.key_release_url()}'" in env, env
        composer = pool.leader()  # the box loop runs on the leader only
        assert composer is not None
        index = pool.replica_index(composer)
        pool.kill_replica(index)
        try:
            # the survivor answers (once it holds the member's shard, its verdict is fresh)
            _wait(
                "the guest's fetch through the Service",
                lambda: _guests_fetch(pool, host, tmp_path / "boot").returncode == 0,
                timeout=60,
                every=1.0,
            )
            released = json.loads((tmp_path / "boot" / "secrets.json").read_text())
            assert released["secrets"] == {
                f"{box}-disk": {"key": base64.b64encode(DISK_KEY.encode()).decode()}
            }
        finally:
            pool.start_replica(index)


@pytest.mark.timeout(300)
def test_the_guests_script_gets_the_secret_once_and_a_tampered_host_gets_nothing(
    pool: Pool, tmp_path: Path
) -> None:
    (member,) = sorted(pool.tpms)
    assert pool.key_release_url().startswith("https://127.0.0.1:")  # served, TLS, own port
    tls = ssl.create_default_context(cafile=str(pool.key_release_ca))
    with pytest.raises(urllib.error.HTTPError) as not_here:  # metrics are not served there
        urllib.request.urlopen(f"{pool.key_release_url()}/metrics", context=tls, timeout=10)  # noqa: S310
    assert not_here.value.code == 404
    metrics = f"http://127.0.0.1:{pool.metrics_port}/metrics"  # and stay plain HTTP on loopback
    with urllib.request.urlopen(metrics, timeout=10) as r:
        assert b"gtvp_key_releases_total" in r.read()
    with _box_with_secret(pool) as box:
        host = _wait("the box to run", lambda: _running_on(pool, box), timeout=90)
        assert host == member

        # the guest's first boot: its credential, the pool's URL and CA, the documented script
        doc = _cloud_init_hands_over(pool, box, tmp_path / "boot1")
        assert doc["runcmd"][0] == ["/bin/sh", f"{compose.KEY_RELEASE_DIR}/fetch"]
        assert (tmp_path / "boot1" / "fetch").read_text() == compose.KEY_RELEASE_SCRIPT
        env = (tmp_path / "boot1" / "env").read_text()
        assert f"GTVP_KEY_RELEASE_URL='{pool.key_release_url()}'" in env, env
        assert (tmp_path / "boot1" / "ca.pem").read_text() == pool.key_release_ca.read_text()
        credential = (tmp_path / "boot1" / "credential").read_text()
        got = _guests_fetch(pool, host, tmp_path / "boot1")
        assert got.returncode == 0, got.stderr
        released = json.loads((tmp_path / "boot1" / "secrets.json").read_text())
        assert released["member"] == member
        assert released["secrets"] == {
            f"{box}-disk": {"key": base64.b64encode(DISK_KEY.encode()).decode()}
        }
        assert not (tmp_path / "boot1" / "credential").exists()  # used, then removed

        # a replay of that credential (a copy of the guest's cloud-init) is refused
        replay = tmp_path / "replay"
        shutil.copytree(tmp_path / "boot1", replay)
        (replay / "secrets.json").unlink()
        (replay / "credential").write_text(credential)
        got = _guests_fetch(pool, host, replay)
        assert got.returncode != 0
        assert _reason(replay / "where.json") == "CredentialUsed"
        assert not (replay / "secrets.json").exists()

        # the host is tampered with: the next boot's fresh credential gets nothing
        pool.procs.stop("virtsim")  # SIMULATED controller frozen: the VMI stays where it ran
        pool.extend_pcr(member, 7, b"rootkit")
        pool.wait_phase(member, "Untrusted", timeout=30)
        _cloud_init_hands_over(pool, box, tmp_path / "boot2")
        fresh = (tmp_path / "boot2" / "credential").read_text()
        assert fresh != credential  # the release armed the next boot's credential
        # root on the host reads it while the VMI that got the last release runs: refused
        # whatever the host (after an evacuation it would send the new member's token)
        _refused_with(pool, host, tmp_path / "boot2", "CredentialForNextBoot")
        # and the VM's next boot cannot come on that host: gtvp refuses its VMI there
        refused = _boot_again(pool, box)
        assert "no Trusted member of level >= 2 can take it now" in refused, refused


def _refused_with(pool: Pool, host: str, guest: Path, reason: str) -> None:
    """The guest's fetch refused for `reason`, nothing released."""
    got = _guests_fetch(pool, host, guest)
    assert got.returncode != 0
    answers = [guest / name for name in ("where.json", "secrets.json")]
    reasons = {_reason(p) for p in answers} - {None}
    assert reasons == {reason}, (reasons, got.stderr)
    for p in answers:
        assert DISK_KEY not in (p.read_text() if p.exists() else "")
        assert '"secrets"' not in (p.read_text() if p.exists() else "")


def _boot_again(pool: Pool, box: str) -> str:
    """SIMULATED: the box VM's next boot, done by hand as break-glass admin (the stand-in
    controller is stopped): its VMI deleted and created again; what the API server said."""
    vmi = _get(pool, "vmi", box)
    meta = vmi["metadata"]
    again = {
        "apiVersion": vmi["apiVersion"],
        "kind": vmi["kind"],
        "metadata": {k: meta[k] for k in ("name", "namespace", "labels") if k in meta},
        "spec": vmi["spec"],
    }
    pool.cp.kubectl("delete", "vmi", box, "-n", NAMESPACE, "--wait=true")
    made = pool.cp.kubectl("create", "-f", "-", input_text=json.dumps(again), check=False)
    assert made.returncode != 0, made.stdout
    return " ".join(made.stderr.split())
