"""Signed chunk digest lists and the multi-source schedule (pure parts).

An OSComponent's `spec.chunks` is part of what its publisher signs; a member fetching the
component from several peers checks each chunk against it, drops a peer at its first bad
chunk and takes that chunk from another source (docs/lazyboxes.md, "Multi-source
transfer")."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import pytest

from gtvp.core import component_signing
from gtvp.core.component_signing import ComponentSignatureError, canonical_bytes
from gtvp.core.components import (
    MAX_CHUNKS,
    ComponentError,
    chunk_digests,
    chunk_ranges,
    parse_chunks,
    parse_component,
)
from gtvp_local.virtsim import chunk_plans, trusted_members
from gtvp_local.vmruntime import cache
from tests.catalogue import Publisher

KIB = 1 << 10
CHUNK = 64 * KIB
# five full chunks (each different) and four bytes
DATA = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(CHUNK * 5 // 32))
DATA += b"tail"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _chunked(pub: Publisher, data: bytes = DATA, **extra: Any) -> dict[str, Any]:
    obj = pub.component("app", "1.0.0", "application", size=len(data))
    spec = obj["spec"]
    spec.update(
        digest=_sha(data),
        image=f"registry.example.com/app@{_sha(data)}",
        chunks={"sizeBytes": CHUNK, "digests": chunk_digests([data], CHUNK)},
        **extra,
    )
    spec.pop("signature")
    spec["signature"] = component_signing.sign(spec, pub.private_pem, pub.name)
    return obj


# ----- the attacker's tests first ------------------------------------------------------------


def test_a_chunk_list_altered_after_signing_breaks_the_signature() -> None:
    pub = Publisher()
    obj = _chunked(pub)
    component_signing.verify(obj["spec"], pub.keys)
    forged = copy.deepcopy(obj)
    forged["spec"]["chunks"]["digests"][2] = _sha(b"a backdoored chunk")
    with pytest.raises(ComponentSignatureError) as exc:
        component_signing.verify(forged["spec"], pub.keys)
    assert exc.value.reason == "BadSignature"
    resized = copy.deepcopy(obj)
    resized["spec"]["chunks"]["sizeBytes"] = 2 * CHUNK
    with pytest.raises(ComponentSignatureError):
        component_signing.verify(resized["spec"], pub.keys)
    dropped = copy.deepcopy(obj)
    del dropped["spec"]["chunks"]  # a list removed is a change too
    with pytest.raises(ComponentSignatureError):
        component_signing.verify(dropped["spec"], pub.keys)


def _verified(obj: dict[str, Any], state: str = "Verified") -> dict[str, Any]:
    """As the operator's check leaves it in the component's status."""
    return {**obj, "status": {"verification": {"state": state}}}


def test_the_stand_in_uses_no_chunk_list_whose_signature_does_not_verify() -> None:
    pub, other = Publisher(), Publisher("someone-else")
    good = _verified(_chunked(pub))
    forged = copy.deepcopy(good)
    forged["spec"]["chunks"]["digests"][0] = _sha(b"x")
    foreign = _verified(_chunked(other))
    plans = chunk_plans([forged, foreign], pub.keys)
    assert plans == {}
    plans = chunk_plans([good], pub.keys)
    plan = plans[good["spec"]["image"]]
    assert plan.digests == tuple(good["spec"]["chunks"]["digests"])
    assert plan.whole == good["spec"]["digest"]  # the image is the file: checked whole too


def test_a_publisher_cannot_vouch_for_another_components_image_with_its_own_chunks() -> None:
    """A publisher the policy lets sign one application (or any key, for a component gtvp
    failed: out of its scope) signs a component naming the kernel's image with a chunk
    list of its own bytes: members must not fetch (and then serve) those as the kernel."""
    pub = Publisher()
    kernel = _verified(_chunked(pub))
    image = kernel["spec"]["image"]
    evil = _chunked(pub, data=b"my own kernel and init" * 5000)
    evil["metadata"]["name"] = "zz-app"
    evil["spec"].update(image=image, digest=kernel["spec"]["digest"])
    evil["spec"].pop("signature")
    evil["spec"]["signature"] = component_signing.sign(evil["spec"], pub.private_pem, pub.name)
    # failed by the operator (out of scope): its list is not used
    plans = chunk_plans([kernel, _verified(evil, "Failed")], pub.keys)
    assert plans[image].digests == tuple(kernel["spec"]["chunks"]["digests"])
    assert chunk_plans([evil], pub.keys) == {}  # never checked by the operator
    # two verified components disagree on one image: neither list is used, whichever last
    assert chunk_plans([kernel, _verified(evil)], pub.keys) == {}
    assert chunk_plans([_verified(evil), kernel], pub.keys) == {}
    # the genuine kernel carries no chunk list: the other's is not taken for it either
    plain = copy.deepcopy(kernel)
    del plain["spec"]["chunks"]
    plain["spec"].pop("signature")
    plain["spec"]["signature"] = component_signing.sign(plain["spec"], pub.private_pem, pub.name)
    assert chunk_plans([plain, _verified(evil)], pub.keys) == {}


def test_the_kernels_digest_under_another_image_name_gets_no_chunk_list_either() -> None:
    """The same, with the kernel's digest under an image name of the attacker's own
    repository (and a diskDigest, which turns the whole-file check off): a member's cache
    names the file by its digest, so a fetch of that image would land where the kernel is
    read from. No list is used for that digest, under either name."""
    pub = Publisher()
    plain = _chunked(pub)
    del plain["spec"]["chunks"]  # the genuine kernel, signed before chunk lists existed
    plain["spec"].pop("signature")
    plain["spec"]["signature"] = component_signing.sign(plain["spec"], pub.private_pem, pub.name)
    kernel = _verified(plain)
    digest = kernel["spec"]["digest"]
    own = b"my own kernel and init" * 5000
    evil = _chunked(pub, data=own, diskDigest=_sha(own))
    evil["metadata"]["name"] = "zz-app"
    evil["spec"].update(image=f"evil.example.com/x@{digest}", digest=digest)
    evil["spec"].pop("signature")
    evil["spec"]["signature"] = component_signing.sign(evil["spec"], pub.private_pem, pub.name)
    assert chunk_plans([kernel, _verified(evil)], pub.keys) == {}
    assert chunk_plans([_verified(evil), kernel], pub.keys) == {}
    # two names of one digest that agree keep their list (a mirror's name and the origin's)
    mirrored = copy.deepcopy(_chunked(pub))
    mirrored["metadata"]["name"] = "app-mirrored"
    mirrored["spec"]["image"] = mirrored["spec"]["image"].replace("registry", "mirror")
    mirrored["spec"].pop("signature")
    mirrored["spec"]["signature"] = component_signing.sign(
        mirrored["spec"], pub.private_pem, pub.name
    )
    both = chunk_plans([_verified(_chunked(pub)), _verified(mirrored)], pub.keys)
    assert len(both) == 2


def test_a_component_without_chunks_signs_the_same_bytes_as_before() -> None:
    spec = Publisher().component("lib", "1.0.0")["spec"]
    assert b"chunks" not in canonical_bytes(spec)
    with_chunks = {**spec, "chunks": {"sizeBytes": CHUNK, "digests": [_sha(b"")]}}
    assert b'"chunks":{"digests":["sha256:' in canonical_bytes(with_chunks)


# ----- splitting and checking ----------------------------------------------------------------


def test_chunks_cut_the_bytes_in_fixed_sizes_the_last_shorter() -> None:
    assert chunk_ranges(len(DATA), CHUNK) == [
        (0, CHUNK), (CHUNK, 2 * CHUNK), (2 * CHUNK, 3 * CHUNK), (3 * CHUNK, 4 * CHUNK),
        (4 * CHUNK, 5 * CHUNK), (5 * CHUNK, 5 * CHUNK + 4),
    ]  # fmt: skip
    assert chunk_ranges(0, CHUNK) == []
    assert chunk_ranges(CHUNK, CHUNK) == [(0, CHUNK)]
    want = [_sha(DATA[a:b]) for a, b in chunk_ranges(len(DATA), CHUNK)]
    assert chunk_digests([DATA], CHUNK) == want
    for block in (1000, CHUNK, CHUNK + 1, 3 * CHUNK):  # however the bytes arrive
        blocks = [DATA[i : i + block] for i in range(0, len(DATA), block)]
        assert chunk_digests(blocks, CHUNK) == want


def test_a_chunk_is_accepted_only_with_its_exact_bytes() -> None:
    pub = Publisher()
    c = parse_component(_chunked(pub)).chunks
    assert c is not None
    assert len(c.digests) == 6
    assert c.check(0, DATA[:CHUNK])
    assert c.check(5, DATA[5 * CHUNK :])
    altered = bytearray(DATA[CHUNK : 2 * CHUNK])
    altered[7] ^= 1
    assert not c.check(1, bytes(altered))
    assert not c.check(1, DATA[: 2 * CHUNK])  # too long
    assert not c.check(5, DATA[5 * CHUNK : -1])  # truncated
    assert not c.check(6, b"")  # no such chunk
    assert not c.check(0, DATA[CHUNK : 2 * CHUNK])  # another chunk's bytes


@pytest.mark.parametrize(
    ("chunks", "said"),
    [
        ({"sizeBytes": CHUNK, "digests": [_sha(b"")] * 5}, "has 5 entries; 327684 bytes"),
        ({"sizeBytes": CHUNK, "digests": [_sha(b"")] * 7}, "has 7 entries"),
        ({"sizeBytes": 1000, "digests": []}, "outside 65536..67108864"),
        ({"sizeBytes": 1 << 30, "digests": []}, "outside"),
        ({"sizeBytes": "1MiB", "digests": []}, "is not an integer"),
        ({"sizeBytes": CHUNK, "digests": ["md5:abc"] * 6}, "digests[0] 'md5:abc'"),
        ({"sizeBytes": CHUNK, "digests": "sha256:..."}, "is not a list"),
        ({"sizeBytes": CHUNK, "digests": [_sha(b"")] * (MAX_CHUNKS + 1)}, "over 4096"),
        (["sha256:"], "is not an object"),
    ],
)
def test_a_malformed_chunk_list_is_refused_naming_what_is_wrong(chunks: Any, said: str) -> None:
    with pytest.raises(ComponentError) as exc:
        parse_chunks(chunks, len(DATA))
    assert said in str(exc.value)
    obj = Publisher().component("lib", "1.0.0", size=len(DATA))
    obj["spec"]["chunks"] = chunks
    with pytest.raises(ComponentError, match=r"spec\.chunks"):
        parse_component(obj)


def test_the_samples_builder_signs_a_chunk_list_of_the_artifact(tmp_path: Any) -> None:
    from gtvp_local.guest.build import file_chunks

    f = tmp_path / "disk.img"
    f.write_bytes(DATA)
    got = file_chunks(f, CHUNK)
    assert got == {"sizeBytes": CHUNK, "digests": chunk_digests([DATA], CHUNK)}
    assert parse_chunks(got, len(DATA)).total == len(DATA)


# ----- who is asked, and for which chunk -----------------------------------------------------


def _rec(image: str) -> cache.Record:
    return cache.Record(image, 10)


def test_only_trusted_peers_that_hold_the_image_are_asked() -> None:
    image = f"r/app@{_sha(DATA)}"
    other = f"r/lib@{_sha(b'lib')}"
    holdings = {
        "a": [_rec(image)],
        "b": [_rec(image), _rec(other)],
        "c": [_rec(other)],
        "evil": [_rec(image)],  # holds it, but is not Trusted
        "me": [],
    }
    trusted = {"a", "b", "c", "me"}
    assert cache.peer_sources(image, "me", trusted, holdings) == ["a", "b"]
    assert cache.peer_sources(image, "a", trusted, holdings) == ["b"]  # never itself
    assert cache.peer_sources(other, "me", set(), holdings) == []
    members = [
        {"metadata": {"name": "a"}, "status": {"phase": "Trusted"}},
        {"metadata": {"name": "evil"}, "status": {"phase": "Untrusted"}},
        {"metadata": {"name": "new"}},
    ]
    assert trusted_members(members) == {"a"}


def _drain(
    s: cache.Schedule, liar: str | None = None, bad_chunk: int = -1
) -> list[tuple[str, int]]:
    """Every source takes chunks in turn; the liar fails `bad_chunk`. (source, chunk) taken."""
    taken = []
    while not s.finished() and not s.stuck():
        progressed = False
        for src in s.sources():
            i = s.take(src)
            if i is None:
                continue
            progressed = True
            taken.append((src, i))
            if src == liar and i == bad_chunk:
                s.fail(src, i, "bad digest", bad=True)
            else:
                s.done(src, i)
        assert progressed
    return taken


def test_peers_split_the_chunks_and_the_mirror_is_not_asked() -> None:
    s = cache.Schedule(10, ["b", "a", "c"])
    assert [s.stripe_start(p) for p in ("a", "b", "c")] == [0, 3, 6]
    taken = _drain(s)
    assert s.finished()
    assert sorted(i for _, i in taken) == list(range(10))
    assert {src for src, _ in taken} == {"a", "b", "c"}  # every peer served some
    assert s.got.get(cache.MIRROR_SOURCE, 0) == 0


def test_a_lying_peer_is_dropped_at_its_first_bad_chunk_and_another_source_serves_it() -> None:
    s = cache.Schedule(8, ["good", "liar"])
    first = s.stripe_start("liar")
    taken = _drain(s, liar="liar", bad_chunk=first)
    assert s.finished()
    assert s.bad == [("liar", first)]
    assert "liar" in s.dropped
    assert [i for src, i in taken if src == "liar"] == [first]  # asked nothing after it
    assert ("good", first) in taken  # the chunk came from elsewhere
    assert s.got.get(cache.MIRROR_SOURCE, 0) == 0


def test_the_mirror_serves_only_chunks_every_peer_failed_or_when_no_peer_holds_it() -> None:
    s = cache.Schedule(4, ["liar"])
    taken = _drain(s, liar="liar", bad_chunk=0)
    assert s.finished()
    assert s.bad == [("liar", 0)]
    assert sorted(i for src, i in taken if src == cache.MIRROR_SOURCE) == [0, 1, 2, 3]
    alone = cache.Schedule(3, [])
    assert sorted(i for _, i in _drain(alone)) == [0, 1, 2]
    assert alone.got == {cache.MIRROR_SOURCE: 3}
    peers = cache.Schedule(3, ["a"])
    assert peers.take(cache.MIRROR_SOURCE) is None  # a live peer may serve every chunk


def test_a_fetch_with_no_source_left_is_stuck_not_finished() -> None:
    s = cache.Schedule(2, ["liar"], mirror=False)
    i = s.take("liar")
    assert i == 0
    s.fail("liar", 0, "bad digest", bad=True)
    assert s.take("liar") is None
    assert s.stuck()
    assert not s.finished()
    assert s.take(cache.MIRROR_SOURCE) is None  # no mirror was given


def test_range_requests_are_read_within_the_file() -> None:
    assert cache.parse_range("bytes=0-9", 100) == (0, 10)
    assert cache.parse_range("bytes=90-", 100) == (90, 100)
    assert cache.parse_range("bytes=90-200", 100) == (90, 100)
    assert cache.parse_range("bytes=100-", 100) is None
    assert cache.parse_range("bytes=-5", 100) is None
    assert cache.parse_range(None, 100) is None


def _peer(
    body: bytes, every: float, status: str = "206 Partial Content", head_every: float = 0
) -> tuple[int, Any]:
    """A peer on 127.0.0.1 that answers each request with `body`, a byte each `every` s
    (and its headers a byte each `head_every` s)."""
    import socket
    import threading
    import time

    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                for i in range(len(head)) if head_every else ():
                    if stop.is_set():
                        break
                    conn.sendall(head[i : i + 1])
                    time.sleep(head_every)
                if not head_every:
                    conn.sendall(head)
                for i in range(0, len(body), 1 if every else len(body)):
                    if stop.is_set():
                        break
                    conn.sendall(body[i : i + (1 if every else len(body))])
                    time.sleep(every)

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1], stop


def test_a_peer_trickling_a_chunk_is_given_up_within_the_chunk_deadline() -> None:
    """A lying Trusted peer sends the headers, then a byte now and then (each read well
    inside the socket timeout): the chunk is given up on after its deadline (and taken from
    another source), not held, with the member's cache lock, for good."""
    import http.client
    import time

    plan = cache.ChunkPlan(CHUNK, tuple(chunk_digests([DATA], CHUNK)), len(DATA), _sha(DATA))
    fetch = cache._ChunkFetch("registry.example.com/app@" + _sha(DATA), plan, "", {})
    fetch.chunk_deadline_s = 1.0
    for body_every, head_every in ((0.1, 0.0), (0.0, 0.1)):  # the body, then the headers
        port, stop = _peer(DATA[:CHUNK], every=body_every, head_every=head_every)
        try:
            t0 = time.monotonic()
            with pytest.raises(cache.FetchError, match="too slow"):
                fetch.get(http.client.HTTPConnection("127.0.0.1", port, timeout=5), 0)
            assert time.monotonic() - t0 < 3
        finally:
            stop.set()
    # the deadline passes while the connection is made (a SYN-ACK just late), then the
    # headers trickle: cut off all the same (the watchdog found no socket to shut then)

    class LateConnect(http.client.HTTPConnection):
        def connect(self) -> None:
            time.sleep(1.2)
            super().connect()

    port, stop = _peer(DATA[:CHUNK], every=0.0, head_every=0.1)
    try:
        t0 = time.monotonic()
        with pytest.raises(cache.FetchError, match="too slow"):
            fetch.get(LateConnect("127.0.0.1", port, timeout=5), 0)
        assert time.monotonic() - t0 < 3
    finally:
        stop.set()
    # a peer that ignores Range and sends the whole file: only the chunk's bytes are kept
    port, stop = _peer(DATA, every=0, status="200 OK")
    try:
        got = fetch.get(http.client.HTTPConnection("127.0.0.1", port, timeout=5), 1)
        assert got == DATA[CHUNK : 2 * CHUNK]
    finally:
        stop.set()
