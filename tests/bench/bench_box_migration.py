"""Benchmark: moving a Lazy Box (a drain of its member, gtvp pre-fetching onto the target,
then the live migration) to a warm target, to a cold target whose components come from 1
Trusted source, and from 3, against the same application migrated with its whole disk (a
monolithic VM image).

Run: `python -m tests.bench.bench_box_migration [--runs 3] [--uplink-mbit 200]`
(or `make bench`).

Real: as in bench_box_boot (control plane, gtvp-operator, agents on swtpm, the components
built and signed here with their chunk lists, qemu), with four Trusted level-3 members,
each with its own network namespace and veth. Simulated: Nodes by kwok; KubeVirt and the
kubelet's pulls by gtvp's stand-in (`gtvp_local.virtsim --vms qemu`): the target's fetch is
the stand-in's pre-fetch (`Launcher.prefetch` → `Launcher.fetch` → `cache.fetch_chunked`:
chunks over HTTP from every Trusted member whose cache holds the image, each checked against
the signed chunk list), the migration qemu's live migration between the namespaces.

A box move is what `kubectl drain` of its member starts (here a cordon: the stand-in marks the
VMI as virt-api would, and gtvp's drain controller moves it; `handlers.drains`), the other
members but the target cordoned too, so the target is chosen for the row: gtvp's pre-fetch
(`handlers.prefetch`) writes its request on the target Node, the target fetches what it
lacks, and only then does gtvp create the migration. One box per run, moved three times:

- box, warm target: the target's cache holds the components (fetched before, not counted):
  no request, only the RAM moves;
- box, cold target, 1 source: the target's cache is empty and only the box's member (the
  drain's source, Trusted) holds the components: the pre-fetch takes every chunk from it;
- box, cold target, 3 sources: the target's cache is empty, the box's member and two other
  Trusted members hold them: the chunks come from the three in parallel.

Baseline, same run: the monolithic VM (`gtvp_local.guest.monolithic`, same kernel, 256 MiB)
migrated with its disk: the disk copied from its member to the target over the member link
(busybox httpd in the source's namespace, wget in the target's), then a
VirtualMachineInstanceMigration moves its RAM. The target holds the kernel already, as the
warm box's target does. (QEMU 7.2 could block-migrate a writable disk, but the runtime's
disks are read-only image files, so the copy stands in for it: the same bytes.)

Measured per move: the bytes on the target member's link (its host-side veth, both
directions, sampled every 20 ms): before the migration object exists (the components) and
after (the migration); the time from the move being decided (the cordon of the box's member;
for the baseline the start of the copy) until the migration object exists (gtvp's drain pass,
the pre-fetch request, the fetch, the target's Node listing the images, the next pass; the
fetch's own transfer time beside it) and from then until Succeeded (the stand-in's log
times); qemu's downtime. `--uplink-mbit N` gives every member an uplink of N Mbit/s (tc tbf
on its veth inside its namespace: what it sends, the RAM and the chunks alike); 0: unshaped.
Prints medians, the ratios against the monolithic migration and the warm target, and the
load (what else was running). Target (issue #14): a box migration with a warm target moves
≤ 10 % of the monolithic migration's bytes at the same guest memory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gtvp_local.controlplane import ephemeral_control_plane
from gtvp_local.guest.build import file_chunks
from gtvp_local.guest.monolithic import monolithic_vm
from gtvp_local.guest.reproducible import sha256_file
from gtvp_local.pool import Pool, trusted_pool
from gtvp_local.vmruntime import cache
from gtvp_local.vmruntime.network import MemberNet, ensure_member
from tests.bench.bench_box_boot import (
    MEMORY,
    NS,
    Catalogue,
    accel,
    apply,
    box,
    catalogue,
    clear_cache,
    create,
    kubectl_json,
    machine_load,
    median,
    node_of,
    remove,
    wait_for,
    wait_ready,
)
from tests.catalogue import Publisher

SETTLE_S = 5.0  # by default the guest runs its application this long before it is moved
COPY_PORT = 18080
SAMPLE_S = 0.02
MOVE_TIMEOUT_S = 240.0
ROWS = ("box warm", "box cold 1 source", "box cold 3 sources", "mono")
MIGRATED = re.compile(
    r"migration of (\S+) to (\S+): completed in ([\d.]+) ms, downtime ([\d.]+|None) ms, "
    r"(\d+) bytes on the link"
)
FETCHED = re.compile(
    r"\[SIMULATED kubelet\] (\S+) fetched (\S+): (\d+) bytes in ([\d.]+)s "
    r"(?:in chunks from (.*?), \d+ bad chunk\(s\)|over \S+) \((\d+) bytes on the link\)"
)
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", re.M)


@dataclass(frozen=True)
class Move:
    """One move, seen from the target member's link."""

    component_bytes: int
    """on the target's link from the decision until the migration object existed"""
    migration_bytes: int
    """on the target's link from then until the migration Succeeded"""
    hold_s: float
    """decided → the migration object exists (for a box: gtvp's pre-fetch wait)"""
    fetch_s: float
    """the target's own transfer time of what it fetched, or of the baseline's disk copy
    (inside hold_s)"""
    migration_s: float
    """the migration object exists → Succeeded"""
    downtime_ms: float
    sources: dict[str, int] = field(default_factory=dict)
    """component bytes by the member (or "mirror") that served them"""

    @property
    def link_bytes(self) -> int:
        return self.component_bytes + self.migration_bytes

    @property
    def total_s(self) -> float:
        return self.hold_s + self.migration_s


# --- the pool --------------------------------------------------------------------------------


@contextlib.contextmanager
def migration_pool(tag: str, members: int = 4) -> Iterator[tuple[Pool, Catalogue]]:
    """A throwaway control plane and `members` Trusted level-3 members running real VMs,
    the signed components (with chunk lists) applied, their files and the monolithic image
    served by the registry mirror from the pool's component store."""
    pub = Publisher()
    prefix = f"{tag}{uuid.uuid4().hex[:4]}"
    names = {f"{prefix}-{chr(ord('a') + i)}": 3 for i in range(members)}
    policy = {"interval": "2s", "valid_for": "8s", "max_uses": 1000, "publisher_keys": pub.keys}
    with tempfile.TemporaryDirectory() as d:
        cat, files = _snapshot(pub, Path(d) / "artifacts")
        items = {"apiVersion": "v1", "kind": "List", "items": cat.signed}
        with _started(Path(d), names, prefix, policy, items) as pool:
            # what the registry mirror serves: the snapshot, whatever is rebuilt meanwhile
            pool.component_store.mkdir(parents=True, exist_ok=True)
            for hexpart, path in files.items():
                shutil.copyfile(path, pool.component_store / hexpart)
            yield pool, cat


def _snapshot(pub: Publisher, into: Path, tries: int = 3) -> tuple[Catalogue, dict[str, Path]]:
    """The catalogue, signed by `pub`, and a copy of each of its files (by sha256 hex),
    checked against its digest and signed chunk list: other work on this machine may
    rebuild the artifacts in place meanwhile (then built again, at most `tries` times)."""
    into.mkdir(parents=True, exist_ok=True)
    for _ in range(tries):
        cat = catalogue(pub)
        pinned = {a.sha256: a.path for a in cat.components}
        pinned[cat.mono.sha256] = cat.mono.path
        files = {}
        for hexpart, path in pinned.items():
            files[hexpart] = into / hexpart
            shutil.copyfile(path, files[hexpart])
        chunked = {
            str(doc["spec"]["digest"]).removeprefix("sha256:"): doc["spec"]["chunks"]["digests"]
            for doc in cat.signed
        }
        if all(sha256_file(p) == h for h, p in files.items()) and all(
            file_chunks(files[h])["digests"] == digests for h, digests in chunked.items()
        ):
            return cat, files
        print("  an artifact changed on disk while it was copied (a build elsewhere): again")
    raise RuntimeError(f"the artifacts kept changing on disk ({tries} tries)")


@contextlib.contextmanager
def _started(
    d: Path, names: dict[str, int], prefix: str, policy: dict[str, Any], items: dict[str, Any]
) -> Iterator[Pool]:
    with (
        ephemeral_control_plane(d / "cp") as cp,
        trusted_pool(
            cp,
            d / "pool",
            names,
            policy_name=f"bench-{prefix}",
            policy=policy,
            vms="qemu",
            timeout=180,
            before_start=lambda p: apply(p, items),
        ) as pool,
    ):
        yield pool


@contextlib.contextmanager
def uplinks(pool: Pool, mbit: int) -> Iterator[None]:
    """Every member's uplink shaped to `mbit` Mbit/s (tc tbf on its veth inside its
    namespace); nothing when 0."""
    nets = [ensure_member(pool.dir, m) for m in pool.members()] if mbit else []
    try:
        for net in nets:
            subprocess.run(
                ["tc", "-n", net.netns, "qdisc", "replace", "dev", net.member_veth, "root", "tbf",
                 "rate", f"{mbit}mbit", "burst", "256kb", "latency", "100ms"],
                check=True, capture_output=True,
            )  # fmt: skip
        yield
    finally:
        for net in nets:
            subprocess.run(
                ["tc", "-n", net.netns, "qdisc", "del", "dev", net.member_veth, "root"],
                check=False, capture_output=True,
            )  # fmt: skip


def cordon(pool: Pool, members: Sequence[str], *, on: bool = True) -> None:
    for m in members:
        pool.cp.kubectl("cordon" if on else "uncordon", m)


# --- measuring -------------------------------------------------------------------------------


class LinkMeter:
    """The bytes on a member's link (its host-side veth, both directions), sampled every
    SAMPLE_S in a thread: `at(t)` is the count at wall-clock time t."""

    def __init__(self, net: MemberNet) -> None:
        self.net = net
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-link", daemon=True)

    def _count(self) -> int:
        rx, tx = self.net.link_bytes()
        return rx + tx

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self._count()))
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> LinkMeter:
        self.samples.append((time.time(), self._count()))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.samples.append((time.time(), self._count()))

    def at(self, t: float) -> int:
        """The last count sampled at or before `t` (the first one before any)."""
        got = self.samples[0][1]
        for when, count in self.samples:
            if when > t:
                break
            got = count
        return got


def _log(pool: Pool) -> str:
    return pool.procs.log_tail("virtsim", 1_000_000)


def log_time(log: str, needle: str) -> float:
    """Wall-clock time of the stand-in's first log line containing `needle` (its asctime,
    local time, to the millisecond)."""
    at = log.index(needle)
    stamps = list(LOG_TIME.finditer(log, 0, at + 1))
    if not stamps:
        raise RuntimeError(f"no time stamp before {needle!r} in the stand-in's log")
    stamp = dt.datetime.strptime(stamps[-1].group(1), "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


@dataclass(frozen=True)
class Fetch:
    member: str
    image: str
    size: int
    seconds: float
    sources: dict[str, int]


def fetches(log: str) -> list[Fetch]:
    """Every fetch the stand-in logged (chunked: bytes per source; else from the mirror)."""
    out = []
    for member, image, size, seconds, chunks, _ in FETCHED.findall(log):
        if chunks:
            by = {s: int(n) for s, n in re.findall(r"(\S+) (\d+) bytes", chunks)}
        else:
            by = {cache.MIRROR_SOURCE: int(size)}
        out.append(Fetch(member, image, int(size), float(seconds), by))
    return out


def migration_result(log: str, name: str) -> tuple[str, float]:
    """(target, downtime ms) of the VMI `name`'s last completed migration."""
    found = [m for m in MIGRATED.findall(log) if m[0] == f"{NS}/{name}"]
    if not found:
        raise RuntimeError(f"no completed migration of {name}: {log[-800:]}")
    _, target, _, downtime, _ = found[-1]
    return target, float(downtime) if downtime != "None" else float("nan")


def wait_migrated(pool: Pool, mig: str) -> None:
    def done() -> str | None:
        phase = (kubectl_json(pool, "get", "vmim", mig, "-n", NS).get("status") or {}).get("phase")
        if phase == "Failed":
            raise RuntimeError(f"migration {mig} failed: {pool.procs.log_tail('virtsim', 10)}")
        return phase if phase == "Succeeded" else None

    wait_for(f"migration {mig}", done, MOVE_TIMEOUT_S, 0.2)


def measure(
    pool: Pool, meter: LinkMeter, name: str, mig: str, decided: float, fetched_before: int
) -> tuple[Move, str]:
    """The move of VMI `name` by migration `mig` (Succeeded), decided at `decided`."""
    log = _log(pool)
    seen = log_time(log, f"migration {NS}/{mig}: Scheduling")
    succeeded = log_time(log, f"migration {NS}/{mig}: Succeeded")
    target, downtime = migration_result(log, name)
    mine = [f for f in fetches(log)[fetched_before:] if f.member == target]
    sources: dict[str, int] = {}
    for f in mine:
        for s, n in f.sources.items():
            sources[s] = sources.get(s, 0) + n
    base, at_seen, end = meter.at(decided), meter.at(seen), meter.at(succeeded + 0.5)
    move = Move(
        component_bytes=at_seen - base,
        migration_bytes=end - at_seen,
        hold_s=seen - decided,
        fetch_s=sum(f.seconds for f in mine),
        migration_s=succeeded - seen,
        downtime_ms=downtime,
        sources=sources,
    )
    return move, target


# --- the moves -------------------------------------------------------------------------------


def drain_move(pool: Pool, name: str, source: str, target: str) -> Move:
    """Drain the box's member `source` with every member but `target` cordoned: gtvp
    pre-fetches onto `target` and migrates the box there."""
    others = [m for m in pool.members() if m not in (source, target)]
    fetched_before = len(fetches(_log(pool)))
    cordon(pool, others)
    try:
        with LinkMeter(ensure_member(pool.dir, target)) as meter:
            decided = time.time()
            cordon(pool, [source])  # the drain: the move is decided

            def migration() -> str | None:
                items = (
                    kubectl_json(
                        pool, "get", "vmim", "-n", NS, "-l", f"gtvp.io/drain={source}"
                    ).get("items")
                    or []
                )
                mine = [m for m in items if (m.get("spec") or {}).get("vmiName") == name]
                return str(mine[-1]["metadata"]["name"]) if mine else None

            try:
                mig: str = wait_for(f"gtvp's drain migration of {name}", migration,
                                    MOVE_TIMEOUT_S, 0.3)  # fmt: skip
            except TimeoutError as exc:
                box = kubectl_json(pool, "get", "lazybox", name, "-n", NS).get("status")
                raise TimeoutError(f"{exc}\nbox: {json.dumps(box)[:800]}\n"
                                   f"{pool.operator_logs(20)}") from None  # fmt: skip
            wait_migrated(pool, mig)
            time.sleep(0.6)  # the meter's samples past Succeeded
        move, got = measure(pool, meter, name, mig, decided, fetched_before)
    finally:
        cordon(pool, pool.members(), on=False)
    if got != target:
        raise RuntimeError(f"{name} went to {got}, not {target}")
    return move


def box_moves(pool: Pool, cat: Catalogue, name: str, settle: float = SETTLE_S) -> dict[str, Move]:
    """A box on member a, drained to a warm b; then to a cold c with b the only holder;
    then to a cold d with c, b and a holding the components."""
    a, b, c, d = pool.members()[:4]
    for m in (b, c, d):
        clear_cache(pool, m)
    pool.warm_cache(a, cat.box_images)
    cordon(pool, [b, c, d])  # the box starts on a
    try:
        create(pool, box(name))
        wait_ready(pool, name)
    finally:
        cordon(pool, [b, c, d], on=False)
    if node_of(pool, name) != a:
        raise RuntimeError(f"{name} was placed on {node_of(pool, name)}, not {a}")
    time.sleep(settle)
    out: dict[str, Move] = {}

    pool.warm_cache(b, cat.box_images)
    out["box warm"] = drain_move(pool, name, a, b)
    if out["box warm"].sources:
        raise RuntimeError(f"the warm target fetched {out['box warm'].sources}")
    time.sleep(settle)

    clear_cache(pool, a)  # only b (the box's member) holds the components; c is cold
    out["box cold 1 source"] = drain_move(pool, name, b, c)
    time.sleep(settle)

    pool.warm_cache(a, cat.box_images)  # c (the box's), b and a hold them; d is cold
    out["box cold 3 sources"] = drain_move(pool, name, c, d)
    remove(pool, name, lazybox=True)
    for label, want in (("box cold 1 source", {b}), ("box cold 3 sources", {a, b, c})):
        if set(out[label].sources) != want:
            raise RuntimeError(f"{label}: the components came from {out[label].sources}, "
                               f"not from {sorted(want)}")  # fmt: skip
    return out


def copy_disk(pool: Pool, source: str, target: str, image: str) -> float:
    """Copy `image` from the source member's cache into the target's over the member link
    (busybox httpd in the source's namespace, wget in the target's); the target's cache then
    holds it. The seconds the transfer took."""
    src, dst = ensure_member(pool.dir, source), ensure_member(pool.dir, target)
    hexpart = cache.digest_hex(image)
    held = cache.member_dir(pool.dir, source)
    into = cache.ensure(pool.dir, target)
    part = into / f"{hexpart}.part"
    httpd = subprocess.Popen(
        ["ip", "netns", "exec", src.netns, "busybox", "httpd", "-f", "-p",
         f"{src.address}:{COPY_PORT}", "-h", str(held)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://{src.address}:{COPY_PORT}/{hexpart}"
        time.sleep(0.3)  # httpd listening
        t0 = time.monotonic()
        subprocess.run(
            ["ip", "netns", "exec", dst.netns, "busybox", "wget", "-q", "-O", str(part), url],
            check=True,
            timeout=300,
        )
        seconds = time.monotonic() - t0
    finally:
        httpd.terminate()
        httpd.wait(timeout=10)
    size = part.stat().st_size
    if size != (held / hexpart).stat().st_size:
        raise RuntimeError(f"copied {size} bytes of {image}")
    record = cache.Record(image, size, cache.etag_of(hexpart))
    (into / f"{hexpart}.json").write_text(json.dumps(record.to_json()))
    part.replace(into / hexpart)
    pool.patch_node_status(target, {"images": cache.listing(pool.dir, target)})
    return seconds


def mono_move(pool: Pool, cat: Catalogue, name: str, settle: float = SETTLE_S) -> Move:
    """The monolithic VM on a, migrated to b with its disk: the copy, then the RAM."""
    a, b = pool.members()[:2]
    others = [m for m in pool.members() if m not in (a, b)]
    for m in pool.members():
        clear_cache(pool, m)
    create(pool, monolithic_vm(name, cat.kernel, cat.mono, memory=MEMORY, node=a))
    wait_ready(pool, name)
    if node_of(pool, name) != a:
        raise RuntimeError(f"{name} runs on {node_of(pool, name)}, not {a}")
    time.sleep(settle)
    pool.warm_cache(b, [cat.kernel.image])  # the kernel, as a warm box's target has
    fetched_before = len(fetches(_log(pool)))
    mig = f"{name}-move"
    cordon(pool, others)  # the migration can only go to b
    try:
        with LinkMeter(ensure_member(pool.dir, b)) as meter:
            decided = time.time()
            copied = copy_disk(pool, a, b, cat.mono.image)
            create(pool, {
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstanceMigration",
                "metadata": {"name": mig},
                "spec": {"vmiName": name},
            })  # fmt: skip
            wait_migrated(pool, mig)
            time.sleep(0.6)
        move, got = measure(pool, meter, name, mig, decided, fetched_before)
    finally:
        cordon(pool, others, on=False)
    if got != b:
        raise RuntimeError(f"{name} went to {got}, not {b}")
    if move.sources:
        raise RuntimeError(f"the target fetched {move.sources}: the copy was not used")
    remove(pool, name, lazybox=False)
    return dataclasses.replace(move, fetch_s=copied)


# --- the table -------------------------------------------------------------------------------


def _med(moves: list[Move], what: str) -> float:
    return median([float(getattr(m, what)) for m in moves])


def _row(label: str, moves: list[Move], mono: list[Move], warm: list[Move]) -> str:
    b, t = _med(moves, "link_bytes"), _med(moves, "total_s")
    vs_mono = f"{b / _med(mono, 'link_bytes'):5.2f} {t / _med(mono, 'total_s'):5.2f}"
    vs_warm = f"{b / _med(warm, 'link_bytes'):5.2f} {t / _med(warm, 'total_s'):5.2f}"
    return (
        f"  {label:20} {b / 1e6:7.1f} = {_med(moves, 'component_bytes') / 1e6:5.1f} + "
        f"{_med(moves, 'migration_bytes') / 1e6:6.1f}  {t:6.2f} = {_med(moves, 'hold_s'):5.2f} "
        f"({_med(moves, 'fetch_s'):4.2f}) + {_med(moves, 'migration_s'):5.2f}  "
        f"{_med(moves, 'downtime_ms'):6.0f}   {vs_mono}      {vs_warm}"
    )


def run(runs: int = 1, uplink_mbit: int = 200, settle: float = SETTLE_S) -> dict[str, float]:
    print("bench_box_migration: a box drained off its member (gtvp pre-fetches, then "
          "live-migrates) vs a monolithic image migrated with its disk")  # fmt: skip
    print("machine before:\n" + machine_load())
    rows: dict[str, list[Move]] = {k: [] for k in ROWS}
    with migration_pool("bm") as (pool, cat), uplinks(pool, uplink_mbit):
        print(f"  members: {', '.join(pool.members())}; {cat.sizes()}; guest memory {MEMORY}; "
              f"uplink per member {uplink_mbit or 'unshaped'} Mbit/s")  # fmt: skip
        for i in range(runs):
            moves = box_moves(pool, cat, f"mig-{i}", settle)
            moves["mono"] = mono_move(pool, cat, f"mono-mig-{i}", settle)
            for label, m in moves.items():
                rows[label].append(m)
                per = ", ".join(f"{s} {n / 1e6:.1f} MB" for s, n in sorted(m.sources.items()))
                print(
                    f"  run {i}: {label:18} {m.component_bytes / 1e6:6.1f} MB + "
                    f"{m.migration_bytes / 1e6:6.1f} MB on the target's link, "
                    f"{m.hold_s:5.2f} s (fetch {m.fetch_s:4.2f} s) + {m.migration_s:5.2f} s, "
                    f"downtime {m.downtime_ms:4.0f} ms{'; from ' + per if per else ''}"
                )
        print(f"  {accel(pool)}")
    print(
        f"bench_box_migration: {runs} run(s), medians. Bytes on the target member's link: "
        "components (the baseline: its disk) + migration; seconds from the move decided: "
        "until the migration object exists (in brackets the fetch's, or the disk copy's, own "
        "transfer) + migration"
    )
    print(
        f"  {'':20} {'MB':>7}   {'comp':>5}   {'migr':>6}  {'s':>6}   {'hold':>5} "
        f"{'fetch':>6}    {'migr':>5}  {'dt ms':>6}   vs mono (B t)   vs warm (B t)"
    )
    for label, title in (
        ("mono", "baseline monolithic"),
        ("box warm", "box, warm target"),
        ("box cold 1 source", "box, cold, 1 source"),
        ("box cold 3 sources", "box, cold, 3 sources"),
    ):
        print(_row(title, rows[label], rows["mono"], rows["box warm"]))
    med = {k: _med(v, "link_bytes") for k, v in rows.items()}
    tot = {k: _med(v, "total_s") for k, v in rows.items()}
    hold = {k: _med(v, "hold_s") for k, v in rows.items()}
    one, three = "box cold 1 source", "box cold 3 sources"
    print(
        f"  ratio box-warm/monolithic {med['box warm'] / med['mono']:.3f} bytes (target <= "
        f"0.10); cold 3 sources/1 source: hold {hold[three] / hold[one]:.2f}, "
        f"total {tot[three] / tot[one]:.2f}"
    )
    print("machine after:\n" + machine_load())
    return {
        "warm_ratio": med["box warm"] / med["mono"],
        "cold1_ratio": med["box cold 1 source"] / med["mono"],
        "cold3_ratio": med["box cold 3 sources"] / med["mono"],
        "mono_bytes": med["mono"],
        "component_size": float(sum(a.size for a in cat.components)),
        "warm_component_bytes": _med(rows["box warm"], "component_bytes"),
        "cold1_component_bytes": _med(rows["box cold 1 source"], "component_bytes"),
        "cold3_component_bytes": _med(rows["box cold 3 sources"], "component_bytes"),
        "cold3_over_cold1_hold": hold[three] / hold[one],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--uplink-mbit", type=int, default=200)
    args = p.parse_args(argv)
    run(args.runs, args.uplink_mbit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
