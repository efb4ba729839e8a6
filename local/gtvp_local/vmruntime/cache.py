"""A member's component cache (local pool, real VMs): what its node truly holds.

In KubeVirt a containerDisk is an image the kubelet pulls onto the node before the
virt-launcher pod starts; the kubelet then reports the node's images in
`Node.status.images`, and gtvp's placement prefers members that already hold most of a
box's components. Here, with real VMs (`--vms qemu`), each member has a directory

    <state>/members/<member>/components/<hex>        the image's bytes
    <state>/members/<member>/components/<hex>.json   {"image", "sizeBytes", "etag"}

and `fetch_missing` copies the images a member lacks from the pool's registry mirror
(`Mirror`: an HTTP server on the bridge's host address, serving what `Source` says an
image is: the component store first, else the artifacts built here). The download runs
inside the member's network namespace (busybox wget under `ip netns exec`), so its bytes
cross the member's veth, and lands atomically (`.part`, then rename). `node_images` is
what the member's Node.status.images says: one entry per held image, its real size. gtvp
still writes that list in place of a kubelet (SIMULATION), but from what the cache holds.

A member also fetches again an image whose bytes at the mirror changed since it fetched
them (the mirror's ETag, a hash of what it serves, differs from the one recorded then). A
registry never changes a digest's bytes, but the tests' lying mirror does: this way the lie
reaches a member that fetched the genuine bytes before, and once the lie is gone the member
gets the genuine bytes back (SIMULATION: a kubelet would keep what it has).

The fetch does NOT verify the bytes against the image's digest, deliberately (the ETag is
only compared with the previous ETag, never with the pin): the cache is untrusted storage,
as a node's image store is to gtvp. What the guest boots is decided inside it: the box init
checks every disk against the composition's pin (kernel command line) before mounting it,
so a cache or mirror serving other bytes stops the box there (tests/e2e/test_real_vms.py
shows it).

An image whose signed OSComponent carries a chunk digest list is fetched otherwise when a
Trusted peer holds it: in chunks, in parallel from every such peer, each chunk checked
against the signed list before it is written (`fetch_chunked`, `PeerServer`, `Schedule`;
docs/lazyboxes.md, "Multi-source transfer").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import http.server
import json
import logging
import re
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gtvp.core import components
from gtvp_local.vmruntime import names, network

log = logging.getLogger("gtvp.vmruntime.cache")
MEMBERS = "members"
COMPONENTS = "components"
URL_PREFIX = "/images/"
FETCH_TIMEOUT_S = 300.0
Source = Callable[[str], Path]
"""The registry mirror: an image reference → the file it serves for it (raises if none)."""
Resolver = Callable[[str, "str | None"], Path]

_HEX = re.compile(r"^[0-9a-f]{64}$")


class FetchError(RuntimeError):
    """A member could not fetch an image; the message says which and why."""


# ----- pure parts --------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One image a member's cache holds."""

    image: str
    size_bytes: int
    etag: str = ""
    """The mirror's ETag for the bytes when they were fetched."""

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "sizeBytes": self.size_bytes, "etag": self.etag}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Record:
        return Record(str(data["image"]), int(data["sizeBytes"]), str(data.get("etag", "")))


@dataclass(frozen=True)
class FetchReport:
    """What one fetch moved: the file's bytes, the seconds it took, and the bytes the
    member's link carried towards the member meanwhile (the file plus HTTP and TCP)."""

    member: str
    image: str
    size_bytes: int
    seconds: float
    link_bytes: int


def digest_hex(image: str) -> str:
    """The sha256 hex an image reference pins (`…@sha256:<hex>`): its file name in a cache.
    ValueError for a reference without a pinned digest (nothing to name the bytes by)."""
    _, sep, hexpart = image.rpartition("@sha256:")
    if not sep or not _HEX.match(hexpart):
        raise ValueError(f"image {image!r} pins no sha256 digest")
    return hexpart


def images_of(vmi_spec: Mapping[str, Any]) -> list[str]:
    """The images a composed VMI needs on its node: its kernel-boot container's, then each
    containerDisk's (in the spec's order, each once)."""
    domain = vmi_spec.get("domain") or {}
    kb = (domain.get("firmware") or {}).get("kernelBoot") or {}
    found = [str((kb.get("container") or {}).get("image") or "")]
    for vol in vmi_spec.get("volumes") or []:
        found.append(str((vol.get("containerDisk") or {}).get("image") or ""))
    return list(dict.fromkeys(i for i in found if i))


def missing(
    needed: Iterable[str],
    held: Iterable[Record],
    etag: Callable[[str], str | None] = lambda _image: None,
) -> list[str]:
    """The needed images whose bytes (by digest) the cache does not hold, or holds as
    the mirror served them before it changed them (`etag`: the mirror's current ETag of
    an image, None when it cannot tell: what the cache holds stands)."""
    have = {digest_hex(r.image): r.etag for r in held}
    out = []
    for image in dict.fromkeys(needed):
        cached = have.get(digest_hex(image))
        now = etag(image) if cached is not None else None
        if cached is None or (now is not None and now != cached):
            out.append(image)
    return out


def etag_of(content_sha256: str) -> str:
    """The mirror's ETag for served bytes: their hash (what the image claims is not
    looked at: a lying mirror's ETag is its lie's)."""
    return f'"{content_sha256}"'


def node_images(held: Iterable[Record]) -> list[dict[str, Any]]:
    """`Node.status.images` for a cache: one entry per image, as a kubelet reports it."""
    return [
        {"names": [r.image], "sizeBytes": r.size_bytes} for r in sorted(held, key=lambda r: r.image)
    ]


def mirror_url(host: str, port: int, image: str) -> str:
    return f"http://{host}:{port}{URL_PREFIX}{urllib.parse.quote(image, safe='')}"


def image_of_path(path: str) -> str | None:
    """The image a mirror URL path asks for (None: not a mirror path)."""
    if not path.startswith(URL_PREFIX):
        return None
    image = urllib.parse.unquote(path[len(URL_PREFIX) :])
    return image or None


def file_name(path: str) -> str:
    """Where a file taken out of a cached image (a kernel-boot container's `kernelPath`)
    lives beside it: one flat, quoted name (a path from a VMI spec never leaves the dir)."""
    return urllib.parse.quote(path.lstrip("/"), safe="")


# ----- the cache on disk -------------------------------------------------------------------


def member_dir(state: Path, member: str) -> Path:
    return state / MEMBERS / names.sanitize(member, 63) / COMPONENTS


def ensure(state: Path, member: str) -> Path:
    """The member's cache directory, made (empty) if new, with the member's name beside it
    (directory names are sanitized)."""
    d = member_dir(state, member)
    d.mkdir(parents=True, exist_ok=True)
    name = d.parent / "member"
    if not name.is_file():
        name.write_text(member)
    return d


def members(state: Path) -> list[str]:
    """The members that have a cache under `state`."""
    found = []
    for d in sorted((state / MEMBERS).glob(f"*/{COMPONENTS}")):
        with contextlib.suppress(OSError):
            found.append((d.parent / "member").read_text().strip())
    return [m for m in found if m]


def held(state: Path, member: str) -> list[Record]:
    """What the member's cache holds: every record whose bytes are there, with the real
    size of those bytes."""
    d = member_dir(state, member)
    out = []
    for rec in sorted(d.glob("*.json")) if d.is_dir() else ():
        blob = d / rec.stem
        with contextlib.suppress(OSError, ValueError, KeyError):
            said = Record.from_json(json.loads(rec.read_text()))
            if digest_hex(said.image) == rec.stem and blob.is_file():
                out.append(Record(said.image, blob.stat().st_size, said.etag))
    return out


def listing(state: Path, member: str) -> list[dict[str, Any]]:
    """The member's Node.status.images, from its cache."""
    return node_images(held(state, member))


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    """One fetch or extraction at a time per member (a start and a migration may meet)."""
    with (d / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def resolver(state: Path, member: str) -> Resolver:
    """image (+ path inside a kernel-boot container) → the file in the member's cache.
    A file inside an image (the kernel, the initrd) is taken out of the cached tar once.
    FileNotFoundError when the cache lacks the image (fetch it first)."""
    d = member_dir(state, member)

    def resolve(image: str, path: str | None) -> Path:
        blob = d / digest_hex(image)
        if not blob.is_file():
            raise FileNotFoundError(f"{member}'s component cache holds no {image}")
        if path is None:
            return blob
        out = d / f"{blob.name}.files" / file_name(path)
        if out.is_file():
            return out
        with _locked(d):
            if not out.is_file():
                _extract(blob, path, out)
        return out

    return resolve


def _extract(tar: Path, path: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    try:
        with tarfile.open(tar) as t:
            member = t.getmember(path.lstrip("/"))
            src = t.extractfile(member) if member.isfile() else None
            if src is None:
                raise FileNotFoundError(f"{path} in {tar.name} is not a regular file")
            with src, part.open("wb") as dst:
                shutil.copyfileobj(src, dst)
    except (KeyError, tarfile.TarError) as exc:
        raise FileNotFoundError(f"the cached image {tar.name} holds no {path}: {exc}") from exc
    part.replace(out)


# ----- the registry mirror, over the member link -------------------------------------------


class Mirror:
    """The pool's registry mirror over HTTP on the bridge's host address (an ephemeral
    port: pools of several states share the bridge). `with Mirror(source) as m:`."""

    def __init__(self, source: Source, host: str = names.BRIDGE_ADDRESS) -> None:
        self.source = source
        self.host = host
        self._server: http.server.ThreadingHTTPServer | None = None
        self._lock = threading.Lock()
        self._hashes: dict[tuple[str, int, int, int], str] = {}

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the mirror is not serving")
        return int(self._server.server_address[1])

    def url(self, image: str) -> str:
        return mirror_url(self.host, self.port, image)

    def etag(self, image: str) -> str | None:
        """The ETag of what the mirror serves for `image` now (None: it serves nothing);
        hashed once per version of the served file."""
        try:
            path = self.source(image)
            st = path.stat()
        except Exception:  # noqa: BLE001 - whatever the lookup says: nothing served
            return None
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            h = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._hashes[key] = h.hexdigest()
        return etag_of(self._hashes[key])

    def start(self) -> Mirror:
        """Serve (once; later calls find it serving)."""
        with self._lock:
            if self._server is None:
                self._serve()
        return self

    def _serve(self) -> None:
        if self.host == names.BRIDGE_ADDRESS:
            network.ensure_bridge()
        source, etag = self.source, self.etag

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                image = image_of_path(self.path)
                try:
                    if image is None:
                        raise LookupError(f"not an image path: {self.path}")
                    served = source(image)
                    size = served.stat().st_size
                except Exception as exc:  # noqa: BLE001 - whatever the lookup says: 404
                    self.send_error(404, " ".join(str(exc).split())[:200])
                    return
                span = parse_range(self.headers.get("Range"), size)  # a chunk's bytes
                start, end = span or (0, size)
                self.send_response(206 if span else 200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(end - start))
                if span:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                self.send_header("ETag", etag(image) or '""')
                self.end_headers()
                with served.open("rb") as f:
                    if span is None:
                        shutil.copyfileobj(f, self.wfile)
                    else:
                        f.seek(start)
                        self.wfile.write(f.read(end - start))

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("mirror: " + format, *args)

        self._server = http.server.ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="gtvp-mirror", daemon=True).start()
        log.info("[SIMULATED registry mirror] serving components on %s:%d", self.host, self.port)

    def close(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None

    def __enter__(self) -> Mirror:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch(state: Path, member: str, image: str, mirror: Mirror) -> FetchReport | None:
    """Fetch `image` into the member's cache from inside its network namespace (the bytes
    cross its veth), atomically; the digest is not checked (module docstring). None when
    the cache holds what the mirror serves already (another fetch may have got it
    meanwhile)."""
    hexpart = digest_hex(image)
    d = ensure(state, member)
    net = network.ensure_member(state, member)
    busybox = shutil.which("busybox")
    if busybox is None:
        raise FetchError(f"{member} cannot fetch {image}: busybox is not installed")
    mirror.start()
    blob, part = d / hexpart, d / f"{hexpart}.part"
    url = mirror.url(image)
    with _locked(d):
        if not missing([image], held(state, member), mirror.etag):
            return None
        etag = mirror.etag(image) or ""
        part.unlink(missing_ok=True)
        _, tx0 = net.link_bytes()
        t0 = time.monotonic()
        try:
            done = subprocess.run(
                ["ip", "netns", "exec", net.netns, busybox, "wget", "-q", "-O", str(part), url],
                capture_output=True,
                text=True,
                timeout=FETCH_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            part.unlink(missing_ok=True)
            raise FetchError(f"{member} could not fetch {image}: timed out ({exc})") from exc
        seconds = time.monotonic() - t0
        _, tx1 = net.link_bytes()
        if done.returncode != 0 or not part.is_file():
            part.unlink(missing_ok=True)
            why = (done.stderr or done.stdout).strip() or f"wget exited {done.returncode}"
            raise FetchError(f"{member} could not fetch {image} from {url}: {why}")
        size = part.stat().st_size
        record = d / f"{hexpart}.json"
        tmp = record.with_name(record.name + ".part")
        tmp.write_text(json.dumps(Record(image, size, etag).to_json()))
        part.replace(blob)
        tmp.replace(record)
        shutil.rmtree(d / f"{hexpart}.files", ignore_errors=True)  # taken from older bytes
    report = FetchReport(member, image, size, seconds, tx1 - tx0)
    log.info(
        "[SIMULATED kubelet] %s fetched %s: %d bytes in %.2fs over %s (%d bytes on the link)",
        member, image, size, seconds, net.host_veth, report.link_bytes,
    )  # fmt: skip
    return report


def fetch_missing(
    state: Path, member: str, images: Sequence[str], mirror: Mirror
) -> list[FetchReport]:
    """Fetch each of `images` the member's cache lacks (or holds in a version the mirror
    no longer serves); what was fetched."""
    todo = missing(images, held(state, member), mirror.etag)
    reports = [fetch(state, member, i, mirror) for i in todo]
    return [r for r in reports if r is not None]


# ----- multi-source transfer: chunks from the Trusted peers that hold the image -----------
#
# A member fetching an image whose OSComponent carries a signed chunk digest list
# (`spec.chunks`) takes its chunks in parallel from every Trusted member whose cache holds
# it: each peer serves its cache read-only over HTTP (Range requests) on its own namespace
# address (`PeerServer`), and the fetching member's connections are made inside its own
# namespace, so the bytes cross both veths. Each chunk is checked against the signed list
# before it is written; a peer whose chunk is wrong is dropped for the rest of the fetch at
# that first bad chunk, and the chunk is fetched again from another source (the mirror when
# every peer failed it). With no peer holding the image, the mirror path above stands.

MIRROR_SOURCE = "mirror"
FETCHES_FILE = "fetches.jsonl"
CHUNK_TIMEOUT_S = 60.0
_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class ChunkPlan:
    """What a chunked fetch needs: the chunk size, each chunk's signed digest, the image's
    length, and the whole file's digest when the image pins the file itself (else None)."""

    chunk_bytes: int
    digests: tuple[str, ...]
    total: int
    whole: str | None = None

    def ranges(self) -> list[tuple[int, int]]:
        return components.chunk_ranges(self.total, self.chunk_bytes)


class Schedule:
    """Which source fetches which chunk (pure: no I/O, no lock; the caller holds one).

    Peer k of P starts at chunk k*n/P (each peer reads a stripe of its own, in order) and
    then takes the next chunk nobody holds or fetches and it has not failed, wrapping
    around, so faster peers take more; the mirror takes only chunks every live peer has
    failed, or any once no peer is left (or there was none). A source that fails a chunk
    (a bad digest, an error) is dropped for the rest of the fetch."""

    def __init__(self, chunks: int, peers: Sequence[str], *, mirror: bool = True) -> None:
        self.peers = tuple(sorted({p for p in peers if p != MIRROR_SOURCE}))
        self.mirror = mirror
        self.total = chunks
        self.pending = set(range(chunks))
        self.in_flight: dict[int, str] = {}
        self.failed: dict[int, set[str]] = {}
        self.dropped: dict[str, str] = {}
        self.got: dict[str, int] = {}  # chunks fetched per source
        self.bad: list[tuple[str, int]] = []  # (source, chunk) that failed the digest

    def live_peers(self) -> list[str]:
        return [p for p in self.peers if p not in self.dropped]

    def sources(self) -> list[str]:
        return [*self.peers, MIRROR_SOURCE] if self.mirror else list(self.peers)

    def take(self, source: str) -> int | None:
        if source in self.dropped or source not in self.sources():
            return None
        live = set(self.live_peers())
        free = sorted(self.pending - set(self.in_flight))
        if source in self.peers:
            start = self.stripe_start(source)
            free = [i for i in free if i >= start] + [i for i in free if i < start]
        for i in free:
            tried = self.failed.get(i, set())
            if source in tried:
                continue
            if source == MIRROR_SOURCE and live - tried:
                continue  # a live peer may still serve it
            self.in_flight[i] = source
            return i
        return None

    def stripe_start(self, peer: str) -> int:
        """The chunk `peer` fetches first."""
        return self.peers.index(peer) * self.total // len(self.peers)

    def done(self, source: str, index: int) -> None:
        self.in_flight.pop(index, None)
        self.pending.discard(index)
        self.got[source] = self.got.get(source, 0) + 1

    def fail(self, source: str, index: int, why: str, *, bad: bool = False) -> None:
        self.in_flight.pop(index, None)
        self.failed.setdefault(index, set()).add(source)
        self.dropped.setdefault(source, why)
        if bad:
            self.bad.append((source, index))

    def finished(self) -> bool:
        return not self.pending

    def stuck(self) -> bool:
        """Chunks remain that no source will take, and none is being fetched."""
        if self.finished() or self.in_flight:
            return False
        live = [s for s in self.sources() if s not in self.dropped]
        return all(s in self.failed.get(i, set()) for i in self.pending for s in live) or not live


@dataclass(frozen=True)
class ChunkedReport:
    """One chunked fetch: bytes and chunks per source, seconds, the bad chunks caught
    (source, chunk index) and the bytes the fetching member's link carried towards it."""

    member: str
    image: str
    size_bytes: int
    seconds: float
    link_bytes: int
    bytes_by_source: Mapping[str, int]
    chunks_by_source: Mapping[str, int]
    bad_chunks: tuple[tuple[str, int], ...]
    dropped: Mapping[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "member": self.member,
            "image": self.image,
            "sizeBytes": self.size_bytes,
            "seconds": round(self.seconds, 4),
            "linkBytes": self.link_bytes,
            "bytesBySource": dict(self.bytes_by_source),
            "chunksBySource": dict(self.chunks_by_source),
            "badChunks": [{"source": s, "chunk": i} for s, i in self.bad_chunks],
            "dropped": dict(self.dropped),
        }


def peer_sources(
    image: str, me: str, trusted: Iterable[str], holdings: Mapping[str, Iterable[Record]]
) -> list[str]:
    """The Trusted members other than `me` whose cache holds `image`'s bytes (by digest)."""
    want = digest_hex(image)
    return sorted(
        m
        for m in set(trusted)
        if m != me and any(digest_hex(r.image) == want for r in holdings.get(m, ()))
    )


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`Range: bytes=a-b` → (a, b+1) within `size`; None for no or an unusable range."""
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", (header or "").strip())
    if m is None:
        return None
    start = int(m.group(1))
    end = int(m.group(2)) + 1 if m.group(2) else size
    end = min(end, size)
    return (start, end) if start < end else None


def fetch_log(state: Path, member: str) -> list[dict[str, Any]]:
    """The member's chunked fetch records (oldest first)."""
    path = member_dir(state, member).parent / FETCHES_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----- sockets inside a member's namespace ---------------------------------------------------


def in_netns(netns: str, make: Callable[[], Any]) -> Any:
    """`make()` run in a thread that joined the network namespace `netns` first: a socket
    made there stays in that namespace wherever it is used afterwards."""
    import ctypes
    import os

    out: dict[str, Any] = {}

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            out["value"] = make()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out["error"] = exc

    t = threading.Thread(target=run, name=f"gtvp-netns-{netns}", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


class _NetnsConnection(http.client.HTTPConnection):
    """An HTTP connection whose socket is made (and connected) in `netns`."""

    def __init__(self, netns: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._netns = netns

    def connect(self) -> None:
        host, port, timeout = self.host, self.port, self.timeout
        self.sock = in_netns(
            self._netns, lambda: socket.create_connection((host, port), timeout=timeout)
        )


class PeerServer:
    """A member's cache served read-only over HTTP (Range requests) on its own namespace
    address, only while `serving()` says the member may serve (it is Trusted): otherwise
    every request is refused with 403."""

    def __init__(self, state: Path, member: str, serving: Callable[[], bool]) -> None:
        self.state, self.member, self.serving = state, member, serving
        self.net = network.ensure_member(state, member)
        self.requests = 0
        self.refused = 0
        d = ensure(state, member)
        server_self = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server_self.requests += 1
                image = image_of_path(self.path)
                if not server_self.serving():
                    server_self.refused += 1
                    log.warning("[SIMULATED peer mirror] %s refused %s: it is not Trusted",
                                member, self.path)  # fmt: skip
                    self._fail(403, f"{member} is not Trusted: it serves nothing")
                    return
                try:
                    if image is None:
                        raise LookupError(f"not an image path: {self.path}")
                    blob = d / digest_hex(image)
                    size = blob.stat().st_size
                except (LookupError, ValueError, OSError) as exc:
                    self._fail(404, str(exc))
                    return
                span = parse_range(self.headers.get("Range"), size)
                start, end = span or (0, size)
                self.send_response(206 if span else 200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(end - start))
                if span:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                self.end_headers()
                with blob.open("rb") as f:
                    f.seek(start)
                    left = end - start
                    while left:
                        block = f.read(min(left, 1 << 20))
                        if not block:
                            break
                        self.wfile.write(block)
                        left -= len(block)

            def _fail(self, code: int, why: str) -> None:
                body = " ".join(why.split())[:200].encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("peer %s: " + format, member, *args)

        address = self.net.address
        sock = in_netns(self.net.netns, lambda: socket.create_server((address, 0)))
        server = http.server.ThreadingHTTPServer((address, 0), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        server.server_address = sock.getsockname()
        server.server_name, server.server_port = address, int(server.server_address[1])
        server.daemon_threads = True
        self._server = server
        threading.Thread(
            target=server.serve_forever, name=f"gtvp-peer-{member}", daemon=True
        ).start()
        log.info("[SIMULATED peer mirror] %s serves its component cache on %s:%d",
                 member, address, self.port)  # fmt: skip

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _shut(conn: http.client.HTTPConnection, late: threading.Event) -> None:
    """Shut `conn`'s socket from another thread: a read blocked on it returns."""
    late.set()
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _ChunkFetch:
    """The sources of one chunked fetch, one thread (and one connection) each."""

    def __init__(
        self, image: str, plan: ChunkPlan, netns: str, where: Mapping[str, tuple[str, int]]
    ) -> None:
        self.image, self.plan, self.netns, self.where = image, plan, netns, where
        self.ranges = plan.ranges()
        self.check = components.Chunks(plan.chunk_bytes, plan.digests, plan.total).check
        self.sched = Schedule(
            len(self.ranges),
            sorted(s for s in where if s != MIRROR_SOURCE),
            mirror=MIRROR_SOURCE in where,
        )
        self.cond = threading.Condition()
        self.nbytes: dict[str, int] = {}
        self.member = ""
        self.chunk_deadline_s = CHUNK_TIMEOUT_S

    def run(self, member: str, fd: int) -> None:
        self.member = member
        threads = [
            threading.Thread(target=self.work, args=(s, fd), name=f"gtvp-chunks-{s}", daemon=True)
            for s in self.where
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def get(self, conn: http.client.HTTPConnection, index: int) -> bytes:
        """Chunk `index` from one source: at most the bytes it needs (a server that ignores
        Range sends the file from its start), within `chunk_deadline_s` in all. The socket
        timeout bounds each read only: a peer trickling a byte now and then would hold the
        chunk, and the member's cache lock, for good."""
        start, end = self.ranges[index]
        # the deadline covers the status line and headers too: past it the socket is shut
        # (a blocked read returns), whatever the source trickles
        late = threading.Event()
        watchdog = threading.Timer(self.chunk_deadline_s, _shut, args=(conn, late))
        watchdog.start()
        try:
            conn.request(
                "GET",
                URL_PREFIX + urllib.parse.quote(self.image, safe=""),
                headers={"Range": f"bytes={start}-{end - 1}"},
            )
            if late.is_set():  # the watchdog fired while it connected: no socket to shut then
                _shut(conn, late)
            resp = conn.getresponse()
            want = end - start if resp.status == 206 else end if resp.status == 200 else 200
            data = self._read(resp, want)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if late.is_set():
                raise FetchError(f"not in {self.chunk_deadline_s:.0f} s: too slow") from exc
            raise
        finally:
            watchdog.cancel()
        if late.is_set():
            conn.close()
            raise FetchError(f"{len(data)} bytes in {self.chunk_deadline_s:.0f} s: too slow")
        if not resp.isclosed():  # the source has more than it was asked for: start afresh
            conn.close()
        if resp.status == 200 and len(data) >= end:  # a server that ignores Range
            return data[start:end]
        if resp.status not in (200, 206):
            raise FetchError(f"HTTP {resp.status}: {data[:200].decode(errors='replace')}")
        return data

    def _read(self, resp: http.client.HTTPResponse, want: int) -> bytes:
        deadline = time.monotonic() + self.chunk_deadline_s
        out = bytearray()
        while len(out) < want:
            if time.monotonic() > deadline:
                raise FetchError(
                    f"{len(out)} of {want} bytes in {self.chunk_deadline_s:.0f} s: too slow"
                )
            block = resp.read1(min(1 << 16, want - len(out)))
            if not block:
                break
            out += block
        return bytes(out)

    def next_chunk(self, source: str) -> int | None:
        """The next chunk `source` fetches; None once it has nothing more to do."""
        sched = self.sched
        with self.cond:
            while True:
                if sched.finished() or source in sched.dropped or sched.stuck():
                    self.cond.notify_all()
                    return None
                index = sched.take(source)
                if index is not None:
                    return index
                self.cond.wait(0.2)  # another source's chunk may fail and be free again

    def work(self, source: str, fd: int) -> None:
        import os

        host, port = self.where[source]
        conn = _NetnsConnection(self.netns, host, port, CHUNK_TIMEOUT_S)
        try:
            while (index := self.next_chunk(source)) is not None:
                try:
                    data = self.get(conn, index)
                    good = self.check(index, data)
                    why = "" if good else f"chunk {index} does not match its signed digest"
                except (OSError, http.client.HTTPException, FetchError) as exc:
                    data, good, why = b"", False, f"chunk {index}: {exc}"
                    conn.close()
                if good:
                    os.pwrite(fd, data, self.ranges[index][0])
                with self.cond:
                    if good:
                        self.sched.done(source, index)
                        self.nbytes[source] = self.nbytes.get(source, 0) + len(data)
                    else:
                        self.sched.fail(source, index, why, bad=bool(data))
                        log.warning("[SIMULATED kubelet] %s dropped %s for the rest of its "
                                    "fetch of %s: %s", self.member, source, self.image,
                                    why)  # fmt: skip
                    self.cond.notify_all()
        finally:
            conn.close()


def _whole_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def fetch_chunked(
    state: Path,
    member: str,
    image: str,
    plan: ChunkPlan,
    peers: Mapping[str, tuple[str, int]],
    *,
    mirror: Mirror | None,
) -> ChunkedReport:
    """Fetch `image` into `member`'s cache chunk by chunk, in parallel from every peer in
    `peers` (member → its server's address and port) and from the mirror for chunks every
    peer failed; each chunk checked against `plan` before it is written (module comment).
    FetchError when a chunk comes right from no source, or the whole file is not `whole`."""
    import os

    hexpart = digest_hex(image)
    d = ensure(state, member)
    net = network.ensure_member(state, member)
    blob, part = d / hexpart, d / f"{hexpart}.part"
    where = dict(peers)
    if mirror is not None:
        mirror.start()
        where[MIRROR_SOURCE] = (mirror.host, mirror.port)
    job = _ChunkFetch(image, plan, net.netns, where)
    sched = job.sched
    with _locked(d):
        part.unlink(missing_ok=True)
        _, tx0 = net.link_bytes()
        t0 = time.monotonic()
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, plan.total)
            job.run(member, fd)
        finally:
            os.close(fd)
        seconds = time.monotonic() - t0
        _, tx1 = net.link_bytes()
        if not sched.finished():
            part.unlink(missing_ok=True)
            raise FetchError(
                f"{member} could not fetch {image}: chunks {sorted(sched.pending)} came right "
                f"from no source ({'; '.join(f'{s}: {w}' for s, w in sched.dropped.items())})"
            )
        if plan.whole is not None and _whole_digest(part) != plan.whole:
            part.unlink(missing_ok=True)
            raise FetchError(f"{member} fetched {image} in chunks, but the whole file is not "
                             f"{plan.whole}")  # fmt: skip
        etag = (mirror.etag(image) if mirror is not None else None) or ""
        record = d / f"{hexpart}.json"
        tmp = record.with_name(record.name + ".part")
        tmp.write_text(json.dumps(Record(image, plan.total, etag).to_json()))
        part.replace(blob)
        tmp.replace(record)
        shutil.rmtree(d / f"{hexpart}.files", ignore_errors=True)
    report = ChunkedReport(
        member, image, plan.total, seconds, tx1 - tx0, dict(job.nbytes), dict(sched.got),
        tuple(sched.bad), dict(sched.dropped),
    )  # fmt: skip
    with (d.parent / FETCHES_FILE).open("a") as f:
        f.write(json.dumps(report.to_json()) + "\n")
    log.info(
        "[SIMULATED kubelet] %s fetched %s: %d bytes in %.2fs in chunks from %s, %d bad "
        "chunk(s) (%d bytes on the link)",
        member, image, plan.total, seconds,
        ", ".join(f"{s} {n} bytes" for s, n in sorted(job.nbytes.items())),
        len(sched.bad), report.link_bytes,
    )  # fmt: skip
    return report
