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
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.server
import json
import logging
import re
import shutil
import subprocess
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gtvp_local.vmruntime import names, network

log = logging.getLogger("gtvp.vmruntime.cache")
MEMBERS = "members"
COMPONENTS = "components"
URL_PREFIX = "/images/"
FETCH_TIMEOUT_S = 300.0
Source = Callable[[str], Path]
"""The registry mirror: an image reference → the file it serves for it (raises if none)."""
Resolver = Callable[[str, "str | None"], Path]

_HEX = re.compile(r"^[0-9a-f]{1,64}$")


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
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.send_header("ETag", etag(image) or '""')
                self.end_headers()
                with served.open("rb") as f:
                    shutil.copyfileobj(f, self.wfile)

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
