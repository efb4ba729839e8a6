"""SIMULATION of KubeVirt's virt-handler/virt-launcher for the local pool: VMIs as real VMs.

The stand-in virt-controller (`gtvp_local.virtsim`) asks this launcher to run each VMI it
places on a member, and to live-migrate it when a migration reaches its turn:

- a composed Lazy Box (a kernel-boot VMI) runs the way virt-launcher would run it: the
  kernel, gtvp's box init and one read-only virtio disk per component, translated from the
  VMI spec by `gtvp_local.guest.qemu.machine_spec` with the image references resolved to
  files in the member's component cache (`vmruntime.cache`): before the VM starts, the
  member fetches the images its cache lacks from the pool's registry mirror (the
  component store, else the artifacts built here by `gtvp_local.guest.build`) across its
  own link, as a kubelet pulls a containerDisk before virt-launcher starts; a member that
  cannot fetch them does not start the VM (the VMI is Failed with the reason). The fetch
  runs in a worker thread (`prepare`; the VMI is Scheduling meanwhile), so a slow mirror
  holds up only the VMIs waiting for it, not the stand-in's loop. An image whose signed
  OSComponent carries a chunk digest list is fetched instead in chunks, in parallel, from
  every Trusted member whose cache holds it (each member serves its cache read-only over
  HTTP on its own address: `cache.PeerServer`), each chunk checked against the list
  (`cache.fetch_chunked`; the stand-in tells the launcher who is Trusted and the chunk
  lists: `set_view`). A
  migration's target fetches them too before the migration starts, unless gtvp had it
  pre-fetch them (`prefetch`: a worker thread per request, off the stand-in's loop, in
  place of the kubelet pulling the images a pre-pull pod names);
- a composed box gets a vTPM when its spec asks for one (`domain.devices.tpm`, which gtvp
  adds to every box it attests; one swtpm per VM process, `runtime.Runtime`), a NIC on the
  pod network (KubeVirt attaches one unless `autoattachPodInterface: false`) and its
  cloudInitNoCloud user data as a raw virtio disk with serial `cloudinit` (inline
  `userData`/`userDataBase64`, or the Secret `secretRef` names, read through
  `read_secret`), where the box's attestation client finds its `#gtvp-attest` line;
- any other VMI boots the runtime's tiny test guest (`vmruntime.guest`) with the VMI's
  memory (at least 128 MiB);
- the VMI is Running only once its console says `GTVP-READY`; a VM that ends (its init
  refused a disk, the kernel panicked) is Failed with the console's last words;
- a migration is `Runtime.migrate` to the target member's namespace in a worker thread
  (the stand-in polls the future), so its phases follow qemu's migration status.

Only the local pool and the tests use it; the Helm chart never installs it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gtvp.core.boxattest import disks_booted
from gtvp_local.guest import qemu as box_qemu
from gtvp_local.guest.reproducible import sha256_file
from gtvp_local.vmruntime import cache
from gtvp_local.vmruntime import runtime as rt
from gtvp_local.vmruntime.machine import MachineSpec

log = logging.getLogger("gtvp.vmruntime")
MIN_MEMORY_MIB = 128
PREFETCH_RETRY_S = 10.0  # a failed pre-fetch is tried again after this long
Resolver = Callable[[str, "str | None"], Path]
SecretReader = Callable[[str, str], "Mapping[str, bytes] | None"]
"""(namespace, name) → the Secret's data, decoded (None: no such Secret)."""
USER_DATA_KEYS = ("userdata", "userData")  # the Secret keys KubeVirt reads user data from


def vm_id(namespace: str, name: str) -> str:
    """The runtime's name of a VMI (one per VMI; a migration keeps it)."""
    return f"{namespace}.{name}"


def is_composed(vmi_spec: Mapping[str, Any]) -> bool:
    kb = ((vmi_spec.get("domain") or {}).get("firmware") or {}).get("kernelBoot") or {}
    return bool((kb.get("container") or {}).get("image"))


def wants_vtpm(devices: Mapping[str, Any]) -> bool:
    """The VMI asks for a vTPM (`domain.devices.tpm`, unless `enabled: false`), as
    virt-launcher reads it; gtvp asks for one for every box it attests."""
    tpm = devices.get("tpm")
    return isinstance(tpm, Mapping) and tpm.get("enabled", True) is not False


def machine_for(
    vmi_spec: Mapping[str, Any],
    resolve: Resolver | None,
    test_guest: Callable[[int], MachineSpec],
    cloud_init: Path | None = None,
) -> MachineSpec:
    """What qemu runs for this VMI spec (module docstring). A composed box without a
    resolver (no component artifacts here) is refused with a TranslationError.
    `cloud_init`: the file holding the box's user data (`write_user_data`)."""
    if is_composed(vmi_spec):
        if resolve is None:
            raise box_qemu.TranslationError("no component store: composed boxes cannot run here")
        spec = box_qemu.machine_spec(
            {"spec": vmi_spec}, resolve, network=False, cloud_init=cloud_init
        )
        devices = (vmi_spec.get("domain") or {}).get("devices") or {}
        return MachineSpec.from_json(
            {
                **spec.to_json(),
                "memory_mib": max(spec.memory_mib, MIN_MEMORY_MIB),
                "forwards": forwarded_ports(vmi_spec),
                "nic": devices.get("autoattachPodInterface", True) is not False,
                "tpm": wants_vtpm(devices),
            }
        )
    try:
        mib = box_qemu.guest_memory_mib(vmi_spec)
    except box_qemu.TranslationError:
        mib = MIN_MEMORY_MIB
    return test_guest(max(mib, MIN_MEMORY_MIB))


def pins_not_held(vmi_spec: Mapping[str, Any], resolve: Resolver) -> str | None:
    """Why a migration target's copies of a composed box's disks are not what its
    composition pins (`gtvp.disks=<serial>:<sha256>` on the kernel command line; None when
    each is). The box init checks every disk once, at boot; a live-migrated guest goes on
    reading the blocks it had not read from the target's files, which no init checks. A
    node's container runtime pulls an image by its digest and refuses other bytes; this
    is that check, for the member caches the local pool keeps (which deliberately do not
    check what they fetch, so that the box init's check at boot shows)."""
    try:
        pinned = {d.serial: d.digest.hex() for d in disks_booted(vmi_spec)}
    except ValueError as exc:
        return f"the composition's disk pins cannot be read: {exc}"
    volumes = {v.get("name"): v for v in vmi_spec.get("volumes") or []}
    for disk in ((vmi_spec.get("domain") or {}).get("devices") or {}).get("disks") or []:
        want = pinned.get(str(disk.get("serial") or ""))
        image = ((volumes.get(disk.get("name")) or {}).get("containerDisk") or {}).get("image")
        if want is None or not image:
            continue
        try:
            path = resolve(str(image), None)
        except FileNotFoundError as exc:
            return str(exc)
        got = sha256_file(path)
        if got != want:
            return (
                f"the target's copy of disk {disk.get('serial')} ({image}) is sha256:{got}, "
                f"the composition pins sha256:{want}: not migrated onto other bytes"
            )
    return None


class UserDataError(ValueError):
    """The VMI's cloud-init user data cannot be read (its Secret is missing, say)."""


def user_data_source(vmi_spec: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The VMI's cloudInitNoCloud volume source (None without one)."""
    for vol in vmi_spec.get("volumes") or []:
        source = vol.get("cloudInitNoCloud")
        if source is not None:
            return dict(source)
    return None


def user_data(
    vmi_spec: Mapping[str, Any], namespace: str, read_secret: SecretReader | None
) -> bytes | None:
    """The VMI's cloud-init user data: inline `userData`, `userDataBase64`, or the
    `userdata` key of the Secret `secretRef` names (in the VMI's namespace); None without
    a cloudInitNoCloud volume."""
    source = user_data_source(vmi_spec)
    if source is None:
        return None
    if "userData" in source:
        return str(source["userData"]).encode()
    if "userDataBase64" in source:
        try:
            return base64.b64decode(str(source["userDataBase64"]), validate=True)
        except binascii.Error as exc:
            raise UserDataError(f"cloudInitNoCloud.userDataBase64 is not base64: {exc}") from None
    ref = (source.get("secretRef") or {}).get("name")
    if ref:
        if read_secret is None:
            raise UserDataError(f"the user data is in Secret {namespace}/{ref}: no API here")
        data = read_secret(namespace, str(ref))
        if data is None:
            raise UserDataError(f"the user data Secret {namespace}/{ref} does not exist")
        for key in USER_DATA_KEYS:
            if key in data:
                return bytes(data[key])
        raise UserDataError(f"Secret {namespace}/{ref} has no userdata key")
    return b""


def secret_reader(core: Any) -> SecretReader:
    """A `SecretReader` over a kubernetes CoreV1Api (what virt-launcher's cloud-init
    does with a `secretRef`): None for a Secret that does not exist."""

    def read(namespace: str, name: str) -> Mapping[str, bytes] | None:
        from kubernetes.client.rest import ApiException

        try:
            secret = core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {str(k): base64.b64decode(v) for k, v in (secret.data or {}).items()}

    return read


SECTOR = 512


def write_user_data(directory: Path, data: bytes) -> Path:
    """`data` as a raw disk image under `directory`, named by its content (written once),
    zero-padded to whole sectors (the padding is zeros: the guest's reader ignores it)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{hashlib.sha256(data).hexdigest()[:24]}.img"
    if not path.exists():
        padded = data + b"\0" * (-len(data) % SECTOR or (0 if data else SECTOR))
        tmp = path.with_suffix(".part")
        tmp.write_bytes(padded)
        tmp.replace(path)
    return path


STORE = "component-store"
"""Under the pool's state: what the pool's registry mirror serves, by image digest."""


def with_store(resolve: Resolver, store: Path) -> Resolver:
    """Disk images from the pool's component store first: a file named by the image's
    sha256 hex is what the (possibly lying) registry mirror serves for that image; the
    artifacts built here otherwise. The box init, not this lookup, decides whether the
    bytes are the pinned ones. Only a digest of 64 hex digits names a file there (the
    mirror serves whatever path it is asked for: `x@sha256:/etc/shadow` would have read
    any file of the host; found by a review)."""

    def resolve_from_store(image: str, path: str | None) -> Path:
        if path is None and "@sha256:" in image:
            try:
                served = store / cache.digest_hex(image)
            except ValueError as exc:
                raise LookupError(str(exc)) from None
            if served.is_file():
                return served
        return resolve(image, path)

    return resolve_from_store


def pool_mirror(state: Path) -> Resolver:
    """The pool's registry mirror: its component store (`<state>/component-store`), else
    the component artifacts built here (cached; built on first use)."""
    from gtvp.local_state import cache_dir
    from gtvp_local.guest.box import resolver
    from gtvp_local.guest.build import build_catalogue

    return with_store(resolver(build_catalogue(cache_dir())), state / STORE)


def cloud_init_file(extra: Sequence[str]) -> Path | None:
    """The user data disk's file in a machine's extra qemu arguments (None without one)."""
    for arg in extra:
        if arg.startswith("file=") and "id=d-cloudinit-data" in arg:
            return Path(arg.split(",", 1)[0].removeprefix("file="))
    return None


def forwarded_ports(vmi_spec: Mapping[str, Any]) -> list[int]:
    """The TCP ports the VMI's masquerade interfaces forward (as virt-launcher's nftables
    rules would), served here on the member's address."""
    interfaces = (vmi_spec.get("domain") or {}).get("devices", {}).get("interfaces") or []
    return sorted(
        {
            int(p["port"])
            for i in interfaces
            if "masquerade" in i
            for p in i.get("ports") or []
            if p.get("protocol", "TCP") == "TCP"
        }
    )


_REASONS = (
    re.compile(r"gtvp-init: refused .*"),  # a disk's bytes differ from its pin
    re.compile(r"Kernel panic.*"),
    re.compile(r"gtvp-init: halting: .*"),
)


def last_words(console: str) -> str:
    """Why a VM ended, from its console: the box init's refusal, a kernel panic, the init's
    reason to halt, else the last line."""
    for reason in _REASONS:
        found = reason.findall(console)
        if found:
            return str(found[-1]).strip()
    lines = [ln for ln in console.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "the VM ended before its console said anything"


class Launcher:
    """VMIs (by namespace/name) as VMs of a `Runtime` rooted at `state`; `resolve` is the
    pool's registry mirror (`pool_mirror`), what members fetch components from (None: no
    composed box runs here)."""

    def __init__(
        self, state: Path, resolve: Resolver | None = None, read_secret: SecretReader | None = None
    ) -> None:
        self.runtime = rt.Runtime(state)
        self.resolve = resolve
        self.read_secret = read_secret
        """Reads a Secret (the user data a VMI's `cloudInitNoCloud.secretRef` names)."""
        self.mirror = None if resolve is None else cache.Mirror(lambda image: resolve(image, None))
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gtvp-migrate")
        self._migrations: dict[str, Future[rt.MigrationResult]] = {}
        self._lock = threading.Lock()
        self._changed = set(cache.members(state))  # reported once at startup
        self._prefetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gtvp-prefetch")
        self._prefetches: dict[tuple[str, str], Future[list[cache.FetchReport]]] = {}
        self._prefetch_failed: dict[tuple[str, str], float] = {}
        self.trusted: frozenset[str] = frozenset()
        self.plans: dict[str, cache.ChunkPlan] = {}
        self.peers: dict[str, cache.PeerServer] = {}

    def set_view(self, trusted: frozenset[str], plans: Mapping[str, cache.ChunkPlan]) -> None:
        """Who is Trusted (only they serve their cache or are asked) and the signed chunk
        lists by image; every member with a cache has a peer server from now on (one that
        is not Trusted refuses every request)."""
        if frozenset(trusted) != self.trusted:
            log.info("[SIMULATED peer mirror] trusted peers now: %s", ", ".join(sorted(trusted)))
        self.trusted, self.plans = frozenset(trusted), dict(plans)
        for member in cache.members(self.runtime.state):
            self.serve(member)

    def serve(self, member: str) -> cache.PeerServer:
        """`member`'s peer server (started once; it refuses while the member is not
        Trusted)."""
        with self._lock:
            server = self.peers.get(member)
            if server is None:
                server = cache.PeerServer(
                    self.runtime.state, member, lambda: member in self.trusted
                )
                self.peers[member] = server
        return server

    def prefetch(self, member: str, images: Sequence[str], why: str) -> bool:
        """Fetch `images` into `member`'s cache in a worker thread (one at a time per
        member and request `why`; a failed one is tried again after PREFETCH_RETRY_S).
        True while one runs. Each image must pin a sha256 digest (the mirror serves by
        digest)."""
        key = (member, why)
        with self._lock:
            running = self._prefetches.get(key)
            if running is not None and not running.done():
                return True
            if running is not None:
                del self._prefetches[key]
            failed = self._prefetch_failed.get(key)
            if failed is not None and time.monotonic() - failed < PREFETCH_RETRY_S:
                return False
            self._prefetches[key] = self._prefetcher.submit(self._prefetch, member, images, why)
        return True

    def _prefetch(self, member: str, images: Sequence[str], why: str) -> list[cache.FetchReport]:
        key = (member, why)
        try:
            reports = self.fetch(member, images)
        except (cache.FetchError, ValueError, OSError) as exc:
            with self._lock:
                self._prefetch_failed[key] = time.monotonic()
            log.warning("[SIMULATED kubelet] %s could not pre-fetch for %s: %s", member, why, exc)
            raise
        with self._lock:
            self._prefetch_failed.pop(key, None)
        done = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        log.info(
            "[SIMULATED kubelet] %s pre-fetched %d image(s) for %s: %d bytes, done at %s",
            member, len(reports), why, sum(r.size_bytes for r in reports), done,
        )  # fmt: skip
        return reports

    def fetch(self, member: str, images: Sequence[str]) -> list[cache.FetchReport]:
        """Fetch the images `member`'s cache lacks (cache.FetchError when one fails)."""
        if self.mirror is None:
            raise cache.FetchError(f"{member} cannot fetch components: no registry mirror here")
        state = self.runtime.state
        try:
            mine = cache.held(state, member)
            have = {cache.digest_hex(r.image) for r in mine}
            todo = cache.missing(images, mine, self.mirror.etag)
            reports = []
            for image in todo:
                plan = self.plans.get(image)
                holdings = {m: cache.held(state, m) for m in self.trusted if m != member}
                sources = cache.peer_sources(image, member, self.trusted, holdings)
                if plan is None or not sources or cache.digest_hex(image) in have:
                    # no chunk list, no Trusted peer holds it, or the member holds it and
                    # the mirror changed it (a test's lying mirror): the mirror path
                    reports.extend(cache.fetch_missing(state, member, [image], self.mirror))
                    continue
                where = {}
                for peer in sources:
                    server = self.serve(peer)
                    where[peer] = (server.net.address, server.port)
                chunked = cache.fetch_chunked(state, member, image, plan, where, mirror=self.mirror)
                reports.append(
                    cache.FetchReport(
                        member, image, chunked.size_bytes, chunked.seconds, chunked.link_bytes
                    )
                )
            return reports
        finally:
            self.cache_changed(member)

    def cache_changed(self, member: str) -> None:
        with self._lock:
            self._changed.add(member)

    def changed_caches(self) -> list[str]:
        """Members whose cache changed (or was not reported yet) since the last call."""
        with self._lock:
            changed, self._changed = sorted(self._changed), set()
        return changed

    def node_images(self, member: str) -> list[dict[str, Any]]:
        """`member`'s Node.status.images, from what its component cache holds."""
        return cache.listing(self.runtime.state, member)

    def prepare(self, namespace: str, name: str, member: str, vmi_spec: Mapping[str, Any]) -> bool:
        """Whether the VMI's VM can start on `member` now: True for a VMI that is not a
        composed box, or once the member's cache holds the box's images; otherwise the
        member fetches them in a worker thread (the caller asks again later) and, when that
        failed, its error is raised (cache.FetchError: the VM cannot start)."""
        if self.resolve is None or self.mirror is None or not is_composed(vmi_spec):
            return True
        key = (member, f"{namespace}/{name}")
        with self._lock:
            running = self._prefetches.get(key)
            if running is not None and not running.done():
                return False
            if running is not None:
                del self._prefetches[key]
                self._prefetch_failed.pop(key, None)
        failed = running.exception() if running is not None else None
        if failed is not None:
            raise failed
        images = cache.images_of(vmi_spec)
        lacking = cache.missing(images, cache.held(self.runtime.state, member), self.mirror.etag)
        if not lacking:
            return True
        with self._lock:
            self._prefetches[key] = self._prefetcher.submit(
                self._prefetch, member, lacking, f"{namespace}/{name}"
            )
        return False

    def start(self, namespace: str, name: str, member: str, vmi_spec: Mapping[str, Any]) -> None:
        """Start the VMI's VM on `member` (raises with the reason when it cannot start); a
        composed box's components are fetched into the member's cache first, and its
        disks are the files there."""
        resolve = self.resolve
        if resolve is not None and is_composed(vmi_spec):
            self.fetch(member, cache.images_of(vmi_spec))
            resolve = cache.resolver(self.runtime.state, member)
        cloud_init = self.cloud_init(namespace, member, vmi_spec)
        spec = machine_for(vmi_spec, resolve, rt.guest_spec, cloud_init)
        vm = vm_id(namespace, name)
        if self.runtime.running(vm):  # the VM of a VMI this one replaced (a restart)
            self.stop_vm(vm)
        self.runtime.start(vm, member, spec)

    def user_data_dir(self, member: str) -> Path:
        """Where `member` keeps its VMs' user data disks (beside its component cache)."""
        return cache.member_dir(self.runtime.state, member).parent / "cloudinit"

    def cloud_init(self, namespace: str, member: str, vmi_spec: Mapping[str, Any]) -> Path | None:
        """The file of a composed box's user data on `member` (None: not a box, or no
        cloud-init)."""
        if not is_composed(vmi_spec):
            return None
        source = user_data_source(vmi_spec) or {}
        if "secretRef" in source and self.read_secret is None:
            # no API client here: the box boots without its user data (its attestation
            # client says so), as before the runtime attached it
            log.warning(
                "[SIMULATED virt-launcher] cannot read the user data Secret %s/%s: no API "
                "client; the box boots without a cloud-init disk",
                namespace, source["secretRef"].get("name"),
            )  # fmt: skip
            return None
        data = user_data(vmi_spec, namespace, self.read_secret)
        if data is None:
            return None
        return write_user_data(self.user_data_dir(member), data)

    def known(self) -> set[str]:
        return set(self.runtime.vms())

    def ready(self, namespace: str, name: str) -> bool:
        return self.runtime.ready(vm_id(namespace, name))

    def ended(self, namespace: str, name: str) -> str | None:
        """Why the VM is gone, or None while it runs."""
        vm = vm_id(namespace, name)
        if self.runtime.running(vm) or vm in self._migrations:
            return None
        return last_words(self.runtime.console(vm))

    def console(self, namespace: str, name: str) -> str:
        return self.runtime.console(vm_id(namespace, name))

    def stop_vm(self, vm: str) -> None:
        if self.runtime.stop(vm):
            log.info("[SIMULATED virt-handler] stopped VM %s", vm)

    def migrate(
        self,
        namespace: str,
        name: str,
        target: str,
        max_bandwidth: int | None = None,
        vmi_spec: Mapping[str, Any] | None = None,
    ) -> Future[rt.MigrationResult]:
        """The migration of the VMI to `target`, started once (later calls: the same one):
        for a composed box (`vmi_spec`) the target fetches what its cache lacks and its qemu
        opens the disks in its own cache; then the VM live-migrates. `max_bandwidth`
        (bytes/s) makes the link slow for this migration."""
        vm = vm_id(namespace, name)
        if vm not in self._migrations:
            self._migrations[vm] = self._pool.submit(
                self._fetch_and_migrate, vm, target, vmi_spec, max_bandwidth
            )
        return self._migrations[vm]

    def _fetch_and_migrate(
        self,
        vm: str,
        target: str,
        vmi_spec: Mapping[str, Any] | None,
        max_bandwidth: int | None,
    ) -> rt.MigrationResult:
        spec = None
        if vmi_spec is not None and self.resolve is not None and is_composed(vmi_spec):
            self.fetch(target, cache.images_of(vmi_spec))
            refused = pins_not_held(vmi_spec, cache.resolver(self.runtime.state, target))
            if refused is not None:
                member = str(self.runtime.vm_record(vm).get("member", ""))
                log.warning(
                    "[SIMULATED virt-launcher] migration of %s to %s: %s", vm, target, refused
                )
                return rt.MigrationResult("failed", member, target, 0.0, reason=refused)
            # the user data disk the source started with, copied to the target's own files
            # (as the target's virt-launcher makes its own cloud-init disk)
            cloud_init = None
            with contextlib.suppress(KeyError):
                extra = MachineSpec.from_json(self.runtime.vm_record(vm)["spec"]).extra
                source = cloud_init_file(extra)
                if source is not None:
                    cloud_init = write_user_data(self.user_data_dir(target), source.read_bytes())
            spec = machine_for(
                vmi_spec, cache.resolver(self.runtime.state, target), rt.guest_spec, cloud_init
            )
        return self.runtime.migrate(vm, target, 120.0, max_bandwidth=max_bandwidth, spec=spec)

    def finish_migration(self, namespace: str, name: str) -> None:
        self._migrations.pop(vm_id(namespace, name), None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._prefetcher.shutdown(wait=False, cancel_futures=True)
        if self.mirror is not None:
            self.mirror.close()
        for server in self.peers.values():
            server.close()
