"""Multi-source component transfer: a cold member takes a box's chunks from its peers.

A member fetching a component whose signed OSComponent carries a chunk digest list takes
the chunks in parallel from every Trusted member whose cache holds it (each serves its
cache read-only over HTTP on its own namespace address), checks each chunk against the
signed list before writing it, drops a lying peer at its first bad chunk and takes that
chunk elsewhere; an Untrusted member holding the component is never asked.

Real: kube-apiserver + etcd, gtvp-operator, a gtvp-agent per member on its own swtpm, the
box's components built here and signed with chunk lists, qemu in each member's network
namespace, HTTP between the namespaces (the bytes cross both members' veths). Simulated:
Nodes by kwok; KubeVirt and the kubelet by gtvp's stand-in (`gtvp_local.virtsim --vms
qemu`, `gtvp_local.vmruntime.cache`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gtvp.core.components import chunk_ranges
from gtvp_local.controlplane import ControlPlane
from gtvp_local.pool import Pool
from gtvp_local.vmruntime import cache
from gtvp_local.vmruntime.network import member_net
from tests.e2e.test_component_cache import _running
from tests.e2e.test_real_vms import (
    NS,
    UPGRADE,
    _apply_box,
    _get,
    _signed_catalogue,
    real_vm_pool,
)
from tests.pools import wait_for as _wait

pytestmark = [pytest.mark.e2e, pytest.mark.controlplane, pytest.mark.tpm]


@pytest.fixture(scope="module")
def catalogue() -> dict[str, dict[str, Any]]:
    return _signed_catalogue()


@pytest.fixture(scope="module")
def pool(
    control_plane: ControlPlane,
    tmp_path_factory: pytest.TempPathFactory,
    catalogue: dict[str, dict[str, Any]],
) -> Iterator[Pool]:
    """Five Trusted members of level 3 (two warm peers a and b, two cold members c and e,
    and d, made Untrusted once warm), every signed component but the upgrade applied."""
    identities = {"a": 3, "b": 3, "c": 3, "d": 3, "e": 3}
    directory = tmp_path_factory.mktemp("multisource")
    with real_vm_pool(control_plane, directory, "multisource", catalogue, identities) as p:
        yield p


def test_the_api_server_refuses_a_chunk_list_that_does_not_cut_the_artifact(
    control_plane: ControlPlane, catalogue: dict[str, dict[str, Any]]
) -> None:
    """The attacker's first: a chunk list whose count does not cut sizeBytes (a list
    shortened to skip the chunks a peer would be checked on) never enters the cluster."""
    kernel = next(d for d in catalogue.values() if d["spec"]["type"] == "kernel")
    doc = json.loads(json.dumps(kernel))
    doc["metadata"]["name"] = "multisource-short-chunk-list"
    doc["spec"]["chunks"]["digests"] = doc["spec"]["chunks"]["digests"][:-1]
    out = control_plane.kubectl("create", "-f", "-", input_text=json.dumps(doc), check=False)
    assert out.returncode != 0
    assert "chunks.digests must hold one digest per chunks.sizeBytes" in out.stderr
    doc["spec"]["chunks"]["digests"].append("md5:" + "0" * 32)
    out = control_plane.kubectl("create", "-f", "-", input_text=json.dumps(doc), check=False)
    assert out.returncode != 0
    assert "spec.chunks.digests[" in out.stderr
    control_plane.kubectl("delete", "osc", "multisource-short-chunk-list", check=False)


def _by_suffix(pool: Pool) -> dict[str, str]:
    return {m.rsplit("-", 1)[1]: m for m in pool.members()}


def _box_images(catalogue: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """image → signed spec of each component the box uses (kernel, base, library, application)."""
    return {doc["spec"]["image"]: doc["spec"] for key, doc in catalogue.items() if key != UPGRADE}


def _sent(pool: Pool, member: str) -> int:
    """Bytes the member has sent over its veth (rx of the host side)."""
    net = member_net(pool.dir, member)
    assert net is not None, member
    return net.link_bytes()[0]


def _cordon(pool: Pool, *members: str, on: bool = True) -> None:
    for m in members:
        pool.cp.kubectl("cordon" if on else "uncordon", m)


def _records(pool: Pool, member: str) -> dict[str, dict[str, Any]]:
    return {r["image"]: r for r in cache.fetch_log(pool.dir, member)}


@pytest.fixture(scope="module")
def warm(pool: Pool, catalogue: dict[str, dict[str, Any]]) -> dict[str, str]:
    """a, b and d hold the box's components (fetched from the mirror); then d is made
    Untrusted (a PCR extended) and keeps them."""
    m = _by_suffix(pool)
    images = [i for i in _box_images(catalogue) if "hello-web" not in i] + [
        i for i in _box_images(catalogue) if "hello-web" in i
    ]
    for peer in ("a", "b", "d"):
        assert pool.warm_cache(m[peer], images)
    pool.extend_pcr(m["d"], 7, b"rootkit")
    pool.wait_phase(m["d"], "Untrusted", reason="PcrMismatch", timeout=30)

    def d_dropped() -> bool:
        """The stand-in re-reads the Members each tick: until it has, d still serves (its
        chunks are checked all the same); the tests start once it no longer counts d."""
        lines = re.findall(
            r"\[SIMULATED peer mirror\] trusted peers now: (.*)",
            pool.procs.log_tail("virtsim", 200_000),
        )
        return bool(lines) and m["d"] not in lines[-1].split(", ")

    _wait("the stand-in to stop counting d as trusted", d_dropped, 60)
    return m


def _kernel(catalogue: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = next(s for s in _box_images(catalogue).values() if s["type"] == "kernel")
    return spec


def test_a_cold_member_fetches_the_chunks_from_both_trusted_peers_never_the_untrusted_one(
    pool: Pool, warm: dict[str, str], catalogue: dict[str, dict[str, Any]]
) -> None:
    m = warm
    _cordon(pool, m["a"], m["b"], m["e"])  # the box can only go to c (d is Untrusted)
    sent_before = {s: _sent(pool, m[s]) for s in ("a", "b", "d")}
    try:
        _apply_box(pool, "spread", serve=False)
        _running(pool, "spread")
        vmi = _get(pool, "vmi", "spread")
    finally:
        _cordon(pool, m["a"], m["b"], m["e"], on=False)
    assert vmi["status"]["nodeName"] == m["c"]
    specs = _box_images(catalogue)
    needed = cache.images_of(vmi["spec"])
    records = _records(pool, m["c"])
    assert set(needed) <= set(records)  # every component came in chunks
    kernel = records[_kernel(catalogue)["image"]]
    assert set(kernel["bytesBySource"]) == {m["a"], m["b"]}  # from both peers, not the mirror
    assert all(n > 0 for n in kernel["bytesBySource"].values())
    assert kernel["badChunks"] == []
    for image in needed:
        r, spec = records[image], specs[image]
        assert sum(r["bytesBySource"].values()) == r["sizeBytes"] == spec["sizeBytes"]
        assert set(r["bytesBySource"]) <= {m["a"], m["b"]}
        assert r["linkBytes"] >= r["sizeBytes"]  # the bytes crossed c's veth
        held = cache.member_dir(pool.dir, m["c"]) / cache.digest_hex(image)
        assert f"sha256:{cache.digest_hex(image)}" == spec["digest"]
        assert held.stat().st_size == spec["sizeBytes"]
    served = {s: _sent(pool, m[s]) - sent_before[s] for s in ("a", "b", "d")}
    for s in ("a", "b"):  # each peer's veth carried at least what it served
        assert served[s] >= sum(r["bytesBySource"].get(m[s], 0) for r in records.values())
    assert served["d"] < 64 << 10  # the Untrusted holder sent (next to) nothing
    assert all(m["d"] not in r["bytesBySource"] for r in records.values())
    assert "GTVP-READY spread" in pool.vm_console(NS, "spread")
    log = pool.procs.log_tail("virtsim", 200_000)
    assert re.search(
        rf"{m['c']} fetched {re.escape(kernel['image'])}: \d+ bytes in \S+ in chunks from", log
    )
    assert f"[SIMULATED peer mirror] {m['d']} refused" not in log  # never even asked


def test_a_lying_peer_is_caught_at_its_first_bad_chunk_and_the_box_still_boots(
    pool: Pool, warm: dict[str, str], catalogue: dict[str, dict[str, Any]]
) -> None:
    m = warm
    pool.cp.kubectl("delete", "lazybox", "spread", "-n", NS, "--wait=true", check=False)
    kernel = _kernel(catalogue)
    chunk_bytes = kernel["chunks"]["sizeBytes"]
    ranges = chunk_ranges(kernel["sizeBytes"], chunk_bytes)
    # a, b and c (which fetched it in the test before) hold it: b starts at its own stripe
    first = cache.Schedule(len(ranges), [m["a"], m["b"], m["c"]]).stripe_start(m["b"])
    assert first > 0
    blob: Path = cache.member_dir(pool.dir, m["b"]) / cache.digest_hex(kernel["image"])
    genuine = blob.read_bytes()
    lie = bytearray(genuine)
    lie[ranges[first][0] + 100] ^= 0xFF  # b's cache serves other bytes for one chunk
    blob.write_bytes(bytes(lie))
    _cordon(pool, m["a"], m["b"], m["c"])  # the box can only go to e
    try:
        _apply_box(pool, "lied", serve=False)
        _running(pool, "lied")
        vmi = _get(pool, "vmi", "lied")
    finally:
        _cordon(pool, m["a"], m["b"], m["c"], on=False)
        blob.write_bytes(genuine)
    assert vmi["status"]["nodeName"] == m["e"]
    r = _records(pool, m["e"])[kernel["image"]]
    assert r["badChunks"] == [{"source": m["b"], "chunk": first}]  # caught at that chunk
    assert m["b"] in r["dropped"]
    assert r["chunksBySource"].get(m["b"], 0) == 0  # nothing of b's was written
    assert set(r["bytesBySource"]) <= {m["a"], m["c"]}  # the chunk came from elsewhere
    assert sum(r["bytesBySource"].values()) == kernel["sizeBytes"]
    held = cache.member_dir(pool.dir, m["e"]) / cache.digest_hex(kernel["image"])
    assert held.read_bytes() == genuine
    log = pool.procs.log_tail("virtsim", 200_000)
    assert f"{m['e']} dropped {m['b']} for the rest of its fetch of {kernel['image']}" in log
    assert "GTVP-READY lied" in pool.vm_console(NS, "lied")
    pool.cp.kubectl("delete", "lazybox", "lied", "-n", NS, "--wait=false", check=False)


def test_an_untrusted_members_server_refuses_to_serve(
    pool: Pool, warm: dict[str, str], catalogue: dict[str, dict[str, Any]]
) -> None:
    """Asked anyway (from a member's namespace, as a peer would ask), the Untrusted
    member's server refuses: 403 and a log line, no bytes."""
    m = warm
    log = pool.procs.log_tail("virtsim", 200_000)
    serving = re.findall(
        rf"\[SIMULATED peer mirror\] {re.escape(m['d'])} serves its component cache on "
        r"(\S+):(\d+)",
        log,
    )
    assert serving, "the Untrusted member's cache has a peer server (that refuses)"
    host, port = serving[-1]
    image = _kernel(catalogue)["image"]
    net = member_net(pool.dir, m["c"])
    assert net is not None
    busybox = shutil.which("busybox")
    assert busybox is not None
    url = f"http://{host}:{port}{cache.URL_PREFIX}{urllib.parse.quote(image, safe='')}"
    out = subprocess.run(
        ["ip", "netns", "exec", net.netns, busybox, "wget", "-q", "-O", "-", url],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert out.returncode != 0
    assert b"403" in out.stderr
    assert out.stdout == b""
    refused = f"[SIMULATED peer mirror] {m['d']} refused"
    _wait("the refusal logged", lambda: refused in pool.procs.log_tail("virtsim", 200_000), 10)
