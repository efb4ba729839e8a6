"""Lazy Boxes end to end: resolved, verified, composed, placed, upgraded, moved, deleted.

Real: kube-apiserver + etcd, KubeVirt's CRDs, one gtvp-agent per member on its own swtpm,
gtvp-operator, kubectl. Simulated (no kubelet or KubeVirt here): Nodes by kwok with their
image cache written into `status.images` as a kubelet would report it, and KubeVirt's
virt-controller by gtvp's stand-in (`gtvp_local.virtsim`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gtvp_local.controlplane import ControlPlane
from gtvp_local.pool import Pool
from tests.catalogue import Publisher
from tests.pools import no_quote_for, trusted_pool
from tests.pools import wait_for as _wait

pytestmark = [pytest.mark.e2e, pytest.mark.controlplane, pytest.mark.tpm]
PUB = Publisher()


def _clear_components(cp: ControlPlane) -> None:
    cp.kubectl("delete", "oscomponents", "--all", "--wait=false", check=False)


@contextlib.contextmanager
def box_pool(cp: ControlPlane, directory: Path, *, tag: str) -> Iterator[Pool]:
    """Members a, b (level 3) and c (level 1) with the signed sample catalogue published."""
    _clear_components(cp)
    policy = {"interval": "2s", "valid_for": "6s", "max_uses": 50, "publisher_keys": PUB.keys}
    try:
        with trusted_pool(
            cp,
            directory,
            tag=tag,
            identities={"a": 3, "b": 3, "c": 1},
            policy=policy,
            before_start=lambda p: apply(p, PUB.web_catalogue()),
        ) as p:
            yield p
    finally:
        _clear_components(cp)


@pytest.fixture(scope="module")
def pool(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with box_pool(control_plane, tmp_path_factory.mktemp("boxes"), tag="lbox") as p:
        yield p


def apply(pool: Pool, objs: list[dict[str, Any]]) -> None:
    pool.cp.kubectl(
        "apply",
        "-f",
        "-",
        input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}),
    )


def names(pool: Pool) -> list[str]:
    return sorted(pool.tpms)


def box(
    name: str, app: str = "nginx", level: int = 2, cpu: str = "1", **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "gtvp.io/v1alpha1",
        "kind": "LazyBox",
        "metadata": {"name": name},
        "spec": {
            "application": {"name": app},
            "dependencies": [{"name": "debian-minimal"}],
            "level": level,
            "resources": {"cpu": cpu, "memory": "512Mi"},
            **spec,
        },
    }


def get(pool: Pool, kind: str, ns: str, name: str) -> dict[str, Any]:
    out = pool.cp.kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def status(pool: Pool, ns: str, name: str) -> dict[str, Any]:
    got: dict[str, Any] = get(pool, "lazybox", ns, name).get("status") or {}
    return got


def running(pool: Pool, ns: str, name: str) -> dict[str, Any] | None:
    st = status(pool, ns, name)
    vmi = get(pool, "vmi", ns, name)
    if st.get("phase") == "Running" and (vmi.get("status") or {}).get("phase") == "Running":
        return st
    return None


def digests_of(*labels: str) -> list[str]:
    out = []
    for obj in PUB.web_catalogue():
        spec = obj["spec"]
        if f"{spec['componentName']} {spec['version']}" in labels:
            out.append(spec["image"])
    return out


def ordinary_vm(name: str, node: str, requests: dict[str, str]) -> dict[str, Any]:
    """A VM that is no Lazy Box and not gated, pinned to `node`."""
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {
            "runStrategy": "Always",
            "template": {
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": node},
                    "domain": {"devices": {}, "resources": {"requests": requests}},
                },
            },
        },
    }


def test_box_lands_on_a_trusted_member_that_caches_it(pool: Pool, namespace: str) -> None:
    a, b, c = names(pool)
    warm = digests_of("debian-minimal 12.7.0", "nginx 1.26.2", "linux 6.6.52")
    pool.set_node_images(b, warm)
    pool.set_node_images(c, warm + digests_of("glibc 2.36.0"))  # warmer, but only level 1
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(box("web")))
    st = _wait("the box to run", lambda: running(pool, namespace, "web"))
    assert st["node"] == b
    assert get(pool, "vmi", namespace, "web")["status"]["nodeName"] == b
    assert st["placement"]["cachedBytes"] == 95_000_000 + 3_700_000 + 15_500_000
    assert f"{b}: Trusted at level 3" in st["placement"]["reason"]
    assert [r["name"] for r in st["resolved"]] == [
        "linux",
        "debian-minimal",
        "glibc",
        "openssl",
        "nginx",
    ]
    vm = get(pool, "vm", namespace, "web")
    assert vm["metadata"]["ownerReferences"][0]["kind"] == "LazyBox"
    assert vm["spec"]["template"]["spec"]["evictionStrategy"] == "External"
    events = pool.cp.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    assert "Placed" in events
    # the printer columns say where it runs
    table = pool.cp.kubectl("get", "lazybox", "web", "-n", namespace).stdout
    assert "Running" in table
    assert b in table
    # deleting the box removes its VM (and so its VMI), and nothing else
    pool.cp.kubectl("delete", "lazybox", "web", "-n", namespace)
    _wait("the VM to go", lambda: not get(pool, "vm", namespace, "web"))
    _wait("the VMI to go", lambda: not get(pool, "vmi", namespace, "web"))
    assert "nginx-1-26-2" in pool.cp.kubectl("get", "oscomponents", "-o", "name").stdout
    assert a  # the cold member stays a candidate for the next tests


def test_box_counts_the_other_vms_on_a_member(pool: Pool, namespace: str) -> None:
    """A warm member whose memory is taken by a VM that is no box is not chosen."""
    a, b, _c = names(pool)
    hog = ordinary_vm("hog", b, {"cpu": "2", "memory": "65300Mi"})
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(hog))
    _wait(
        "the hog to run on the warm member",
        lambda: (get(pool, "vmi", namespace, "hog").get("status") or {}).get("nodeName") == b,
    )
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(box("web2")))
    st = _wait("the box to run", lambda: running(pool, namespace, "web2"))
    assert st["node"] == a  # b caches the box's components but has no memory left
    pool.cp.kubectl("delete", "vm", "hog", "-n", namespace)


def test_box_waits_until_a_member_qualifies(pool: Pool, namespace: str) -> None:
    big = box("big", cpu="24")  # no member has 24 CPUs yet
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(big))
    st = _wait(
        "Pending", lambda: (s := status(pool, namespace, "big")).get("phase") == "Pending" and s
    )
    assert "without room for 24000m CPU" in st["message"]
    assert "below level 2" in st["message"]
    assert not get(pool, "vm", namespace, "big")
    newcomer = f"{names(pool)[0]}-new"
    pool.add_member(newcomer, identity=3, node=True)
    pool.patch_node_status(
        newcomer, {"allocatable": {"cpu": "32", "memory": "64Gi", "pods": "110"}}
    )
    st = _wait("placement on the new member", lambda: running(pool, namespace, "big"), timeout=60)
    assert st["node"] == newcomer


def test_component_bump_upgrades_the_box(pool: Pool, namespace: str) -> None:
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(box("up")))
    _wait("the box to run", lambda: running(pool, namespace, "up"))
    vmi_uid = get(pool, "vmi", namespace, "up")["metadata"]["uid"]
    bump = PUB.component(
        "nginx", "1.27.0", "application", requires=["openssl>=3.3", "libc"], max_uses=1
    )
    apply(pool, [bump])

    def upgraded() -> dict[str, Any] | None:
        st = running(pool, namespace, "up")
        if st and "nginx 1.27.0" in (st.get("upgrade") or {}).get("to", ""):
            vmi = get(pool, "vmi", namespace, "up")
            return st if vmi["metadata"]["uid"] != vmi_uid else None
        return None

    st = _wait("the upgrade", upgraded, timeout=60)
    assert "nginx 1.26.2" in st["upgrade"]["from"]
    vm = get(pool, "vm", namespace, "up")
    images = json.dumps(vm["spec"]["template"]["spec"]["volumes"])
    assert bump["spec"]["image"] in images
    # maxUses 1: the upgrade spent the component's only use; the next box re-verifies it
    comp = lambda: get(pool, "osc", "", "nginx-1-27-0")["status"]["verification"]  # noqa: E731
    first = _wait("the use to be spent", lambda: (v := comp()).get("usesLeft") == 0 and v)
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(box("up2")))
    _wait("the second box to run", lambda: running(pool, namespace, "up2"))
    again = comp()
    assert again["verifiedAt"] >= first["verifiedAt"]
    assert again["usesLeft"] == 0
    assert again["state"] == "Verified"


def test_component_asked_for_at_run_time_is_recomposed(pool: Pool, namespace: str) -> None:
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(box("ask")))
    _wait("the box to run", lambda: running(pool, namespace, "ask"))
    vmi_uid = get(pool, "vmi", namespace, "ask")["metadata"]["uid"]
    apply(pool, [PUB.component("curl", "8.0.0", requires=["libc"])])
    patch = {"spec": {"requestedComponents": [{"name": "curl"}]}}
    pool.cp.kubectl(
        "patch", "lazybox", "ask", "-n", namespace, "--type=merge", "-p", json.dumps(patch)
    )

    def recomposed() -> dict[str, Any] | None:
        st = running(pool, namespace, "ask")
        names = [r["name"] for r in (st or {}).get("resolved") or []]
        vmi = get(pool, "vmi", namespace, "ask")
        return st if "curl" in names and vmi["metadata"]["uid"] != vmi_uid else None

    st = _wait("the box to be recomposed with curl and restarted", recomposed, timeout=60)
    assert "curl 8.0.0" in st["upgrade"]["to"]
    vm = get(pool, "vm", namespace, "ask")
    assert "curl" in json.dumps(vm["spec"]["template"]["spec"]["volumes"])


def test_tampered_component_blocks_the_box(pool: Pool, namespace: str) -> None:
    obj = PUB.component("editor", "1.0.0", "application", requires=["libc"])
    obj["spec"]["image"] = obj["spec"]["image"].replace("/editor@", "/evil-editor@")
    apply(pool, [obj])
    pool.cp.kubectl(
        "apply", "-n", namespace, "-f", "-", input_text=json.dumps(box("ed", app="editor"))
    )
    st = _wait(
        "Failed", lambda: (s := status(pool, namespace, "ed")).get("phase") == "Failed" and s
    )
    assert "editor 1.0.0" in st["message"]
    assert "BadSignature" in st["message"]
    assert "never used" in st["message"]
    ver = get(pool, "osc", "", "editor-1-0-0")["status"]["verification"]
    assert ver["state"] == "Failed"
    assert ver["reason"] == "BadSignature"
    assert not get(pool, "vm", namespace, "ed")


def test_box_leaves_a_member_that_stays_overloaded(pool: Pool, namespace: str) -> None:
    policy: dict[str, Any] = {
        "interval": "2s",
        "valid_for": "6s",
        "max_uses": 50,
        "publisher_keys": PUB.keys,
    }
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(box("calm")))
    source = _wait("the box to run", lambda: running(pool, namespace, "calm"))["node"]
    # an ordinary VM takes the member to 84.2 % of its memory (53.5 GiB and KubeVirt's
    # overhead for its pod, 375 MiB); with the box (512 MiB and 269 MiB) it is at 85.4 %
    crowd = ordinary_vm("crowd", source, {"memory": "53.5Gi"})
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(crowd))
    _wait(
        "the crowd to run next to the box",
        lambda: (
            (get(pool, "vmi", namespace, "crowd").get("status") or {}).get("nodeName") == source
        ),
    )
    try:
        pool.apply_policy(
            **policy, balancing={"enabled": True, "sustainFor": "2s", "cooldown": "10m"}
        )

        def moved() -> dict[str, Any] | None:
            s = running(pool, namespace, "calm")
            return s if s and s.get("node") != source else None

        target = _wait("the balancer to move the box", moved, timeout=60)["node"]
        events = pool.cp.kubectl(
            "get", "events", "-n", namespace, "--field-selector", "reason=Balancing", "-o", "json"
        ).stdout
        message = json.loads(events)["items"][0]["message"]
        assert f"moving to {target}: {source} at 85.4% (> 85 %" in message
        migrations = pool.cp.kubectl(
            "get", "vmim", "-n", namespace, "-l", f"gtvp.io/balancing={source}", "-o", "name"
        ).stdout.split()
        assert len(migrations) == 1
        # the source is relieved (84.2 %): nothing else moves, and the box stays put
        time.sleep(6)
        assert status(pool, namespace, "calm")["node"] == target
        again = pool.cp.kubectl("get", "vmim", "-n", namespace, "-o", "name").stdout.split()
        assert again == migrations
    finally:
        pool.apply_policy(**policy)
        pool.cp.kubectl("delete", "vm", "crowd", "-n", namespace, "--ignore-not-found")


def test_box_leaves_a_member_that_loses_trust(pool: Pool, namespace: str) -> None:
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(box("mover")))
    st = _wait("the box to run", lambda: running(pool, namespace, "mover"))
    source = st["node"]
    pool.extend_pcr(source, 7, b"e2e tamper")
    pool.wait_phase(source, "Untrusted", timeout=30)

    def moved() -> dict[str, Any] | None:
        s = running(pool, namespace, "mover")
        return s if s and s.get("node") != source else None

    st = _wait("the box to move", moved, timeout=60)
    # to any other member trusted at the box's level (which one depends on what it caches
    # and on the members earlier tests added)
    target = json.loads(pool.cp.kubectl("get", "member", st["node"], "-o", "json").stdout)
    assert target["status"]["phase"] == "Trusted"
    assert target["status"]["level"] >= box("mover")["spec"]["level"]


def test_box_is_stopped_when_its_member_is_lost_under_policy_stop(
    pool: Pool, namespace: str
) -> None:
    pool.apply_policy(
        interval="2s",
        valid_for="6s",
        max_uses=50,
        publisher_keys=PUB.keys,
        on_untrusted={1: "Stop", 2: "Stop", 3: "Stop"},
    )
    pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(box("stopper")))
    st = _wait("the box to run", lambda: running(pool, namespace, "stopper"))
    host = st["node"]
    pool.extend_pcr(host, 7, b"e2e tamper, policy Stop")
    pool.wait_phase(host, "Untrusted", timeout=30)
    vm = _wait(
        "the VM to be halted",
        lambda: (
            (v := get(pool, "vm", namespace, "stopper"))["spec"].get("runStrategy") == "Halted"
            and v
        ),
    )
    assert "running" not in vm["spec"]  # KubeVirt refuses running next to runStrategy
    _wait("the VMI to go", lambda: not get(pool, "vmi", namespace, "stopper"))
    st = _wait(
        "the box to say it is stopped",
        lambda: (s := status(pool, namespace, "stopper")).get("phase") == "Pending" and s,
    )
    assert "stopped" in st["message"]


def test_placing_and_starting_a_box_each_spend_a_use(pool: Pool, namespace: str) -> None:
    """Placement and the VMI's start are two decisions resting on the host's verdict."""
    base = {"interval": "2s", "valid_for": "6s", "max_uses": 50, "publisher_keys": PUB.keys}
    pool.apply_policy(**{**base, "interval": "60s", "valid_for": "180s", "max_uses": 10})
    try:

        def trusted_at_10() -> bool:  # earlier tests may have left a member tampered
            # quoted under the new policy: the edit alone brings usesLeft down to 10 at once,
            # but a nonce asked under the old 2 s interval would set it to 10 again mid-count
            statuses = [pool.member(n)["status"] for n in names(pool)]
            trusted = [st for st in statuses if st.get("phase") == "Trusted"]
            return bool(trusted) and all(
                st["trust"].get("usesLeft") == 10 and no_quote_for(st, 30) for st in trusted
            )

        _wait("uses at 10", trusted_at_10, timeout=20)
        pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(box("spend")))
        host = _wait("the box to run", lambda: running(pool, namespace, "spend"))["node"]
        _wait(
            "two uses spent",
            lambda: pool.member(host)["status"]["trust"]["usesLeft"] == 8,
            timeout=10,
        )
    finally:
        pool.apply_policy(**base)
